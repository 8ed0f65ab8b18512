"""Packaging: ``python -m build`` run from the project root makes an sdist and
a wheel from it.

The cffi builder is the top-level ``build.py``, and a ``build.py`` in the
current directory shadows pypa's ``build`` package under ``python -m build``:
without the hand-over in build.py the command ran our ffibuilder, exited 0
and wrote nothing (shared spec, packaging §B1). These tests run the real
command once, in a copy of the project (so the checkout is left untouched),
and check that

* the sdist holds what a wheel build from it needs;
* the wheel's extension modules, the cffi core ``_core`` and the C loop
  ``_cloop``, are both there and are all ``.abi3.so`` in an abi3 wheel (the
  wheel tag is not checked against the modules by setuptools: a
  version-specific ``_cloop`` in a ``cp39-abi3`` wheel would install on
  3.12 and silently run the Python loop);
* the wheel's ``_cloop`` imports and runs the loop on this interpreter
  (``_loop.loop_impl() == "c"``), and loads on the other CPythons found
  (pyenv 3.9-3.13, ``python3.X`` on PATH): the abi3 promise.

Without a C compiler the wheel is the pure ``py3-none-any`` one (skipped,
or failed with FASTASYNCORE_REQUIRE_CORE=1).

The full chain (sdist -> wheel from the sdist -> auditwheel -> abi3audit ->
installed-wheel tests on 3.9/3.13) is .ci/packaging.sh.
"""

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_CORE = os.environ.get("FASTASYNCORE_REQUIRE_CORE") == "1"
EXTENSIONS = ("_core", "_cloop")

pytestmark = pytest.mark.skipif(
    not all((ROOT / f).is_file() for f in ("build.py", "setup.py", "pyproject.toml")),
    reason="not a source checkout (tests run against an installed package)")

# Left out of the copy: VCS data, build products, caches.
_TOP_IGNORED = {".git", "build", "dist", "wheelhouse", ".pytest_cache", ".hypothesis",
                ".benchmarks", ".venv", "venv"}


def _ignore(directory, names):
    top = Path(directory).resolve() == ROOT
    return [n for n in names
            if (top and n in _TOP_IGNORED) or n == "__pycache__"
            or n.endswith((".egg-info", ".so", ".o", ".pyc", ".pyd"))]


def _have_pypa_build():
    # Probed from "/" so that our own build.py cannot answer.
    probe = subprocess.run([sys.executable, "-c", "import build.__main__"], cwd="/",
                           capture_output=True, timeout=60)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``python -m build`` (sdist, then the wheel from it) in a copy of the
    project, from its root: ``(proc, sdists, wheels)``."""
    if not _have_pypa_build():
        pytest.skip("pypa 'build' is not installed (it is in the 'test' extra)")
    tmp_path = tmp_path_factory.mktemp("pkg")
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=_ignore)
    out = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "FASTASYNCORE_PUREPYTHON",
                        "FASTASYNCORE_CFLAGS", "FASTASYNCORE_LDFLAGS")}
    # Exactly the documented command, from the project root: the current
    # directory (with build.py in it) is first on sys.path.
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out)],
                          cwd=str(project), env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdists = sorted(out.glob("fastasyncore-*.tar.gz")) if out.exists() else []
    wheels = sorted(out.glob("fastasyncore-*.whl")) if out.exists() else []
    return proc, sdists, wheels


@pytest.mark.timeout(600)
def test_python_m_build_sdist_from_project_root(built):
    proc, sdists, wheels = built
    # The shadowing failure mode: exit 0 and no file at all.
    assert len(sdists) == 1, ("python -m build wrote no sdist (did build.py "
                              "shadow pypa/build?)\n" + proc.stdout[-3000:])
    assert len(wheels) == 1, "python -m build wrote %d wheels" % len(wheels)
    assert "Building wheel from sdist" in proc.stdout + proc.stderr
    assert "Successfully built %s and %s" % (sdists[0].name, wheels[0].name) in proc.stdout

    with tarfile.open(str(sdists[0])) as tar:
        top = sdists[0].name[:-len(".tar.gz")] + "/"
        names = {m.name[len(top):] for m in tar.getmembers()
                 if m.isfile() and m.name.startswith(top)}
    needed = {"build.py", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md",
              "PKG-INFO", "src/fastasyncore/__init__.py", "src/fastasyncore/py.typed",
              "tests/conftest.py", "csrc/fa_cloop.c"}
    needed |= {"csrc/" + p.name for p in (ROOT / "csrc").iterdir()
               if p.suffix in (".c", ".h")}
    needed |= {"src/fastasyncore/" + p.name for p in (ROOT / "src" / "fastasyncore").iterdir()
               if p.suffix in (".py", ".pyi")}
    assert any(n.endswith(".c") for n in needed) and any(n.endswith(".h") for n in needed)
    missing = sorted(needed - names)
    assert not missing, "sdist lacks %s" % missing
    built_files = sorted(n for n in names if n.endswith((".so", ".o", ".pyc", ".pyd")))
    assert not built_files, "sdist ships build products: %s" % built_files
    # The build ran in the copy, not in the checkout.
    assert not (ROOT / "_core.c").exists()


def _the_wheel(built):
    wheels = built[2]
    assert len(wheels) == 1, "python -m build wrote %d wheels" % len(wheels)
    whl = wheels[0]
    with zipfile.ZipFile(str(whl)) as z:
        sos = sorted(n for n in z.namelist() if n.endswith((".so", ".pyd")))
    if whl.name.endswith("-py3-none-any.whl"):
        # No compiler here: the pure fallback (setup.py's WARNING).
        assert not sos, "a py3-none-any wheel ships binaries: %s" % sos
        if REQUIRE_CORE:
            pytest.fail("FASTASYNCORE_REQUIRE_CORE=1 but python -m build made a pure "
                        "wheel: %s" % whl.name)
        pytest.skip("the C core was not built (pure wheel %s)" % whl.name)
    return whl, sos


@pytest.mark.timeout(600)
def test_wheel_holds_core_and_c_loop_all_abi3(built):
    whl, sos = _the_wheel(built)
    for ext in EXTENSIONS:
        assert [n for n in sos if n.startswith("fastasyncore/%s." % ext)], (
            "wheel %s has no fastasyncore/%s*.so: %s" % (whl.name, ext, sos))
    tags = whl.name[:-len(".whl")].split("-")[-3:]
    if tags[1] == "abi3":
        assert tags[0] == "cp39", whl.name
        not_abi3 = [n for n in sos if not n.endswith(".abi3.so")]
        assert not not_abi3, ("%s is tagged abi3 but holds version-specific modules "
                              "(they cannot load on other CPythons): %s"
                              % (whl.name, not_abi3))
        assert sorted(sos) == sorted("fastasyncore/%s.abi3.so" % e for e in EXTENSIONS), sos
    else:
        # Only where the limited API does not exist (free-threaded builds).
        assert sysconfig_gil_disabled(), "wheel is not abi3 on a GIL build: %s" % whl.name


def sysconfig_gil_disabled():
    import sysconfig
    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _other_cpythons():
    """Other CPython 3.9-3.13 interpreters on this machine: pyenv's, python3.X on PATH."""
    found = {}
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for minor in range(9, 14):
        if (3, minor) == sys.version_info[:2]:
            continue
        cands = sorted(glob.glob(os.path.join(pyenv, "versions", "3.%d.*" % minor, "bin",
                                              "python")))
        which = shutil.which("python3.%d" % minor)
        for c in cands[-1:] + ([which] if which else []):
            if os.access(c, os.X_OK) and not os.path.realpath(c).endswith("t"):
                found.setdefault(minor, c)
                break
    return [found[m] for m in sorted(found)]


