"""fastasyncore: a drop-in, C-accelerated asyncore/asynchat.

Use ``from fastasyncore import asyncore, asynchat`` or call :func:`install`
before the first ``import asyncore`` so that legacy code gets these modules.
"""

import sys
from typing import Any

from . import _backend

__all__ = ["BACKEND", "LOOP", "POLLER", "__version__", "install",
           "Timer", "call_later", "call_at", "call_every",
           "call_soon_threadsafe", "wakeup"]

#: the loop services, re-exported from fastasyncore.asyncore (lazily, so that
#: ``import fastasyncore`` does not import asyncore)
_SERVICES = ("Timer", "call_later", "call_at", "call_every",
             "call_soon_threadsafe", "wakeup")

__version__ = "0.1.0"

#: "cffi" when the C core is in use, "pure" otherwise.
BACKEND: str = _backend.BACKEND


def __getattr__(name: str) -> Any:
    if name == "POLLER":
        from . import _loop
        return _loop.poller_kind()
    if name == "LOOP":
        # "c": loop()/poll()/poll2() iterate in C (fastasyncore._cloop)
        from . import _loop
        return _loop.loop_impl()
    if name in _SERVICES:
        from . import asyncore
        return getattr(asyncore, name)
    raise AttributeError("module 'fastasyncore' has no attribute %r" % name)


def install() -> None:
    """Make ``import asyncore`` / ``import asynchat`` return fastasyncore's modules.

    On Python 3.12+ (no stdlib asyncore) this always works. On 3.9-3.11 it
    works when called before the stdlib modules are first imported; if they
    already are, they are replaced in ``sys.modules`` (modules that already
    hold a reference to the stdlib ones keep it).
    """
    from . import asyncore, asynchat
    sys.modules["asyncore"] = asyncore
    sys.modules["asynchat"] = asynchat
