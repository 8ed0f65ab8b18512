"""Targeted tests of the C loop (fastasyncore._cloop, csrc/fa_cloop.c).

asyncore.loop()/poll()/poll2() on the cffi backend run their iterations in C;
_loop.poll_once (the Python loop) is the reference.  The backend-parametrized
tests elsewhere run every contract on both loops ("cffi" and "cffi-pyloop",
tests/conftest.py); here are the cases that are about the C loop itself:
reference counts and leaks under a busy map, the exception state handlers
see, errno routing, handlers that mutate the map/channels/sockets under the
loop's feet, nested loops, signals and EINTR, the GIL during the wait,
replaced poll functions, fork, and arguments that only the C path converts.

Each test runs in both modes (select / poll), with the wait strategy left
adaptive or pinned both ways ("persistent" poller, "rebuild": the stateless
poll) where it matters.  Most behaviour tests run on the C loop ("cloop") and
on the Python loop ("pyloop") and compare.  Skipped when _cloop is not
importable, unless FASTASYNCORE_REQUIRE_CORE=1 (then they fail).

Timing-sensitive tests have "timing" in their name (tests/sanitize.sh
deselects them under valgrind).
"""

import contextlib
import errno
import gc
import importlib
import os
import signal
import socket
import sys
import threading
import time
import weakref
from unittest import mock

import pytest

from fastasyncore import _backend, _loop

REQUIRE_CORE = os.environ.get("FASTASYNCORE_REQUIRE_CORE") == "1"

try:
    from fastasyncore import _cloop  # noqa: F401
    _CLOOP_ERROR = None
except ImportError as exc:          # pragma: no cover - depends on the build
    _CLOOP_ERROR = "fastasyncore._cloop is not importable: %s" % exc

if _CLOOP_ERROR is not None and not REQUIRE_CORE:
    pytestmark = pytest.mark.skip(reason=_CLOOP_ERROR)


def _need_cloop():
    """Skip (or, with FASTASYNCORE_REQUIRE_CORE=1, fail) without the C loop
    or without the cffi core it runs on."""
    why = _CLOOP_ERROR
    if why is None:
        try:
            importlib.import_module("fastasyncore._cffi")
        except ImportError as e:
            why = "the cffi core (fastasyncore._core) is not importable: %s" % e
    if why is not None:
        if REQUIRE_CORE:
            pytest.fail(why + " (FASTASYNCORE_REQUIRE_CORE=1)")
        pytest.skip(why)


def _under_valgrind():
    try:
        with open("/proc/self/maps") as f:
            return "vgpreload" in f.read()
    except OSError:
        return False


def _sanitized():
    """ASan (its quarantine holds freed memory) or PYTHONMALLOC: RSS says nothing."""
    return (_under_valgrind() or "asan" in os.environ.get("LD_PRELOAD", "")
            or bool(os.environ.get("PYTHONMALLOC")))


class _Switch:
    """The cffi backend with the loop pinned to ``which`` ("c" or "py")."""

    def __init__(self, which):
        self.which = which

    def __enter__(self):
        _need_cloop()
        self.prev_be = _backend.current.NAME
        self.prev_loop = _loop._loop_choice
        _backend.set_backend("cffi")
        _loop.set_loop(self.which)
        assert _loop.loop_impl() == self.which
        from fastasyncore import asyncore
        return asyncore

    def __exit__(self, *exc):
        _backend.set_backend(self.prev_be)
        _loop.set_loop(self.prev_loop)


@pytest.fixture
def cloop():
    """fastasyncore.asyncore on the cffi backend with the C loop."""
    with _Switch("c") as asyncore:
        yield asyncore


@pytest.fixture(params=["c", "py"], ids=["cloop", "pyloop"])
def aco(request):
    """fastasyncore.asyncore on the cffi backend, C loop and Python loop."""
    with _Switch(request.param) as asyncore:
        yield asyncore


def on_both(scenario, *args):
    """Run ``scenario(asyncore, *args)`` on the C loop and on the Python loop."""
    out = {}
    for which in ("c", "py"):
        with _Switch(which) as asyncore:
            out[which] = scenario(asyncore, *args)
    return out["c"], out["py"]


@pytest.fixture(params=["adaptive", "persistent", "rebuild"])
def wait(request):
    """The wait strategy: adapt() decides, or pinned (conftest's loop_mode)."""
    _loop._force_mode = None if request.param == "adaptive" else request.param
    yield request.param
    _loop._force_mode = None


def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class Sockets:
    """Every socket a test makes, closed at the end."""

    def __init__(self):
        self.all = []

    def pair(self):
        a, b = pair()
        self.all += [a, b]
        return a, b

    def close(self):
        for s in self.all:
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def socks():
    s = Sockets()
    yield s
    s.close()


def closing_channels(asyncore, log):
    """A dispatcher class that logs its hooks and flags any event delivered
    after it was closed (the loop must never do that)."""

    class Chan(asyncore.dispatcher):
        gone = False
        tag = "?"

        def _check(self, what):
            if self.gone:
                log.append((self.tag, "AFTER-CLOSE", what))

        def handle_read_event(self):
            self._check("read")
            super().handle_read_event()

        def handle_write_event(self):
            self._check("write")
            super().handle_write_event()

        def handle_expt_event(self):
            self._check("expt")
            super().handle_expt_event()

        def writable(self):
            return False

        def handle_read(self):
            log.append((self.tag, "read", self.recv(100)))

        def handle_write(self):
            log.append((self.tag, "write"))

        def handle_close(self):
            log.append((self.tag, "close"))
            self.close()

        def handle_error(self):
            t, v, tb = sys.exc_info()
            log.append((self.tag, "error", t.__name__, getattr(v, "errno", None)))
            self.close()

        def close(self):
            self.gone = True
            super().close()

    return Chan


def after_close(log):
    return [e for e in log if e[1] == "AFTER-CLOSE"]


# ---------------------------------------------------------------------------
# a. reference counts and leaks under a busy map

LEAK_EVENTS = int(os.environ.get("FASTASYNCORE_CLOOP_LEAK_EVENTS", "0")) or (
    20000 if _under_valgrind() else 250000)     # per case; 6 cases: 1.5M


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _busy_map(asyncore, socks, use_poll):
    """A map that produces ~110 events per iteration without anyone sending:
    always-writable channels (managed and consulted), readers fed by the
    driver, handlers that raise (ValueError, OSError(EPIPE) -- handle_close
    in poll mode --, OSError(EINVAL), ExitNow), close and replace transient
    channels, and run a nested poll on the map now and then."""
    m = {}
    stats = {"ev": 0, "err": 0, "close": 0, "repl": 0, "nested": 0}
    transient = []
    feeders = []

    class Busy(asyncore.dispatcher):
        """Managed: keeps readable()/writable() (always writable)."""
        n = 0

        def handle_write(self):
            stats["ev"] += 1
            self.n += 1
            n = self.n
            if n % 7 == 0:
                raise ValueError("busy")
            if n % 11 == 0:
                raise OSError(errno.EPIPE, "pipe")     # poll: handle_close
            if n % 13 == 0:
                raise OSError(errno.EINVAL, "inval")   # always handle_error
            if n % 211 == 0:
                raise asyncore.ExitNow("out")

        def handle_read(self):
            stats["ev"] += 1
            data = self.recv(512)
            if data.endswith(b"!"):
                raise ConnectionResetError(errno.ECONNRESET, "reset")

        def handle_error(self):
            stats["err"] += 1

        def handle_close(self):
            stats["close"] += 1        # stays open: a long-lived channel

    class Consulted(Busy):
        """Consulted: overrides writable() (asked every iteration)."""

        def writable(self):
            return True

    class Replacer(Busy):
        """Closes a transient channel and puts a new one in its place."""

        def handle_write(self):
            stats["ev"] += 1
            self.n += 1
            if self.n % 13 == 0 and transient:
                i = (self.n // 13) % len(transient)
                transient[i].close()
                transient[i] = Transient(socks_pair()[0], map=m)
                stats["repl"] += 1
            if self.n % 97 == 0:
                stats["nested"] += 1
                asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)

    class Transient(Busy):
        """Its writable() answer flips every few events (interest changes)."""

        def writable(self):
            return self.n % 3 != 0

        def handle_read(self):                 # EOF: recv() -> handle_close()
            stats["ev"] += 1
            self.n += 1
            self.recv(512)

    def socks_pair():
        # a transient channel's peer is closed at once: it sees EOF (recv()
        # -> handle_close, which keeps it open) every iteration until it is
        # replaced; its own socket is closed by the replacement
        a, b = pair()
        b.close()
        return a, b

    # more than 64 channels ready per iteration and more than 16 interest
    # changes per wait: the C loop's heap buffers, not only its stack ones
    long_lived = []
    for i in range(30):
        long_lived.append(Busy(socks.pair()[0], map=m))
        long_lived.append(Consulted(socks.pair()[0], map=m))
    for i in range(6):
        a, b = socks.pair()
        long_lived.append(Busy(a, map=m))
        feeders.append(b)
    long_lived.append(Replacer(socks.pair()[0], map=m))
    for i in range(24):
        transient.append(Transient(socks.pair()[0], map=m))
    return m, stats, long_lived, transient, feeders


