"""CPython 3.11's own asyncore/asynchat test suites, run unmodified against fastasyncore.

Each case runs ``tests/cpython_conformance.py`` in a subprocess with
``FASTASYNCORE_BACKEND`` set, so backend selection happens for real at import
time.  See that file for how the CPython test files are found (they are never
copied into this repository) and how ``test.support`` differences between
Python versions are handled.

On 3.9/3.10 the interpreter's own (older) test files run, and CPython 3.11's
files as well when a 3.11 installation is found (parameter ``source``).

Rules asserted here:

* every test passes, except ``test_repr`` (it pins the module name
  ``asyncore``), or is skipped for a platform reason from the allow-list below;
* the ``cffi`` case is skipped when ``fastasyncore._core`` is not importable,
  unless ``FASTASYNCORE_REQUIRE_CORE=1``, in which case it fails;
* a ``stdlib`` case (CPython's own modules, where they exist) validates the
  harness itself: there even ``test_repr`` must pass.
"""

import importlib.util
import json
import os
import re
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _subproc import need_backend, subprocess_env

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "cpython_conformance.py"
TIMEOUT = 300


def _load_runner():
    spec = importlib.util.spec_from_file_location("_fastasyncore_cpython_conformance", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


runner = _load_runner()


def _ipv6_enabled():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# Skip reasons that are legitimate: (regex on the reason, is it allowed here?).
# Anything else (e.g. "asyncore.file_wrapper required" on POSIX) means our
# module lacks something and fails the test.
ALLOWED_SKIPS = [
    (r"^Not applicable to AF_UNIX sockets\.$", True),
    (r"^test specific to AF_INET and AF_INET6$", True),
    (r"^IPv6 support required$", not _ipv6_enabled()),
    (r"^Unix sockets required$", not hasattr(socket, "AF_UNIX")),
    (r"^select\.poll required$", not hasattr(select, "poll")),
    (r"^poll may fail on macOS", sys.platform == "darwin"),
    (r"^SO_REUSEADDR not supported", not hasattr(socket, "SO_REUSEADDR")),
    (r"^asyncore\.file_(wrapper|dispatcher) required$", os.name != "posix"),
    (r"sunos|Solaris", sys.platform.startswith("sunos")),
]


def _skip_allowed(reason):
    return any(ok and re.search(pat, reason) for pat, ok in ALLOWED_SKIPS)


def _env(backend):
    env = subprocess_env()
    env.pop("FASTASYNCORE_CONFORMANCE_IMPL", None)
    if backend is not None:
        env["FASTASYNCORE_BACKEND"] = backend
    return env


def _stdlib_available():
    if sys.version_info < (3, 12):
        return importlib.util.find_spec("asyncore") is not None
    return importlib.util.find_spec("test.support.asyncore") is not None


def _run(module, backend, impl, tmp_path, tests_dir):
    env = _env(None if impl == "stdlib" else backend)
    cmd = [sys.executable, str(RUNNER), module, "--json", "--impl", impl,
           "--tests-dir", tests_dir]
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail("conformance run timed out after %ss; stderr tail:\n%s"
                    % (TIMEOUT, (exc.stderr or b"")[-4000:]))
    report = None
    for line in proc.stdout.splitlines():
        if line.startswith(runner.JSON_MARKER):
            report = json.loads(line[len(runner.JSON_MARKER):])
    if report is None:
        pytest.fail("runner produced no report (exit %s); stderr tail:\n%s"
                    % (proc.returncode, proc.stderr[-6000:]))
    return proc, report


TESTS_DIR, TESTS_WHERE = runner.find_cpython_tests()
needs_cpython_tests = pytest.mark.skipif(TESTS_DIR is None, reason=TESTS_WHERE)

# Which test files to run: "default" is what find_cpython_tests() found (on
# 3.9/3.10 that interpreter's own files); on 3.9/3.10 the CPython 3.11 files
# run as well ("cpython3.11") when a 3.11 installation is around.
SOURCES = {"default": TESTS_DIR}
_DIR311 = runner.find_cpython311_tests()
if (_DIR311 and TESTS_DIR and sys.version_info < (3, 11)
        and os.path.realpath(_DIR311) != os.path.realpath(TESTS_DIR)):
    SOURCES["cpython3.11"] = _DIR311


@needs_cpython_tests
@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("module", ["asyncore", "asynchat"])
@pytest.mark.parametrize("backend", ["pure", "cffi", "stdlib"])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_cpython_suite(source, module, backend, tmp_path):
    impl = "fastasyncore"
    if backend == "stdlib":
        if not _stdlib_available():
            pytest.skip("no stdlib asyncore (nor test.support.asyncore) on this Python")
        impl = "stdlib"
    else:
        need_backend(backend)

    proc, report = _run(module, backend, impl, tmp_path, SOURCES[source])
    if "import_error" in report:
        pytest.fail("cannot import the implementation with FASTASYNCORE_BACKEND=%s: %s"
                    % (backend, report["import_error"]))
    if "unavailable" in report:
        pytest.skip(report["unavailable"])
    if impl == "fastasyncore":
        assert report["backend"] == backend, (
            "FASTASYNCORE_BACKEND=%s but fastasyncore.BACKEND=%r" % (backend, report["backend"]))

    (res,) = report["results"]
    assert "module_skipped" not in res, "whole module skipped: %s" % res["module_skipped"]
    assert res["tests_run"] > 0

    real_stdlib = report.get("impl_detail", "").startswith("stdlib")
    problems = runner.unexpected_problems(res, set() if real_stdlib else runner.EXPECTED_FAILURES)
    bad_skips = [(tid, why) for tid, why in res["skipped"] if not _skip_allowed(why)]

    summary = ("%s on %s (%s, poller %s, tests from %s): run=%d passed=%d failures=%s "
               "errors=%s skipped=%d" % (
                   module, backend, report.get("impl_detail"), report.get("poller"),
                   report["tests_dir"], res["tests_run"], res["passed"],
                   res["failures"], res["errors"], len(res["skipped"])))
    print(summary)
    details = "\n".join("--- %s\n%s" % (tid, res["tracebacks"].get(tid, ""))
                        for tid in problems)
    assert not problems, "%s\nunexpected failures/errors: %s\n%s" % (summary, problems, details)
    assert not bad_skips, "%s\nskips without a platform reason: %s" % (summary, bad_skips)
    # Everything that ran either passed, was skipped, or is the known test_repr.
    accounted = (res["passed"] + len(res["skipped"]) + len(res["failures"])
                 + len(res["errors"]) + len(res["expected_failures"]))
    assert accounted == res["tests_run"], summary


def test_runner_finds_tests_or_explains():
    """The locator either finds both files or gives a reason naming the override."""
    directory, where = runner.find_cpython_tests()
    if directory is None:
        assert "FASTASYNCORE_CPYTHON_TESTS" in where
    else:
        assert (Path(directory) / "test_asyncore.py").is_file()
        assert (Path(directory) / "test_asynchat.py").is_file()


def test_runner_override_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTASYNCORE_CPYTHON_TESTS", str(tmp_path))
    directory, where = runner.find_cpython_tests()
    assert directory is None and str(tmp_path) in where
