"""Copy a finished `bnkit lab` run's report into a folder of the repository (docs/results/).

Writes DEST/report.md (the run's report, unchanged) and DEST/plots/*.png re-encoded with a
256-colour palette (the figures are flat colours and lines: about a quarter of the size,
same look), and DEST/README.md saying when, where and how the run was made, from the run's
run.json, config.json and env.json.

    python scripts/publish_lab_run.py runs/20261201-145200 docs/results
"""
from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image


def compress_png(src: Path, dst: Path) -> None:
    """src re-encoded as a palette PNG (256 colours, optimized) at dst."""
    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            dst, optimize=True)


def header(run_dir: Path) -> str:
    """DEST/README.md: the date, command, machine and versions of the run."""
    run = json.loads((run_dir / "run.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    start = run["sessions"][0]["started"] if run.get("sessions") else "unknown"
    jobs = run["sessions"][0].get("jobs", 1) if run.get("sessions") else 1
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return "\n".join([
        f"# A {config['profile']} run of the lab",
        "",
        (f"`bnkit lab --{config['profile']} --jobs {jobs}`: {config['seeds']} seeds "
        f"per cell, {config['threads']} torch thread per cell, status {run['status']}."),
        f"Started {start}; bnkit {env['bnkit']} at commit {env.get('git') or 'unknown'}.",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, {env['platform']}, no GPU"
        if not env.get("cuda") else f"Machine: {env['cpu']}, {env['cpu_count']} cores, CUDA",
        f"Python {env['python']}; {packages}.",
        "",
        "[report.md](report.md) is the run's report as `bnkit lab` wrote it (figures in",
        "`plots/`, re-encoded with a 256-colour palette). Wall and CPU times of every",
        "experiment are in its summary table.",
        "",
        f"Published {datetime.now(timezone.utc):%Y-%m-%d}.",
        "",
    ])


def main(run_dir: str, dest: str) -> None:
    run_dir, dest = Path(run_dir), Path(dest)
    (dest / "plots").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "report.md", dest / "report.md")
    for png in sorted((run_dir / "plots").glob("*.png")):
        compress_png(png, dest / "plots" / png.name)
    (dest / "README.md").write_text(header(run_dir))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