def test_module_functions_return_owned_none(cloop):
    # Py_RETURN_NONE of the 3.12+ headers does not INCREF (None is immortal
    # there): an abi3 _cloop built by 3.12+ and run on 3.9-3.11 dropped a
    # reference to None per call, until the interpreter aborted.
    from fastasyncore import _cloop
    if sys.version_info >= (3, 12):
        pytest.skip("None is immortal here: its refcount does not move")
    m = {}
    _cloop.run(m, 0.0, True, 0)
    before = sys.getrefcount(None)
    for _ in range(1000):
        _cloop.run(m, 0.0, True, 0)
        _cloop.run(m, 0.0, False, 1)
        _cloop.states_changed()
    assert abs(sys.getrefcount(None) - before) < 50


def test_refcounts_and_memory_flat_under_a_million_events(cloop, socks, use_poll, wait):
    asyncore = cloop
    m, stats, long_lived, transient, feeders = _busy_map(asyncore, socks, use_poll)
    # (no loop variable may keep a transient channel alive in this frame)
    cls_funcs = sorted({getattr(cls, name)
                        for cls in {type(o) for o in long_lived + transient}
                        for name in ("handle_write", "handle_read", "handle_error",
                                     "handle_close", "writable", "readable",
                                     "handle_read_event", "handle_write_event")}, key=id)
    # the exception types the busy map raises (builtin ones are immortal
    # from 3.12 on, like None/True/False; ExitNow is a heap type)
    exc_types = (ValueError, BrokenPipeError, OSError, ConnectionResetError)
    exits = [0]
    feed_n = [0]

    def drive(events):
        start = stats["ev"]
        while stats["ev"] - start < events:
            feed_n[0] += 1
            for i, f in enumerate(feeders):
                f.send(b"x!" if (feed_n[0] + i) % 5 == 0 else b"x")
            try:
                asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=50)
            except asyncore.ExitNow:
                exits[0] += 1
        assert len(m) == len(long_lived) + len(transient)

    def snapshot():
        # the state's caches as the next iteration has them: reconciled
        # with the map, the consulted snapshot rebuilt (the last handlers
        # may have closed or replaced channels, which the next iteration
        # lets go of -- not a leak; which of them the last iteration did
        # depends on the order of its events)
        st = _loop._states.get(id(m))
        if st is not None:
            st.reconcile()
            st.snapshot()
        gc.collect()
        refs = [sys.getrefcount(o) for o in long_lived]
        frefs = [sys.getrefcount(f) for f in cls_funcs]
        singletons = [sys.getrefcount(x) for x in (None, True, False)]
        singletons += [sys.getrefcount(t) for t in exc_types]
        return refs, frefs, singletons, sys.getrefcount(m), len(gc.get_objects()), _rss()

    drive(max(LEAK_EVENTS // 10, 2000))          # warm up (caches, arenas, states)
    st = _loop._states[id(m)]
    st_refs = sys.getrefcount(st)
    before = snapshot()
    ExitNow = asyncore.ExitNow
    exit_refs = sys.getrefcount(ExitNow)
    t0 = time.perf_counter()
    start = dict(stats)
    drive(LEAK_EVENTS)
    took = time.perf_counter() - t0
    after = snapshot()
    n = stats["ev"] - start["ev"]
    # the busy map did what it should: errors, closes (poll mode), exits,
    # replacements and nested polls all happened
    assert stats["err"] - start["err"] > n // 20
    assert stats["close"] - start["close"] > n // 50
    assert exits[0] > 0 and stats["repl"] > 0 and stats["nested"] > 0
    assert before[0] == after[0], "refcount of long-lived channels changed"
    assert before[1] == after[1], "refcount of handler functions changed"
    assert before[3] == after[3], "refcount of the map changed"
    st_refs_after = sys.getrefcount(st)
    assert st_refs_after == st_refs, "refcount of the MapState changed"
    # (refcounts taken into locals: assertion rewriting holds temporaries)
    exit_refs_after = sys.getrefcount(ExitNow)
    assert exit_refs_after == exit_refs, "refcount of ExitNow changed"
    if sys.version_info < (3, 12):       # immortal from 3.12 on
        d = [b - a for a, b in zip(before[2], after[2])]
        assert all(abs(x) < 50 for x in d), \
            "None/True/False/exception type refcounts moved by %s" % d
    grew = after[4] - before[4]
    assert grew < min(200, n // 10), "%d more GC objects after %d events" % (grew, n)
    if not _sanitized():
        assert after[5] - before[5] < 4 << 20, "RSS grew by %d bytes" % (after[5] - before[5])
    print("%d events in %.2fs (%.2f us/event)" % (n, took, took * 1e6 / n))
    asyncore.close_all(map=m)         # the transient channels' sockets too


# ---------------------------------------------------------------------------
# b. the exception state: handle_error() sees sys.exc_info(), and loop()
#    leaves it as it found it

def _exc_info_scenario(asyncore, use_poll, socks):
    seen = []
    m = {}

    class Raiser(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            self.recv(10)
            raise ValueError("from handle_read")

        def handle_error(self):
            t, v, tb = sys.exc_info()
            frames = []
            while tb is not None:
                frames.append(tb.tb_frame.f_code.co_name)
                tb = tb.tb_next
            nil, t2, v2, info = asyncore.compact_traceback()
            seen.append(("error", t, str(v), frames[-1:], v.__traceback__ is not None,
                         t2, "handle_read" in info, type(v.__context__).__name__))
            self.close()

    class Watcher(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            seen.append(("watcher", sys.exc_info()[0]))
            self.recv(10)

    a, pa = socks.pair()
    b, pb = socks.pair()
    Raiser(a, map=m)
    Watcher(b, map=m)
    pa.send(b"1")
    pb.send(b"2")
    try:
        raise KeyError("outer")
    except KeyError:
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=2)
        inside = sys.exc_info()[0]
    outside = sys.exc_info()
    asyncore.close_all(map=m)
    return sorted(seen, key=repr), inside, outside


def test_handle_error_sees_exc_info_and_loop_restores_it(aco, use_poll, wait, socks):
    seen, inside, outside = _exc_info_scenario(aco, use_poll, socks)
    errors = [e for e in seen if e[0] == "error"]
    assert errors == [("error", ValueError, "from handle_read", ["handle_read"], True,
                       ValueError, True, "KeyError")]
    # a handler of a plain event sees the exception being handled around loop()
    assert ("watcher", KeyError) in seen
    assert inside is KeyError
    assert outside == (None, None, None)


def test_exc_info_between_handlers_is_the_outer_one(aco, use_poll, wait, socks):
    """After a handle_error() returned, the next handler of the same iteration
    sees the outer exception again, not the routed one."""
    asyncore = aco
    m = {}
    seen = []

    class Raiser(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):            # never consumes: readable each turn
            raise ValueError("again")

        def handle_error(self):
            seen.append(("error", sys.exc_info()[0]))

    class Watcher(Raiser):
        def handle_read(self):
            seen.append(("watcher", sys.exc_info()[0]))

    for cls in (Raiser, Watcher, Raiser):
        s, p = socks.pair()
        cls(s, map=m)
        p.send(b"x")
    try:
        raise KeyError("outer")
    except KeyError:
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=3)
        assert sys.exc_info()[0] is KeyError
    asyncore.close_all(map=m)
    assert seen.count(("error", ValueError)) == 6
    assert seen.count(("watcher", KeyError)) == 3
    assert len(seen) == 9


def test_exception_from_handle_error_propagates_with_context(aco, use_poll, wait, socks):
    asyncore = aco
    m = {}

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            raise ValueError("first")

        def handle_error(self):
            raise RuntimeError("from handle_error")

    s, p = socks.pair()
    D(s, map=m)
    p.send(b"x")
    try:
        raise KeyError("outer")
    except KeyError:
        with pytest.raises(RuntimeError) as ei:
            asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
        assert type(ei.value.__context__) is ValueError
        assert type(ei.value.__context__.__context__) is KeyError
        assert sys.exc_info()[0] is KeyError
    assert sys.exc_info() == (None, None, None)
    # the map stays usable
    asyncore.close_all(map=m)


# ---------------------------------------------------------------------------
# c. errno routing: poll mode is 3.11's readwrite() (DISCONNECTED errnos ->
#    handle_close), select mode its read()/write() (every error -> handle_error)

class WeirdErrno(OSError):
    @property
    def errno(self):
        raise ZeroDivisionError("errno property")


class UnhashableErrno(OSError):
    errno = []


ROUTING = [
    ("errno-None", lambda: OSError("no errno"), "error", "error"),
    ("ECONNRESET", lambda: ConnectionResetError(errno.ECONNRESET, "reset"), "close", "error"),
    ("EPIPE", lambda: OSError(errno.EPIPE, "pipe"), "close", "error"),
    ("EBADF", lambda: OSError(errno.EBADF, "badf"), "close", "error"),
    ("EINVAL", lambda: OSError(errno.EINVAL, "inval"), "error", "error"),
    ("EAGAIN", lambda: BlockingIOError(errno.EAGAIN, "again"), "error", "error"),
    ("ValueError", lambda: ValueError("v"), "error", "error"),
]


@pytest.mark.parametrize("name,make,in_poll,in_select", ROUTING, ids=[r[0] for r in ROUTING])
@pytest.mark.parametrize("hook", ["read", "write"])
def test_oserror_routing(aco, wait, socks, name, make, in_poll, in_select, hook):
    asyncore = aco
    for use_poll, expect in ((True, in_poll), (False, in_select)):
        m = {}
        got = []

        class D(asyncore.dispatcher):
            def writable(self):
                return hook == "write"

            def readable(self):
                return hook == "read"

            def handle_read(self):
                got.append("read")
                raise make()

            def handle_write(self):
                got.append("write")
                raise make()

            def handle_error(self):
                got.append(("error", sys.exc_info()[0].__name__))
                self.close()

            def handle_close(self):
                got.append(("close", sys.exc_info()[0].__name__))
                self.close()

        s, p = socks.pair()
        D(s, map=m)
        p.send(b"x")
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
        assert got == [hook, (expect, type(make()).__name__)], (use_poll, got)
        assert not m


@pytest.mark.parametrize("exc_cls,escapes", [(WeirdErrno, ZeroDivisionError),
                                             (UnhashableErrno, TypeError)],
                         ids=["errno-raises", "errno-unhashable"])
def test_oserror_with_a_bad_errno_attribute(wait, socks, exc_cls, escapes):
    """An OSError whose errno cannot be looked up in DISCONNECTED: 3.11's
    readwrite() raises from its `except OSError` block (so the new error
    carries the OSError as __context__); select mode just routes it."""

    def scenario(asyncore, use_poll):
        m = {}
        got = []

        class D(asyncore.dispatcher):
            def writable(self):
                return False

            def handle_read(self):
                raise exc_cls("bad errno")

            def handle_error(self):
                got.append("error")
                self.close()

            def handle_close(self):
                got.append("close")
                self.close()

        s, p = socks.pair()
        D(s, map=m)
        p.send(b"x")
        try:
            asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
            out = ("returned", got)
        except Exception as e:
            out = ("raised", type(e).__name__, type(e.__context__).__name__, got)
        asyncore.close_all(map=m)
        return out

    for use_poll in (False, True):
        c, py = on_both(scenario, use_poll)
        if use_poll:
            assert py == ("raised", escapes.__name__, exc_cls.__name__, [])
        else:
            assert py == ("returned", ["error"])
        assert c == py, "use_poll=%s" % use_poll


# ---------------------------------------------------------------------------
# d. handlers that pull the rug: the map, channels, sockets, nested loops

def _high_fd_socket(sock, socks, low=300):
    """``sock`` moved to the lowest free fd >= low (the C loop caches the
    key objects of fds above 256); the original is closed."""
    import fcntl
    fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, low)
    high = socket.socket(fileno=fd)
    socks.all.append(high)
    sock.close()
    return high


def _flipping_docs(asyncore, n, socks, high=False):
    """n docs-pattern channels (writable() only) whose answers flip at every
    call, half of them in each phase, on fds above 300 if ``high``;
    -> (map, channels, asked, wrote)."""
    m, asked, wrote = {}, {}, {}

    class Flip(asyncore.dispatcher):
        def writable(self):
            asked[self.n] += 1
            if self.hook is not None:
                self.hook()
            self.on = not self.on
            return self.on

        def handle_write(self):
            wrote[self.n] += 1

    chans = []
    for i in range(n):
        a, _ = socks.pair()
        if high:
            a = _high_fd_socket(a, socks)
        c = Flip(a, map=m)
        c.n, c.on, c.hook = i, bool(i % 2), None
        asked[i] = wrote[i] = 0
        chans.append(c)
    return m, chans, asked, wrote


@pytest.mark.parametrize("high", [False, True], ids=["low_fds", "high_fds"])
@pytest.mark.parametrize("which", ["c", "py", "stdlib"])
def test_vectorized_consult_over_many_iterations(which, high, use_poll, socks):
    """30 channels that all override writable() only (the C loop asks them
    in one comprehension and compares the answers in C), answers flipping
    every iteration, 80 iterations in one loop() call with the wait left
    adaptive (past the first iterations, which are prepared in Python):
    each channel is asked once per iteration, and each True answer is
    honoured in that iteration's wait -- as 3.11 does."""
    if which == "stdlib":
        from conftest import _stdlib
        asyncore = _stdlib()[0]
        ctx = contextlib.nullcontext(asyncore)
    else:
        ctx = _Switch(which)
    with ctx as asyncore:
        assert _loop._force_mode is None
        m, chans, asked, wrote = _flipping_docs(asyncore, 30, socks, high)
        assert not high or min(m) > 256
        try:
            asyncore.loop(timeout=5, use_poll=use_poll, map=m, count=80)
        finally:
            asyncore.close_all(map=m)
    assert asked == {n: 80 for n in range(30)}
    assert wrote == {n: 40 for n in range(30)}


@pytest.mark.parametrize("n", [4, 30], ids=["plain", "vectorized"])
def test_c_loop_changes_leave_no_stale_python_poll(n, use_poll, socks):
    """In the stateless wait mode the C loop writes a consulted answer that
    moves between two nonzero masks straight into the mask; the Python
    loop's select.poll mirror of the mask (MapState.spoll) does not get it,
    and the Python loop trusts that mirror, so the C loop drops it.  loop()
    calls alternate between the C and the Python loop, and the answers run
    True, False, False, True, ...: each Python call's answer is the one the
    C call before it applied, so a stale mirror would still hold the answer
    before that (a write event for a channel that said False, none for one
    that said True).  Each True answer gets exactly one handle_write()."""
    with _Switch("c") as asyncore:
        m, asked, wrote = {}, {}, {}

        class Quad(asyncore.dispatcher):
            def writable(self):
                k = asked[self.n]
                asked[self.n] += 1
                return (k + 1) // 2 % 2 == 0

            def handle_write(self):
                wrote[self.n] += 1

        for i in range(n):
            a, _ = socks.pair()
            Quad(a, map=m).n = i
            asked[i] = wrote[i] = 0
        # the wait left adaptive: a small map waits stateless, and a pinned
        # mode would have every iteration prepared in Python
        assert _loop._force_mode is None
        try:
            for k in range(80):
                _loop.set_loop("py" if k % 2 == 0 else "c")
                # (timeout 0: an iteration where every answer is False
                # has nothing to wait for; the sockets are always writable)
                asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
                trues = k // 4 * 2 + 1 + (k % 4 == 3)     # T F F T T F F T ...
                assert wrote == {i: trues for i in range(n)}, k
        finally:
            asyncore.close_all(map=m)
    assert asked == {i: 80 for i in range(n)}


@pytest.mark.parametrize("n", [4, 30], ids=["plain", "vectorized"])
def test_consulted_channels_first_answers_register_them(aco, n, use_poll, socks):
    """A consulted channel's first answer is its first registration (in C
    for a channel adopted while the C loop runs, through _set_mask() in the
    Python pass): channels made before loop() and channels a handler
    makes during a loop() call are served from their first iteration on;
    the mask and the change count (nchg, what adapt() weighs) have them."""
    asyncore = aco
    m, wrote = {}, []

    class Writer(asyncore.dispatcher):
        def writable(self):
            return self.left > 0

        def handle_write(self):
            wrote.append((self.tag, turn[0]))
            self.left -= 1
            if self.tag < n and self.left == 0:
                # one more channel each: adopted while the loop runs
                Writer(socks.pair()[0], map=m).setup(self.tag + n)

        def setup(self, tag):
            self.tag, self.left = tag, 1

    turn = [0]
    for i in range(n):
        Writer(socks.pair()[0], map=m).setup(i)
    assert _loop._force_mode is None
    st = None
    try:
        for turn[0] in range(3):
            asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=1)
            if st is None:
                st = _loop._states[id(m)]
                assert st.poller is None        # (the stateless wait)
            if turn[0] == 0:
                nchg0 = st.nchg
        mask = dict(st.mask)
    finally:
        asyncore.close_all(map=m)
    assert sorted(wrote) == [(i, 0) for i in range(n)] + [(i + n, 1) for i in range(n)]
    assert len(mask) == 2 * n and set(mask.values()) == {_loop._READ}
    # turn 1: the n new channels registered, and the n old ones' answers
    # moved to read only
    assert st.nchg - nchg0 >= 2 * n


def test_consulted_channel_under_a_bad_key_raises_at_registration(aco, use_poll, socks):
    """A consulted channel mapped under a key no poll accepts: the loop
    raises what _check_key raises (3.11: select()/poll() raise ValueError),
    from the Python pass and from the C one alike; nothing is recorded."""
    asyncore = aco

    class W(asyncore.dispatcher):
        def writable(self):
            return True

    for key, exc in ((-3, ValueError), (2 ** 40, OverflowError)):
        m = {}
        ok = W(socks.pair()[0], map=m)
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)   # state made
        bad = W(socks.pair()[0], map={})
        m[key] = bad
        try:
            with pytest.raises(exc):
                asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
            assert key not in _loop._states[id(m)].mask
        finally:
            del m[key]
            bad.close()
            ok.close()


