"""Test-time adaptation of BN models to a shifted domain: AdaBN, prior mixing, TENT.

* adabn (Li et al. 2016): the running statistics become the target-domain population
  statistics (`recalibrate` on target data).
* prior (Schneider et al. 2020): mean = N/(N+n) mean_s + n/(N+n) mean_t, and the same for
  the variance, N the prior strength (pseudo sample count of the source statistics) and n the
  target batch size.
* tent (Wang et al. 2021): BN layers normalize with batch statistics and only their affine
  parameters (gamma, beta) are trained, one optimizer step per batch, to minimize the mean
  entropy H(p) = -sum_k p_k log p_k of the predictions p = softmax(logits).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ._run import batches, call_model, check_run_args
from .recalibrate import (
    collect,
    count_layers,
    running_views,
    set_population,
    stat_layers,
    unbiased,
    write_population,
)
from .walk import bn_layers, is_frozen_bn, working_copy

METHODS = ("adabn", "prior", "tent")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the softmax entropy along dim 1: -sum_k p_k log p_k."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or \
            not logits.is_floating_point():
        got = (f"{logits.dim()}D {logits.dtype} tensor" if isinstance(logits, torch.Tensor)
               else type(logits).__name__)
        raise ValueError(f"tent needs floating-point logits of shape (N, K, ...) with classes on "
                         f"dim 1 (got {got}); pass forward=lambda model, batch: logits")
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def bn_affine_params(model: nn.Module) -> list[nn.Parameter]:
    """gamma and beta of every non-frozen BN layer, the only parameters TENT trains."""
    params = []
    for _, bn in bn_layers(model):
        if is_frozen_bn(bn):
            continue
        params += [p for p in (getattr(bn, "weight", None), getattr(bn, "bias", None))
                   if isinstance(p, nn.Parameter)]
    return params


def make_optimizer(optimizer, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """None -> Adam(lr=1e-3) (the TENT repository's CIFAR setting); a factory
    callable(params) -> Optimizer; or an Optimizer over BN affine parameters only."""
    if optimizer is None:
        return torch.optim.Adam(params, lr=1e-3)
    if isinstance(optimizer, torch.optim.Optimizer):
        allowed = {id(p) for p in params}
        bad = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]
               if id(p) not in allowed]
        if bad:
            raise ValueError(f"tent trains only the BN affine parameters of the model, but the "
                             f"optimizer also holds {len(bad)} other tensor(s) (shapes {bad[:3]})"
                             "; build it over bnkit.tools.bn_affine_params(model), or pass a "
                             "factory such as lambda params: torch.optim.SGD(params, lr=1e-3, "
                             "momentum=0.9) (with inplace=False adapt works on a copy, which "
                             "an optimizer over the original's parameters cannot drive)")
        return optimizer
    if callable(optimizer):
        return optimizer(params)
    raise TypeError(f"optimizer must be None, a torch.optim.Optimizer or a factory "
                    f"callable(params) -> Optimizer (got {type(optimizer).__name__})")


class Tent(nn.Module):
    """Online TENT: every forward adapts the model on the batch and returns its predictions.

    In each forward, BN layers normalize with the batch's statistics (running buffers are
    neither used nor updated) and the other modules run in eval mode; the mean prediction
    entropy is minimized by `steps` optimizer steps on the BN affine parameters only
    (gradients are taken for them alone, so no other parameter or .grad changes). The
    returned predictions are those of the last forward, before its update (as in the
    paper's code). Training flags and BN settings are restored after each forward.

    Args:
        model: the model to adapt, changed in place (its BN gamma and beta).
        optimizer: None (Adam, lr 1e-3), an Optimizer over `bn_affine_params(model)`, or a
            factory callable(params) -> Optimizer. Default None.
        steps: optimizer steps per forward (>= 1). Default 1.
        episodic: restore gamma, beta and the optimizer state after every forward, so each
            batch is adapted from the initial model. Default False.

    Shape: whatever the model takes; the output must be logits (N, K, ...).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
        ...                           torch.nn.Linear(8, 3))
        >>> tent = Tent(net)
        >>> tent(torch.randn(16, 4)).shape
        torch.Size([16, 3])
    """

    def __init__(self, model: nn.Module, optimizer=None, steps: int = 1,
                 episodic: bool = False) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Tent: steps must be a positive int, optimizer steps per batch "
                             f"(got {steps!r}); the paper uses steps=1")
        params = bn_affine_params(model)
        if not params:
            raise ValueError(f"Tent needs BN layers with affine parameters to train; "
                             f"{_no_affine(model)}")
        self.model, self.steps, self.episodic = model, steps, episodic
        self.params = params
        self.optimizer = make_optimizer(optimizer, params)
        self._initial = self._snapshot()

    def forward(self, *args, **kwargs):
        return self.adapt_batch(lambda m: m(*args, **kwargs))

    def adapt_batch(self, call: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """Adapt on one batch given as call(model) -> logits; returns the logits (detached)."""
        flags = [p.requires_grad for p in self.params]
        try:
            with batch_stats_mode(self.model), torch.enable_grad():
                for p in self.params:
                    p.requires_grad_(True)
                for _ in range(self.steps):
                    out = call(self.model)
                    self._step(out)
        finally:
            for p, f in zip(self.params, flags):
                p.requires_grad_(f)
        if self.episodic:
            self.reset()
        return out.detach()

    def _step(self, logits: torch.Tensor) -> None:
        loss = entropy(logits)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for p, g in zip(self.params, grads):
            p.grad = g
        self.optimizer.step()
        for p in self.params:
            p.grad = None

    def _snapshot(self):
        return ([p.detach().clone() for p in self.params],
                copy.deepcopy(self.optimizer.state_dict()))

    def reset(self) -> None:
        """Put gamma, beta and the optimizer state back to their values at construction."""
        values, opt_state = self._initial
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)
        self.optimizer.load_state_dict(copy.deepcopy(opt_state))


def _no_affine(model: nn.Module) -> str:
    """What the model holds instead of trainable BN affine parameters, and what to do."""
    found = bn_layers(model)
    frozen = [(n, m) for n, m in found if is_frozen_bn(m)]
    if frozen:
        return (f"found {count_layers(frozen, 'frozen BN layer')}, whose weight and bias are "
                "fixed buffers, and no trainable one: unfreeze them first with "
                "model = bnkit.unfreeze(model)")
    if found:
        return (f"found {count_layers(found, 'BN layer')} with affine=False: use BN layers with "
                "affine=True, or adapt(method='adabn'), which needs no parameters")
    return "found no BN layer in the model: tent adapts the BN layers of a model"


class batch_stats_mode:
    """Context: other modules in eval mode, BN layers in train mode with
    track_running_stats=False (batch statistics, buffers untouched); all restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.bns = [m for _, m in bn_layers(model) if not is_frozen_bn(m)]

    def __enter__(self):
        self.saved = [(m, m.training) for m in self.model.modules()]
        self.tracks = [(m, getattr(m, "track_running_stats", None)) for m in self.bns]
        self.model.eval()
        for m in self.bns:
            m.train()
            m.track_running_stats = False
        return self.model

    def __exit__(self, *exc):
        for m, t in self.tracks:
            m.track_running_stats = t
        for m, training in self.saved:
            m.training = training


