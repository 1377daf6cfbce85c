"""GPU benchmark of bnkit's Triton backend against torch (cuDNN) and torch.compile.

Prints the table (median of interleaved runs timed with CUDA events, ratio to torch, GB/s and
% of the device-to-device copy measured in the same run); `--json FILE` also saves the rows.
Without CUDA it exits with status 2 and says why. Same as `bnkit bench --device cuda`.

    python benchmarks/bench_gpu.py                      # every shape, float32 and bfloat16
    python benchmarks/bench_gpu.py --shapes 64x256x56x56 --dtypes bfloat16 --json out.json
"""
import sys

from bnkit.bench.gpu import main

if __name__ == "__main__":
    sys.exit(main())
