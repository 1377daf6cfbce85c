"""GhostBatchNorm (Hoffer et al. 2017): BN statistics over small virtual batches of a big batch."""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from ..functional import record_step
from ..functional.autograd import bn_apply
from ..functional.checks import validate_call
from ..functional.export import refuse_trace
from ..functional.stats import Stats, merge_many
from .base import NormBase


def chunk_sizes(n: int, virtual_batch_size: int) -> list[int]:
    """Sizes of the consecutive chunks of a batch of n: full chunks, then the remainder.

    A remainder of one sample is merged into the previous chunk (one sample alone has no
    spread to normalize by): chunk_sizes(9, 4) == [4, 5], chunk_sizes(10, 4) == [4, 4, 2].
    """
    full, rem = divmod(n, virtual_batch_size)
    sizes = [virtual_batch_size] * full
    if rem == 1 and full:
        sizes[-1] += 1
    elif rem:
        sizes.append(rem)
    return sizes


class GhostBatchNorm(NormBase, _BatchNorm):
    """Ghost batch normalization: each chunk of `virtual_batch_size` samples is normalized
    with its own statistics (Hoffer, Hubara & Soudry 2017).

    In training, the batch (dim 0) is cut into consecutive chunks B_g of `virtual_batch_size`
    samples and y = (x - mean_g) / sqrt(var_g + eps) * weight + bias with (mean_g, var_g) the
    biased statistics of x's chunk, per channel. The gradient of each chunk is BN's, within
    the chunk. The running statistics move once per call towards the merged statistics of
    all chunks (Chan's merge: exactly the whole batch's mean and unbiased variance); tf.keras
    instead averages the chunk variances, which leaves out the spread of the chunk means.
    A batch that is not a multiple of `virtual_batch_size` ends with a smaller chunk; a
    trailing chunk of one sample joins the previous chunk (see `chunk_sizes`). Eval is
    plain BN with the running statistics.

    Equal chunks run as one call of the core op: (G*v, C, *) is viewed as (v, G*C, *), so
    each (chunk, channel) pair is a channel. With a mask, chunks run one call each.

    Args:
        num_features: C, the size of the channel dimension.
        virtual_batch_size: samples per chunk (>= 2).
        eps, momentum, affine, track_running_stats: as in `BatchNorm` (1e-5, 0.1, True, True).
        axis: the channel dimension (default 1; never 0, the batch dimension). bias: learn
            the shift (default True). Keyword-only.

    Shape: input (N, C, *) for axis=1 with the batch at dim 0; output the same shape.

    Example:
        >>> bn = GhostBatchNorm(4, virtual_batch_size=8)
        >>> y = bn(torch.randn(32, 4, 5) * 3 + 2)
        >>> torch.allclose(y[:8].mean((0, 2)), torch.zeros(4), atol=1e-5)   # chunk 0 is centred
        True
    """

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, axis: int = 1, bias: bool = True,
                 device=None, dtype=None) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) \
                or virtual_batch_size < 2:
            raise ValueError(f"virtual_batch_size must be an int >= 2, the samples per chunk "
                             f"(got {virtual_batch_size!r}); the paper uses 128")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis,
                         bias=bias, device=device, dtype=dtype)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this (nn/export.py)
            return self._scripted(input, chunked=True)
        if not self._uses_batch_stats():  # eval: plain BN with the running statistics
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps, axis=self.axis, mask=mask)
        if torch.jit.is_tracing():  # per-chunk statistics do not lower (functional/export.py)
            refuse_trace("GhostBatchNorm in training mode (got training=True)")
        momentum, step = self._momentum_and_step()
        rm, rv = self._running_buffers()
        axis = validate_call(input, rm, rv, self.weight, self.bias, True, momentum, self.eps,
                             self.axis, mask, "identity")
        if input.numel() == 0:  # empty output, nothing counted
            return F.batch_norm(input, None, None, self.weight, self.bias, True, axis=axis)
        mask = self._full_mask(input, mask, axis)
        sizes = chunk_sizes(input.shape[0], self.virtual_batch_size)
        _check_chunk_counts(input, mask, sizes, axis)
        y, merged = self._normalize_chunks(input, mask, sizes, axis)
        record_step(rm, rv, merged.mean, merged.var, merged.count, momentum,
                    self.num_batches_tracked if step else None)
        return y

    def _full_mask(self, x, mask, axis):
        """The mask expanded to x's non-channel shape (N, *), so it can be cut into chunks."""
        if axis == 0:
            raise ValueError(f"GhostBatchNorm chunks the batch dimension 0, so the channel "
                             f"axis cannot be 0 (got axis={self.axis} for input of shape "
                             f"{tuple(x.shape)}); put the batch first, e.g. (N, C, *)")
        if mask is None:
            return None
        return mask.expand([s for d, s in enumerate(x.shape) if d != axis])

    def _normalize_chunks(self, x, mask, sizes, axis):
        """-> (y, merged Stats). Runs of equal chunks fold into one core call (unmasked)."""
        ys, means, vars_, counts = [], [], [], []
        start = 0
        for size, groups in _runs(sizes, mask is not None):
            stop = start + size * groups
            m = None if mask is None else mask[start:stop]
            y, mean, var, n = _fold_bn(x[start:stop], m, groups, axis, self.weight, self.bias,
                                       self.eps)
            for out, item in zip((ys, means, vars_, counts), (y, mean, var, n)):
                out.append(item)
            start = stop
        parts = torch.stack([torch.cat(means), torch.cat(vars_)], 1)  # (P, 2, C)
        merged = merge_many(parts, torch.cat(counts))
        return torch.cat(ys), Stats(merged.count[0], merged.mean, merged.var)


