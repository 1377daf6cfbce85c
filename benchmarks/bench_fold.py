"""CPU inference of a ResNet-style CNN before and after `bnkit.fold`, as a ratio in one process.

    python benchmarks/bench_fold.py                      # torch and bnkit BN, 1 thread
    python benchmarks/bench_fold.py --threads 2 --batch 32 --json fold.json

The measurement itself is `bnkit.tools.fold_bench.bench_fold` (importable, returns a dict),
re-exported here as `bench_fold`.
"""
import argparse
import json
import sys

from bnkit.tools.fold_bench import NORMS, bench_fold

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
    print(f"{'BN':>6} {'folded':>8} {'unfolded ms':>12} {'folded ms':>10} {'speed-up':>9} "
          f"{'max rel diff':>13}")
    for r in results:
        print(f"{r['norm']:>6} {r['folded_pairs']:>3}/{r['bn_layers']:<4} {r['unfolded_ms']:>12.2f} "
              f"{r['folded_ms']:>10.2f} {r['speedup']:>8.2f}x {r['max_rel_diff']:>13.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
