"""Read and write IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is: two zero bytes, a type code, the number of dimensions, one
big-endian uint32 per dimension, then the values in big-endian C order. Files
may be gzipped; gzip is detected from the content (bytes ``1f 8b``), not from
the file name, because downloads are often renamed or already unpacked.

Reading is bounded by the header: the reader inflates and reads in 1 MiB steps, never
past the declared size plus a 64 KiB probe for trailing bytes, so a small gzip file
that inflates to gigabytes, or an endless file such as ``/dev/zero``, fails fast in
little memory. The header itself is checked first: at most ``MAX_IDX_DIMS`` (32)
dimensions, and a declared size (product of the dimensions times the item size, in
exact integers) of at most ``max_bytes`` (default ``MAX_IDX_BYTES``, 4 GiB).
"""

from __future__ import annotations

import gzip as _gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "IDX_DTYPES", "MAX_IDX_BYTES", "MAX_IDX_DIMS", "IDXError", "idx_header", "parse_idx",
    "read_idx", "write_idx",
]

GZIP_MAGIC = b"\x1f\x8b"

#: Default ceiling on the values a header may declare, in bytes (4 GiB; the largest
#: Fashion-MNIST file holds 47 MB). Pass ``max_bytes=`` to read larger files.
MAX_IDX_BYTES = 4 * 2**30

#: Most dimensions a header may declare: numpy's limit on every supported version.
MAX_IDX_DIMS = 32

_CHUNK = 1 << 20  # bytes read (or inflated) per step
_TRAIL_PROBE = 1 << 16  # bytes read past the declared end to count trailing data

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


class _Gunzip:
    """A gzip stream inflated in bounded steps: ``read(n)`` returns at most ``n`` bytes.

    Several gzip members in a row (zero padding between them allowed) read as one
    stream, as with ``gzip.decompress``; zlib checks each member's CRC and length.
    Every gzip/zlib failure becomes an IDXError naming the file.
    """

    def __init__(self, fileobj, path):
        self._file = fileobj
        self._path = path
        self._zlib = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
        self._carry = b""  # compressed bytes read but not yet fed to self._zlib

    def read(self, n: int) -> bytes:
        try:
            while True:
                if self._zlib.eof and not self._next_member():
                    return b""
                out = self._zlib.decompress(self._zlib.unconsumed_tail or self._input(), n)
                if out:
                    return out
        except zlib.error as exc:
            raise self._corrupt(exc) from exc

    def _input(self) -> bytes:
        """Next compressed bytes: the carry from a previous member, else the file."""
        buf, self._carry = self._carry, b""
        buf = buf or self._file.read(_CHUNK)
        if not buf:
            raise self._corrupt("compressed file ended before the end-of-stream marker was reached")
        return buf

    def _next_member(self) -> bool:
        """After a member: start the next one, or return False at the end of the file."""
        rest = self._zlib.unused_data
        while len(rest := rest.lstrip(b"\0")) < 2:
            more = self._file.read(_CHUNK)
            if not more:
                if rest:
                    raise self._corrupt(f"1 stray byte {rest.hex()} after the last member")
                return False
            rest += more
        if rest[:2] != GZIP_MAGIC:
            raise self._corrupt(f"bytes {rest[:2].hex(' ')} after a member, not a gzip header")
        self._zlib, self._carry = zlib.decompressobj(wbits=31), rest
        return True

    def _corrupt(self, why) -> IDXError:
        return _fail(self._path, "corrupt gzip stream", f"a stream that fails to decompress ({why})",
                     "a complete, valid gzip stream")


def _read_upto(stream, n: int) -> bytearray:
    """Read n bytes, or fewer at the end of the stream, in chunks of at most _CHUNK bytes.

    The buffer grows with the bytes actually read, so a header that declares more than
    the stream holds costs only what the stream holds.
    """
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _parse_header(stream, path, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """Read and check the header at the start of an IDX stream: (dtype, shape, length)."""
    lead = _read_upto(stream, 4)
    if len(lead) < 4:
        raise _fail(path, "truncated header", f"{len(lead)} bytes{where}", "at least 4 bytes")
    if lead[0:2] != b"\x00\x00":
        raise _fail(
            path, "bad magic number", f"first bytes {lead.hex(' ')}",
            "00 00 <type> <ndim> (is this really an IDX file?)",
        )
    code, ndim = lead[2], lead[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise _fail(path, "unknown type code", f"0x{code:02X}", f"one of {known}")
    if ndim > MAX_IDX_DIMS:
        raise _fail(path, "too many dimensions", str(ndim), f"at most {MAX_IDX_DIMS}")
    head = 4 + 4 * ndim
    dims = _read_upto(stream, head - 4)
    if len(dims) < head - 4:
        raise _fail(
            path, "truncated header", f"{4 + len(dims)} bytes{where}",
            f"{head} bytes for {ndim} dimension sizes",
        )
    return IDX_DTYPES[code], struct.unpack(f">{ndim}I", dims), head


def _declared_nbytes(dtype: np.dtype, shape: tuple[int, ...], path, max_bytes: int) -> int:
    """Bytes of the values the header declares (Python ints: no overflow), within max_bytes."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise _fail(
            path, "declared size over the limit",
            f"shape {shape} of {dtype.newbyteorder('=')} = {nbytes} bytes",
            f"at most {max_bytes} bytes (max_bytes)",
            fix="if the file is genuine, pass a larger max_bytes= to read_idx/parse_idx; "
                "otherwise the header is corrupt: " + _FIX_DOWNLOAD,
        )
    # numpy refuses a shape whose nonzero sizes multiply past its index range, even with
    # a zero size among them (no values, but every view of it would overflow).
    span = math.prod(d for d in shape if d) * dtype.itemsize
    if span > np.iinfo(np.intp).max:
        raise _fail(
            path, "shape too large for numpy", f"shape {shape} (nonzero sizes span {span} bytes)",
            f"nonzero sizes spanning at most {np.iinfo(np.intp).max} bytes",
            fix="the header is corrupt: " + _FIX_DOWNLOAD,
        )
    return nbytes


def _check_max_bytes(max_bytes) -> None:
    """Raise ValueError unless max_bytes is a positive int (bool excluded)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}; "
                         f"the default is MAX_IDX_BYTES = {MAX_IDX_BYTES}")


