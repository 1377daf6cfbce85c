"""In-place activated batch normalization: BN + an invertible activation that keeps only its
output for the backward (Rota Bulò, Porzi & Kontschieder, CVPR 2018).

Forward, per channel (s = 1/sqrt(var + eps), the statistics of the core's `batch_stats`):
    z = w (x - mu) s + b,    y = f(z)                 f: leaky_relu, elu or identity
y is written into x's storage when that is safe (`can_overwrite`) and y is the only
full-size tensor saved. The backward recovers, from y alone (derivation in docs/math.md,
section "In-place activated BN"):
    z = f^-1(y),   dz = dy f'(z) (f' read from y),   x - mu = (z - b) / (w s)
and then the core's own reduce and elementwise steps on the recovered centred input:
    sum_dz = sum dz,  sum_dz_xmu = sum dz (x - mu),  db = sum_dz,  dw = s sum_dz_xmu
    dx = w s (dz - sum_dz/n - (x - mu) s^2 sum_dz_xmu / n)       (training; eval: w s dz)
Sync BN all-reduces (sum_dz, sum_dz_xmu) between the two steps, as `sync.py` does.

One autograd Function runs on every backend: a backend with InPlaceABN kernels (`cpu`,
`triton`: `abn_forward`, `abn_backward_reduce`, `abn_backward_elemt`) runs the forward in one
call (statistics, the write, the running blend on `cpu`) and the backward in two passes over
(y, dy); any other (`reference`), or an input the kernels decline, runs the same steps in
torch operations over the backend's primitives (`backward_reduce` / `backward_elemt`).

Channels whose scale w is near zero relative to b (`near_zero_scale`) cannot be recovered
from y to the output's precision (at w = 0, y = f(b) holds no trace of x): for them alone the
input is saved as well (a copy of those channels), so the layer stays exact BN + activation
for every w, with the memory saving on all other channels; the backward of a call with such
channels runs in torch operations (the kernels recover x - mu from y for every channel).
ReLU is refused: it maps every z <= 0 to 0, so z, and with it x, cannot be recovered.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import kernels
from ..errors import BNValueError
from . import checks
from .backward import grad_affine
from .normalize import affine_coeffs, inv_std, normalize
from .running import record_step
from .stats import Stats, acc_dtype, channel_view, compute_dtype

__all__ = ["INVERTIBLE", "can_overwrite", "check_invertible", "inplace_abn", "inverse_coeffs",
           "near_zero_scale"]

INVERTIBLE = ("leaky_relu", "elu", "identity")
# |w| below |b| / NEAR_ZERO_RATIO loses over log2(ratio) bits of x - mu in the inversion
NEAR_ZERO_RATIO = 64.0
TINY_SCALE = 1e-12  # and any |w| below this (z = w x_hat would be denormal-sized)


def check_invertible(act, act_param) -> None:
    """act in INVERTIBLE with a parameter that keeps it invertible (slope, alpha > 0)."""
    if act == "relu":
        raise BNValueError("InPlaceABN cannot use 'relu': ReLU maps every negative value to 0, so "
                           "the backward could not recover the normalized input from the output "
                           "(the layer keeps only the output); use act='leaky_relu' (e.g. "
                           "act_param=0.01), or BatchNormAct(C, act='relu') which keeps its input")
    if not isinstance(act, str) or act not in INVERTIBLE:
        raise BNValueError(f"InPlaceABN activation must be one of {list(INVERTIBLE)} (got "
                           f"{act!r}): the backward inverts it; use BatchNormAct for any other "
                           "activation")
    if act == "identity":
        return
    if isinstance(act_param, bool) or not isinstance(act_param, (int, float)) or \
            not act_param > 0:
        what = "negative slope" if act == "leaky_relu" else "alpha"
        raise BNValueError(f"InPlaceABN act_param (the {act} {what}) must be a number > 0 (got "
                           f"{act_param!r}): at 0 the activation is ReLU on the negative side and "
                           "cannot be inverted; the usual value is 0.01 for leaky_relu, 1.0 for "
                           "elu")


def apply_invertible(z, act: str, p: float, inplace: bool):
    """f(z), in place on z when `inplace`."""
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, p, inplace=inplace)
    if act == "elu":
        return torch.nn.functional.elu(z, p, inplace=inplace)
    return z


def invert(y, dy, act: str, p: float):
    """(z, dz): the pre-activation z = f^-1(y) and dz = dy f'(z), both from y.

    leaky_relu (slope p > 0): z = y for y > 0 else y / p (leaky_relu with slope 1/p);
    f' = 1 for y > 0 else p. elu (alpha p > 0): z = y for y > 0 else log1p(y / p);
    f' = 1 for y > 0 else y + p (= p e^z). f' is torch's own activation backward from the
    result (y > 0 exactly where z > 0), so dz equals torch's, z = 0 included. A saturated elu
    output (y = -p in floating point, z below about -37 in float64 or -17 in float32) is
    clamped to the nearest invertible value (docs/layers/inplace_abn.md).
    """
    if act == "identity":
        return y, dy
    if act == "leaky_relu":
        z = torch.nn.functional.leaky_relu(y, 1.0 / p)
        return z, torch.ops.aten.leaky_relu_backward(dy, y, p, True)
    ratio = (y / p).clamp_min(-1 + torch.finfo(y.dtype).eps)
    z = torch.where(y > 0, y, torch.log1p(ratio))
    return z, torch.ops.aten.elu_backward(dy, p, 1, 1, True, y)


def near_zero_scale(weight, bias):
    """(C,) bool: channels whose x - mu cannot be recovered from z = w (x - mu) s + b to the
    output's precision: |w| * NEAR_ZERO_RATIO <= |b|, or |w| < TINY_SCALE (w = 0 included).
    None when there is no weight (the scale is 1)."""
    if weight is None:
        return None
    w = weight.detach().abs()
    b = torch.zeros_like(w) if bias is None else bias.detach().abs().to(w.dtype)
    return (w * NEAR_ZERO_RATIO <= b) | (w < TINY_SCALE)


def can_overwrite(x) -> bool:
    """Whether the forward may write its output into x's storage: x is an intermediate
    result of autograd (not a leaf: never a parameter, an input that requires grad, or data
    the caller made), not a view (its base might be read by others, and torch's view
    rebasing for custom Functions has corner cases), not an inference tensor, and not saved
    by the operation that produced it (sigmoid, exp, another InPlaceABN keep their output:
    overwriting it would make their backward fail). Whether a later consumer saved x cannot
    be seen from x; torch's version check makes that consumer's backward raise."""
    return x.grad_fn is not None and x._base is None and not x.is_inference() and \
        not _saved_by_producer(x)


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}  # node type -> its `_saved_*` attributes


def _saved_by_producer(x) -> bool:
    """x's storage is among the tensors its grad_fn keeps for its backward."""
    node = x.grad_fn
    names = _SAVED_NAMES.get(type(node))
    if names is None:
        names = _SAVED_NAMES[type(node)] = tuple(a for a in dir(node)
                                                 if a.startswith("_saved_"))
    saved = []
    for name in names:
        try:
            saved.append(getattr(node, name))
        except RuntimeError:  # released (after a backward) or not readable
            continue
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        try:  # a custom Function's ctx
            saved += list(node.saved_tensors)
        except RuntimeError:
            pass
    ptr = x.untyped_storage().data_ptr()
    stack = saved
    while stack:
        t = stack.pop()
        if isinstance(t, (list, tuple)):
            stack.extend(t)
        elif isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr:
            return True
    return False


