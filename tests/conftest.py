"""Shared fixtures: one test body for every backend (and stdlib as a reference)."""

import importlib
import os
import sys
import warnings

import pytest

from fastasyncore import _backend

REQUIRE_CORE = os.environ.get("FASTASYNCORE_REQUIRE_CORE") == "1"


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


@pytest.fixture(params=["pure", "cffi"])
def backend(request):
    """Run the test on each backend; yields the backend module."""
    prev = _use(request.param)
    yield _backend.current
    _backend.set_backend(prev)


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
    def __init__(self, name, asyncore, asynchat):
        self.name = name
        self.asyncore = asyncore
        self.asynchat = asynchat

    def __repr__(self):
        return "Impl(%s)" % self.name


@pytest.fixture(params=["pure", "cffi", "stdlib"])
def impl(request):
    """fastasyncore on each backend, plus CPython 3.11's modules as the reference."""
    if request.param == "stdlib":
        a, c = _stdlib()
        yield Impl("stdlib", a, c)
        return
    prev = _use(request.param)
    from fastasyncore import asyncore, asynchat
    yield Impl(request.param, asyncore, asynchat)
    _backend.set_backend(prev)


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