def _read_stream(stream, path, where: str, max_bytes: int) -> np.ndarray:
    """Decode one IDX stream, reading at most the declared bytes plus one probe for more."""
    dtype, shape, head = _parse_header(stream, path, where)
    nbytes = _declared_nbytes(dtype, shape, path, max_bytes)
    expected = head + nbytes
    data = _read_upto(stream, nbytes)
    if len(data) < nbytes:
        raise _fail(
            path, "truncated data", f"{head + len(data)} bytes{where}",
            f"{expected} bytes ({head} header + shape {shape} x {dtype.itemsize} bytes)",
        )
    extra = len(_read_upto(stream, _TRAIL_PROBE))
    if extra:
        more = "at least " if extra == _TRAIL_PROBE else ""
        raise _fail(
            path, "trailing bytes", f"{more}{expected + extra} bytes{where} ({more}{extra} extra)",
            f"{expected} bytes for shape {shape}",
            fix="the file may be two files joined or a wrong download; re-create or re-download it",
        )
    values = np.frombuffer(data, dtype=dtype).reshape(shape)  # writable: data is a bytearray
    # Native byte order: a copy for multi-byte types, the buffer itself for single bytes.
    return values.astype(dtype.newbyteorder("="), copy=False)


def parse_idx(raw: bytes, path="<bytes>", max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Decode the bytes of an IDX file (gzipped or not) into a native-endian array.

    Args:
        raw: The file's bytes, exactly as stored on disk.
        path: Name used in error messages.
        max_bytes: Largest array, in bytes, a header may declare (default ``MAX_IDX_BYTES``).

    Returns:
        A writable numpy array with the file's shape and a native-endian dtype.

    Raises:
        IDXError: Bad magic, unknown type code, too many dimensions, declared size over
            ``max_bytes``, corrupt gzip, truncated data or trailing bytes.

    Example:
        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9])).tolist()
        [7, 9]
    """
    _check_max_bytes(max_bytes)
    stream = io.BytesIO(raw)
    if raw[:2] == GZIP_MAGIC:
        return _read_stream(_Gunzip(stream, path), path, " after gunzip", max_bytes)
    return _read_stream(stream, path, "", max_bytes)


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file, gzipped or raw, into a numpy array.

    The file is read (and inflated) in steps, never past the size its header declares plus
    a probe for trailing bytes, so a small gzip file that inflates to gigabytes, or an
    endless file such as ``/dev/zero``, fails fast in little memory.

    Args:
        path: File to read. Gzip is detected from the first two bytes, not the name.
        max_bytes: Largest array, in bytes, a header may declare (default ``MAX_IDX_BYTES``,
            4 GiB); a larger declared size is refused before any value is read.

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
    _check_max_bytes(max_bytes)
    with open(path, "rb") as f:
        if f.peek(2)[:2] == GZIP_MAGIC:
            return _read_stream(_Gunzip(f, path), path, " after gunzip", max_bytes)
        return _read_stream(f, path, "", max_bytes)


def _big_endian(arr: np.ndarray) -> np.dtype:
    """The on-disk (big-endian) dtype of an array's values."""
    return arr.dtype.newbyteorder(">")


def idx_header(array, path="<array>") -> bytes:
    """Return the IDX header of an array: magic, type code, rank and big-endian sizes.

    Args:
        array: A numpy array of dtype uint8, int8, int16, int32, float32 or float64.
        path: Name used in error messages.

    Returns:
        The header bytes; the file is this header followed by the values in big-endian
        C order.

    Raises:
        IDXError: The dtype has no IDX type code, or the shape does not fit a header.

    Example:
        >>> idx_header(np.zeros((2, 3), np.uint8)).hex(" ")
        '00 00 08 02 00 00 00 02 00 00 00 03'
    """
    arr = np.asarray(array)
    code = _CODE_OF.get(arr.dtype.newbyteorder("="))
    if code is None:
        names = ", ".join(str(d) for d in _CODE_OF)
        raise _fail(path, "unsupported dtype", str(arr.dtype), f"one of {names}",
                    fix="cast the array first, e.g. array.astype(np.int32)")
    if arr.ndim > MAX_IDX_DIMS or any(d > 0xFFFFFFFF for d in arr.shape):
        raise _fail(path, "shape too large", str(arr.shape),
                    f"<={MAX_IDX_DIMS} dims, each < 2**32", fix="split the array into several files")
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)


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
    payload = idx_header(arr, path) + np.ascontiguousarray(arr, dtype=_big_endian(arr)).tobytes()
    if gzip:
        payload = _gzip.compress(payload, mtime=0)  # mtime=0 keeps output reproducible
    out = Path(path)
    out.write_bytes(payload)
    return out
