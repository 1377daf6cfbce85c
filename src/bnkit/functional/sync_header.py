"""The call header of synchronized BN: every rank checks that all ranks make the same call.

Before the statistics are gathered, each rank all-gathers one fixed-size float64 vector
describing its call (`HEADER`: whether its input passed validation, channel count, input
dtype, number of dims, channel axis, whether running statistics are updated, eps and
momentum). The statistics message has a size and dtype that depend on the channel count and
the input dtype, so ranks that disagree would otherwise exchange messages of different sizes
(gloo aborts the process) or, worse, of equal sizes (float32 with C=3 and float16 with C=7
are both 64 bytes) and merge garbage. The header has the same size and dtype on every rank
whatever the call, and every rank receives the same table, so every rank takes the same
decision: all raise the same error naming who has what, or all go on. Nothing has been
written at that point.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["HEADER", "agree", "call_header", "rejected_header"]

# (field, description in messages); the order is the layout of the header vector
HEADER = (("status", "input accepted"), ("channels", "channels (num_features)"),
          ("dtype", "input dtype"), ("dims", "input dims"), ("axis", "channel axis"),
          ("tracked", "updates running stats"), ("eps", "eps"), ("momentum", "momentum"))
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_code(dtype: torch.dtype) -> float:
    return float(_DTYPES.index(dtype)) if dtype in _DTYPES else -1.0


def header_device(x, group) -> torch.device:
    """Where the header lives: the input's device, or the current GPU for nccl (which
    cannot send CPU tensors) when the input is not a CUDA tensor."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def call_header(x: torch.Tensor, axis: int, running_mean, eps: float, momentum: float,
                device) -> torch.Tensor:
    """This rank's header for a validated call (axis already in [0, ndim))."""
    tracked = running_mean is not None
    values = (1.0, float(x.shape[axis]), _dtype_code(x.dtype), float(x.dim()), float(axis),
              float(tracked), float(eps), float(momentum) if tracked else 0.0)
    return torch.tensor(values, dtype=torch.float64, device=device)


def rejected_header(device) -> torch.Tensor:
    """The header of a rank whose input failed validation: status 0, nothing else."""
    return torch.zeros(len(HEADER), dtype=torch.float64, device=device)


def _show(field: str, value: float) -> str:
    if field == "dtype":
        code = int(value)
        return str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else "other"
    if field == "tracked":
        return "yes" if value else "no"
    if field in ("eps", "momentum"):
        return repr(value)
    return str(int(value))


def _who(field: str, column: list[float], ranks: list[int]) -> str:
    """'4 (rank 0) vs 6 (ranks 1, 2)' for one field's column of the table."""
    groups: dict[float, list[int]] = {}
    for value, rank in zip(column, ranks):
        groups.setdefault(value, []).append(rank)
    return " vs ".join(f"{_show(field, v)} (rank{'s' if len(rs) > 1 else ''} "
                       f"{', '.join(map(str, rs))})" for v, rs in groups.items())


def disagreement(table: torch.Tensor, ranks: list[int], me: int) -> str | None:
    """The error message for a gathered header table (W, len(HEADER)), or None when every
    rank made the same valid call. `me` is this rank's global rank. Identical on every rank
    (it reads only the shared table), except that the message names `me`."""
    rows = table.tolist()
    if rows[0][0] == 1.0 and all(row == rows[0] for row in rows):
        return None  # the common case, decided without building anything
    rejected = [r for r, row in zip(ranks, rows) if row[0] == 0.0]
    if rejected:
        return (f"SyncBatchNorm: rank{'s' if len(rejected) > 1 else ''} "
                f"{', '.join(map(str, rejected))} rejected {'their' if len(rejected) > 1 else 'its'}"
                f" input (the error is raised there; see its log), so rank {me} raises too "
                "instead of waiting in the collective; no rank changed its running statistics")
    columns = {field: [row[i] for row in rows] for i, (field, _) in enumerate(HEADER)}
    if not all(columns["tracked"]):
        del columns["momentum"]  # meaningless (0) where running statistics are not updated
    diffs = [f"{desc}: {_who(field, columns[field], ranks)}" for field, desc in HEADER[1:]
             if field in columns and len(set(columns[field])) > 1]
    if not diffs:
        return None
    return ("SyncBatchNorm: the ranks of the process group called it with different settings ("
            + "; ".join(diffs) + "); every rank must call the same layer, configured alike (same "
            "num_features, input dtype and rank, axis, track_running_stats, eps, momentum), in "
            "the same order: build the model identically on every rank and switch train()/eval()"
            " on all of them. Nothing was changed on any rank")


def agree(header: torch.Tensor, group, collective) -> str | None:
    """All-gather the headers (one small collective) and return `disagreement`'s verdict.

    `collective(op, tensors, group, what)` runs the collective (sync.py's error wrapper)."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(header) for _ in range(world)]
    collective(dist.all_gather, (parts, header), group, "all_gather of the call header")
    ranks = dist.get_process_group_ranks(group)
    return disagreement(torch.stack(parts).cpu(), ranks, dist.get_rank())
