"""The eager autograd node: a BN layer call as one C++ autograd node (`bnkit_cpu::bn`,
src/bnkit/csrc/node.cpp, in the compiled extension `bnkit._C`).

On small inputs a layer call is dominated by the machinery around the kernels, mostly an
autograd.Function's Python forward and backward frames; the node runs the one-call
forward and backward of the 'cpu' backend (`bnkit.kernels.cpu`) from C++, so backward
runs with no Python at all. Results equal the 'cpu' backend's Python path bit for bit:
the same C++ functions run. It is there iff the 'cpu' backend is (importing this module
raises ImportError otherwise); `bnkit.kernels.use_native(False)` turns it off.

`call(x, weight, bias, running_mean, running_var, training, eps, momentum, update, relu,
axis) -> (y, stats)`: the core validates the call first
(bnkit.functional.checks); the node still declines, touching nothing and returning
(None, None), what its kernels cannot run in place (a non-dense or non-float32/64 input,
parameters or buffers of another dtype or device, inference-mode buffers, buffers that
require grad): the Python path runs those. `stats`, the (2C,) float64 mean | var, comes
back only when the blend left some channels' running statistics unchanged because their
batch statistics were not finite (the caller warns); else None. `axis` is normalized
(>= 0); identity or relu and no mask: the caller checks those.
"""
from __future__ import annotations

import torch

from . import cpu  # noqa: F401 - raises ImportError without bnkit._C

call = torch.ops.bnkit_cpu.bn.default._op  # the C++ callable, without OpOverload.__call__


def status() -> str:
    """One line for `bnkit info`."""
    return "C++ autograd node bnkit_cpu::bn (in bnkit._C)"
