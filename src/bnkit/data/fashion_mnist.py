"""Load Fashion-MNIST from local IDX files (no network), plus a tiny fake for tests.

Search order for the files of a split (first folder holding both wins):

1. ``root`` passed to the loader,
2. ``$BNKIT_DATA``,
3. ``~/.cache/bnkit/fashion-mnist``,
4. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).

Within a folder ``<name>.gz`` is preferred over the raw ``<name>`` because only
the gzip files have published checksums.

Checksum rule (``verify``): MD5 checksums exist only for the official ``.gz``
downloads. With ``verify="auto"`` (default) a ``.gz`` file is checked when its
byte size equals the official file's size, i.e. when it claims to be the
official download; small generated files are never checked, and a truncated
official file is still caught by the IDX reader. ``verify=True`` requires every
file to be an official ``.gz`` with the right MD5; ``verify=False`` checks nothing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .idx import IDXError, parse_idx, write_idx

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ChecksumError",
    "find_fashion_mnist",
    "load_fashion_mnist",
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

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_REINSTALL = "sudo apt-get install --reinstall dataset-fashion-mnist"
_INSTALL_HELP = (
    "On Debian/Ubuntu run `sudo apt-get install dataset-fashion-mnist`; or set BNKIT_DATA "
    "or pass root= to a folder holding the four IDX files (train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each "
    "optionally .gz)."
)

# (resolved path, mtime_ns, size) -> (array, md5). Small, so memory stays bounded;
# mtime and size in the key make an edited file reload.
_CACHE: dict[tuple[str, int, int], tuple[np.ndarray, str]] = {}
_CACHE_MAX = 8


class ChecksumError(IDXError):
    """A file that claims to be an official Fashion-MNIST download has the wrong MD5."""


def _stems(split: str) -> tuple[str, str]:
    """Return the (images, labels) file stems of a split, or raise for an unknown split."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = _PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _search_dirs(root) -> list[tuple[Path, str]]:
    """List (folder, why it is searched) in search order."""
    dirs = []
    if root is not None:
        dirs.append((Path(root).expanduser(), "root="))
    env = os.environ.get("BNKIT_DATA")
    if env:
        dirs.append((Path(env).expanduser(), "$BNKIT_DATA"))
    dirs.append((Path.home() / ".cache" / "bnkit" / "fashion-mnist", "user cache"))
    dirs.append((SYSTEM_DIR, "Debian package dataset-fashion-mnist"))
    return dirs


def _pick(folder: Path, stem: str) -> Path | None:
    """Return folder/stem.gz or folder/stem, whichever exists first, else None."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(split: str = "train", root=None) -> tuple[Path, Path]:
    """Find the images and labels files of a split, following the search order.

    Args:
        split: ``"train"`` or ``"test"`` (stored as ``t10k-*``).
        root: Folder searched first; ``None`` to skip.

    Returns:
        ``(images_path, labels_path)`` from the first folder that holds both.

    Raises:
        FileNotFoundError: No folder holds both files; lists every folder searched.

    Example:
        >>> images_path, labels_path = find_fashion_mnist("test")
    """
    stems = _stems(split)
    searched = []
    for folder, why in _search_dirs(root):
        found = [_pick(folder, stem) for stem in stems]
        if all(found):
            return found[0], found[1]
        searched.append(f"  - {folder} ({why}): {'has some files' if any(found) else 'missing'}")
    if not os.environ.get("BNKIT_DATA"):
        searched.append("  ($BNKIT_DATA is not set)")
    raise FileNotFoundError(
        f"Fashion-MNIST {split!r} split not found: need {stems[0]}[.gz] and {stems[1]}[.gz] "
        "in one folder. Searched, in order:\n" + "\n".join(searched) + "\nFix: " + _INSTALL_HELP
    )


def _verify(path: Path, size: int, digest: str, verify) -> None:
    """Apply the checksum rule from the module docstring to one file."""
    if verify is False:
        return
    official = OFFICIAL_FILES.get(path.name)
    if verify is True and official is None:
        raise ChecksumError(
            f"{path}: verify=True needs the official gzip file, found {path.name!r}, expected "
            f"one of {sorted(OFFICIAL_FILES)}. Fix: use the .gz files or pass verify='auto'/False."
        )
    claims_official = official is not None and (verify is True or size == official[0])
    if claims_official and digest != official[1]:
        raise ChecksumError(
            f"{path}: MD5 mismatch for an official Fashion-MNIST file: found {digest}, "
            f"expected {official[1]}. The file is corrupt or modified. Fix: reinstall it "
            f"(`{_REINSTALL}`) or re-download it."
        )


def _load_array(path: Path, verify) -> np.ndarray:
    """Read one IDX file through the (path, mtime, size) cache, verifying before parsing."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _CACHE:
        array, digest = _CACHE[key]
        _verify(path, st.st_size, digest, verify)
        return array
    raw = path.read_bytes()
    digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    _verify(path, len(raw), digest, verify)  # before parsing: a bad MD5 explains a bad gzip
    array = parse_idx(raw, path)
    _CACHE[key] = (array, digest)
    while len(_CACHE) > _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))  # dicts keep insertion order: drop the oldest
    return array


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
        root: Folder searched first (see the module docstring for the search order).
        verify: ``"auto"``, ``True`` or ``False``; the checksum rule in the module docstring.

    Returns:
        ``(images, labels)``: uint8 tensor ``(N, H, W)`` (28x28 for the real data) and
        int64 tensor ``(N,)`` with values in 0..9 (names in ``FASHION_MNIST_CLASSES``).
        Fresh tensors each call, so editing them never corrupts the cache.

    Raises:
        FileNotFoundError: The split is in no searched folder (message lists them).
        IDXError: A file is malformed or images/labels disagree.
        ChecksumError: A file claiming to be official has the wrong MD5.

    Example:
        >>> images, labels = load_fashion_mnist("test")
        >>> images.shape, FASHION_MNIST_CLASSES[labels[0]]
        (torch.Size([10000, 28, 28]), 'Ankle boot')
    """
    if verify not in ("auto", True, False):
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
