"""Run CPython's own ``test_asyncore.py`` / ``test_asynchat.py`` against fastasyncore.

The CPython test files are *never* copied into this repository (they are
PSF-licensed and belong to the interpreter).  They are located at test time:

1. ``FASTASYNCORE_CPYTHON_TESTS=DIR`` (a directory holding the two files), else
2. the running interpreter's own ``test`` package (it ships them up to 3.11), else
3. a CPython 3.11 installation managed by pyenv
   (``~/.pyenv/versions/3.11*/lib/python3.11/test/``; ``$PYENV_ROOT`` is honoured).

How one run works (this file is executed as a script, one subprocess per
module x backend, so that ``FASTASYNCORE_BACKEND`` is read at import time):

* import the implementation (``fastasyncore.asyncore`` / ``fastasyncore.asynchat``,
  or with ``--impl stdlib`` the stdlib modules, to validate this harness);
* alias it as ``sys.modules['asyncore']`` / ``sys.modules['asynchat']`` so the
  test file's ``import asyncore`` / ``warnings_helper.import_deprecated('asyncore')``
  gets it;
* make sure the ``test.support`` helpers those files use exist.  On 3.12+ the
  running interpreter's ``test.support`` is used together with the 3.11 test
  files; every helper the files need still exists there (checked for 3.12 and
  3.13), but should one be missing, a small fallback is attached to the
  *in-memory* helper module of this subprocess only.  If ``test.support`` is not
  importable at all (distributions that strip the test suite), a minimal
  in-memory ``test.support`` package is registered in ``sys.modules``.  The test
  files themselves are never modified;
* load the test file from its path with importlib and run it with unittest;
* print one line ``FASTASYNCORE-CONFORMANCE-JSON: {...}`` with the counts and
  the ids of failing / erroring / skipped tests.

Command line (run from anywhere; ``fastasyncore`` must be importable)::

    python tests/cpython_conformance.py asyncore [asynchat] [--impl fastasyncore|stdlib]
                                        [--tests-dir DIR] [-v] [--json]

``FASTASYNCORE_CONFORMANCE_IMPL=stdlib`` is the environment equivalent of
``--impl stdlib``.  Exit status: 0 when everything passed (or only
``test_repr`` failed with fastasyncore), 1 on other failures, 2 when the test
files or the implementation cannot be found.
"""

import argparse
import contextlib
import glob
import importlib
import importlib.util
import io
import json
import os
import sys
import time
import traceback
import types
import unittest

MODULES = ("asyncore", "asynchat")
JSON_MARKER = "FASTASYNCORE-CONFORMANCE-JSON: "

# Tests that cannot pass with a module that is not literally named ``asyncore``:
# DispatcherTests.test_repr asserts the repr starts with '<asyncore.dispatcher'.
EXPECTED_FAILURES = {"test_repr"}


# --------------------------------------------------------------------------
# Locating the CPython test files
# --------------------------------------------------------------------------

def _has_files(directory):
    return all(os.path.isfile(os.path.join(directory, "test_%s.py" % m)) for m in MODULES)


def find_cpython_tests():
    """Return ``(directory, description)`` or ``(None, reason)``.

    Never imports the test modules; only looks at files.
    """
    override = os.environ.get("FASTASYNCORE_CPYTHON_TESTS")
    if override:
        if _has_files(override):
            return override, "FASTASYNCORE_CPYTHON_TESTS=%s" % override
        return None, ("FASTASYNCORE_CPYTHON_TESTS=%s does not contain test_asyncore.py "
                      "and test_asynchat.py" % override)

    # 1. The running interpreter's own test package (CPython <= 3.11).
    if sys.version_info < (3, 12):
        try:
            spec = importlib.util.find_spec("test")
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                if _has_files(loc):
                    return loc, "running interpreter's test package (%d.%d)" % sys.version_info[:2]

    # 2. A CPython 3.11 installation (pyenv's).
    roots = []
    if os.environ.get("PYENV_ROOT"):
        roots.append(os.environ["PYENV_ROOT"])
    roots.append(os.path.expanduser("~/.pyenv"))
    for root in roots:
        candidates = sorted(glob.glob(os.path.join(root, "versions", "3.11*", "lib",
                                                   "python3.11", "test")), reverse=True)
        for cand in candidates:
            if _has_files(cand):
                return cand, "CPython 3.11 installation at %s" % cand

    return None, ("CPython's test_asyncore.py/test_asynchat.py not found: the running "
                  "Python %d.%d has no test/test_asyncore.py (removed in 3.12, or the "
                  "distribution strips the test suite) and no CPython 3.11 was found under "
                  "~/.pyenv/versions/3.11*; set FASTASYNCORE_CPYTHON_TESTS=DIR"
                  % sys.version_info[:2])


