"""bnkit.fold / fold_weights: folded models against the unfolded eval model."""
import copy
import warnings

import pytest
import torch
from torch import nn

import bnkit
from bnkit.tools import fold, fold_weights

torch.set_num_threads(1)


def randomize(model, seed=0):
    """Non-trivial running statistics and affine parameters in every BN layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if bnkit.tools.is_bn(m) and m.running_mean is not None:
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(c, generator=g))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


class Block(nn.Module):
    """Residual block: BN inside the branch, conv without bias, grouped and depthwise conv."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.bn2 = bnkit.nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn3 = bnkit.nn.FrozenBatchNorm(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.dw(torch.relu(self.bn2(self.conv2(y)))))
        return torch.relu(x + y)


class ResNetish(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2, groups=2, bias=False)
        self.up_bn = nn.BatchNorm2d(c)
        self.c1 = nn.Conv1d(c, 4, 1)
        self.c1_bn = bnkit.nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 64, 10)
        self.fc_bn = nn.BatchNorm1d(10)

    def forward(self, x):
        x = torch.relu(self.up_bn(self.up(self.blocks(self.stem(x)))))
        x = self.c1_bn(self.c1(x.flatten(2)))
        return self.fc_bn(self.fc(x.flatten(1)))


def _bn_count(model):
    return sum(bnkit.tools.is_bn(m) for m in model.modules())


def _check_close(ref_model, folded, x, rtol):
    with torch.no_grad():
        ref, out = ref_model(x), folded(x)
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < rtol, err


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_resnet_style_matches_eval_model(dtype, rtol):
    torch.manual_seed(0)
    model = randomize(ResNetish()).to(dtype)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 4, 4, dtype=dtype)
    folded, report = fold(model, return_report=True)
    assert report.method == "fx" and report.skipped == []
    assert len(report.folded) == _bn_count(model) == 10
    assert _bn_count(folded) == 0
    _check_close(model, folded, x, rtol)
    # the original is untouched: same state, still has its BN layers and its mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _bn_count(model) == 10 and isinstance(model.stem[1], nn.BatchNorm2d)
    assert type(folded) is ResNetish and not folded.training


def test_original_in_train_mode_is_left_in_train_mode():
    model = randomize(ResNetish()).train()
    folded = fold(model)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m.training for m in folded.modules())


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
                               nn.ReLU(), nn.Conv2d(6, 6, 1), bnkit.nn.BatchNorm2d(6))
        self.b = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 16, 5), nn.BatchNorm1d(5))
        self.lone_bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.a(x) if x.sum() > 0 else self.b(x)
        return self.head(self.lone_bn(y))


def test_untraceable_model_folds_sequential_chains():
    model = randomize(Untraceable())
    folded, report = fold(model, return_report=True)
    assert report.method == "sequential" and "TraceError" in report.trace_error
    assert sorted(report.folded) == [("a.0", "a.1"), ("a.3", "a.4"), ("b.0", "b.1"),
                                     ("head.1", "head.2")]
    assert [name for name, _ in report.skipped] == ["lone_bn"]
    assert "nn.Sequential" in report.skipped[0][1]
    for sign in (1.0, -1.0):
        x = sign * (torch.rand(3, 3, 4, 4) + 0.1)
        _check_close(model, folded, x, 1e-5)


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.conv(x)
        return self.bn2(self.conv2(self.bn(z) + z))  # conv output used twice


def test_conv_with_branching_output_is_left_alone_and_reported():
    model = randomize(Branching())
    folded, report = fold(model, return_report=True)
    assert report.folded == [("conv2", "bn2")]
    (name, reason), = report.skipped
    assert name == "bn" and "also used elsewhere" in reason
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    _check_close(model, folded, torch.randn(2, 3, 5, 5), 1e-5)


