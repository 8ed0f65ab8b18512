"""Helpers for tests that run fastasyncore in a subprocess (one backend each)."""

import functools
import importlib.util
import os
import subprocess
import sys

import pytest

REQUIRE_CORE = os.environ.get("FASTASYNCORE_REQUIRE_CORE") == "1"


def subprocess_env(**overrides):
    """``os.environ`` plus, first on PYTHONPATH, the directory this pytest run
    imports fastasyncore from (found without importing it), so a subprocess in
    any working directory gets the same package.  ``overrides`` are applied last."""
    env = dict(os.environ)
    spec = importlib.util.find_spec("fastasyncore")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("fastasyncore is not importable; install it first: "
                    "python -m pip install -e '.[test]'")
    where = os.path.dirname(list(spec.submodule_search_locations)[0])
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([where] + parts)
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    env.update(overrides)
    return env


@functools.lru_cache(maxsize=None)
def core_status():
    """``(importable, detail)`` for the C core, probed once in a subprocess with
    ``FASTASYNCORE_BACKEND=cffi`` (importing the package then loads the core or
    raises ImportError saying why; the pure backend is not involved)."""
    code = "import fastasyncore._core as c; print(c.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(FASTASYNCORE_BACKEND="cffi"),
                          capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    lines = proc.stderr.strip().splitlines() or ["(no output)"]
    return False, lines[-1]


def need_backend(backend):
    """Skip a ``cffi`` case when the core is not built, or fail it instead when
    ``FASTASYNCORE_REQUIRE_CORE=1``."""
    if backend != "cffi":
        return
    ok, detail = core_status()
    if not ok:
        msg = "fastasyncore._core is not importable: %s" % detail
        if REQUIRE_CORE:
            pytest.fail(msg + " (FASTASYNCORE_REQUIRE_CORE=1)")
        pytest.skip(msg)
