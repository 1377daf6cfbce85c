"""Masked BN across the family: equal to BN applied to the valid positions only (float64).

Layouts: (N, C, L) with an (N, L) mask from sequence lengths (axis=1), and channels-last
(N, L, C) with axis=-1. Oracles run torch BN (or the unmasked layer, itself tested against
its formula) on the valid positions gathered into a (total, C) tensor.
"""

import copy

import pytest
import torch

from bnkit.nn import BatchNorm, BatchNormAct, BatchRenorm, GhostBatchNorm

D = torch.float64
C, N, L = 3, 6, 7
LENGTHS = torch.tensor([7, 3, 5, 1, 6, 2])


def data(axis):
    """(x, mask): padded positions hold huge values, which must not leak into statistics."""
    torch.manual_seed(0)
    mask = torch.arange(L)[None, :] < LENGTHS[:, None]  # (N, L)
    x = torch.randn(N, C, L, dtype=D) * 2 + 1
    x = x.masked_fill(~mask[:, None, :], 1e6)
    return (x if axis == 1 else x.transpose(1, 2).contiguous()), mask


def valid(t, mask, axis):
    """The valid positions of t as (total, C), in row-major order of (N, L)."""
    return t.movedim(axis, -1)[mask]


def set_affine(m):
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.5, 2.0], dtype=D))
        m.bias.copy_(torch.tensor([0.1, -0.3, 1.0], dtype=D))
    return m


def run_masked(m, x, mask, axis, g):
    """Forward with the mask, loss on valid outputs only -> (y, dx, dweight, dbias)."""
    x = x.clone().requires_grad_(True)
    y = m(x, mask=mask)
    (valid(y, mask, axis) * g).sum().backward()
    return y, x.grad, m.weight.grad, m.bias.grad


def run_oracle(fn, xv, w, b, g):
    """The oracle fn(xv) on the valid positions (total, C), with leaves w and b.
    -> (yv, dxv, dweight, dbias)."""
    xv = xv.clone().requires_grad_(True)
    y = fn(xv)
    (y * g).sum().backward()
    return y, xv.grad, w.grad, b.grad


def leaves(m):
    """Copies of m's weight and bias as fresh leaves for an oracle."""
    return (m.weight.detach().clone().requires_grad_(True),
            m.bias.detach().clone().requires_grad_(True))