def _write_output(x, mean, invstd, weight, bias, axis, act, p, overwrite: bool):
    """y = f(w (x - mu) s + b), into x itself when `overwrite`, else a new tensor. The
    arithmetic of the core's `normalize` ((x - mean_hi) * scale + shift in the compute dtype,
    the activation before rounding to x's dtype)."""
    cdt = compute_dtype(x.dtype)
    mean_hi, scale, shift = affine_coeffs(mean, invstd, weight, bias, cdt)
    nd = x.dim()
    mean_hi, scale, shift = (channel_view(v, nd, axis) for v in (mean_hi, scale, shift))
    if overwrite and cdt == x.dtype:  # no temporary of x's size
        x.sub_(mean_hi).mul_(scale).add_(shift)
        return apply_invertible(x, act, p, inplace=True)
    y = torch.addcmul(shift, x.to(cdt) - mean_hi, scale)
    y = apply_invertible(y, act, p, inplace=True).to(x.dtype)
    return x.copy_(y) if overwrite else y


class AbnCall(NamedTuple):
    """One call's settings, handed to the Function as one argument. `momentum` is None when
    the running buffers are not updated; `stats` are given statistics (the sync variant's
    global ones) or None (the batch's in training, the running buffers in eval); `group` is
    None (local) or the process group whose ranks all-reduce the backward sums; `counter`
    is the layer's num_batches_tracked (or None), advanced with the running buffers."""

    axis: int
    act: str
    p: float
    training: bool
    inplace: bool
    eps: float
    momentum: float | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    stats: Stats | None = None
    group: object = None
    counter: torch.Tensor | None = None


