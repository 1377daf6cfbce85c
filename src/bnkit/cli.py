"""The `bnkit` command: `bnkit info`, `bnkit demo`, and subcommands other modules register.

Each subcommand is a pair (add_arguments(parser), run(args) -> exit code or None) in
`COMMANDS`. Built-ins are `info` and `demo`; `OPTIONAL` lists modules imported when the
command line is parsed, each registering its subcommand only if it imports. Errors a user
can cause (missing data set, bad value) print one message to stderr and exit with code 2.

Example:
    $ bnkit info
    $ bnkit demo --steps 2000 --threads 1
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable

from ._version import __version__
from .argtypes import positive_float, positive_int, thread_count

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], "int | None"]

#: subcommand name -> (add_arguments, run); extend with `register`.
COMMANDS: dict[str, tuple[AddArguments, Run]] = {}
#: subcommand name -> one-line help shown by `bnkit --help`.
HELP: dict[str, str] = {}
#: optional subcommand -> (module exposing `add_arguments(parser)` and `main(args)`, help;
#: "" takes the module docstring's first line). One module may serve several subcommands:
#: it tells them apart by `args.command` or by the parser's prog ("bnkit report").
OPTIONAL = {"bench": ("bnkit.bench.cli", ""),
            "lab": ("bnkit.lab.cli", "run the Fashion-MNIST experiments and write a report"),
            "report": ("bnkit.lab.cli", "rebuild the HTML report of a `bnkit lab` run")}
#: optional subcommand -> why its module, though present, did not import (`bnkit info`).
UNAVAILABLE: dict[str, str] = {}
#: optional subcommand -> the package extra that brings what it needs.
EXTRAS = {"lab": "lab", "report": "lab", "bench": "lab"}

EXIT_USAGE = 2  # argparse's code for usage errors; used for every user error


def register(name: str, add_arguments: AddArguments, run: Run, help: str = "") -> None:
    """Add (or replace) subcommand `name`; `run(args)` returns an exit code or None (0)."""
    COMMANDS[name] = (add_arguments, run)
    HELP[name] = help


def _register_optional(only: str | None = None) -> None:
    """Import OPTIONAL modules (just `only`'s if given); register each one that imports."""
    for name, (module_name, help_text) in OPTIONAL.items():
        if name in COMMANDS or only not in (None, name):
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or ""
            if not (module_name + ".").startswith(missing + "."):  # not the module itself:
                UNAVAILABLE[name] = f"{module_name}: {exc}"  # present, a dependency fails
                register(name, _no_arguments, _needs_extra(name, exc),
                         f"(unavailable: {_install_hint(name)})")
            continue
        summary = (module.__doc__ or "").strip().splitlines() or [""]
        register(name, module.add_arguments, module.main, help_text or summary[0])


def _install_hint(name: str) -> str:
    extra = EXTRAS.get(name)
    return f"pip install 'bnkit[{extra}]'" if extra else "reinstall bnkit"


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A subcommand that cannot run: listed in the help; `main` explains it before parsing."""


def _needs_extra(name: str, exc: ImportError) -> Run:
    """The run function of a subcommand whose dependencies are missing: it says which."""
    def run(args: argparse.Namespace) -> int:
        raise ImportError(f"`bnkit {name}` needs packages that are not installed ({exc}); "
                          f"install them with: {_install_hint(name)}")
    return run


# ----------------------------------------------------------------------------- info

def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    """`bnkit info` takes no options."""


def _backend_lines() -> list[str]:
    """Selected and available backends, plus each backend's `status()` line if it has one."""
    from . import kernels

    names = kernels.available_backends()
    lines = [f"backend: {kernels.get_backend()} (available: {', '.join(names)})"]
    for name in names:
        status = getattr(importlib.import_module(f"bnkit.kernels.{name}"), "status", None)
        if callable(status):
            try:
                lines.append(f"  {name}: {status()}")
            except Exception as exc:  # noqa: BLE001 - a diagnostic must not stop the report
                lines.append(f"  {name}: status() failed: {exc!r}")
    lines += [f"  {name}: {line}" for name, line in kernels.backend_status().items()
              if name not in names]  # why each other backend is unavailable
    return lines


def _data_line() -> str:
    """Where Fashion-MNIST was found, or the fix when it was not."""
    from .data import find_fashion_mnist

    try:
        folders = {str(find_fashion_mnist(split)[0].parent) for split in ("train", "test")}
    except FileNotFoundError as exc:
        fix = [line for line in str(exc).splitlines() if line.startswith("Fix:")]
        return "Fashion-MNIST: not found. " + (fix[0] if fix else str(exc))
    return f"Fashion-MNIST: {', '.join(sorted(folders))}"


def _cuda_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return "CUDA: not available"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"CUDA: {torch.version.cuda}, {len(names)} device(s): {', '.join(names)}"


def _run_info(args: argparse.Namespace) -> int:
    """Print versions, threads, backends, CUDA and data location."""
    import torch

    lines = [f"bnkit: {__version__}", f"torch: {torch.__version__}",
             f"python: {platform.python_version()} ({sys.executable})",
             f"CPU cores: {os.cpu_count()}", f"torch threads: {torch.get_num_threads()}"]
    _register_optional()  # to report optional subcommands that fail to import
    lines += _backend_lines() + [_cuda_line(), _data_line()]
    lines += [f"subcommand {name} unavailable: {why}" for name, why in UNAVAILABLE.items()]
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- demo

def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=2000,
                        help="SGD steps per model (default 2000)")
    parser.add_argument("--eval-every", type=positive_int, default=500,
                        help="steps between test-set evaluations (default 500)")
    parser.add_argument("--threads", type=thread_count, default=1,
                        help="torch CPU threads (default 1: this small model runs fastest on "
                             "one thread; on a shared 2-core machine with the other core busy, "
                             "two threads can be ~100x slower per step)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="the folder of the Fashion-MNIST IDX files, the only one "
                             "searched (default: $BNKIT_DATA, else ~/.cache/bnkit/fashion-mnist, "
                             "then /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--lr", type=positive_float, default=0.1,
                        help="SGD learning rate (default 0.1)")
    parser.add_argument("--batch-size", type=positive_int, default=60,
                        help="batch size (default 60, as in the BN paper)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights and the batch order (default 0)")


