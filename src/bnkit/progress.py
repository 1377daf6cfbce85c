"""Progress display for the command line: a bar on a terminal, nothing (or lines) elsewhere.

`Bar` wraps tqdm so that no caller ever sees tqdm's return values: `tqdm.update()` returns
True when it redraws, which only happens on a terminal, so code that passed that value on
worked in every test and pipe and broke in front of a person. Every method here returns
None. Without tqdm (a base install) or without a terminal on stderr the bar is silent.

Example:
    >>> with Bar(100, "training", enabled=False) as bar:
    ...     for step in range(1, 101):
    ...         bar.advance_to(step)
"""
from __future__ import annotations

import sys


def _tqdm():
    """tqdm's class, or None when it is not installed (it comes with the `lab` extra)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class Bar:
    """A transient progress bar on stderr, shown only when `enabled` and stderr is a terminal.

    Args:
        total: the count at completion (steps, batches, cells).
        desc: the label shown before the bar.
        enabled: False hides it whatever the terminal.
        position: the line it occupies (0 the top); nested bars use 1.
        leave: keep the finished bar on screen (default False: it disappears).
        unit: what is counted, shown in the rate (default "step").
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, position: int = 0,
                 leave: bool = False, unit: str = "step") -> None:
        tqdm = _tqdm() if enabled else None
        # disable=None: tqdm hides itself when stderr is not a terminal
        self._bar = None if tqdm is None else tqdm(total=total, desc=desc, leave=leave,
                                                   position=position, unit=unit, disable=None)
        self.n = 0

    def advance(self, k: int = 1) -> None:
        """Count k more units done."""
        self.n += k
        if self._bar is not None:
            self._bar.update(k)

    def advance_to(self, n: int) -> None:
        """Set the count to n (ignored if n is not ahead of the current count)."""
        if n > self.n:
            self.advance(n - self.n)

    def note(self, text: str) -> None:
        """Show `text` as the bar's trailing label."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def say(text: str, file=None) -> None:
    """Print a line without breaking a bar drawn on the terminal (tqdm.write when available)."""
    file = sys.stderr if file is None else file
    tqdm = _tqdm()
    if tqdm is None:
        print(text, file=file, flush=True)
    else:
        tqdm.write(text, file=file)
        file.flush()


def is_terminal(stream) -> bool:
    """Whether `stream` is attached to a terminal (False for pipes, files, closed streams)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
