"""bnkit.functional.batch_norm against torch (float64) and against BN's formula by hand."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bnkit.functional as BF
from bnkit.functional.stats import Stats

TF = torch.nn.functional
F64 = torch.float64
SHAPES = [(6, 3), (4, 3, 5), (2, 3, 4, 3), (2, 3, 2, 3, 2)]
ACTS = {"identity": lambda z: z, "relu": torch.relu, "silu": TF.silu, "gelu": TF.gelu}


def rand(*shape, seed=0, dtype=F64, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * scale + offset


def affine_params(c, seed=1):
    return rand(c, seed=seed).abs() + 0.5, rand(c, seed=seed + 1)


def running(c, seed=2):
    return rand(c, seed=seed), rand(c, seed=seed + 1).abs() + 0.5


# ---------------------------------------------------------------- parity with torch, float64

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training,with_running", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_float64(shape, training, with_running, affine):
    c = shape[1]
    x = rand(*shape, scale=2.0, offset=0.5)
    w, b = affine_params(c) if affine else (None, None)
    rm, rv = running(c) if with_running else (None, None)
    outs = []
    for fn in (BF.batch_norm, TF.batch_norm):
        xi = x.clone().requires_grad_()
        wi, bi = [None if t is None else t.clone().requires_grad_() for t in (w, b)]
        rmi, rvi = [None if t is None else t.clone() for t in (rm, rv)]
        y = fn(xi, rmi, rvi, wi, bi, training, 0.3, 1e-3)
        y.backward(rand(*shape, seed=9))
        outs.append([y, xi.grad, rmi, rvi] + ([wi.grad, bi.grad] if affine else []))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    if with_running and not training:
        torch.testing.assert_close(outs[0][2], rm, atol=0, rtol=0)  # eval leaves buffers


def test_running_stats_none_in_training_uses_batch_stats_only():
    x = rand(5, 2, 3, offset=4.0)
    y = BF.batch_norm(x, None, None, training=True, eps=0.0)
    want = (x - x.mean((0, 2), keepdim=True)) / x.var((0, 2), unbiased=False, keepdim=True).sqrt()
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_fused_activation_equals_activation_of_output(act):
    x, (w, b) = rand(4, 3, 5), affine_params(3)
    y = BF.batch_norm(x, None, None, w, b, True, act=act)
    torch.testing.assert_close(y, ACTS[act](TF.batch_norm(x, None, None, w, b, True)),
                               atol=1e-12, rtol=1e-12)


def test_primitives_compose_to_torch_gradient():
    """backward_reduce then backward_elemt (the split sync/ghost BN use) equal torch's dx."""
    x, dy, (w, _) = rand(6, 3, 4), rand(6, 3, 4, seed=5), affine_params(3)
    bs = BF.batch_stats(x, 1)
    invstd = torch.rsqrt(bs.var + 1e-5)
    sum_dy, sum_dy_xmu = BF.backward_reduce(dy, x, bs.mean, 1)
    dx = BF.backward_elemt(dy, x, bs.mean, invstd, w, sum_dy, sum_dy_xmu, bs.count, 1)
    xr = x.clone().requires_grad_()
    TF.batch_norm(xr, None, None, w, None, True).backward(dy)
    torch.testing.assert_close(dx, xr.grad, atol=1e-12, rtol=1e-10)
    dweight, dbias = BF.grad_affine(sum_dy, sum_dy_xmu, invstd)
    torch.testing.assert_close(dbias, dy.sum((0, 2)), atol=1e-12, rtol=1e-12)
    xhat = (x - bs.mean[:, None]) * invstd[:, None]
    torch.testing.assert_close(dweight, (dy * xhat).sum((0, 2)), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- gradcheck / gradgradcheck

def _grad_cases():
    """(training, affine, masked, act): every combination for identity; for each fused
    activation the three that reach distinct code (train+affine, train+mask, eval)."""
    cases = [(t, a, m, "identity") for t in (True, False) for a in (True, False)
             for m in (False, True) if t or not (m and not a)]
    for act in ("relu", "silu", "gelu"):
        cases += [(True, True, False, act), (True, False, True, act), (False, True, False, act)]
    return cases


@pytest.mark.parametrize("training,affine,masked,act", _grad_cases(),
                         ids=lambda v: {True: "T", False: "F"}.get(v, v))
def test_gradcheck_and_gradgradcheck(training, affine, masked, act):
    x = rand(4, 3, 3, seed=11, scale=1.5).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    rm, rv = running(3)
    params = [t.requires_grad_() for t in affine_params(3)] if affine else []

    def fn(x, *wb):
        w, b = wb if wb else (None, None)
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3,
                             mask=mask if masked else None, act=act)

    inputs = (x, *params)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# ---------------------------------------------------------------- property test vs the formula

