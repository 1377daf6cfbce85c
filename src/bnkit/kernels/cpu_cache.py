"""Is numba's on-disk cache of the 'cpu' kernels warm (loads in well under a second) or cold
(the first call compiles)? numba keeps it in `__pycache__` beside the source, or under
NUMBA_CACHE_DIR when set, or in a per-user folder when the source folder is read-only.
"""
from __future__ import annotations

COMPILE_S = 60  # measured: compiling every kernel for both dtypes on a 2-core EPYC VM
SIGNATURES = 2  # float32 and float64


def _cached(disp) -> int:
    """Signatures of one kernel found in the cache index for this machine (0 if unknown)."""
    try:
        cache = disp._cache
        magic = disp.targetctx.codegen().magic_tuple()
        index = cache._cache_file._load_index()  # {} when missing or stale (source changed)
    except Exception:  # noqa: BLE001 - private numba API: unknown counts as cold
        return 0
    return sum(1 for key in index if key[1] == magic)


def cache_dir(kernels) -> str:
    """Folder numba reads and writes the kernels' cache in."""
    try:
        return kernels[0]._cache.cache_path
    except AttributeError:
        return "unknown"


def cache_report(kernels) -> str:
    """'compiled in this process', 'compiled cache warm (DIR)' or 'cold: ...' for `status()`."""
    if all(len(k.signatures) >= SIGNATURES for k in kernels):
        return "compiled in this process"
    found = sum(min(_cached(k), SIGNATURES) for k in kernels)
    missing = SIGNATURES * len(kernels) - found
    if missing == 0:
        return f"compiled cache warm ({cache_dir(kernels)})"
    secs = max(1, round(COMPILE_S * missing / (SIGNATURES * len(kernels))))
    return (f"cold: first call compiles (~{secs} s; bnkit.kernels.cpu.warmup() does it now), "
            f"cache {cache_dir(kernels)}")
