"""Resolve a lab run's configuration: which experiments, which profile, seeds, threads, data.

Each experiment module holds `PROFILES = {"mini": {...}, "quick": {...}, "full": {...}}`:
`quick` (the default) fits the whole suite in about 5 minutes on 2 cores (with 2 jobs) with
smaller models and fewer steps and 3 seeds per cell, `full` is closer to the papers' set-ups
and runs at least 3 seeds per cell, and `mini` is for tests on the tiny generated data set
(1 seed). A verdict needs at least 2 seeds (`sections.compare`). The resolved config is a plain
JSON-able dict saved as `config.json`, so a run can be resumed and its report rebuilt.
"""
from __future__ import annotations

import copy
import importlib
from pathlib import Path

from ..argtypes import check_threads
from . import store

#: CLI name -> module under bnkit.lab, in report order.
EXPERIMENTS = {
    "convergence": "convergence",
    "init": "init",
    "gradients": "gradients",
    "ics": "ics",
    "batch-size": "batch_size",
    "non-iid": "non_iid",
    "regularization": "regularization",
    "norms": "norms",
    "robustness": "robustness",
    "adversarial": "adversarial",
    "transfer": "transfer",
    "inference": "inference",
    "recurrent": "recurrent",
    "vae": "vae",
    "kernels": "kernels",
}
PROFILES = ("mini", "quick", "full")
DEFAULT_SEEDS = {"mini": 1, "quick": 3, "full": 3}
PROFILE_NOTES = {
    "mini": "mini: a smoke-test configuration for the test suite; the numbers mean nothing.",
    "quick": "quick: smaller models, fewer steps and test subsets, 3 seeds per cell, so "
             "that the whole suite finishes in about 5 minutes on 2 cores with 2 jobs; expect "
             "lower accuracies and wider spreads than the papers' set-ups.",
    "full": "full: the papers' set-ups at CPU scale, at least 3 seeds per cell.",
}


def experiment_module(name: str):
    """Import the module of experiment `name` (CLI spelling, e.g. 'batch-size')."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: expected one of "
                         f"{', '.join(EXPERIMENTS)}; run `bnkit lab` with no name for all")
    return importlib.import_module(f"bnkit.lab.{EXPERIMENTS[name]}")


def _check_names(experiments) -> list[str]:
    names = list(experiments) if experiments else list(EXPERIMENTS)
    for name in names:
        experiment_module(name)  # raises for unknown names
    if len(set(names)) != len(names):
        raise ValueError(f"experiment names must be unique (got {names}); list each once")
    return [n for n in EXPERIMENTS if n in names]  # report order


def _check_int(name: str, value, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r}); {fix}")


def _merge(base: dict, override: dict, where: str) -> dict:
    """`base` updated with `override`; unknown keys are an error (catches typos)."""
    unknown = sorted(set(override) - set(base))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {where}: known keys are "
                         f"{sorted(base)}; fix the spelling")
    merged = copy.deepcopy(base)
    merged.update(copy.deepcopy(override))
    return merged


def resolve(experiments=None, profile: str = "quick", seeds: int | None = None,
            threads: int = 1, data: str | None = None, overrides: dict | None = None) -> dict:
    """Build the run configuration.

    Args:
        experiments: CLI names (default None: all, in report order).
        profile: 'quick' (default), 'full' or 'mini' (tests).
        seeds: seeds per cell (default: 3 for quick and full, 1 for mini); full needs >= 3.
        threads: torch CPU threads (default 1: small models on a shared 2-core machine run
            fastest single-threaded).
        data: the folder of the Fashion-MNIST IDX files, the only one searched (default None:
            the loader's search order); `run_lab` replaces it by the folder found.
        overrides: {experiment: {key: value}} applied over the profile (tests use it).

    Returns:
        {"profile", "seeds", "threads", "data", "experiments": {name: config}}.

    Example:
        >>> cfg = resolve(["convergence"], "quick")
        >>> cfg["seeds"], list(cfg["experiments"])
        (3, ['convergence'])
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES} (got {profile!r}); use --quick "
                         "or --full")
    seeds = DEFAULT_SEEDS[profile] if seeds is None else seeds
    _check_int("seeds", seeds, 3 if profile == "full" else 1,
               "--full runs at least 3 seeds per cell" if profile == "full" else "pass --seeds 1")
    check_threads(threads, "threads")
    names = _check_names(experiments)
    overrides = dict(overrides or {})
    stray = sorted(set(overrides) - set(names))
    if stray:
        raise ValueError(f"overrides name experiments that are not run: {stray}; run them or "
                         "drop their overrides")
    configs = {name: _merge(experiment_module(name).PROFILES[profile], overrides.get(name, {}),
                            f"experiment {name!r}") for name in names}
    return {"profile": profile, "seeds": seeds, "threads": threads,
            "data": None if data is None else str(data), "experiments": configs}


def load_config(run_dir) -> dict:
    """The config.json of a run folder, checked: a damaged or foreign file is a ValueError
    that names it and what is wrong, before anything is run or rebuilt from it."""
    path = Path(run_dir) / store.CONFIG
    config = store.read_json(path)
    fix = "restore the file, or start a new run"
    if not isinstance(config, dict):
        raise ValueError(  # noqa: TRY004 - a damaged file, not a wrong argument
            f"{path}: expected a JSON object, got {type(config).__name__}; {fix}")
    missing = [k for k in ("profile", "seeds", "threads", "data", "experiments")
               if k not in config]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; {fix}")
    if config["profile"] not in PROFILES:
        raise ValueError(f"{path}: unknown profile {config['profile']!r}, expected one of "
                         f"{PROFILES}; {fix}")
    for key in ("seeds", "threads"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {key} must be an integer >= 1, got {value!r}; {fix}")
    experiments = config["experiments"]
    if not isinstance(experiments, dict) or not all(isinstance(c, dict)
                                                    for c in experiments.values()):
        raise ValueError(f"{path}: 'experiments' must map names to config objects; {fix}")
    unknown = sorted(set(experiments) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"{path}: unknown experiment(s) {unknown}: expected names from "
                         f"{', '.join(EXPERIMENTS)}; {fix}")
    return config
