"""argparse types shared by the `bnkit` subcommands: each rejects a bad value with a message
that says what it got and what is allowed."""
from __future__ import annotations

import argparse
import os

#: At most this many threads per CPU core: oversubscribing a little can help, far beyond that
#: only slows down, and torch aborts the process at 32768 threads.
THREADS_PER_CORE = 4


def max_threads() -> int:
    """The largest thread count the commands accept on this machine."""
    return THREADS_PER_CORE * (os.cpu_count() or 1)


def check_threads(value: int, option: str = "--threads") -> int:
    """`value` if it is a thread count this machine can run, else ValueError saying why."""
    cores, limit = os.cpu_count() or 1, max_threads()
    example = f"{option} {cores}" if option.startswith("-") else f"{option}={cores}"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{option} must be an integer from 1 to {limit} ({THREADS_PER_CORE} "
                         f"per CPU core; this machine has {cores}), got {value!r}; pass e.g. "
                         f"{example}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def thread_count(text: str) -> int:
    """argparse type: a thread count from 1 to `max_threads()`."""
    try:
        return check_threads(int(text))
    except ValueError as exc:
        message = str(exc) if "must be" in str(exc) else f"must be an integer, got {text!r}"
        raise argparse.ArgumentTypeError(message.removeprefix("--threads ")) from None