def test_vectorized_consult_predicate_closes_a_channel_or_raises(aco, use_poll, socks):
    """The same map: a writable() that closes another channel (the victim is
    still asked in that iteration, as 3.11 asks every channel of its
    snapshot, then never served), and a writable() that raises (out of
    loop(), as in 3.11; the next loop() serves every channel again)."""
    m, chans, asked, wrote = _flipping_docs(aco, 12, socks)
    it = [0]

    def hook():
        it[0] += 1
        if it[0] == 20:
            chans[5].close()
        if it[0] == 30:
            raise ValueError("boom")

    chans[0].hook = hook
    try:
        with pytest.raises(ValueError, match="boom"):
            aco.loop(timeout=5, use_poll=use_poll, map=m, count=60)
        assert chans[5] not in m.values() and len(m) == 11
        assert asked[5] == 20 and wrote[5] == 9     # True at iterations 2..18
        # iterations 1..29 waited: 15 True answers (odd n: 14)
        assert all(wrote[n] == (14 if n % 2 else 15) for n in wrote if n != 5)
        before = dict(wrote)
        aco.loop(timeout=5, use_poll=use_poll, map=m, count=20)
        assert all(wrote[n] - before[n] == 10 for n in wrote if n != 5)
        assert wrote[5] == 9
    finally:
        aco.close_all(map=m)


