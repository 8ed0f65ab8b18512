"""Build wiring for fastasyncore's optional C core (metadata is in pyproject.toml).

``cffi_modules`` can only be given to setup() (cffi registers it as a
setup keyword; pyproject.toml's [tool.setuptools] rejects it).

Switches (environment):

* ``FASTASYNCORE_PUREPYTHON=1``: no core; a pure ``py3-none-any`` wheel.
* ``FASTASYNCORE_REQUIRE_CORE=1`` or ``CIBUILDWHEEL=1``: a failed core build
  fails the install (a wheel must never ship pure by accident).
* otherwise a failed core build prints a WARNING and installs pure Python.
"""

import os
import platform
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


PURE = _flag("FASTASYNCORE_PUREPYTHON")
REQUIRE = _flag("FASTASYNCORE_REQUIRE_CORE") or _flag("CIBUILDWHEEL")
# cffi ships with PyPy (whose own cffi backend is used); the core targets CPython.
WANT_CORE = not PURE and platform.python_implementation() == "CPython"
# abi3 only where the limited API exists: not on free-threaded builds.
GIL = not sysconfig.get_config_var("Py_GIL_DISABLED")


class BuildFailed(Exception):
    pass


class optional_build_ext(build_ext):
    """build_ext that turns compiler failures into BuildFailed (markupsafe's way)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # DistutilsPlatformError & co.
            raise BuildFailed(exc) from exc

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # CCompilerError, CompileError, LinkError, ...
            raise BuildFailed(exc) from exc


def _env_flags(name: str) -> list:
    return os.environ.get(name, "").split()


def cloop_extension() -> Extension:
    """fastasyncore._cloop: the loop's iterations in C (csrc/fa_cloop.c).

    A CPython-API module beside the cffi core (cffi cannot call Python
    handlers cheaply); it reaches the poller through a function pointer that
    _cffi.py hands it, so no C source is compiled twice.  Limited API 3.9
    (one abi3 build), except on free-threaded builds, which have none.
    """
    return Extension(
        "fastasyncore._cloop", ["csrc/fa_cloop.c", "csrc/fa_chanio.c"],
        include_dirs=["csrc"], depends=["csrc/fastasyncore.h", "csrc/fa_chanio.h", "csrc/fa_pyutil.h"],
        py_limited_api=GIL,
        define_macros=[("Py_LIMITED_API", "0x03090000")] if GIL else [],
        # -Werror=implicit-function-declaration: under the limited API a
        # full-API macro (PySet_CheckExact on 3.9) compiles as a call to an
        # undeclared function and fails only at import, "undefined symbol"
        extra_compile_args=["-fvisibility=hidden", "-Werror=implicit-function-declaration"]
        + _env_flags("FASTASYNCORE_CFLAGS"),
        extra_link_args=_env_flags("FASTASYNCORE_LDFLAGS"))


def run_setup(with_core: bool) -> None:
    kw = {}
    if with_core:
        kw["cffi_modules"] = ["build.py:ffibuilder"]
        kw["ext_modules"] = [cloop_extension()]
        kw["cmdclass"] = {"build_ext": optional_build_ext}
        if GIL:
            kw["options"] = {"bdist_wheel": {"py_limited_api": "cp39"}}
    setup(**kw)


def warn(exc: BaseException) -> None:
    bar = "=" * 74
    print(bar, file=sys.stderr)
    print("WARNING: fastasyncore's C core could not be compiled (%s);" % exc,
          file=sys.stderr)
    print("installing the pure-Python backend (same API, slower). Set "
          "FASTASYNCORE_REQUIRE_CORE=1 to make this an error.", file=sys.stderr)
    print(bar, file=sys.stderr)


def drop_stale_core() -> None:
    # An in-tree build/ may hold a core from an earlier successful build; it
    # must not end up in a pure wheel.
    import glob
    for name in ("_core*", "_cloop*"):
        for stale in glob.glob(os.path.join("build", "lib*", "fastasyncore", name)):
            os.remove(stale)


if not WANT_CORE:
    drop_stale_core()
    run_setup(False)
elif REQUIRE:
    run_setup(True)
else:
    try:
        run_setup(True)
    except BuildFailed as exc:
        warn(exc)
        drop_stale_core()
        run_setup(False)
