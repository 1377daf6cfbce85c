"""validate_call's quick acceptance of plainly valid calls never changes an outcome: over a
grid of valid and invalid calls, a Python-int axis (eligible for the quick path) and the same
axis as a NumPy integer (always the full checks) give the same normalized axis, or the same
error with the same message."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bnkit.functional import checks


def _outcome(args, axis):
    x, rm, rv, w, b, training, momentum, eps, mask, act = args
    try:
        return ("ok", checks.validate_call(x, rm, rv, w, b, training, momentum, eps, axis, mask,
                                           act))
    except Exception as err:  # noqa: BLE001 - the outcome compared is the error itself
        return (type(err), str(err))


def _vectors(c):
    good = torch.ones(c)
    return [None, good, torch.ones(c, requires_grad=True), torch.ones(c + 1),
            torch.ones(c, dtype=torch.int64), torch.ones(c, dtype=torch.float64),
            torch.ones(1, c), torch.ones(c, device="meta"), [1.0] * c]


INPUTS = [torch.randn(4, 3, 5), torch.randn(4, 3).half(), torch.randn(2, 3, 4, 4),
          torch.ones(4, 3, dtype=torch.int64), torch.randn(3), torch.randn(4, 3, device="meta")]


@pytest.mark.parametrize("x", INPUTS, ids=lambda x: f"{tuple(x.shape)}-{x.dtype}-{x.device}")
def test_quick_acceptance_agrees_with_the_full_checks(x):
    c = x.shape[1] if x.dim() > 1 else 3
    vecs = _vectors(c)
    pairs = [(None, None), (vecs[1], vecs[1].clone()), (vecs[1], None), (vecs[2], vecs[1]),
             (vecs[3], vecs[1]), (vecs[7], vecs[7])]
    scalars = [(True, 0.1, 1e-5), (False, 0.1, 1e-5), (True, 1.5, 1e-5), (True, 0.1, -1.0),
               (True, 1, 1e-5), (1, 0.1, 1e-5), (True, 0.1, np.float64(1e-5)),
               (True, None, 1e-5)]
    seen = 0
    for (rm, rv), w, (training, momentum, eps), axis, act in itertools.product(
            pairs, vecs, scalars, (1, -1, 0, 3, -4), ("identity", "relu", "tanh", None)):
        args = (x, rm, rv, w, w, training, momentum, eps, None, act)
        quick, full = _outcome(args, axis), _outcome(args, np.int64(axis))
        assert quick == full, (args, axis)
        seen += quick[0] == "ok"
    assert (seen > 0) == (x.is_floating_point() and x.dim() > 1)  # valid calls too


def test_a_mask_is_checked_in_full():
    x = torch.randn(4, 3, 5)
    for mask in (torch.ones(4, 5, dtype=torch.bool), torch.ones(4, 5), torch.ones(4, 6) > 0):
        args = (x, None, None, None, None, True, 0.1, 1e-5, mask, "identity")
        assert _outcome(args, 1) == _outcome(args, np.int64(1))