def check(m, fn, axis, w, b, pad=None):
    """m on masked data (padding set to `pad` when given) against torch's BN `fn` on the valid
    positions: valid outputs, dx, dweight, dbias; padding gets exactly no gradient."""
    x, mask = data(axis)
    if pad is not None:
        xm = x.movedim(axis, -1).clone()
        xm[~mask] = pad
        x = xm.movedim(-1, axis).contiguous()
    g = torch.randn(int(mask.sum()), C, dtype=D)
    y, dx, dw, db = run_masked(m, x, mask, axis, g)
    yv, dxv, dwv, dbv = run_oracle(fn, valid(x, mask, axis), w, b, g)
    close = {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(valid(y, mask, axis), yv, **close)
    torch.testing.assert_close(valid(dx, mask, axis), dxv, **close)
    # padding gets exactly no gradient from a loss on valid outputs
    assert torch.equal(dx.movedim(axis, -1)[~mask], torch.zeros(int((~mask).sum()), C,
                                                                dtype=D))
    torch.testing.assert_close(dw, dwv, **close)
    torch.testing.assert_close(db, dbv, **close)
    return x, mask, y


def bn_oracle(m, act=lambda z: z):
    """torch BN (float64) with m's affine and momentum -> (running buffers, fn, w, b)."""
    rm, rv = torch.zeros(C, dtype=D), torch.ones(C, dtype=D)
    w, b = leaves(m)

    def fn(xv):
        return act(torch.nn.functional.batch_norm(xv, rm, rv, w, b, True, m.momentum, m.eps))
    return (rm, rv), fn, w, b


@pytest.mark.parametrize("axis", [1, -1])
def test_batchnorm(axis):
    m = set_affine(BatchNorm(C, momentum=0.2, axis=axis, dtype=D))
    (rm, rv), fn, w, b = bn_oracle(m)
    x, mask, y = check(m, fn, axis, w, b)
    torch.testing.assert_close(m.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, rv, rtol=1e-12, atol=1e-12)
    # padded positions are normalized with the same (valid-only) statistics
    xv = valid(x, mask, axis)
    mean, var = xv.mean(0), xv.var(0, unbiased=False)
    pad = x.movedim(axis, -1)[~mask]
    expected = (pad - mean) / torch.sqrt(var + m.eps) * m.weight + m.bias
    torch.testing.assert_close(y.movedim(axis, -1)[~mask], expected.detach(), rtol=1e-9,
                               atol=1e-6)


@pytest.mark.parametrize("axis", [1, -1])
def test_batchnorm_act(axis):
    m = set_affine(BatchNormAct(C, act="silu", axis=axis, dtype=D))
    (_, rv), fn, w, b = bn_oracle(m, act=torch.nn.functional.silu)
    check(m, fn, axis, w, b)
    torch.testing.assert_close(m.running_var, rv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", [1, -1])
def test_batch_renorm(axis):
    def renorm(**kw):
        r = set_affine(BatchRenorm(C, momentum=0.1, r_max=1.5, d_max=0.5, dtype=D, **kw))
        r.running_mean.fill_(0.5)
        r.running_var.fill_(9.0)  # r and d clip for some channels
        return r

    m, ref = renorm(axis=axis), renorm(axis=-1)  # ref: unmasked, on the valid positions
    check(m, ref, axis, ref.weight, ref.bias)
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", [1, -1])
def test_ghost(axis):
    m = set_affine(GhostBatchNorm(C, 3, momentum=0.2, axis=axis, dtype=D))
    x, mask = data(axis)
    per_sample = mask.sum(1).tolist()
    rows = [sum(per_sample[:3]), sum(per_sample[3:])]  # valid positions of chunks 0 and 1

    w, b = leaves(m)

    def fn(xv):  # torch BN on the valid positions of each chunk of 3 sequences
        return torch.cat([torch.nn.functional.batch_norm(part, None, None, w, b, True)
                          for part in xv.split(rows)])
    check(m, fn, axis, w, b)
    xv = valid(x, mask, axis)  # running stats: merged chunk stats = all valid positions
    torch.testing.assert_close(m.running_mean, 0.2 * xv.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, 0.8 + 0.2 * xv.var(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad", [float("nan"), float("inf"), -float("inf"), 1e300],
                         ids=["nan", "inf", "-inf", "1e300"])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("act", ["identity", "relu", "silu"])
def test_padding_value_never_leaks(bn_path, pad, axis, act):
    """NaN or Inf at padded positions changes nothing valid: running statistics, valid
    outputs, and the gradients of weight, bias and the valid inputs equal torch's BN on the
    valid positions (they were all NaN before: the padding was multiplied by the mask).
    The padded positions' own outputs are whatever their value gives (NaN in, NaN out)."""
    m = set_affine(BatchNormAct(C, act=act, momentum=0.2, axis=axis, dtype=D))
    fn_act = {"identity": lambda z: z, "relu": torch.relu,
              "silu": torch.nn.functional.silu}[act]
    (rm, rv), fn, w, b = bn_oracle(m, act=fn_act)
    check(m, fn, axis, w, b, pad)
    torch.testing.assert_close(m.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, rv, rtol=1e-12, atol=1e-12)


def test_padding_with_a_gradient_still_gets_its_exact_share():
    """Padded outputs are normalized with the batch statistics, so a loss on them reaches
    weight, bias and the valid inputs: the where-selection keeps those terms exact (float64
    gradcheck with a loss on every output, finite padding)."""
    x, mask = data(1)
    x = x.masked_fill(~mask[:, None, :], 0.7)[:3, :, :4].clone().requires_grad_(True)
    mask = mask[:3, :4]
    w = torch.tensor([0.5, 1.5, 2.0], dtype=D, requires_grad=True)
    b = torch.tensor([0.1, -0.3, 1.0], dtype=D, requires_grad=True)
    from bnkit.functional import batch_norm
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm(x, None, None, w, b, True, mask=mask), (x, w, b))


@pytest.mark.parametrize("make", [lambda: BatchNorm(C), lambda: BatchRenorm(C),
                                  lambda: BatchNormAct(C), lambda: GhostBatchNorm(C, 3)],
                         ids=["batchnorm", "renorm", "act", "ghost"])
def test_mask_errors_leave_state_unchanged(make):
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(N, C, L)
    with pytest.raises(ValueError, match=r"more than 1 value per channel .*got 0 valid "
                                         r"\(unmasked\) values"):
        m(x, mask=torch.zeros(N, L, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must cover the input's non-channel dimensions: "
                                         r"expected a shape broadcastable to \(6, 7\) .*got "
                                         r"\(7, 6\)"):
        m(x, mask=torch.ones(L, N, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a boolean tensor.*got dtype "
                                        r"torch.int64"):
        m(x, mask=torch.ones(N, L, dtype=torch.long))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_broadcast_mask_equals_dropping_the_masked_column():
    m, ref = GhostBatchNorm(C, 3, dtype=D), GhostBatchNorm(C, 3, dtype=D)
    x = torch.randn(N, C, L, dtype=D)
    mask = torch.ones(1, L, dtype=torch.bool)
    mask[0, -1] = False  # (1, L): the last position of every sequence is padding
    torch.testing.assert_close(m(x, mask=mask)[..., :-1], ref(x[..., :-1]), rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


def test_eval_ignores_the_mask():
    m = BatchNorm(C)
    m(torch.randn(N, C, L) + 3)
    m.eval()
    x, mask = torch.randn(N, C, L), torch.rand(N, L) > 0.5
    torch.testing.assert_close(m(x, mask=mask), m(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", [lambda: BatchNorm(C), lambda: BatchRenorm(C, r_max=1.5),
                                  lambda: BatchNormAct(C, act="gelu"),
                                  lambda: GhostBatchNorm(C, 3)],
                         ids=["batchnorm", "renorm", "act", "ghost"])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_float32_matches_cpu_float64(make, masked):
    cpu = set_affine(make().double())
    gpu = copy.deepcopy(cpu).float().cuda()
    x, mask = data(1)
    x = x.masked_fill(~mask[:, None, :], 0.0)
    mask = mask if masked else None
    g = torch.randn_like(x)
    results = []
    for m, dt, dev in ((cpu, D, "cpu"), (gpu, torch.float32, "cuda")):
        xi = x.to(dev, dt).requires_grad_(True)
        y = m(xi, mask=None if mask is None else mask.to(dev))
        y.backward(g.to(dev, dt))
        results.append([t.detach().double().cpu() for t in (y, xi.grad, m.weight.grad,
                                                                m.running_mean, m.running_var)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
