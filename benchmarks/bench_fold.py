"""CPU inference of a ResNet-style CNN before and after `bnkit.fold`, as a ratio in one process.

    python benchmarks/bench_fold.py                      # torch and bnkit BN, 1 thread
    python benchmarks/bench_fold.py --threads 2 --batch 32 --json fold.json

The measurement itself is `bnkit.bench.fold.bench_fold` (importable, returns a dict),
re-exported here as `bench_fold`; the table is `bnkit.bench.report.format_fold`.
"""
import argparse
import json
import sys

from bnkit.bench.fold import NORMS, bench_fold
from bnkit.bench.report import format_fold

__all__ = ["bench_fold"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--norm", choices=sorted(NORMS) + ["both"], default="both")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    norms = sorted(NORMS) if args.norm == "both" else [args.norm]
    results = [bench_fold(n, batch=args.batch, size=args.size, width=args.width,
                          repeats=args.repeats, threads=args.threads) for n in norms]
    print(f"ResNet-style CNN, input ({args.batch}, 3, {args.size}, {args.size}), width "
          f"{args.width}, {args.threads} thread(s), median of {args.repeats} interleaved runs")
    print(format_fold(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