def formula(x, axis, w, b, rm, rv, training, momentum, eps):
    """BN by hand in float64: channels last, flatten, mean, biased var, normalize, affine.

    Returns (y, new running mean, new running var); the running var gets var * n / (n - 1).
    """
    xc = x.to(F64).movedim(axis, -1)
    flat = xc.reshape(-1, xc.shape[-1])
    n = flat.shape[0]
    if training:
        mean = flat.sum(0) / n
        var = ((flat - mean) ** 2).sum(0) / n
        rm = (1 - momentum) * rm + momentum * mean
        rv = (1 - momentum) * rv + momentum * var * n / (n - 1)
    else:
        mean, var = rm, rv
    y = (xc - mean) / torch.sqrt(var + eps) * w + b
    return y.movedim(-1, axis), rm, rv


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_property_random_shapes_axes_dtypes(data):
    rank = data.draw(st.integers(2, 5), label="rank")
    shape = data.draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank), label="shape")
    axis = data.draw(st.integers(-rank, rank - 1), label="axis")
    c = shape[axis]
    assume(math.prod(shape) // c >= 2)
    dtype = data.draw(st.sampled_from([torch.float32, F64]), label="dtype")
    training = data.draw(st.booleans(), label="training")
    momentum = data.draw(st.floats(0.0, 1.0), label="momentum")
    offset = data.draw(st.floats(-100, 100), label="offset")
    scale = data.draw(st.floats(0.1, 10), label="scale")
    seed = data.draw(st.integers(0, 2**16), label="seed")

    x = rand(*shape, seed=seed, scale=scale, offset=offset).to(dtype).requires_grad_()
    w, b = [t.to(dtype).requires_grad_() for t in affine_params(c, seed + 1)]
    rm0, rv0 = rand(c, seed=seed + 3) + offset, rand(c, seed=seed + 4).abs() * scale**2 + 0.1
    rm, rv = rm0.to(dtype, copy=True), rv0.to(dtype, copy=True)
    y = BF.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5, axis=axis)

    xo, wo, bo = [t.detach().to(F64).requires_grad_() for t in (x, w, b)]
    yo, rmo, rvo = formula(xo, axis, wo, bo, rm0.to(dtype).to(F64), rv0.to(dtype).to(F64),
                           training, momentum, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert y.dtype == dtype and rm.dtype == dtype
    torch.testing.assert_close(y.to(F64), yo, atol=tol, rtol=tol)
    torch.testing.assert_close(rm.to(F64), rmo, atol=tol, rtol=tol)
    torch.testing.assert_close(rv.to(F64), rvo, atol=tol, rtol=tol)
    dy = rand(*shape, seed=seed + 5)
    y.backward(dy.to(dtype))
    yo.backward(dy)
    for got, want in ((x.grad, xo.grad), (w.grad, wo.grad), (b.grad, bo.grad)):
        scale_g = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.to(F64), want, atol=tol * scale_g * 10, rtol=tol * 10)


# ---------------------------------------------------------------- masked batch norm

def padded_batch(seed=0):
    """(N, C, L) input with per-sample lengths, its (N, L) mask and the valid rows (M, C)."""
    lengths = torch.tensor([5, 2, 4, 1])
    x = rand(4, 3, 5, seed=seed, scale=2.0, offset=1.0)
    mask = torch.arange(5)[None, :] < lengths[:, None]
    return x, mask, x.transpose(1, 2)[mask]


