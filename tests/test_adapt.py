"""bnkit.adapt (AdaBN, prior mixing, TENT) and bnkit.tools.Tent."""
import copy

import pytest
import torch
from torch import nn

import bnkit
from bnkit.data import load_fashion_mnist, make_fake_fashion_mnist
from bnkit.tools import Tent, adapt, recalibrate
from bnkit.tools.adapt import bn_affine_params, entropy

torch.set_num_threads(1)


def shift(x):
    """The target domain: low contrast, brighter."""
    return x * 0.3 + 0.5


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small BN CNN trained on a Fashion-MNIST look-alike (12x12), and its test split."""
    folder = make_fake_fashion_mnist(tmp_path_factory.mktemp("fm12"), n_train=256, n_test=128,
                                     size=12)
    (xtr, ytr), (xte, yte) = (load_fashion_mnist(s, root=folder) for s in ("train", "test"))
    xtr, xte = xtr.float()[:, None] / 255, xte.float()[:, None] / 255
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = torch.randint(0, len(xtr), (64,), generator=g)
        loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), xte, yte


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("method", ["adabn", "prior", "tent"])
def test_each_method_restores_accuracy_on_shifted_domain(source, method):
    net, x, y = source
    clean, shifted = accuracy(net, x, y), accuracy(net, shift(x), y)
    assert clean > 0.9 and shifted < 0.4  # the shift breaks the source model
    target = [shift(x[i:i + 32]) for i in range(0, len(x), 32)]
    adapted = adapt(net, target, method=method, progress=False, inplace=False)
    assert accuracy(adapted, shift(x), y) > shifted + 0.3
    assert accuracy(net, shift(x), y) == shifted  # inplace=False: the source model unchanged


def test_adabn_is_recalibrate_on_target(source):
    net, x, _ = source
    target = [(shift(x[i:i + 40]), None) for i in range(0, len(x), 40)]
    a = adapt(net, target, method="adabn", progress=False, inplace=False).state_dict()
    b = recalibrate(net, target, progress=False, inplace=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _mix(src, tgt, prior, n):
    return prior / (prior + n) * src.double() + n / (prior + n) * tgt


def test_prior_mixing_formula_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).double().eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model[1].running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64) * 2 + 1 for n in (6, 6, 4)]
    with torch.no_grad():
        z = torch.cat([model[0](x) for x in data]).transpose(0, 1).reshape(3, -1)
    mean_t, var_t = z.mean(1), z.var(1, unbiased=True)
    src_m, src_v = model[1].running_mean.clone(), model[1].running_var.clone()
    for prior, batch_size, n in ((16, None, 6), (16, 10, 10), (3.5, None, 6)):
        new = adapt(model, data, method="prior", prior=prior, batch_size=batch_size,
                    progress=False, inplace=False)
        torch.testing.assert_close(new[1].running_mean, _mix(src_m, mean_t, prior, n),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new[1].running_var, _mix(src_v, var_t, prior, n),
                                   rtol=1e-12, atol=1e-12)
    assert torch.equal(model[1].running_mean, src_m)  # a copy was adapted


def test_prior_single_batch_reproduces_online_mixing():
    """With one batch, every layer stores what the online method normalizes that batch with,
    deeper layers measured on inputs normalized by the mixed statistics upstream."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), bnkit.nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3),
                          nn.BatchNorm1d(3)).double().eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(10, 4, dtype=torch.float64) * 3 + 1
    prior, n = 16.0, 10
    h, want = x, []
    with torch.no_grad():
        for lin, bn, act in ((model[0], model[1], torch.relu), (model[3], model[4], None)):
            z = lin(h)
            m = _mix(bn.running_mean, z.mean(0), prior, n)
            v = _mix(bn.running_var, z.var(0, unbiased=True), prior, n)
            want.append((m, v))
            h = (z - m) / torch.sqrt(v + bn.eps) * bn.weight + bn.bias
            h = act(h) if act else h
    new = adapt(model, [x], method="prior", prior=prior, progress=False)
    for bn, (m, v) in zip((new[1], new[4]), want):
        torch.testing.assert_close(bn.running_mean, m, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, v, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(new(x), h, rtol=1e-10, atol=1e-10)


def mlp(dtype=torch.float64, dropout=0.5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), bnkit.nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(),
                         nn.Linear(6, 3)).to(dtype).eval()


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64) * 2 + 1


