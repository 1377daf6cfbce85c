"""Checkpoints move both ways between torch.nn and bnkit.nn BatchNorm layers."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import bnkit.nn as bnn

PAIRS = [(bnn.BatchNorm1d, nn.BatchNorm1d, (6, 3, 4)), (bnn.BatchNorm2d, nn.BatchNorm2d,
                                                         (4, 3, 2, 3)),
         (bnn.BatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 2, 3))]
KWARGS = [{}, {"affine": False}, {"bias": False}, {"track_running_stats": False}]


def trained(layer, shape, steps=3):
    """Random affine, a few training steps: every state entry differs from its default."""
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    for i in range(steps):
        layer(torch.randn(shape) * (i + 1) + i)
    return layer


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("ours,theirs,shape", PAIRS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("kw", KWARGS, ids=str)
def test_round_trip_both_ways_strict(ours, theirs, shape, kw):
    src = trained(theirs(3, **kw), shape)
    dst = ours(3, **kw)
    assert not dst.load_state_dict(src.state_dict(), strict=True).missing_keys
    assert_same_state(dst, src)
    back = theirs(3, **kw)
    back.load_state_dict(trained(dst, shape).state_dict(), strict=True)
    assert_same_state(back, dst)
    x = torch.randn(shape)
    torch.testing.assert_close(dst.eval()(x), back.eval()(x), atol=1e-6, rtol=1e-6)


def old_checkpoint(module):
    """The state dict as torch wrote it before num_batches_tracked (metadata version 1)."""
    sd = module.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    return sd


@pytest.mark.parametrize("ours,theirs,shape", PAIRS[:2], ids=["1d", "2d"])
def test_old_checkpoint_without_num_batches_tracked_loads_strict(ours, theirs, shape):
    sd = old_checkpoint(trained(theirs(3), shape))
    dst, ref = trained(ours(3), shape, steps=2), trained(theirs(3), shape, steps=2)
    dst.load_state_dict(sd, strict=True)
    ref.load_state_dict(sd, strict=True)
    assert_same_state(dst, ref)  # like torch: the counter keeps its own value
    assert int(dst.num_batches_tracked) == 2
    assert torch.equal(dst.running_mean, sd["running_mean"])


def test_old_checkpoint_nested_in_a_model():
    src = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    trained(src, (8, 4))
    sd = src.state_dict()
    del sd["1.num_batches_tracked"]
    sd._metadata["1"]["version"] = 1
    dst = nn.Sequential(nn.Linear(4, 3), bnn.BatchNorm1d(3))
    dst.load_state_dict(sd, strict=True)
    assert int(dst[1].num_batches_tracked) == 0
    torch.testing.assert_close(dst[1].running_var, src[1].running_var, atol=0, rtol=0)


def test_new_checkpoint_missing_num_batches_tracked_fails_strict_like_torch():
    sd = trained(nn.BatchNorm1d(3), (6, 3)).state_dict()
    del sd["num_batches_tracked"]  # metadata still says version 2
    for layer in (bnn.BatchNorm1d(3), nn.BatchNorm1d(3)):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            layer.load_state_dict(sd, strict=True)


def small_model(bn_cls):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn_cls(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


def test_full_model_swapped_between_torch_and_bnkit():
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    theirs = small_model(nn.BatchNorm2d).double()
    for i in range(3):
        theirs(x * (i + 1) + i)
    ours = small_model(bnn.BatchNorm2d).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for mode in (False, True):  # eval: running stats; train: batch stats and one more update
        ours.train(mode)
        theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-12)
    again = small_model(nn.BatchNorm2d).double()
    again.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(again, ours)
    for k, v in theirs.state_dict().items():  # the training step moved both alike
        torch.testing.assert_close(again.state_dict()[k], v, atol=1e-12, rtol=1e-12)


def test_torch_save_load_round_trip():
    bn = trained(bnn.BatchNorm(3, axis=-1, momentum=None), (5, 4, 3))
    buf = io.BytesIO()
    torch.save(bn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is bnn.BatchNorm and loaded.axis == -1 and loaded.momentum is None
    assert_same_state(loaded, bn)
    x = torch.randn(5, 4, 3)
    torch.testing.assert_close(loaded.eval()(x), bn.eval()(x), atol=0, rtol=0)

    buf = io.BytesIO()
    torch.save(bn.state_dict(), buf)
    buf.seek(0)
    fresh = bnn.BatchNorm(3, axis=-1, momentum=None)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert_same_state(fresh, bn)