class Skips(nn.Module):
    """One BN for every documented reason not to fold, and one that folds."""

    def __init__(self):
        super().__init__()
        self.c0, self.last_axis = nn.Conv2d(3, 4, 1), bnkit.nn.BatchNorm(4, axis=-1)
        self.c1, self.act = nn.Conv2d(3, 4, 1), bnkit.nn.BatchNormAct(4, act="relu")
        self.c2, self.masked = nn.Conv1d(3, 4, 1), bnkit.nn.BatchNorm1d(4)
        self.c3, self.nostats = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.c4, self.c6, self.twice = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c5, self.ident = nn.Conv2d(3, 4, 1), bnkit.nn.BatchNormAct(4, act="identity")
        self.c7, self.bn_a, self.bn_b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.after_relu = nn.BatchNorm2d(3)
        self.unused = nn.BatchNorm2d(3)

    def forward(self, x):
        mask = torch.ones_like(x[:, 0].flatten(1), dtype=torch.bool)  # (N, L) all valid
        out = self.last_axis(self.c0(x)) + self.act(self.c1(x)) + self.nostats(self.c3(x))
        out = out + self.twice(self.c4(x)) + self.twice(self.c6(x)) + self.ident(self.c5(x))
        out = out + self.bn_a(self.c7(x)) + self.bn_b(self.c7(x))
        seq = self.masked(self.c2(x.flatten(2)), mask)
        return out.flatten(2) + seq + self.after_relu(torch.relu(x)).sum()


def test_every_skip_reason_is_reported():
    model = randomize(Skips())
    x = torch.randn(2, 3, 4, 4)
    folded, report = fold(model, x, return_report=True)
    reasons = dict(report.skipped)
    assert set(reasons) == {"last_axis", "act", "masked", "nostats", "twice", "bn_a", "bn_b",
                            "after_relu", "unused"}
    assert "channel axis (-1)" in reasons["last_axis"]
    assert "activation" in reasons["act"] and "relu" in reasons["act"]
    assert "extra arguments" in reasons["masked"]
    assert "no running statistics" in reasons["nostats"]
    assert "called 2 times" in reasons["twice"]
    assert "'c7' is called 2 times" in reasons["bn_a"] == reasons["bn_b"]
    assert "not the output of a Conv" in reasons["after_relu"]
    assert "not called in forward" in reasons["unused"]
    assert report.folded == [("c5", "ident")]
    assert report.max_rel_diff < 1e-6
    _check_close(model, folded, x, 1e-5)


def test_conv_transpose_1d_folds():
    model = randomize(nn.Sequential(nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d(6)))
    folded, report = fold(model, return_report=True)
    assert report.folded == [("0", "1")]
    _check_close(model, folded, torch.randn(2, 4, 7), 1e-5)


def test_linear_channels_last_bn_folds_and_rank_check_uses_example_inputs():
    lin, bn = nn.Linear(6, 5), bnkit.nn.BatchNorm(5, axis=-1)
    model = randomize(nn.Sequential(lin, bn))
    x = torch.randn(3, 7, 6)  # (N, L, F): features last
    folded, report = fold(model, x, return_report=True)
    assert report.folded == [("0", "1")]
    _check_close(model, folded, x, 1e-5)
    # BatchNorm1d on a 3D Linear output normalizes dim 1 (here L == 5): not foldable
    model = randomize(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    x = torch.randn(3, 5, 6)
    folded, report = fold(model, x, return_report=True)
    assert report.folded == [] and "channel axis (1)" in report.skipped[0][1]
    _check_close(model, folded, x, 1e-6)


def test_conv_transpose_3d_and_conv3d():
    model = randomize(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, groups=2), nn.BatchNorm3d(4),
                                    nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2),
                                    bnkit.nn.BatchNorm3d(6)))
    folded, report = fold(model, return_report=True)
    assert len(report.folded) == 2
    _check_close(model, folded, torch.randn(2, 2, 3, 3, 3), 1e-5)


def test_example_inputs_mismatch_warns():
    class Reuse(nn.Module):  # the conv output is read again through a stored attribute
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            z = x
            if x.sum() > -1e9:  # untraceable: only nn.Sequential chains are searched
                for m in self.seq:
                    z = m(z)
                    if isinstance(m, nn.Conv2d):
                        kept = z
            return z + kept

    model = randomize(Reuse())
    with pytest.warns(UserWarning, match="differs from the eval model"):
        _, report = fold(model, torch.randn(2, 3, 4, 4), return_report=True)
    assert report.max_rel_diff > 1e-3


