"""CPU benchmark of bnkit's BN against torch's: the same as `bnkit bench` (see bnkit.bench).

    python benchmarks/bench_cpu.py --threads 2 --json bench_cpu.json
    python benchmarks/bench_cpu.py --quick --no-compile
"""
import argparse
import sys

from bnkit import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__.splitlines()[0])
    bench.add_arguments(parser)
    try:
        sys.exit(bench.main(parser.parse_args()))
    except ValueError as err:
        sys.exit(f"bench_cpu: error: {err}")
