"""How the Triton kernels see a tensor: per channel, a grid of rows x columns with unit stride.

Every supported input folds into one of two 2-D views (pure Python, no Triton needed):

* channels-first (CF): x viewed as (N, C, S) with S contiguous (NCHW-contiguous, or any
  tensor whose dims after the channel axis are contiguous). A tile is (rows n, columns s) of
  one channel; channel c starts at c * chan_stride.
* channels-last (CL): x viewed as (M, C) with C contiguous (channels_last memory format,
  (N, C) matrices, (N, L, C) with axis=-1). A tile is (rows m, columns = a block of channels).

Either way the columns have stride 1 (coalesced loads) and the rows one stride each.
A mask over the non-channel dims, flattened in logical order, is indexed r * cols + k (CF)
or r (CL). `plan` picks block sizes and how the reductions split the rows (and, for CF,
the columns) into partial statistics that a final merge combines.
"""
from __future__ import annotations

from typing import NamedTuple


class Geometry(NamedTuple):
    """A tensor seen as rows x columns per channel (see the module docstring)."""

    channels_last: bool  # CL: columns are channels; CF: columns are the inner positions s
    rows: int  # N (CF) or M = all non-channel positions (CL)
    cols: int  # S (CF) or C (CL)
    channels: int  # C
    row_stride: int  # elements between consecutive rows (0 when rows == 1)
    chan_stride: int  # elements between channels in CF (0 when C == 1); 1 in CL

    @property
    def mask_strides(self) -> tuple[int, int]:
        """(row, column) strides into the flattened (logical order) mask."""
        return (1, 0) if self.channels_last else (self.cols, 1)


class Plan(NamedTuple):
    """Tile sizes and the split of a reduction into partial statistics."""

    block_r: int  # tile rows
    block_k: int  # tile columns (a power of two)
    rows_per: int  # rows per reduction program (a multiple of block_r)
    cols_per: int  # columns per reduction program (CF; block_k in CL)
    splits_r: int  # reduction programs along the rows
    splits_k: int  # reduction programs along the columns (1 in CL)
    lanes: int  # programs along the channels: C (CF) or ceil(C / block_k) (CL)
    num_warps: int

    @property
    def parts(self) -> int:
        """Partial statistics per channel, merged at the end."""
        return self.splits_r * self.splits_k


def _merge(sizes, strides):
    """Merge dims (logical order) into one (size, stride); None if the memory is not uniform.

    Size-1 dims are skipped; an all-size-1 group gives (1, 0).
    """
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    if not dims:
        return 1, 0
    total, stride = dims[-1]
    for n, s in reversed(dims[:-1]):
        if s != stride * total:  # outer stride = inner stride * inner size
            return None
        total *= n
    return total, stride


def is_dense(shape, strides) -> bool:
    """True when the tensor covers its memory exactly once (so torch.empty_like keeps strides)."""
    expect = 1
    for s, n in sorted((s, n) for n, s in zip(shape, strides) if n != 1):
        if s != expect:
            return False
        expect *= n
    return True


def geometry(shape, strides, axis: int) -> Geometry | None:
    """The CF or CL view of a tensor with channels at `axis`; None if neither exists."""
    axis %= len(shape)
    before = _merge(shape[:axis], strides[:axis])
    after = _merge(shape[axis + 1:], strides[axis + 1:])
    if before is None or after is None:
        return None
    (n, sn), (s, ss) = before, after
    c, sc = shape[axis], (strides[axis] if shape[axis] != 1 else 0)
    if n > 1 and s > 1 and sn == s * ss:  # n and s adjacent in memory: one row dim
        n, s, sn = 1, n * s, 0
    if s > 1 and ss == 1:
        return Geometry(False, n, s, c, sn if n > 1 else 0, sc)
    if sc in (0, 1) and (n == 1 or s == 1):
        m, sm = (n, sn) if s == 1 else (s, ss)
        return Geometry(True, m, c, c, sm if m > 1 else 0, 1)
    if s == 1:  # (N, C) with channels strided and rows contiguous: rows become columns
        return Geometry(False, 1, n, c, 0, sc) if sn == 1 or n == 1 else None
    return None


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _split(blocks: int, want: int) -> tuple[int, int]:
    """(blocks per program, programs) for `blocks` tiles shared by about `want` programs."""
    per = -(-blocks // max(min(want, blocks), 1))
    return per, -(-blocks // per)


def plan(g: Geometry, max_block_k: int, tile: int, target_programs: int) -> Plan:
    """Tile sizes and reduction split for geometry `g`.

    Args:
        max_block_k: widest tile in columns.
        tile: elements per tile (block_r * block_k at most, unless one row is wider).
        target_programs: about how many reduction programs to launch in total.
    """
    block_k = min(_pow2(g.cols), max_block_k)
    block_r = min(_pow2(g.rows), max(1, tile // block_k))
    lanes = -(-g.channels // block_k) if g.channels_last else g.channels
    want = -(-target_programs // lanes)
    per_r, splits_r = _split(-(-g.rows // block_r), want)
    per_k, splits_k = 1, 1
    if not g.channels_last:
        per_k, splits_k = _split(-(-g.cols // block_k), -(-want // splits_r))
    cols_per = block_k * (per_k if not g.channels_last else 1)
    warps = 8 if block_r * block_k >= 4096 else 4
    return Plan(block_r, block_k, per_r * block_r, cols_per, splits_r, splits_k, lanes, warps)
