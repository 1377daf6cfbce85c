"""What SyncBatchNorm's call header costs: 2 gloo processes on this machine, CPU.

    python benchmarks/bench_sync_header.py                  # default shapes, 300 repeats
    python benchmarks/bench_sync_header.py --repeats 1000 --threads 1

Prints, from rank 0, the median time of the header exchange (`agree`: the all-gather of 8
float64 per rank and the check of the table), of the bare all-gather of the header, of the
statistics all-gather alone for the same layer, and of a SyncBatchNorm training
step (forward + backward) with and without the header exchange, interleaved call by call
so that both see the same machine load (extra: the median of the per-round differences); a
barrier before each timed call lines the ranks up.
"""
import argparse
import datetime
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnkit.bench.timing import perf_timer

SHAPES = [(32, 64), (16, 64, 16, 16)]
_time = perf_timer()  # ms of one call


def _median_us(samples_ms) -> float:
    return statistics.median(samples_ms) * 1e3


def _measure(sync, shape, group, repeats: int, rank: int) -> dict:
    """Median us of the header exchange, the bare all-gathers and a training step."""
    from bnkit.functional.sync_header import agree, call_header
    from bnkit.nn import SyncBatchNorm

    c = shape[1]
    bn = SyncBatchNorm(c)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    header = call_header(x, 1, bn.running_mean, bn.eps, bn.momentum, x.device)
    stats = torch.zeros(2 + 2 * c, dtype=torch.float64)
    parts = [torch.empty_like(stats) for _ in range(2)]
    hparts = [torch.empty_like(header) for _ in range(2)]
    with_header = sync._agree_on_call

    def step(agree_on_call):
        sync._agree_on_call = agree_on_call
        try:
            bn(x).sum().backward()
        finally:
            sync._agree_on_call = with_header

    runs = {"header": lambda: agree(header, group, sync._collective),
            "header_raw": lambda: dist.all_gather(hparts, header),
            "stats": lambda: dist.all_gather(parts, stats),
            "step": lambda: step(with_header),
            "step_no_header": lambda: step(lambda *a: None)}
    times = {k: [] for k in runs}
    order = list(runs)
    for i in range(repeats + 20):  # 20 warm-up rounds
        order[-2:] = order[-1:-3:-1]  # alternate which step variant runs first
        for k in order:
            dist.barrier()  # both ranks start together: no skew absorbed by the timed call
            t = _time(runs[k])
            if i >= 20:
                times[k].append(t)
    out = {k: _median_us(v) for k, v in times.items()}
    # paired per round: less sensitive to load changes than a difference of medians
    out["extra"] = _median_us([a - b for a, b in zip(times["step"], times["step_no_header"])])
    return out


def _worker(rank: int, store: str, repeats: int, threads: int, out: str) -> None:
    from bnkit import kernels
    from bnkit.functional import sync

    torch.set_num_threads(threads)
    kernels.set_backend("reference")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    rows = [(shape, _measure(sync, shape, dist.group.WORLD, repeats, rank)) for shape in SHAPES]
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.start_processes(_worker, args=(os.path.join(tmp, "store"), args.repeats,
                                          args.threads, out), nprocs=2, start_method="spawn")
        rows = torch.load(out, weights_only=False)
    print(f"2 gloo processes, CPU, {args.threads} thread(s) each, median of {args.repeats} "
          "interleaved rounds (us)")
    print(f"{'input':>18} {'agree':>7} {'header ag':>10} {'stats ag':>9} {'step':>9} "
          f"{'no header':>10} {'extra':>7}")
    for shape, t in rows:
        extra = t["extra"]
        print(f"{shape!s:>18} {t['header']:>7.0f} {t['header_raw']:>10.0f} {t['stats']:>9.0f} "
              f"{t['step']:>9.0f} {t['step_no_header']:>10.0f} {extra:>7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