def test_high_fd_reused_under_another_key_object(aco, use_poll, socks):
    """A channel on an fd above 256 closes; a new channel gets the same fd
    number, put in the map under another int object (and then under an int
    subclass).  The C loop's cached key for that number is the old object:
    the lookups still find the new channel (by value), events go to it only,
    and the closed one hears nothing more."""
    m, chans, asked, wrote = _flipping_docs(aco, 10, socks, high=True)
    aco.loop(timeout=5, use_poll=use_poll, map=m, count=30)   # keys cached
    victim = chans[4]
    fd = victim._fileno
    served = {}

    class Reader(aco.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            served[self.tag] = served.get(self.tag, 0) + len(self.recv(100))

    for tag, key_of in (("int", lambda n: int(str(n))), ("subclass", type("Fd", (int,), {}))):
        before = wrote[4], dict(served)
        victim.close()
        a, b = socks.pair()
        a = _high_fd_socket(a, socks, low=fd)
        assert a.fileno() == fd
        r = Reader(a, map={})
        r.tag = tag
        del r._map[fd]
        r._map = m
        key = key_of(fd)
        assert key == fd and key is not victim._fileno
        m[key] = r
        b.send(b"ping")
        aco.loop(timeout=5, use_poll=use_poll, map=m, count=6)
        assert served.get(tag) == 4
        assert wrote[4] == before[0]
        assert {t: served[t] for t in before[1]} == before[1]
        victim = r
    aco.close_all(map=m)


def test_handler_clears_the_whole_map(aco, use_poll, wait, socks):
    asyncore = aco
    log = []
    Chan = closing_channels(asyncore, log)
    m = {}

    class Clearer(Chan):
        def handle_read(self):
            log.append((self.tag, "read", self.recv(100)))
            for c in list(m.values()):
                c.gone = True                      # out of the map: must not run
            m.clear()

    chans = []
    for i in range(6):
        s, p = socks.pair()
        c = Clearer(s, map=m)
        c.tag = i
        chans.append(c)
        p.send(b"x")
    asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=5)
    assert m == {}
    reads = [e for e in log if e[1] == "read"]
    assert len(reads) == 1, log
    assert not after_close(log), log
    # the map can be refilled and looped again (a fresh state)
    s, p = socks.pair()
    c = Chan(s, map=m)
    c.tag = "new"
    p.send(b"again")
    asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
    assert ("new", "read", b"again") in log
    asyncore.close_all(map=m)


def test_handler_deletes_itself_and_drops_the_last_reference(aco, use_poll, wait, socks):
    asyncore = aco
    m = {}
    events = []

    class Self(asyncore.dispatcher):
        def writable(self):
            return True

        def handle_read(self):
            self.recv(10)
            del m[self._fileno]               # the map held the only reference
            self.socket.close()
            gc.collect()
            self.touched = list(range(100))   # self is still alive: the loop holds it
            events.append(("read", len(self.touched)))

        def handle_write(self):
            events.append(("write",))         # must not run: it left the map in handle_read

        def __del__(self):
            events.append(("del",))

    s, p = socks.pair()
    Self(s, map=m)
    ref = weakref.ref(m[s.fileno()])
    p.send(b"x")
    asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=3)
    gc.collect()
    assert ref() is None
    assert events == [("read", 100), ("del",)], events
    assert m == {}


