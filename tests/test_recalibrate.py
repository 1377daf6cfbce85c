"""bnkit.recalibrate (precise BN): running statistics against float64 population statistics."""
import copy

import pytest
import torch
from oracles import bn_inputs
from torch import nn

import bnkit
from bnkit.nn.ghost import GhostBatchNorm
from bnkit.nn.recurrent import RecurrentBatchNorm
from bnkit.nn.renorm import BatchRenorm
from bnkit.tools import recalibrate

torch.set_num_threads(1)


class Counter(nn.Module):
    """A module with a buffer of its own that every forward changes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x


def make_net(bn2=bnkit.nn.BatchNorm2d, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=None), nn.ReLU(), Counter(),
        nn.Conv2d(6, 8, 3, padding=1), bn2(8), nn.ReLU(), nn.Dropout(0.0),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
        bnkit.nn.BatchNorm1d(5, momentum=0.3)).to(dtype)


def make_data(n_batches=5, sizes=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    sizes = sizes or [8, 8, 5, 8, 3][:n_batches]
    return [torch.randn(n, 3, 5, 5, generator=g, dtype=dtype) * 3 + 2 for n in sizes]


def population(model, data):
    """Oracle: every BN input captured in a train-mode pass of a copy, concatenated, float64."""
    out = {}
    for name, x in bn_inputs(copy.deepcopy(model).train(), data).items():  # x: (C, N*)
        out[name] = (x.mean(1), torch.var(x, dim=1, unbiased=True))
    return out


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_running_stats_equal_population_statistics():
    model = make_net()
    data = make_data()
    want = population(model, data)
    new = recalibrate(model, data, progress=False)
    assert set(want) == {"1", "5", "11"}
    for name, (mean, var) in want.items():
        bn = new.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)


def test_float32_model_within_float32_rounding():
    model = make_net(dtype=torch.float32)
    data = make_data(dtype=torch.float32)
    want = population(model.double(), [x.double() for x in data])
    new = recalibrate(model.float(), data, progress=False)
    for name, (mean, var) in want.items():
        bn = new.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_only_running_stats_change_modes_and_momentum_restored():
    model = make_net()
    model.eval()
    model[4].train()  # a mixed mode pattern must come back as it was
    model[5].train()
    before = state(model)
    modes = [m.training for m in model.modules()]
    out = recalibrate(model, [(x, torch.zeros(len(x))) for x in make_data()], inplace=True,
                      progress=False)
    assert out is model
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum is None and model[11].momentum == 0.3 and model[5].momentum == 0.1
    after = state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{i}.running_{s}" for i in (1, 5, 11) for s in ("mean", "var")}
    assert int(model[3].calls) == 0 and int(model[1].num_batches_tracked) == 0


def test_copy_with_inplace_false_and_num_batches():
    model = make_net()
    before = state(model)
    data = make_data()
    new = recalibrate(model, iter(data), num_batches=2, progress=True, inplace=False)
    assert new is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mean, var = population(model, data[:2])["5"]
    torch.testing.assert_close(new[5].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new[5].running_var, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make_bn", [
    lambda c: nn.BatchNorm2d(c), lambda c: GhostBatchNorm(c, virtual_batch_size=2),
    lambda c: BatchRenorm(c), lambda c: bnkit.nn.BatchNormAct(c, act="relu"),
    lambda c: bnkit.nn.SyncBatchNorm(c), lambda c: bnkit.nn.BatchNorm(c, momentum=None)],
    ids=["torch", "ghost", "renorm", "act", "sync", "cumulative"])
def test_every_bn_kind(make_bn):
    model = make_net(bn2=make_bn)
    data = make_data(3)
    want = population(model, data)["5"]
    new = recalibrate(model, data, progress=False)
    torch.testing.assert_close(new[5].running_mean, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new[5].running_var, want[1], rtol=1e-12, atol=1e-12)


def one_bn_net(dtype=torch.float64):
    """torch.nn layers around one BN: its input does not depend on other BN layers, so the
    statistics of the concatenated data are the population statistics of every batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(150, 4)).to(dtype).eval()


