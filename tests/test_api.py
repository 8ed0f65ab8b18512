"""Public surface: names, import behaviour, backend selection, install()."""

import os
import subprocess
import sys
import textwrap

import pytest

import fastasyncore
from fastasyncore import asyncore, asynchat

ASYNCORE_NAMES = """
loop poll poll2 poll3 readwrite read write _exception close_all compact_traceback
socket_map ExitNow _DISCONNECTED _reraised_exceptions _strerror dispatcher
dispatcher_with_send select socket sys time warnings os EALREADY EINPROGRESS
EWOULDBLOCK ECONNRESET EINVAL ENOTCONN ESHUTDOWN EISCONN EBADF ECONNABORTED
EPIPE EAGAIN errorcode
""".split()


def run_py(code, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=e, timeout=60)


def test_asyncore_names():
    missing = [n for n in ASYNCORE_NAMES if not hasattr(asyncore, n)]
    assert missing == []
    assert asyncore.poll3 is asyncore.poll2
    if os.name == "posix":
        assert asyncore.file_wrapper and asyncore.file_dispatcher
    assert not hasattr(asyncore.dispatcher, "__getattr__")
    assert asyncore._reraised_exceptions == (asyncore.ExitNow, KeyboardInterrupt, SystemExit)


def test_asynchat_names_and_identity():
    for n in ("async_chat", "simple_producer", "find_prefix_at_end"):
        assert hasattr(asynchat, n)
    assert asynchat.asyncore is asyncore
    assert issubclass(asynchat.async_chat, asyncore.dispatcher)
    assert not hasattr(asynchat, "fifo")


def test_dispatcher_combines_with_thread():
    import threading

    class T(asyncore.dispatcher, threading.Thread):
        def __init__(self):
            asyncore.dispatcher.__init__(self, map={})
            threading.Thread.__init__(self)

    t = T()
    assert t.socket is None and not t.is_alive()


def test_import_emits_no_deprecation_warning():
    r = run_py("""
        import warnings
        warnings.simplefilter("error")
        from fastasyncore import asyncore, asynchat
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@pytest.mark.parametrize("value,expected", [("pure", "pure"), ("auto", None), ("", None)])
def test_backend_env_selection(value, expected):
    r = run_py("import fastasyncore; print(fastasyncore.BACKEND)",
               FASTASYNCORE_BACKEND=value)
    assert r.returncode == 0, r.stderr
    if expected:
        assert r.stdout.strip() == expected
    else:
        assert r.stdout.strip() in ("pure", "cffi")


def test_backend_env_unknown_value_raises_importerror_naming_valid_values():
    r = run_py("import fastasyncore", FASTASYNCORE_BACKEND="bogus")
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    for v in ("auto", "cffi", "pure"):
        assert repr(v) in r.stderr


def test_backend_env_cffi_without_core_raises():
    # Hide the compiled core by blocking its import.
    r = run_py("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastasyncore._core":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import fastasyncore
    """, FASTASYNCORE_BACKEND="cffi")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "'pure'" in r.stderr


def test_backend_env_auto_falls_back_to_pure_without_core():
    r = run_py("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastasyncore._core":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import fastasyncore
        print(fastasyncore.BACKEND)
    """, FASTASYNCORE_BACKEND="auto")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "pure"


def test_install_makes_import_asyncore_ours():
    r = run_py("""
        import fastasyncore
        fastasyncore.install()
        import asyncore, asynchat
        from fastasyncore import asyncore as a, asynchat as c
        assert asyncore is a and asynchat is c
        assert asynchat.async_chat.__mro__[1] is asyncore.dispatcher
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_backend_and_poller_are_visible():
    assert fastasyncore.BACKEND in ("pure", "cffi")
    assert fastasyncore.POLLER in ("epoll", "kqueue", "poll", "select")


def test_loop_is_visible_and_follows_backend_and_env():
    from fastasyncore import _backend, _loop
    expect = "c" if (_backend.current.NAME == "cffi" and _loop._loop_choice != "py") else "py"
    try:
        import fastasyncore._cloop  # noqa: F401
    except ImportError:
        expect = "py"
    assert fastasyncore.LOOP == expect
    # FASTASYNCORE_LOOP is read at import; bad values are refused there
    r = run_py("import fastasyncore._loop", FASTASYNCORE_LOOP="fast")
    assert r.returncode != 0 and "FASTASYNCORE_LOOP" in r.stderr
    r = run_py("import fastasyncore; print(fastasyncore.LOOP)",
               FASTASYNCORE_LOOP="py")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "py"
    r = run_py("import fastasyncore; print(fastasyncore.LOOP)",
               FASTASYNCORE_LOOP="py", FASTASYNCORE_BACKEND="pure")
    assert r.stdout.strip() == "py"
    with pytest.raises(ValueError):
        _loop.set_loop("fast")


def test_pure_backend_loads_no_compiled_loop_and_switching_keeps_the_python_loop():
    # FASTASYNCORE_BACKEND=pure stands for a platform without our C code:
    # MapState keeps every field in __slots__ (no _cloop.StateBase under
    # it), and a later switch to the cffi backend runs the Python loop,
    # which the C loop cannot replace for states it cannot read.
    r = run_py("""
        import sys
        import fastasyncore
        from fastasyncore import _backend, _loop
        print(_loop.MapState.__bases__ == (_loop._NoStateBase, _loop._PyBookkeeping),
              "fastasyncore._cloop" in sys.modules, "map" in _loop.MapState.__slots__)
        try:
            import fastasyncore._cffi
        except ImportError:
            print("no-core")
        else:
            _backend.set_backend("cffi")
            print(_loop.loop_impl())
    """, FASTASYNCORE_BACKEND="pure")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "True False True", r.stdout
    assert lines[1] in ("py", "no-core"), r.stdout


def test_accepting_is_an_instance_attribute_unless_a_subclass_redefines_it(impl):
    # On CPython 3.11 fastasyncore copies the class's plain False to the
    # instance (3.11 reads instance values inline, class attributes only
    # generically; 3.12+ the other way round when the instance shadows the
    # class: docs/compatibility.md); the stdlib leaves it on the class.  The
    # value read is the same, and a subclass's own accepting is never
    # shadowed.
    ours = impl.name != "stdlib" and sys.version_info[:2] == (3, 11)
    d = impl.asyncore.dispatcher(map={})
    assert d.accepting is False
    assert ("accepting" in vars(d)) is ours

    class Flagged(impl.asyncore.dispatcher):
        accepting = True

    class Computed(impl.asyncore.dispatcher):
        @property
        def accepting(self):
            return "computed"

    f, c = Flagged(map={}), Computed(map={})
    assert f.accepting is True and "accepting" not in vars(f)
    assert c.accepting == "computed" and "accepting" not in vars(c)

    m = {}
    s = impl.asyncore.dispatcher(map=m)
    s.create_socket()
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert s.accepting is True
    finally:
        s.close()
    assert s.accepting is False and not m