@pytest.mark.timeout(600)
def test_wheel_c_loop_imports_and_runs(built, tmp_path):
    whl, sos = _the_wheel(built)
    site = tmp_path / "site"
    with zipfile.ZipFile(str(whl)) as z:
        z.extractall(str(site))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "FASTASYNCORE_LOOP",
                        "FASTASYNCORE_BACKEND")}
    env["PYTHONPATH"] = str(site)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # This interpreter (cffi is here: a dependency): the cffi backend with the
    # C loop, from the wheel's files.
    code = ("import fastasyncore, fastasyncore._core as c, fastasyncore._cloop as l\n"
            "from fastasyncore import _loop\n"
            "for m in (fastasyncore, c, l):\n"
            "    assert m.__file__.startswith(%r), m.__file__\n"
            "assert fastasyncore.BACKEND == 'cffi', fastasyncore.BACKEND\n"
            "assert _loop.loop_impl() == 'c', _loop.loop_impl()\n"
            "assert fastasyncore.LOOP == 'c'\n"
            "from fastasyncore import asyncore\n"
            "asyncore.loop(timeout=0, map={}, count=1)\n"
            "print('ok', l.__file__)\n" % str(site))
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path),
                          env=dict(env, FASTASYNCORE_BACKEND="cffi"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every other CPython here: the abi3 modules must load (the C loop needs
    # no cffi; _core does, so it is only loaded where cffi is installed).
    probe = ("import sys, importlib\n"
             "import fastasyncore._cloop as l\n"
             "assert l.__file__.startswith(%r), l.__file__\n"
             "try:\n"
             "    import _cffi_backend\n"
             "except ImportError:\n"
             "    print(sys.version_info[:2], 'no cffi: _core not loaded')\n"
             "else:\n"
             "    importlib.import_module('fastasyncore._core')\n"
             "print(sys.version_info[:2], 'ok')\n" % str(site))
    failures = []
    for py in _other_cpythons():
        p = subprocess.run([py, "-s", "-c", probe], cwd=str(tmp_path),
                           env=dict(env, FASTASYNCORE_BACKEND="pure"),
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            failures.append("%s: %s" % (py, (p.stdout + p.stderr)[-1500:]))
    assert not failures, "the abi3 wheel's modules do not load on:\n" + "\n".join(failures)
