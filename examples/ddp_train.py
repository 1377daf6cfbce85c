"""Train a small CNN on Fashion-MNIST with DDP and bnkit's SyncBatchNorm, on CPU or GPU.

    torchrun --nproc-per-node 2 examples/ddp_train.py --steps 200
    torchrun --nproc-per-node 2 examples/ddp_train.py --steps 3 --data DIR --batch-size 16
    python examples/ddp_train.py --steps 50          # one process: SyncBatchNorm is plain BN

Each step draws one global batch of world_size * batch_size images (the same permutation on
every rank) and gives each rank its slice, so the BN statistics are those of the global batch.
Without a GPU the gloo backend runs on CPU; with one GPU per rank it uses nccl. DDP runs with
broadcast_buffers=False: the replicas' running statistics agree only because SyncBatchNorm
computes them from the same global batch, which the script checks at the end. Rank 0 prints the
loss (mean over ranks) and the test accuracy.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bnkit.nn as bnn
from bnkit.data import load_fashion_mnist
from bnkit.nn.sync import SyncBatchNorm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files "
                   "(default: $BNKIT_DATA, ~/.cache/bnkit/fashion-mnist, /usr/share/datasets)")
    p.add_argument("--batch-size", type=int, default=64, help="images per rank and step")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a collective may "
                   "wait for a peer before raising (default 60)")
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def setup(timeout_s: float) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets RANK/WORLD_SIZE; without them: 1 process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # The timeout bounds every collective: a dead or stuck peer gives an error, not a hang.
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def build_model() -> nn.Module:
    """28x28x1 -> 10 logits; the bnkit BatchNorm2d layers become SyncBatchNorm."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), bnn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2),                                          # 16 x 14 x 14
        nn.Conv2d(16, 32, 3, padding=1, bias=False), bnn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),                    # 32 * 4 * 4
        nn.Linear(32 * 4 * 4, 10))
    return SyncBatchNorm.convert_sync_batchnorm(model)


def load(split: str, root, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as (N, 1, H, W) floats standardized with the train-set constants."""
    images, labels = load_fashion_mnist(split, root=root)
    x = (images.float().unsqueeze(1) / 255.0 - 0.2860) / 0.3530
    return x.to(device), labels.to(device)


def rank_slice(n: int, step: int, rank: int, world: int, batch: int, seed: int) -> torch.Tensor:
    """This rank's indices of the step's global batch (same permutation on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randperm(n, generator=g)[: batch * world]
    return idx[rank * batch: (rank + 1) * batch]


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DDP that never copies rank 0's buffers over the others' during training."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, forward_sync_buffers=False)  # newer torch: the non-deprecated name
    return DDP(model, broadcast_buffers=False)


def all_mean(value: torch.Tensor, world: int) -> float:
    """Mean of a scalar over ranks (the value itself with one process)."""
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
    return float(value) / world


@torch.no_grad()
def accuracy(model: nn.Module, x, y, rank: int, world: int) -> float:
    """Test accuracy; each rank evaluates every world-th image, counts are summed."""
    model.eval()
    xs, ys = x[rank::world], y[rank::world]
    pred = torch.cat([model(xs[i: i + 1000]).argmax(1) for i in range(0, len(xs), 1000)])
    counts = torch.tensor([float((pred == ys).sum()), float(len(pred))],
                          device=x.device)
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    return float(counts[0] / counts[1])


@torch.no_grad()
def replica_spread(model: nn.Module, world: int) -> float:
    """Largest difference between ranks over all parameters and BN buffers (0 = in sync)."""
    flat = torch.cat([t.detach().double().flatten() for t in
                      list(model.parameters()) + list(model.buffers())])
    if world == 1:
        return 0.0
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float((hi - lo).abs().max())


def train(args, rank: int, world: int, device) -> None:
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    x_train, y_train = load("train", args.data, device)
    x_test, y_test = load("test", args.data, device)
    model = build_model().to(device)
    net = wrap_ddp(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    for step in range(1, args.steps + 1):
        idx = rank_slice(len(x_train), step, rank, world, args.batch_size, args.seed).to(device)
        loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:  # the same steps on every rank
            mean_loss = all_mean(loss, world)
            if rank == 0:
                print(f"step {step} loss {mean_loss:.4f}", flush=True)
    acc = accuracy(model, x_test, y_test, rank, world)
    spread = replica_spread(model, world)
    if rank == 0:
        print(f"test accuracy {acc:.4f} world_size {world} replica_spread {spread:.3e}",
              flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    rank, world, device = setup(args.timeout)
    try:
        train(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
