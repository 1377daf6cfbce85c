"""Synchronized batch normalization: statistics and gradient sums combined across processes.

Forward, per channel, on every rank r of the process group:
    local (n_r, mean_r, var_r)  --all_gather-->  Chan merge over ranks:
    n = sum n_r,  mean = sum n_r mean_r / n,  M2 = sum n_r var_r + sum n_r (mean_r - mean)^2,
    var = M2 / n,  y = (x - mean) / sqrt(var + eps) * weight + bias.
Ranks with n_r = 0 (an empty or fully masked batch) add nothing but still join the collectives.
Backward: local (sum_dy, sum_dy_xmu) --all_reduce(SUM)--> the elementwise step with the global
sums and the global n, so dx is the gradient of the sum of all ranks' losses. dweight/dbias
stay local: DDP all-reduces parameter gradients (and divides by the world size) itself.

Before the statistics, the ranks all-gather a small fixed-size call header (sync_header.py):
ranks whose calls disagree (channel count, dtype, axis, ...) or whose input failed validation
make every rank raise before anything is written. Works on any torch.distributed backend whose
all_gather/all_reduce accept the input's device: gloo for CPU tensors, nccl for CUDA tensors.
A rank that exits or never reaches a collective (an eval-mode layer makes none) makes its
peers raise after the process group's timeout (see docs/layers/sync.md).
"""
from __future__ import annotations

from contextlib import contextmanager, suppress

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import kernels
from ..kernels import reference
from .backward import grad_affine, padding_safe
from .checks import validate_call
from .normalize import inv_std
from .running import record_step
from .stats import Stats, mask_view, merge_many
from .sync_header import agree, call_header, header_device, rejected_header

__all__ = [
    "SyncBatchNormFunction",
    "check_on_every_rank",
    "check_process_group",
    "shared_rejection",
    "sync_batch_norm",
    "sync_batch_norm_train",
]


def _backend(x, axis, mask):
    """The kernel backend; empty inputs always take the reference ops (any shape is fine)."""
    return reference if x.numel() == 0 else kernels.select(x, axis, mask)


def _collective(op, tensors, group, what: str) -> None:
    """Run a blocking collective; turn a peer failure or timeout into an explanatory error."""
    try:
        op(*tensors, group=group)
    except RuntimeError as err:  # gloo/nccl raise RuntimeError (DistBackendError) subclasses
        raise RuntimeError(
            f"SyncBatchNorm {what} failed on rank {dist.get_rank()}: a peer rank exited, raised "
            "before this collective, or did not reach it within the process group's timeout "
            "(a peer in eval mode, or one that skipped this layer, makes no collective call: "
            "switch train()/eval() on every rank alike). Check the other ranks' logs; bound the "
            "wait with init_process_group(..., timeout=datetime.timedelta(seconds=...)). "
            f"Backend error: {err}") from err


def local_stats(backend, x, axis, mask) -> torch.Tensor:
    """This rank's packed statistics, (2 + 2C,) in the accumulation dtype:
    [valid count, positions, mean (C), biased var (C)]; an empty part is all zeros."""
    count, mean, var = backend.batch_stats(x, axis, mask)
    has = count > 0  # mean/var are 0/0 = nan for an empty part; nan * 0 would poison the merge
    mean = torch.where(has, mean, torch.zeros_like(mean))
    var = torch.where(has, var, torch.zeros_like(var))
    positions = x.numel() // max(x.shape[axis], 1)
    head = torch.stack([count.to(mean.dtype), torch.tensor(float(positions)).to(mean)])
    return torch.cat([head, mean, var])


def gather_stats(packed: torch.Tensor, channels: int, group) -> tuple[Stats, int, int]:
    """All-gather every rank's packed stats and merge them (Chan, exact for uneven ranks).

    Returns (global Stats with a scalar count, as `batch_stats` gives, total valid values,
    total positions); the two ints are identical on every rank, so decisions taken from them
    never diverge between ranks.
    """
    world = dist.get_world_size(group)
    parts = [torch.empty_like(packed) for _ in range(world)]  # equal sizes: gloo-compatible
    _collective(dist.all_gather, (parts, packed), group, "all_gather of batch statistics")
    table = torch.stack(parts)  # (W, 2 + 2C)
    merged = merge_many(table[:, 2:].reshape(world, 2, channels), table[:, 0])
    count = table[:, 0].sum()  # (): every channel has the same count
    stats = Stats(count, merged.mean, merged.var)
    return stats, int(count), int(table[:, 1].sum())


