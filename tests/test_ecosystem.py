"""bnkit layers in torch's ecosystem: they are torch's classes, torch's own tools handle them,
`convert(..., "torch")` leaves pure torch, and timm-style BN+activation layers convert and
freeze. Oracles: torch's layers in float64 and torch's own functions."""
import copy
import io
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

import bnkit
from bnkit.nn import BatchNormAct, FrozenBatchNorm

torch.set_num_threads(1)
DT = torch.float64


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """Stand-in with the interface of timm's BatchNormAct2d (timm/layers/norm_act.py): a
    BatchNorm2d with `drop` and `act` children, forward = act(drop(BN(x)))."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, apply_act=True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        kwargs = dict(act_kwargs or {})
        if inplace:
            kwargs["inplace"] = True
        self.act = act_layer(**kwargs) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        x = nn.functional.batch_norm(x, self.running_mean if track else None,
                                     self.running_var if track else None, self.weight,
                                     self.bias, use_batch, factor, self.eps)
        return self.act(self.drop(x))


def randomize(model, seed=0):
    """Non-trivial affine parameters and running statistics in every BN-like layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias", "running_mean"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and bnkit.tools.is_bn(m):
                    t.copy_(torch.rand(t.shape, generator=g, dtype=DT).to(t.dtype) + 0.5)
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def batches(n=3, shape=(6, 3, 5, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=DT) * 2 + 1 for _ in range(n)]


# --- 1. the layers are torch's classes -------------------------------------------------------

@pytest.mark.parametrize("layer,torch_cls", [
    (bnkit.nn.BatchNorm1d(4), nn.BatchNorm1d), (bnkit.nn.BatchNorm2d(4), nn.BatchNorm2d),
    (bnkit.nn.BatchNorm3d(4), nn.BatchNorm3d), (bnkit.nn.BatchNorm(4), _BatchNorm),
    (bnkit.nn.BatchNorm(4, axis=-1), _BatchNorm), (bnkit.nn.GhostBatchNorm(4, 2), _BatchNorm),
    (bnkit.nn.BatchRenorm(4), _BatchNorm), (bnkit.nn.SyncBatchNorm(4), _BatchNorm),
    (bnkit.nn.RecurrentBatchNorm(4, 3), _BatchNorm)])
def test_layers_are_instances_of_torch_classes(layer, torch_cls):
    assert isinstance(layer, torch_cls) and isinstance(layer, _BatchNorm)
    assert isinstance(layer, bnkit.nn.NormBase)
    assert type(layer).forward is not _BatchNorm.forward  # bnkit's forward runs
    rank = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}.get(torch_cls, 2)
    layer._check_input_dim(torch.zeros((2, 4) + (3,) * (rank - 2)))  # torch's hook works
    with pytest.raises(ValueError, match=r"expected .*D input \(got 1D"):
        layer._check_input_dim(torch.zeros(4))


def test_frozen_and_act_layers_stay_outside_batchnorm():
    assert not isinstance(FrozenBatchNorm(4), _BatchNorm)  # as torchvision's FrozenBatchNorm2d
    assert not isinstance(BatchNormAct(4), _BatchNorm)  # torch's tools would drop the act
    assert bnkit.tools.is_bn(BatchNormAct(4)) and bnkit.tools.is_bn(FrozenBatchNorm(4))


