"""Tests for bnkit.data: IDX reading/writing and the offline Fashion-MNIST loader."""

import gzip
import hashlib
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

import bnkit.data
import bnkit.data.fashion_mnist as fm
import bnkit.data.idx as idx_module
from bnkit.data import (
    FASHION_MNIST_CLASSES,
    ChecksumError,
    IDXError,
    find_fashion_mnist,
    load_fashion_mnist,
    locate_fashion_mnist,
    make_fake_fashion_mnist,
    parse_idx,
    read_idx,
    write_idx,
)

REAL_DIR = "/usr/share/datasets/fashion-mnist"
MAX_IDX_BYTES = idx_module.MAX_IDX_BYTES
MAX_IDX_DIMS = idx_module.MAX_IDX_DIMS
DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]




def _sample(dtype):
    """A (2, 3, 4) array covering the dtype's extremes, so byte order mistakes show."""
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
    lo, hi = (-1e3, 1e3) if np.dtype(dtype).kind == "f" else (info.min, info.max)
    arr = np.linspace(lo, hi, 24).reshape(2, 3, 4).astype(dtype)
    arr[0, 0, 0], arr[1, 2, 3] = info.min, info.max
    return arr


def _raw_idx(code, dims, payload=b""):
    """Hand-build IDX bytes so tests do not depend on write_idx."""
    head = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + payload


# ---------------------------------------------------------------- IDX round trips


@pytest.mark.parametrize("use_gzip", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_each_type_code(tmp_path, dtype, use_gzip):
    arr = _sample(dtype)
    path = write_idx(tmp_path / "a.idx", arr, gzip=use_gzip)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == use_gzip
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, arr)
    back[0, 0, 0] = 1  # result must be writable (a copy, not a read-only buffer view)
    assert back[0, 0, 0] == 1


def test_write_idx_header_is_big_endian(tmp_path):
    path = write_idx(tmp_path / "x", np.array([1, 258], dtype=np.int16))
    assert path.read_bytes() == _raw_idx(0x0B, [2], b"\x00\x01\x01\x02")


@pytest.mark.parametrize("shape", [(), (0,), (0, 5), (1, 1, 1, 1)])
def test_roundtrip_edge_shapes(tmp_path, shape):
    arr = np.zeros(shape, dtype=np.int32) + 7
    back = read_idx(write_idx(tmp_path / "e", arr))
    assert back.shape == shape
    np.testing.assert_array_equal(back, arr)


def test_gzip_detected_by_content_not_name(tmp_path):
    arr = np.arange(5, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "plain.gz", arr)), arr)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "packed", arr, gzip=True)), arr)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(IDXError, match="int64") as info:
        write_idx(tmp_path / "bad", np.arange(3, dtype=np.int64))
    assert "astype" in str(info.value)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- IDX errors


def test_idx_error_is_value_error():
    assert issubclass(IDXError, ValueError) and issubclass(ChecksumError, IDXError)


