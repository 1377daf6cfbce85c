"""Autograd and torch.compile wiring: the core as two `torch.library` custom ops.

`bnkit::batch_norm_fwd` and `bnkit::batch_norm_bwd` are opaque to torch.compile (so
`fullgraph=True` works and the fast kernels run inside compiled graphs) and dispatch to the
selected backend at run time. The running-stat update happens outside, in plain in-place
torch ops, which torch.compile functionalizes like it does for torch's own BN buffers.

Eager calls skip the custom-op machinery (schema checks, default filling, redispatch cost
~10 us a call, most of a small layer's time) through `_EagerBatchNorm`, a plain
autograd.Function over the very same forward and backward functions, and skip autograd
altogether when nothing needs a gradient; the ops are used whenever torch.compile is
tracing. In eager training the backend may also blend the running buffers inside its
one-call forward (`momentum`), which saves four tiny torch ops a call. Before any of
this (and after the core's validation), `native_apply` offers a plain eager call to the
C++ autograd node (`bnkit.kernels.native`), which runs the same one-call ops with no
Python autograd frames; it declines what it does not take and the path above runs.

Double backward: when the backward itself must be differentiated (create_graph=True), the
same hand-derived formulas run as reference torch ops with the statistics recomputed
differentiably from x, so autograd can take their derivative.

Forward-mode AD and vmap (torch.func.jvp, jacfwd, hessian, vmap, torch.autograd.forward_ad)
need a rule for every op: while one is active the forward runs as differentiable reference
torch ops (`_derived_forward`) and torch derives the tangent and the batching rule.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._C import _functorch
from torch.autograd import forward_ad as _forward_ad

from .. import kernels
from .backward import act_backward, backward_elemt, backward_reduce, grad_affine, padding_safe
from .export import refuse_trace
from .normalize import inv_std, normalize
from .running import record_step, warn_nonfinite
from .stats import acc_dtype, batch_stats, mask_view


def _running(running_mean, running_var, x):
    """Eval-mode statistics: copies of the running buffers in the accumulation dtype."""
    adt = acc_dtype(x.dtype)
    count = torch.zeros((), dtype=adt, device=x.device)
    return count, running_mean.to(adt, copy=True), running_var.to(adt, copy=True)


def _forward_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                   running_mean: Tensor | None, running_var: Tensor | None,
                   mask: Tensor | None, training: bool, eps: float, axis: int,
                   act: str = "identity") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (y, mean, var, count). mean/var (C,) and count () in the accumulation dtype."""
    return _run_forward(x, weight, bias, running_mean, running_var, mask, training, eps, axis,
                        act, None)[:4]


def _run_forward(x, weight, bias, running_mean, running_var, mask, training, eps, axis, act,
                 momentum):
    """-> (y, mean, var, count, blended). With a `momentum` (eager training with running
    buffers), a backend whose `fused_forward` runs the whole op also blends the running
    buffers, and `blended` says it did; otherwise the caller blends them."""
    backend = kernels.select(x, axis, mask)
    fused = getattr(backend, "fused_forward", None)
    if fused is not None:  # the backend may run the whole forward in one call
        out = fused(x, weight, bias, running_mean, running_var, mask, training, eps, axis, act,
                    momentum)
        if out is not None:
            return (*out, momentum is not None)
    if training:
        count, mean, var = backend.batch_stats(x, axis, mask)
    else:
        count, mean, var = _running(running_mean, running_var, x)
    invstd = inv_std(var, eps)
    y = backend.normalize(x, mean, invstd, weight, bias, axis, act)
    return y, mean, var, count, False


batch_norm_fwd = torch.library.custom_op("bnkit::batch_norm_fwd", _forward_impl,
                                         mutates_args=())


@batch_norm_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, mask, training, eps, axis, act="identity"):
    adt = acc_dtype(x.dtype)
    c = x.shape[axis]
    return (torch.empty_like(x), x.new_empty((c,), dtype=adt), x.new_empty((c,), dtype=adt),
            x.new_empty((), dtype=adt))


