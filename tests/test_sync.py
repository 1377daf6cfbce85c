"""SyncBatchNorm: 2 gloo processes on CPU against single-process BN on the concatenated batch.

The two ranks run every scenario in one spawn (workers below) and save what they saw; the
tests compare it with torch's BatchNorm in float64 (bnkit's masked BN for the masked case).
Loss on rank r: L_r = sum(y_r * g_r); the single-process loss is L = sum_r L_r. Then dx on
each rank equals the single-process dx of its rows, and DDP's averaged weight/bias gradient
times the world size equals the single-process one (DDP divides the sum over ranks by 2).
"""
from __future__ import annotations

import datetime
import inspect
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnkit import kernels
from bnkit.nn import BatchNorm
from bnkit.nn.sync import SyncBatchNorm

WORLD = 2
PG_TIMEOUT_S = 20   # bounds every collective in the workers: a bug fails, never hangs
HANG_TIMEOUT_S = 2  # the process-group timeout under test in the failure scenario
ROOT = Path(__file__).resolve().parents[1]

# name: per-rank batch sizes, trailing shape (C, ...), momentum, options
SCENARIOS = {
    "even": {"sizes": (4, 4), "tail": (3, 5), "momentum": 0.1},
    "uneven_4d_cumulative": {"sizes": (3, 5), "tail": (2, 3, 2), "momentum": None},
    "empty_rank_2d": {"sizes": (0, 6), "tail": (3,), "momentum": 0.1},
    "masked_uneven": {"sizes": (3, 5), "tail": (3, 6), "momentum": 0.1, "masked": True},
    "float32_off_centre": {"sizes": (4, 4), "tail": (3, 5), "momentum": 0.1,
                           "dtype": torch.float32},
    "no_affine_no_stats": {"sizes": (2, 3), "tail": (3, 4), "momentum": 0.1, "affine": False,
                           "track": False},
    # padding holds NaN/Inf (the loss reads only valid outputs): it must add nothing
    "masked_nan_padding": {"sizes": (3, 5), "tail": (3, 6), "momentum": 0.1, "masked": True,
                           "nan_padding": True},
    # eps=0 with a constant channel: x_hat = 0 there, so the output is exactly the bias
    "constant_channel_eps0": {"sizes": (3, 4), "tail": (3, 5), "momentum": 0.1, "eps": 0.0,
                              "constant": True},
}


# ----------------------------------------------------------------------------- shared data
def full_batch(name: str, step: int):
    """Concatenated batch of all ranks: (x, g, mask) in float64, same on every process."""
    sc = SCENARIOS[name]
    gen = torch.Generator().manual_seed(1000 * list(SCENARIOS).index(name) + step)
    shape = (sum(sc["sizes"]), *sc["tail"])
    offset = 1e3 if name.startswith("float32") else 3.0  # off-centre: tests the f64 stats
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = None
    if sc.get("masked"):
        lengths = torch.randint(1, shape[-1] + 1, (shape[0],), generator=gen)
        mask = torch.arange(shape[-1])[None, :] < lengths[:, None]  # (N, L)
    if sc.get("nan_padding"):
        pad = ~mask[:, None, :].expand(shape)
        x = x.masked_fill(pad, float("nan"))
        x[:, 1][pad[:, 1]] = float("inf")
        g = g.masked_fill(pad, 0.0)
    if sc.get("constant"):
        x[:, 0] = 7.25
    return x, g, mask


def rank_rows(name: str, rank: int) -> slice:
    sizes = SCENARIOS[name]["sizes"]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def init_affine(bn) -> None:
    """Deterministic non-trivial weight and bias."""
    if bn.weight is None:
        return
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.5 * torch.randn(bn.weight.shape, generator=gen))
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))


