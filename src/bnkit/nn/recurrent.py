"""Recurrent BN (Cooijmans et al. 2016): per-time-step statistics, and the BN-LSTM built on it."""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from ..errors import BNDTypeError, BNShapeError, BNTypeError, BNValueError
from .base import NormBase


class RecurrentBatchNorm(NormBase, _BatchNorm):
    """Batch normalization with separate statistics for each time step, shared weight and bias.

    At step t, y = (x - mean_t) / sqrt(var_t + eps) * weight + bias, with (mean_t, var_t) the
    batch statistics of x in training and the running statistics of step min(t, max_steps - 1)
    in eval: step t keeps its own running_mean[t], running_var[t] and step counter, and steps
    past max_steps - 1 share the last ones (Cooijmans et al. 2016). The weight starts at 0.1
    (`weight_init`), as the paper recommends to keep tanh/sigmoid gates out of saturation.

    Args:
        num_features: C, the size of the channel dimension.
        max_steps: number of time steps with their own statistics (>= 1).
        eps, momentum, affine, track_running_stats: as in `BatchNorm` (1e-5, 0.1, True, True).
        axis: the channel dimension (default 1). bias: learn the shift (default True; the
            BN-LSTM uses False where a shared bias follows). weight_init: initial weight
            (default 0.1). Keyword-only.

    Buffers: running_mean, running_var (max_steps, C); num_batches_tracked (max_steps,).

    Shape: input (N, C, *) for axis=1, t an int >= 0; output the same shape.

    Example:
        >>> bn = RecurrentBatchNorm(8, max_steps=5)
        >>> ys = [bn(torch.randn(4, 8), t) for t in range(7)]   # steps 5 and 6 reuse step 4
        >>> bn.num_batches_tracked.tolist()
        [1, 1, 1, 1, 3]
    """

    def __init__(self, num_features: int, max_steps: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, axis: int = 1, bias: bool = True,
                 weight_init: float = 0.1, device=None, dtype=None) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise BNValueError(f"max_steps must be an int >= 1, the time steps with their own "
                               f"statistics (got {max_steps!r}); use the training sequence length")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis,
                         bias=bias, device=device, dtype=dtype)
        self.max_steps, self.weight_init = max_steps, weight_init
        if track_running_stats:  # one row of statistics per step
            fk = {"device": device, "dtype": dtype}
            self.running_mean = torch.zeros(max_steps, num_features, **fk)
            self.running_var = torch.ones(max_steps, num_features, **fk)
            self.num_batches_tracked = torch.zeros(max_steps, dtype=torch.long, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Running statistics (0, 1, 0 steps), weight to `weight_init`, bias to 0."""
        super().reset_parameters()
        if self.affine and hasattr(self, "weight_init"):
            nn.init.constant_(self.weight, self.weight_init)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_steps={self.max_steps}"

    def forward(self, input: torch.Tensor, t: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self._slot(t)
        momentum, step = self._momentum_and_step_at(s)
        rm, rv = self._running_buffers()
        rm, rv = (None, None) if rm is None else (rm[s], rv[s])  # (C,) views, updated in place
        counter = self.num_batches_tracked[s] if step else None  # a view: row s counts
        return F.counted_batch_norm(input, rm, rv, self.weight, self.bias,
                                    self._uses_batch_stats(), momentum, self.eps, self.axis,
                                    mask, "identity", counter)

    def _slot(self, t) -> int:
        """The statistics row of time step t: min(t, max_steps - 1)."""
        try:
            if isinstance(t, bool):
                raise TypeError
            step = operator.index(t)
        except TypeError:
            raise BNTypeError(f"the time step t must be an int >= 0 (got {t!r} of type "
                              f"{type(t).__name__}); call bn(x, t) with the index of the step "
                              "in the sequence") from None
        if step < 0:
            raise BNValueError(f"the time step t must be an int >= 0 (got {t!r}); call "
                               "bn(x, t) with the index of the step in the sequence")
        return min(step, self.max_steps - 1)

    def _momentum_and_step_at(self, s: int):
        """NormBase._momentum_and_step with the step counter of row s."""
        counting = self.training and self.track_running_stats
        if not counting or self.momentum is not None:
            return (0.0 if self.momentum is None else self.momentum), counting
        return 1.0 / float(self.num_batches_tracked[s] + 1), True


class BNLSTMCell(nn.Module):
    """One step of the batch-normalized LSTM (Cooijmans et al. 2016).

        (i, f, o, g) = BN_h(W_h h; gamma_h) + BN_x(W_x x; gamma_x) + b
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(BN_c(c'; gamma_c, beta_c))
    Each BN is a `RecurrentBatchNorm` (statistics per step t). BN_h and BN_x have no shift
    (beta_h = beta_x = 0): the shared bias b, with the forget gate's part at `forget_bias`,
    replaces them. W_h starts as four identity blocks and W_x orthogonal, as in the paper.

    Args:
        input_size, hidden_size: I and H.
        max_steps: time steps with their own statistics.
        gamma_init: initial BN weight (default 0.1). forget_bias: initial forget-gate bias
            (default 1.0). momentum, eps: of the three BN layers (0.1, 1e-5).

    Shape: x (N, I), state (h, c) each (N, H) -> (h', c').

    Example:
        >>> cell = BNLSTMCell(3, 5, max_steps=4)
        >>> h = c = torch.zeros(2, 5)
        >>> h, c = cell(torch.randn(2, 3), (h, c), t=0)
        >>> h.shape
        torch.Size([2, 5])
    """

    def __init__(self, input_size: int, hidden_size: int, max_steps: int, *,
                 gamma_init: float = 0.1, forget_bias: float = 1.0, momentum: float = 0.1,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.forget_bias = input_size, hidden_size, forget_bias
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        kw = {"eps": eps, "momentum": momentum, "weight_init": gamma_init}
        self.bn_ih = RecurrentBatchNorm(4 * hidden_size, max_steps, bias=False, **kw)
        self.bn_hh = RecurrentBatchNorm(4 * hidden_size, max_steps, bias=False, **kw)
        self.bn_c = RecurrentBatchNorm(hidden_size, max_steps, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        h = self.hidden_size
        nn.init.orthogonal_(self.weight_ih)
        with torch.no_grad():
            self.weight_hh.copy_(torch.eye(h).repeat(4, 1))  # identity per gate block
            self.bias.zero_()
            self.bias[h:2 * h].fill_(self.forget_bias)  # gate order (i, f, o, g)
        for bn in (self.bn_ih, self.bn_hh, self.bn_c):
            bn.reset_parameters()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
                t: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_step(x, state, t)
        h, c = state
        gates = (self.bn_hh(h @ self.weight_hh.t(), t) + self.bn_ih(x @ self.weight_ih.t(), t)
                 + self.bias)
        i, f, o, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.bn_c(c, t))
        return h, c

    def check_step(self, x, state, t, what: str = "x") -> None:
        """Every argument of a step checked before any BN runs (a failed call leaves every
        running statistic as it was): x (N, I) floating of the weights' dtype, state two
        (N, H) tensors, t an int >= 0, and N >= 2 in training (batch statistics)."""
        _check_tensor(what, x, 2, "(N, I)")
        n, size = x.shape
        if size != self.input_size:
            raise BNShapeError(f"{what} must have input_size = {self.input_size} features in "
                               f"its last dimension (got {size}, shape {tuple(x.shape)}); "
                               "pass input of the size the layer was built for")
        dt = self.weight_ih.dtype
        if x.dtype != dt:
            raise BNDTypeError(f"{what} must have the weights' dtype {dt} (got {x.dtype}); "
                               f"convert it with .to({dt}) or the model with .to({x.dtype})")
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise BNTypeError(f"state must be a tuple (h, c) of two (N, H) tensors (got "
                              f"{type(state).__name__}); pass (h, c) or None for zeros")
        for name, v in zip("hc", state):
            _check_tensor(name, v, 2, "(N, H)")
            if tuple(v.shape) != (n, self.hidden_size) or v.dtype != dt:
                raise BNShapeError(f"state {name} must be ({n}, {self.hidden_size}) of dtype "
                                   f"{dt}, matching {what}'s {n} rows and hidden_size (got "
                                   f"{tuple(v.shape)}, {v.dtype}); pass a state of this batch")
        self.bn_c._slot(t)
        if self.training and n < 2:
            raise BNValueError(f"expected more than 1 value per channel when training (got "
                               f"a batch of {n}); use a batch of at least 2, or call "
                               "model.eval()")


def _check_tensor(name, v, ndim, shape) -> None:
    if not isinstance(v, torch.Tensor):
        raise BNTypeError(f"{name} must be a torch.Tensor {shape} (got {type(v).__name__}); "
                          "convert it with torch.as_tensor(..., dtype=torch.float32)")
    if not v.is_floating_point():
        raise BNDTypeError(f"{name} must be floating point (got dtype {v.dtype}); convert "
                           "it first, e.g. .float()")
    if v.dim() != ndim:
        raise BNValueError(f"{name} must be {ndim}D {shape} (got {v.dim()}D of shape "
                           f"{tuple(v.shape)})")


class BNLSTM(nn.Module):
    """A one-layer batch-normalized LSTM over whole sequences (see `BNLSTMCell`).

    Args:
        input_size, hidden_size, max_steps: as in `BNLSTMCell`; keyword arguments go to it.
        batch_first: input (N, T, I) if True (default), else (T, N, I).

    Shape: x (N, T, I) -> output (N, T, H) and the last state (h, c), each (N, H).
    The initial state defaults to zeros.

    Example:
        >>> lstm = BNLSTM(28, 32, max_steps=28)
        >>> out, (h, c) = lstm(torch.randn(8, 28, 28))
        >>> out.shape, h.shape
        (torch.Size([8, 28, 32]), torch.Size([8, 32]))
    """

    def __init__(self, input_size: int, hidden_size: int, max_steps: int, *,
                 batch_first: bool = True, **cell_kwargs) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.cell = BNLSTMCell(input_size, hidden_size, max_steps, **cell_kwargs)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        layout = "(N, T, I)" if self.batch_first else "(T, N, I)"
        if not isinstance(x, torch.Tensor):
            raise BNTypeError(f"BNLSTM expects a torch.Tensor input {layout} (got "
                              f"{type(x).__name__}); convert it with torch.as_tensor(x, "
                              "dtype=torch.float32)")
        if x.dim() != 3:
            raise BNValueError(f"BNLSTM expects a 3D input (N, T, I) with batch_first, else "
                               f"(T, N, I) (got {x.dim()}D input of shape {tuple(x.shape)}); "
                               "add the missing batch or time dimension")
        steps = x.unbind(1 if self.batch_first else 0)
        if not steps:
            raise BNShapeError(f"BNLSTM expects a sequence of at least one step (got T = 0, "
                               f"input {layout} of shape {tuple(x.shape)}); drop empty "
                               "sequences before the call")
        if state is None:
            zeros = x.new_zeros(steps[0].shape[0], self.cell.hidden_size)
            state = (zeros, zeros)
        self.cell.check_step(steps[0], state, len(steps) - 1, "each step of x")
        outputs = []
        for t, xt in enumerate(steps):
            state = self.cell(xt, state, t)
            outputs.append(state[0])
        return torch.stack(outputs, 1 if self.batch_first else 0), state
