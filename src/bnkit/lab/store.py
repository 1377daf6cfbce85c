"""The run folder on disk: what is written where, and how it is read back.

    RUN_DIR/
      config.json      resolved configuration (bnkit.lab.config.resolve)
      env.json         versions, threads, CPU, git revision (bnkit.lab.env)
      run.json         status, sessions with wall times, skipped experiments, failed cells
                       (written when the run starts and when each session ends)
      metrics.jsonl    one JSON line per finished cell: experiment, variant, seed, key,
                       wall_s, metrics
      artifacts/       models shared by several cells (e.g. the pretrained CNN), each with
                       a .lock file held while one process builds it
      plots/           one PNG per experiment
      .lock            held by the process running cells here (see `locked`)
      report.md        the report; report.html is the same, self-contained
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

CONFIG, ENV, RUN, METRICS = "config.json", "env.json", "run.json", "metrics.jsonl"
LOCK = ".lock"  # held while a process runs cells in the folder


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename), so an interrupt never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    """The JSON in `path`; a file that does not parse is a ValueError naming it and where."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); this file is damaged: "
                         "restore it, or start a new run") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}, column {exc.colno}: not valid JSON "
                         f"({exc.msg}); this file is damaged: restore it, or start a new "
                         "run") from None


def cell_key(experiment: str, variant: dict, seed: int) -> str:
    """Stable identity of a cell: 'experiment|{"k": v}|seed=s' (variant keys sorted)."""
    return f"{experiment}|{json.dumps(variant, sort_keys=True)}|seed={seed}"


def append_record(run_dir: Path, record: dict) -> None:
    """Append one finished cell to metrics.jsonl as one line, flushed and synced to disk.

    A record always starts on a line of its own: after a torn write (a kill or a full disk
    mid-line) the fragment stays a separate, detectable line instead of swallowing the record.
    """
    line = (json.dumps(record) + "\n").encode("utf-8")
    with open(Path(run_dir) / METRICS, "a+b") as fh:
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = b"\n" + line
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


# what a metrics.jsonl record holds: field -> (type, as said in an error)
_FIELDS = {"experiment": (str, "a string"), "variant": (dict, "an object"),
           "seed": (int, "an integer"), "key": (str, "a string"), "metrics": (dict, "an object")}


def _record(raw: bytes, where: str) -> dict:
    """One metrics.jsonl line as a record, or ValueError naming the file, the line and why."""
    fix = ("delete that line (the cell runs again with --resume) or restore the file")
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text (byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg}); {fix}") from None
    if not isinstance(rec, dict):
        raise ValueError(  # noqa: TRY004 - a damaged file, not a wrong argument
            f"{where}: expected a cell record (a JSON object), got "
            f"{type(rec).__name__} {raw[:40].decode('utf-8', 'replace')!r}; {fix}")
    for field, (kind, said) in _FIELDS.items():
        value = rec.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "nothing" if field not in rec else f"{type(value).__name__} {value!r:.40}"
            raise ValueError(f"{where}: field {field!r} must be {said}, got {got}; "  # noqa: TRY004
                             f"{fix}")
    return rec


def _lines(run_dir: Path) -> tuple[Path, list[bytes], bool]:
    """(path, its lines, whether the last one is torn: no newline and not a valid record)."""
    path = Path(run_dir) / METRICS
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the file ends with a newline: no torn line
        return path, lines, False
    try:
        _record(lines[-1], "")
    except ValueError:
        return path, lines, True
    return path, lines, False


def read_records(run_dir: Path) -> list[dict]:
    """All finished cells, in the order they finished; a cell recorded twice keeps its last
    record. A torn last line (killed while writing) is skipped; any other damaged line is a
    ValueError that names the file, the line number and what is wrong."""
    path, lines, torn = _lines(run_dir)
    records: dict[str, dict] = {}
    for number, raw in enumerate(lines[:-1] if torn else lines, 1):
        if not raw.strip():
            continue
        rec = _record(raw, f"{path}, line {number}")
        records.pop(rec["key"], None)
        records[rec["key"]] = rec
    return list(records.values())


def drop_torn_line(run_dir: Path) -> str | None:
    """Cut a torn last line off metrics.jsonl (before a resume appends after it); returns
    what was done, to tell the user, or None when the file was whole."""
    path, lines, torn = _lines(run_dir)
    if not torn:
        return None
    keep = sum(len(line) + 1 for line in lines[:-1])
    with open(path, "r+b") as fh:
        fh.truncate(keep)
    return (f"{path}: dropped a torn last line ({len(lines[-1])} bytes, a cell killed while "
            "it was being recorded); that cell runs again")


@contextmanager
def locked(run_dir: Path):
    """Hold the run folder's lock for the duration: a second process on the same folder gets
    a ValueError at once instead of running the same cells twice. The lock dies with its
    process (flock), so a killed run never leaves the folder locked."""
    if fcntl is None:
        yield
        return
    path = Path(run_dir) / LOCK
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise ValueError(f"{run_dir} is in use by another bnkit lab process (pid {holder}); "
                             "wait for it to finish, or stop it and then resume") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` (created if missing), waiting for another process
    that holds it; released when the block ends or the process dies."""
    if fcntl is None:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_run_dir(run_dir) -> Path:
    """The folder as a Path, or ValueError when it does not hold a lab run."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a lab run folder: it has no {CONFIG}; pass a folder "
                         "written by `bnkit lab` (default runs/<timestamp>)")
    return run_dir