def _backward_impl(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                   mean: Tensor, var: Tensor, count: Tensor, mask: Tensor | None,
                   training: bool, eps: float, axis: int,
                   act: str = "identity") -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias): the activation's derivative, the reduce step, then the
    elementwise step."""
    backend = kernels.select(x, axis, mask)
    whole = getattr(backend, "fused_backward_op", None)
    out = None if whole is None else whole(dy, x, weight, bias, mean, var, count, mask,
                                           training, eps, axis, act)
    if out is not None:  # the backend ran the whole backward, grad_affine included
        return out
    invstd = inv_std(var, eps)
    fused = getattr(backend, "fused_backward", None)
    if fused is not None:  # the backend's one-call form of the three steps below
        dx, sum_dy, sum_dy_xmu = fused(dy, x, mean, invstd, weight, bias, count, axis, mask,
                                       training, act)
    else:
        if act != "identity":
            dy = backend.act_backward(dy, x, mean, invstd, weight, bias, axis, act)
        sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, mean, axis)
        dx = backend.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count,
                                    axis, mask, training)
    dweight, dbias = grad_affine(sum_dy, sum_dy_xmu, invstd)
    pdt = weight.dtype if weight is not None else x.dtype
    return dx, _as(dweight, pdt), _as(dbias, pdt)


def _as(t: Tensor, dtype) -> Tensor:
    """t in `dtype`, skipping the dispatch of a no-op `.to` (~2 us on small tensors)."""
    return t if t.dtype == dtype else t.to(dtype)


batch_norm_bwd = torch.library.custom_op("bnkit::batch_norm_bwd", _backward_impl,
                                         mutates_args=())


@batch_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, var, count, mask, training, eps, axis, act="identity"):
    pdt = weight.dtype if weight is not None else x.dtype
    c = x.shape[axis]
    return torch.empty_like(x), x.new_empty((c,), dtype=pdt), x.new_empty((c,), dtype=pdt)


def _differentiable_bwd(dy, x, weight, bias, mean, var, count, mask, training, eps, axis, act):
    """The same formulas as batch_norm_bwd in reference torch ops, stats recomputed from x."""
    if training:
        count, mean, var = batch_stats(x, axis, mask)
    invstd = inv_std(var, eps)
    dy = act_backward(dy, x, mean, invstd, weight, bias, axis, act)
    sum_dy, sum_dy_xmu = backward_reduce(dy, x, mean, axis)
    dx = backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis, mask,
                        training)
    dweight, dbias = grad_affine(sum_dy, sum_dy_xmu, invstd)
    pdt = weight.dtype if weight is not None else x.dtype
    return dx, dweight.to(pdt), dbias.to(pdt)


def _graph_backward(dy, x, weight, bias, mv, training, eps, axis, relu):
    """Double backward (create_graph=True) of the C++ autograd node (`bnkit_cpu::bn`): the
    differentiable formulas, statistics recomputed from x. mv is the forward's mean | var;
    an absent weight or bias arrives undefined (None) and its gradient is dropped."""
    c = x.shape[axis]
    count = torch.scalar_tensor(x.numel() // c, dtype=torch.float64)
    dx, dw, db = _differentiable_bwd(dy, x, weight, bias, mv[:c], mv[c:], count, None,
                                     training, eps, axis, "relu" if relu else "identity")
    return [dx, dw, db]


_LIB = torch.library.Library("bnkit", "FRAGMENT")  # the registration lives as long as _LIB
_LIB.define("bn_backward_graph(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor mv, "
            "bool training, float eps, int axis, bool relu) -> Tensor[]")
_LIB.impl("bn_backward_graph", _graph_backward, "CompositeImplicitAutograd")


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, mask, training, eps, axis, act = inputs
    _, mean, var, count = output
    ctx.save_for_backward(x, weight, bias, mean, var, count, mask)
    ctx.training, ctx.eps, ctx.axis, ctx.act = training, eps, axis, act


def _backward_of(dy, x, weight, bias, mean, var, count, mask, training, eps, axis, act):
    """-> (dx, dweight, dbias); None for the absent parameters. With a mask, padded
    positions that get no gradient enter as the channel mean (`padding_safe`): NaN or Inf
    padding then adds nothing to any gradient."""
    x = padding_safe(x, dy, mean, mask, axis)
    args = (dy, x, weight, bias, mean, var, count, mask, training, eps, axis, act)
    if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
        dx, dweight, dbias = _differentiable_bwd(*args)
    elif torch.compiler.is_compiling():
        dx, dweight, dbias = batch_norm_bwd(*args)
    else:
        dx, dweight, dbias = _backward_impl(*args)
    return dx, dweight if weight is not None else None, dbias if bias is not None else None


def _backward(ctx, dy, _dmean, _dvar, _dcount):
    x, weight, bias, mean, var, count, mask = ctx.saved_tensors
    dx, dweight, dbias = _backward_of(dy, x, weight, bias, mean, var, count, mask,
                                      ctx.training, ctx.eps, ctx.axis, ctx.act)
    return dx, dweight, dbias, None, None, None, None, None, None, None


batch_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerBatchNorm(torch.autograd.Function):
    """The same op for eager mode, without the custom-op dispatch overhead (schema checks,
    default filling, redispatch: ~10 us a call, most of a small layer's time). It returns y
    alone (each extra output costs the Function machinery several us): the statistics go
    back through `stats`, a list the caller passes in, and into ctx as plain attributes
    (they are created here and carry no history). The combined `forward(ctx, *args)` form:
    the separate setup_context form binds every call's arguments with `inspect` (~15 us)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, mask, config):
        training, eps, axis, act, momentum, stats = config  # one tuple: apply walks each arg
        y, mean, var, count, blended = _run_forward(x, weight, bias, running_mean,
                                                    running_var, mask, training, eps, axis,
                                                    act, momentum)
        ctx.save_for_backward(x, weight, bias, mask)
        ctx.stats = (mean, var, count)
        ctx.training, ctx.eps, ctx.axis, ctx.act = training, eps, axis, act
        stats += (mean, var, count, blended)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mask = ctx.saved_tensors
        mean, var, count = ctx.stats
        dx, dweight, dbias = _backward_of(dy, x, weight, bias, mean, var, count, mask,
                                          ctx.training, ctx.eps, ctx.axis, ctx.act)
        return dx, dweight, dbias, None, None, None, None


class _FuncBatchNorm(torch.autograd.Function):
    """The same op for torch.func transforms (grad, jacrev, functional_call + grad, as in
    meta-learning), which accept only the setup_context form: it costs the argument binding
    `_EagerBatchNorm` avoids, so it is used only while a transform is active. Transforms
    differentiate with create_graph, so the backward runs `_differentiable_bwd`. vmap and
    jvp take `_derived_forward` instead (they need rules the opaque kernels cannot give)."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, mask, training, eps, axis, act):
        return _forward_impl(x, weight, bias, running_mean, running_var, mask, training, eps,
                             axis, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])

    backward = staticmethod(_backward)


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_DERIVED = (_functorch.TransformType.Vmap, _functorch.TransformType.Jvp)


def _derived_transform() -> bool:
    """A torch.func vmap or jvp (also jacfwd, hessian) is active: these need rules for every
    op, which opaque kernels cannot give, so the call runs `_derived_forward`."""
    return any(i.key() in _DERIVED for i in _functorch.get_interpreter_stack() or ())


def _vmapped(t) -> bool:
    """t carries a vmap batch dimension at some level of functorch wrapping."""
    while True:
        if _functorch.is_batchedtensor(t):
            return True
        if not _functorch.is_functorch_wrapped_tensor(t):
            return False
        t = _functorch.get_unwrapped(t)


def _derived_forward(x, weight, bias, running_mean, running_var, mask, training, eps, axis,
                     act, momentum):
    """The forward in differentiable reference torch ops (`batch_stats`, `normalize`), for
    forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) and vmap: torch derives the
    tangent and the batching rule from the ops, as it does for its own batch_norm. The
    statistics returned for the running update are detached, so a buffer never gets a
    tangent. With a `momentum` (training with running buffers) the buffers are blended here,
    as torch's batch_norm does under forward-mode AD, and `blended` is True. Under vmap,
    updating unbatched running buffers from a batched input is refused before anything is
    touched, with torch's message for its own batch_norm."""
    if momentum is not None and _vmapped(x) and not _vmapped(running_mean):
        raise RuntimeError(
            "Batch norm got a batched tensor as input while the running_mean or running_var, "
            "which will be updated in place, were not batched (got a training-mode call with "
            "running statistics under torch.func.vmap); set track_running_stats=False, use "
            "eval mode, or vmap over batched running buffers too")
    if training:
        count, mean, var = batch_stats(x, axis, mask)
    else:
        count, mean, var = _running(running_mean, running_var, x)
    y = normalize(x, mean, torch.rsqrt(var + eps), weight, bias, axis, act)
    mean, var, count = _constant(mean), _constant(var), _constant(count)
    if momentum is None or _functorch.is_functorch_wrapped_tensor(mean):
        return y, mean, var, count, False  # a grad level is left: torch refuses the update
    with torch._C._DisableFuncTorch():  # plain tensors into plain buffers, below the jvp
        record_step(running_mean, running_var, mean, var, count, momentum, None)
    return y, mean, var, count, True


