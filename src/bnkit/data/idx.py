"""Read and write IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is: two zero bytes, a type code, the number of dimensions, one
big-endian uint32 per dimension, then the values in big-endian C order. Files
may be gzipped; gzip is detected from the content (bytes ``1f 8b``), not from
the file name, because downloads are often renamed or already unpacked.
"""

from __future__ import annotations

import gzip as _gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "IDXError", "parse_idx", "read_idx", "write_idx"]

GZIP_MAGIC = b"\x1f\x8b"

#: IDX type code -> numpy dtype (big-endian, as stored on disk).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Reverse map keyed by the native dtype so write_idx accepts ordinary arrays.
_CODE_OF = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}

_FIX_DOWNLOAD = "re-download or reinstall the file (Debian: apt-get install --reinstall dataset-fashion-mnist)"


class IDXError(ValueError):
    """An IDX file is malformed, or its contents break a dataset rule."""


def _fail(path, rule: str, found: str, expected: str, fix: str = _FIX_DOWNLOAD) -> IDXError:
    """Build an IDXError whose message names path, rule, found vs expected, and the fix."""
    return IDXError(f"{path}: {rule}: found {found}, expected {expected}. Fix: {fix}.")


def _gunzip(raw: bytes, path) -> bytes:
    """Decompress a gzip stream, turning every gzip/zlib failure into an IDXError."""
    try:
        return _gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise _fail(
            path, "corrupt gzip stream", f"a stream that fails to decompress ({exc})",
            "a complete, valid gzip stream",
        ) from exc


def _parse_header(data: bytes, path, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """Return (dtype, shape, header length) from the start of an IDX byte string."""
    if len(data) < 4:
        raise _fail(path, "truncated header", f"{len(data)} bytes{where}", "at least 4 bytes")
    if data[0:2] != b"\x00\x00":
        raise _fail(
            path, "bad magic number", f"first bytes {data[:4].hex(' ')}",
            "00 00 <type> <ndim> (is this really an IDX file?)",
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise _fail(path, "unknown type code", f"0x{code:02X}", f"one of {known}")
    head = 4 + 4 * ndim
    if len(data) < head:
        raise _fail(
            path, "truncated header", f"{len(data)} bytes{where}",
            f"{head} bytes for {ndim} dimension sizes",
        )
    shape = struct.unpack(f">{ndim}I", data[4:head])
    return IDX_DTYPES[code], shape, head


def parse_idx(raw: bytes, path="<bytes>") -> np.ndarray:
    """Decode the bytes of an IDX file (gzipped or not) into a native-endian array.

    Args:
        raw: The file's bytes, exactly as stored on disk.
        path: Name used in error messages.

    Returns:
        A writable numpy array with the file's shape and a native-endian dtype.

    Raises:
        IDXError: Bad magic, unknown type code, corrupt gzip, truncated data or trailing bytes.

    Example:
        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])).tolist()
        [7, 9]
    """
    gz = raw[:2] == GZIP_MAGIC
    data = _gunzip(raw, path) if gz else raw
    where = " after gunzip" if gz else ""  # byte counts refer to the decompressed stream
    dtype, shape, head = _parse_header(data, path, where)
    expected = head + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected:
        raise _fail(
            path, "truncated data", f"{len(data)} bytes{where}",
            f"{expected} bytes ({head} header + shape {shape} x {dtype.itemsize} bytes)",
        )
    if len(data) > expected:
        raise _fail(
            path, "trailing bytes", f"{len(data)} bytes{where} ({len(data) - expected} extra)",
            f"{expected} bytes for shape {shape}",
            fix="the file may be two files joined or a wrong download; re-create or re-download it",
        )
    values = np.frombuffer(data, dtype=dtype, count=(expected - head) // dtype.itemsize, offset=head)
    # astype copies into native byte order, which also makes the array writable.
    return values.reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzipped or raw, into a numpy array.

    Args:
        path: File to read. Gzip is detected from the first two bytes, not the name.

    Returns:
        A writable, native-endian numpy array of the stored dtype and shape.

    Raises:
        IDXError: The file is not a valid IDX file (the message says why and how to fix it).
        FileNotFoundError: ``path`` does not exist.

    Example:
        >>> labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
        >>> labels.shape, labels.dtype
        ((10000,), dtype('uint8'))
    """
    return parse_idx(Path(path).read_bytes(), path)


def write_idx(path: str | os.PathLike, array, gzip: bool = False) -> Path:
    """Write an array as an IDX file that ``read_idx`` reads back unchanged.

    Args:
        path: Destination file (parent folders must exist).
        array: Array-like of dtype uint8, int8, int16, int32, float32 or float64.
        gzip: Compress the file with gzip (the name is not changed for you).

    Returns:
        The path written, as a ``Path``.

    Raises:
        IDXError: The dtype has no IDX type code, or a dimension is too large.

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = write_idx(os.path.join(tempfile.mkdtemp(), "x.idx"), np.arange(6, dtype=np.int16))
        >>> read_idx(p).tolist()
        [0, 1, 2, 3, 4, 5]
    """
    arr = np.asarray(array)
    code = _CODE_OF.get(arr.dtype.newbyteorder("="))
    if code is None:
        names = ", ".join(str(d) for d in _CODE_OF)
        raise _fail(path, "unsupported dtype", str(arr.dtype), f"one of {names}",
                    fix="cast the array first, e.g. array.astype(np.int32)")
    if arr.ndim > 255 or any(d > 0xFFFFFFFF for d in arr.shape):
        raise _fail(path, "shape too large", str(arr.shape), "<=255 dims, each < 2**32",
                    fix="split the array into several files")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    if gzip:
        payload = _gzip.compress(payload, mtime=0)  # mtime=0 keeps output reproducible
    out = Path(path)
    out.write_bytes(payload)
    return out
