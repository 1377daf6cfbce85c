"""Run the lab's cells, append each finished cell to metrics.jsonl, and write the report.

A cell is one (experiment, config variant, seed). Finished cells are never run again:
`resume=True` skips them, and Ctrl-C (KeyboardInterrupt) stops after writing a partial
report that shows every finished cell. With jobs > 1 the cells run in worker processes
(`bnkit.lab.pool`); the main process alone records them, shows progress and reports, and
each cell seeds itself, so the metrics equal a serial run's.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from ..progress import Bar, is_terminal, say
from . import report, store
from .config import experiment_module, load_config
from .env import collect_env
from .pool import Pool
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
    stopped: str | None = None  # why the run stopped before its last cell, if it did


class Context:
    """What a cell may use: the data set, shared artifacts and progress bars."""

    def __init__(self, run_dir: Path, config: dict, progress: bool) -> None:
        self.run_dir, self.config, self.progress = run_dir, config, progress

    def data(self):
        """Fashion-MNIST (flat float tensors, cached per process); see train.get_data."""
        return get_data(self.config["data"])

    def artifact(self, name: str, build):
        """Load artifacts/<name>.pt, or build it with build() and save it (atomically).

        One process builds an artifact while the others that need it wait (a lock file per
        artifact), and build() runs under torch's global seed crc32(name) with the caller's
        random state restored afterwards: the artifact and the calling cell's results do not
        depend on which cell built it, so parallel and serial runs agree."""
        folder = self.run_dir / "artifacts"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.pt"
        with store.file_lock(folder / f"{name}.lock"):
            if path.exists():
                return torch.load(path, weights_only=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(name.encode()))
                obj = build()
            tmp = path.with_name(path.name + ".tmp")
            torch.save(obj, tmp)
            os.replace(tmp, path)
        return obj

    def bar(self, total: int, desc: str) -> Bar:
        """A transient bar under the run's bar (hidden when progress is off or stderr is not a
        terminal); its methods return None, so a callback may end with a call to it."""
        return Bar(total, desc, enabled=self.progress, position=1)


def new_run_dir(out=None) -> Path:
    """`out`, or runs/<timestamp>; refuses a folder that already holds a run."""
    run_dir = Path(out) if out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (run_dir / store.CONFIG).exists():
        raise ValueError(f"{run_dir} already holds a lab run; continue it with --resume "
                         f"{run_dir} or pass another --out folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _plan(config: dict, done: set[str], skipped: dict) -> list[tuple]:
    """Pending (experiment, variant, seed, key): experiments in report order, each variant's
    seeds together, so a partial run has complete variants and parallel workers start on
    different seeds (whose shared artifacts they can build at the same time). Experiments
    whose requirement is missing are recorded in `skipped`."""
    todo = []
    for name, cfg in config["experiments"].items():
        mod = experiment_module(name)
        why = mod.requires(cfg)
        if why:
            skipped[name] = why
            continue
        skipped.pop(name, None)
        for variant in mod.cells(cfg):
            for seed in range(config["seeds"]):
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


ERROR_LINES = 4  # lines of a failed cell's error shown on the screen


def _failure(key: str, exc: BaseException) -> dict:
    """A failed cell as recorded in run.json, with the lines shown on the screen: the first
    lines of the error and the innermost frame (plain strings: it crosses processes)."""
    lines = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = [f"at {f.filename}:{f.lineno} in {f.name}" for f in frame]
    return {"key": key, "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc)),
            "shown": lines[:ERROR_LINES] + at}


def _show_failure(where: str, failure: dict, run_dir: Path) -> None:
    """Tell the person at the screen which cell failed and why; the whole traceback is in
    run.json."""
    text = "\n  ".join(failure["shown"])
    say(f"cell failed: {where}\n  {text}\n  (full traceback in {run_dir / store.RUN})")


def _attempt(ctx: Context, cell: tuple) -> tuple[bool, dict]:
    """(True, record) or (False, failure) for one cell (experiment, variant, seed, key)."""
    try:
        return True, _run_cell(ctx, *cell)
    except Exception as exc:  # noqa: BLE001 - a failing cell is recorded, the run goes on
        return False, _failure(cell[3], exc)


def _systematic(errors: list[dict], first: str, n_first: int) -> str | None:
    """Why to stop: every cell of the first experiment (2 or more) failed with one error."""
    if n_first < 2 or len(errors) != n_first or len({e["error"] for e in errors}) != 1:
        return None
    return (f"all {n_first} cells of the first experiment, {first}, failed with the same "
            f"error ({errors[0]['error']}); the remaining cells were not run. Fix the cause, "
            "then continue with --resume")


class _Progress:
    """The main process's side of a session: record each finished cell (the only writer of
    metrics.jsonl), count it, show it, and decide an early stop."""

    def __init__(self, ctx: Context, todo: list[tuple], run: dict, session: dict) -> None:
        self.ctx, self.run, self.session, self.total = ctx, run, session, len(todo)
        self.first = todo[0][0] if todo else ""
        self.n_first = sum(1 for cell in todo if cell[0] == self.first)
        self.first_done = 0
        self.lines = ctx.progress and not is_terminal(sys.stdout)
        self.bar = Bar(len(todo), "bnkit lab", enabled=ctx.progress, unit="cell")

    def finished(self, cell: tuple, ok: bool, value: dict, seconds: float) -> str | None:
        """Record one finished cell; returns why to stop the run, or None."""
        name, variant, seed, _ = cell
        where = f"{name}: {_label(variant)}, seed {seed}"
        if ok:
            store.append_record(self.ctx.run_dir, value)
            self.session["cells_run"] += 1
        else:
            self.run["errors"].append({k: value[k] for k in ("key", "error", "traceback")})
            _show_failure(where, value, self.ctx.run_dir)
        if self.lines:
            print(f"[{self.bar.n + 1}/{self.total}] {where}: {'done' if ok else 'FAILED'} in "
                  f"{seconds:.1f} s", flush=True)
        self.bar.advance()
        self.first_done += name == self.first
        if self.first_done == self.n_first and self.n_first:
            self.first_done = -1  # decide once
            mine = [e for e in self.run["errors"] if e["key"].split("|", 1)[0] == self.first]
            why = _systematic(mine, self.first, self.n_first)
            if why:
                self.run["stopped"] = why
                say(f"stopping: {why}")
                return why
        return None


def _loop(ctx: Context, todo: list[tuple], run: dict, session: dict, strict: bool,
          jobs: int) -> None:
    """Run the pending cells, counting them in session["cells_run"] as they finish (so an
    interrupt keeps the count); a failing cell is recorded and shown (or re-raised when
    strict). Without a terminal on stdout each finished cell prints one line, so a long run
    in a log shows it is alive. Stops early when the first experiment fails systematically
    (the reason goes to run["stopped"]). jobs > 1 runs the cells in worker processes."""
    progress = _Progress(ctx, todo, run, session)
    with progress.bar:
        if jobs > 1 and len(todo) > 1:
            _parallel(ctx, todo, progress, min(jobs, len(todo)))
            return
        for cell in todo:
            progress.bar.note(f"{cell[0]}: {_label(cell[1])}, seed {cell[2]}")
            t0 = time.perf_counter()
            result = (True, _run_cell(ctx, *cell)) if strict else _attempt(ctx, cell)
            if progress.finished(cell, *result, time.perf_counter() - t0):
                return


def _setup_worker(run_dir: str, config: dict, backend: str) -> Context:
    """A worker's state: the main process's thread count and BN backend, no progress bars."""
    from .. import set_backend

    torch.set_num_threads(config["threads"])
    set_backend(backend)
    return Context(Path(run_dir), config, progress=False)


def _work(ctx: Context, cell: tuple) -> tuple[bool, dict, float]:
    t0 = time.perf_counter()
    return (*_attempt(ctx, cell), time.perf_counter() - t0)


def _parallel(ctx: Context, todo: list[tuple], progress: _Progress, jobs: int) -> None:
    """Run the cells on `jobs` worker processes, handing out one cell per idle worker in
    plan order; an interrupt or an early stop terminates the workers (cells in progress are
    dropped, as in a serial run)."""
    from .. import get_backend

    pending = list(enumerate(todo))[::-1]
    started: dict[int, float] = {}
    with Pool(jobs, _setup_worker, (str(ctx.run_dir), ctx.config, get_backend()), _work) as pool:
        while pending or pool.busy():
            while pending and pool.idle():
                i, cell = pending.pop()
                pool.submit(i, cell)
                started[i] = time.perf_counter()
            for i, ok, value in pool.results(timeout=1.0):
                if ok:
                    ok, value, _ = value
                    progress.session["workers_cpu_s"] = (progress.session.get(
                        "workers_cpu_s", 0.0) + (value["cpu_s"] if ok else 0.0))
                else:
                    value = {"key": todo[i][3], "error": f"WorkerDied: {value}",
                             "traceback": value, "shown": [value]}
                if progress.finished(todo[i], ok, value, time.perf_counter() - started[i]):
                    pool.terminate()
                    return
            progress.bar.note(f"{pool.busy()} cell(s) in progress")


def data_folder(config: dict) -> dict:
    """`config` with "data" set to the folder Fashion-MNIST is read from, found before any
    cell runs (experiments with USES_DATA = False need none). A missing data set, or a
    `data` folder that lacks the files, raises FileNotFoundError saying where it looked and
    how to install it: nothing is run and no run folder is made."""
    if not any(getattr(experiment_module(n), "USES_DATA", True) for n in config["experiments"]):
        return config
    from ..data import locate_fashion_mnist

    return {**config, "data": str(locate_fashion_mnist(config["data"]))}


def default_jobs() -> int:
    """The number of CPU cores this process may use (the default of --jobs)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_lab(config: dict, run_dir=None, *, resume: bool = False, progress: bool = True,
            strict: bool = False, jobs: int | None = None) -> RunResult:
    """Run (or continue) a lab run and write its report.

    Fashion-MNIST is located first (`data_folder`), so a missing data set stops the run
    before anything is made; config.json records the folder actually used. The run folder is
    locked while cells run, and run.json is written as the session starts.

    Args:
        config: from `bnkit.lab.config.resolve` (ignored with resume: the saved one is used).
        run_dir: the run folder (default runs/<timestamp>); required with resume.
        resume: continue the run in run_dir, skipping finished cells.
        progress: show progress: bars on a terminal (stderr), one line per finished cell
            when stdout is not a terminal (default True).
        strict: re-raise a failing cell's exception instead of recording it (tests); runs
            the cells in this process whatever `jobs` says.
        jobs: worker processes that run cells at the same time (default None: the number of
            CPU cores, `default_jobs()`); 1 runs them in this process. The metrics do not
            depend on it (each cell seeds itself), only the timing fields do.

    Returns: a RunResult; status 'interrupted' after Ctrl-C (the partial report is written).

    Raises:
        FileNotFoundError: Fashion-MNIST is not where config["data"] (or the default search)
            says; raised before any folder is made.
        ValueError: run_dir already holds a run (without resume), is not a run folder or is
            damaged (with resume), or another process is running in it; jobs is not an
            integer >= 1.

    Example:
        >>> from bnkit.lab import resolve
        >>> result = run_lab(resolve(["init"]), "runs/init-only")     # doctest: +SKIP
        >>> result.status, result.report_html.name                    # doctest: +SKIP
        ('finished', 'report.html')
    """
    jobs = default_jobs() if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1 (got {jobs!r}); pass --jobs 1 to run "
                         "the cells in this process")
    if resume:
        run_dir = store.check_run_dir(run_dir)
        config = data_folder(load_config(run_dir))
    else:
        config = data_folder(config)
        run_dir = new_run_dir(run_dir)
    with store.locked(run_dir):
        if resume:
            run = _read_run(run_dir)
        else:
            store.write_json(run_dir / store.CONFIG, config)
            run = {"status": "running", "sessions": [], "skipped": {}, "errors": []}
        return _session(Context(run_dir, config, progress), run, strict,
                        1 if strict else jobs)


