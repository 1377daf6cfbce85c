"""Build report.md and report.html from a run folder's saved files only.

The report is a pure function of config.json, env.json, run.json and metrics.jsonl, so
`bnkit report RUN_DIR` rebuilds it byte for byte (report.md) after a run, an interrupt or a
resume. report.html embeds every plot as base64 and carries its own CSS: one file to share.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from . import store
from .config import PROFILE_NOTES, experiment_module, load_config
from .plots import png_bytes
from .sections import Section, Table

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f2f2f2}
img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:.6em;overflow:auto;
font-size:.85em}.holds{color:#17702b}.does-not-hold{color:#b3261e}.mixed{color:#a15c00}
.inconclusive{color:#5f6368;font-style:italic}"""


def duration(seconds: float) -> str:
    """61.5 -> '1 min 2 s'; 9.25 -> '9.2 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec} s"


def sections(run_dir: Path) -> list[Section]:
    """One Section per configured experiment, from the finished cells."""
    config = load_config(run_dir)
    run = _read_run(run_dir)
    records = store.read_records(run_dir)
    out = []
    for name, cfg in config["experiments"].items():
        mod = experiment_module(name)
        recs = [r for r in records if r["experiment"] == name]
        planned = len(mod.cells(cfg)) * config["seeds"]
        if name in run.get("skipped", {}) or not recs:
            why = run.get("skipped", {}).get(name) or _why_none(run, name)
            sec = Section(name, mod.TITLE, mod.CLAIM, headline=f"not run: {why}",
                          paragraphs=[f"Not run: {why}."])
        else:
            sec = _summarize(mod, cfg, recs)
        sec.config, sec.cells = cfg, (len(recs), planned)
        out.append(sec)
    return out


def _why_none(run: dict, name: str) -> str:
    """Why an experiment has no finished cell: its cells' error, or not reached yet."""
    failed = [e for e in run.get("errors", []) if e["key"].split("|", 1)[0] == name]
    if failed:
        return f"every cell failed ({len(failed)}), e.g. {failed[0]['error']}"
    return "no cell finished (the run was interrupted or has not reached this experiment)"


def _summarize(mod, cfg: dict, records: list[dict]) -> Section:
    """mod.summarize, or a section that shows the error (the rest of the report still builds)."""
    try:
        return mod.summarize(cfg, records)
    except Exception as exc:  # noqa: BLE001 - one experiment's summary must not sink the report
        why = f"the summary could not be built: {type(exc).__name__}: {exc}"
        return Section(mod.NAME, mod.TITLE, mod.CLAIM, headline=why, paragraphs=[why + "."])


def _read_run(run_dir: Path) -> dict:
    path = run_dir / store.RUN
    return store.read_json(path) if path.exists() else {"status": "unknown", "sessions": []}


def _times(records: list[dict], name: str) -> tuple[float, float]:
    """(wall, process CPU) seconds spent in the finished cells of one experiment."""
    mine = [r for r in records if r["experiment"] == name]
    return sum(r.get("wall_s", 0.0) for r in mine), sum(r.get("cpu_s", 0.0) for r in mine)


def build(run_dir) -> tuple[Path, Path]:
    """Write plots/*.png, report.md and report.html into `run_dir`; return the two paths.

    Example:
        >>> md, page = build("runs/20240101-120000")   # doctest: +SKIP
    """
    run_dir = store.check_run_dir(run_dir)
    secs = sections(run_dir)
    (run_dir / "plots").mkdir(exist_ok=True)
    images = {}
    for sec in secs:
        if sec.figure is not None:
            images[sec.name] = png_bytes(sec.figure)
            (run_dir / "plots" / f"{sec.name}.png").write_bytes(images[sec.name])
    ctx = _context(run_dir)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    md_path.write_text(render_md(ctx, secs))
    html_path.write_text(render_html(ctx, secs, images))
    return md_path, html_path


def _context(run_dir: Path) -> dict:
    """Run-level facts for the header: config, env, run status, per-experiment wall times."""
    env_path = run_dir / store.ENV
    records = store.read_records(run_dir)
    config = load_config(run_dir)
    return {"name": run_dir.name, "config": config, "run": _read_run(run_dir),
            "env": store.read_json(env_path) if env_path.exists() else {},
            "times": {n: _times(records, n) for n in config["experiments"]}}


