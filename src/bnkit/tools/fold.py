"""Fold eval-mode BatchNorm into the Conv / ConvTranspose / Linear layer that feeds it.

In eval mode BN is the per-channel affine map y = (z - mean) * s + beta with
s = gamma / sqrt(var + eps). When z = W x + b comes straight from a conv or linear layer,
BN(z) = (s * W) x + ((b - mean) * s + beta): the layer absorbs BN and BN becomes Identity.
"""
from __future__ import annotations

import itertools
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .walk import (
    bn_axis,
    bn_eps,
    get_module,
    has_running_stats,
    is_bn,
    module_names,
    replace_module,
    walk,
    working_copy,
)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYERS = _CONV + _CONV_T + (nn.Linear,)
_NOT_IN_CHAIN = ("not directly after a Conv/ConvTranspose/Linear inside an nn.Sequential (the "
                 "model does not trace, so only nn.Sequential chains are searched)")


def fold_weights(weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, transpose=False):
    """Weight and bias of a conv/linear layer with the eval-mode BN after it folded in.

    s = bn_weight / sqrt(bn_var + eps);  W' = s * W (per output channel);
    b' = (b - bn_mean) * s + bn_bias. Computed in float64 and cast back to the input dtypes.

    Args:
        weight: (C_out, C_in/groups, *k) conv weight, (C_out, F) linear weight, or with
            transpose=True the ConvTranspose weight (C_in, C_out/groups, *k); groups is then
            C / weight.shape[1].
        bias: (C,) layer bias or None (zero).
        bn_mean, bn_var: (C,) BN running statistics.
        bn_weight, bn_bias: (C,) BN affine parameters or None (1 and 0).
        eps: BN's eps, >= 0.
        transpose: weight is a ConvTranspose weight. Default False.

    Returns: (weight', bias'), weight' shaped like `weight`, bias' (C,) in bias's dtype
    (weight's when bias is None).

    Example:
        >>> conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval()
        >>> w, b = fold_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
        ...                     bn.weight, bn.bias, bn.eps)
        >>> w.shape, b.shape
        (torch.Size([4, 3, 3, 3]), torch.Size([4]))
    """
    c = _check_fold_args(weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, transpose)
    f64 = torch.float64
    scale = torch.rsqrt(bn_var.to(f64) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(f64)
    b = bias.to(f64) if bias is not None else torch.zeros(c, dtype=f64, device=weight.device)
    new_bias = (b - bn_mean.to(f64)) * scale
    if bn_bias is not None:
        new_bias = new_bias + bn_bias.to(f64)
    ones = [1] * (weight.dim() - 2)
    if transpose:
        # (C_in, C_out/g, *k) -> (g, C_in/g, C_out/g, *k); output channel = group * C_out/g + j
        per = weight.shape[1]
        groups = c // per
        w = weight.to(f64).reshape(groups, -1, per, *weight.shape[2:])
        w = (w * scale.reshape(groups, 1, per, *ones)).reshape(weight.shape)
    else:
        w = weight.to(f64) * scale.reshape(c, 1, *ones)
    return w.to(weight.dtype), new_bias.to(weight.dtype if bias is None else bias.dtype)


def _check_fold_args(weight, bias, bn_mean, bn_var, bn_weight, bn_bias, eps, transpose) -> int:
    """Validate shapes; returns C, the number of BN channels."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"fold_weights needs a layer weight of at least 2 dims, (C_out, ...) or "
                         f"(C_in, C_out/groups, ...) with transpose=True (got {got}); pass "
                         "conv.weight or linear.weight")
    c = bn_mean.numel()
    for name, v in (("bias", bias), ("bn_mean", bn_mean), ("bn_var", bn_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if v is not None and tuple(v.shape) != (c,):
            raise ValueError(f"fold_weights: {name} must have one value per channel, shape "
                             f"({c},) like bn_mean (got {tuple(v.shape)}); pass the vectors of "
                             "the BN layer that follows this layer")
    per = weight.shape[1] if transpose else weight.shape[0]
    ok = (c % per == 0 and weight.shape[0] % (c // per) == 0) if transpose else per == c
    if not ok:
        kind = "ConvTranspose weight (C_in, C_out/groups, *k)" if transpose else \
            "weight (C_out, ...)"
        raise ValueError(f"fold_weights: the {kind} of shape {tuple(weight.shape)} does not "
                         f"produce the {c} channels of the BN; fold the BN into the layer that "
                         "feeds it (set transpose=True for ConvTranspose weights)")
    if not eps >= 0 or not bool((bn_var.to(torch.float64) + eps > 0).all()):
        raise ValueError(f"fold_weights needs bn_var + eps > 0 (got eps={eps}, min var "
                         f"{float(bn_var.min())}); running variances are never negative, "
                         "check the BN buffers")
    return c


@dataclass
class FoldReport:
    """What `fold` did: folded (layer, bn) pairs and skipped BN layers with the reason.

    method is "fx" (pairs found on the traced graph) or "sequential" (the model did not
    trace: trace_error says why; pairs are adjacent children of nn.Sequential containers).
    With example_inputs, max_abs_diff / max_rel_diff compare the folded model's output with
    the unfolded eval model's (rel: divided by the largest |output|).
    """

    method: str
    folded: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    trace_error: str | None = None
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None

    def __str__(self) -> str:
        lines = [f"fold ({self.method}): {len(self.folded)} folded, {len(self.skipped)} skipped"]
        lines += [f"  folded {bn} into {layer}" for layer, bn in self.folded]
        lines += [f"  skipped {bn}: {why}" for bn, why in self.skipped]
        return "\n".join(lines)


class BNLeafTracer(fx.Tracer):
    """fx tracer that keeps every BN layer and every bnkit.nn module a leaf (call_module):
    bnkit layers call a custom op and must appear whole in the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (is_bn(m) or type(m).__module__.startswith("bnkit.nn")
                or super().is_leaf_module(m, qualname))


def fold(model: nn.Module, example_inputs=None, *, return_report: bool = False):
    """A new eval-mode model with every BN that directly follows a conv/linear folded into it.

    For each pair layer -> BN: W' = s W, b' = (b - mean) s + beta with
    s = gamma / sqrt(var + eps) (see `fold_weights`); the BN becomes nn.Identity. Pairs are
    found on the torch.fx graph (BN layers and bnkit modules traced as leaves), or, if the
    model does not trace, between adjacent children of nn.Sequential containers. A BN is left
    in place (and reported) when its input is not a conv/linear output, the conv's output is
    also used elsewhere, either module is called more than once, it is called with a mask,
    it has no running statistics, its channel axis is not the layer's output channel axis,
    or it fuses a non-identity activation. The original model is not modified.

    Args:
        model: any nn.Module.
        example_inputs: optional input tensor or tuple of positional inputs. When given,
            Linear outputs are checked to have their features on the BN's axis, and the
            folded model is compared with the eval model on them (report.max_abs_diff; a
            warning if they differ by more than 1e-4 relative). Default None.
        return_report: also return the `FoldReport`. Default False.

    Returns: the folded model (same class as `model`), or (model, FoldReport).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False),
        ...                           torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> folded, report = fold(net, return_report=True)
        >>> type(folded[1]).__name__, report.folded
        ('Identity', [('0', '1')])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects an nn.Module (got {type(model).__name__}); pass the model")
    inputs = _as_args(example_inputs)
    work = working_copy(model, "fold").eval()
    ranks, ref = _probe(work, inputs) if inputs is not None else ({}, None)
    report = find_pairs(work, ranks)
    with torch.no_grad():
        for layer_name, bn_name in report.folded:
            _fold_pair(work, layer_name, bn_name)
    if inputs is not None:
        _compare(work, inputs, ref, report)
    return (work, report) if return_report else work


def find_pairs(model: nn.Module, ranks: dict[str, int] | None = None) -> FoldReport:
    """The (layer, bn) pairs `fold` would fold in `model`, and the BN layers it would skip."""
    ranks = ranks or {}
    try:
        graph = BNLeafTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any trace failure (control flow on data, ...)
        report = _sequential_pairs(model, ranks)
        report.trace_error = f"{type(e).__name__}: {e}"
        return report
    return _graph_pairs(model, graph, ranks)


def _graph_pairs(model, graph: fx.Graph, ranks) -> FoldReport:
    report = FoldReport("fx")
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    called = set()
    for node in graph.nodes:
        if node.op != "call_module" or not is_bn(get_module(model, node.target)):
            continue
        called.add(id(get_module(model, node.target)))
        reason, layer = _graph_problem(model, node, calls, ranks)
        if reason is None:
            report.folded.append((layer, node.target))
        else:
            report.skipped.append((node.target, reason))
    for name, m in _bn_sites(model):
        if id(m) not in called:
            report.skipped.append((name, "not called in forward (absent from the traced graph)"))
    return report


def _graph_problem(model, node: fx.Node, calls, ranks):
    """(reason, None) when the BN node cannot be folded, else (None, producing layer name)."""
    bn = get_module(model, node.target)
    if calls[node.target] > 1:
        return f"called {calls[node.target]} times", None
    if len(node.args) != 1 or node.kwargs:
        return "called with extra arguments (e.g. a mask)", None
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module":
        what = f"{src.op} {src.target}" if isinstance(src, fx.Node) else repr(src)
        return f"its input is not the output of a Conv/ConvTranspose/Linear module ({what})", None
    layer = get_module(model, src.target)
    if not isinstance(layer, _LAYERS):
        return (f"its input comes from {type(layer).__name__} '{src.target}', not a "
                "Conv/ConvTranspose/Linear"), None
    if calls[src.target] > 1:
        return f"its input layer '{src.target}' is called {calls[src.target]} times", None
    if len(src.users) > 1:
        others = ", ".join(str(u.name) for u in src.users if u is not node)
        return f"the output of '{src.target}' is also used elsewhere ({others})", None
    reason = _pair_problem(src.target, layer, bn, ranks)
    return (reason, None) if reason else (None, src.target)


def _pair_problem(layer_name, layer, bn, ranks) -> str | None:
    """Why this layer -> BN pair cannot be folded, or None."""
    if not has_running_stats(bn):
        return "it has no running statistics (track_running_stats=False): eval uses batch stats"
    if bn.running_mean.dim() != 1:
        return "it keeps per-step running statistics (one row per time step)"
    act = getattr(bn, "act", None)  # BatchNormAct: the activation as a module
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        name = getattr(bn, "fused", None) or type(act).__name__
        return f"it applies the activation {name!r} after normalizing, which a linear layer " \
            "cannot absorb"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.running_mean.numel() != out:
        return f"it has {bn.running_mean.numel()} channels but '{layer_name}' outputs {out}"
    axis = bn_axis(bn)
    rank = ranks.get(layer_name)
    if isinstance(layer, nn.Linear):
        # features are the last dim; without example_inputs a Linear output is taken as 2D
        ok = axis == -1 or axis == (rank or 2) - 1
    else:
        ok = axis == 1  # conv outputs (N, C, *)
    if not ok:
        return (f"its channel axis ({axis}) is not the feature axis of '{layer_name}' "
                f"({type(layer).__name__} output of rank {rank or '?'})")
    return None


def _sequential_pairs(model, ranks) -> FoldReport:
    report = FoldReport("sequential")
    names = module_names(model)
    paired = set()
    for site in walk(model):
        if not isinstance(site.module, nn.Sequential):
            continue
        kids = list(site.module.named_children())
        for (a, layer), (b, bn) in itertools.pairwise(kids):
            if not (is_bn(bn) and isinstance(layer, _LAYERS)):
                continue
            ln, bnn = _join(site.name, a), _join(site.name, b)
            paired.add(id(bn))
            shared = [n for n in (ln, bnn) if len(names[id(get_module(model, n))]) > 1]
            reason = (f"'{shared[0]}' is reachable under several names (shared)" if shared
                      else _pair_problem(ln, layer, bn, ranks))
            if reason:
                report.skipped.append((bnn, reason))
            else:
                report.folded.append((ln, bnn))
    for name, m in _bn_sites(model):
        if id(m) not in paired:
            report.skipped.append((name, _NOT_IN_CHAIN))
    return report


def _bn_sites(model):
    return [(s.name, s.module) for s in walk(model) if is_bn(s.module)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fold_pair(model, layer_name: str, bn_name: str) -> None:
    """Fold in place: new layer weight/bias, BN replaced by Identity under all its names."""
    layer, bn = get_module(model, layer_name), get_module(model, bn_name)
    w, b = fold_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                        getattr(bn, "weight", None), getattr(bn, "bias", None), bn_eps(bn),
                        transpose=isinstance(layer, _CONV_T))
    layer.weight.copy_(w)
    if layer.bias is None:
        layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(b)
    for name in module_names(model)[id(bn)]:
        replace_module(model, name, nn.Identity().eval())


def _as_args(example_inputs):
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of positional inputs (got "
                    f"{type(example_inputs).__name__}); wrap several inputs in a tuple")


def _probe(model, inputs):
    """Run the eval model once: output ranks of every Linear (by name) and the output."""
    ranks: dict[str, int] = {}
    hooks = [m.register_forward_hook(_rank_hook(ranks, name)) for name, m in
             model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return ranks, out


def _rank_hook(ranks, name):
    def hook(module, args, output):
        ranks[name] = output.dim()
    return hook


def _compare(model, inputs, ref, report: FoldReport) -> None:
    with torch.no_grad():
        out = model(*inputs)
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)):
        return
    diff = float((out.double() - ref.double()).abs().max()) if out.numel() else 0.0
    scale = float(ref.double().abs().max()) if ref.numel() else 0.0
    report.max_abs_diff, report.max_rel_diff = diff, diff / max(scale, 1e-30)
    if report.max_rel_diff > 1e-4:
        warnings.warn(f"fold: the folded model differs from the eval model by {diff:.3g} "
                      f"({report.max_rel_diff:.3g} relative) on example_inputs; inspect "
                      "report.folded for a pair whose conv output is reused outside the traced "
                      "graph", stacklevel=2)
