"""get_norm: every name builds the right layer, errors name the valid choices."""

import pytest
import torch

import bnkit.nn as bnn
from bnkit.nn import available_norms, get_norm, register_norm
from bnkit.nn.registry import (
    ChannelLayerNorm,
    convert_targets,
    default_num_groups,
    norm_kind,
    unregister_norm,
)
from bnkit.tools import convert

D = torch.float64
NAMES = ["batchnorm", "batchnorm_act", "frozen", "ghost", "groupnorm", "instancenorm",
         "layernorm", "recurrent", "renorm", "sync"]


def test_available_names():
    assert set(NAMES) <= set(available_norms())
    assert available_norms() == sorted(available_norms())


@pytest.mark.parametrize("name,cls,kwargs", [
    ("batchnorm", bnn.BatchNorm, {"momentum": 0.3}),
    ("renorm", bnn.BatchRenorm, {"r_max": 2.0}),
    ("ghost", bnn.GhostBatchNorm, {"virtual_batch_size": 4}),
    ("frozen", bnn.FrozenBatchNorm, {"eps": 1e-3}),
    ("recurrent", bnn.RecurrentBatchNorm, {"max_steps": 5}),
    ("batchnorm_act", bnn.BatchNormAct, {"eps": 1e-3}),
    ("layernorm", ChannelLayerNorm, {}),
    ("groupnorm", torch.nn.GroupNorm, {"num_groups": 4}),
    ("instancenorm", torch.nn.InstanceNorm2d, {"affine": True}),
])
def test_builds_the_layer_with_its_kwargs(name, cls, kwargs):
    m = get_norm(name, 8, **kwargs)
    assert type(m) is cls
    for k, v in kwargs.items():
        assert getattr(m, k) == v, k


def test_sync_when_available():
    if not hasattr(bnn, "SyncBatchNorm"):
        with pytest.raises(ValueError, match=r"norm 'sync' is not available"):
            get_norm("sync", 8)
        return
    assert isinstance(get_norm("sync", 8), bnn.SyncBatchNorm)


def test_default_num_groups():
    assert [default_num_groups(c) for c in (64, 48, 30, 7, 34, 1)] == [32, 24, 30, 7, 17, 1]
    assert get_norm("groupnorm", 48).num_groups == 24


def test_layernorm_normalizes_over_channels_at_each_position():
    ln = get_norm("layernorm", 4, dtype=D)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 3, 5, dtype=D) * 3 + 1
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight.view(1, 4, 1, 1) \
        + ln.bias.view(1, 4, 1, 1)
    torch.testing.assert_close(ln(x), want, rtol=1e-12, atol=1e-12)
    assert list(ln.state_dict()) == list(torch.nn.LayerNorm(4).state_dict())
    last = get_norm("layernorm", 4, axis=-1, dtype=D)
    torch.testing.assert_close(last(x.movedim(1, -1)), torch.nn.functional.layer_norm(
        x.movedim(1, -1), (4,)), rtol=1e-12, atol=1e-12)


def test_instancenorm_dim():
    assert type(get_norm("instancenorm", 3, dim=1)) is torch.nn.InstanceNorm1d
    assert type(get_norm("instancenorm", 3, dim=3)) is torch.nn.InstanceNorm3d


def test_errors():
    with pytest.raises(ValueError, match=r"unknown norm 'batch': expected one of \['batchnorm', "
                                         r"'batchnorm1d', .*'ghost'.*\(or an alias: \[.*'bn'"):
        get_norm("batch", 8)
    with pytest.raises(ValueError, match=r"num_groups must be a positive int dividing "
                                         r"num_features=8 \(got 3\); leave it out for 8"):
        get_norm("groupnorm", 8, num_groups=3)
    with pytest.raises(ValueError, match=r"dim must be 1, 2 or 3.*got 4"):
        get_norm("instancenorm", 8, dim=4)
    with pytest.raises(TypeError, match=r"get_norm\('frozen'\) got unknown keyword\(s\) "
                                        r"\['momentum'\]; accepted: \[.*'eps'"):
        get_norm("frozen", 8, momentum=0.1)
    with pytest.raises(TypeError, match=r"virtual_batch_size"):
        get_norm("ghost", 8)  # the layer's own error for a missing required argument


def test_register_norm():
    class Scale(torch.nn.Module):
        def __init__(self, num_features, value=2.0):
            super().__init__()
            self.value = value

    try:
        register_norm("scale_for_test", Scale)
        assert get_norm("scale_for_test", 3, value=5.0).value == 5.0
        assert "scale_for_test" in available_norms()
        with pytest.raises(ValueError, match=r"norm 'scale_for_test' is already registered"):
            register_norm("scale_for_test", Scale)
    finally:
        unregister_norm("scale_for_test")
    with pytest.raises(TypeError, match=r"expects a name and a callable factory \(got str, "
                                        r"int\)"):
        register_norm("x", 3)