def _constant(t):
    """A statistic as the running update takes it: detached, and unwrapped from the
    torch.func.jvp levels, so updating captured buffers works under jvp as it does for
    torch's batch_norm (grad levels stay: torch refuses that update under grad)."""
    t = t.detach()
    stack = _functorch.get_interpreter_stack() or ()
    jvp_levels = {i.level() for i in stack if i.key() == _functorch.TransformType.Jvp}
    while _functorch.is_gradtrackingtensor(t) and _functorch.maybe_get_level(t) in jvp_levels:
        t = _functorch.get_unwrapped(t)
    return t


def _needs_graph(x, weight, bias) -> bool:
    """Autograd will record this call: grad mode on and some input requires grad."""
    if not torch.is_grad_enabled():
        return False
    return (x.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad))


def native_apply(x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
                 act):
    """y from the C++ autograd node (`bnkit.kernels.native`) when it takes this eager call
    (no mask): the running buffers blend in place when training with them (the caller
    then records the step: `running.record_step(blended=True)`). The caller has validated
    the call (identical errors on every path) and normalized `axis`. None, with nothing touched, when
    the node does not take it (see `bnkit.kernels.native`): the Python path then runs it.
    Only for callers that need y alone (the statistics stay inside the node)."""
    if act not in _NATIVE_ACTS or type(eps) is not float and type(eps) is not int:
        return None
    # before native_module(): its first call imports the kernels, which must not happen
    # under a transform, a tracer or fake tensors
    if _compiling() or _functorch_active() or _tracing() or _forward_ad._current_level >= 0:
        return None
    native = kernels.native_module()
    if native is None:
        return None
    update = training and running_mean is not None
    y, nonfinite = native.call(x, weight, bias, running_mean, running_var, training, float(eps),
                               float(momentum) if update else 0.0, update, act == "relu", axis)
    if nonfinite is not None:  # (mean | var): some channels kept their running statistics
        c = nonfinite.numel() // 2
        warn_nonfinite(running_mean, nonfinite[:c], nonfinite[c:])
    return y


