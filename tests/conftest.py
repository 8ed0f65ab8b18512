"""Shared fixtures: one test body for every backend (and stdlib as a reference).

Backend cases (ids):

* ``pure``: the pure-Python backend (always the Python loop);
* ``cffi``: the C core with the loop the environment picks
  (``FASTASYNCORE_LOOP``, default ``auto``: the C loop, fastasyncore._cloop,
  when it is built);
* ``cffi-pyloop``: the C core with the Python loop (``_loop.set_loop("py")``),
  the reference the C loop must match.  Skipped where the ``cffi`` case runs
  the Python loop already (no ``_cloop``, or ``FASTASYNCORE_LOOP=py``).

For ``cffi-pyloop`` the test also sees ``FASTASYNCORE_LOOP=py`` in
``os.environ``, so that children it starts (``run_child``, ``subprocess_env``)
run the Python loop too.  ``backend.NAME`` and ``impl.name`` stay the backend's
name (``"cffi"``); ``impl.loop`` / ``impl.id`` tell the cases apart.
"""

import contextlib
import importlib
import os
import sys
import warnings

import pytest

from fastasyncore import _backend

REQUIRE_CORE = os.environ.get("FASTASYNCORE_REQUIRE_CORE") == "1"

#: the backend cases of the ``backend`` fixture (and of ``impl``, plus "stdlib")
BACKEND_CASES = ("pure", "cffi", "cffi-pyloop")


def _cffi_available():
    try:
        importlib.import_module("fastasyncore._cffi")
        return True
    except ImportError:
        return False


def _use(name):
    if name == "cffi" and not _cffi_available():
        if REQUIRE_CORE:
            pytest.fail("FASTASYNCORE_REQUIRE_CORE=1 but the C core is not importable")
        pytest.skip("the C core (fastasyncore._core) is not built")
    prev = _backend.current.NAME
    _backend.set_backend(name)
    return prev


def split_case(case):
    """"cffi-pyloop" -> ("cffi", "py"); "cffi" -> ("cffi", None)."""
    name, _, loop = case.partition("-")
    return name, ("py" if loop == "pyloop" else None)


@contextlib.contextmanager
def backend_case(case):
    """Switch to a backend case for the duration of the block (see module doc)."""
    from fastasyncore import _loop
    name, loop = split_case(case)
    prev = _use(name)
    prev_loop = _loop._loop_choice
    prev_env = os.environ.get("FASTASYNCORE_LOOP")
    try:
        if loop == "py":
            if _loop.loop_impl() == "py":
                pytest.skip("the cffi case runs the Python loop already here "
                            "(no fastasyncore._cloop, or FASTASYNCORE_LOOP=py)")
            _loop.set_loop("py")
            os.environ["FASTASYNCORE_LOOP"] = "py"
            assert _loop.loop_impl() == "py"
        yield _backend.current
    finally:
        if loop == "py":
            if prev_env is None:
                os.environ.pop("FASTASYNCORE_LOOP", None)
            else:
                os.environ["FASTASYNCORE_LOOP"] = prev_env
        _backend.set_backend(prev)
        _loop.set_loop(prev_loop)


@pytest.fixture(params=BACKEND_CASES)
def backend(request):
    """Run the test on each backend case; yields the backend module."""
    with backend_case(request.param) as be:
        yield be


def _stdlib():
    if sys.version_info >= (3, 12):
        pytest.skip("stdlib asyncore/asynchat were removed in Python 3.12")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        a = importlib.import_module("asyncore")
        c = importlib.import_module("asynchat")
    from fastasyncore import asyncore as ours
    if a is ours:
        pytest.skip("asyncore is fastasyncore's here (install() was called)")
    return a, c


class Impl:
    def __init__(self, name, asyncore, asynchat, loop=None, id=None):
        self.name = name            # "stdlib", "pure" or "cffi"
        self.asyncore = asyncore
        self.asynchat = asynchat
        self.loop = loop            # "c"/"py" for fastasyncore, None for stdlib
        self.id = id or name        # the fixture's case id, e.g. "cffi-pyloop"

    def __repr__(self):
        return "Impl(%s)" % self.id


@pytest.fixture(params=BACKEND_CASES + ("stdlib",))
def impl(request):
    """fastasyncore on each backend case, plus CPython 3.11's modules as the reference."""
    if request.param == "stdlib":
        a, c = _stdlib()
        yield Impl("stdlib", a, c)
        return
    with backend_case(request.param) as be:
        from fastasyncore import asyncore, asynchat, _loop
        yield Impl(be.NAME, asyncore, asynchat, loop=_loop.loop_impl(), id=request.param)


@pytest.fixture(params=[False, True], ids=["select", "poll"])
def use_poll(request):
    return request.param


@pytest.fixture(params=["persistent", "rebuild"])
def loop_mode(request):
    """Pin the loop's wait strategy (persistent poller / stateless poll)."""
    from fastasyncore import _loop
    _loop._force_mode = request.param
    yield request.param
    _loop._force_mode = None
