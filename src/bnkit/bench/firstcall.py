"""What a new user waits for: `import bnkit` and the first BN call in a fresh process.

`first_call()` starts a new Python process with an empty temporary HOME (and the cache
locations that would otherwise point elsewhere, XDG_CACHE_HOME, NUMBA_CACHE_DIR and
TORCH_EXTENSIONS_DIR, removed from its environment, so every per-user cache starts empty)
and times there: `import torch`, `import bnkit` after it, the first
`bnkit.nn.BatchNorm2d` training forward + backward (what compiles or loads kernels on
first use) and the same call again. Other variables (BNKIT_BACKEND,
PYTHONPATH, thread settings) are kept.

Python's own bytecode cache (__pycache__ beside the sources) is not a per-user cache: pip
writes it at install time. So PYTHONDONTWRITEBYTECODE is dropped too and one untimed
`import bnkit` runs first, leaving the cache as an install does; with the variable set,
every import would recompile bnkit's sources and time the compiler instead (about 3x).

Example:
    >>> from bnkit.bench.firstcall import first_call
    >>> r = first_call(env={"BNKIT_BACKEND": "reference"})
    >>> r["backend"], r["first_call_ms"] > 0
    ('reference', True)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

FIRST_CALL_SHAPE = (16, 32, 28, 28)
CACHE_VARIABLES = ("XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "TORCH_EXTENSIONS_DIR",
                   "PYTHONDONTWRITEBYTECODE")

SCRIPT = """
import json, os, sys, time
home_files = os.listdir(os.path.expanduser("~"))
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import bnkit
t2 = time.perf_counter()
shape = tuple(json.loads(sys.argv[1]))
bn = bnkit.nn.BatchNorm2d(shape[1])
x = torch.randn(shape, requires_grad=True)
times = []
for _ in range(2):
    start = time.perf_counter()
    bn(x).sum().backward()
    times.append(time.perf_counter() - start)
from bnkit.bench.backends import selected
print(json.dumps({"import_torch_ms": (t1 - t0) * 1e3, "import_bnkit_ms": (t2 - t1) * 1e3,
                  "first_call_ms": times[0] * 1e3, "second_call_ms": times[1] * 1e3,
                  "backend": selected(x.detach()), "bnkit": bnkit.__version__,
                  "home": os.path.expanduser("~"), "home_files_before": len(home_files)}))
"""


def fresh_env(home: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with HOME=`home`, no cache-location variables, and `env`
    (name -> value) on top."""
    out = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    out["HOME"] = home
    out.update(env or {})
    return out


def first_call(shape=FIRST_CALL_SHAPE, timeout: float = 600.0,
               env: dict[str, str] | None = None) -> dict:
    """Times of a fresh process with an empty HOME (see the module docstring).

    Returns {"import_torch_ms", "import_bnkit_ms" (on top of torch), "first_call_ms",
    "second_call_ms" (forward + backward of BatchNorm2d on `shape`), "backend" (the one
    the call ran on), "bnkit", "home" and "home_files_before" (the child's HOME and what it
    held at start: 0), "shape"}, or {"error": why, "shape"} when the process failed
    or ran past `timeout` seconds. `env` adds or overrides variables of the child.
    """
    with tempfile.TemporaryDirectory(prefix="bnkit-home-") as home:
        try:  # the bytecode cache as pip leaves it (module docstring); HOME stays empty
            subprocess.run([sys.executable, "-c", "import bnkit"], env=fresh_env(home, env),
                           cwd=tempfile.gettempdir(), capture_output=True, timeout=timeout,
                           check=False)
            out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(list(shape))],
                                 env=fresh_env(home, env), cwd=home, capture_output=True,
                                 text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {timeout:.0f} s", "shape": list(shape)}
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:])
        return {"error": f"the process failed (exit {out.returncode}): {tail}",
                "shape": list(shape)}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "shape": list(shape)}