def twins(layer_fn, torch_fn):
    """(bnkit model, torch model) with equal weights, in float64."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 1), layer_fn(), nn.Conv2d(4, 4, 1)).to(DT)
    b = nn.Sequential(nn.Conv2d(3, 4, 1), torch_fn(), nn.Conv2d(4, 4, 1)).to(DT)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("layer_fn", [
    lambda: bnkit.nn.BatchNorm2d(4, momentum=0.3), lambda: bnkit.nn.BatchNorm(4),
    lambda: bnkit.nn.GhostBatchNorm(4, 3), lambda: bnkit.nn.BatchRenorm(4, momentum=0.3),
    lambda: bnkit.nn.SyncBatchNorm(4)])
def test_swa_update_bn_matches_torch(layer_fn):
    ours, ref = twins(layer_fn, lambda: nn.BatchNorm2d(4, momentum=0.3))
    randomize(ours)
    momentum = ours[1].momentum
    loader = [(x, 0) for x in batches()]
    update_bn(loader, ours)
    update_bn(loader, ref)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours[1], key), getattr(ref[1], key), rtol=1e-12,
                                   atol=1e-12)
    assert int(ours[1].num_batches_tracked) == int(ref[1].num_batches_tracked) == 3
    assert ours[1].momentum == momentum and ours.training  # both restored by update_bn


def test_swa_update_bn_recurrent_rows():
    rbn = bnkit.nn.RecurrentBatchNorm(4, max_steps=2, dtype=DT)
    randomize(rbn)

    class Step0(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = rbn

        def forward(self, x):
            return self.bn(x, 0)

    ref = nn.BatchNorm1d(4, dtype=DT)
    xs = [x.flatten(2).mean(2) for x in batches(shape=(6, 4, 2, 2))]
    update_bn(xs, Step0())
    update_bn(xs, ref)
    torch.testing.assert_close(rbn.running_mean[0], ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rbn.running_var[0], ref.running_var, rtol=1e-12, atol=1e-12)
    assert torch.equal(rbn.running_mean[1], torch.zeros(4, dtype=DT))  # reset, not run


def mixed_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1), bnkit.nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bnkit.nn.BatchNorm(4, momentum=None), bnkit.nn.GhostBatchNorm(4, 3),
        bnkit.nn.BatchRenorm(4), bnkit.nn.SyncBatchNorm(4, bias=False), nn.BatchNorm2d(4),
        BatchNormAct(4, act="silu")).to(DT)


def trained(model, shape=(6, 3, 5, 5)):
    model.train()
    for x in batches(shape=shape):
        model(x)
    return model.eval()


def test_torch_convert_sync_batchnorm_converts_bnkit_layers():
    model = trained(randomize(mixed_model()))
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        ref = model(x)
    weights = {i: model[i].weight for i in (1, 4, 5, 6, 7)}
    conv = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(conv[i]) for i in (1, 4, 5, 6, 7, 8)] == [nn.SyncBatchNorm] * 6
    assert all(conv[i].weight is w for i, w in weights.items())  # shared, as torch does
    assert conv[7].bias is None and conv[4].momentum is None
    assert type(conv[9]) is BatchNormAct  # left as it is: torch would drop its activation
    with torch.no_grad():
        torch.testing.assert_close(conv.eval()(x), ref, rtol=1e-12, atol=1e-12)


def test_torch_convert_sync_batchnorm_other_axis_and_recurrent_fail_loudly():
    """What torch's converter makes of layers it cannot represent (docs/layers/sync.md):
    a layer with channels on another axis becomes a SyncBatchNorm over dim 1, which rejects
    input whose dim 1 is not C; a recurrent layer takes a time step, which torch's doesn't."""
    conv = nn.SyncBatchNorm.convert_sync_batchnorm(bnkit.nn.BatchNorm(4, axis=-1)).eval()
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        conv(torch.randn(2, 3, 4))
    cell = nn.SyncBatchNorm.convert_sync_batchnorm(bnkit.nn.BNLSTMCell(3, 4, max_steps=2))
    h = torch.zeros(2, 4)
    with pytest.raises((TypeError, AttributeError)):  # no per-time-step statistics
        cell(torch.randn(2, 3), (h, h), 0)


def test_isinstance_idioms_freeze_by_eval_and_no_weight_decay():
    """The usual loops over model.modules() treat bnkit layers as torch's: the same model in
    torch layers (the oracle) ends in the same state after the same AdamW steps."""
    def build(bn):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), bn(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(36, 2)).to(DT)
    ours, ref = build(bnkit.nn.BatchNorm2d), build(nn.BatchNorm2d)
    randomize(ours)
    ref.load_state_dict(ours.state_dict())
    for model in (ours, ref):
        model.train()
        for m in model.modules():  # freeze BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        bn_params = [p for m in model.modules() if isinstance(m, _BatchNorm)
                     for p in m.parameters(recurse=False)]
        ids = {id(p) for p in bn_params}
        rest = [p for p in model.parameters() if id(p) not in ids]
        opt = torch.optim.AdamW([{"params": bn_params, "weight_decay": 0.0},
                                 {"params": rest, "weight_decay": 0.5}], lr=0.1)
        for x in batches(shape=(4, 3, 5, 5)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert not ours[1].training and len(opt.param_groups[0]["params"]) == 2
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)


# --- 2. convert(..., "torch") is pure torch --------------------------------------------------

def every_kind():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1), BatchNormAct(4, act="relu"), bnkit.nn.BatchNorm2d(4),
        bnkit.nn.GhostBatchNorm(4, 3), bnkit.nn.BatchRenorm(4, momentum=0.2),
        BatchNormAct(4, act=nn.GELU(), drop=nn.Dropout(0.3)), bnkit.nn.SyncBatchNorm(4),
        bnkit.nn.BatchNorm(4, axis=-1), FrozenBatchNorm(4)).to(DT)  # input (N, 3, H, 4)


def test_convert_to_torch_leaves_pure_torch_with_equal_outputs_and_state():
    model = trained(randomize(every_kind()), shape=(6, 3, 5, 4))
    model[-1].running_var.fill_(2.0)
    x = batches(1, shape=(2, 3, 4, 4), seed=7)[0]
    with torch.no_grad():
        ref = model(x)
    fresh = copy.deepcopy(model)
    out = bnkit.convert(model, "torch")
    assert out is model  # in place, like torch's converters
    assert not [type(m) for m in out.modules() if type(m).__module__.startswith("bnkit")]
    assert type(out[2]) is nn.BatchNorm2d
    # BatchNormAct takes any rank: BatchNorm1d over flattened positions, then the act
    assert isinstance(out[1], torch.fx.GraphModule)
    assert [type(m) for m in out[1].children()] == [nn.BatchNorm1d, nn.ReLU]
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(x), ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(out.state_dict())  # strict: every key back in place
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ref, rtol=0, atol=0)


def test_converted_model_runs_and_scripts_without_bnkit():
    model = trained(randomize(every_kind()), shape=(6, 3, 5, 4)).float()
    bnkit.convert(model, "torch")
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        ref = model.eval()(x)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), ref, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save({"model": model, "x": x, "y": ref}, buf)
    code = ("import sys, io, torch; sys.modules['bnkit'] = None\n"
            "d = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False)\n"
            "torch.testing.assert_close(d['model'](d['x']), d['y'], rtol=1e-6, atol=1e-6)\n"
            "assert not any('bnkit' in type(m).__module__ for m in d['model'].modules())\n")
    run = subprocess.run([sys.executable, "-c", code], input=buf.getvalue(),
                         capture_output=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr.decode()[-2000:]


def test_batchnormact_drop_then_act_matches_torch_modules():
    torch.manual_seed(0)
    ours = BatchNormAct(4, act=nn.GELU(), drop=nn.Dropout(0.5)).to(DT)
    randomize(ours)
    bn = nn.BatchNorm2d(4, dtype=DT)
    bn.load_state_dict({k: v for k, v in ours.state_dict().items()})
    x = batches(1, shape=(5, 4, 3, 3))[0]
    torch.manual_seed(3)
    y = ours(x)
    torch.manual_seed(3)
    want = nn.functional.gelu(nn.functional.dropout(bn(x), 0.5, True))
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert repr(BatchNormAct(4)) == repr(BatchNormAct(4, drop=None))
    with pytest.raises(TypeError, match="drop must be None or an nn.Module.*got float"):
        BatchNormAct(4, drop=0.5)


# --- 3. timm's BatchNormAct2d ----------------------------------------------------------------

def timm_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        TimmBatchNormAct2d(4, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.3}),
        TimmBatchNormAct2d(4, act_layer=nn.GELU, inplace=False,
                           drop_layer=lambda: nn.Dropout(0.5)),
        nn.BatchNorm2d(4), TimmBatchNormAct2d(4, apply_act=False)).to(DT)


def test_timm_layers_convert_to_bnkit_keeping_act_and_drop():
    model = trained(randomize(timm_model()))
    x = batches(1, seed=9)[0]
    ref_model = copy.deepcopy(model)
    out = bnkit.convert(model, "bnkit")
    assert type(out[1]) is BatchNormAct and type(out[1].act) is nn.LeakyReLU
    assert out[1].act.negative_slope == 0.3 and "drop" not in out[1]._modules
    assert type(out[2].drop) is nn.Dropout and type(out[2].act) is nn.GELU
    assert type(out[3]) is bnkit.nn.BatchNorm2d and type(out[4]) is bnkit.nn.BatchNorm2d
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref_model(x), rtol=1e-12, atol=1e-12)
    out.train()
    ref_model.train()
    for _ in range(2):  # training: same dropout draws, drop before act, same running stats
        torch.manual_seed(4)
        y = out(x)
        torch.manual_seed(4)
        torch.testing.assert_close(y, ref_model(x), rtol=1e-12, atol=1e-12)
    for a, b in zip(out.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    back = bnkit.convert(out, "torch", inplace=False)  # back to torch: same outputs
    assert not [m for m in back.modules() if type(m).__module__.startswith("bnkit")]
    # BatchNormAct takes any rank: an fx module around BatchNorm1d, then drop and act
    assert [type(m) for m in back[2].children()] == [nn.BatchNorm1d, nn.Dropout, nn.GELU]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), ref_model.eval()(x), rtol=1e-12,
                                   atol=1e-12)


def test_timm_layers_freeze_and_unfreeze():
    model = trained(randomize(timm_model()))
    model[2].train()
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = bnkit.freeze(model)
    assert frozen is model
    assert [type(m) for m in frozen[2]] == [FrozenBatchNorm, nn.Dropout, nn.GELU]
    assert type(frozen[3]) is FrozenBatchNorm and type(frozen[4]) is FrozenBatchNorm
    assert frozen[2].training and frozen[2][0].training
    with torch.no_grad():
        torch.testing.assert_close(frozen.eval()(x), ref, rtol=1e-12, atol=1e-12)
    back = bnkit.unfreeze(frozen)
    assert back is model  # in place
    assert [type(back[i]) for i in (1, 2, 4)] == [TimmBatchNormAct2d] * 3
    assert back[1].act.negative_slope == 0.3 and type(back[2].drop) is nn.Dropout
    after = back.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_timm_dropout_without_activation_is_kept():
    layer = trained(randomize(nn.Sequential(TimmBatchNormAct2d(
        3, apply_act=False, drop_layer=lambda: nn.Dropout(0.5)).to(DT))))[0]
    x = batches(1, seed=2)[0]
    for to, kinds in (("bnkit", None), ("torch", [nn.BatchNorm2d, nn.Dropout]),
                      ("frozen", [FrozenBatchNorm, nn.Dropout])):
        out = bnkit.convert(layer, to, inplace=False).train()
        if kinds is None:
            assert type(out) is BatchNormAct and type(out.drop) is nn.Dropout
        else:
            assert [type(m) for m in out] == kinds
        torch.manual_seed(6)
        y = out(x)
        torch.manual_seed(6)
        ref = copy.deepcopy(layer).train(to != "frozen")
        ref.drop.train()  # frozen BN: running statistics, then the same dropout draw
        torch.testing.assert_close(y, ref(x), rtol=1e-12, atol=1e-12)


def test_one_timm_layer_does_not_block_the_others():
    model = nn.Sequential(nn.BatchNorm2d(4), TimmBatchNormAct2d(4), nn.BatchNorm2d(4))
    out = bnkit.convert(model, "frozen")
    assert type(out[0]) is FrozenBatchNorm and type(out[2]) is FrozenBatchNorm
    assert isinstance(out[1], nn.Sequential) and type(out[1][1]) is nn.ReLU