def _run_demo(args: argparse.Namespace) -> int:
    """Train the sigmoid MLP with and without BN and print the comparison."""
    import torch

    from .demo import load_data, run_demo

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        data = load_data(args.data)
    except FileNotFoundError as exc:  # the loader's root= is this command's --data
        if args.data is not None:
            raise
        raise FileNotFoundError(f"{exc}\nOn this command line the folder is passed as "
                                "`bnkit demo --data DIR`.") from None
    run_demo(args.steps, args.eval_every, data, args.lr, args.batch_size, args.seed,
             progress=True)
    print(f"Wall time: {time.perf_counter() - t0:.1f} s")
    return 0


register("info", _add_info_arguments, _run_info,
         "versions, threads, backends, CUDA and where Fashion-MNIST is")
register("demo", _add_demo_arguments, _run_demo,
         "BN paper's sigmoid MLP on Fashion-MNIST, with and without BatchNorm (~1 minute)")


# ----------------------------------------------------------------------------- entry point

def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in argv: the first word not starting with '-' (or None)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered subcommand.

    Optional modules are imported only when needed: just the one `argv` names, or all of
    them (for the full help) when argv names no known subcommand.
    """
    words = sys.argv[1:] if argv is None else argv
    command = _command_in(words)
    if command in OPTIONAL:
        _register_optional(command)
    elif command not in COMMANDS and "--version" not in words:  # help or a typo: list all
        _register_optional()
    parser = argparse.ArgumentParser(
        prog="bnkit", description="Batch Normalization done right for PyTorch.")
    parser.add_argument("--version", action="version", version=f"bnkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=HELP.get(name, ""), description=HELP.get(name)))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the subcommand, return the exit code.

    User errors (ValueError, TypeError, OSError such as a missing file, ImportError for a
    subcommand whose extra is not installed) print `bnkit <command>:
    error: <message>` to stderr and return 2, without a traceback (set BNKIT_DEBUG=1 to re-raise).
    """
    parser = build_parser(argv)
    command = _command_in(sys.argv[1:] if argv is None else argv)
    if command in UNAVAILABLE and command in COMMANDS:  # say what to install, whatever the options
        argv = [command]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code = COMMANDS[args.command][1](args)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        if os.environ.get("BNKIT_DEBUG"):
            raise
        print(f"bnkit {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"bnkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
