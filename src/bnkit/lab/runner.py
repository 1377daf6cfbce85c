"""Run the lab's cells, append each finished cell to metrics.jsonl, and write the report.

A cell is one (experiment, config variant, seed). Finished cells are never run again:
`resume=True` skips them, and Ctrl-C (KeyboardInterrupt) stops after writing a partial
report that shows every finished cell.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from . import report, store
from .config import experiment_module
from .env import collect_env
from .train import get_data


@dataclass
class RunResult:
    """Where a run went and how it ended ('finished', 'interrupted' or 'failed')."""

    run_dir: Path
    status: str
    report_md: Path | None
    report_html: Path | None
    cells_run: int
    errors: int
    wall_s: float


class Context:
    """What a cell may use: the data set, shared artifacts and progress bars."""

    def __init__(self, run_dir: Path, config: dict, progress: bool) -> None:
        self.run_dir, self.config, self.progress = run_dir, config, progress

    def data(self):
        """Fashion-MNIST (flat float tensors, cached per process); see train.get_data."""
        return get_data(self.config["data"])

    def artifact(self, name: str, build):
        """Load artifacts/<name>.pt, or build it with build() and save it (atomically)."""
        folder = self.run_dir / "artifacts"
        path = folder / f"{name}.pt"
        if path.exists():
            return torch.load(path, weights_only=False)
        obj = build()
        folder.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)
        return obj

    def bar(self, total: int, desc: str):
        """A transient tqdm bar (hidden when progress is off or stderr is not a terminal)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, position=1,
                    disable=None if self.progress else True)


def new_run_dir(out=None) -> Path:
    """`out`, or runs/<timestamp>; refuses a folder that already holds a run."""
    run_dir = Path(out) if out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (run_dir / store.CONFIG).exists():
        raise ValueError(f"{run_dir} already holds a lab run; continue it with --resume "
                         f"{run_dir} or pass another --out folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _plan(config: dict, done: set[str], skipped: dict) -> list[tuple]:
    """Pending (experiment, variant, seed, key), seeds outer so a partial run has complete
    seeds; experiments whose requirement is missing are recorded in `skipped`."""
    todo = []
    for name, cfg in config["experiments"].items():
        mod = experiment_module(name)
        why = mod.requires(cfg)
        if why:
            skipped[name] = why
            continue
        skipped.pop(name, None)
        for seed in range(config["seeds"]):
            for variant in mod.cells(cfg):
                key = store.cell_key(name, variant, seed)
                if key not in done:
                    todo.append((name, variant, seed, key))
    return todo


def _run_cell(ctx: Context, name: str, variant: dict, seed: int, key: str) -> dict:
    """Run one cell with fixed seeds; return its metrics record."""
    mod = experiment_module(name)
    torch.manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = mod.run_cell(ctx, ctx.config["experiments"][name], variant, seed)
    return {"experiment": name, "variant": variant, "seed": seed, "key": key,
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "metrics": metrics}


def _label(variant: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in variant.items())


def _loop(ctx: Context, todo: list[tuple], run: dict, session: dict, strict: bool) -> None:
    """Run the pending cells, counting them in session["cells_run"] as they finish (so an
    interrupt keeps the count); a failing cell is recorded (or re-raised when strict)."""
    from tqdm.auto import tqdm

    with tqdm(todo, desc="bnkit lab", unit="cell", disable=None if ctx.progress else True) as it:
        for name, variant, seed, key in it:
            it.set_postfix_str(f"{name}: {_label(variant)}, seed {seed}", refresh=False)
            try:
                store.append_record(ctx.run_dir, _run_cell(ctx, name, variant, seed, key))
                session["cells_run"] += 1
            except Exception as exc:
                if strict:
                    raise
                run["errors"].append({"key": key, "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()})


def run_lab(config: dict, run_dir=None, *, resume: bool = False, progress: bool = True,
            strict: bool = False) -> RunResult:
    """Run (or continue) a lab run and write its report.

    Args:
        config: from `bnkit.lab.config.resolve` (ignored with resume: the saved one is used).
        run_dir: the run folder (default runs/<timestamp>); required with resume.
        resume: continue the run in run_dir, skipping finished cells.
        progress: show tqdm bars (default True; hidden anyway when stderr is not a terminal).
        strict: re-raise a failing cell's exception instead of recording it (tests).

    Returns: a RunResult; status 'interrupted' after Ctrl-C (the partial report is written).

    Example:
        >>> from bnkit.lab import resolve
        >>> result = run_lab(resolve(["init"]), "runs/init-only")     # doctest: +SKIP
        >>> result.status, result.report_html.name                    # doctest: +SKIP
        ('finished', 'report.html')
    """
    if resume:
        run_dir = store.check_run_dir(run_dir)
        config = store.read_json(run_dir / store.CONFIG)
        run = store.read_json(run_dir / store.RUN)
    else:
        run_dir = new_run_dir(run_dir)
        store.write_json(run_dir / store.CONFIG, config)
        run = {"status": "running", "sessions": [], "skipped": {}, "errors": []}
    return _session(Context(run_dir, config, progress), run, strict)


def _session(ctx: Context, run: dict, strict: bool) -> RunResult:
    """One process's share of a run: set threads, plan, loop, record, report."""
    t0, c0, threads = time.perf_counter(), time.process_time(), torch.get_num_threads()
    torch.set_num_threads(ctx.config["threads"])
    session = {"started": datetime.now().isoformat(timespec="seconds"), "wall_s": 0.0,
               "cells_run": 0}
    run["sessions"].append(session)
    run["errors"], run["status"] = [], "running"
    if not (ctx.run_dir / store.ENV).exists():
        store.write_json(ctx.run_dir / store.ENV, collect_env())
    previous = _sigterm_as_interrupt()
    try:
        todo = _plan(ctx.config, {r["key"] for r in store.read_records(ctx.run_dir)},
                     run.setdefault("skipped", {}))
        _loop(ctx, todo, run, session, strict)
        run["status"] = "finished" if not run["errors"] else "failed"
    except KeyboardInterrupt:
        run["status"] = "interrupted"
    except BaseException:
        run["status"] = "failed"
        _close(ctx, run, session, (t0, c0))
        raise
    finally:
        torch.set_num_threads(threads)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return _close(ctx, run, session, (t0, c0))


def _sigterm_as_interrupt():
    """Treat SIGTERM (kill, a scheduler's stop) like Ctrl-C so finished cells and a partial
    report are kept. Returns the previous handler, or None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    return signal.signal(signal.SIGTERM, interrupt)


def _close(ctx: Context, run: dict, session: dict, start: tuple) -> RunResult:
    """Record the session (wall and process CPU seconds), write run.json and the report."""
    session.update(wall_s=round(time.perf_counter() - start[0], 3),
                   cpu_s=round(time.process_time() - start[1], 3), status=run["status"])
    store.write_json(ctx.run_dir / store.RUN, run)
    md, page = report.build(ctx.run_dir)
    return RunResult(ctx.run_dir, run["status"], md, page, session["cells_run"],
                     len(run["errors"]),
                     sum(s["wall_s"] for s in run["sessions"]))
