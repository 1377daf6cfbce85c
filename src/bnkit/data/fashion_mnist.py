"""Load Fashion-MNIST from local IDX files (no network), plus a tiny fake for tests.

Where the files are looked for (the first setting given decides):

1. ``root=`` passed to the loader: that folder only;
2. else ``$BNKIT_DATA``: that folder only;
3. else the default search: ``~/.cache/bnkit/fashion-mnist``, then
   ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
   the first folder holding the files wins.

An explicit folder (1 or 2) that does not exist or lacks a file is an error that names
the folder and the missing files; it never falls back to another folder, so a mistyped
path cannot silently load other data. ``locate_fashion_mnist`` returns the folder that
holds both splits. Within a folder ``<name>.gz`` is preferred over the raw ``<name>``.

Checksum rule (``verify``). Each official file has two published MD5s: of the ``.gz``
download (``OFFICIAL_FILES``) and of its decompressed IDX content (``OFFICIAL_CONTENT``).
With ``verify="auto"`` (default):

* a gzip file whose byte size equals the official ``.gz`` size claims to be the
  download: its MD5 must match (checked before it is decompressed), and when it does
  its content is official too;
* otherwise IDX content (a raw file, or a gzip file's content after gunzip) whose size
  equals the official decompressed size claims to be the official data: its MD5 must
  match. So official data edited and then gzipped again, or left raw, is refused.

Files of other sizes (such as the small generated ones) are not hashed; a truncated
official file is still caught by the IDX reader. ``verify=True`` requires every file to
be official: a gzip file must have the official ``.gz`` MD5, a raw file the official
decompressed MD5. ``verify=False`` checks nothing. Each check hashes a file once; the
result is cached with the array.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .idx import GZIP_MAGIC, IDXError, idx_header, read_idx, write_idx

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ChecksumError",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "locate_fashion_mnist",
    "make_fake_fashion_mnist",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_PREFIX = {"train": "train", "test": "t10k"}

#: Official gzip file name -> (size in bytes, MD5 hex digest).
OFFICIAL_FILES = {
    "train-images-idx3-ubyte.gz": (26421856, "cf8536b0aa1a6ac5fa3f23001093305c"),
    "train-labels-idx1-ubyte.gz": (29491, "10bea18fdb374794d4bb42e356e600c9"),
    "t10k-images-idx3-ubyte.gz": (4422079, "f78720b4224f21cce2f2ccf2d7a94c9a"),
    "t10k-labels-idx1-ubyte.gz": (5125, "0d30e22e447f3c33dab9ed536400ac01"),
}

#: Official file stem -> (size in bytes, MD5 hex digest) of the decompressed IDX content.
OFFICIAL_CONTENT = {
    "train-images-idx3-ubyte": (47040016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (60008, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (7840016, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (10008, "15d484375f8d13e6eb1aabb0c3f46965"),
}

USER_DIR = Path("~/.cache/bnkit/fashion-mnist")  # expanded at each search: HOME may change
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_REINSTALL = "sudo apt-get install --reinstall dataset-fashion-mnist"
_FILES = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
          "t10k-labels-idx1-ubyte, each optionally .gz")
_INSTALL_HELP = (
    "On Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist`; or set BNKIT_DATA "
    f"or pass root= to a folder holding the four IDX files ({_FILES})."
)

# (resolved path, mtime_ns, size) -> _Loaded. Small, so memory stays bounded;
# mtime and size in the key make an edited file reload.
_CACHE: dict[tuple[str, int, int], _Loaded] = {}
_CACHE_MAX = 8


class ChecksumError(IDXError):
    """A file that claims to be an official Fashion-MNIST file has the wrong MD5."""


def _stems(split: str) -> tuple[str, str]:
    """Return the (images, labels) file stems of a split, or raise for an unknown split."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = _PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


# ----------------------------------------------------------------------------- search