def test_fold_weights_against_hand_formula():
    g = torch.Generator().manual_seed(1)
    c = 6
    mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.1
    gamma, beta = torch.randn(c, generator=g), torch.randn(c, generator=g)
    eps = 1e-3
    w, b = torch.randn(c, 2, 3, 3, generator=g), torch.randn(c, generator=g)
    fw, fb = fold_weights(w, b, mean, var, gamma, beta, eps)
    for o in range(c):  # per output channel, in float64
        s = gamma[o].double() / (var[o].double() + eps) ** 0.5
        assert torch.allclose(fw[o].double(), w[o].double() * s, rtol=1e-6, atol=0)
        assert abs(float(fb[o]) - float((b[o].double() - mean[o].double()) * s + beta[o])) < 1e-6
    # no layer bias, no BN affine
    fw, fb = fold_weights(w.double(), None, mean.double(), var.double(), None, None, eps)
    s = 1 / (var.double() + eps).sqrt()
    assert torch.allclose(fw, w.double() * s[:, None, None, None], rtol=1e-14)
    assert torch.allclose(fb, -mean.double() * s, rtol=1e-14)
    assert fb.dtype == torch.float64


def test_fold_weights_grouped_transpose_matches_module():
    g = torch.Generator().manual_seed(2)
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)  # weight (4, 3, 3, 3): out channel = 3 * grp + j
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    gamma, beta = torch.randn(6, generator=g), torch.randn(6, generator=g)
    fw, fb = fold_weights(conv.weight, conv.bias, mean, var, gamma, beta, 1e-5, transpose=True)
    s = gamma / (var + 1e-5).sqrt()
    for i in range(4):
        for j in range(3):
            o = (i // 2) * 3 + j
            assert torch.allclose(fw[i, j], conv.weight[i, j] * s[o], rtol=1e-6)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ref = (conv(x) - mean[:, None, None]) * s[:, None, None] + beta[:, None, None]
        out = nn.functional.conv_transpose2d(x, fw, fb, groups=2)
    assert torch.allclose(out, ref, atol=1e-5)


def test_fold_weights_errors():
    w = torch.randn(4, 3, 3, 3)
    v = torch.ones(4)
    with pytest.raises(ValueError, match=r"at least 2 dims.*got \(4,\)"):
        fold_weights(torch.ones(4), None, v, v, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"bn_var must have one value per channel.*\(5,\)"):
        fold_weights(w, None, v, torch.ones(5), None, None, 1e-5)
    with pytest.raises(ValueError, match="does not produce the 5 channels"):
        fold_weights(w, None, torch.zeros(5), torch.ones(5), None, None, 1e-5)
    with pytest.raises(ValueError, match="transpose=True"):
        fold_weights(torch.randn(3, 4, 2, 2), None, torch.zeros(5), torch.ones(5), None, None,
                     1e-5, transpose=True)
    with pytest.raises(ValueError, match=r"bn_var \+ eps > 0.*-2"):
        fold_weights(w, None, v, -2 * v, None, None, 1e-5)


def test_fold_argument_errors():
    with pytest.raises(TypeError, match="nn.Module.*got dict"):
        fold({})
    with pytest.raises(TypeError, match="example_inputs must be a tensor.*got dict"):
        fold(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), {"x": 1})


def test_bnkit_layers_are_fx_leaves():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.nn.BatchNorm2d(4))
    graph = bnkit.tools.BNLeafTracer().trace(model)
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1"]


def test_report_str_lists_pairs():
    model = randomize(Branching())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = fold(model, return_report=True)
    text = str(report)
    assert "folded bn2 into conv2" in text and "skipped bn:" in text


def test_bn_without_affine_or_bias_and_duck_typed_frozen():
    class TVFrozenBatchNorm2d(nn.Module):  # torchvision-style: four buffers, found by name
        def __init__(self, n):
            super().__init__()
            self.eps = 1e-5
            for k, v in (("weight", 2.0), ("bias", 0.5), ("running_mean", 1.0),
                         ("running_var", 4.0)):
                self.register_buffer(k, torch.full((n,), v))

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale[None, :, None, None] + shift[None, :, None, None]

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False),
                                    nn.Conv2d(4, 4, 1, bias=False),
                                    bnkit.nn.BatchNorm2d(4, bias=False),
                                    nn.Conv2d(4, 4, 1), TVFrozenBatchNorm2d(4)))
    folded, report = fold(model, return_report=True)
    assert len(report.folded) == 3
    _check_close(model, folded, torch.randn(2, 3, 6, 6), 1e-5)
