"""Recurrent: BN-LSTM against LSTM on row-by-row sequential Fashion-MNIST (Cooijmans et al.
2016), a short run.

Each image is read as 28 steps of 28 pixels; a linear head classifies the last hidden
state. Both networks start like the paper's: input weights orthogonal, hidden-to-hidden
weights four identity blocks, forget-gate bias 1; trained with RMSProp and gradient
clipping at 1. The LSTM is torch.nn.LSTM; the BN-LSTM is bnkit.nn.BNLSTM (BN on W_h h,
W_x x and c_t, statistics per time step, gamma starting at 0.1).
"""
from __future__ import annotations

import torch
from torch import nn

from . import plots
from .models import RowRNN
from .sections import Section, Table, by, compare, evidence, finite, fmt, mean, metric, pct
from .train import TrainConfig, evaluate, fit, images, subset

NAME = "recurrent"
TITLE = "BN-LSTM against LSTM on sequential Fashion-MNIST"
CLAIM = ("Batch-normalizing the LSTM's recurrent and input transformations (BN-LSTM) makes it "
         "reach a higher test accuracy than a plain LSTM after the same number of steps.")

_BASE = {"hidden": 32, "batch": 64, "lr": 2e-3, "clip": 1.0, "cells": ["lstm", "bnlstm"]}
PROFILES = {
    "mini": {**_BASE, "hidden": 8, "batch": 16, "steps": 4, "eval_every": 2,
             "test_subset": 64},
    "quick": {**_BASE, "steps": 60, "eval_every": 10, "test_subset": 1000},
    "full": {**_BASE, "hidden": 100, "lr": 1e-3, "steps": 1000, "eval_every": 100,
             "test_subset": None},
}


def requires(cfg: dict) -> str | None:
    from .. import nn as bnn

    return None if hasattr(bnn, "BNLSTM") else "bnkit.nn has no BNLSTM yet"


def cells(cfg: dict) -> list[dict]:
    return [{"cell": c} for c in cfg["cells"]]


def paper_init_lstm(lstm: nn.LSTM) -> nn.LSTM:
    """torch LSTM with the paper's init: W_ih orthogonal, W_hh identity blocks, forget bias 1
    (torch's gate order is i, f, g, o; the forget block is rows H..2H)."""
    h = lstm.hidden_size
    with torch.no_grad():
        nn.init.orthogonal_(lstm.weight_ih_l0)
        lstm.weight_hh_l0.copy_(torch.eye(h).repeat(4, 1))
        lstm.bias_ih_l0.zero_()
        lstm.bias_hh_l0.zero_()
        lstm.bias_ih_l0[h:2 * h].fill_(1.0)
    return lstm


def make_rnn(kind: str, hidden: int, side: int = 28, seed: int = 0) -> RowRNN:
    """'lstm' (torch.nn.LSTM) or 'bnlstm' (bnkit.nn.BNLSTM) over rows, with a linear head."""
    from ..nn import BNLSTM

    torch.manual_seed(seed)
    if kind == "lstm":
        cell = paper_init_lstm(nn.LSTM(side, hidden, batch_first=True))
    else:
        cell = BNLSTM(side, hidden, max_steps=side, batch_first=True)
    return RowRNN(cell, hidden)


def run_cell(ctx, cfg: dict, variant: dict, seed: int) -> dict:
    data = subset(ctx.data(), n_test=cfg["test_subset"])
    model = make_rnn(variant["cell"], cfg["hidden"], seed=seed)
    xt = images(data.x_test)

    def eval_fn(m, row):
        return {"test_acc": evaluate(m, xt, data.y_test, 500)}

    with ctx.bar(cfg["steps"], variant["cell"]) as bar:
        config = TrainConfig(steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                             optimizer="rmsprop", clip=cfg["clip"], eval_every=cfg["eval_every"],
                             seed=seed)
        rows = fit(model, images(data.x_train), data.y_train, config, bar=bar, eval_fn=eval_fn)
    return {"steps": [r["step"] for r in rows], "acc": [r["test_acc"] for r in rows],
            "loss": [r["train_loss"] for r in rows], "final_acc": rows[-1]["test_acc"]}


def summarize(cfg: dict, records: list[dict]) -> Section:
    groups = by(records, "cell")
    lstm, bn = groups.get(("lstm",), []), groups.get(("bnlstm",), [])
    la, ba = mean(metric(lstm, "final_acc")), mean(metric(bn, "final_acc"))
    verdict, paragraphs = "not run", []
    if finite(la, ba):
        verdict = compare(metric(bn, "final_acc"), metric(lstm, "final_acc"), "a > b")
        mid = len(bn[0]["metrics"]["acc"]) // 2
        lm = mean([r["metrics"]["acc"][mid] for r in lstm])
        bm = mean([r["metrics"]["acc"][mid] for r in bn])
        paragraphs.append(
            f"After {cfg['steps']:,} steps of batch {cfg['batch']} (hidden size {cfg['hidden']}):"
            f" BN-LSTM {pct(ba)} test accuracy, LSTM {pct(la)}; at step "
            f"{bn[0]['metrics']['steps'][mid]:,}: {pct(bm)} vs {pct(lm)}. In this short run the "
            f"claim {'is ' if verdict == 'inconclusive' else ''}{verdict} (BN-LSTM minus LSTM: "
            f"{evidence(metric(bn, 'final_acc'), metric(lstm, 'final_acc'), 100, unit=' points')})"
            ".")
    fig, (a, b) = plots.figure(2, 1)
    for i, (kind, recs) in enumerate((("LSTM", lstm), ("BN-LSTM", bn))):
        if recs:
            steps = recs[0]["metrics"]["steps"]
            plots.band(a, steps, metric(recs, "acc"), kind, plots.COLORS[i], scale=100)
            plots.band(b, steps, metric(recs, "loss"), kind, plots.COLORS[i])
    plots.finish(a, "test accuracy", "step", "%")
    plots.finish(b, "training loss (mean since last evaluation)", "step", "cross-entropy")
    rows = [[k, fmt(metric(r, "final_acc"), 100)] for k, r in (("LSTM", lstm), ("BN-LSTM", bn))]
    return Section(NAME, TITLE, CLAIM, f"BN-LSTM {pct(ba)} vs LSTM {pct(la)}", verdict,
                   paragraphs, Table(["cell", "final test acc %"], rows), fig)