def header_lines(ctx: dict) -> list[str]:
    """The run summary lines shown above the summary table (plain text)."""
    cfg, run = ctx["config"], ctx["run"]
    sessions = run.get("sessions", [])
    wall = sum(s.get("wall_s", 0.0) for s in sessions)
    cpu = sum(s.get("cpu_s", 0.0) for s in sessions)
    status = run.get("status", "unknown")
    lines = [(f"Run {ctx['name']}: profile {cfg['profile']}, {cfg['seeds']} seed(s) per "
              f"cell, {cfg['threads']} thread(s), status {status}. Wall time {duration(wall)} "
              f"from start to the last cell over {len(sessions)} session(s), CPU time "
              f"{duration(cpu)} (the main process and the cells in worker processes; wall "
              "time well above CPU time x threads / jobs means other processes shared the "
              "CPU).")]
    if status != "finished":
        lines.append("This is a PARTIAL report: only the cells that finished are shown; "
                     "`bnkit lab --resume` runs the rest.")
    lines.append("Profile " + PROFILE_NOTES[cfg["profile"]])
    if run.get("stopped"):
        lines.append(f"Stopped early: {run['stopped']}")
    for err in run.get("errors", []):
        lines.append(f"Cell failed: {err['key']}: {err['error']}")
    return lines


def summary_table(ctx: dict, secs: list[Section]) -> Table:
    rows = [[s.title, s.claim, s.headline, s.verdict, f"{s.cells[0]}/{s.cells[1]}",
             duration(ctx["times"][s.name][0]), duration(ctx["times"][s.name][1])]
            for s in secs]
    return Table(["Experiment", "Claim under test", "This run", "Verdict", "Cells", "Wall",
                  "CPU"], rows)


def env_table(env: dict) -> Table:
    rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
            for k, v in env.items()]
    return Table(["Field", "Value"], rows)


# ----------------------------------------------------------------------------- markdown

def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
             "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return lines + [""]


def render_md(ctx: dict, secs: list[Section]) -> str:
    """The whole report as Markdown (plots referenced as plots/<name>.png)."""
    out = ["# bnkit lab report", ""] + [line + "\n" for line in header_lines(ctx)]
    out += ["## Summary", ""] + md_table(summary_table(ctx, secs))
    for i, sec in enumerate(secs, 1):
        out += [f"## {i}. {sec.title}", "", f"**Claim under test.** {sec.claim}", "",
                f"**Verdict in this run:** {sec.verdict}.", ""]
        if sec.figure is not None:
            out += [f"![{sec.title}](plots/{sec.name}.png)", ""]
        out += [p + "\n" for p in sec.paragraphs]
        out += md_table(sec.table) if sec.table else []
        out += ["Config:", "", "```json", json.dumps(sec.config, indent=1), "```", ""]
    out += ["## Environment", ""] + md_table(env_table(ctx["env"]))
    return "\n".join(out)


# ----------------------------------------------------------------------------- HTML

def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_section(i: int, sec: Section, image: bytes | None) -> str:
    parts = [f'<h2 id="{sec.name}">{i}. {html.escape(sec.title)}</h2>',
             f"<p><b>Claim under test.</b> {html.escape(sec.claim)}</p>",
             (f'<p><b>Verdict in this run:</b> <span class="{sec.verdict.replace(" ", "-")}">'
              f"{html.escape(sec.verdict)}</span>.</p>")]
    if image is not None:
        data = base64.b64encode(image).decode("ascii")
        parts.append(f'<img alt="{html.escape(sec.title)}" src="data:image/png;base64,{data}">')
    parts += [f"<p>{html.escape(p)}</p>" for p in sec.paragraphs]
    if sec.table:
        parts.append(html_table(sec.table))
    parts.append("<details><summary>Config</summary><pre>"
                 f"{html.escape(json.dumps(sec.config, indent=1))}</pre></details>")
    return "\n".join(parts)


def render_html(ctx: dict, secs: list[Section], images: dict[str, bytes]) -> str:
    """The whole report as one self-contained HTML page (CSS inline, plots as data: URIs)."""
    body = ["<h1>bnkit lab report</h1>"] + [f"<p>{html.escape(x)}</p>" for x in header_lines(ctx)]
    body += ["<h2>Summary</h2>", html_table(summary_table(ctx, secs))]
    body += [_html_section(i, s, images.get(s.name)) for i, s in enumerate(secs, 1)]
    body += ["<h2>Environment</h2>", html_table(env_table(ctx["env"]))]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>bnkit lab report {html.escape(ctx['name'])}</title><style>{CSS}</style>"
            "</head><body>\n" + "\n".join(body) + "\n</body></html>\n")
