"""torch.func transforms (grad, grad of grad, functional_call) through bnkit layers give
torch's own results, in the modes where torch supports them: eval, and training without
running statistics. Training with running statistics fails as torch's does (a transform
may not mutate captured buffers) and leaves the buffers untouched.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

import bnkit.nn as bnn


def pair(track=True, training=True):
    """bnkit and torch BatchNorm1d(4) in float64 with the same parameters and buffers."""
    g = torch.Generator().manual_seed(0)
    mods = [bnn.BatchNorm1d(4, track_running_stats=track, dtype=torch.float64),
            torch.nn.BatchNorm1d(4, track_running_stats=track, dtype=torch.float64)]
    state = {"weight": torch.rand(4, generator=g, dtype=torch.float64) + 0.5,
             "bias": torch.randn(4, generator=g, dtype=torch.float64)}
    if track:
        state |= {"running_mean": torch.randn(4, generator=g, dtype=torch.float64),
                  "running_var": torch.rand(4, generator=g, dtype=torch.float64) + 0.5}
    for m in mods:
        m.load_state_dict(state, strict=False)
        m.train(training)
    return mods


def x_input():
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("track,training", [(False, True), (True, False)],
                         ids=["train-no-running", "eval"])
def test_grad_and_grad_of_grad_match_torch(track, training):
    x = x_input()
    params = {"weight": torch.full((4,), 1.5, dtype=torch.float64),
              "bias": torch.full((4,), -0.25, dtype=torch.float64)}
    results = []
    for m in pair(track, training):
        loss = lambda p, x, m=m: functional_call(m, p, (x,)).pow(3).sum()
        g_params = grad(loss)(params, x)
        g_x = grad(lambda x, m=m: m(x).pow(3).sum())(x)
        gg_x = grad(lambda x, m=m: grad(lambda z: m(z).pow(3).sum())(x).sum())(x)
        results.append((g_params["weight"], g_params["bias"], g_x, gg_x))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_training_with_running_stats_fails_like_torch_and_touches_nothing():
    x = x_input()
    for m in pair(track=True, training=True):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(RuntimeError, match="captured"):
            grad(lambda x, m=m: m(x).sum())(x)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k


# Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) and vmap run the core as
# differentiable torch ops, so torch derives the tangents and batching rules. Oracles:
# torch's F.batch_norm in float64, and a float64 formula for masks.

F64 = {"dtype": torch.float64}
MODES = [(True, True), (True, False), (False, True)]  # (training, running buffers)
MODE_IDS = ["train-running", "train-batch-only", "eval"]


def operands(seed=2, shape=(8, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(*shape, generator=g, **F64) * 2 + 1
    w, b = torch.rand(c, generator=g, **F64) + 0.5, torch.randn(c, generator=g, **F64)
    rm, rv = torch.randn(c, generator=g, **F64), torch.rand(c, generator=g, **F64) + 0.5
    tangents = [torch.randn(t.shape, generator=g, **F64) for t in (x, w, b)]
    return (x, w, b), tangents, (rm, rv)


def both_bn(training, running, act=None):
    """bnkit's and torch's functional BN as f(x, w, b), each with its own buffer copies."""
    _, _, (rm, rv) = operands()
    out = []
    for fn in (bnkit_bn, torch.nn.functional.batch_norm):
        bufs = (rm.clone(), rv.clone()) if running else (None, None)

        def f(x, w, b, fn=fn, bufs=bufs):
            if act is not None and fn is bnkit_bn:
                return fn(x, *bufs, w, b, training, act=act)
            y = fn(x, *bufs, w, b, training)
            return y if act is None else ACT_FNS[act](y)
        out.append((f, bufs))
    return out


def bnkit_bn(*args, **kw):
    import bnkit.functional
    return bnkit.functional.batch_norm(*args, **kw)


ACT_FNS = {"relu": torch.relu, "silu": torch.nn.functional.silu,
           "gelu": torch.nn.functional.gelu}


@pytest.mark.parametrize("training,running", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("act", [None, "relu", "silu", "gelu"])
def test_jvp_matches_torch(training, running, act):
    from torch.func import jvp
    primals, tangents, _ = operands()
    (fb, bufs_b), (ft, bufs_t) = both_bn(training, running, act)
    got = jvp(fb, primals, tuple(tangents))
    want = jvp(ft, primals, tuple(tangents))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for gb, gt in zip(bufs_b, bufs_t):  # torch updates running buffers under jvp: so do we
        if gb is not None:
            torch.testing.assert_close(gb, gt, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training,running", MODES, ids=MODE_IDS)
def test_forward_ad_dual_tensors_match_torch(training, running):
    import torch.autograd.forward_ad as fwad
    primals, tangents, _ = operands()
    results = []
    for f, bufs in both_bn(training, running):
        with fwad.dual_level():
            duals = [fwad.make_dual(p, t) for p, t in zip(primals, tangents)]
            y = fwad.unpack_dual(f(*duals))
            assert all(b is None or fwad.unpack_dual(b).tangent is None for b in bufs)
            results.append((y.primal, y.tangent, *[b for b in bufs if b is not None]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training,running", [(True, False), (False, True)],
                         ids=["train-batch-only", "eval"])
def test_vmap_and_jacfwd_match_torch(training, running):
    from torch.func import jacfwd, vmap
    (x, w, b), _, _ = operands(shape=(6, 4, 5))
    xs = torch.stack([x, x * 3 - 1, x.flip(0)])  # vmap over a leading dim of 3
    results = []
    for f, _ in both_bn(training, running):
        y = vmap(f, in_dims=(0, None, None))(xs, w, b)
        jac = jacfwd(f, argnums=(0, 1, 2))(x[:, :, :2], w, b)
        hess = torch.func.hessian(lambda x, f=f: f(x, w, b).pow(3).sum())(x[:3, :, :1])
        results.append((y, *jac, hess))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_vmap_training_with_unbatched_running_stats_fails_like_torch_and_touches_nothing():
    from torch.func import vmap
    (x, w, b), _, _ = operands(shape=(6, 4, 5))
    xs = torch.stack([x, x + 1])
    for f, bufs in both_bn(True, True):
        before = [t.clone() for t in bufs]
        with pytest.raises(RuntimeError, match="Batch norm got a batched tensor as input while "
                                               "the running_mean or running_var"):
            vmap(f, in_dims=(0, None, None))(xs, w, b)
        assert all(torch.equal(t, u) for t, u in zip(bufs, before))


def test_vmap_with_batched_running_stats_matches_torch():
    from torch.func import vmap
    (x, w, b), _, (rm, rv) = operands(shape=(6, 4, 5))
    xs = torch.stack([x, x * 2])
    results = []
    for fn in (bnkit_bn, torch.nn.functional.batch_norm):
        rms, rvs = torch.stack([rm, rm + 1]), torch.stack([rv, rv * 2])
        y = vmap(lambda x, m, v, fn=fn: fn(x, m, v, w, b, True))(xs, rms, rvs)
        results.append((y, rms, rvs))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def masked_bn_formula(x, mask, w, b, eps=1e-5):
    """Masked training BN in float64 torch ops: statistics over the True positions of the
    (N, L) mask, every position normalized with them; x is (N, C, L)."""
    m = mask[:, None, :].to(x.dtype)
    n = m.sum()
    mean = (x * m).sum((0, 2), keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum((0, 2), keepdim=True) / n
    return (x - mean) / torch.sqrt(var + eps) * w[:, None] + b[:, None]


def test_jvp_forward_ad_and_vmap_with_mask_match_formula():
    import torch.autograd.forward_ad as fwad
    from torch.func import jvp, vmap
    (x, w, b), (tx, tw, tb), _ = operands()
    mask = torch.arange(5) < torch.tensor([5, 3, 4, 2, 5, 1, 5, 4])[:, None]

    def ours(x, w, b):
        return bnkit_bn(x, None, None, w, b, True, mask=mask)

    def formula(x, w, b):
        return masked_bn_formula(x, mask, w, b)
    want = jvp(formula, (x, w, b), (tx, tw, tb))
    pairs = [(jvp(ours, (x, w, b), (tx, tw, tb)), want)]
    with fwad.dual_level():
        dual = fwad.unpack_dual(ours(fwad.make_dual(x, tx), fwad.make_dual(w, tw),
                                     fwad.make_dual(b, tb)))
    pairs.append(((dual.primal, dual.tangent), want))
    xs = torch.stack([x, 2 * x + 1])
    pairs.append((vmap(ours, in_dims=(0, None, None))(xs, w, b),
                  vmap(formula, in_dims=(0, None, None))(xs, w, b)))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_jvp_and_forward_ad_match_torch_layer(training):
    """Through layers, on the default backend (the native node must step aside). torch's
    layer refuses torch.func.jvp in training (its num_batches_tracked.add_ mutates a captured
    tensor) while its functional batch_norm runs: bnkit's layer runs, advancing its counter,
    so the reference is torch's layer under torch.autograd.forward_ad, twice."""
    import torch.autograd.forward_ad as fwad
    from torch.func import jvp
    x = x_input()
    tx = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), **F64)

    def dual_call(m):
        with fwad.dual_level():
            d = fwad.unpack_dual(m(fwad.make_dual(x, tx)))
        return d.primal, d.tangent
    ours, ref = pair(track=True, training=training)
    got = (*jvp(ours, (x,), (tx,)), *dual_call(ours))
    want = (*dual_call(ref), *dual_call(ref))
    for g, w in zip(got + (ours.running_mean, ours.running_var, ours.num_batches_tracked),
                    want + (ref.running_mean, ref.running_var, ref.num_batches_tracked)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


FIRST_CALL = """
import torch, bnkit.nn as bnn
from torch.func import grad, jvp
m = bnn.BatchNorm1d(4, dtype=torch.float64).eval()
ref = torch.nn.BatchNorm1d(4, dtype=torch.float64).eval()
x = torch.randn(8, 4, dtype=torch.float64)
f = {"grad": lambda m: grad(lambda x: m(x).pow(2).sum())(x),
     "jvp": lambda m: jvp(m, (x,), (x,))[1]}[MODE]
torch.testing.assert_close(f(m), f(ref))
"""


@pytest.mark.parametrize("mode", ["grad", "jvp"])
def test_first_bnkit_call_of_a_process_may_be_under_a_transform(mode):
    """The kernels are imported on first use: that must not happen inside the transform
    (it failed with 'Cannot access data pointer of Tensor that doesn't have storage')."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", f"MODE = {mode!r}\n" + FIRST_CALL],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