@pytest.mark.parametrize("alias,cls", [
    ("bn", bnn.BatchNorm2d), ("bn1d", bnn.BatchNorm1d), ("bn3d", bnn.BatchNorm3d),
    ("bnkit", bnn.BatchNorm), ("gn", torch.nn.GroupNorm), ("group", torch.nn.GroupNorm),
    ("ln", ChannelLayerNorm), ("in", torch.nn.InstanceNorm2d), ("none", torch.nn.Identity),
    ("torch", torch.nn.BatchNorm2d), ("batchrenorm", bnn.BatchRenorm),
])
def test_aliases_build_the_same_kind(alias, cls):
    assert type(get_norm(alias, 8)) is cls
    assert norm_kind(alias).name in available_norms()


def test_torch_kind_dim_and_eps():
    bn = get_norm("torch", 3, dim=1, eps=1e-3)
    assert type(bn) is torch.nn.BatchNorm1d and bn.eps == 1e-3


def _trained_bn():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4, dtype=D)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    bn(torch.randn(8, 4, 3, 3, dtype=D) * 2 + 1)
    return bn.eval()


OPTIONS = {"ghost": {"virtual_batch_size": 4}}


# 'sync' needs a process group (tests/test_sync.py); 'inplace_abn' converts only a BN followed
# by an invertible activation and keeps a plain BN (tests/test_inplace_abn.py round trips)
@pytest.mark.parametrize("name", [n for n in convert_targets()
                                  if n not in ("sync", "inplace_abn")])
def test_every_convert_target_is_built_from_a_bn_layer_and_back(name):
    """Each registry kind with a from_bn becomes a convert target: the layer it builds from a
    torch BatchNorm2d gives torch's output in eval mode (GroupNorm aside: other statistics),
    and converting back to 'torch' restores the output and the state bit for bit."""
    bn = _trained_bn()
    x = torch.randn(6, 4, 3, 3, dtype=D)
    new = convert(bn, name, inplace=False, **OPTIONS.get(name, {}))
    assert type(new) in norm_kind(name).classes
    if name == "groupnorm":
        return
    torch.testing.assert_close(new.eval()(x), bn(x), rtol=1e-12, atol=1e-12)
    back = convert(new, "torch")  # a rank-free layer comes back as an fx module around BN1d
    assert not any(type(m).__module__.startswith("bnkit") for m in back.modules())
    assert torch.equal(back.eval()(x), bn(x))
    state = {k.removeprefix("0."): v for k, v in back.state_dict().items()}
    for key, value in bn.state_dict().items():
        assert torch.equal(state[key], value), key


def test_convert_accepts_aliases_and_registered_kinds():
    assert type(convert(_trained_bn(), "bnkit")) is bnn.BatchNorm2d
    assert type(convert(_trained_bn(), "gn", num_groups=2)) is torch.nn.GroupNorm

    class Halved(torch.nn.BatchNorm2d):
        pass

    def from_bn(source, options):
        return Halved(*source.bn_args(), **source.factory_kwargs())

    try:
        register_norm("halved_for_test", Halved, aliases=("hv_for_test",), classes=(Halved,),
                      from_bn=from_bn)
        assert "halved_for_test" in convert_targets()
        new = convert(_trained_bn(), "hv_for_test")
        assert type(new) is Halved
        assert torch.equal(new.running_var, _trained_bn().running_var)
        with pytest.raises(ValueError, match=r"norm 'hv_for_test' is already registered"):
            register_norm("other_for_test", Halved, aliases=("hv_for_test",))
    finally:
        unregister_norm("halved_for_test")
    with pytest.raises(ValueError, match=r"unknown target 'hv_for_test'"):
        convert(_trained_bn(), "hv_for_test")
    with pytest.raises(ValueError, match=r"unknown norm 'hv_for_test'"):
        get_norm("hv_for_test", 4)


REQUIRED = {"ghost": {"virtual_batch_size": 4}, "recurrent": {"max_steps": 3}}  # no default


@pytest.mark.parametrize("name", available_norms())
def test_every_kind_builds_by_name_and_alias_and_runs(name):
    """Each registered kind, built by its name and by each alias, is one of its classes and
    normalizes a (N, C, H, W) batch to the shape it got."""
    kind = norm_kind(name)
    if name == "sync" and not kind.classes:
        pytest.skip("SyncBatchNorm needs torch.distributed")
    for spelling in (name, *kind.aliases):
        layer = get_norm(spelling, 4, **REQUIRED.get(name, {}))
        assert isinstance(layer, kind.classes), spelling
    if name in ("sync", "recurrent", "batchnorm1d", "batchnorm3d"):
        return  # a process group, a time step, another rank
    x = torch.randn(6, 4, 3, 3)
    assert get_norm(name, 4, **REQUIRED.get(name, {}))(x).shape == x.shape
