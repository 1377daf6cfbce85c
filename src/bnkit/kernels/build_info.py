"""Why the compiled extension `bnkit._C` is missing, in one line for `bnkit info`.

setup.py writes `bnkit/_C.unbuilt` when it installs without the extension
(BNKIT_BUILD_EXT=0, no torch at build time, a failed compile); otherwise the import
error itself says what went wrong (e.g. a torch other than the one it was built for).
"""
from __future__ import annotations

import os

NOTE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_C.unbuilt")
FIX = ("reinstall bnkit where a C++ compiler is available, with torch installed first: "
       "pip install --no-build-isolation bnkit")


def extension_error(err: BaseException) -> str:
    """One line: why `import bnkit._C` failed with `err`, and the fix."""
    try:
        with open(NOTE) as f:
            why = f.read().strip()
    except OSError:
        why = f"bnkit._C could not be imported ({type(err).__name__}: {err})"
    return f"{why}; {FIX}"