def batch_stats_copy(model):
    """Oracle for TENT's forward: other modules eval, BN layers normalizing with batch stats."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if bnkit.tools.is_bn(m):
            m.train()
            m.track_running_stats = False
    return ref


def test_tent_changes_only_bn_affine_and_follows_the_optimizer_step():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = batch_stats_copy(model)
    x = batch()
    lr = 0.05
    tent = Tent(model, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    out = tent(x)
    # predictions are those before the update, from batch statistics
    torch.testing.assert_close(out, ref(x).detach(), rtol=1e-12, atol=1e-12)
    # the update is one SGD step on the mean entropy w.r.t. gamma and beta
    loss = entropy(ref(x))
    params = bn_affine_params(ref)
    grads = torch.autograd.grad(loss, params)
    names = [f"{i}.{p}" for i in (1, 5) for p in ("weight", "bias")]
    for name, p, g in zip(names, params, grads):
        torch.testing.assert_close(model.state_dict()[name], p.detach() - lr * g,
                                   rtol=1e-12, atol=1e-12)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == set(names)  # no other parameter, no buffer
    assert not model.training and model[1].track_running_stats and model[1].weight.grad is None


def test_tent_reduces_entropy_and_episodic_resets():
    model = mlp()
    x = batch(1)
    initial = [p.detach().clone() for p in bn_affine_params(model)]
    tent = Tent(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), steps=5)
    first = entropy(tent(x))
    assert entropy(batch_stats_copy(model)(x)) < first
    tent.reset()
    assert all(torch.equal(p, q) for p, q in zip(bn_affine_params(model), initial))
    episodic = Tent(model, steps=3, episodic=True)
    a, b = episodic(x), episodic(x)
    assert torch.equal(a, b)  # each batch starts from the initial model
    assert all(torch.equal(p, q) for p, q in zip(bn_affine_params(model), initial))
    online = Tent(model, steps=1)
    a, b = online(x), online(x)
    assert not torch.equal(a, b)


def test_tent_under_no_grad_and_frozen_requires_grad():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    before = [p.detach().clone() for p in bn_affine_params(model)]
    tent = Tent(model)  # Adam, lr 1e-3
    with torch.no_grad():
        tent(batch(2))
    assert not any(p.requires_grad for p in model.parameters())
    after = bn_affine_params(model)
    assert all(not torch.equal(p, q) for p, q in zip(before, after))
    assert all((p - q).abs().max() <= 1e-3 + 1e-12 for p, q in zip(before, after))


def test_adapt_tent_sets_target_population_statistics():
    model = mlp(dropout=0.0)  # recalibrate runs in train mode: no random dropout here
    data = [batch(i) + 3 for i in range(3)]
    new = adapt(model, iter(data), method="tent", progress=False, inplace=False)  # one-shot
    want = recalibrate(new, data, progress=False, inplace=False)
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in new.state_dict().items())
    assert not torch.equal(new[1].weight, model[1].weight)
    same = adapt(model, data, method="tent", inplace=True, progress=False)
    assert same is model


@pytest.mark.parametrize("method", ["adabn", "prior", "tent"])
def test_adapt_updates_the_model_in_place_and_returns_it(method):
    """adapt(model, data) without assignment adapts `model` itself; with inplace=False a copy."""
    model = mlp(dropout=0.0)
    data = [batch(i) * 0.5 + 3 for i in range(3)]
    with torch.no_grad():  # closed form: the first BN's input over all the target data
        z = torch.cat([model[0](x) for x in data])
    mean, var = z.mean(0), z.var(0)
    kept = copy.deepcopy(model)
    copied = adapt(model, data, method=method, progress=False, inplace=False)
    assert copied is not model
    assert all(torch.equal(v, kept.state_dict()[k]) for k, v in model.state_dict().items())
    out = adapt(model, data, method=method, progress=False)
    assert out is model
    assert all(torch.equal(v, copied.state_dict()[k]) for k, v in model.state_dict().items())
    if method == "prior":  # N = 16 source samples, n = 16 target samples per batch
        mean = 0.5 * kept[1].running_mean + 0.5 * mean
        var = 0.5 * kept[1].running_var + 0.5 * var
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["adabn", "prior", "tent"])
def test_frozen_model_is_an_error_that_recommends_unfreeze(method):
    model = bnkit.freeze(mlp(dropout=0.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [batch(i) + 3 for i in range(2)]
    with pytest.raises(ValueError, match=r"found 2 frozen BN layers \(FrozenBatchNorm\)"
                                         r".*bnkit.unfreeze\(model\)") as err:
        adapt(model, data, method=method, progress=False)
    assert "adabn" not in str(err.value)  # adabn would change nothing either
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model = bnkit.unfreeze(model)  # the recommended fix works
    adapt(model, data, method=method, progress=False)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_failed_tent_pass_restores_affine():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def forward(m, x):
        if x.shape[0] == 5:
            raise RuntimeError("bad batch")
        return m(x)

    with pytest.raises(RuntimeError, match="bad batch"):
        adapt(model, [batch(0), batch(1), batch(2, n=5)], method="tent", forward=forward,
              inplace=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failed_recalibration_after_tent_restores_affine():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [batch(0), batch(1)]
    calls = []

    def forward(m, x):  # the tent pass works; the recalibration pass after it fails
        calls.append(1)
        if len(calls) > len(data):
            raise RuntimeError("bad second pass")
        return m(x)

    with pytest.raises(RuntimeError, match="bad second pass"):
        adapt(model, data, method="tent", forward=forward, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_errors():
    model = mlp()
    data = [batch()]
    with pytest.raises(ValueError, match="unknown method 'bn'.*'adabn'"):
        adapt(model, data, method="bn")
    with pytest.raises(ValueError, match="prior must be a number >= 0.*-1"):
        adapt(model, data, method="prior", prior=-1)
    with pytest.raises(ValueError, match="batch_size must be None.*got 0"):
        adapt(model, data, method="prior", batch_size=0)
    with pytest.raises(TypeError, match="iterable of batches"):
        adapt(model, batch())
    with pytest.raises(ValueError, match="no batches"):
        adapt(model, [], method="tent", progress=False)
    with pytest.raises(ValueError, match="steps must be a positive int.*got 0"):
        Tent(model, steps=0)
    with pytest.raises(ValueError, match="BN layers with affine parameters to train; found 1 BN layer "
                                         r"\(BatchNorm1d\) with affine=False.*'adabn'"):
        Tent(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False)))
    with pytest.raises(ValueError, match="BN layers with affine parameters to train; found no BN layer"):
        Tent(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="only the BN affine parameters.*1 other tensor"):
        Tent(model, optimizer=torch.optim.SGD([model[0].weight], lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be None.*got str"):
        Tent(model, optimizer="adam")
    with pytest.raises(ValueError, match="logits of shape \\(N, K, ...\\).*1D"):
        Tent(nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2), nn.Flatten(0)).double())(batch())
    # an optimizer over the original's parameters cannot drive the copy adapt works on
    opt = torch.optim.SGD(bn_affine_params(model), lr=0.1)
    with pytest.raises(ValueError, match="with inplace=False adapt works on a copy"):
        adapt(model, data, method="tent", optimizer=opt, progress=False, inplace=False)