def wrap_ddp(module):
    """DDP that does not overwrite the ranks' buffers with rank 0's during training."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(module, forward_sync_buffers=False)
    return DDP(module, broadcast_buffers=False)


# ----------------------------------------------------------------------------- workers
def _init(rank: int, store: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    # The sync logic is backend-independent and the compiled backends are checked against the
    # reference in their own tests; skipping their start-up (JIT) keeps the spawn short. The
    # example test below runs the synchronized layer on the automatically chosen backend.
    kernels.set_backend("reference")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=timeout_s))


def _run_scenario(rank: int, name: str) -> dict:
    sc = SCENARIOS[name]
    dtype = sc.get("dtype", torch.float64)
    bn = SyncBatchNorm(sc["tail"][0], momentum=sc["momentum"], affine=sc.get("affine", True),
                       track_running_stats=sc.get("track", True), dtype=dtype,
                       eps=sc.get("eps", 1e-5))
    init_affine(bn)
    model = wrap_ddp(bn) if bn.weight is not None else bn
    steps = []
    for step in range(2):
        x, g, mask = full_batch(name, step)
        rows = rank_rows(name, rank)
        xr = x[rows].to(dtype).requires_grad_()
        y = model(xr, mask=None if mask is None else mask[rows])
        (y.double() * g[rows]).nan_to_num(0.0).sum().backward()  # NaN only where g = 0
        grads = {k: getattr(bn, k).grad.clone() for k in ("weight", "bias")
                 if getattr(bn, k) is not None}
        steps.append({"y": y.detach().clone(), "dx": xr.grad.clone(), **grads})
        bn.zero_grad(set_to_none=True)
    buffers = {k: getattr(bn, k).clone() for k in
               ("running_mean", "running_var", "num_batches_tracked") if getattr(bn, k) is not None}
    return {"steps": steps, "buffers": buffers}


def _expect_error(fn) -> dict:
    try:
        fn()
    except (ValueError, TypeError) as err:  # the built-in type (bnkit.errors' classes
        builtin = next(c for c in type(err).__mro__ if c.__module__ == "builtins")  # derive)
        return {"type": builtin.__name__, "msg": str(err)}
    return {"type": None, "msg": ""}


def _error_cases(rank: int) -> dict:
    """Errors raised identically on both ranks; state must stay untouched."""
    bn = SyncBatchNorm(3, dtype=torch.float64)
    one = torch.ones(1 if rank == 0 else 0, 3, dtype=torch.float64)  # 1 value in total
    out = {"global_one": _expect_error(lambda: bn(one)),
           "channels": _expect_error(lambda: bn(torch.randn(4, 5, dtype=torch.float64))),
           "mask_dtype": _expect_error(lambda: bn(torch.randn(4, 3, 2, dtype=torch.float64),
                                                  mask=torch.ones(4, 2)))}
    out["state"] = [bn.running_mean.clone(), bn.running_var.clone(),
                    bn.num_batches_tracked.clone()]
    x = torch.arange(4.0, dtype=torch.float64)[:, None].expand(4, 3) + 4 * rank
    out["after"] = bn(x).detach()  # the group still works after the errors
    empty = SyncBatchNorm(3, dtype=torch.float64)
    xe = torch.empty(0, 3, dtype=torch.float64, requires_grad=True)
    ye = empty(xe)
    ye.sum().backward()  # still joins the all_reduce: no hang
    out["all_empty"] = {"y": ye.detach(), "dx": xe.grad, "dw": empty.weight.grad,
                        "state": [empty.running_mean.clone(), empty.running_var.clone(),
                                  empty.num_batches_tracked.clone()]}
    return out


def _singleton_groups(rank: int) -> dict:
    """A process group of one rank: SyncBatchNorm is plain BN over the local batch."""
    groups = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    bn = SyncBatchNorm(3, process_group=groups[rank], dtype=torch.float64)
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    y = bn(x).detach()
    world_bn = SyncBatchNorm(3, dtype=torch.float64).eval()  # eval: running stats, no sync
    return {"x": x, "y": y, "running_var": bn.running_var.clone(), "eval": world_bn(x).detach()}


def _timed_failure(bn, x) -> dict:
    start = time.monotonic()
    try:
        bn(x)
    except RuntimeError as err:
        return {"raised": True, "seconds": time.monotonic() - start, "msg": str(err)}
    return {"raised": False, "seconds": time.monotonic() - start, "msg": ""}


def _peer_failures(rank: int, out_dir: str) -> None:
    """Rank 1 first stalls (rank 0 must time out), then exits (rank 0 must fail fast)."""
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=HANG_TIMEOUT_S))
    done = Path(out_dir, "stall_done")
    if rank == 1:  # alive but never joins the collective, then dies before the next one
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(3)
    x = torch.randn(4, 3)
    stalled = _timed_failure(SyncBatchNorm(3, process_group=short), x)
    done.touch()
    time.sleep(1.0)  # let rank 1 exit before the next collective starts
    exited = _timed_failure(SyncBatchNorm(3), x)
    torch.save({"stalled": stalled, "exited": exited}, os.path.join(out_dir, "failure.pt"))
    os._exit(0)  # the group is broken: skip its teardown


def worker(rank: int, store: str, out_dir: str) -> None:
    """Every 2-rank check in one spawn (starting processes is the slow part)."""
    _init(rank, store, PG_TIMEOUT_S)
    results = {}
    for name in SCENARIOS:
        try:
            results[name] = _run_scenario(rank, name)
        except Exception as err:  # noqa: BLE001 - reported by the test of that scenario
            results[name] = repr(err)
    results["errors"] = _error_cases(rank)
    results["singleton"] = _singleton_groups(rank)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    _peer_failures(rank, out_dir)


def _spawn(worker, out_dir: Path, limit_s: float) -> None:
    """Run `worker(rank, store, out_dir)` on 2 spawned processes; kill them after limit_s."""
    ctx = mp.get_context("spawn")
    store = str(out_dir / "store")
    procs = [ctx.Process(target=worker, args=(r, store, str(out_dir))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, f"workers still running after {limit_s} s (a hang)"


# ----------------------------------------------------------------------------- oracle
def _oracle_module(name: str):
    sc = SCENARIOS[name]
    c, nd = sc["tail"][0], len(sc["tail"]) + 1
    kw = {"momentum": sc["momentum"], "affine": sc.get("affine", True),
          "track_running_stats": sc.get("track", True), "dtype": torch.float64,
          "eps": sc.get("eps", 1e-5)}
    if sc.get("masked") or kw["eps"] == 0:  # torch's BN refuses eps=0 in training
        return BatchNorm(c, **kw)  # single-process BN (masked) on the concatenated batch
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[nd]
    return cls(c, **kw)


def oracle(name: str) -> dict:
    bn = _oracle_module(name)
    init_affine(bn)
    steps = []
    for step in range(2):
        x, g, mask = full_batch(name, step)
        x = x.to(SCENARIOS[name].get("dtype", torch.float64)).double().requires_grad_()
        y = bn(x) if mask is None else bn(x, mask=mask)
        (y * g).nan_to_num(0.0).sum().backward()
        grads = {k: getattr(bn, k).grad.clone() for k in ("weight", "bias")
                 if getattr(bn, k) is not None}
        steps.append({"y": y.detach(), "dx": x.grad, **grads})
        bn.zero_grad(set_to_none=True)
    buffers = {k: getattr(bn, k).clone() for k in
               ("running_mean", "running_var", "num_batches_tracked") if getattr(bn, k) is not None}
    return {"steps": steps, "buffers": buffers}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    _spawn(worker, out, limit_s=240)
    return out


@pytest.fixture(scope="module")
def ranks(spawned):
    return [torch.load(spawned / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def failure(spawned):
    return torch.load(spawned / "failure.pt", weights_only=False)


# ----------------------------------------------------------------------------- 2 ranks
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_single_process_bn(ranks, name):
    for r in range(WORLD):
        assert isinstance(ranks[r][name], dict), f"rank {r} failed: {ranks[r][name]}"
    ref = oracle(name)
    f32 = SCENARIOS[name].get("dtype") == torch.float32
    tol = {"rtol": 1e-5, "atol": 1e-5} if f32 else {"rtol": 1e-10, "atol": 1e-10}
    tol["equal_nan"] = SCENARIOS[name].get("nan_padding", False)  # padded outputs only
    for step in range(2):
        want = ref["steps"][step]
        for r in range(WORLD):
            got, rows = ranks[r][name]["steps"][step], rank_rows(name, r)
            torch.testing.assert_close(got["y"].double(), want["y"][rows], **tol)
            torch.testing.assert_close(got["dx"].double(), want["dx"][rows], **tol)
            for k in ("weight", "bias"):
                if k in want:  # DDP's average over ranks, times the world size
                    torch.testing.assert_close(got[k].double() * WORLD, want[k], **tol)
    for r in range(WORLD):
        got = ranks[r][name]["buffers"]
        assert set(got) == set(ref["buffers"])
        for k, v in ref["buffers"].items():
            torch.testing.assert_close(got[k].to(v.dtype), v, **tol)


def test_padding_and_constant_channels_stay_finite_across_ranks(ranks):
    for r in range(WORLD):
        steps = ranks[r]["masked_nan_padding"]["steps"]
        _, _, mask = full_batch("masked_nan_padding", 0)
        valid = mask[rank_rows("masked_nan_padding", r)][:, None, :].expand_as(steps[0]["y"])
        assert torch.isfinite(steps[0]["y"][valid]).all()
        assert torch.isfinite(steps[0]["dx"]).all() and torch.isfinite(steps[0]["weight"]).all()
        assert torch.isfinite(ranks[r]["masked_nan_padding"]["buffers"]["running_var"]).all()
        const = ranks[r]["constant_channel_eps0"]["steps"][0]
        bias = ranks[r]["constant_channel_eps0"]["steps"][0]["y"][:, 0]
        assert torch.isfinite(const["dx"]).all() and torch.unique(bias).numel() == 1


def test_two_steps_tracked_two_batches(ranks):
    # the empty rank counts the step too: the global batch was not empty
    assert [int(ranks[r]["empty_rank_2d"]["buffers"]["num_batches_tracked"])
            for r in range(WORLD)] == [2, 2]


def test_global_batch_of_one_value_raises_on_every_rank(ranks):
    for r in range(WORLD):
        err = ranks[r]["errors"]["global_one"]
        assert err["type"] == "ValueError"
        assert "more than 1 value per channel" in err["msg"]
        assert "got 1 valid values per channel over all 2 ranks" in err["msg"]
        assert f"input shape {(1, 3) if r == 0 else (0, 3)}" in err["msg"]


def test_validation_errors_on_every_rank_leave_state_untouched(ranks):
    for r in range(WORLD):
        errors = ranks[r]["errors"]
        assert errors["channels"]["type"] == "ValueError"
        assert "expected shape (5,)" in errors["channels"]["msg"]
        assert errors["mask_dtype"]["type"] == "TypeError"
        assert "mask must be a boolean tensor" in errors["mask_dtype"]["msg"]
        mean, var, steps = errors["state"]
        assert torch.equal(mean, torch.zeros(3, dtype=torch.float64))
        assert torch.equal(var, torch.ones(3, dtype=torch.float64))
        assert int(steps) == 0


def test_group_keeps_working_after_errors(ranks):
    # rank 0 holds 0..3, rank 1 holds 4..7 in every channel: global mean 3.5, var 5.25
    x = torch.arange(8.0, dtype=torch.float64)
    want = (x - 3.5) / torch.sqrt(torch.tensor(5.25 + 1e-5, dtype=torch.float64))
    for r in range(WORLD):
        got = ranks[r]["errors"]["after"]
        torch.testing.assert_close(got, want[4 * r: 4 * r + 4, None].expand(4, 3))


def test_every_rank_empty_gives_empty_output_and_no_update(ranks):
    for r in range(WORLD):
        res = ranks[r]["errors"]["all_empty"]
        assert res["y"].shape == (0, 3) and res["dx"].shape == (0, 3)
        assert torch.equal(res["dw"], torch.zeros(3, dtype=torch.float64))
        mean, var, steps = res["state"]
        assert torch.equal(mean, torch.zeros(3, dtype=torch.float64))
        assert torch.equal(var, torch.ones(3, dtype=torch.float64))
        assert int(steps) == 0


def test_singleton_process_group_is_plain_bn(ranks):
    for r in range(WORLD):
        res = ranks[r]["singleton"]
        bn = torch.nn.BatchNorm1d(3, dtype=torch.float64)
        torch.testing.assert_close(res["y"], bn(res["x"]).detach())
        torch.testing.assert_close(res["running_var"], bn.running_var)
        torch.testing.assert_close(res["eval"], res["x"] / (1 + 1e-5) ** 0.5)  # mean 0, var 1


# ----------------------------------------------------------------------------- failures
def test_stalled_peer_raises_after_the_group_timeout(failure):
    res = failure["stalled"]
    assert res["raised"], "a collective with a stalled peer returned"
    # it waited for the group's timeout (not less: the peer was alive), then raised
    assert HANG_TIMEOUT_S * 0.9 <= res["seconds"] <= HANG_TIMEOUT_S + 15, res
    assert "all_gather of the call header failed on rank 0" in res["msg"]
    assert "timeout=datetime.timedelta" in res["msg"]


def test_exited_peer_raises_within_bounded_time(failure):
    res = failure["exited"]
    assert res["raised"], "a collective with a dead peer returned"
    assert res["seconds"] < PG_TIMEOUT_S / 2, res  # the closed connection is seen at once
    assert "a peer rank exited" in res["msg"]


# ----------------------------------------------------------------------------- disagreeing ranks
MISMATCH_TIMEOUT_S = 5  # the group's timeout in these scenarios: a raise must come well before

# name: (rank 0's layer options and input, rank 1's); input = (shape, dtype)
MISMATCHES = {
    "channels": (({"num_features": 4}, ((8, 4), torch.float64)),
                 ({"num_features": 6}, ((8, 6), torch.float64))),
    # float32 with C=3 and float16 with C=7 send statistics messages of equal size (64 bytes)
    "dtype_equal_message_size": (({"num_features": 3}, ((8, 3), torch.float32)),
                                 ({"num_features": 7}, ((8, 7), torch.float16))),
    "axis": (({"num_features": 4, "axis": 1}, ((8, 4, 4), torch.float64)),
             ({"num_features": 4, "axis": -1}, ((8, 4, 4), torch.float64))),
    "running_stats": (({"num_features": 3}, ((8, 3), torch.float64)),
                      ({"num_features": 3, "track_running_stats": False},
                       ((8, 3), torch.float64))),
    "one_rank_rejects": (({"num_features": 4}, ((8, 4), torch.float64)),
                         ({"num_features": 4}, ((8, 5), torch.float64))),
}


def _snapshot(bn) -> list:
    return [t.detach().clone() for t in (*bn.parameters(), *bn.buffers())]


def _unchanged(bn, before) -> bool:
    return all(torch.equal(a, b) for a, b in
               zip(before, [t.detach() for t in (*bn.parameters(), *bn.buffers())]))


def _disagreeing_call(bn, x, group=None) -> dict:
    if group is not None:
        bn.process_group = group
    before = _snapshot(bn)
    start = time.monotonic()
    try:
        y = bn(x)
        out = {"type": None, "msg": "", "y": y.detach()}
    except Exception as err:  # noqa: BLE001 - the test checks type and message
        builtin = next(c for c in type(err).__mro__ if c.__module__ == "builtins")
        out = {"type": builtin.__name__, "msg": str(err)}  # bnkit.errors derive from it
    out.update(seconds=time.monotonic() - start, unchanged=_unchanged(bn, before))
    return out


def mismatch_worker(rank: int, store: str, out_dir: str) -> None:
    """Ranks that call the layer differently: every rank must raise, nothing written, no hang."""
    _init(rank, store, PG_TIMEOUT_S)
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=MISMATCH_TIMEOUT_S))
    results = {}
    for name, per_rank in MISMATCHES.items():
        options, (shape, dtype) = per_rank[rank]
        bn = SyncBatchNorm(**options, process_group=short)
        init_affine(bn)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(rank)) * 2 + 10
        results[name] = _disagreeing_call(bn, x.to(dtype))
    # rank 0 trains, rank 1 evaluates (no collective, as in torch): rank 0 waits for the timeout
    eval_group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=MISMATCH_TIMEOUT_S))
    bn = SyncBatchNorm(3, process_group=eval_group, dtype=torch.float64).train(rank == 0)
    results["train_vs_eval"] = _disagreeing_call(bn, torch.randn(8, 3, dtype=torch.float64) + 10)
    dist.barrier()  # rank 1 stays alive until rank 0 has given up waiting
    x = torch.arange(4.0, dtype=torch.float64)[:, None].expand(4, 3) + 4 * rank
    results["after"] = SyncBatchNorm(3, dtype=torch.float64)(x).detach()  # the group still works
    torch.save(results, os.path.join(out_dir, f"mismatch{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_mismatch")
    _spawn(mismatch_worker, out, limit_s=120)
    return [torch.load(out / f"mismatch{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name, wants", [
    ("channels", ["channels (num_features): 4 (rank 0) vs 6 (rank 1)"]),
    ("dtype_equal_message_size", ["channels (num_features): 3 (rank 0) vs 7 (rank 1)",
                                  "input dtype: float32 (rank 0) vs float16 (rank 1)"]),
    ("axis", ["channel axis: 1 (rank 0) vs 2 (rank 1)"]),
    ("running_stats", ["updates running stats: yes (rank 0) vs no (rank 1)"])])
def test_disagreeing_ranks_all_raise_the_same_error(mismatched, name, wants):
    msgs = []
    for r in range(WORLD):
        res = mismatched[r][name]
        assert res["type"] == "ValueError", (r, res)
        for want in wants:
            assert want in res["msg"], (r, res["msg"])
        assert "Nothing was changed on any rank" in res["msg"]
        assert "momentum:" not in res["msg"]  # unused where running stats are not updated
        assert res["unchanged"], f"rank {r} wrote state"
        assert res["seconds"] < MISMATCH_TIMEOUT_S / 2, res  # raised at once, not timed out
        msgs.append(res["msg"])
    assert msgs[0] == msgs[1]


def test_header_table_names_every_rank_of_each_value():
    from bnkit.functional.sync_header import call_header, disagreement

    def header(c, dtype=torch.float32, eps=1e-5, momentum=0.1):
        return call_header(torch.empty(2, c, dtype=dtype), 1, torch.empty(c), eps, momentum,
                           "cpu")

    same = torch.stack([header(4) for _ in range(3)])
    assert disagreement(same, [0, 1, 2], 0) is None
    table = torch.stack([header(4), header(6, eps=1e-3), header(6, momentum=0.5)])
    msg = disagreement(table, [0, 2, 5], 2)  # global ranks of a subgroup
    assert "channels (num_features): 4 (rank 0) vs 6 (ranks 2, 5)" in msg
    assert "eps: 1e-05 (ranks 0, 5) vs 0.001 (rank 2)" in msg
    assert "momentum: 0.1 (ranks 0, 2) vs 0.5 (rank 5)" in msg
    assert "input dtype:" not in msg and "channel axis:" not in msg


def test_input_rejected_on_one_rank_makes_every_rank_raise(mismatched):
    own, peer = mismatched[1]["one_rank_rejects"], mismatched[0]["one_rank_rejects"]
    assert own["type"] == "ValueError" and "expected shape (5,)" in own["msg"]
    assert peer["type"] == "ValueError"
    assert "rank 1 rejected its input" in peer["msg"] and "rank 0 raises too" in peer["msg"]
    for res in (own, peer):
        assert res["unchanged"] and res["seconds"] < MISMATCH_TIMEOUT_S / 2, res


def test_training_rank_facing_an_eval_rank_raises_after_the_timeout(mismatched):
    train, ev = mismatched[0]["train_vs_eval"], mismatched[1]["train_vs_eval"]
    assert train["type"] == "RuntimeError" and train["unchanged"]
    assert "all_gather of the call header failed on rank 0" in train["msg"]
    assert "eval mode" in train["msg"]
    assert MISMATCH_TIMEOUT_S * 0.9 <= train["seconds"] <= MISMATCH_TIMEOUT_S + 15, train
    # the eval rank makes no collective call (so evaluating on one rank works) and writes nothing
    assert ev["type"] is None and ev["unchanged"]


def test_group_keeps_working_after_disagreements(mismatched):
    x = torch.arange(8.0, dtype=torch.float64)
    want = (x - 3.5) / torch.sqrt(torch.tensor(5.25 + 1e-5, dtype=torch.float64))
    for r in range(WORLD):
        torch.testing.assert_close(mismatched[r]["after"], want[4 * r: 4 * r + 4, None].expand(4, 3))


# ----------------------------------------------------------------------------- one process
def _pair(cls_torch=torch.nn.BatchNorm2d, **kw):
    ours = SyncBatchNorm(4, dtype=torch.float64, **kw)
    ref = cls_torch(4, dtype=torch.float64, **kw)
    init_affine(ours)
    init_affine(ref)
    return ours, ref


@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_is_plain_bn(momentum):
    assert not dist.is_initialized()
    ours, ref = _pair(momentum=momentum)
    for step in range(2):
        x = torch.randn(3, 4, 5, 2, dtype=torch.float64) * 3 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn_like(x)
        (ours(xa) * g).sum().backward()
        (ref(xb) * g).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    ours.eval()
    ref.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_world_size_one_is_plain_bn(world_of_one):
    ours, ref = _pair(torch.nn.BatchNorm1d)
    x = torch.randn(6, 4, 3, dtype=torch.float64) + 2
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)


def test_sync_function_gradcheck_in_a_group_of_one(world_of_one):
    """The distributed Function itself (merge + all-reduce with one rank), float64."""
    from bnkit.functional.sync import SyncBatchNormFunction

    x = (torch.randn(3, 2, 4, dtype=torch.float64) * 2 + 3).requires_grad_()
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)[:, None]
    for m in (None, mask):
        fn = lambda x, w, b, m=m: SyncBatchNormFunction.apply(x, w, b, m, 1e-5, 1,
                                                              world_of_one)[0]
        assert torch.autograd.gradcheck(fn, (x, w, b))
    y = SyncBatchNormFunction.apply(x, w, b, None, 1e-5, 1, world_of_one)[0]
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, w, b, True))


def test_functional_matches_torch_in_a_group_of_one(world_of_one):
    from bnkit.functional.sync import sync_batch_norm

    x = torch.randn(7, 3, dtype=torch.float64) * 5 - 2
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    y = sync_batch_norm(x, rm, rv, momentum=0.3, process_group=world_of_one)
    want = torch.nn.functional.batch_norm(x, rm2, rv2, training=True, momentum=0.3)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(rv, rv2)
    x3 = torch.randn(4, 5, 3, dtype=torch.float64)  # channels last, axis=-1
    y3 = sync_batch_norm(x3, axis=-1, process_group=world_of_one)
    want3 = torch.nn.functional.batch_norm(x3.transpose(1, 2), None, None, training=True)
    torch.testing.assert_close(y3, want3.transpose(1, 2))


def test_functional_errors(world_of_one, monkeypatch):
    from bnkit.functional.sync import sync_batch_norm

    with pytest.raises(TypeError, match=r"process_group must be None .* \(got str\)"):
        sync_batch_norm(torch.randn(4, 3), process_group="world")
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel .* \(got 1 valid"):
        sync_batch_norm(torch.randn(1, 3), process_group=world_of_one)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match=r"nccl backend needs CUDA tensors \(got input on cpu\)"):
        sync_batch_norm(torch.randn(4, 3), process_group=world_of_one)


def test_module_errors():
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(TypeError, match=r"process_group must be None .* \(got int\)"):
        SyncBatchNorm(3, process_group=1)
    with pytest.raises(ValueError, match=r"num_features must be a positive int"):
        SyncBatchNorm(0)


# ----------------------------------------------------------------------------- conversion
def test_convert_sync_batchnorm_keeps_parameters_and_buffers():
    import bnkit.nn as bnn

    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.Sequential(bnn.BatchNorm(4, eps=1e-3, axis=1), torch.nn.ReLU()),
        torch.nn.Flatten(), torch.nn.LazyLinear(5), torch.nn.BatchNorm1d(5, affine=False))
    model(torch.randn(6, 2, 5, 5))  # non-trivial running statistics
    for m in model.modules():
        if hasattr(m, "weight") and isinstance(m, (torch.nn.BatchNorm2d, bnn.BatchNorm)):
            init_affine(m)
    model.eval()
    x = torch.randn(3, 2, 5, 5)
    want = model(x)
    params, buffers = list(model.parameters()), [b.clone() for b in model.buffers()]
    conv = SyncBatchNorm.convert_sync_batchnorm(model)
    assert conv is model
    assert [type(m).__name__ for m in (conv[1], conv[2][0], conv[5])] == ["SyncBatchNorm"] * 3
    assert all(a is b for a, b in zip(conv.parameters(), params))  # same Parameter objects
    for a, b in zip(conv.buffers(), buffers):
        assert torch.equal(a, b)
    assert conv[1].momentum is None and conv[2][0].eps == 1e-3 and not conv[5].affine
    assert not conv[1].training
    torch.testing.assert_close(conv(x), want)


def test_convert_a_bare_batchnorm_and_state_dict_both_ways():
    bn = torch.nn.BatchNorm3d(3)
    bn(torch.randn(4, 3, 2, 2, 2) + 1)
    sync = SyncBatchNorm.convert_sync_batchnorm(bn)
    assert isinstance(sync, SyncBatchNorm) and sync.running_mean is bn.running_mean
    fresh = SyncBatchNorm(3)
    fresh.load_state_dict(bn.state_dict())
    back = torch.nn.BatchNorm3d(3)
    back.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(back.running_var, bn.running_var)
    assert int(back.num_batches_tracked) == 1


def test_convert_rejects_uninitialized_lazy_bn():
    with pytest.raises(ValueError, match=r"cannot convert LazyBatchNorm2d before its first"):
        SyncBatchNorm.convert_sync_batchnorm(torch.nn.LazyBatchNorm2d())


# ----------------------------------------------------------------------------- example
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_example(tiny_idx_dir, launcher: list[str], batch_size: int) -> tuple[list, float]:
    cmd = [*launcher, str(ROOT / "examples" / "ddp_train.py"), "--steps", "3", "--data",
           str(tiny_idx_dir), "--batch-size", str(batch_size), "--log-every", "1",
           "--timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120,
                          env=env, cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"step \d+ loss ([0-9.]+)", proc.stdout)]
    final = re.search(r"test accuracy ([0-9.]+) world_size (\d+) replica_spread (\S+)",
                      proc.stdout)
    assert len(losses) == 3 and final, proc.stdout
    world = 1 if launcher == [sys.executable] else 2
    assert int(final[2]) == world and float(final[3]) == 0.0  # replicas identical
    return losses, float(final[1])


@pytest.mark.slow
def test_ddp_train_example_equals_one_process_on_the_global_batch(tiny_idx_dir):
    """2 ranks x 16 images with SyncBatchNorm + DDP train exactly like 1 process x 32 images
    (same global batches): BN sees the global batch and DDP's average of the ranks' mean
    losses is the global mean loss."""
    one, acc_one = _run_example(tiny_idx_dir, [sys.executable], 32)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    two, acc_two = _run_example(tiny_idx_dir, torchrun, 16)
    assert all(0 < v < 10 for v in two)
    # printed with 4 decimals; float32 sums in a different order differ far less than that
    assert max(abs(a - b) for a, b in zip(one, two)) <= 2e-4, (one, two)
    assert abs(acc_one - acc_two) <= 1 / 128 + 1e-9  # at most one of 128 test images flips