def adapt(model: nn.Module, data, *, method: str = "adabn", prior: float = 16.0,
          batch_size: int | None = None, optimizer=None, steps: int = 1,
          num_batches: int | None = None, forward: Callable | None = None,
          progress: bool = True, inplace: bool = True) -> nn.Module:
    """Adapt a BN model to the domain of `data` (unlabelled target batches).

    Updates `model` in place and returns it, as the AdaBN and TENT reference code do; pass
    inplace=False to adapt a deep copy and leave `model` as it is. A failed call leaves the
    model as it was.

    adabn: running statistics := target population statistics (exactly `recalibrate`).

    prior: running := N/(N+n) * source + n/(N+n) * target, for mean and (unbiased) variance,
    with N = `prior`. Multi-batch data: in one pass in eval mode, each BN normalizes each
    batch with the mix of the source statistics and that batch's statistics (n = its leading
    size), as in the online method, so deeper layers see the inputs they get once adapted;
    the target statistics stored are those pooled over all batches (as in `recalibrate`),
    with n = `batch_size`, or the leading size of the first batch the layer saw.

    tent: one pass over the batches with `Tent` (steps optimizer steps per batch, BN in
    batch-statistics mode, only BN gamma/beta trained), then the running statistics are
    set to the target population statistics (a `recalibrate` pass over the same batches)
    so that the returned model works in ordinary eval mode with any batch size.

    Args:
        model: a model with BN layers (torch.nn or bnkit.nn).
        data: iterable of batches: tensors or (input, target) tuples; targets are unused.
        method: "adabn", "prior" or "tent". Default "adabn".
        prior: N, the prior strength for "prior" (>= 0). Default 16.
        batch_size: n for "prior"; default None (from the data).
        optimizer: for "tent": None (Adam lr 1e-3), a factory callable(params) -> Optimizer,
            or an Optimizer over bn_affine_params(model) (not with inplace=False: the copy
            has other parameters). Default None.
        steps: for "tent", optimizer steps per batch. Default 1.
        num_batches, forward, progress: as in `recalibrate`.
        inplace: adapt `model` itself (True, default) or a deep copy of it (False).

    Returns: the adapted model: `model` itself, or the copy when inplace=False.

    Raises: ValueError, naming what the model holds, when there is nothing to adapt (e.g.
    only frozen BN layers: unfreeze them with bnkit.unfreeze first); ValueError or TypeError
    for a bad argument (docs/tools/adapt.md lists them).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
        ...                           torch.nn.Linear(8, 3))
        >>> target = [torch.randn(32, 4) * 3 + 1 for _ in range(4)]
        >>> adapt(net, target, method="prior", prior=16, progress=False) is net
        True
    """
    check_run_args("adapt", model, data, num_batches, forward)
    _check_adapt_args(method, prior, batch_size)
    work = working_copy(model, "adapt", inplace)
    run = {"num_batches": num_batches, "forward": forward, "progress": progress}
    if method == "adabn":
        return set_population(work, data, tool="adapt", **run)
    if method == "prior":
        return _prior(work, data, float(prior), batch_size, **run)
    return _tent(work, data, optimizer, steps, **run)


