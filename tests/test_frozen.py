"""FrozenBatchNorm against torch BN in eval mode (float64 oracle), state dicts, freeze/unfreeze."""

import pytest
import torch

from bnkit.nn import (
    BatchNorm,
    BatchNormAct,
    BatchRenorm,
    FrozenBatchNorm,
    RecurrentBatchNorm,
)

D = torch.float64


def trained_torch_bn(cls=torch.nn.BatchNorm2d, c=3, shape=(6, 3, 4, 4), **kw):
    """A torch BN with non-trivial running statistics, weight and bias, in eval mode."""
    torch.manual_seed(0)
    bn = cls(c, dtype=D, **kw)
    for _ in range(3):
        bn(torch.randn(shape, dtype=D) * 2 + 1.5)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize("cls,shape", [(torch.nn.BatchNorm1d, (5, 3)),
                                       (torch.nn.BatchNorm1d, (5, 3, 7)),
                                       (torch.nn.BatchNorm2d, (5, 3, 4, 4)),
                                       (torch.nn.BatchNorm3d, (5, 3, 2, 3, 2))])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_torch_eval_values_and_input_grad(cls, shape, mode):
    bn = trained_torch_bn(cls, shape=shape)
    frozen = FrozenBatchNorm.from_module(bn).train(mode == "train")
    x = torch.randn(shape, dtype=D, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = frozen(x), bn(xr)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    # and explicitly the eval-mode BN backward, dx = dy * w / sqrt(rv + eps)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, *[1] * (len(shape) - 2))
    torch.testing.assert_close(x.grad, dy * scale, rtol=1e-12, atol=1e-12)


def test_nothing_changes_in_train_mode():
    bn = trained_torch_bn()
    frozen = FrozenBatchNorm.from_module(bn).train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(6, 3, 4, 4, dtype=D, requires_grad=True) * 5 + 3
    frozen(x).square().sum().backward()
    assert list(frozen.parameters()) == []
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not b.requires_grad for b in frozen.buffers())


def test_channels_last_axis():
    bn = trained_torch_bn()
    frozen = FrozenBatchNorm(3, axis=-1, dtype=D)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 4, 5, 3, dtype=D)
    expected = bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(frozen(x), expected, rtol=1e-12, atol=1e-12)


def test_loads_torch_state_dict_with_and_without_counter():
    bn = trained_torch_bn()
    frozen = FrozenBatchNorm(3, dtype=D)
    frozen.load_state_dict(bn.state_dict())
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(frozen, key), getattr(bn, key)), key
    # a torchvision FrozenBatchNorm2d state dict has no num_batches_tracked
    sd = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    other = FrozenBatchNorm(3, dtype=D)
    other.load_state_dict(sd)
    assert other.num_batches_tracked.item() == 0
    torch.testing.assert_close(other.running_var, bn.running_var)
    # and a torch BN loads a frozen state dict back
    back = torch.nn.BatchNorm2d(3, dtype=D)
    back.load_state_dict(frozen.state_dict())
    assert torch.equal(back.running_mean, bn.running_mean)


def test_from_module_without_affine_uses_identity_affine():
    bn = trained_torch_bn(affine=False)
    frozen = FrozenBatchNorm.from_module(bn)
    assert torch.equal(frozen.weight, torch.ones(3, dtype=D))
    assert torch.equal(frozen.bias, torch.zeros(3, dtype=D))
    x = torch.randn(4, 3, 2, 2, dtype=D)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-12, atol=1e-12)


def test_from_bnkit_layers_copies_axis_eps_momentum_and_mode():
    bn = BatchNorm(4, eps=1e-3, momentum=0.3, axis=-1, dtype=D)
    bn(torch.randn(8, 5, 4, dtype=D) * 3 + 2)
    frozen = FrozenBatchNorm.from_module(bn)
    assert (frozen.axis, frozen.eps, frozen.momentum, frozen.training) == (-1, 1e-3, 0.3, True)
    x = torch.randn(3, 5, 4, dtype=D)
    torch.testing.assert_close(frozen(x), bn.eval()(x), rtol=1e-12, atol=1e-12)
    renorm = BatchRenorm(4, dtype=D)
    renorm(torch.randn(8, 4, dtype=D) + 1)
    x = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(FrozenBatchNorm.from_module(renorm)(x), renorm.eval()(x))


def test_freeze_unfreeze_round_trip_is_exact():
    bn = BatchNorm(3, momentum=None, dtype=D)
    for _ in range(4):
        bn(torch.randn(6, 3, 2, dtype=D) * 2 - 1)
    with torch.no_grad():
        bn.weight.mul_(1.7)
    back = FrozenBatchNorm.from_module(bn.eval()).to_batchnorm()
    assert isinstance(back, BatchNorm) and not back.training and back.momentum is None
    assert back.state_dict().keys() == bn.state_dict().keys()
    for k, v in bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert all(p.requires_grad for p in back.parameters()) and len(list(back.parameters())) == 2
    # the unfrozen layer trains: weight gets a gradient and the counter moves on
    back.train()(torch.randn(6, 3, 2, dtype=D)).sum().backward()
    assert back.weight.grad is not None and back.num_batches_tracked.item() == 5


def test_from_module_errors():
    with pytest.raises(TypeError, match=r"expects a BatchNorm layer .*got Linear"):
        FrozenBatchNorm.from_module(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"without running statistics .*track_running_stats"):
        FrozenBatchNorm.from_module(torch.nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"expected running_mean of shape \(3,\) \(got \(4, 3\)"):
        FrozenBatchNorm.from_module(RecurrentBatchNorm(3, max_steps=4))
    with pytest.raises(TypeError, match=r"drop the activation .*nn.Sequential"):
        FrozenBatchNorm.from_module(BatchNormAct(3))


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match=r"num_features must be a positive int.*got 0"):
        FrozenBatchNorm(0)
    with pytest.raises(ValueError, match=r"eps must be >= 0 \(got -1"):
        FrozenBatchNorm(3, eps=-1.0)
    frozen = FrozenBatchNorm(3)
    with pytest.raises(ValueError, match=r"running_mean must hold one value per channel: "
                       r"expected shape \(4,\) .*got \(3,\)"):
        frozen(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"mask must cover .*got \(3,\)"):
        frozen(torch.randn(2, 3, 5), mask=torch.ones(3, dtype=torch.bool))
