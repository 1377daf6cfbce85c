"""Train a batch-normalized LSTM (Cooijmans et al. 2016) for a few steps.

Reads images row by row (28 steps of 28 pixels) and classifies them from the last hidden
state. By default the data are random (a fixed batch to fit, runs anywhere); with --data it
uses Fashion-MNIST (found as bnkit.data finds it, or in --root).

    python examples/bn_lstm.py --steps 50
    python examples/bn_lstm.py --data --steps 300 --hidden 64
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from bnkit.nn import BNLSTM


class RowClassifier(nn.Module):
    """BN-LSTM over the rows of an image, then a linear layer on the last hidden state."""

    def __init__(self, rows: int = 28, cols: int = 28, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.lstm = BNLSTM(cols, hidden, max_steps=rows)
        self.head = nn.Linear(hidden, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, rows, cols) -> (N, classes)
        _, (h, _) = self.lstm(images)
        return self.head(h)


def batches(args, generator):
    """Endless (images float (N, 28, 28) in [0, 1], labels (N,)) batches."""
    if not args.data:
        images = torch.rand(args.batch, 28, 28, generator=generator)
        labels = torch.randint(0, 10, (args.batch,), generator=generator)
        while True:
            yield images, labels  # one fixed batch: the loss must go down
    from bnkit.data import load_fashion_mnist

    images, labels = load_fashion_mnist("train", root=args.root)
    while True:
        idx = torch.randint(0, len(labels), (args.batch,), generator=generator)
        yield images[idx].float() / 255.0, labels[idx]


def main(argv=None) -> list[float]:
    """Parse arguments, train, print and return the loss of every step."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="store_true", help="use Fashion-MNIST, not random data")
    p.add_argument("--root", default=None, help="folder holding the Fashion-MNIST files")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rows", type=int, default=28, help="read only the first rows (a quick run)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = RowClassifier(rows=args.rows, hidden=args.hidden)
    opt = torch.optim.RMSprop(model.parameters(), lr=args.lr)  # the paper's optimizer
    losses = []
    for step, (x, y) in zip(range(args.steps), batches(args, torch.Generator().manual_seed(1))):
        loss = nn.functional.cross_entropy(model(x[:, :args.rows]), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as in the paper
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    main()