def _check_global_count(valid: int, positions: int, x, group) -> None:
    """Same rule as plain BN, on the global batch; every rank sees the same numbers."""
    if positions == 0 or valid > 1:
        return
    raise ValueError(f"expected more than 1 value per channel when training (got {valid} valid "
                     f"values per channel over all {dist.get_world_size(group)} ranks; this "
                     f"rank's input shape {tuple(x.shape)}); use larger per-rank batches, fewer "
                     "masked positions, or call model.eval()")


class SyncBatchNormFunction(torch.autograd.Function):
    """The distributed autograd Function: (x, weight, bias) -> (y, mean, var, count, positions).

    mean, var (C,) are the global batch statistics (biased var), count () the global number
    of valid values per channel and positions () the global number of positions per channel
    (valid or padded), all in the accumulation dtype; they are not differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask, eps, axis, group):
        backend = _backend(x, axis, mask)
        packed = local_stats(backend, x, axis, mask)
        stats, valid, positions = gather_stats(packed, x.shape[axis], group)
        _check_global_count(valid, positions, x, group)
        positions = torch.tensor(float(positions), dtype=stats.count.dtype)
        invstd = inv_std(stats.var, eps)  # eps=0 on a constant channel: exactly the bias
        y = backend.normalize(x, stats.mean, invstd, weight, bias, axis)
        ctx.save_for_backward(x, weight, bias, stats.mean, invstd, stats.count, mask)
        ctx.axis, ctx.group = axis, group
        ctx.mark_non_differentiable(stats.mean, stats.var, stats.count, positions)
        return y, stats.mean, stats.var, stats.count, positions

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar, _dcount, _dpositions):
        x, weight, bias, mean, invstd, count, mask = ctx.saved_tensors
        axis, backend = ctx.axis, _backend(x, ctx.axis, mask)
        x = padding_safe(x, dy, mean, mask, axis)  # NaN/Inf padding adds nothing
        sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean, axis)  # local, (C,) each
        both = torch.cat([sum_dy, sum_dy_xmu])  # (2C,): one all_reduce instead of two
        _collective(dist.all_reduce, (both,), ctx.group, "all_reduce of gradient sums")
        g_dy, g_dy_xmu = both.split(sum_dy.shape[0])
        dx = backend.backward_elemt(dy, x, mean, invstd, weight, g_dy, g_dy_xmu, count, axis,
                                    mask, True)
        # Local sums: DDP adds (and averages) the ranks' parameter gradients afterwards.
        dweight, dbias = grad_affine(sum_dy, sum_dy_xmu, invstd)
        dweight = None if weight is None else dweight.to(weight.dtype)
        dbias = None if bias is None else dbias.to(bias.dtype)
        return dx, dweight, dbias, None, None, None, None


def check_process_group(group) -> None:
    """None (the default group) or a ProcessGroup; anything else is a TypeError."""
    if group is None or (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        return
    raise TypeError(f"process_group must be None (the default group) or a "
                    f"torch.distributed.ProcessGroup (got {type(group).__name__}); create one "
                    "with torch.distributed.new_group(ranks)")


@contextmanager
def shared_rejection(input, group):
    """Run local checks inside; when one raises ValueError or TypeError, send the peers a
    rejected call header before re-raising, so that they raise too instead of waiting."""
    try:
        yield
    except (ValueError, TypeError):
        # best effort (peers gone or late, no GPU for nccl): this rank's own error is the one
        with suppress(Exception):  # to report
            agree(rejected_header(header_device(input, group)), group, _collective)
        raise


def check_on_every_rank(check, input, group) -> None:
    """check(input) on this rank; with a process group, a rejection here makes every peer
    raise too (`shared_rejection`) instead of waiting in the next collective."""
    if group is None:
        check(input)
        return
    with shared_rejection(input, group):
        check(input)


def _validate(x, running_mean, running_var, weight, bias, momentum, eps, axis, mask, group):
    """All local checks before any collective. Returns axis >= 0."""
    axis = validate_call(x, running_mean, running_var, weight, bias, True, momentum, eps, axis,
                         mask, "identity")
    if dist.get_backend(group) == "nccl" and x.device.type != "cuda":
        raise ValueError(f"the nccl backend needs CUDA tensors (got input on {x.device}); move "
                         "the model and data to the GPU, or use the gloo backend for CPU")
    return axis


def _agree_on_call(x, axis, running_mean, eps, momentum, group) -> None:
    """One small all-gather of every rank's call header; all ranks raise alike on a mismatch."""
    header = call_header(x, axis, running_mean, eps, momentum, header_device(x, group))
    verdict = agree(header, group, _collective)
    if verdict is not None:
        raise ValueError(verdict)