def test_masked_statistics_equal_statistics_of_valid_positions():
    x, mask, valid = padded_batch()
    count, mean, var = BF.batch_stats(x, 1, mask[:, None, :])
    assert int(count) == valid.shape[0] == 12
    torch.testing.assert_close(mean, valid.mean(0), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(var, valid.var(0, unbiased=False), atol=1e-13, rtol=1e-13)


def test_masked_bn_equals_bn_of_valid_positions():
    """Outputs at valid positions, running stats (unbiased with the valid count) and the
    gradients of a loss over valid outputs equal torch's BN on the valid rows alone."""
    x, mask, valid = padded_batch()
    (w, b), (rm, rv) = affine_params(3), running(3)
    xb, wb, bb = [t.clone().requires_grad_() for t in (x, w, b)]
    rmb, rvb = rm.clone(), rv.clone()
    y = BF.batch_norm(xb, rmb, rvb, wb, bb, True, 0.2, 1e-5, mask=mask)
    vt, wt, bt = [t.clone().requires_grad_() for t in (valid, w, b)]
    yt = TF.batch_norm(vt, rm, rv, wt, bt, True, 0.2, 1e-5)  # rm, rv updated in place
    torch.testing.assert_close(y.transpose(1, 2)[mask], yt, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rmb, rm, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(rvb, rv, atol=1e-13, rtol=1e-13)
    g = rand(*yt.shape, seed=7)
    (y.transpose(1, 2)[mask] * g).sum().backward()
    yt.backward(g)
    torch.testing.assert_close(xb.grad.transpose(1, 2)[mask], vt.grad, atol=1e-12, rtol=1e-10)
    assert torch.equal(xb.grad.transpose(1, 2)[~mask], torch.zeros(int((~mask).sum()), 3,
                                                                   dtype=F64))
    torch.testing.assert_close(wb.grad, wt.grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(bb.grad, bt.grad, atol=1e-12, rtol=1e-10)


def test_masked_padded_positions_use_the_same_statistics():
    x, mask, valid = padded_batch()
    y = BF.batch_norm(x, training=True, eps=0.0, mask=mask)
    mean, std = valid.mean(0), valid.std(0, unbiased=False)
    torch.testing.assert_close(y, (x - mean[:, None]) / std[:, None], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape,mask_shape", [((4, 3, 5), (1, 5)), ((4, 3, 5), (4, 1)),
                                              ((3, 2, 4, 5), (3, 1, 5)),
                                              ((3, 4, 5, 2), (1, 4, 5))])
def test_broadcastable_mask_equals_expanded_mask(shape, mask_shape):
    axis = 1 if shape[-1] != 2 else -1
    x = rand(*shape, seed=3, offset=2.0)
    mask = rand(*mask_shape, seed=4) > -0.5
    full = mask.expand(tuple(s for d, s in enumerate(shape) if d != axis % len(shape)))
    assert int(full.sum()) >= 2  # enough valid values to train on (fixed seeds)
    outs = []
    for m in (mask, full.clone()):
        xi = x.clone().requires_grad_()
        rm, rv = running(shape[axis])
        y = BF.batch_norm(xi, rm, rv, None, None, True, 0.5, axis=axis, mask=m)
        y.backward(rand(*shape, seed=5))
        outs.append((y, xi.grad, rm, rv))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-13)
    # and both equal BN of the valid positions
    valid = x.movedim(axis, -1)[full]
    torch.testing.assert_close(outs[0][2], 0.5 * running(shape[axis])[0] + 0.5 * valid.mean(0),
                               atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- merging partial statistics

def test_merge_stats_equals_stats_of_concatenation():
    a, b = rand(7, 3, 2, seed=1, offset=5.0), rand(4, 3, 2, seed=2, scale=3.0)
    merged = BF.merge_stats(BF.batch_stats(a), BF.batch_stats(b))
    whole = BF.batch_stats(torch.cat([a, b]))
    for got, want in zip(merged, whole):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_merge_stats_with_an_empty_part_is_neutral():
    a = BF.batch_stats(rand(5, 3, seed=1, offset=2.0))
    empty = Stats(torch.tensor(0.0, dtype=F64), torch.zeros(3, dtype=F64),
                  torch.zeros(3, dtype=F64))
    for merged in (BF.merge_stats(a, empty), BF.merge_stats(empty, a)):
        for got, want in zip(merged, a):
            torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("per_channel_counts", [False, True])
def test_merge_many_equals_stats_of_concatenation(per_channel_counts):
    chunks = [rand(n, 3, seed=n, offset=n * 10.0, scale=n) for n in (3, 6, 2, 5)]
    stats = [BF.batch_stats(ch) for ch in chunks]
    parts = torch.stack([torch.stack([s.mean, s.var]) for s in stats])  # (P, 2, C)
    counts = torch.stack([s.count for s in stats])
    if per_channel_counts:
        counts = counts[:, None].expand(-1, 3)
    merged = BF.merge_many(parts, counts)
    whole = BF.batch_stats(torch.cat(chunks))
    torch.testing.assert_close(merged.mean, whole.mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(merged.var, whole.var, atol=1e-12, rtol=1e-12)
    assert torch.equal(merged.count, torch.full((3,), float(whole.count), dtype=F64))


# ---------------------------------------------------------------- worked example, empty batch

def test_worked_example_from_docs_math():
    """docs/math.md works this batch by hand: one channel, N=4, eps=0."""
    x = torch.tensor([[0.8], [1.2], [0.9], [1.1]], dtype=F64)
    count, mean, var = BF.batch_stats(x)
    assert int(count) == 4
    assert round(mean.item(), 12) == 1.0
    assert round(var.item(), 12) == 0.025
    xhat = BF.batch_norm(x, training=True, eps=0.0)
    assert [round(v, 4) for v in xhat.flatten().tolist()] == [-1.2649, 1.2649, -0.6325, 0.6325]
    rm, rv = torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64)
    y = BF.batch_norm(x, rm, rv, torch.tensor([0.5], dtype=F64),
                      torch.tensor([2.0], dtype=F64), True, 0.1, eps=0.0)
    assert [round(v, 4) for v in y.flatten().tolist()] == [1.3675, 2.6325, 1.6838, 2.3162]
    # running stats from (0, 1), momentum 0.1: unbiased var 0.1/3
    assert round(rm.item(), 12) == 0.1
    assert round(rv.item(), 6) == 0.903333


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)], ids=str)
def test_empty_batch_leaves_state_untouched(shape):
    x = torch.empty(shape, dtype=F64)
    (w, b), (rm, rv) = affine_params(3), running(3)
    w.requires_grad_()
    rm0, rv0 = rm.clone(), rv.clone()
    y = BF.batch_norm(x, rm, rv, w, b, True, 0.1)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3, dtype=F64))


def test_empty_batch_module_does_not_count_a_step():
    from bnkit.nn import BatchNorm1d
    bn = BatchNorm1d(3)
    y = bn(torch.empty(0, 3))
    assert y.shape == (0, 3)
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))
