"""How every benchmark of bnkit measures time: timers, interleaved rounds, medians, copies.

Every time reported by `bnkit bench` and the scripts in benchmarks/ is the median over
rounds in which each variant runs once, in an order rotated by one per round, so load from
other processes (and clock or heat drift) hits all variants alike. The copy of an x-sized
tensor into a reused one, timed in the same rounds, is the bandwidth probe the kernel
tables compare against.

Example:
    >>> from bnkit.bench.timing import interleaved_medians
    >>> ticks = iter(range(100))
    >>> interleaved_medians({"a": lambda: 1, "b": lambda: 2}, 3, lambda fn: next(ticks))
    {'a': 3, 'b': 2}
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable

import torch

SAMPLE_MS = 3.0  # repeat fast calls within one timing sample up to about this long

Timer = Callable[[Callable], float]


def perf_timer(inner: int = 1) -> Timer:
    """Timer in ms per call from the host clock: `inner` back-to-back calls, averaged."""
    def timer(fn):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner
    return timer


def cuda_timer(inner: int = 1) -> Timer:
    """Timer in ms per call: CUDA events around `inner` back-to-back calls."""
    def timer(fn):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    return timer


def interleaved_samples(fns: dict[str, Callable], repeats: int,
                        timer: Timer) -> dict[str, list[float]]:
    """Every sample of each fn over `repeats` rounds; each round runs every fn once, in an
    order rotated by one per round, so that drift hits all of them alike."""
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(timer(fns[name]))
    return samples


def interleaved_medians(fns: dict[str, Callable], repeats: int, timer: Timer) -> dict[str, float]:
    """Median time of each fn over `repeats` interleaved rounds (`interleaved_samples`)."""
    return {n: statistics.median(v) for n, v in interleaved_samples(fns, repeats, timer).items()}


def warm(fns: dict[str, Callable], warmup: int) -> None:
    """`warmup` untimed calls of each fn (compiles, caches, allocator pools)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()


def inner_calls(fastest_ms: float, sample_ms: float = SAMPLE_MS) -> int:
    """Back-to-back calls per sample so that one sample lasts about `sample_ms` (1 to 50)."""
    return max(1, min(50, math.ceil(sample_ms / max(fastest_ms, 1e-3))))


def time_all(fns: dict[str, Callable], repeats: int, warmup: int) -> dict[str, float]:
    """{name: median ms} over interleaved rounds on the host clock, after `warmup` untimed
    calls each; fast calls repeat within a sample (`inner_calls`)."""
    warm(fns, warmup)
    fastest = min(perf_timer(1)(fn) for fn in fns.values())
    return interleaved_medians(fns, repeats, perf_timer(inner_calls(fastest)))


def copy_fns(xs: list[torch.Tensor]) -> dict[str, Callable]:
    """The bandwidth probes over the rotated inputs `xs`: "copy_" into a preallocated
    buffer (reads + writes 2 x-sized tensors) and "clone" (the same plus a fresh output)."""
    dst = torch.empty_like(xs[0])
    turn = itertools.cycle(xs)
    return {"copy_": lambda: dst.copy_(next(turn)), "clone": lambda: next(turn).clone()}
