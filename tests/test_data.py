"""Tests for bnkit.data: IDX reading/writing and the offline Fashion-MNIST loader."""

import gzip
import hashlib
import os

import numpy as np
import pytest
import torch

import bnkit.data.fashion_mnist as fm
from bnkit.data import (
    FASHION_MNIST_CLASSES,
    ChecksumError,
    IDXError,
    find_fashion_mnist,
    load_fashion_mnist,
    make_fake_fashion_mnist,
    read_idx,
    write_idx,
)

REAL_DIR = "/usr/share/datasets/fashion-mnist"
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


def test_folder_missing_one_file_is_skipped(isolated):
    partial = _fake(isolated / "partial", 10)
    (partial / "train-labels-idx1-ubyte.gz").unlink()
    _fake(fm.SYSTEM_DIR, 40)
    assert len(load_fashion_mnist("train", root=partial)[0]) == 40
    assert len(load_fashion_mnist("test", root=partial)[0]) == 10  # test split is complete there


def test_gz_preferred_over_raw_in_same_folder(isolated):
    folder = isolated / "both"
    make_fake_fashion_mnist(folder, n_train=10, n_test=10, size=4, gzip=True)
    make_fake_fashion_mnist(folder, n_train=20, n_test=10, size=4, gzip=False)
    images_path, labels_path = find_fashion_mnist("train", root=folder)
    assert images_path.name == "train-images-idx3-ubyte.gz"
    assert labels_path.name == "train-labels-idx1-ubyte.gz"
    assert len(load_fashion_mnist(root=folder)[0]) == 10


def test_missing_dataset_lists_folders_and_fix(isolated, monkeypatch):
    root = isolated / "nowhere"
    monkeypatch.setenv("BNKIT_DATA", str(isolated / "env-nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("test", root=root)
    msg = str(info.value)
    for folder in (root, isolated / "env-nowhere",
                   isolated / "home" / ".cache" / "bnkit" / "fashion-mnist", fm.SYSTEM_DIR):
        assert str(folder) in msg
    assert msg.index(str(root)) < msg.index("env-nowhere") < msg.index(str(fm.SYSTEM_DIR))
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "BNKIT_DATA" in msg and "root=" in msg and "t10k-images-idx3-ubyte" in msg


def test_missing_dataset_mentions_unset_env(isolated):
    with pytest.raises(FileNotFoundError, match=r"\$BNKIT_DATA is not set"):
        load_fashion_mnist()


def test_bad_arguments(tiny_idx_dir):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid", root=tiny_idx_dir)
    with pytest.raises(ValueError, match="verify"):
        load_fashion_mnist(root=tiny_idx_dir, verify="yes")


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
    raw = make_fake_fashion_mnist(tmp_path / "raw", n_train=10, n_test=10, size=4, gzip=False)
    with pytest.raises(ChecksumError, match="verify=True needs the official gzip file"):
        load_fashion_mnist(root=raw, verify=True)


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
    cached = fm._CACHE[key][0]
    images[:] = 0  # editing the result must not leak into the cache
    again, _ = load_fashion_mnist(root=folder)
    assert fm._CACHE[key][0] is cached
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