def _statistics(backend, x, call: AbnCall) -> Stats:
    """The statistics the call normalizes with (count, mean, biased var)."""
    if call.stats is not None:
        return call.stats
    if call.training:
        return backend.batch_stats(x, call.axis)
    adt = acc_dtype(x.dtype)  # copies: the buffers may change before the backward reads them
    return Stats(torch.tensor(2.0, dtype=adt, device=x.device),
                 call.running_mean.to(adt, copy=True), call.running_var.to(adt, copy=True))


def forward_step(backend, x, weight, bias, call: AbnCall, overwrite: bool):
    """Statistics, y = f(BN(x)) (into x's storage when `overwrite`, else a new tensor) and
    the running-buffer update -> (y, mean, invstd, count). The backend's one-call
    `abn_forward` runs it when it has one and takes the input (the 'cpu' backend: one C++
    call, blend included); otherwise its `batch_stats` and the elementwise step in torch
    operations (`_write_output`); then the step is recorded (`running.record_step`: the
    blend unless the kernel did it, and the layer's step counter)."""
    done = _kernel_forward(backend, x, weight, bias, call, overwrite)
    if done is None:
        count, mean, var = _statistics(backend, x, call)
        invstd = inv_std(var, call.eps)
        y = _write_output(x, mean, invstd, weight, bias, call.axis, call.act, call.p, overwrite)
        done = y, mean, var, invstd, count, False
    y, mean, var, invstd, count, blended = done
    if call.momentum is not None:
        record_step(call.running_mean, call.running_var, mean, var, count, call.momentum,
                    call.counter, blended)
    return y, mean, invstd, count