def test_truncated_data_names_path_and_byte_counts(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(_raw_idx(0x08, [10], bytes(10))[:-3])  # 8 header + 7 of 10 data bytes
    with pytest.raises(IDXError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and "truncated data" in msg
    assert "found 15 bytes" in msg and "expected 18 bytes" in msg
    assert "Fix:" in msg


def test_truncated_data_inside_gzip_says_after_gunzip(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(_raw_idx(0x0C, [4], bytes(12))))  # needs 16 data bytes
    with pytest.raises(IDXError, match="truncated data") as info:
        read_idx(path)
    msg = str(info.value)
    assert "20 bytes after gunzip" in msg and "24 bytes" in msg and str(path) in msg


def test_truncated_header(tmp_path):
    path = tmp_path / "h"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # 3 dims need a 16-byte header
    with pytest.raises(IDXError, match="truncated header") as info:
        read_idx(path)
    assert "found 6 bytes" in str(info.value) and "16 bytes" in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(IDXError, match="found 0 bytes"):
        read_idx(path)


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_corrupt_gzip(tmp_path, damage):
    good = gzip.compress(_raw_idx(0x08, [100], bytes(range(100))))
    path = tmp_path / "bad.gz"
    if damage == "cut":
        path.write_bytes(good[: len(good) // 2])
    else:
        mid = len(good) // 2
        path.write_bytes(good[:mid] + bytes([good[mid] ^ 0xFF]) + good[mid + 1 :])
    with pytest.raises(IDXError, match="corrupt gzip stream") as info:
        read_idx(path)
    assert str(path) in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("between", [b"", b"\0" * 5])
def test_gzip_members_read_as_one_stream(tmp_path, between):
    """Members in a row (zero padding allowed) decode as gzip.decompress decodes them."""
    raw = _raw_idx(0x0B, [3, 2], bytes(range(12)))
    packed = gzip.compress(raw[:5]) + between + gzip.compress(raw[5:9]) + gzip.compress(raw[9:])
    path = tmp_path / "members.gz"
    path.write_bytes(packed + between)
    assert gzip.decompress(packed + between) == raw  # the oracle accepts the same bytes
    expected = np.frombuffer(raw, ">i2", offset=12).reshape(3, 2)
    np.testing.assert_array_equal(read_idx(path), expected)
    np.testing.assert_array_equal(parse_idx(path.read_bytes()), expected)


@pytest.mark.parametrize("tail", [b"\x07", b"junk bytes"])
def test_garbage_after_gzip_member(tmp_path, tail):
    path = tmp_path / "tail.gz"
    path.write_bytes(gzip.compress(_raw_idx(0x08, [2], b"\x01\x02")) + tail)
    with pytest.raises((OSError, EOFError)):  # gzip itself refuses it
        gzip.decompress(path.read_bytes())
    with pytest.raises(IDXError, match="corrupt gzip stream") as info:
        read_idx(path)
    assert str(path) in str(info.value) and tail[:2].hex()[:2] in str(info.value)


def test_bad_magic(tmp_path):
    path = tmp_path / "text.idx"
    path.write_bytes(b"hello world, not idx")
    with pytest.raises(IDXError, match="bad magic") as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and "68 65 6c 6c" in msg and "00 00" in msg


def test_unknown_type_code(tmp_path):
    path = tmp_path / "t.idx"
    path.write_bytes(_raw_idx(0x07, [1], b"\x00"))
    with pytest.raises(IDXError, match="unknown type code") as info:
        read_idx(path)
    assert "0x07" in str(info.value) and "0x0D" in str(info.value)


def test_trailing_bytes(tmp_path):
    path = tmp_path / "long.idx"
    path.write_bytes(_raw_idx(0x08, [3], b"\x01\x02\x03\x04\x05"))
    with pytest.raises(IDXError, match="trailing bytes") as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and "found 13 bytes" in msg and "2 extra" in msg
    assert "expected 11 bytes" in msg


# ---------------------------------------------------------------- bombs and header limits

MIB = 1 << 20
_ZEROS_MEMBER = gzip.compress(bytes(MIB), mtime=0)  # ~1 KB of gzip for 1 MiB of zeros


def _gzip_bomb(path, dims, mib, code=0x08):
    """A gzip file: an IDX header with dims, then `mib` MiB of zeros (one gzip member each).

    gzip streams may hold several members, read back as one stream, so a few KB per
    1 MiB member build a large inflated size at no cost.
    """
    path.write_bytes(gzip.compress(_raw_idx(code, dims), mtime=0) + _ZEROS_MEMBER * mib)
    return path


def _peak_bytes(fn):
    """Run fn() (it must raise IDXError); return (error message, peak traced allocation)."""
    tracemalloc.start()
    try:
        with pytest.raises(IDXError) as info:
            fn()
        return str(info.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_gzip_bomb_after_a_small_header_stops_at_the_declared_size(tmp_path):
    """16 declared bytes then 128 MiB of zeros: fail on the first extra byte, in small memory."""
    path = _gzip_bomb(tmp_path / "bomb.gz", [16], 128)
    assert path.stat().st_size < MIB  # 128 MiB inflated from under 1 MiB on disk
    msg, peak = _peak_bytes(lambda: read_idx(path))
    assert str(path) in msg and "trailing bytes" in msg and "after gunzip" in msg
    assert "expected 24 bytes" in msg and "Fix:" in msg
    assert peak < 4 * MIB, f"peak {peak / MIB:.1f} MiB while reading a 24-byte IDX file"


def test_gzip_bomb_declaring_a_huge_array_fails_before_inflating(tmp_path):
    """A header declaring 2**32 - 1 by 2 bytes (8 GiB) is over the ceiling: no data is read."""
    path = _gzip_bomb(tmp_path / "huge.gz", [2**32 - 1, 2], 64)
    msg, peak = _peak_bytes(lambda: read_idx(path))
    assert str(path) in msg and "declared size over the limit" in msg
    assert f"shape ({2**32 - 1}, 2)" in msg and f"{(2**32 - 1) * 2} bytes" in msg
    assert f"at most {MAX_IDX_BYTES} bytes" in msg and "max_bytes=" in msg and "Fix:" in msg
    assert peak < 4 * MIB


def test_max_bytes_lowers_or_raises_the_ceiling(tmp_path):
    path = write_idx(tmp_path / "a", np.arange(100, dtype=np.int16))  # 200 data bytes
    with pytest.raises(IDXError, match="declared size over the limit") as info:
        read_idx(path, max_bytes=199)
    assert "shape (100,) of int16 = 200 bytes" in str(info.value)
    assert "at most 199 bytes" in str(info.value)
    np.testing.assert_array_equal(read_idx(path, max_bytes=200), np.arange(100))
    raw = path.read_bytes()
    with pytest.raises(IDXError, match="at most 10 bytes"):
        parse_idx(raw, path, max_bytes=10)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
            read_idx(path, max_bytes=bad)


def test_truncated_inside_a_large_declared_size_reads_only_what_is_there(tmp_path):
    """A header declaring 1 GiB with 8 MiB of data: 'truncated data', memory near 8 MiB."""
    path = _gzip_bomb(tmp_path / "short.gz", [2**30], 8)
    msg, peak = _peak_bytes(lambda: read_idx(path))
    assert "truncated data" in msg and f"found {8 + 8 * MIB} bytes after gunzip" in msg
    assert f"expected {8 + 2**30} bytes" in msg
    assert peak < 24 * MIB


_CAPPED = """
import importlib.util, resource, sys
cap = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
spec = importlib.util.spec_from_file_location("idx", sys.argv[3])
idx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(idx)
try:
    idx.read_idx(sys.argv[1])
except BaseException as exc:
    print(type(exc).__name__, exc)
"""


def _read_idx_capped(path, cap=384 * MIB):
    """read_idx(path) in a fresh process (numpy only) limited to `cap` bytes of address space."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _CAPPED, str(path), str(cap), idx_module.__file__],
                         check=False, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_one_gib_gzip_bomb_under_a_memory_cap_gives_an_idx_error(tmp_path):
    """The reported case: ~1 MB on disk, 1 GiB inflated, read under a 384 MiB memory cap."""
    path = _gzip_bomb(tmp_path / "gib.gz", [10], 1024)
    assert path.stat().st_size < 2 * MIB
    out = _read_idx_capped(path)
    assert out.startswith("IDXError ") and "trailing bytes" in out and str(path) in out


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_fails_fast():
    out = _read_idx_capped("/dev/zero")
    assert out.startswith("IDXError /dev/zero: unknown type code: found 0x00"), out
    with pytest.raises(IDXError, match="unknown type code"):
        read_idx("/dev/zero")


@pytest.mark.parametrize("code, dims, nbytes", [
    (0x08, [2**31, 2**31, 4], 2**64),           # the product overflows int64 to 0
    (0x0C, [2**32 - 1] * 4, (2**32 - 1) ** 4 * 4),
    (0x0E, [2**32 - 1], (2**32 - 1) * 8),
])
def test_header_declaring_too_many_bytes(tmp_path, code, dims, nbytes):
    path = tmp_path / "big.idx"
    path.write_bytes(_raw_idx(code, dims))
    with pytest.raises(IDXError, match="declared size over the limit") as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and f"shape {tuple(dims)}" in msg and f"= {nbytes} bytes" in msg
    assert "-" not in msg.split("found")[1].split("expected")[0]  # no negative byte count
    assert f"at most {MAX_IDX_BYTES} bytes" in msg and "Fix:" in msg


@pytest.mark.parametrize("ndim", [MAX_IDX_DIMS + 1, 255])
def test_too_many_dimensions(tmp_path, ndim):
    path = tmp_path / "deep.idx"
    path.write_bytes(_raw_idx(0x08, [1] * ndim, b"\x05"))
    with pytest.raises(IDXError, match="too many dimensions") as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and f"found {ndim}" in msg and f"at most {MAX_IDX_DIMS}" in msg
    assert "Fix:" in msg


def test_most_dimensions_allowed_and_zero_sized(tmp_path):
    path = tmp_path / "deep.idx"
    path.write_bytes(_raw_idx(0x08, [1] * MAX_IDX_DIMS, b"\x05"))
    assert read_idx(path).shape == (1,) * MAX_IDX_DIMS and read_idx(path).item() == 5
    path.write_bytes(_raw_idx(0x0E, [0, 2**32 - 1]))  # zero values: nothing to read
    assert read_idx(path).shape == (0, 2**32 - 1) and read_idx(path).dtype == np.float64


def test_zero_sized_shape_numpy_cannot_hold(tmp_path):
    """No values, but numpy refuses the shape: its nonzero sizes overflow numpy's index."""
    path = tmp_path / "wide.idx"
    path.write_bytes(_raw_idx(0x0E, [0, 2**32 - 1, 2**32 - 1]))
    with pytest.raises(IDXError, match="shape too large for numpy") as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and f"span {(2**32 - 1) ** 2 * 8} bytes" in msg and "Fix:" in msg
    with pytest.raises(ValueError):  # numpy itself refuses it (the oracle for the rule)
        np.empty((0, 2**32 - 1, 2**32 - 1), np.float64)


# ---------------------------------------------------------------- fake dataset


def test_tiny_idx_dir_fixture(tiny_idx_dir):
    names = sorted(p.name for p in tiny_idx_dir.iterdir())
    assert names == sorted(fm.OFFICIAL_FILES)
    images, labels = load_fashion_mnist("train", root=tiny_idx_dir)
    assert images.shape == (256, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (256,) and labels.dtype == torch.int64
    test_images, test_labels = load_fashion_mnist("test", root=tiny_idx_dir)
    assert test_images.shape == (128, 28, 28) and test_labels.shape == (128,)
    assert torch.bincount(labels, minlength=10).tolist() == [26] * 6 + [25] * 4


def test_fake_dataset_is_learnable(tiny_idx_dir):
    """A nearest-centroid classifier fit on train must classify test well."""
    x, y = (t.numpy() for t in load_fashion_mnist("train", root=tiny_idx_dir))
    xt, yt = (t.numpy() for t in load_fashion_mnist("test", root=tiny_idx_dir))
    centroids = np.stack([x[y == k].reshape(-1, 28 * 28).mean(0) for k in range(10)])
    dist = ((xt.reshape(-1, 1, 28 * 28) - centroids[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == yt).mean() >= 0.95


def test_fake_dataset_deterministic_raw_and_sized(tmp_path):
    a = make_fake_fashion_mnist(tmp_path / "a", n_train=30, n_test=20, size=8, seed=3, gzip=False)
    b = make_fake_fashion_mnist(tmp_path / "b", n_train=30, n_test=20, size=8, seed=3, gzip=False)
    c = make_fake_fashion_mnist(tmp_path / "c", n_train=30, n_test=20, size=8, seed=4, gzip=False)
    name = "train-images-idx3-ubyte"
    assert (a / name).read_bytes() == (b / name).read_bytes() != (c / name).read_bytes()
    assert not list(a.glob("*.gz"))
    images, labels = load_fashion_mnist("test", root=a)
    assert images.shape == (20, 8, 8) and set(labels.tolist()) == set(range(10))


# ---------------------------------------------------------------- search order


def _fake(folder, n):
    return make_fake_fashion_mnist(folder, n_train=n, n_test=10, size=4)


def test_search_order(isolated, monkeypatch):
    root = _fake(isolated / "root", 10)
    env = _fake(isolated / "env", 20)
    _fake(isolated / "home" / ".cache" / "bnkit" / "fashion-mnist", 30)
    _fake(fm.SYSTEM_DIR, 40)
    monkeypatch.setenv("BNKIT_DATA", str(env))

    assert len(load_fashion_mnist(root=root)[0]) == 10  # root beats BNKIT_DATA
    assert len(load_fashion_mnist()[0]) == 20  # BNKIT_DATA beats defaults
    monkeypatch.delenv("BNKIT_DATA")
    assert len(load_fashion_mnist()[0]) == 30  # user cache beats system folder
    for p in (isolated / "home" / ".cache" / "bnkit" / "fashion-mnist").iterdir():
        p.unlink()
    assert len(load_fashion_mnist()[0]) == 40
    assert find_fashion_mnist("test")[0] == fm.SYSTEM_DIR / "t10k-images-idx3-ubyte.gz"


def _set(monkeypatch, setting, folder):
    """Name folder explicitly: as root= (returned) or as $BNKIT_DATA (returns None)."""
    if setting == "env":
        monkeypatch.setenv("BNKIT_DATA", str(folder))
        return None
    return folder


CACHE_PARTS = ("home", ".cache", "bnkit", "fashion-mnist")
WHY = {"root": "(root=)", "env": "($BNKIT_DATA)"}


@pytest.mark.parametrize("setting", ["root", "env"])
def test_explicit_folder_lacking_a_file_never_falls_back(isolated, monkeypatch, setting):
    partial = _fake(isolated / "partial", 10)
    (partial / "train-labels-idx1-ubyte.gz").unlink()
    _fake(isolated.joinpath(*CACHE_PARTS), 30)
    _fake(fm.SYSTEM_DIR, 40)
    if setting == "root":  # root= also wins over a complete $BNKIT_DATA folder
        monkeypatch.setenv("BNKIT_DATA", str(_fake(isolated / "env", 20)))
    root = _set(monkeypatch, setting, partial)
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train", root=root)
    msg = str(info.value)
    assert msg.startswith("Fashion-MNIST 'train' split not found")
    assert f"  - {partial} {WHY[setting]}: missing train-labels-idx1-ubyte[.gz]\n" in msg
    assert "only folder searched" in msg and "Fix:" in msg
    for other in (isolated / "env", isolated.joinpath(*CACHE_PARTS), fm.SYSTEM_DIR):
        assert f"{other} (" not in msg  # no other folder was searched
    assert len(load_fashion_mnist("test", root=root)[0]) == 10  # the test split is complete


@pytest.mark.parametrize("setting", ["root", "env"])
@pytest.mark.parametrize("kind", ["absent", "file"])
def test_explicit_folder_that_is_not_there(isolated, monkeypatch, setting, kind):
    _fake(fm.SYSTEM_DIR, 40)
    folder = isolated / "typo"
    if kind == "file":
        folder.write_text("not a folder")
    root = _set(monkeypatch, setting, folder)
    for call in (lambda: load_fashion_mnist("test", root=root),
                 lambda: find_fashion_mnist("train", root=root),
                 lambda: locate_fashion_mnist(root=root)):
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        reason = "the folder does not exist" if kind == "absent" else "not a folder"
        assert f"  - {folder} {WHY[setting]}: missing: {reason}\n" in msg
        assert str(fm.SYSTEM_DIR) not in msg
        assert "sudo apt-get install dataset-fashion-mnist" in msg
        assert "BNKIT_DATA" in msg and "root=" in msg


def test_default_search_error_lists_folders_and_fix(isolated, monkeypatch):
    cache = make_fake_fashion_mnist(isolated.joinpath(*CACHE_PARTS), n_train=10, n_test=10,
                                    size=4)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (cache / name).unlink()
    monkeypatch.setenv("BNKIT_DATA", "")  # empty: not set
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train")
    msg = str(info.value)
    line = f"  - {cache} (user cache): missing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]"
    assert line in msg and f"  - {fm.SYSTEM_DIR} (Debian package dataset-fashion-mnist): missing" in msg
    assert msg.index(str(cache)) < msg.index(str(fm.SYSTEM_DIR))
    assert "root= and $BNKIT_DATA are not set" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "BNKIT_DATA" in msg.split("Fix:")[1] and "root=" in msg.split("Fix:")[1]
    assert len(load_fashion_mnist("test")[0]) == 10  # the cache holds the test split


def test_locate_returns_the_folder_holding_both_splits(isolated, monkeypatch):
    assert bnkit.data.locate_fashion_mnist is locate_fashion_mnist
    root = _fake(isolated / "root", 10)
    env = _fake(isolated / "env", 20)
    assert locate_fashion_mnist(root) == root and locate_fashion_mnist(str(root)) == root
    monkeypatch.setenv("BNKIT_DATA", str(env))
    assert locate_fashion_mnist() == env
    monkeypatch.delenv("BNKIT_DATA")
    cache = _fake(isolated.joinpath(*CACHE_PARTS), 30)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (cache / name).unlink()
    _fake(fm.SYSTEM_DIR, 40)
    assert locate_fashion_mnist() == fm.SYSTEM_DIR  # the cache lacks the test split
    assert find_fashion_mnist("train")[0].parent == cache  # one split: the first folder
    with pytest.raises(FileNotFoundError) as info:
        locate_fashion_mnist(cache)
    msg = str(info.value)
    assert msg.startswith("Fashion-MNIST data set (both splits) not found")
    assert f"{cache} (root=): missing t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]" in msg


def test_gz_preferred_over_raw_in_same_folder(isolated):
    folder = isolated / "both"
    make_fake_fashion_mnist(folder, n_train=10, n_test=10, size=4, gzip=True)
    make_fake_fashion_mnist(folder, n_train=20, n_test=10, size=4, gzip=False)
    images_path, labels_path = find_fashion_mnist("train", root=folder)
    assert images_path.name == "train-images-idx3-ubyte.gz"
    assert labels_path.name == "train-labels-idx1-ubyte.gz"
    assert len(load_fashion_mnist(root=folder)[0]) == 10


def test_bad_arguments(tiny_idx_dir):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid", root=tiny_idx_dir)
    for bad in ("yes", 1, 0, None):
        with pytest.raises(ValueError, match="verify must be 'auto', True or False"):
            load_fashion_mnist(root=tiny_idx_dir, verify=bad)


# ---------------------------------------------------------------- checksums


def test_md5_mismatch_for_file_claiming_official_size(tmp_path, monkeypatch):
    folder = make_fake_fashion_mnist(tmp_path / "d", n_train=20, n_test=10, size=4)
    path = folder / "train-images-idx3-ubyte.gz"
    actual = hashlib.md5(path.read_bytes()).hexdigest()
    table = dict(fm.OFFICIAL_FILES)
    table[path.name] = (path.stat().st_size, "0" * 32)  # same size as "official": claims it
    monkeypatch.setattr(fm, "OFFICIAL_FILES", table)
    with pytest.raises(ChecksumError) as info:
        load_fashion_mnist(root=folder)
    msg = str(info.value)
    assert str(path) in msg and "0" * 32 in msg and actual in msg
    assert "apt-get install --reinstall dataset-fashion-mnist" in msg
    assert len(load_fashion_mnist(root=folder, verify=False)[0]) == 20

    table[path.name] = (path.stat().st_size, actual)  # now the checksum matches
    assert len(load_fashion_mnist(root=folder)[0]) == 20


def test_auto_skips_files_of_other_sizes(tiny_idx_dir):
    # Official names but tiny sizes: not claiming to be official, so no MD5 check.
    assert len(load_fashion_mnist(root=tiny_idx_dir, verify="auto")[0]) == 256


def test_verify_true_checks_every_file(tiny_idx_dir, tmp_path):
    with pytest.raises(ChecksumError, match="MD5 mismatch") as info:
        load_fashion_mnist(root=tiny_idx_dir, verify=True)
    assert "cf8536b0aa1a6ac5fa3f23001093305c" in str(info.value)
    # Raw files must be the official decompressed files: checked against their MD5.
    raw = make_fake_fashion_mnist(tmp_path / "raw", n_train=10, n_test=10, size=4, gzip=False)
    path = raw / "train-images-idx3-ubyte"
    with pytest.raises(ChecksumError, match="MD5 mismatch") as info:
        load_fashion_mnist(root=raw, verify=True)
    msg = str(info.value)
    assert str(path) in msg and hashlib.md5(path.read_bytes()).hexdigest() in msg
    assert "f4a8712d7a061bf5bd6d2ca38dc4d50a" in msg and "verify=True" in msg


def test_official_decompressed_table():
    """Sizes follow from the shapes (16-byte idx3 header, 8-byte idx1 header, 28x28 images)."""
    assert fm.OFFICIAL_CONTENT == {
        "train-images-idx3-ubyte": (16 + 60000 * 28 * 28, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": (8 + 60000, "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": (16 + 10000 * 28 * 28, "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": (8 + 10000, "15d484375f8d13e6eb1aabb0c3f46965"),
    }


def _official_size_labels(folder, gz):
    """A train split whose labels file has the official decompressed size (60008 bytes) but
    fake content (every label 0); the images file is small. Returns the labels path."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(folder / ("train-images-idx3-ubyte" + suffix), np.zeros((60000, 1, 1), np.uint8),
              gzip=gz)
    return write_idx(folder / ("train-labels-idx1-ubyte" + suffix), np.zeros(60000, np.uint8),
                     gzip=gz)


def _content_md5(path):
    """MD5 of a file's IDX content: the bytes after gunzip for a gzip file (the oracle)."""
    raw = path.read_bytes()
    return hashlib.md5(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).hexdigest()


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzipped-again"])
def test_official_size_content_must_have_the_official_md5(tmp_path, gz):
    path = _official_size_labels(tmp_path / "d", gz)
    found = _content_md5(path)
    with pytest.raises(ChecksumError) as info:
        load_fashion_mnist(root=tmp_path / "d")
    msg = str(info.value)
    assert str(path) in msg and found in msg and "9018921c3c673c538a1fc5bad174d6f9" in msg
    assert "60008 bytes" in msg and ("after gunzip" in msg) == gz
    assert "apt-get install --reinstall dataset-fashion-mnist" in msg and "verify=False" in msg
    labels = load_fashion_mnist(root=tmp_path / "d", verify=False)[1]
    assert labels.shape == (60000,) and int(labels.abs().sum()) == 0
    with pytest.raises(ChecksumError):  # the cached file is still checked
        load_fashion_mnist(root=tmp_path / "d")


def test_official_size_content_with_the_official_md5_loads(tmp_path, monkeypatch):
    path = _official_size_labels(tmp_path / "d", gz=True)
    table = dict(fm.OFFICIAL_CONTENT)
    table["train-labels-idx1-ubyte"] = (60008, _content_md5(path))
    monkeypatch.setattr(fm, "OFFICIAL_CONTENT", table)
    assert load_fashion_mnist(root=tmp_path / "d")[1].shape == (60000,)
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte"):  # True: every file
        load_fashion_mnist(root=tmp_path / "d", verify=True)


def test_other_sizes_are_not_hashed_under_auto(tmp_path):
    """One byte off the official size: not claiming to be official, so it loads."""
    folder = tmp_path / "d"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((60001, 1, 1), np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(60001, np.uint8))  # 60009 bytes
    assert load_fashion_mnist(root=folder)[1].shape == (60001,)


def test_official_gzip_md5_makes_the_content_check_redundant(tmp_path, monkeypatch):
    """A .gz with the official MD5 is the official download: its content is not hashed
    again (here the real content table disagrees with the fake content: no error)."""
    path = _official_size_labels(tmp_path / "d", gz=True)
    files = dict(fm.OFFICIAL_FILES)
    files[path.name] = (path.stat().st_size, hashlib.md5(path.read_bytes()).hexdigest())
    monkeypatch.setattr(fm, "OFFICIAL_FILES", files)
    assert load_fashion_mnist(root=tmp_path / "d")[1].shape == (60000,)


# ---------------------------------------------------------------- content checks


def _write_split(folder, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", images)
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    return folder


def test_images_labels_length_mismatch(tmp_path):
    folder = _write_split(tmp_path / "m", np.zeros((5, 3, 3), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(IDXError, match="same length") as info:
        load_fashion_mnist(root=folder)
    msg = str(info.value)
    assert "5 images vs 4 labels" in msg and str(folder / "train-labels-idx1-ubyte") in msg


def test_labels_out_of_range(tmp_path):
    folder = _write_split(tmp_path / "r", np.zeros((2, 3, 3), np.uint8), np.array([3, 10], np.uint8))
    with pytest.raises(IDXError, match=r"0\.\.9") as info:
        load_fashion_mnist(root=folder)
    assert "3..10" in str(info.value)


def test_images_must_be_3d_uint8(tmp_path):
    folder = _write_split(tmp_path / "s", np.zeros((2, 9), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(IDXError, match=r"\(N, H, W\) uint8") as info:
        load_fashion_mnist(root=folder)
    assert "(2, 9)" in str(info.value)
    folder = _write_split(tmp_path / "f", np.zeros((2, 3, 3), np.float32), np.zeros(2, np.uint8))
    with pytest.raises(IDXError, match="float32"):
        load_fashion_mnist(root=folder)


# ---------------------------------------------------------------- cache


def test_cache_hits_and_returns_fresh_tensors(tmp_path):
    folder = make_fake_fashion_mnist(tmp_path / "c", n_train=20, n_test=10, size=4)
    images, _ = load_fashion_mnist(root=folder)
    key = next(k for k in fm._CACHE if k[0] == str((folder / "train-images-idx3-ubyte.gz").resolve()))
    cached = fm._CACHE[key].array
    images[:] = 0  # editing the result must not leak into the cache
    again, _ = load_fashion_mnist(root=folder)
    assert fm._CACHE[key].array is cached
    assert torch.equal(again, torch.from_numpy(cached)) and again.sum() > 0
    assert len(fm._CACHE) <= fm._CACHE_MAX


def test_cache_reloads_after_file_changes(tmp_path):
    folder = make_fake_fashion_mnist(tmp_path / "c", n_train=20, n_test=10, size=4)
    assert len(load_fashion_mnist(root=folder)[0]) == 20
    make_fake_fashion_mnist(folder, n_train=30, n_test=10, size=4)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        os.utime(folder / name, ns=(1, 10**18))  # force a distinct mtime on coarse clocks
    assert len(load_fashion_mnist(root=folder)[0]) == 30


def test_class_names():
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert FASHION_MNIST_CLASSES[5] == "Sandal" and FASHION_MNIST_CLASSES[7] == "Sneaker"


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not os.path.isdir(REAL_DIR), reason=f"{REAL_DIR} not installed")
def test_real_fashion_mnist():
    images, labels = load_fashion_mnist("train", root=REAL_DIR, verify=True)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10
    images, labels = load_fashion_mnist("test", root=REAL_DIR, verify=True)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert labels[0].item() == 9 and int(images.max()) == 255
