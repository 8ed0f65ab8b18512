"""cffi builder for fastasyncore's C core (``fastasyncore._core``).

This is the only file that knows the C surface: the cdef below mirrors
csrc/fastasyncore.h. setup.py runs it through ``cffi_modules=["build.py:ffibuilder"]``;
cffi executes it with ``__name__ == "__cffi__"`` (see cffi.setuptools_ext).

The name ``build.py`` shadows pypa's ``build`` package for ``python -m build``
(and ``import build``) run from the project root, because the script's
directory / the current directory comes first on sys.path. Both cases are
handed over to the real package:

* ``python -m build ...`` executes this file as ``__main__``: we re-run the
  real ``build`` module as ``__main__`` with the same argv.
* ``import build`` (cibuildwheel does ``from build import ProjectBuilder``)
  imports this file as the module ``build``: we replace ourselves in
  sys.modules with the real package, which the import system then returns.

``python build.py --emit-c out.c`` writes the generated C for reading.
"""

import os
import sys


def _is_real_build_invocation() -> bool:
    # `python -m build`: runpy sets __spec__.name to "build". `python build.py`
    # runs with __spec__ None: that is us being run as a script on purpose.
    spec = globals().get("__spec__")
    return spec is not None and getattr(spec, "name", None) == "build"


def _import_real_build():
    """Import pypa's ``build`` with this project's root hidden from sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    me = sys.modules.get("build")
    saved_path = list(sys.path)
    sys.path[:] = [
        p for p in sys.path
        if os.path.abspath(p or os.getcwd()) != here
    ]
    sys.modules.pop("build", None)
    try:
        import importlib
        return importlib.import_module("build")
    except ImportError:
        if me is not None:
            sys.modules["build"] = me
        raise
    finally:
        # Keep the real package importable even with the root back on the path:
        # it is in sys.modules now.
        sys.path[:] = saved_path


if __name__ == "__main__" and _is_real_build_invocation():
    # `python -m build`: hand the command line over to pypa/build.
    import runpy

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
    sys.modules.pop("build", None)
    try:
        runpy.run_module("build", run_name="__main__", alter_sys=True)
    except ImportError as exc:  # pypa/build is not installed
        sys.exit("python -m build: pypa 'build' is not installed (%s); "
                 "pip install build" % exc)
    sys.exit(0)

if __name__ == "build":
    # `import build` from the project root: become the real package.
    sys.modules["build"] = _import_real_build()

else:
    from cffi import FFI

    CDEF = r"""
    #define FA_POLLIN   0x01
    #define FA_POLLPRI  0x02
    #define FA_POLLOUT  0x04
    #define FA_POLLERR  0x08
    #define FA_POLLHUP  0x10
    #define FA_POLLNVAL 0x20
    #define FA_POLLFAULT 0x8000
    #define FA_FAULT_SHIFT 16
    #define FA_KIND_EPOLL  1
    #define FA_KIND_KQUEUE 2
    #define FA_KIND_POLL   3
    #define FA_MAX_IO ...
    #define FA_IOV_MAX ...

    typedef struct fa_poller fa_poller;
    int fa_poller_kinds(int *kinds, int n);
    int fa_poller_new(int kind, fa_poller **out);
    void fa_poller_free(fa_poller *p);
    int fa_poller_fileno(const fa_poller *p);
    int fa_poller_wait(fa_poller *p, const int *changes, size_t nchanges,
                       int timeout_ms, int *out, size_t maxout, size_t *napplied);
    int fa_poller_apply(fa_poller *p, const int *changes, size_t nchanges,
                        size_t *napplied);
    int fa_poll_once(const int *fds, size_t n, int timeout_ms, int *out,
                     size_t maxout);

    ssize_t fa_send(int fd, const char *buf, size_t len);
    ssize_t fa_recv(int fd, char *buf, size_t len);
    ssize_t fa_sendv(int fd, const char *const *bufs, const size_t *lens,
                     size_t nbufs, size_t max_bytes);

    typedef struct fa_sendq fa_sendq;
    fa_sendq *fa_sendq_new(void);
    void fa_sendq_free(fa_sendq *q);
    size_t fa_sendq_len(const fa_sendq *q);
    int fa_sendq_push(fa_sendq *q, const char *data, size_t len);
    const char *fa_sendq_data(const fa_sendq *q);
    size_t fa_sendq_consume(fa_sendq *q, size_t n);
    void fa_sendq_clear(fa_sendq *q);
    ssize_t fa_sendq_send(fa_sendq *q, int fd, size_t max_bytes);

    size_t fa_scan(const char *buf, size_t buflen, size_t start,
                   const char *term, size_t tlen, size_t *out, size_t limit);
    ptrdiff_t fa_prefix_at_end(const char *hay, size_t hlen,
                               const char *needle, size_t nlen);
    """

    SOURCES = ["csrc/fa_poller.c", "csrc/fa_io.c", "csrc/fa_buffer.c"]

    ffibuilder = FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(
        "fastasyncore._core",
        '#include "fastasyncore.h"',
        sources=SOURCES,
        include_dirs=["csrc"],
        depends=["csrc/fastasyncore.h"],
        # Extra flags for sanitizer/debug builds (tests/sanitize.sh).
        extra_compile_args=os.environ.get("FASTASYNCORE_CFLAGS", "").split(),
        extra_link_args=os.environ.get("FASTASYNCORE_LDFLAGS", "").split(),
    )

    if __name__ == "__main__":
        # `python build.py [--emit-c FILE]`: write the generated C for reading.
        args = sys.argv[1:]
        target = args[1] if args[:1] == ["--emit-c"] and len(args) > 1 else "_core.c"
        ffibuilder.emit_c_code(target)
        print("wrote", target)