def test_handler_closes_another_channel_with_a_pending_event(aco, use_poll, wait, socks):
    asyncore = aco
    log = []
    Chan = closing_channels(asyncore, log)
    m = {}
    chans = []

    class Killer(Chan):
        def writable(self):
            return True

        def handle_read(self):
            log.append((self.tag, "read", self.recv(100)))
            for c in chans:                   # close every other channel
                if c is not self and not c.gone:
                    c.close()

    for i in range(5):
        s, p = socks.pair()
        c = Killer(s, map=m)
        c.tag = i
        chans.append(c)
        p.send(b"x")                          # all readable and writable now
    asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=2)
    assert not after_close(log), log
    reads = [e for e in log if e[1] == "read"]
    assert len(reads) == 1, log
    survivor = reads[0][0]
    assert [c.tag for c in chans if not c.gone] == [survivor]
    asyncore.close_all(map=m)


def test_closed_channels_fd_reused_in_the_same_iteration(aco, use_poll, wait, socks):
    """A closes B and opens C, which gets B's fd: B's pending event of this
    iteration goes to nobody (not to C); C is served from the next one."""
    asyncore = aco
    log = []
    Chan = closing_channels(asyncore, log)
    m = {}
    turn = [0]

    class A(Chan):
        def handle_read(self):
            log.append((self.tag, "read", self.recv(100)))
            b = self.victim
            fd = b._fileno
            b.close()
            s, p = pair()
            socks.all += [s, p]
            c = Chan(s, map=m)
            c.tag = "C"
            log.append(("C", "fd reused", s.fileno() == fd))
            p.send(b"c")

    class B(Chan):
        pass

    def c_read_turns():
        return [e for e in log if e[0] == "C" and e[1] == "read"]

    a_first = 0
    for attempt in range(2):        # A must run before B: try both registration orders
        m.clear()
        del log[:]
        sa, pa = socks.pair()
        sb, pb = socks.pair()
        if attempt == 0:
            a = A(sa, map=m)
            b = B(sb, map=m)
        else:
            b = B(sb, map=m)
            a = A(sa, map=m)
        a.tag, b.tag = "A", "B"
        a.victim = b
        for p, data in ((pa, b"a"), (pb, b"b"))[::1 if attempt == 0 else -1]:
            p.send(data)
        reads_seen = {}
        for turn[0] in range(3):
            asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
            reads_seen[turn[0]] = [e for e in log if e[1] == "read"]
        assert not after_close(log), log
        if ("A", "read", b"a") in reads_seen[0] and ("B", "read", b"b") not in reads_seen[0]:
            # A ran first and closed B: C must not run in the same iteration
            a_first += 1
            assert not [e for e in reads_seen[0] if e[0] == "C"], log
            assert c_read_turns() == [("C", "read", b"c")], log
        asyncore.close_all(map=m)
    assert a_first, "A never ran before B: the case was not exercised"


def test_channel_made_managed_by_a_nested_loop_in_its_own_handler(aco, use_poll, wait, socks):
    """A consulted channel (a writable() of its own, on the instance) drops
    it and runs a nested loop on its map, which manages it from then on;
    what its handler changes afterwards (``connected``, without touch())
    must reach the next iteration, as it does in 3.11, which asks
    writable() every time.  (The C loop's dispatch takes a channel it found
    consulted as still consulted unless MapState.consulted changed since.)"""
    asyncore = aco
    m = {}
    log = []

    class Chan(asyncore.dispatcher_with_send):
        def handle_read(self):
            log.append(("read", self.recv(100)))
            del self.writable                 # managed from the next reconcile,
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)   # made here
            self.connected = False            # dispatcher_with_send.writable(): True

        def handle_write(self):
            log.append(("write",))
            self.connected = True

    s, p = socks.pair()
    c = Chan(s, map=m)
    c.writable = lambda: False
    p.send(b"x")
    asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=4)
    assert log[:2] == [("read", b"x"), ("write",)], log
    assert "writable" not in vars(c)
    asyncore.close_all(map=m)


def test_handler_adds_channels(aco, use_poll, wait, socks):
    asyncore = aco
    log = []
    Chan = closing_channels(asyncore, log)
    m = {}
    turn = [0]

    class Adder(Chan):
        def handle_read(self):
            log.append((self.tag, "read", self.recv(100), turn[0]))
            if len(self.tag) < 3:             # a tree: 1 + 3 + 9 channels
                for k in range(3):
                    s, p = socks.pair()
                    c = Adder(s, map=m)
                    c.tag = self.tag + str(k)
                    p.send(b"n")

    s, p = socks.pair()
    Adder(s, map=m).tag = "r"
    p.send(b"0")
    for turn[0] in range(5):
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
    reads = {e[0]: e[3] for e in log if e[1] == "read"}
    assert len(reads) == 13 and len(m) == 13, log
    assert not after_close(log)
    for tag, t in reads.items():
        assert t == len(tag) - 1, (tag, reads)      # each served the turn after its parent's
    asyncore.close_all(map=m)


def _nested_scenario(asyncore, use_poll, socks, depth):
    m, other = {}, {}
    log = []
    level = [0]

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            log.append((self.tag, "read", level[0]))
            if self.tag == "deep":
                # never consumes: readable again in the nested iteration
                if level[0] < depth:
                    level[0] += 1
                    try:
                        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
                    finally:
                        level[0] -= 1
                else:
                    self.recv(10)
                return
            data = self.recv(10)
            log.append((self.tag, "data", data))
            if self.tag == "a":
                (asyncore.poll2 if use_poll else asyncore.poll)(0, m)   # same map
                asyncore.loop(timeout=0, use_poll=use_poll, map=other, count=2)

        def handle_error(self):
            log.append((self.tag, "error", sys.exc_info()[0].__name__))

    chans = {}
    for tag, mp in (("a", m), ("b", m), ("deep", m), ("o", other)):
        s, p = socks.pair()
        chans[tag] = D(s, map=mp)
        chans[tag].tag = tag
        chans[tag].peer = p
    for tag in ("a", "b", "o"):
        chans[tag].peer.send(tag.encode())
    for _ in range(3):
        asyncore.loop(timeout=0.02, use_poll=use_poll, map=m, count=1)
    chans["deep"].peer.send(b"d")
    asyncore.loop(timeout=0.02, use_poll=use_poll, map=m, count=1)
    asyncore.close_all(map=m)
    asyncore.close_all(map=other)
    return log


@pytest.mark.parametrize("depth", [1, 40])
def test_nested_loops_on_the_same_and_another_map(use_poll, wait, socks, depth):
    c, py = on_both(_nested_scenario, use_poll, socks, depth)
    assert ("o", "data", b"o") in c
    assert ("a", "data", b"a") in c and ("b", "data", b"b") in c
    assert max(e[2] for e in c if e[0] == "deep") == depth
    # the same events in the same order (both loops see the same kernel order)
    assert c == py


def _socket_swap_scenario(asyncore, use_poll, socks, replacement):
    """A's handler swaps B's socket attribute; B may have an event pending."""
    m = {}
    log = []
    extra = []

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            data = self.recv(10)
            log.append((self.tag, "read", data))
            if self.tag == "A":
                if replacement == "socket":
                    s, p = pair()
                    extra.extend((s, p))
                    self.other.socket = s
                elif replacement == "object":
                    self.other.socket = object()
                else:
                    self.other.socket = None

        def handle_error(self):
            t, v, tb = sys.exc_info()
            log.append((self.tag, "error", t.__name__))
            self.del_channel()

        def handle_close(self):
            log.append((self.tag, "close"))
            self.del_channel()

    sa, pa = socks.pair()
    sb, pb = socks.pair()
    a = D(sa, map=m)
    b = D(sb, map=m)
    a.tag, b.tag = "A", "B"
    a.other = b
    pa.send(b"a")
    pb.send(b"b")
    out = []
    for _ in range(3):
        try:
            asyncore.loop(timeout=0.02, use_poll=use_poll, map=m, count=1)
        except Exception as e:      # noqa: BLE001 - compared between loops
            out.append(("raised", type(e).__name__))
    pb.send(b"more")
    for _ in range(2):
        try:
            asyncore.loop(timeout=0.02, use_poll=use_poll, map=m, count=1)
        except Exception as e:      # noqa: BLE001
            out.append(("raised", type(e).__name__))
    m.clear()
    _loop.forget_map(m)          # (no close(): drop the poller state here)
    for s in extra:
        s.close()
    return log, out