def _search_dirs(root) -> tuple[list[tuple[Path, str]], str | None]:
    """Return ([(folder, why it is searched)] in order, the explicit setting or None)."""
    if root is not None:
        return [(Path(root).expanduser(), "root=")], "root="
    env = os.environ.get("BNKIT_DATA")
    if env:
        return [(Path(env).expanduser(), "$BNKIT_DATA")], "$BNKIT_DATA"
    return [(USER_DIR.expanduser(), "user cache"),
            (SYSTEM_DIR, "Debian package dataset-fashion-mnist")], None


def _pick(folder: Path, stem: str) -> Path | None:
    """Return folder/stem.gz or folder/stem, whichever exists first, else None."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing(folder: Path, stems) -> str:
    """Say what keeps folder from holding every stem; '' when it holds them all."""
    if not folder.exists():
        return "missing: the folder does not exist"
    if not folder.is_dir():
        return "missing: not a folder"
    absent = [f"{stem}[.gz]" for stem in stems if _pick(folder, stem) is None]
    return f"missing {', '.join(absent)}" if absent else ""


def _not_found(what: str, stems, searched: list[str], setting: str | None) -> FileNotFoundError:
    """The error for files in no searched folder: where it looked, why, and the fix."""
    need = " and ".join(f"{stem}[.gz]" for stem in stems)
    if setting == "root=":
        where = "root= names the only folder searched (no fallback to other folders)"
        fix = ("pass root= the folder that holds the files, or put them in that folder; or "
               "drop root= to use $BNKIT_DATA or the default folders (~/.cache/bnkit/"
               "fashion-mnist, then /usr/share/datasets/fashion-mnist, filled on Debian/"
               "Ubuntu by `sudo apt-get install dataset-fashion-mnist`).")
    elif setting == "$BNKIT_DATA":
        where = "$BNKIT_DATA names the only folder searched (no fallback to other folders)"
        fix = ("point BNKIT_DATA (or root=) to the folder that holds the files, or put them "
               "in that folder; or unset BNKIT_DATA to search the default folders "
               "(~/.cache/bnkit/fashion-mnist, then /usr/share/datasets/fashion-mnist, "
               "filled on Debian/Ubuntu by `sudo apt-get install dataset-fashion-mnist`).")
    else:
        where = "root= and $BNKIT_DATA are not set; searched the default folders, in order"
        fix = _INSTALL_HELP
    return FileNotFoundError(
        f"Fashion-MNIST {what} not found: need {need} in one folder. {where}:\n"
        + "\n".join(searched) + "\nFix: " + fix
    )


def _find(stems, root, what: str) -> tuple[Path, list[Path]]:
    """Return (folder, [file per stem]) from the first searched folder holding every stem."""
    dirs, setting = _search_dirs(root)
    searched = []
    for folder, why in dirs:
        missing = _missing(folder, stems)
        if not missing:
            return folder, [_pick(folder, stem) for stem in stems]
        searched.append(f"  - {folder} ({why}): {missing}")
    raise _not_found(what, stems, searched, setting)


def find_fashion_mnist(split: str = "train", root=None) -> tuple[Path, Path]:
    """Find the images and labels files of a split (search rules in the module docstring).

    Args:
        split: ``"train"`` or ``"test"`` (stored as ``t10k-*``).
        root: The only folder searched; ``None`` for ``$BNKIT_DATA`` or, when that is
            unset, the default folders.

    Returns:
        ``(images_path, labels_path)``, ``.gz`` preferred over the raw file.

    Raises:
        FileNotFoundError: An explicit folder (``root`` or ``$BNKIT_DATA``) is missing or
            lacks a file, or no default folder holds both; the message names the folders,
            the missing files and the fix.

    Example:
        >>> images_path, labels_path = find_fashion_mnist("test")
    """
    _, (images, labels) = _find(_stems(split), root, f"{split!r} split")
    return images, labels


def locate_fashion_mnist(root=None) -> Path:
    """Return the folder that holds both splits (all four IDX files), by the same rules.

    Call it before a long run to fail early, and record the folder it returns: passing it
    as ``root=`` later loads exactly these files.

    Args:
        root: The only folder searched; ``None`` for ``$BNKIT_DATA`` or, when that is
            unset, the default folders (the first holding all four files wins).

    Returns:
        The folder, as a ``Path``.

    Raises:
        FileNotFoundError: As ``find_fashion_mnist``, for the four files.

    Example:
        >>> folder = locate_fashion_mnist()
        >>> images, labels = load_fashion_mnist("train", root=folder)
    """
    stems = _stems("train") + _stems("test")
    return _find(stems, root, "data set (both splits)")[0]


# ----------------------------------------------------------------------------- checksums


@dataclass
class _Loaded:
    """One file's array and MD5s, each MD5 computed when a check first needs it."""

    array: np.ndarray | None
    is_gzip: bool
    file_md5: str | None = None
    content_md5: str | None = None


