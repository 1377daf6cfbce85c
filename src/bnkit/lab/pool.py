"""Worker processes for the lab's cells: a small pool the runner can stop at once.

Each worker is a fresh process (the 'forkserver' start method where it exists, else 'spawn':
forking a process whose torch thread pools are running is unsafe), talks to the main process
through its own pipe and runs one task at a time: `state = setup(*args)` once, then
`work(state, task)` per task, whose return value (which must pickle) is sent back. Workers
ignore Ctrl-C (SIGINT): the main process decides when to stop and then terminates them, so
the cell in progress is dropped as in a serial run. A worker that dies (killed, out of
memory) is reported as such for its task, and a fresh one takes its place.

Example:
    >>> with Pool(2, setup=dict, setup_args=(), work=pow_task) as pool:  # doctest: +SKIP
    ...     pool.submit(0, (2, 10))
    ...     pool.results()
    [(0, True, 1024)]
"""
from __future__ import annotations

import multiprocessing as mp
import signal
from multiprocessing.connection import wait

START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
_PRELOAD = ["torch", "bnkit.lab.runner"]  # imported once by the fork server, not per worker


def _context():
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _serve(conn, setup, setup_args, work) -> None:
    """A worker's life: ignore Ctrl-C, set up, then answer tasks until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state = setup(*setup_args)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            return
        if task is None:
            return
        conn.send(work(state, task))


class Pool:
    """`jobs` worker processes that run `work(setup(*setup_args), task)` for submitted tasks.

    Args:
        jobs: number of worker processes (>= 1).
        setup, setup_args: run once in each worker; the result is the state passed to work.
        work: a module-level function (it is pickled by reference).
    """

    def __init__(self, jobs: int, setup, setup_args: tuple, work) -> None:
        self._ctx = _context()
        self._spec = (setup, setup_args, work)
        self._workers: list[list] = []  # [process, connection, task id or None]
        for _ in range(jobs):
            self._workers.append(self._start())

    def _start(self) -> list:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(theirs, *self._spec), daemon=True)
        proc.start()
        theirs.close()
        return [proc, ours, None]

    def idle(self) -> int:
        """How many workers wait for a task."""
        return sum(1 for w in self._workers if w[2] is None)

    def busy(self) -> int:
        """How many tasks are in progress."""
        return len(self._workers) - self.idle()

    def submit(self, task_id, task) -> None:
        """Hand `task` to an idle worker (there must be one: see `idle`)."""
        worker = next(w for w in self._workers if w[2] is None)
        worker[1].send(task)
        worker[2] = task_id

    def results(self, timeout: float | None = None) -> list[tuple]:
        """Wait (up to `timeout` s) for finished tasks: [(task id, ok, value)], where ok is
        False and value a message when the worker died running the task."""
        busy = [w for w in self._workers if w[2] is not None]
        ready = wait([w[1] for w in busy] + [w[0].sentinel for w in busy], timeout)
        out = []
        for i, w in enumerate(self._workers):
            if w[2] is None or (w[1] not in ready and w[0].sentinel not in ready):
                continue
            try:
                out.append((w[2], True, w[1].recv()))
                w[2] = None
            except (EOFError, OSError):
                w[0].join(1)
                why = f"the worker process died (exit code {w[0].exitcode}) running this cell"
                out.append((w[2], False, why))
                w[1].close()
                self._workers[i] = self._start()
        return out

    def close(self) -> None:
        """Let idle workers finish and wait for them (call when no task is in progress)."""
        for proc, conn, _ in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc, conn, _ in self._workers:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            conn.close()
        self._workers = []

    def terminate(self) -> None:
        """Stop every worker now (SIGTERM), dropping the tasks in progress."""
        for proc, _, _ in self._workers:
            if proc.is_alive():
                proc.terminate()
        for proc, conn, _ in self._workers:
            proc.join()
            conn.close()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None and self.busy() == 0:
            self.close()
        else:
            self.terminate()