@pytest.mark.parametrize("replacement", ["socket", "object", "None"])
def test_socket_attribute_replaced_under_the_loop(use_poll, wait, socks, replacement):
    c, py = on_both(_socket_swap_scenario, use_poll, socks, replacement)
    assert c == py
    log, out = c
    assert ("A", "read", b"a") in log


def test_duck_typed_objects_in_the_map(use_poll, wait, socks):
    def scenario(asyncore, use_poll):
        out = []
        s, p = pair()

        class Duck:
            accepting = False

            def readable(self):
                return True

            def writable(self):
                return False

            def handle_read_event(self):
                out.append(("read", s.recv(10)))
                if out[-1][1] == b"boom":
                    raise ValueError("duck")

            def handle_write_event(self):
                out.append("write")

            def handle_expt_event(self):
                out.append("expt")

            def handle_error(self):
                out.append(("error", sys.exc_info()[0].__name__))

            def handle_close(self):
                out.append("close")

        class NoErrorHook:
            accepting = False

            def readable(self):
                return True

            def writable(self):
                return False

            def handle_read_event(self):
                raise ValueError("no handle_error to route to")

        m = {s.fileno(): Duck()}
        try:
            for msg in (b"hi", b"boom"):
                p.send(msg)
                asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
            s2, p2 = pair()
            m[s2.fileno()] = NoErrorHook()
            p2.send(b"x")
            try:
                asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
            except AttributeError as e:
                out.append(("raised", "AttributeError", type(e.__context__).__name__))
            del m[s2.fileno()]
            s2.close()
            p2.close()
            p.close()                         # EOF; POLLHUP in poll mode
            asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
        finally:
            m.clear()
            _loop.forget_map(m)
            s.close()
            p.close()
        return out

    c, py = on_both(scenario, use_poll)
    assert c == py
    assert c[:3] == [("read", b"hi"), ("read", b"boom"), ("error", "ValueError")]
    assert ("raised", "AttributeError", "ValueError") in c


def test_predicate_patched_with_mock_during_the_loop(aco, use_poll, wait, socks):
    asyncore = aco
    m = {}
    log = []

    class Plain(asyncore.dispatcher_with_send):      # managed on our side
        def handle_read(self):
            log.append((self.tag, "read", self.recv(10)))
            if self.tag == "a":
                self.patch = mock.patch.object(self.other, "writable", return_value=True)
                self.patch.start()
                self.other.patcher = self.patch

        def handle_write(self):
            log.append((self.tag, "write"))
            self.patcher.stop()

    sa, pa = socks.pair()
    sb, pb = socks.pair()
    a, b = Plain(sa, map=m), Plain(sb, map=m)
    a.tag, b.tag = "a", "b"
    a.other = b
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
    assert log == []
    pa.send(b"go")
    asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=4)
    assert log == [("a", "read", b"go"), ("b", "write")], log
    assert "writable" not in b.__dict__
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)
    assert log == [("a", "read", b"go"), ("b", "write")], log
    asyncore.close_all(map=m)


def _state_churn_scenario(asyncore, use_poll, socks, action):
    """Handlers that change the loop's own state under it: a nested poll that
    makes adapt() close the map's poller (or make a new one), forget_map()
    / forget_all(), close_all() and re-adding channels, all while the outer
    loop() holds the map's state and poller."""
    m = {}
    log = []
    peers = {}
    turn = [0]

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            data = self.recv(100)
            log.append((self.tag, "read", data, turn[0]))
            if data != b"go":
                return
            if action == "flip-mode":
                _loop._force_mode = "rebuild" if _loop._force_mode == "persistent" \
                    else "persistent"
                (asyncore.poll2 if use_poll else asyncore.poll)(0, m)
            elif action == "forget-map":
                _loop.forget_map(m)
            elif action == "forget-all":
                _loop.forget_all()
            elif action == "close-all-readd":
                asyncore.close_all(map=m)
                for tag in ("x", "y"):
                    add(tag).send(b"new")
            # (the others keep their data: served in the next iterations)

        def handle_error(self):
            # a nested poll consumed the data of an event the outer
            # iteration still delivers: recv() -> EAGAIN, as in 3.11
            log.append((self.tag, "error", sys.exc_info()[0].__name__, turn[0]))

        def handle_close(self):
            log.append((self.tag, "close"))
            self.close()

    def add(tag):
        s, p = socks.pair()
        d = D(s, map=m)
        d.tag = tag
        peers[tag] = p
        return p

    for tag in "abc":
        add(tag)
    prev_mode = _loop._force_mode
    if action == "flip-mode":
        _loop._force_mode = "persistent"
    try:
        for rnd in range(3):
            peers["a"].send(b"go")
            for tag in "bc":
                if tag in peers and peers[tag].fileno() >= 0:
                    try:
                        peers[tag].send(b"%s%d" % (tag.encode(), rnd))
                    except OSError:
                        pass
            for turn[0] in range(rnd * 10, rnd * 10 + 3):
                asyncore.loop(timeout=0.01, use_poll=use_poll, map=m, count=1)
            if action == "close-all-readd" and "a" not in [d.tag for d in m.values()]:
                add("a")
    finally:
        _loop._force_mode = prev_mode
        asyncore.close_all(map=m)
    return sorted(log, key=repr)


@pytest.mark.parametrize("action", ["flip-mode", "forget-map", "forget-all", "close-all-readd"])
def test_handlers_that_change_the_loop_state(use_poll, socks, action):
    c, py = on_both(_state_churn_scenario, use_poll, socks, action)
    assert c == py
    reads = [e for e in c if e[1] == "read"]
    assert len([e for e in reads if e[2] == b"go"]) == 3, c
    if action != "close-all-readd":
        for tag in "bc":
            assert sorted(e[2] for e in reads if e[0] == tag) == \
                [b"%s%d" % (tag.encode(), r) for r in range(3)], c


def test_timing_forget_all_from_another_thread_during_the_wait(cloop, use_poll, wait, socks):
    asyncore = cloop
    m, d, peer = _idle_map(asyncore, socks)
    t = threading.Timer(0.05, _loop.forget_all)
    t.start()
    try:
        asyncore.loop(timeout=0.3, use_poll=use_poll, map=m, count=1)
    finally:
        t.join(5)
    peer.send(b"after")
    for _ in range(5):
        asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=1)
        if getattr(d, "got", None):
            break
    assert d.got == b"after"
    asyncore.close_all(map=m)


def _predicate_raises_scenario(asyncore, use_poll, socks, which):
    m = {}
    log = []
    calls = [0]

    class D(asyncore.dispatcher):
        def readable(self):
            if which == "readable":
                calls[0] += 1
                if calls[0] == 3:
                    raise ValueError("readable")
            return True

        def writable(self):
            if which == "writable":
                calls[0] += 1
                if calls[0] == 3:
                    raise ValueError("writable")
            return False

        def handle_read(self):
            log.append(("read", self.recv(10)))

    s, p = socks.pair()
    D(s, map=m)
    out = []
    for i in range(5):
        p.send(b"%d" % i)
        try:
            asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
            out.append("ok")
        except ValueError as e:
            out.append(("raised", str(e)))
    st = _loop._states.get(id(m))
    out.append(st is None or st.thread is None)
    asyncore.close_all(map=m)
    return log, out


@pytest.mark.parametrize("which", ["readable", "writable"])
def test_predicate_that_raises(use_poll, wait, socks, which):
    """3.11: an exception from readable()/writable() leaves poll() (no
    routing); the map is usable in the next call."""
    c, py = on_both(_predicate_raises_scenario, use_poll, socks, which)
    assert c == py
    log, out = c
    assert out == ["ok", "ok", ("raised", which), "ok", "ok", True]
    assert b"".join(e[1] for e in log) == b"01234"