def sync_batch_norm_train(input, running_mean=None, running_var=None, weight=None, bias=None,
                          momentum=0.1, eps=1e-5, *, process_group=None, axis=1, mask=None,
                          counter=None):
    """`sync_batch_norm` that also returns the global number of positions per channel (an int,
    equal on every rank; 0 when every rank's batch is empty). -> (y, positions). `counter`
    (a layer's num_batches_tracked, or None) advances with the running buffers
    (`running.record_step`): on every rank alike, unless every rank's batch is empty."""
    if not (dist.is_available() and dist.is_initialized()):
        from . import counted_batch_norm  # at call time: no import cycle with __init__

        y = counted_batch_norm(input, running_mean, running_var, weight, bias, True, momentum,
                               eps, axis, mask, "identity", counter)
        return y, input.numel() // max(input.shape[axis], 1)
    check_process_group(process_group)
    group = dist.group.WORLD if process_group is None else process_group
    with shared_rejection(input, group):
        axis = _validate(input, running_mean, running_var, weight, bias, momentum, eps, axis, mask,
                         group)
    _agree_on_call(input, axis, running_mean, eps, momentum, group)
    if mask is not None:
        mask = mask_view(mask, input.dim(), axis)
    y, mean, var, count, positions = SyncBatchNormFunction.apply(input, weight, bias, mask, eps,
                                                                 axis, group)
    if int(count) > 1:  # 0 or 1: every rank's batch is empty (the count check raised on 1)
        record_step(running_mean, running_var, mean, var, count, momentum, counter)
    return y, int(positions)


def sync_batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                    momentum=0.1, eps=1e-5, *, process_group=None, axis=1, mask=None):
    """Training-mode batch normalization with statistics over all ranks of a process group.

    Every rank of `process_group` must call it, configured alike (channel count, input
    dtype and rank, axis, running buffers or not, eps, momentum), even with an empty batch.
    The result equals single-process BN on the concatenation of all ranks' batches:
    mean = sum_r n_r mean_r / n, var = (sum_r n_r var_r + sum_r n_r (mean_r - mean)^2)/n
    (Chan's merge, exact for uneven and empty ranks); running_var receives var * n / (n - 1)
    with the global n. The backward all-reduces (sum dy, sum dy (x - mean)); weight/bias
    gradients are this rank's share (DDP sums/averages them). Not twice differentiable.

    Args:
        input: (N, C, ...) tensor on this rank, or any rank >= 2 with channels at `axis`.
        running_mean, running_var: (C,) buffers updated in place, or None. Default None.
        weight, bias: optional (C,) affine parameters. Default None.
        momentum: running = (1 - momentum) * running + momentum * batch. Default 0.1.
        eps: added to the variance. Default 1e-5.
        process_group: the group to synchronize over; None means the default group.
        axis: the channel dimension. Default 1.
        mask: optional boolean mask over the non-channel dims, True at valid positions.

    Without an initialized process group this is `bnkit.functional.batch_norm(training=True)`.
    Before the statistics, the ranks all-gather a fixed-size call header (8 float64 values):
    when the calls disagree, every rank raises the same ValueError naming which rank has what;
    when some ranks' input fails validation, they raise their own error and the others a
    ValueError naming them. The global batch-size check raises on all ranks. In every case
    nothing is written. A rank that makes no call (eval mode, a skipped layer) leaves the
    others waiting until the process group's timeout.

    Shape: input (*), output the same shape and dtype.

    Example:
        >>> # Run by every rank after dist.init_process_group("gloo", timeout=...); without
        >>> # a process group (as here) it is plain training-mode BN.
        >>> y = sync_batch_norm(torch.randn(8, 3) * 2 + 5)
        >>> torch.allclose(y.mean(0), torch.zeros(3), atol=1e-6)
        True
    """
    return sync_batch_norm_train(input, running_mean, running_var, weight, bias, momentum, eps,
                                 process_group=process_group, axis=axis, mask=mask)[0]
