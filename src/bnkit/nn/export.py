"""torch.jit.script support: what a scripted bnkit BN layer computes, in torch ops only.

bnkit's layers run the core through Python-level dispatch (backends, the native node, custom
ops), which TorchScript cannot compile. Each layer's `forward` therefore starts with
`if torch.jit.is_scripting(): return ...` (TorchScript compiles only that branch) and
returns `scripted_batch_norm`: the layer's eval-mode output through
`bnkit.functional.export.lowered_batch_norm`, the function the core lowers to under
torch.export and torch.jit.trace, so there is one lowering. A scripted model keeps the
layers' parameters, buffers and state-dict keys, and its saved file holds the compiled
code, so it loads and runs without bnkit.

Training-mode behaviour (batch statistics with a running update, ghost chunks, Batch
Renorm's r and d) is not compiled: a scripted layer called in training mode with running
statistics raises; call `.eval()` on the scripted model (or script it in eval mode).
"""

from torch import Tensor

from ..functional.export import lowered_batch_norm


def scripted_batch_norm(input: Tensor, running_mean: Tensor | None,
                        running_var: Tensor | None, weight: Tensor | None,
                        bias: Tensor | None, eps: float, axis: int, training: bool,
                        chunked: bool = False) -> Tensor:
    """A BN layer's output in TorchScript: eval-mode BN with the running statistics, or BN
    with batch statistics for a layer without them. Raises for a call that would update
    running statistics (training mode) and, `chunked` (GhostBatchNorm), for per-chunk
    statistics, which are not compiled."""
    if training and running_mean is not None:
        raise RuntimeError("a scripted bnkit BN layer computes eval-mode batch norm only (got "
                           "a call in training mode, which would update running statistics); "
                           "call .eval() on the scripted model, or train the Python model")
    if chunked and running_mean is None:
        raise RuntimeError("a scripted GhostBatchNorm without running statistics would need "
                           "per-chunk statistics, which are not compiled (got "
                           "track_running_stats=False); keep running statistics and run the "
                           "scripted model in eval mode")
    return lowered_batch_norm(input, running_mean, running_var, weight, bias, eps, axis)