@pytest.mark.parametrize("key", [2 ** 40, -1, "seven", 2.0], ids=["huge", "negative", "str", "float"])
def test_bad_map_keys(use_poll, wait, key):
    """A duck-typed object under a key that is no usable fd: the same error
    from both loops, and the map stays usable once it is gone."""

    def scenario(asyncore, use_poll):
        class Duck:
            accepting = False

            def readable(self):
                return True

            def writable(self):
                return False

        s, p = pair()
        got = []
        d = asyncore.dispatcher(s, map={})
        m = d._map
        d.writable = lambda: False
        d.handle_read = lambda: got.append(d.recv(10))
        m[key] = Duck()
        p.send(b"x")
        try:
            asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
            out = ["returned"]
        except Exception as e:      # noqa: BLE001 - compared between loops
            out = ["raised", type(e).__name__]
        del m[key]
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=2)
        out.append(b"".join(got))
        asyncore.close_all(map=m)
        p.close()
        return out

    c, py = on_both(scenario, use_poll)
    assert c == py
    assert c[-1] == b"x"


@pytest.mark.parametrize("count", [2 ** 64, 2 ** 63, -2 ** 70, 2 ** 63 - 1])
def test_count_beyond_64_bits_is_just_a_count(aco, use_poll, socks, count):
    """3.11's loop(): `while map and count > 0: ...; count = count - 1` works
    for any int; the C loop must not refuse big ones (OverflowError)."""
    asyncore = aco
    m = {}
    n = []

    class D(asyncore.dispatcher):
        def handle_write(self):           # writable (the base class: always)
            n.append(1)
            if len(n) == 3:
                self.close()

    s, p = socks.pair()
    D(s, map=m)
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=count)
    assert len(n) == (3 if count > 0 else 0)
    asyncore.close_all(map=m)


@pytest.mark.parametrize("count,expect", [(2.5, 3), (True, 1), (0, 0), (-1, 0)],
                         ids=["float", "bool", "zero", "negative"])
def test_count_of_other_types(aco, use_poll, socks, count, expect):
    asyncore = aco
    m = {}
    n = []

    class D(asyncore.dispatcher):
        def handle_write(self):
            n.append(1)

    s, p = socks.pair()
    D(s, map=m)
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=count)
    assert len(n) == expect
    asyncore.close_all(map=m)


# ---------------------------------------------------------------------------
# e. signals during the C loop's wait

needs_itimer = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")


@pytest.fixture
def sigalrm():
    old = signal.getsignal(signal.SIGALRM)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def _idle_map(asyncore, socks, interest=True):
    m = {}
    s, p = socks.pair()

    class Idle(asyncore.dispatcher):
        def readable(self):
            return interest

        def writable(self):
            return False

        def handle_read(self):
            self.got = getattr(self, "got", b"") + self.recv(100)

    d = Idle(s, map=m)
    return m, d, p


@needs_itimer
@pytest.mark.parametrize("interest", [True, False], ids=["wait", "sleep"])
def test_timing_keyboard_interrupt_from_sigalrm_during_the_wait(
        cloop, use_poll, wait, socks, sigalrm, interest):
    asyncore = cloop
    if not interest and use_poll:
        pytest.skip("poll mode waits even with no interest")
    m, d, peer = _idle_map(asyncore, socks, interest)

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        asyncore.loop(timeout=5, use_poll=use_poll, map=m, count=3)
    assert time.monotonic() - t0 < 2
    # the map's state is free and usable afterwards
    st = _loop._states.get(id(m))
    assert st is None or st.thread is None
    if interest:
        peer.send(b"after")
        asyncore.loop(timeout=1, use_poll=use_poll, map=m, count=1)
        assert d.got == b"after"
    asyncore.close_all(map=m)


@needs_itimer
@pytest.mark.parametrize("interval", [0, 0.03], ids=["once", "repeated"])
def test_timing_signal_without_exception_resumes_the_wait(
        cloop, use_poll, wait, socks, sigalrm, interval):
    """EINTR is retried with the time left: loop() returns after about the
    timeout (not early, and not later when signals keep coming)."""
    asyncore = cloop
    m, d, peer = _idle_map(asyncore, socks)
    hits = []
    signal.signal(signal.SIGALRM, lambda *a: hits.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.05, interval)
    t0 = time.monotonic()
    asyncore.loop(timeout=0.4, use_poll=use_poll, map=m, count=1)
    took = time.monotonic() - t0
    signal.setitimer(signal.ITIMER_REAL, 0)
    assert hits
    if interval:
        assert len(hits) >= 3
    assert 0.35 <= took < 1.5, took
    asyncore.close_all(map=m)


# ---------------------------------------------------------------------------
# f. the GIL is released during the wait

@pytest.mark.parametrize("interest", [True, False], ids=["wait", "sleep"])
def test_timing_other_threads_run_during_the_wait(cloop, use_poll, wait, socks, interest):
    asyncore = cloop
    if not interest and use_poll:
        pytest.skip("poll mode waits even with no interest")
    m, d, peer = _idle_map(asyncore, socks, interest)
    counter = [0]
    stop = threading.Event()
    at = {}

    def spin():
        while not stop.is_set():
            counter[0] += 1

    orig = d.readable

    def readable():                   # asked right before the wait
        at["start"] = counter[0]
        return orig()

    d.readable = readable
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=1)
        took = time.monotonic() - t0
        progress = counter[0] - at["start"]
    finally:
        stop.set()
        t.join(5)
    assert took >= 0.4
    assert progress > 10000, progress
    asyncore.close_all(map=m)


