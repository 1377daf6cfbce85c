"""Benchmark bnkit's BN against torch's on this machine (CPU; --device cuda for the GPU).

Sections, each printed as it finishes and stored under its key in the --json file:
`rows`, the kernel table (`bench.kernels`: each phase of each case on every CPU backend,
torch and torch.compile, with the copy bandwidth measured in the same rounds); `models`,
the training step of two small models (`bench.models.run_models`); `vision_models`, a
ResNet-18 and a MobileNetV2 with torch's BN against the same model converted to bnkit,
training step and eval (`bench.models.run_vision_models`); `first_call`, `import bnkit` and
the first BN call in a fresh process with an empty HOME (`bench.firstcall`). `--models`
runs only the model sections, `--no-models` skips them.

Example:
    $ bnkit bench --quick --threads 2 --json bench.json
    $ bnkit bench --models --model-batch 16 --model-size 112
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..argtypes import check_threads
from . import kernels, machine, memory, models
from .firstcall import first_call
from .phases import PASSES, parse_shape
from .report import format_first_call, format_models, format_table, format_vision_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `bnkit bench` (CPU unless --device cuda, which runs bnkit.bench.gpu)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; default: torch's current setting")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    parser.add_argument("--shapes", default=None,
                        help="e.g. 64x64x56x56,8192x256 (default: the five standard cases)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile variant")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--models", dest="only_models", action="store_true",
                       help="run only the model sections (MLP / CNN steps, ResNet-18 and "
                            "MobileNetV2, first call), not the kernel table")
    which.add_argument("--no-models", dest="models", action="store_false",
                       help="skip the model sections (MLP / CNN, ResNet-18, MobileNetV2)")
    parser.add_argument("--model-batch", type=int, default=models.VISION_BATCH,
                        help=f"batch of the ResNet-18 / MobileNetV2 input "
                             f"(default {models.VISION_BATCH})")
    parser.add_argument("--model-size", type=int, default=models.VISION_SIZE,
                        help=f"image size of that input (default {models.VISION_SIZE}: "
                             f"{models.VISION_BATCH}x3x{models.VISION_SIZE}x"
                             f"{models.VISION_SIZE})")
    parser.add_argument("--model-width", type=float, default=1.0,
                        help="MobileNetV2's width_mult (default 1.0)")
    parser.add_argument("--no-first-call", dest="first_call", action="store_false",
                        help="skip timing import and first BN call in a fresh process")
    parser.add_argument("--memory", action="store_true",
                        help="add the saved-for-backward bytes and step time of BN + LeakyReLU, "
                             "BatchNormAct and InPlaceABN in a ResNet- and a MobileNet-style "
                             "model (bnkit.bench.memory)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results")


@dataclass
class Section:
    """One part of the run: its JSON key, what runs it and how its result is printed."""

    key: str
    run: Callable[[], object]
    text: Callable[[object], str]


def sections(args: argparse.Namespace, repeats: int) -> list[Section]:
    """The sections the options ask for, in the order they run."""
    out = []
    if not args.only_models:
        out.append(Section("rows", lambda: kernel_rows(args, repeats), format_table))
    if args.models or args.only_models:
        out.append(Section("models", lambda: models.run_models(repeats, args.warmup),
                           format_models))
        out.append(Section("vision_models", lambda: models.run_vision_models(
            batch=args.model_batch, size=args.model_size, repeats=repeats,
            warmup=args.warmup, width_mult=args.model_width), format_vision_models))
    if args.first_call:
        out.append(Section("first_call", first_call, format_first_call))
    if args.memory:
        out.append(Section("memory", lambda: memory.run_memory(steps=repeats),
                           memory.format_memory))
    return out


def kernel_rows(args: argparse.Namespace, repeats: int) -> list[dict]:
    """The kernel table's rows for the --shapes cases (default: `kernels.CASES`)."""
    rows = []
    for shape, layout in kernels.cases(args.shapes):
        rows += kernels.run_case(shape, layout, repeats, args.warmup, args.compile)
    return rows


def main(args: argparse.Namespace) -> int:
    """Run the bench described by `args` (see `add_arguments`), print it, return 0."""
    if args.device == "cuda":
        return run_gpu(args)
    repeats = check_args(args)
    todo = sections(args, repeats)
    env = machine.environment()
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    results = {"env": env, "passes": PASSES, "rows": [], "models": [], "vision_models": [],
               "first_call": None}
    for section in todo:
        results[section.key] = section.run()
        print(section.text(results[section.key]), flush=True)
    env["load_after"] = machine.load()
    if args.json:
        write_json(args.json, results)
    return 0


def write_json(path: str, results: dict) -> None:
    """The results as JSON; the sections' dataclass rows (`memory.MemoryRow`) as objects."""
    def plain(obj):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        raise TypeError(f"bench result of type {type(obj).__name__} is not JSON serializable")

    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=plain)


def check_args(args: argparse.Namespace) -> int:
    """Validate the numbers, apply --threads; returns the number of rounds."""
    if args.threads is not None:
        torch.set_num_threads(check_threads(args.threads))
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    if repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0 (got {repeats} and "
                         f"{args.warmup}); pass e.g. --repeats 15 --warmup 2")
    if args.shapes is not None:
        kernels.cases(args.shapes)  # a bad shape fails before anything runs
    if getattr(args, "models", True) or getattr(args, "only_models", False):
        models.check_vision_input(args.model_batch, args.model_size, args.model_width)
    return repeats


def run_gpu(args: argparse.Namespace) -> int:
    """`--device cuda`: the GPU bench of bnkit.bench.gpu with the options given here."""
    from . import gpu

    ns = argparse.Namespace(json=args.json, warmup=args.warmup, compile=args.compile)
    if args.repeats is not None or args.quick:
        ns.repeats = args.repeats or 5
    if args.shapes:
        ns.shapes = [parse_shape(s) for s in args.shapes.split(",")]
    print(format_table(gpu.run_gpu_bench(ns)))
    return 0
