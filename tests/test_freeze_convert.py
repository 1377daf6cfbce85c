"""bnkit.freeze / unfreeze / convert: exact round trips, equal eval outputs, errors."""
import copy

import pytest
import torch
from torch import nn

import bnkit
from bnkit.nn.ghost import GhostBatchNorm
from bnkit.nn.recurrent import RecurrentBatchNorm
from bnkit.nn.renorm import BatchRenorm
from bnkit.tools import convert, freeze, unfreeze

torch.set_num_threads(1)


def trained(model, steps=2, seed=0):
    """Run a few training batches so running statistics and step counters are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "weight", None) is not None and bnkit.tools.is_bn(m):
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-1, 1)
        model.train()
        for _ in range(steps):
            model(torch.randn(6, 3, 5, 5, generator=g) * 2 + 1)
    return model


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), bnkit.nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.Conv2d(8, 4, 1), bnkit.nn.BatchNorm2d(4, bias=False),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False, eps=1e-3),
        nn.Flatten(), nn.Linear(100, 6), nn.BatchNorm1d(6))


def sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def eval_out(model, x):
    with torch.no_grad():
        return model.eval()(x)


X = torch.randn(4, 3, 5, 5) * 2 + 1


def test_freeze_round_trip_is_exact():
    model = trained(net())
    model[0].weight.requires_grad_(False)
    model[4].weight.requires_grad_(False)
    model.eval()
    model[1].train()
    before = sd(model)
    frozen = freeze(model, inplace=False)
    assert sum(isinstance(m, bnkit.nn.FrozenBatchNorm) for m in frozen.modules()) == 5
    assert_same_state(sd(model), before)  # the original is untouched
    back = unfreeze(frozen)
    assert_same_state(sd(back), before)
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert [m.training for m in back.modules()] == [m.training for m in model.modules()]
    assert back[4].momentum is None and back[9].eps == 1e-3 and back[7].bias is None
    assert back[9].weight is None and not back[4].weight.requires_grad
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_frozen_model_ignores_train_mode():
    model = trained(net())
    ref = eval_out(copy.deepcopy(model), X)
    frozen = freeze(model).train()
    before = sd(frozen)
    out = frozen(X)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_same_state(sd(frozen), before)  # no running-stat update in train mode
    bn_params = [n for n, _ in frozen.named_parameters() if n.split(".")[0] in
                 {"1", "4", "7", "9", "12"}]
    assert bn_params == []


def test_freeze_inplace_and_unfreeze_without_source():
    model = trained(net())
    assert freeze(model, inplace=True) is model
    assert isinstance(model[1], bnkit.nn.FrozenBatchNorm)
    plain = nn.Sequential(bnkit.nn.FrozenBatchNorm(3))
    plain[0].running_mean.fill_(2.0)
    back = unfreeze(plain)
    assert type(back[0]) is bnkit.nn.BatchNorm and torch.equal(back[0].running_mean,
                                                               torch.full((3,), 2.0))


class TVFrozenBatchNorm2d(nn.Module):
    """torchvision-style FrozenBatchNorm2d: four buffers, no num_batches_tracked."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for k, v in (("weight", 1.5), ("bias", 0.25), ("running_mean", -1.0),
                     ("running_var", 4.0)):
            self.register_buffer(k, torch.full((n,), v))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[
            None, :, None, None]


def test_duck_typed_frozen_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), TVFrozenBatchNorm2d(4))
    assert bnkit.tools.is_frozen_bn(model[1]) and bnkit.tools.is_bn(model[1])
    back = unfreeze(model, inplace=False)
    assert type(back[1]) is bnkit.nn.BatchNorm2d
    torch.testing.assert_close(eval_out(back, X), eval_out(model, X), rtol=1e-6, atol=1e-6)
    frozen = convert(model, "frozen", inplace=False)
    torch.testing.assert_close(eval_out(frozen, X), eval_out(model, X), rtol=1e-6, atol=1e-6)