def _kernels_for(backend, name: str):
    """The backend's InPlaceABN kernel `name`, or None: it has none, or torch.compile /
    torch.export or torch.jit.trace is recording the call (the kernels write into their
    arguments, which a compiled graph's functionalization does not take, and return an int,
    which the tracer does not record; the torch operations trace)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    return getattr(backend, name, None)


def _kernel_forward(backend, x, weight, bias, call: AbnCall, overwrite: bool):
    """The backend's `abn_forward` -> (y, mean, var, invstd, count, blended), or None when it
    has none, declines the input, or torch.compile is tracing (`_kernels_for`)."""
    op = _kernels_for(backend, "abn_forward")
    if op is None:
        return None
    y = x if overwrite else torch.empty_like(x)
    given = None if call.stats is None else (call.stats.mean, call.stats.var)
    done = op(x, y, weight, bias, call.running_mean, call.running_var, given, call.training,
              call.eps, call.axis, call.act, call.p, call.momentum)
    if done is None:
        return None
    mean, var, invstd, blended = done
    if call.stats is not None:
        count = call.stats.count
    else:  # eval: a placeholder, as `_statistics` gives (the eval backward does not read it)
        n = x.numel() // x.shape[call.axis] if call.training else 2.0
        count = torch.tensor(n, dtype=mean.dtype, device=x.device)
    return y, mean, var, invstd, count, blended


class InPlaceABNFunction(torch.autograd.Function):
    """(x, weight, bias, call) -> y = f(BN(x)), saving y (+ per-channel tensors, + the
    near-zero-scale channels of x). The statistics (batch or running, local or global) carry
    no gradient; the training backward accounts for their dependence on x. One Function for
    every backend: the forward runs `forward_step` on the selected backend, the backward the
    backend's `abn_backward_reduce` / `abn_backward_elemt` when it has them and no channel
    is near zero, else the inversion in torch operations and the backend's primitives."""

    @staticmethod
    def forward(ctx, x, weight, bias, call):
        small = near_zero_scale(weight, bias)
        idx = None if small is None or not bool(small.any()) else small.nonzero().flatten()
        x_small = None if idx is None else x.detach().index_select(call.axis, idx)
        overwrite = call.inplace and can_overwrite(x)
        backend = kernels.select(x, call.axis, None)
        y, mean, invstd, count = forward_step(backend, x.detach(), weight, bias, call,
                                              overwrite)
        if overwrite:
            ctx.mark_dirty(x)
            y = x
        ctx.save_for_backward(y, weight, bias, mean, invstd, count, idx, x_small)
        ctx.call = call
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        y, weight, bias, mean, invstd, count, idx, x_small = ctx.saved_tensors
        call = ctx.call
        backend = kernels.select(y, call.axis, None)
        sums = None
        reduce = _kernels_for(backend, "abn_backward_reduce")
        if idx is None and reduce is not None:
            sums = reduce(dy, y, weight, bias, invstd, call.axis, call.act, call.p)
        if sums is not None:
            sum_dz, sum_dz_xmu = sums
            g_dz, g_dz_xmu = _all_reduced(sum_dz, sum_dz_xmu, call)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = backend.abn_backward_elemt(dy, y, weight, bias, invstd, g_dz, g_dz_xmu,
                                                count, call.axis, call.act, call.p,
                                                call.training)
        else:
            dx, sum_dz, sum_dz_xmu = _torch_backward(
                backend, dy, y, weight, bias, mean, invstd, count, idx, x_small, call,
                ctx.needs_input_grad[0])
        dx = None if dx is None else dx.to(dy.dtype)
        dweight, dbias = grad_affine(sum_dz, sum_dz_xmu, invstd)
        dweight = None if weight is None else dweight.to(weight.dtype)
        dbias = None if bias is None else dbias.to(bias.dtype)
        return dx, dweight, dbias, None


def _all_reduced(sum_dz, sum_dz_xmu, call: AbnCall):
    """The sums over every rank of the sync variant's group (training); else as they are."""
    if call.group is None or not call.training:
        return sum_dz, sum_dz_xmu
    both = torch.cat([sum_dz, sum_dz_xmu])  # one all_reduce instead of two
    dist.all_reduce(both, group=call.group)
    return both.split(sum_dz.shape[0])