def find_cpython311_tests():
    """The CPython 3.11 test files specifically (the running interpreter's on
    3.11, else pyenv's 3.11), or None.  ``FASTASYNCORE_CPYTHON_TESTS`` is not
    consulted.  On 3.9/3.10 the default search finds that interpreter's own
    (older) files; the 3.11 files run there too, with test.support fallbacks."""
    if sys.version_info[:2] == (3, 11) and not os.environ.get("FASTASYNCORE_CPYTHON_TESTS"):
        directory, _ = find_cpython_tests()
        if directory:
            return directory
    roots = []
    if os.environ.get("PYENV_ROOT"):
        roots.append(os.environ["PYENV_ROOT"])
    roots.append(os.path.expanduser("~/.pyenv"))
    for root in roots:
        for cand in sorted(glob.glob(os.path.join(root, "versions", "3.11*", "lib",
                                                  "python3.11", "test")), reverse=True):
            if _has_files(cand):
                return cand
    return None


# --------------------------------------------------------------------------
# test.support compatibility (in-memory only)
# --------------------------------------------------------------------------

def _fallback_import_deprecated(name):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(name)


def _fallback_join_thread(thread, timeout=None):
    if timeout is None:
        timeout = 300.0
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError("failed to join the thread in %.1f seconds" % timeout)


def _fallback_reap_threads(func):
    return func


def _fallback_threading_setup():
    import threading
    return (threading.active_count(),)


def _fallback_threading_cleanup(*original_values):
    return None