def _runs(sizes: list[int], masked: bool) -> list[tuple[int, int]]:
    """(chunk size, number of chunks) for consecutive equal chunks; every chunk alone if
    masked (the mask differs between chunks, and the core takes one mask for all channels)."""
    runs: list[list[int]] = []
    for s in sizes:
        if runs and not masked and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return [tuple(r) for r in runs]


def _fold_bn(x, mask, groups, axis, weight, bias, eps):
    """BN of `groups` equal chunks of x in one core call.

    (G*v, ..., C, ...) -> (v, ..., G*C, ...): channel g*C + c is channel c of chunk g, so the
    weight and bias repeat G times. -> (y, mean (G, C), var (G, C), count (G,)).
    """
    if groups == 1:
        y, mean, var, n, _ = bn_apply(x, weight, bias, None, None, mask, True, eps, axis)
        return y, mean[None], var[None], n[None]
    c, v = x.shape[axis], x.shape[0] // groups
    xf = x.reshape(groups, v, *x.shape[1:]).movedim(0, axis).flatten(axis, axis + 1)
    w = None if weight is None else weight.repeat(groups)
    b = None if bias is None else bias.repeat(groups)
    y, mean, var, n, _ = bn_apply(xf, w, b, None, None, None, True, eps, axis)
    y = y.unflatten(axis, (groups, c)).movedim(axis, 0).reshape(x.shape)
    return y, mean.view(groups, c), var.view(groups, c), n.expand(groups)


def _check_chunk_counts(x, mask, sizes, axis) -> None:
    """Every chunk needs more than one (valid) value per channel, as BN in training."""
    if mask is None:
        per_sample = x[0].numel() // x.shape[axis]
        counts = [s * per_sample for s in sizes]
    else:
        per_sample = mask.reshape(len(mask), -1).sum(1)
        counts = torch.stack([p.sum() for p in per_sample.split(sizes)]).tolist()  # one sync
    for g, (size, n) in enumerate(zip(sizes, counts)):
        if n <= 1:
            what = "valid (unmasked) values" if mask is not None else "values"
            raise ValueError(f"GhostBatchNorm needs more than 1 value per channel in every "
                             f"chunk when training (got {n} {what} in chunk {g} of {size} "
                             f"samples, input shape {tuple(x.shape)}); use a larger batch or "
                             "virtual_batch_size, fewer masked positions, or call model.eval()")