@pytest.mark.parametrize("kind", ["torch", "bnkit"])
def test_updates_the_model_in_place_like_torch_update_bn(kind):
    """recalibrate(model, data) without assignment: the model itself holds the population
    statistics, as after torch.optim.swa_utils.update_bn on one batch of all the data."""
    ref = one_bn_net()
    model = one_bn_net()
    if kind == "bnkit":
        model[1] = bnkit.nn.BatchNorm2d(6).double()
        model[1].load_state_dict(ref[1].state_dict())
    data = make_data()
    torch.optim.swa_utils.update_bn([torch.cat(data)], ref)  # one batch: exact statistics
    out = recalibrate(model, data, progress=False)
    assert out is model
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # closed form over the whole data
        z = torch.cat([model[0](x) for x in data]).transpose(0, 1).reshape(6, -1)
    torch.testing.assert_close(model[1].running_mean, z.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, z.var(1), rtol=1e-12, atol=1e-12)
    assert not model.training


class TVFrozenBatchNorm2d(nn.Module):
    """Stand-in for torchvision.ops.misc.FrozenBatchNorm2d: four buffers, no training."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


def frozen_models():
    frozen = bnkit.freeze(make_net())
    tv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), TVFrozenBatchNorm2d(6), nn.ReLU(),
                       nn.Conv2d(6, 8, 3, padding=1), TVFrozenBatchNorm2d(8)).double()
    return {"freeze": (frozen, "3 frozen BN layers \\(FrozenBatchNorm\\)"),
            "torchvision": (tv, "2 frozen BN layers \\(TVFrozenBatchNorm2d\\)")}


@pytest.mark.parametrize("case", ["freeze", "torchvision"])
def test_frozen_model_is_an_error_that_recommends_unfreeze(case):
    model, found = frozen_models()[case]
    before = state(model)
    with pytest.raises(ValueError, match=f"recalibrate: found {found} and no trainable BN "
                                         "layer.*nothing would change.*bnkit.unfreeze\\(model\\)"):
        recalibrate(model, make_data(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # what the message recommends works: unfreeze, recalibrate, (freeze again)
    model = bnkit.unfreeze(model)
    want = population(model, make_data())
    recalibrate(model, make_data(), progress=False)
    for name, (mean, var) in want.items():
        torch.testing.assert_close(model.get_submodule(name).running_mean, mean, rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(model.get_submodule(name).running_var, var, rtol=1e-12,
                                   atol=1e-12)


def test_nothing_to_recalibrate_is_an_error_naming_what_was_found():
    untracked = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"found 1 BN layer \(BatchNorm1d\) without running "
                                         r"statistics \(track_running_stats=False\)"):
        recalibrate(untracked, [torch.randn(8, 3)], progress=False)
    with pytest.raises(ValueError, match=r"found no BN layer in the model \(Sequential\)"):
        recalibrate(nn.Sequential(nn.Linear(3, 4)), [torch.randn(8, 3)], progress=False)


def test_masked_bn_uses_valid_positions_only():
    bn = bnkit.nn.BatchNorm1d(3).double()
    g = torch.Generator().manual_seed(2)
    batches = []
    for n, length in ((4, 6), (3, 5)):
        x = torch.randn(n, 3, length, generator=g, dtype=torch.float64)
        mask = torch.rand(n, length, generator=g) > 0.3
        batches.append((x, mask))
    new = recalibrate(bn, batches, forward=lambda m, b: m(b[0], mask=b[1]), progress=False)
    vals = torch.cat([x.transpose(1, 2)[m] for x, m in batches])  # (valid positions, C)
    torch.testing.assert_close(new.running_mean, vals.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new.running_var, vals.var(0, unbiased=True), rtol=1e-12,
                               atol=1e-12)


def test_recurrent_bn_per_step_rows():
    bn = RecurrentBatchNorm(3, max_steps=2).double()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(5, 4, 3, generator=g, dtype=torch.float64) + 1 for _ in range(3)]

    def forward(m, seq):  # seq (N, T, C): steps 0, 1, 2, 3 -> rows 0, 1, 1, 1
        return [m(seq[:, t], t) for t in range(seq.shape[1])]

    steps = bn.num_batches_tracked.clone()
    new = recalibrate(bn, data, forward=forward, progress=False)
    allx = torch.cat(data)
    row0, row1 = allx[:, 0], allx[:, 1:].reshape(-1, 3)
    for r, vals in ((0, row0), (1, row1)):
        torch.testing.assert_close(new.running_mean[r], vals.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new.running_var[r], vals.var(0), rtol=1e-12, atol=1e-12)
    assert torch.equal(new.num_batches_tracked, steps)


def test_frozen_and_untracked_layers_left_alone():
    model = nn.Sequential(nn.Linear(3, 4), bnkit.nn.FrozenBatchNorm(4),
                          nn.BatchNorm1d(4, track_running_stats=False), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(0.5)
    with pytest.warns(UserWarning, match=r"recalibrate: left 1 frozen BN layer "
                                         r"\(FrozenBatchNorm\) alone.*: '1'; .*bnkit.unfreeze"):
        new = recalibrate(model, [torch.randn(8, 3) for _ in range(2)], progress=False)
    assert torch.equal(new[1].running_mean, torch.full((4,), 0.5))
    assert new[2].running_mean is None
    assert not torch.equal(new[3].running_mean, torch.zeros(4))


def test_unreached_layer_warns_and_keeps_its_statistics():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x):
            return self.used(x)

    model = Net()
    with pytest.warns(UserWarning, match="received no input.*spare"):
        new = recalibrate(model, [torch.randn(4, 2)], progress=False)
    assert torch.equal(new.spare.running_mean, torch.zeros(2))


def test_errors_leave_model_untouched():
    model = make_net()
    before = state(model)
    modes = [m.training for m in model.modules()]
    with pytest.raises(TypeError, match="iterable of batches.*got Tensor.*\\[x\\]"):
        recalibrate(model, torch.randn(4, 3, 5, 5), inplace=True)
    with pytest.raises(ValueError, match="num_batches must be None.*got 0"):
        recalibrate(model, make_data(), num_batches=0, inplace=True)
    with pytest.raises(TypeError, match="forward must be a callable.*got int"):
        recalibrate(model, make_data(), forward=3, inplace=True)
    with pytest.raises(TypeError, match="nn.Module.*got list"):
        recalibrate([model], make_data())
    with pytest.raises(ValueError, match="no batches"):
        recalibrate(model, [], inplace=True, progress=False)
    with pytest.raises(TypeError, match="batch of type dict.*forward="):
        recalibrate(model, [{"x": make_data()[0]}], inplace=True, progress=False)

    def bad_forward(m, x):  # fails on the third batch, after two real forwards
        if x.shape[0] == 5:
            raise RuntimeError("boom")
        return m(x)

    with pytest.raises(RuntimeError, match="boom"):
        recalibrate(model, make_data(), forward=bad_forward, inplace=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes


def test_lazy_layer_is_an_error_naming_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="layer '1' \\(LazyBatchNorm2d\\) is a lazy layer.*run "
                                         "one batch"):
        recalibrate(model, make_data(dtype=torch.float32), inplace=True)


def test_single_value_per_channel_is_an_error():
    bn = nn.BatchNorm1d(2)
    bn.eval()  # eval forward works on one value, but the variance needs two
    with pytest.raises(ValueError, match="saw 1 value per channel"):
        recalibrate(bn, [torch.randn(1, 2)], forward=lambda m, x: m.eval()(x), progress=False)