def _torch_backward(backend, dy, y, weight, bias, mean, invstd, count, idx, x_small,
                    call: AbnCall, need_dx: bool):
    """The backward in torch operations -> (dx or None, sum_dz, sum_dz_xmu): invert the
    activation and the affine map, take the near-zero channels' x - mu from their saved
    input, then the backend's `backward_reduce` / `backward_elemt`."""
    axis = call.axis
    cdt = compute_dtype(y.dtype)  # half: invert in float32
    z, dz = invert(y.to(cdt), dy.to(cdt), call.act, call.p)
    xmu = centred_input(z, weight, bias, invstd, axis)
    if idx is not None:  # the channels saved as input: x - mu directly
        rows = x_small.to(xmu.dtype) - channel_view(mean[idx].to(xmu.dtype), x_small.dim(),
                                                    axis)
        xmu = xmu.index_copy(axis, idx, rows)
    zero = torch.zeros_like(mean)
    sum_dz, sum_dz_xmu = backend.backward_reduce(dz, xmu, zero, axis)
    g_dz, g_dz_xmu = _all_reduced(sum_dz, sum_dz_xmu, call)
    dx = None
    if need_dx:
        dx = backend.backward_elemt(dz, xmu, zero, invstd, weight, g_dz, g_dz_xmu, count,
                                    axis, None, call.training)
    return dx, sum_dz, sum_dz_xmu


def inverse_coeffs(invstd, weight, bias, cdtype):
    """Per-channel (r, h), each (C,) in `cdtype`, of x - mu = z r + h: r = 1 / (w s), 0 where
    w s = 0 (those channels' x - mu comes from their saved input), h = -b r; computed in
    invstd's dtype and rounded once (the kernels use the same coefficients)."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    r = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    h = torch.zeros_like(r) if bias is None else -bias.to(r.dtype) * r
    return r.to(cdtype), h.to(cdtype)


def centred_input(z, weight, bias, invstd, axis):
    """x - mu = (z - b) / (w s) = z r + h (`inverse_coeffs`), one pass, in z's compute
    dtype; channels with w = 0 give 0 here and are overwritten from the saved input by the
    caller."""
    cdt = compute_dtype(z.dtype)
    r, h = inverse_coeffs(invstd, weight, bias, cdt)
    nd = z.dim()
    if bias is None:
        return z.to(cdt) * channel_view(r, nd, axis)
    return torch.addcmul(channel_view(h, nd, axis), z.to(cdt), channel_view(r, nd, axis))


def validate(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, act,
             act_param) -> int:
    """Every check of the core's call (`checks.validate_call`, no mask, identity act) plus the
    invertible activation's; returns axis >= 0."""
    axis = checks.validate_call(x, running_mean, running_var, weight, bias, training, momentum,
                                eps, axis, None, "identity")
    check_invertible(act, act_param)
    return axis