def _file_md5(path: Path) -> str:
    """MD5 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_md5(array: np.ndarray) -> str:
    """MD5 of the IDX content an array was read from: its header, then big-endian values.

    The reader accepts only canonical content (one type code per dtype, no trailing
    bytes), so this equals the MD5 of the file's bytes after gunzip.
    """
    digest = hashlib.md5(idx_header(array), usedforsecurity=False)
    values = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">"))
    digest.update(values.reshape(-1).view(np.uint8))  # no copy for uint8 data
    return digest.hexdigest()


def _check_download(path: Path, size: int, entry: _Loaded, verify) -> bool:
    """The ``.gz`` rule; return True when the file is the verified official download."""
    official = OFFICIAL_FILES.get(path.name.removesuffix(".gz") + ".gz")
    if verify is False or not entry.is_gzip or official is None:
        return False
    if verify is not True and size != official[0]:
        return False
    why = "verify=True" if verify is True else f"its size, {size} bytes, is the official size"
    entry.file_md5 = entry.file_md5 or _file_md5(path)
    if entry.file_md5 != official[1]:
        raise ChecksumError(
            f"{path}: MD5 mismatch for an official Fashion-MNIST file ({why}): found "
            f"{entry.file_md5}, expected {official[1]}. The file is corrupt or modified. "
            f"Fix: reinstall it (`{_REINSTALL}`) or re-download it."
        )
    return True


def _check_content(path: Path, entry: _Loaded, verify) -> None:
    """The decompressed-content rule (module docstring) for a parsed file."""
    stem = path.name.removesuffix(".gz")
    official = OFFICIAL_CONTENT.get(stem)
    if verify is False or official is None:
        return
    size = len(idx_header(entry.array)) + entry.array.nbytes
    if verify is not True and size != official[0]:
        return
    entry.content_md5 = entry.content_md5 or _content_md5(entry.array)
    if entry.content_md5 != official[1]:
        where = " after gunzip" if entry.is_gzip else ""
        why = ("verify=True needs the official data" if verify is True
               else f"{size} bytes{where}, the size of the official {stem}")
        raise ChecksumError(
            f"{path}: MD5 mismatch of the IDX content{where} ({why}): found "
            f"{entry.content_md5}, expected {official[1]}. These are not the official "
            f"Fashion-MNIST data (modified, or repacked from a modified file). Fix: reinstall "
            f"it (`{_REINSTALL}`) or re-download it; to load your own data of this size, "
            "pass verify=False."
        )


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _load_array(path: Path, verify) -> np.ndarray:
    """Read one IDX file through the (path, mtime, size) cache and apply the checksum rule."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    entry = _CACHE.get(key) or _Loaded(None, _is_gzip(path))
    # The download's MD5 before parsing: a bad MD5 explains a bad gzip stream.
    official_download = _check_download(path, st.st_size, entry, verify)
    if entry.array is None:
        entry.array = read_idx(path)
        _CACHE[key] = entry
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))  # dicts keep insertion order: drop the oldest
    if not official_download:
        _check_content(path, entry, verify)
    return entry.array


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path) -> None:
    """Raise IDXError unless images are (N,H,W) uint8 and labels are N values in 0..9."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IDXError(
            f"{img_path}: images must be (N, H, W) uint8: found shape {images.shape} dtype "
            f"{images.dtype}. Fix: point to the images file (idx3-ubyte), not another file."
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise IDXError(
            f"{lbl_path}: labels must be a 1-D integer array: found shape {labels.shape} dtype "
            f"{labels.dtype}. Fix: point to the labels file (idx1-ubyte)."
        )
    if len(images) != len(labels):
        raise IDXError(
            f"{img_path} and {lbl_path}: images and labels must have the same length: found "
            f"{len(images)} images vs {len(labels)} labels. Fix: use files from the same split."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise IDXError(
            f"{lbl_path}: labels must be in 0..9: found range {labels.min()}..{labels.max()}. "
            "Fix: re-create or re-download the labels file."
        )


def load_fashion_mnist(split: str = "train", root=None, verify="auto"):
    """Load one Fashion-MNIST split as torch tensors.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        root: The only folder searched; ``None`` for ``$BNKIT_DATA`` or, when that is
            unset, the default folders (module docstring).
        verify: ``"auto"``, ``True`` or ``False``; the checksum rule in the module docstring.

    Returns:
        ``(images, labels)``: uint8 tensor ``(N, H, W)`` (28x28 for the real data) and
        int64 tensor ``(N,)`` with values in 0..9 (names in ``FASHION_MNIST_CLASSES``).
        Fresh tensors each call, so editing them never corrupts the cache.

    Raises:
        FileNotFoundError: The split is not in the folder given (``root`` or
            ``$BNKIT_DATA``), or in no default folder; the message says where it looked.
        IDXError: A file is malformed or images/labels disagree.
        ChecksumError: A file or its content claiming to be official has the wrong MD5.

    Example:
        >>> images, labels = load_fashion_mnist("test")
        >>> images.shape, FASHION_MNIST_CLASSES[labels[0]]
        (torch.Size([10000, 28, 28]), 'Ankle boot')
    """
    if not (verify is True or verify is False or verify == "auto"):
        raise ValueError(f"verify must be 'auto', True or False, got {verify!r}")
    img_path, lbl_path = find_fashion_mnist(split, root)
    images = _load_array(img_path, verify)
    labels = _load_array(lbl_path, verify)
    _check_pair(images, labels, img_path, lbl_path)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _fake_split(rng: np.random.Generator, templates: np.ndarray, n: int):
    """Draw n balanced, shuffled (image, label) pairs: class template plus Gaussian noise."""
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    pixels = 40.0 + 160.0 * templates[labels] + rng.normal(0.0, 30.0, (n, *templates.shape[1:]))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


def make_fake_fashion_mnist(folder, n_train: int = 256, n_test: int = 128, size: int = 28,
                            seed: int = 0, gzip: bool = True) -> Path:
    """Write a tiny, learnable Fashion-MNIST look-alike with the official file names.

    Each class is a distinct coarse 4x4 on/off block pattern scaled to ``size`` pixels,
    plus noise, so even a linear classifier separates the classes.

    Args:
        folder: Destination folder (created if missing).
        n_train: Number of training images (classes balanced to within one).
        n_test: Number of test images.
        size: Image height and width in pixels.
        seed: Seed; the same seed writes the same files.
        gzip: Write ``*.gz`` files (True) or raw IDX files (False).

    Returns:
        ``folder`` as a ``Path``, ready for ``load_fashion_mnist(root=folder)``.

    Example:
        >>> import tempfile
        >>> folder = make_fake_fashion_mnist(tempfile.mkdtemp(), n_train=20, n_test=10, size=8)
        >>> load_fashion_mnist("test", root=folder)[0].shape
        torch.Size([10, 8, 8])
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    codes = rng.choice(2**16, size=10, replace=False)  # distinct codes -> distinct patterns
    grid = ((codes[:, None] >> np.arange(16)) & 1).reshape(10, 4, 4)
    cell = np.arange(size) * 4 // size  # pixel -> block index
    templates = grid[:, cell][:, :, cell].astype(np.float64)
    suffix = ".gz" if gzip else ""
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = _fake_split(rng, templates, n)
        img_stem, lbl_stem = _stems(split)
        write_idx(folder / (img_stem + suffix), images, gzip=gzip)
        write_idx(folder / (lbl_stem + suffix), labels, gzip=gzip)
    return folder
