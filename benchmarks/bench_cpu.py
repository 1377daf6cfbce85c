"""CPU benchmark of bnkit's BN against torch's: the same as `bnkit bench` (see bnkit.bench.cli).

    python benchmarks/bench_cpu.py --threads 2 --json bench_cpu.json
    python benchmarks/bench_cpu.py --quick --no-compile
    python benchmarks/bench_cpu.py --models --model-batch 16 --model-size 112
"""
import argparse
import sys

from bnkit.bench import cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=cli.__doc__.splitlines()[0])
    cli.add_arguments(parser)
    try:
        sys.exit(cli.main(parser.parse_args()))
    except ValueError as err:
        sys.exit(f"bench_cpu: error: {err}")