def _fallback_bind_port(sock, host="localhost"):
    import socket
    if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM:
        if hasattr(socket, "SO_REUSEADDR"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock.getsockname()[1]


def _fallback_bind_unix_socket(sock, addr):
    sock.bind(addr)


def _ipv6_enabled():
    import socket
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _fallback_unlink(filename):
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.unlink(filename)


@contextlib.contextmanager
def _captured(stream_name):
    orig = getattr(sys, stream_name)
    setattr(sys, stream_name, io.StringIO())
    try:
        yield getattr(sys, stream_name)
    finally:
        setattr(sys, stream_name, orig)


def _fallback_gc_collect():
    import gc
    gc.collect()
    gc.collect()
    gc.collect()


def _fallback_requires_working_socket(*, module=False):
    return None if module else (lambda f: f)


# (module, attribute) -> fallback value.  Only attached when missing.
_FALLBACKS = {
    ("support", "PGO"): lambda: False,
    ("support", "verbose"): lambda: 0,
    ("support", "requires_working_socket"): lambda: _fallback_requires_working_socket,
    ("support", "captured_stdout"): lambda: (lambda: _captured("stdout")),
    ("support", "captured_stderr"): lambda: (lambda: _captured("stderr")),
    ("support", "gc_collect"): lambda: _fallback_gc_collect,
    ("os_helper", "TESTFN"): lambda: "@test_%d_tmp" % os.getpid(),
    ("os_helper", "unlink"): lambda: _fallback_unlink,
    ("socket_helper", "HOST"): lambda: "localhost",
    ("socket_helper", "HOSTv4"): lambda: "127.0.0.1",
    ("socket_helper", "HOSTv6"): lambda: "::1",
    ("socket_helper", "IPV6_ENABLED"): _ipv6_enabled,
    ("socket_helper", "bind_port"): lambda: _fallback_bind_port,
    ("socket_helper", "bind_unix_socket"): lambda: _fallback_bind_unix_socket,
    ("threading_helper", "join_thread"): lambda: _fallback_join_thread,
    ("threading_helper", "reap_threads"): lambda: _fallback_reap_threads,
    ("threading_helper", "threading_setup"): lambda: _fallback_threading_setup,
    ("threading_helper", "threading_cleanup"): lambda: _fallback_threading_cleanup,
    ("warnings_helper", "import_deprecated"): lambda: _fallback_import_deprecated,
}


def prepare_test_support():
    """Make sure ``test.support`` and the helper submodules the 3.9-3.11 test
    files use exist in this process.  Returns a list of notes describing any
    shim that was applied (empty when the interpreter's own helpers suffice)."""
    notes = []
    try:
        import test.support as support  # noqa: F401
    except ImportError as exc:
        notes.append("test.support not importable (%s): using an in-memory minimal one" % exc)
        pkg = sys.modules.get("test")
        if pkg is None:
            pkg = types.ModuleType("test")
            pkg.__path__ = []
            sys.modules["test"] = pkg
        support = types.ModuleType("test.support")
        support.__path__ = []
        sys.modules["test.support"] = support
        pkg.support = support

    import test.support as support
    mods = {"support": support}
    for sub in ("os_helper", "socket_helper", "threading_helper", "warnings_helper"):
        full = "test.support." + sub
        try:
            mod = importlib.import_module(full)
        except ImportError:
            # 3.9 has no os_helper/threading_helper (its test files do not use
            # them); older layouts kept these helpers on test.support itself.
            mod = types.ModuleType(full)
            sys.modules[full] = mod
            setattr(support, sub, mod)
            notes.append("%s missing: in-memory module added" % full)
        mods[sub] = mod

    for (modkey, attr), make in _FALLBACKS.items():
        mod = mods[modkey]
        if hasattr(mod, attr):
            continue
        # Prefer the helper from test.support itself (older layout).
        if modkey != "support" and hasattr(support, attr):
            setattr(mod, attr, getattr(support, attr))
            notes.append("%s.%s taken from test.support" % (mod.__name__, attr))
        else:
            setattr(mod, attr, make())
            notes.append("%s.%s missing: fallback added" % (mod.__name__, attr))
    return notes


# --------------------------------------------------------------------------
# Implementation selection
# --------------------------------------------------------------------------

def load_implementation(impl):
    """Import the implementation and alias it as asyncore/asynchat.

    Returns a dict of facts about what was loaded."""
    info = {"impl": impl}
    if impl == "stdlib":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                import asyncore
                import asynchat
                info["impl_detail"] = "stdlib asyncore/asynchat"
            except ImportError:
                # 3.12+: CPython keeps private copies for its own tests.
                from test.support import asyncore, asynchat
                info["impl_detail"] = "test.support.asyncore/asynchat (private copies)"
        info["backend"] = "stdlib"
        info["poller"] = "select/poll"
    else:
        import fastasyncore
        from fastasyncore import asyncore, asynchat
        info["impl_detail"] = "fastasyncore %s from %s" % (
            getattr(fastasyncore, "__version__", "?"), os.path.dirname(fastasyncore.__file__))
        info["backend"] = getattr(fastasyncore, "BACKEND", "?")
        info["poller"] = getattr(fastasyncore, "POLLER", "?")
    sys.modules["asyncore"] = asyncore
    sys.modules["asynchat"] = asynchat
    info["asyncore_file"] = getattr(asyncore, "__file__", None)
    return info


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------

class _Result(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed = []

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed.append(test.id())


def run_module(module, tests_dir, verbosity=1, stream=None):
    path = os.path.join(tests_dir, "test_%s.py" % module)
    name = "test_%s" % module
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    out = {"module": module, "tests_file": path}
    try:
        spec.loader.exec_module(mod)
    except unittest.SkipTest as exc:
        out.update(module_skipped=str(exc), tests_run=0)
        return out

    suite = unittest.defaultTestLoader.loadTestsFromModule(mod)
    runner = unittest.TextTestRunner(stream=stream or sys.stderr, verbosity=verbosity,
                                     resultclass=_Result)
    t0 = time.monotonic()
    result = runner.run(suite)
    out.update(
        seconds=round(time.monotonic() - t0, 3),
        tests_run=result.testsRun,
        passed=len(result.passed),
        failures=[t.id() for t, _ in result.failures],
        errors=[t.id() for t, _ in result.errors],
        skipped=[[t.id(), str(reason)] for t, reason in result.skipped],
        expected_failures=[t.id() for t, _ in result.expectedFailures],
        unexpected_successes=[t.id() for t in result.unexpectedSuccesses],
        tracebacks={t.id(): tb for t, tb in result.failures + result.errors},
    )
    return out


def unexpected_problems(result, allowed=EXPECTED_FAILURES):
    """Ids of failures/errors (other than the ``allowed`` test names) and of
    unexpected successes in one module's result."""
    bad = []
    for tid in result.get("failures", []) + result.get("errors", []):
        if tid.rsplit(".", 1)[-1] not in allowed:
            bad.append(tid)
    bad.extend(result.get("unexpected_successes", []))
    return bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help="asyncore and/or asynchat (default: both)")
    parser.add_argument("--impl", choices=("fastasyncore", "stdlib"),
                        default=os.environ.get("FASTASYNCORE_CONFORMANCE_IMPL", "fastasyncore"),
                        help="implementation to alias as asyncore/asynchat "
                             "(stdlib: validate the harness against CPython's own modules)")
    parser.add_argument("--tests-dir", help="directory holding CPython's test_asyncore.py "
                        "and test_asynchat.py (default: search; see module docstring)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no unittest output; only one summary line per module "
                             "(plus tracebacks of unexpected failures)")
    parser.add_argument("--json", action="store_true", help="only print the JSON line on stdout")
    parser.add_argument("--hang-timeout", type=float, default=float(
        os.environ.get("FASTASYNCORE_CONFORMANCE_HANG_TIMEOUT", "240")),
        help="dump all thread tracebacks and exit if a run exceeds this (seconds)")
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    for m in modules:
        if m not in MODULES:
            parser.error("unknown module %r (choose from %s)" % (m, ", ".join(MODULES)))

    if args.tests_dir:
        tests_dir, where = args.tests_dir, "--tests-dir"
        if not _has_files(tests_dir):
            print("no test_asyncore.py/test_asynchat.py in %s" % tests_dir, file=sys.stderr)
            return 2
    else:
        tests_dir, where = find_cpython_tests()
        if tests_dir is None:
            print(JSON_MARKER + json.dumps({"unavailable": where}))
            print(where, file=sys.stderr)
            return 2

    if args.hang_timeout > 0:
        import faulthandler
        faulthandler.dump_traceback_later(args.hang_timeout, exit=True)

    report = {
        "python": sys.version.split()[0],
        "tests_dir": tests_dir,
        "tests_found_via": where,
        "requested_backend": os.environ.get("FASTASYNCORE_BACKEND", "auto"),
    }
    # Alias the implementation first, so that anything imported from here on
    # (test.support included) that imports asyncore/asynchat gets it.
    try:
        report.update(load_implementation(args.impl))
    except ImportError as exc:
        report["import_error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        print(JSON_MARKER + json.dumps(report))
        print("cannot import the implementation: %s" % report["import_error"], file=sys.stderr)
        return 2
    report["support_shims"] = prepare_test_support()

    stream = io.StringIO() if args.quiet else sys.stderr
    report["results"] = []
    status = 0
    for module in modules:
        res = run_module(module, tests_dir, verbosity=0 if args.quiet else 1 + args.verbose,
                         stream=stream)
        report["results"].append(res)
        # CPython's own modules must pass everything, test_repr included.
        real_stdlib = report.get("impl_detail", "").startswith("stdlib")
        problems = unexpected_problems(res, set() if real_stdlib else EXPECTED_FAILURES)
        if problems:
            status = 1
            if args.quiet:
                for tid in problems:
                    print("--- %s\n%s" % (tid, res.get("tracebacks", {}).get(tid, "")),
                          file=sys.stderr)
    if not args.json:
        for res in report["results"]:
            print("conformance: Python %s, %s backend=%s poller=%s: test_%s run=%s passed=%s "
                  "failures=%s errors=%s skipped=%s" % (
                      report["python"], args.impl, report.get("backend"), report.get("poller"),
                      res["module"], res.get("tests_run"), res.get("passed"),
                      [t.rsplit(".", 1)[-1] for t in res.get("failures", [])],
                      [t.rsplit(".", 1)[-1] for t in res.get("errors", [])],
                      len(res.get("skipped", []))))
    if args.json or not args.quiet:
        print(JSON_MARKER + json.dumps(report))
    sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