def abn_apply(x, weight, bias, call: AbnCall):
    """Run the Function when a gradient is needed, else the forward step alone (which then
    never overwrites: without autograd there is no saved tensor to spare)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs_grad:
        return forward_step(kernels.select(x, call.axis, None), x, weight, bias, call, False)[0]
    return InPlaceABNFunction.apply(x, weight, bias, call)


def inplace_abn(input, running_mean=None, running_var=None, weight=None, bias=None,
                training=False, momentum=0.1, eps=1e-5, *, axis=1, act="leaky_relu",
                act_param=0.01, inplace=True, counter=None):
    """y = act(BN(x)) that keeps only y for the backward, and writes y into x when safe.

    The value is exactly `bnkit.functional.batch_norm(...)` followed by the activation
    (torch's leaky_relu(z, act_param) / elu(z, act_param) / identity), with the same
    statistics, running-buffer update and errors. With `inplace=True` (default) and x a
    non-leaf, non-view tensor produced by autograd (`can_overwrite`), x is overwritten and
    returned (its version counter advances, as for torch's in-place ops); otherwise a new
    tensor is returned. Either way the backward keeps y alone (plus per-channel vectors, and
    the input of channels with a near-zero weight).

    Args:
        input: (N, C, ...) tensor, or any rank >= 2 with channels at `axis`.
        running_mean, running_var, weight, bias, training, momentum, eps, axis: as in
            `bnkit.functional.batch_norm`.
        act: 'leaky_relu' (default), 'elu' or 'identity'. act_param: the leaky slope or the
            elu alpha (> 0; default 0.01).
        inplace: allow overwriting the input (default True).
        counter: a layer's num_batches_tracked (int64), advanced with the running buffers
            (`running.record_step`); default None.

    Example:
        >>> x = torch.randn(8, 3, 4, requires_grad=True) * 2 + 1   # a non-leaf
        >>> y = inplace_abn(x, training=True)
        >>> y is x
        True
    """
    axis = validate(input, running_mean, running_var, weight, bias, training, momentum, eps,
                    axis, act, act_param)
    if training:
        count = input.numel() // max(input.shape[axis], 1)
        if input.numel() and count <= 1:
            checks.check_enough_values(count, input, training, False)
    update = training and running_mean is not None and input.numel() > 0
    if update:
        checks.check_writable(running_mean, running_var)
    if input.numel() == 0:
        c = input.shape[axis]
        zeros = torch.zeros(c, dtype=torch.float64, device=input.device)
        y = normalize(input, zeros, torch.ones_like(zeros), weight, bias, axis)
        return apply_invertible(y, act, float(act_param), inplace=False)
    call = AbnCall(axis, act, float(act_param), training, inplace, float(eps),
                   float(momentum) if update else None, running_mean, running_var,
                   counter=counter)
    return abn_apply(input, weight, bias, call)


def _collective(op, tensors, group, what: str) -> None:
    """Run a blocking collective (the header exchange of `sync_header.agree`)."""
    op(*tensors, group=group)


def inplace_abn_sync_train(input, running_mean=None, running_var=None, weight=None, bias=None,
                           momentum=0.1, eps=1e-5, *, process_group=None, axis=1,
                           act="leaky_relu", act_param=0.01, inplace=True, counter=None):
    """Training-mode `inplace_abn` with statistics over every rank of `process_group`, as
    `bnkit.functional.sync.sync_batch_norm` (the same call header, Chan merge of the ranks'
    statistics, one all-reduce of (sum_dz, sum_dz_xmu) in the backward; weight/bias gradients
    stay local for DDP to reduce). Returns (y, global number of positions per channel).
    `counter` advances with the running buffers, on every rank alike unless every rank's
    batch is empty. Without an initialized process group it is `inplace_abn(training=True)`."""
    from ..kernels import reference
    from .sync import check_process_group, gather_stats, local_stats, shared_rejection
    from .sync_header import agree, call_header, header_device

    if not (dist.is_available() and dist.is_initialized()):
        y = inplace_abn(input, running_mean, running_var, weight, bias, True, momentum, eps,
                        axis=axis, act=act, act_param=act_param, inplace=inplace,
                        counter=counter)
        return y, input.numel() // max(input.shape[axis], 1)
    check_process_group(process_group)
    group = dist.group.WORLD if process_group is None else process_group
    with shared_rejection(input, group):
        axis = validate(input, running_mean, running_var, weight, bias, True, momentum, eps,
                        axis, act, act_param)
    verdict = agree(call_header(input, axis, running_mean, eps, momentum,
                                header_device(input, group)), group, _collective)
    if verdict is not None:
        raise BNValueError(verdict)
    with torch.no_grad():
        packed = local_stats(reference, input, axis, None)
        stats, valid, positions = gather_stats(packed, input.shape[axis], group)
    if positions and valid <= 1:
        raise BNValueError(f"expected more than 1 value per channel when training (got {valid} "
                           f"values per channel over all {dist.get_world_size(group)} ranks; "
                           f"this rank's input shape {tuple(input.shape)}); use larger per-rank "
                           "batches, or call model.eval()")
    if positions == 0:  # every rank empty: nothing to normalize with, nothing to update
        return inplace_abn(input, None, None, weight, bias, True, momentum, eps, axis=axis,
                           act=act, act_param=act_param, inplace=inplace), 0
    if running_mean is not None:
        checks.check_writable(running_mean, running_var)
    call = AbnCall(axis, act, float(act_param), True, inplace, float(eps),
                   None if running_mean is None else float(momentum), running_mean,
                   running_var, stats, group, counter)
    y = abn_apply(input, weight, bias, call)
    return y, positions
