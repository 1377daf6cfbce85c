"""Resolve a lab run's configuration: which experiments, which profile, seeds, threads, data.

Each experiment module holds `PROFILES = {"mini": {...}, "quick": {...}, "full": {...}}`:
`quick` (the default) fits the whole suite in about 5 minutes on 2 cores with smaller models
and fewer steps, `full` is closer to the papers' set-ups and runs at least 3 seeds per cell,
and `mini` is for tests on the tiny generated data set. The resolved config is a plain
JSON-able dict saved as `config.json`, so a run can be resumed and its report rebuilt.
"""
from __future__ import annotations

import copy
import importlib

#: CLI name -> module under bnkit.lab, in report order.
EXPERIMENTS = {
    "convergence": "convergence",
    "init": "init",
    "batch-size": "batch_size",
    "robustness": "robustness",
    "transfer": "transfer",
    "inference": "inference",
    "recurrent": "recurrent",
    "kernels": "kernels",
}
PROFILES = ("mini", "quick", "full")
DEFAULT_SEEDS = {"mini": 1, "quick": 1, "full": 3}
PROFILE_NOTES = {
    "mini": "mini: a smoke-test configuration for the test suite; the numbers mean nothing.",
    "quick": "quick: smaller models, fewer steps and test subsets so that the whole suite "
             "finishes in about 5 minutes on 2 cores; expect lower accuracies and wider "
             "spreads than the papers' set-ups.",
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
        seeds: seeds per cell (default: 1 for quick and mini, 3 for full); full needs >= 3.
        threads: torch CPU threads (default 1: small models on a shared 2-core machine run
            fastest single-threaded).
        data: folder searched first for the Fashion-MNIST IDX files (default None).
        overrides: {experiment: {key: value}} applied over the profile (tests use it).

    Returns:
        {"profile", "seeds", "threads", "data", "experiments": {name: config}}.

    Example:
        >>> cfg = resolve(["convergence"], "quick")
        >>> cfg["seeds"], list(cfg["experiments"])
        (1, ['convergence'])
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES} (got {profile!r}); use --quick "
                         "or --full")
    seeds = DEFAULT_SEEDS[profile] if seeds is None else seeds
    _check_int("seeds", seeds, 3 if profile == "full" else 1,
               "--full runs at least 3 seeds per cell" if profile == "full" else "pass --seeds 1")
    _check_int("threads", threads, 1, "pass --threads 1 (the default) or more")
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
