"""One training step, as every layer of the family records it (`functional.running.record_step`):
the running statistics against torch's BatchNorm in float64 and num_batches_tracked advanced
by exactly one per successful training call, on every path a call can take; eval calls and
failed calls leave both bit-identical."""
import pytest
import torch
from torch import nn

import bnkit.nn as bnn

D = torch.float64
C = 3


def _family():
    """name -> (layer factory taking momentum, call(layer, x), row of the buffers it updates:
    None for the whole (C,) buffer)."""
    plain = lambda m, x: m(x)
    return {
        "BatchNorm2d": (lambda mom: bnn.BatchNorm2d(C, momentum=mom, dtype=D), plain, None),
        "BatchNormAct": (lambda mom: bnn.BatchNormAct(C, act="relu", momentum=mom, dtype=D),
                         plain, None),
        "GhostBatchNorm": (lambda mom: bnn.GhostBatchNorm(C, 4, momentum=mom, dtype=D), plain,
                           None),
        "BatchRenorm": (lambda mom: bnn.BatchRenorm(C, momentum=mom, dtype=D), plain, None),
        "RecurrentBatchNorm": (lambda mom: bnn.RecurrentBatchNorm(C, 3, momentum=mom, dtype=D),
                               lambda m, x: m(x, 1), 1),
        "SyncBatchNorm": (lambda mom: bnn.SyncBatchNorm(C, momentum=mom, dtype=D), plain, None),
        "InPlaceABN": (lambda mom: bnn.InPlaceABN(C, momentum=mom, dtype=D), plain, None),
    }


FAMILY = _family()


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()
            if k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def _rows(state, row):
    return {k: v if row is None else v[row] for k, v in state.items()}


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, C, 5, 5, generator=g, dtype=D) * (i + 2) + i for i in range(3)]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_training_steps_match_torch_and_count_once(name, momentum, bn_path):
    make, call, row = FAMILY[name]
    if name == "BatchRenorm":  # r_max=1, d_max=0: the running update is BN's
        layer = bnn.BatchRenorm(C, momentum=momentum, r_max=1.0, d_max=0.0, dtype=D)
    else:
        layer = make(momentum)
    ref = nn.BatchNorm2d(C, momentum=momentum, dtype=D)
    for i, x in enumerate(_batches()):
        call(layer, x.clone().requires_grad_(True) * 1)  # a non-leaf, as in a model
        ref(x)
        got = _rows(_state(layer), row)
        steps = got["num_batches_tracked"]
        assert int(steps) == i + 1, f"{name}: step count after {i + 1} calls"
        torch.testing.assert_close(got["running_mean"], ref.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(got["running_var"], ref.running_var, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_eval_and_failed_calls_leave_the_step_untouched(name, bn_path):
    make, call, _ = FAMILY[name]
    layer = make(0.1)
    call(layer, _batches()[0])
    before = _state(layer)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        call(layer, torch.randn(8, C + 1, 5, 5, dtype=D))  # wrong channel count
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        call(layer, torch.randn(1, C, 1, 1, dtype=D))  # one value per channel
    layer.eval()
    call(layer, _batches()[1])
    after = _state(layer)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{name}: {k} changed"


def test_csrc_never_counts_steps():
    """The C++ node blends inside its statistics pass, in record_step's arithmetic, but the
    step counter is the owner's: no kernel source touches one."""
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "src" / "bnkit" / "csrc"
    sources = sorted(csrc.glob("*.cpp")) + sorted(csrc.glob("*.h"))
    assert sources
    for path in sources:
        text = path.read_text()
        assert "counter" not in text and "num_batches_tracked" not in text, path.name
