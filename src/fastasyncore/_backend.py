"""The one place that decides which backend fastasyncore runs on.

``FASTASYNCORE_BACKEND`` (read once, at import) selects it:

* ``auto`` (default): the C core (``cffi``) when it was built, else ``pure``;
* ``cffi``: the C core, or ImportError when it is not built;
* ``pure``: the pure-Python backend, the C core is never loaded.

Both backends implement the interface in docs/backend-interface.md; the rest of
the package only ever talks to :data:`current`.
"""

import os
import sys
from types import ModuleType

__all__ = ["VALID", "BACKEND", "current", "load", "set_backend"]

VALID = ("auto", "cffi", "pure")


def load(name: str) -> ModuleType:
    """Return the backend module for *name* (``auto``, ``cffi`` or ``pure``)."""
    if name not in VALID:
        raise ImportError(
            "FASTASYNCORE_BACKEND=%r: expected one of %s"
            % (name, ", ".join(repr(v) for v in VALID)))
    if name in ("auto", "cffi"):
        try:
            from . import _cffi
            return _cffi
        except ImportError as exc:
            if name == "cffi":
                raise ImportError(
                    "FASTASYNCORE_BACKEND='cffi' but the C core "
                    "(fastasyncore._core) is not available: %s; valid values "
                    "are %s" % (exc, ", ".join(repr(v) for v in VALID))) from exc
    from . import _pure
    return _pure


current: ModuleType = load(os.environ.get("FASTASYNCORE_BACKEND", "auto").strip().lower() or "auto")
BACKEND: str = current.NAME


def set_backend(name: str) -> ModuleType:
    """Switch the active backend at run time (for tests and benchmarks).

    Existing loop state (pollers) is dropped so that the next loop iteration
    rebuilds it on the new backend.
    """
    global current, BACKEND
    mod = load(name)
    from . import _loop
    _loop.forget_all()
    current = mod
    BACKEND = mod.NAME
    # asyncore's C channel methods (csrc/fa_chanio.c), where installed: their
    # fast paths only on the C backend; on pure they call the Python methods
    cloop = sys.modules.get(__package__ + "._cloop")
    if cloop is not None and hasattr(cloop, "chan_io"):
        cloop.chan_io(mod.NAME == "cffi")
    return mod