def _check_adapt_args(method, prior, batch_size) -> None:
    if method not in METHODS:
        raise ValueError(f"adapt: unknown method {method!r}; expected one of "
                         f"{', '.join(repr(m) for m in METHODS)}")
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not prior >= 0:
        raise ValueError(f"adapt: prior must be a number >= 0, the pseudo sample count of the "
                         f"source statistics (got {prior!r}); Schneider et al. use 16")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"adapt: batch_size must be None (taken from the data) or a positive "
                         f"int, the target batch size n (got {batch_size!r})")


def mix(source: torch.Tensor, target: torch.Tensor, prior: float, n: int) -> torch.Tensor:
    """N/(N+n) * source + n/(N+n) * target, in float64."""
    w = prior / (prior + n)
    return w * source.to(torch.float64) + (1.0 - w) * target.to(torch.float64)


def _prior(model, data, prior, batch_size, *, num_batches, forward, progress):
    layers = stat_layers(model, "adapt")
    source = {n: (m.running_mean.detach().clone(), m.running_var.detach().clone())
              for n, m in layers.items()}

    def set_mixed(call):  # this batch: the eval-mode BN normalizes with the mix
        rm, rv = running_views(call.module, call.row)
        mean_s, var_s = _rows(source[call.name], call.row)
        n = call.x.shape[0]
        rm.copy_(mix(mean_s, call.stats.mean, prior, n))
        rv.copy_(mix(var_s, _unbiased_or_zero(call.stats), prior, n))

    def blend(key, mean_t, var_t):  # stored: source mixed with the pooled target statistics
        name, row = col.where[key]
        mean_s, var_s = _rows(source[name], row)
        n = batch_size or col.batch_size[key]
        return mix(mean_s, mean_t, prior, n), mix(var_s, var_t, prior, n)

    col = collect(model, data, layers, train=False, on_input=set_mixed, tool="adapt",
                  num_batches=num_batches, forward=forward, progress=progress)
    write_population(layers, col, "adapt", blend)
    return model


def _rows(pair, row):
    return pair if row is None else (pair[0][row], pair[1][row])


def _unbiased_or_zero(s) -> torch.Tensor:
    return unbiased(s) if float(s.count) > 1 else torch.zeros_like(s.var)


def _tent(model, data, optimizer, steps, *, num_batches, forward, progress):
    tent = Tent(model, optimizer, steps=steps)
    layers = stat_layers(model, "adapt", required=False)  # {}: no running statistics to set
    one_shot = isinstance(data, Iterator)  # cannot be read twice: keep the batches seen
    seen = []
    try:
        for batch in batches(data, num_batches, progress, "adapt (tent)"):
            seen.append(batch if one_shot else None)
            tent.adapt_batch(lambda m, b=batch: call_model(m, b, forward, "adapt"))
        if not seen:
            raise ValueError("adapt: data yielded no batches; pass a non-empty iterable of "
                             "batches")
        if layers:  # buffers are written last, only after the whole pass succeeded
            set_population(model, seen if one_shot else data, tool="adapt",
                           num_batches=num_batches, forward=forward, progress=False,
                           layers=layers)
    except BaseException:
        tent.reset()  # a failed call leaves gamma and beta as they were
        raise
    return model