def test_torch_bnkit_torch_is_bit_exact():
    model = trained(net())
    model[12].momentum = 0.25
    before = sd(model)
    to_bnkit = convert(model, "bnkit", inplace=False)
    assert type(to_bnkit[1]) is bnkit.nn.BatchNorm2d and type(to_bnkit[12]) is \
        bnkit.nn.BatchNorm1d
    assert_same_state(sd(to_bnkit), before)
    back = convert(to_bnkit, "torch", inplace=False)
    assert [type(m) for m in back.modules()] == [
        nn.BatchNorm2d if isinstance(m, bnkit.nn.BatchNorm2d) else type(m)
        for m in model.modules()]
    assert type(back[4]) is nn.BatchNorm2d and back[4].momentum is None
    assert back[12].momentum == 0.25 and back[9].eps == 1e-3 and not back[9].affine
    assert_same_state(sd(back), before)
    assert back[7].bias is None  # bias=False carried to torch's layer, which accepts None
    direct = convert(model, "torch", inplace=False)
    torch.testing.assert_close(eval_out(back, X), eval_out(direct, X), rtol=0, atol=0)
    torch.testing.assert_close(eval_out(back, X), eval_out(model, X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("to,kwargs", [("torch", {}), ("bnkit", {}), ("sync", {}),
                                       ("frozen", {}), ("renorm", {"r_max": 2.0}),
                                       ("ghost", {"virtual_batch_size": 2})])
def test_every_target_keeps_eval_outputs(to, kwargs):
    model = trained(net()).eval()
    model[1].train()
    converted = convert(model, to, inplace=False, **kwargs)
    bns = [m for m in converted.modules() if bnkit.tools.is_bn(m)]
    assert len(bns) == 5
    assert converted[1].training and not converted[4].training
    torch.testing.assert_close(eval_out(converted, X), eval_out(model, X), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a.running_var, b.running_var) for a, b in
               zip(bns, [model[i] for i in (1, 4, 7, 9, 12)]))


def test_renorm_and_ghost_options_and_types():
    model = trained(net())
    r = convert(model, "renorm", r_max=2.0, d_max=1.0, inplace=False)
    assert type(r[1]) is BatchRenorm and r[1].r_max == 2.0 and r[1].d_max == 1.0
    assert r[4].momentum is None  # the source's momentum, not BatchRenorm's default
    gh = convert(model, "ghost", virtual_batch_size=3, inplace=False)
    assert type(gh[1]) is GhostBatchNorm and gh[1].virtual_batch_size == 3
    assert type(convert(model, "sync")[1]) is bnkit.nn.SyncBatchNorm


def test_group_norm_copies_affine():
    model = trained(net())
    g = convert(model, "group", num_groups=2, inplace=False)
    assert isinstance(g[1], nn.GroupNorm) and g[1].num_groups == 2
    assert torch.equal(g[1].weight, model[1].weight) and torch.equal(g[1].bias, model[1].bias)
    assert g[7].bias is None and not g[9].affine
    x = torch.randn(2, 8, 5, 5)
    ref = nn.functional.group_norm(x, 2, model[1].weight, model[1].bias, model[1].eps)
    torch.testing.assert_close(g[1](x), ref, rtol=0, atol=0)
    default = convert(nn.Sequential(nn.BatchNorm2d(48), nn.BatchNorm2d(64)), "group")
    assert (default[0].num_groups, default[1].num_groups) == (24, 32)


def test_group_norm_indivisible_is_an_error_naming_layer():
    model = trained(net())
    with pytest.raises(ValueError, match=r"layer '7' \(BatchNorm2d\) has 4 channels, not "
                                         r"divisible by num_groups=8; pass a num_groups that "
                                         r"divides 4"):
        convert(model, "group", num_groups=8)


def test_errors_name_the_layer_and_leave_model_untouched():
    model = trained(net())
    model.add_module("13", nn.BatchNorm1d(6, track_running_stats=False))
    before = sd(model)
    with pytest.raises(ValueError, match="layer '13'.*no running statistics.*nothing to freeze"):
        freeze(model)
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing was replaced
    assert_same_state(sd(model), before)
    last = nn.Sequential(bnkit.nn.BatchNorm(4, axis=-1))
    with pytest.raises(ValueError, match="axis -1.*convert to 'bnkit'"):
        convert(last, "group", num_groups=2)
    with pytest.raises(ValueError, match="lazy layer.*first forward"):
        convert(nn.Sequential(nn.LazyBatchNorm2d()), "bnkit")
    with pytest.raises(ValueError, match="unknown target 'instance'.*'torch'"):
        convert(model, "instance")
    with pytest.raises(TypeError, match="unknown keyword.*'num_groups'.*accepted: none"):
        convert(model, "torch", num_groups=2)
    with pytest.raises(ValueError, match="needs virtual_batch_size"):
        convert(model, "ghost")
    with pytest.raises(ValueError, match="num_groups must be a positive int.*got 0"):
        convert(model, "group", num_groups=0)
    with pytest.raises(TypeError, match="^convert expects an nn.Module.*got str"):
        convert("model", "torch")
    with pytest.raises(TypeError, match="^unfreeze expects an nn.Module.*got str"):
        unfreeze("model")
    with pytest.raises(TypeError, match=r"^freeze expects an nn.Module \(got int\).*"
                                        r"bnkit.freeze\(model\)"):
        freeze(3)


def test_root_layer_identity_act_and_recurrent():
    bn = trained(nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.nn.BatchNormAct(4, act="identity")))
    out = convert(bn[1], "torch")  # the model is itself a BN layer: a new root
    inner = out.get_submodule("0")
    assert isinstance(out, torch.fx.GraphModule) and type(inner) is nn.BatchNorm1d
    assert torch.equal(inner.running_mean, bn[1].running_mean)
    for x in (torch.randn(2, 4), torch.randn(2, 4, 3), torch.randn(2, 4, 3, 2)):  # any rank
        torch.testing.assert_close(out.eval()(x), bn[1].eval()(x), rtol=1e-6, atol=1e-6)
    rec = nn.ModuleDict({"rec": RecurrentBatchNorm(3, max_steps=2), "bn": nn.BatchNorm1d(3)})
    conv = convert(rec, "frozen")
    assert type(conv["rec"]) is RecurrentBatchNorm and type(conv["bn"]) is \
        bnkit.nn.FrozenBatchNorm


def test_shared_layer_stays_shared():
    bn = nn.BatchNorm1d(3)
    model = nn.ModuleDict({"a": bn, "b": bn})
    out = convert(model, "bnkit")
    assert out["a"] is out["b"] and type(out["a"]) is bnkit.nn.BatchNorm1d
