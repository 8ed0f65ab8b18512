"""Packaging: ``python -m build --sdist`` run from the project root makes an sdist.

The cffi builder is the top-level ``build.py``, and a ``build.py`` in the
current directory shadows pypa's ``build`` package under ``python -m build``:
without the hand-over in build.py the command ran our ffibuilder, exited 0
and wrote nothing (shared spec, packaging §B1). This test runs the real
command in a copy of the project (so the checkout is left untouched) and
checks that an sdist appears and holds what a wheel build from it needs.

The full chain (sdist -> wheel from the sdist -> auditwheel -> abi3audit ->
installed-wheel tests) is .ci/packaging.sh.
"""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

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


@pytest.mark.timeout(600)
def test_python_m_build_sdist_from_project_root(tmp_path):
    if not _have_pypa_build():
        pytest.skip("pypa 'build' is not installed (it is in the 'test' extra)")
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=_ignore)
    out = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "FASTASYNCORE_PUREPYTHON")}
    # Exactly the documented command, from the project root: the current
    # directory (with build.py in it) is first on sys.path.
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out)],
                          cwd=str(project), env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdists = sorted(out.glob("fastasyncore-*.tar.gz")) if out.exists() else []
    # The shadowing failure mode: exit 0 and no file at all.
    assert len(sdists) == 1, ("python -m build --sdist wrote no sdist (did build.py "
                              "shadow pypa/build?)\n" + proc.stdout[-3000:])
    assert "Successfully built %s" % sdists[0].name in proc.stdout

    with tarfile.open(str(sdists[0])) as tar:
        top = sdists[0].name[:-len(".tar.gz")] + "/"
        names = {m.name[len(top):] for m in tar.getmembers()
                 if m.isfile() and m.name.startswith(top)}
    needed = {"build.py", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md",
              "PKG-INFO", "src/fastasyncore/__init__.py", "src/fastasyncore/py.typed",
              "tests/conftest.py"}
    needed |= {"csrc/" + p.name for p in (ROOT / "csrc").iterdir()
               if p.suffix in (".c", ".h")}
    needed |= {"src/fastasyncore/" + p.name for p in (ROOT / "src" / "fastasyncore").iterdir()
               if p.suffix in (".py", ".pyi")}
    assert any(n.endswith(".c") for n in needed) and any(n.endswith(".h") for n in needed)
    missing = sorted(needed - names)
    assert not missing, "sdist lacks %s" % missing
    built = sorted(n for n in names if n.endswith((".so", ".o", ".pyc", ".pyd")))
    assert not built, "sdist ships build products: %s" % built
    # The build ran in the copy, not in the checkout.
    assert not (ROOT / "_core.c").exists()