def _read_run(run_dir: Path) -> dict:
    """run.json of a run being resumed; a run killed before its first session wrote one
    (older versions) starts a fresh record."""
    note = store.drop_torn_line(run_dir)
    if note:
        say(note)
    if not (run_dir / store.RUN).exists():
        return {"status": "running", "sessions": [], "skipped": {}, "errors": []}
    run = store.read_json(run_dir / store.RUN)
    if not isinstance(run, dict) or not isinstance(run.get("sessions"), list):
        raise ValueError(  # noqa: TRY004 - a damaged file, not a wrong argument
            f"{run_dir / store.RUN}: expected an object with a 'sessions' list; "
            "restore the file, or delete it to resume with a fresh run record")
    return run


def _session(ctx: Context, run: dict, strict: bool, jobs: int) -> RunResult:
    """One process's share of a run: set threads, plan, loop, record, report. run.json is
    written as the session starts, so a run killed at any point can be resumed."""
    t0, c0, threads = time.perf_counter(), time.process_time(), torch.get_num_threads()
    torch.set_num_threads(ctx.config["threads"])
    session = {"started": datetime.now().isoformat(timespec="seconds"), "wall_s": 0.0,
               "cells_run": 0, "jobs": jobs}
    run["sessions"].append(session)
    run["errors"], run["status"] = [], "running"
    run.pop("stopped", None)
    store.write_json(ctx.run_dir / store.RUN, run)
    if not (ctx.run_dir / store.ENV).exists():
        store.write_json(ctx.run_dir / store.ENV, collect_env())
    previous = _sigterm_as_interrupt()
    try:
        todo = _plan(ctx.config, {r["key"] for r in store.read_records(ctx.run_dir)},
                     run.setdefault("skipped", {}))
        _loop(ctx, todo, run, session, strict, jobs)
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
    """Record the session (wall seconds; CPU seconds of this process plus those of the cells
    run in worker processes), write run.json and the report."""
    cpu = time.process_time() - start[1] + session.pop("workers_cpu_s", 0.0)
    session.update(wall_s=round(time.perf_counter() - start[0], 3), cpu_s=round(cpu, 3),
                   status=run["status"])
    store.write_json(ctx.run_dir / store.RUN, run)
    md, page = report.build(ctx.run_dir)
    return RunResult(ctx.run_dir, run["status"], md, page, session["cells_run"],
                     len(run["errors"]), sum(s["wall_s"] for s in run["sessions"]),
                     run.get("stopped"))
