"""The run folder on disk: what is written where, and how it is read back.

    RUN_DIR/
      config.json      resolved configuration (bnkit.lab.config.resolve)
      env.json         versions, threads, CPU, git revision (bnkit.lab.env)
      run.json         status, sessions with wall times, skipped experiments, failed cells
      metrics.jsonl    one JSON line per finished cell: experiment, variant, seed, key,
                       wall_s, metrics
      artifacts/       models shared by several cells (e.g. the pretrained CNN)
      plots/           one PNG per experiment
      report.md        the report; report.html is the same, self-contained
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG, ENV, RUN, METRICS = "config.json", "env.json", "run.json", "metrics.jsonl"


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename), so an interrupt never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def cell_key(experiment: str, variant: dict, seed: int) -> str:
    """Stable identity of a cell: 'experiment|{"k": v}|seed=s' (variant keys sorted)."""
    return f"{experiment}|{json.dumps(variant, sort_keys=True)}|seed={seed}"


def append_record(run_dir: Path, record: dict) -> None:
    """Append one finished cell to metrics.jsonl, flushed and synced to disk."""
    with open(Path(run_dir) / METRICS, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_records(run_dir: Path) -> list[dict]:
    """All finished cells, in the order they finished; a torn last line (killed while
    writing) is ignored, and a cell recorded twice keeps its last record."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        records.pop(rec["key"], None)
        records[rec["key"]] = rec
    return list(records.values())


def check_run_dir(run_dir) -> Path:
    """The folder as a Path, or ValueError when it does not hold a lab run."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a lab run folder: it has no {CONFIG}; pass a folder "
                         "written by `bnkit lab` (default runs/<timestamp>)")
    return run_dir
