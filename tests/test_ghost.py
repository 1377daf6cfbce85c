"""GhostBatchNorm against torch BN applied chunk by chunk, in float64."""

import pytest
import torch
from oracles import assert_pairs_close

from bnkit.nn import GhostBatchNorm
from bnkit.nn.ghost import chunk_sizes

D = torch.float64


def make(c=3, v=4, **kw):
    torch.manual_seed(0)
    m = GhostBatchNorm(c, v, dtype=D, **kw)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2)
        m.bias.uniform_(-1, 1)
    return m


def chunkwise_oracle(x, weight, bias, sizes, eps=1e-5):
    """torch BN (batch statistics, float64) on each chunk; the affine is shared."""
    outs = [torch.nn.functional.batch_norm(c, None, None, weight, bias, True, 0.0, eps)
            for c in x.split(sizes)]
    return torch.cat(outs)


def test_chunk_sizes():
    assert chunk_sizes(12, 4) == [4, 4, 4]
    assert chunk_sizes(10, 4) == [4, 4, 2]
    assert chunk_sizes(9, 4) == [4, 5]  # a lone trailing sample joins the previous chunk
    assert chunk_sizes(3, 4) == [3]
    assert chunk_sizes(1, 4) == [1]


@pytest.mark.parametrize("shape", [(12, 3), (10, 3, 5), (9, 3, 2, 3), (13, 3, 2)])
def test_matches_torch_bn_chunk_by_chunk(shape):
    m = make()
    sizes = chunk_sizes(shape[0], 4)
    x = torch.randn(shape, dtype=D) * 2 + torch.arange(shape[0], dtype=D).view(-1, *[1] * (
        len(shape) - 1))  # a different mean per sample: chunk statistics differ
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = m(xa), chunkwise_oracle(xb, w, b, sizes)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert_pairs_close((ya, yb), (xa.grad, xb.grad), (m.weight.grad, w.grad),
                       (m.bias.grad, b.grad))


def test_channels_last():
    m = make(axis=-1)
    x = torch.randn(12, 5, 3, dtype=D) + torch.arange(12, dtype=D).view(-1, 1, 1)
    expected = chunkwise_oracle(x.transpose(1, 2), m.weight, m.bias, [4, 4, 4]).transpose(1, 2)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [12, 10])
def test_running_stats_use_the_merged_statistics(n):
    m = make(momentum=0.3)
    x = torch.randn(n, 3, 5, dtype=D) * 3 + 4 * torch.arange(n, dtype=D).view(-1, 1, 1)
    m(x)
    # merged chunk statistics = the whole batch's mean and unbiased variance
    mean = x.mean((0, 2))
    var = x.var((0, 2), unbiased=True)
    torch.testing.assert_close(m.running_mean, 0.3 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, 0.7 + 0.3 * var, rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.item() == 1
    # the mean of the chunk variances (tf.keras) misses the spread of the chunk means
    chunk_var = torch.stack([c.var((0, 2), unbiased=False) for c in x.split(chunk_sizes(n, 4))])
    assert (chunk_var.mean(0) < var * 0.5).all()


def test_eval_is_plain_bn():
    m = make()
    m(torch.randn(12, 3, 2, dtype=D) + 2)
    ref = torch.nn.BatchNorm1d(3, dtype=D)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 3, 2, dtype=D)
    torch.testing.assert_close(m.eval()(x), ref.eval()(x), rtol=1e-12, atol=1e-12)


def test_without_running_stats_eval_uses_chunks():
    m = make(track_running_stats=False)
    x = torch.randn(8, 3, dtype=D) + torch.arange(8, dtype=D).view(-1, 1)
    expected = chunkwise_oracle(x, m.weight, m.bias, [4, 4])
    torch.testing.assert_close(m.eval()(x), expected, rtol=1e-10, atol=1e-10)


def test_constructor_errors():
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=r"virtual_batch_size must be an int >= 2"):
            GhostBatchNorm(3, bad)


def test_forward_errors_leave_state_unchanged():
    m = make(axis=0)
    with pytest.raises(ValueError, match=r"channel axis cannot be 0 \(got axis=0"):
        m(torch.randn(3, 4, dtype=D))
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"more than 1 value per channel .*got 1 values in "
                                         r"chunk 0 of 1 samples"):
        m(torch.randn(1, 3, dtype=D))
    with pytest.raises(ValueError, match=r"expected shape \(4,\).*got \(3,\)"):
        m(torch.randn(8, 4, dtype=D))
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[4:] = False
    mask[4, 0] = True  # chunk 1 keeps a single valid position
    with pytest.raises(ValueError, match=r"got 1 valid \(unmasked\) values in chunk 1 of 4"):
        m(torch.randn(8, 3, 5, dtype=D), mask=mask)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
