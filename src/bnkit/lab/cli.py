"""Experiments on Fashion-MNIST with bnkit layers and tools, and their HTML report.

Serves two `bnkit` subcommands (the parser's prog name says which):

    bnkit lab [EXPERIMENT ...] [--quick | --full] [--seeds N] [--out DIR] [--data DIR]
              [--threads N] [--jobs N] [--resume RUN_DIR]
    bnkit report RUN_DIR

Example:
    $ bnkit lab convergence init --quick
    $ bnkit report runs/20240101-120000
"""
from __future__ import annotations

import argparse
import sys

from ..argtypes import positive_int, thread_count
from .config import EXPERIMENTS, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `bnkit lab`, or of `bnkit report` when the parser's prog ends in
    'report'."""
    if parser.prog.rsplit(" ", 1)[-1] == "report":
        parser.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by bnkit lab")
        return
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help=f"experiments to run (default: all): {', '.join(EXPERIMENTS)}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="small models, few steps: the whole suite in ~5 min (default)")
    mode.add_argument("--full", dest="profile", action="store_const", const="full",
                      help="the papers' set-ups at CPU scale, >= 3 seeds per cell")
    mode.add_argument("--mini", dest="profile", action="store_const", const="mini",
                      help=argparse.SUPPRESS)  # tests: seconds on the tiny generated data
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help="seeds per cell (default 3; --full needs >= 3); a verdict needs >= 2")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="the run folder (default runs/<timestamp>)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="the folder of the Fashion-MNIST IDX files, the only one searched "
                             "(default: $BNKIT_DATA, else ~/.cache/bnkit/fashion-mnist, then "
                             "/usr/share/datasets/fashion-mnist); config.json records the one used")
    parser.add_argument("--threads", type=thread_count, default=1,
                        help="torch CPU threads (default 1: these small models run fastest "
                             "single-threaded on a shared 2-core machine)")
    parser.add_argument("--jobs", type=positive_int, default=None,
                        help="cells run at the same time, each in a worker process with "
                             "--threads torch threads (default: the number of CPU cores; 1 "
                             "runs them in this process); the metrics do not depend on it")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue an interrupted run with its saved config, skipping "
                             "finished cells")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide progress bars (and the per-cell lines printed when stdout "
                             "is not a terminal)")


def _check_resume(args) -> None:
    given = [name for name, on in (("EXPERIMENT", args.experiments), ("--quick/--full",
             args.profile), ("--seeds", args.seeds), ("--out", args.out), ("--data", args.data))
             if on]
    if given:
        raise ValueError(f"--resume continues a run with its saved config.json, so it takes "
                         f"no {', '.join(given)} (got them); drop them, or start a new run")


def run_lab_command(args) -> int:
    """`bnkit lab`: run, print where the report is and the summary table."""
    from .runner import run_lab

    if args.resume:
        _check_resume(args)
        result = run_lab({}, args.resume, resume=True, progress=not args.no_progress,
                         jobs=args.jobs)
    else:
        config = resolve(args.experiments, args.profile or "quick", args.seeds, args.threads,
                         args.data)
        try:
            result = run_lab(config, args.out, progress=not args.no_progress, jobs=args.jobs)
        except FileNotFoundError as exc:  # the loader's root= is this command's --data
            if args.data is not None:
                raise
            raise FileNotFoundError(f"{exc}\nOn this command line the folder is passed as "
                                    "`bnkit lab --data DIR`.") from None
    _print_summary(result)
    return {"finished": 0, "interrupted": 130}.get(result.status, 1)


def _print_summary(result) -> None:
    text = result.report_md.read_text()
    start = text.find("## Summary")
    end = text.find("\n## ", start + 1)
    print(text[start:end].strip())
    print(f"\nStatus: {result.status}; {result.cells_run} cell(s) run in this session; "
          f"wall time {result.wall_s:.1f} s in total.")
    if result.stopped:
        print(f"Stopped early: {result.stopped}")
    if result.status == "interrupted":
        print(f"Partial report written. Continue with: bnkit lab --resume {result.run_dir}")
    print(f"Report: {result.report_html}\n        {result.report_md}")


def run_report_command(args) -> int:
    """`bnkit report RUN_DIR`: rebuild the report from the saved metrics."""
    from .report import build

    md, page = build(args.run_dir)
    print(f"Report: {page}\n        {md}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry point for both subcommands (dispatch on args.command)."""
    if getattr(args, "command", None) == "report" or hasattr(args, "run_dir"):
        return run_report_command(args)
    return run_lab_command(args)


def cli(argv=None) -> int:
    """Stand-alone parser: `python -m bnkit.lab.cli lab ...` or `... report RUN_DIR`."""
    parser = argparse.ArgumentParser(prog="bnkit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("lab", "report"):
        add_arguments(sub.add_parser(name))
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