def test_two_threads_loop_their_own_maps_at_once(cloop, use_poll, wait, socks):
    """Two C loops at a time, each blocking in its wait for what the other
    thread sends (the GIL handed over in the waits): every message arrives,
    in order."""
    asyncore = cloop
    n = 200
    a_sock, to_a = socks.pair()         # in A's map, written by thread B
    b_sock, to_b = socks.pair()         # in B's map, written by thread A
    results = {}

    def worker(name, mine, to_other):
        m = {}
        got = bytearray()

        class Sink(asyncore.dispatcher):
            def writable(self):
                return False

            def handle_read(self):
                got.extend(self.recv(65536))

        Sink(mine, map=m)
        other = "B" if name == "A" else "A"
        want = b"".join(b"%s%d;" % (other.encode(), i) for i in range(n))
        try:
            deadline = time.monotonic() + 20
            for i in range(n):
                to_other.send(b"%s%d;" % (name.encode(), i))
                asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=1)
            while len(got) < len(want) and time.monotonic() < deadline:
                asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
            results[name] = bytes(got) == want or bytes(got[:80])
        except BaseException as e:      # noqa: BLE001 - reported below
            results[name] = repr(e)
        finally:
            m.clear()
            _loop.forget_map(m)

    threads = [threading.Thread(target=worker, args=("A", a_sock, to_b)),
               threading.Thread(target=worker, args=("B", b_sock, to_a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {"A": True, "B": True}


# ---------------------------------------------------------------------------
# g. a poll function replaced by the user is called each iteration

@pytest.mark.parametrize("use_poll_mode", [False, True], ids=["select", "poll"])
def test_replaced_poll_function_is_called_each_iteration(cloop, wait, socks, monkeypatch,
                                                         use_poll_mode):
    asyncore = cloop
    name = "poll2" if use_poll_mode else "poll"
    real = getattr(asyncore, name)
    calls = []
    m = {}

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            calls.append(("read", self.recv(10)))

    s, p = socks.pair()
    D(s, map=m)

    def second(timeout, map):
        calls.append("second")
        real(timeout, map)

    def first(timeout, map):
        calls.append("first")
        # replacing it again from inside: 3.11 looked it up once per loop()
        if getattr(asyncore, name) is first:
            monkeypatch.setattr(asyncore, name, second)
            p.send(b"x")
        real(timeout, map)

    monkeypatch.setattr(asyncore, name, first)
    asyncore.loop(timeout=0.01, use_poll=use_poll_mode, map=m, count=4)
    assert calls == ["first", ("read", b"x"), "first", "first", "first"]
    del calls[:]
    asyncore.loop(timeout=0, use_poll=use_poll_mode, map=m, count=2)
    assert calls == ["second", "second"]
    # and count=None runs it until the map is empty
    del calls[:]

    def closer(timeout, map):
        calls.append("closer")
        if len(calls) == 3:
            asyncore.close_all(map=map)
        real(timeout, map)

    monkeypatch.setattr(asyncore, name, closer)
    asyncore.loop(timeout=0, use_poll=use_poll_mode, map=m)
    assert calls == ["closer"] * 3 and not m


# ---------------------------------------------------------------------------
# h. fork: the child gets its own poller for a map made in the parent

@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("where", ["between", "in-handler", "in-handler-continue"])
def test_fork_child_loops_on_the_parents_map(cloop, use_poll, wait, socks, where):
    """between: fork between two loop() calls; in-handler: a handler forks and
    the child leaves the loop() call (ExitNow) and loops again; in-handler-
    continue: the child goes on in the very loop() call that forked, whose
    MapState and poller the fork hook dropped.  Each child reads from the
    parent's map once and reports through a pipe; the parent then checks
    that its own poller still serves the map."""
    asyncore = cloop
    m = {}
    log = []
    parent = os.getpid()
    rfd, wfd = os.pipe()

    def child_exit(ok, msg=b""):
        try:
            os.write(wfd, b"ok" if ok else (msg or b"child failed"))
        finally:
            os._exit(0 if ok else 1)

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            data = self.recv(100)
            log.append(data)
            if os.getpid() != parent:
                if data == b"child":
                    child_exit(True)
                return
            if data == b"fork":
                pid = os.fork()
                if pid:
                    self.child = pid
                    raise asyncore.ExitNow("parent leaves loop()")
                if where == "in-handler":
                    raise asyncore.ExitNow("child leaves loop()")
                p.send(b"child")            # served by this same loop() call

    s, p = socks.pair()
    d = D(s, map=m)
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)     # the map has a state
    assert _loop._states.get(id(m)) is not None
    pid = None
    try:
        try:
            if where == "between":
                pid = os.fork()
            else:
                p.send(b"fork")
                asyncore.loop(timeout=1, use_poll=use_poll, map=m, count=5)
        except asyncore.ExitNow:
            pass
        if os.getpid() != parent:          # the child: never returns into pytest
            try:
                if where == "in-handler-continue":
                    child_exit(False, b"the forking loop() returned without serving the child")
                p.send(b"child")
                for _ in range(20):
                    asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=1)
                child_exit(False, ("no event in the child: %r" % log).encode())
            except BaseException as e:     # noqa: BLE001 - report, then _exit
                child_exit(False, ("child: %r" % e).encode())
            finally:
                os._exit(1)
        if pid is None:
            pid = d.child
        os.close(wfd)
        wfd = None
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            r, status = os.waitpid(pid, os.WNOHANG)
            if r == pid:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child did not finish in time")
        with os.fdopen(rfd, "rb") as f:
            rfd = None
            msg = f.read()
        assert msg == b"ok", msg
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        # the parent's loop still works (its poller untouched by the child)
        del log[:]
        p.send(b"parent")
        for _ in range(20):
            asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=1)
            if log:
                break
        assert log == [b"parent"], log
    finally:
        for fd in (rfd, wfd):
            if fd is not None:
                os.close(fd)
        asyncore.close_all(map=m)


# ---------------------------------------------------------------------------
# the C loop is what runs

def test_the_c_loop_is_active_for_the_cffi_backend():
    _need_cloop()
    with _Switch("c") as asyncore:
        assert _loop.c_run() is not None
        seen = []
        m = {}
        s, p = pair()
        try:
            d = asyncore.dispatcher(s, map=m)
            d.writable = lambda: False
            d.handle_read = lambda: seen.append(d.recv(10))
            p.send(b"c")
            with mock.patch.object(_loop, "poll_once", side_effect=AssertionError("py")):
                asyncore.loop(timeout=0.05, map=m, count=1)
                asyncore.loop(timeout=0.05, use_poll=True, map=m, count=1)
            assert seen == [b"c"]
        finally:
            asyncore.close_all(map=m)
            p.close()
    if os.environ.get("FASTASYNCORE_LOOP", "auto").strip().lower() in ("", "auto", "c"):
        with _Switch("c"):
            _loop.set_loop("auto")
            assert _loop.loop_impl() == "c"


# ---------------------------------------------------------------------------
# _cloop.StateBase: the MapState fields the C loop reads as a C struct

def test_map_state_fields_live_in_the_c_struct(cloop):
    _need_cloop()
    from fastasyncore import _cloop
    assert issubclass(_loop.MapState, _cloop.StateBase)
    for name in _loop._C_FIELDS:
        assert name not in _loop.MapState.__slots__
        assert type(vars(_cloop.StateBase)[name]).__name__ == "member_descriptor"
    m = {}
    st = _loop.MapState(m)
    try:
        # what __init__ set reads back, as from __slots__
        assert st.map is m and st.thread is None and st.poller is None
        assert (st.iters, st.nchg, st.nev) == (0, 0, 0)
        assert st.mask == {} and st.cprev is None and st.full is True
        st.nchg += 5
        assert st.nchg == 5
        del st.cprev
        with pytest.raises(AttributeError):
            st.cprev
        st.cprev = None
    finally:
        st.close()


def test_map_state_in_a_reference_cycle_is_collected(cloop):
    # tp_traverse visits the C fields: a cycle through one of them is found
    _need_cloop()
    st = _loop.MapState({})
    st.close()
    st.cprev = (True, [st])
    st.csnap = (st,)
    ref = weakref.ref(st)
    del st
    gc.collect()
    assert ref() is None


# Fields every C iteration of this map reads (at the take, or per iteration
# with a consulted channel): a field deleted under the loop is an
# AttributeError naming it, never a crash.
READ_EVERY_RUN = ["map", "thread", "poller", "owner", "mask", "consulted", "pending",
                  "batch", "suspended", "full", "iters", "adapt_at", "csnap", "cprev",
                  "svc", "wakefd"]


@pytest.mark.parametrize("field", READ_EVERY_RUN)
def test_deleted_map_state_field_raises_attribute_error(cloop, use_poll, socks, field):
    _need_cloop()
    asyncore = cloop
    m = {}

    class Asked(asyncore.dispatcher):
        def writable(self):         # consulted: asked every iteration
            return False

        def handle_read(self):
            self.recv(100)

    a, b = socks.pair()
    Asked(a, map=m)
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
    st = _loop._states[id(m)]
    saved = getattr(st, field)
    delattr(st, field)
    try:
        with pytest.raises(AttributeError, match=field):
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
    finally:
        setattr(st, field, saved)
    st.thread = None            # (a failed take may leave it set)
    b.send(b"x")
    asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=2)
    asyncore.close_all(map=m)


TIMEOUTS = [0, 1, 30, -1, -5, 10 ** 6, 10 ** 9, 10 ** 30, True, False,
            0.0, -0.0, 1e-9, 0.0004, 0.0005, 0.0015, 0.001, 0.05, 2.5, 30.0, 1e11,
            1e12, 1e13, -0.0004, -1.0, -2.7, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("select_mode", [True, False], ids=["select", "poll"])
def test_c_timeout_arithmetic_is_timeout_ms(cloop, select_mode):
    # run() turns loop()'s timeout into the wait's ms in C for None, floats
    # and small ints, and asks _loop._timeout_ms() for the rest: the same
    # numbers, or the same exception, for every kind of value
    _need_cloop()
    from fastasyncore import _cloop

    class Seconds(float):
        pass

    for t in TIMEOUTS + [None, Seconds(0.25), 2 ** 62]:
        try:
            want = _loop._timeout_ms(t, select_mode)
        except Exception as e:
            with pytest.raises(type(e)):
                _cloop.timeout_ms(t, select_mode)
            continue
        if want > 2 ** 63 - 1:
            with pytest.raises(OverflowError):
                _cloop.timeout_ms(t, select_mode)
            continue
        assert _cloop.timeout_ms(t, select_mode) == want, t