_NATIVE_ACTS = ("identity", "relu")
_compiling = torch.compiler.is_compiling
_tracing = torch._C._is_tracing  # torch.jit.trace records the call (the core lowers it)


def bn_apply(x, weight, bias, running_mean, running_var, mask, training, eps, axis,
             act="identity", momentum=None):
    """Run the forward op (the mask gets its channel axis here).
    -> (y, mean, var, count, blended); see `_run_forward` for `momentum` and `blended`."""
    if mask is not None:
        mask = mask_view(mask, x.dim(), axis)
    args = (x, weight, bias, running_mean, running_var, mask, training, eps, axis, act)
    if torch.compiler.is_compiling():
        return (*batch_norm_fwd(*args), False)
    if _tracing():  # the core lowers what it can (export.py); the kernels are invisible here
        refuse_trace("a training-mode batch norm (got training=True)")
    if _forward_ad._current_level >= 0 or _functorch_active() and _derived_transform():
        return _derived_forward(*args, momentum)
    if _functorch_active():  # torch.func.grad & co: the setup_context form
        return (*_FuncBatchNorm.apply(*args), False)
    if not _needs_graph(x, weight, bias):  # inference: no autograd node to build
        return _run_forward(*args, momentum)
    stats = []
    y = _EagerBatchNorm.apply(x, weight, bias, running_mean, running_var, mask,
                              (training, eps, axis, act, momentum, stats))
    return (y, *stats)
