"""Unit tests of the backend interface (docs/backend-interface.md).

One test body runs against both implementations, imported directly:
``fastasyncore._pure`` and ``fastasyncore._cffi`` (skipped when the C core is
not built, unless FASTASYNCORE_REQUIRE_CORE=1). Loopback/socketpair only; every
wait is bounded.
"""

import errno
import importlib
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

try:
    from hypothesis import given, settings, strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
except ImportError:  # pragma: no cover
    given = None

REQUIRE_CORE = os.environ.get("FASTASYNCORE_REQUIRE_CORE") == "1"
NAMES = ("NAME", "POLLER_KINDS", "POLLIN", "POLLPRI", "POLLOUT", "POLLERR",
         "POLLHUP", "POLLNVAL", "POLLFAULT", "FAULT_SHIFT", "Poller", "send",
         "recv", "sendv", "SendQueue", "scan", "prefix_at_end", "poll_list")


def _load(name):
    if name == "pure":
        return importlib.import_module("fastasyncore._pure")
    try:
        return importlib.import_module("fastasyncore._cffi")
    except ImportError as exc:
        if REQUIRE_CORE:
            pytest.fail("FASTASYNCORE_REQUIRE_CORE=1 but the C core is missing: %s" % exc)
        pytest.skip("the C core (fastasyncore._core) is not built: %s" % exc)


@pytest.fixture(params=["pure", "cffi"])
def be(request):
    """The backend module under test."""
    return _load(request.param)


def _kinds(name):
    # Parametrize over poller kinds without importing the C core at collection.
    if name == "pure":
        return list(importlib.import_module("fastasyncore._pure").POLLER_KINDS)
    try:
        return list(importlib.import_module("fastasyncore._cffi").POLLER_KINDS)
    except ImportError:
        return ["epoll", "poll"]


KIND_PARAMS = [(n, k) for n in ("pure", "cffi") for k in _kinds(n)]


@pytest.fixture(params=KIND_PARAMS, ids=["%s-%s" % p for p in KIND_PARAMS])
def poller(request):
    """(backend module, Poller) for every poller kind of every backend."""
    name, kind = request.param
    mod = _load(name)
    if kind not in mod.POLLER_KINDS:
        pytest.skip("no %s poller here" % kind)
    p = mod.Poller(kind)
    yield mod, p
    p.close()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def ready(p, timeout_ms=0):
    return dict(p.wait(timeout_ms))


# ---- surface --------------------------------------------------------------------

def test_exports(be):
    assert tuple(sorted(be.__all__)) == tuple(sorted(NAMES))
    for n in NAMES:
        assert hasattr(be, n), n
    assert be.NAME in ("pure", "cffi")
    assert (be.POLLIN, be.POLLPRI, be.POLLOUT, be.POLLERR, be.POLLHUP,
            be.POLLNVAL) == (1, 2, 4, 8, 16, 32)
    assert (be.POLLFAULT, be.FAULT_SHIFT) == (0x8000, 16)
    assert be.POLLER_KINDS and set(be.POLLER_KINDS) <= {"epoll", "kqueue", "poll", "select"}
    if sys.platform.startswith("linux"):
        assert be.POLLER_KINDS[0] == "epoll"


def test_default_kind_and_unknown(be):
    with be.Poller() as p:
        assert p.kind == be.POLLER_KINDS[0]
        assert p.kind != "select"  # the default is a scalable one
    with pytest.raises(ValueError):
        be.Poller("nonsense")


def test_close_idempotent(poller):
    mod, p = poller
    if p.kind in ("epoll", "kqueue"):
        assert p.fileno() >= 0
        fd = p.fileno()
        # close-on-exec
        import fcntl
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    else:
        assert p.fileno() == -1
    assert not p.closed
    p.close()
    p.close()
    assert p.closed
    assert p.fileno() == -1
    with pytest.raises(ValueError):
        p.wait(0)


# ---- readiness ----------------------------------------------------------------------

def test_readiness_socketpair(poller, pair):
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLIN | mod.POLLOUT)
    assert p.registered() == {a.fileno(): mod.POLLIN | mod.POLLOUT}
    assert ready(p) == {a.fileno(): mod.POLLOUT}
    p.modify(a.fileno(), mod.POLLIN)
    assert ready(p) == {}
    b.send(b"x")
    assert ready(p, 1000) == {a.fileno(): mod.POLLIN}
    # level-triggered: reported again until drained
    assert ready(p, 0) == {a.fileno(): mod.POLLIN}
    assert a.recv(10) == b"x"
    assert ready(p, 0) == {}


def test_modify_remove(poller, pair):
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLOUT)
    p.modify(b.fileno(), mod.POLLOUT)
    assert ready(p) == {a.fileno(): mod.POLLOUT, b.fileno(): mod.POLLOUT}
    p.modify(a.fileno(), 0)
    assert p.registered() == {b.fileno(): mod.POLLOUT}
    assert ready(p) == {b.fileno(): mod.POLLOUT}
    p.modify(b.fileno(), 0)
    assert p.registered() == {}
    assert ready(p) == {}
    p.modify(a.fileno(), 0)  # removing an unregistered fd is fine
    assert ready(p) == {}


def test_batched_changes_last_wins(poller, pair):
    mod, p = poller
    a, b = pair
    # Several changes before one wait: only the last one per fd counts.
    p.modify(a.fileno(), mod.POLLOUT)
    p.modify(a.fileno(), 0)
    p.modify(a.fileno(), mod.POLLIN)
    p.modify(b.fileno(), mod.POLLIN)
    p.modify(b.fileno(), mod.POLLOUT)
    assert ready(p) == {b.fileno(): mod.POLLOUT}
    a.send(b"1")
    b.send(b"2")
    assert ready(p, 1000) == {a.fileno(): mod.POLLIN, b.fileno(): mod.POLLOUT}


def test_many_fds(poller):
    mod, p = poller
    socks = [socket.socketpair() for _ in range(300)]
    try:
        for a, b in socks:
            p.modify(a.fileno(), mod.POLLOUT)
        got = ready(p)
        assert len(got) == 300
        # results beyond the preallocated array are delivered by the next waits
        for a, b in socks:
            p.modify(a.fileno(), 0)
        assert ready(p) == {}
    finally:
        for a, b in socks:
            a.close()
            b.close()


def test_many_fds_readable_all_delivered(poller):
    mod, p = poller
    socks = [socket.socketpair() for _ in range(400)]
    try:
        if p.kind == "select" and max(b.fileno() for a, b in socks) >= 1024:
            pytest.skip("fds beyond FD_SETSIZE")
        for a, b in socks:
            p.modify(a.fileno(), mod.POLLIN)
            b.send(b"x")
        seen = set()
        for _ in range(10):
            seen.update(fd for fd, ev in p.wait(1000) if ev & mod.POLLIN)
            if len(seen) == 400:
                break
        assert seen == {a.fileno() for a, b in socks}
    finally:
        for a, b in socks:
            a.close()
            b.close()


def test_hup_on_peer_close(poller, pair):
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLIN)
    b.close()
    got = ready(p, 1000)
    assert got[a.fileno()] & (mod.POLLIN | mod.POLLHUP)


# ---- timeouts --------------------------------------------------------------------------

def test_timeout_zero_never_blocks(poller, pair):
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLIN)
    t = time.monotonic()
    for _ in range(100):
        assert p.wait(0) == []
    assert time.monotonic() - t < 0.5


def test_timeout_positive_elapses(poller, pair):
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLIN)
    t = time.monotonic()
    assert p.wait(150) == []
    dt = time.monotonic() - t
    assert 0.14 <= dt < 2.0


def test_block_until_event(poller, pair):
    import threading
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLIN)
    timer = threading.Timer(0.1, b.send, (b"wake",))
    timer.start()
    try:
        t = time.monotonic()
        got = dict(p.wait(-1))  # blocks; the timer wakes it
        assert got == {a.fileno(): mod.POLLIN}
        assert time.monotonic() - t < 5
    finally:
        timer.cancel()


def test_empty_poller_timeout(poller):
    mod, p = poller
    t = time.monotonic()
    assert p.wait(50) == []
    assert 0.04 <= time.monotonic() - t < 2.0


# ---- refused fds (poll(2) emulation) -------------------------------------------------

def test_closed_fd_reports_pollnval(poller):
    mod, p = poller
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    if p.kind == "select":
        # select() fails as a whole on a closed fd; the pure backend reports
        # it as POLLNVAL like poll would.
        pass
    p.modify(r, mod.POLLIN)
    for _ in range(3):  # at every wait, without blocking
        t = time.monotonic()
        assert ready(p, 2000) == {r: mod.POLLNVAL}
        assert time.monotonic() - t < 1.0
    p.modify(r, 0)
    assert ready(p) == {}


def test_regular_file_always_ready(poller, tmp_path):
    mod, p = poller
    path = tmp_path / "f"
    path.write_bytes(b"data")
    with open(path, "r+b") as f:
        p.modify(f.fileno(), mod.POLLIN)
        for _ in range(2):
            t = time.monotonic()
            assert ready(p, 2000) == {f.fileno(): mod.POLLIN}
            assert time.monotonic() - t < 1.0
        p.modify(f.fileno(), mod.POLLIN | mod.POLLOUT)
        assert ready(p, 2000) == {f.fileno(): mod.POLLIN | mod.POLLOUT}
        p.modify(f.fileno(), 0)
        assert ready(p, 0) == {}


def test_refused_fd_does_not_hide_others(poller, pair, tmp_path):
    mod, p = poller
    a, b = pair
    path = tmp_path / "f"
    path.write_bytes(b"")
    with open(path, "rb") as f:
        p.modify(f.fileno(), mod.POLLIN)
        p.modify(a.fileno(), mod.POLLIN)
        b.send(b"x")
        got = ready(p, 1000)
        assert got[f.fileno()] == mod.POLLIN
        if a.fileno() not in got:  # at worst on the next round
            got = ready(p, 1000)
        assert got[a.fileno()] == mod.POLLIN
        p.modify(f.fileno(), 0)


def test_fd_closed_after_registration(poller):
    mod, p = poller
    a, b = socket.socketpair()
    fd = a.fileno()
    p.modify(fd, mod.POLLOUT)
    assert ready(p) == {fd: mod.POLLOUT}
    a.close()  # without modify(fd, 0): the kernel drops the registration
    got = ready(p, 0)
    assert got in ({}, {fd: mod.POLLNVAL})
    # a new socket reusing the number can be registered afresh
    c, d = socket.socketpair()
    try:
        fds = {c.fileno(), d.fileno()}
        p.modify(c.fileno(), mod.POLLOUT)
        p.modify(fd, 0) if fd not in fds else None
        got = ready(p, 0)
        assert got.get(c.fileno()) == mod.POLLOUT
    finally:
        b.close()
        c.close()
        d.close()


def test_closed_behind_our_back_becomes_pollnval(poller):
    # poll(2) reports POLLNVAL for a registered fd that was closed; epoll and
    # kqueue forget it silently, so the backends check for it after idle waits.
    mod, p = poller
    a, b = socket.socketpair()
    fd = a.fileno()
    try:
        p.modify(fd, mod.POLLIN)
        assert p.wait(0) == []
        a.close()  # behind the poller's back, no modify(fd, 0)
        got = {}
        for _ in range(3):
            got = ready(p, 50)
            if got:
                break
        assert got == {fd: mod.POLLNVAL}
        assert ready(p, 50) == {fd: mod.POLLNVAL}  # at every wait, no blocking
        p.modify(fd, 0)
        assert ready(p, 0) == {}
    finally:
        a.close()
        b.close()


# ---- fds above FD_SETSIZE -----------------------------------------------------------------

@pytest.fixture
def high_fd_pair():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1500
    if soft < want + 10:
        if hard != resource.RLIM_INFINITY and hard < want + 10:
            pytest.skip("RLIMIT_NOFILE hard limit %d too low" % hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want + 10, hard))
    a, b = socket.socketpair()
    hi = os.dup2(a.fileno(), want) if hasattr(os, "dup2") else None
    os.set_inheritable(hi, False)
    try:
        yield hi, b
    finally:
        os.close(hi)
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fd_above_fd_setsize(poller, high_fd_pair):
    mod, p = poller
    hi, b = high_fd_pair
    assert hi >= 1024
    if p.kind == "select":
        with pytest.raises(ValueError):
            p.modify(hi, mod.POLLIN)
        return
    p.modify(hi, mod.POLLIN | mod.POLLOUT)
    assert ready(p) == {hi: mod.POLLOUT}
    b.send(b"x")
    assert ready(p, 1000) == {hi: mod.POLLIN | mod.POLLOUT}
    assert mod.recv(hi, 10) == b"x"
    p.modify(hi, 0)
    assert ready(p) == {}


# ---- bad input ------------------------------------------------------------------------------

def test_modify_bad_input(poller):
    mod, p = poller
    with pytest.raises(TypeError):
        p.modify("3", mod.POLLIN)
    with pytest.raises(TypeError):
        p.modify(3.0, mod.POLLIN)
    with pytest.raises(TypeError):
        p.modify(None, mod.POLLIN)
    with pytest.raises(ValueError):
        p.modify(-1, mod.POLLIN)
    with pytest.raises((OverflowError, ValueError)):
        p.modify(2**40, mod.POLLIN)
    assert p.registered() == {}
    assert p.wait(0) == []


def test_huge_garbage_fd_is_nval(poller):
    mod, p = poller
    if p.kind == "select":
        pytest.skip("select refuses fds >= FD_SETSIZE")
    fd = 2**31 - 1  # never open; must not make the core allocate a huge table
    p.modify(fd, mod.POLLIN)
    assert ready(p, 1000) == {fd: mod.POLLNVAL}
    p.modify(fd, 0)
    assert ready(p) == {}


def test_io_bad_input(be, pair):
    a, b = pair
    for bad in ("3", 3.5, None):
        with pytest.raises(TypeError):
            be.send(bad, b"x")
        with pytest.raises(TypeError):
            be.recv(bad, 10)
        with pytest.raises(TypeError):
            be.sendv(bad, [b"x"], 10)
    for neg in (-1, -100):
        with pytest.raises(ValueError):
            be.send(neg, b"x")
        with pytest.raises(ValueError):
            be.recv(neg, 10)
        with pytest.raises(ValueError):
            be.sendv(neg, [b"x"], 10)
    with pytest.raises((OverflowError, ValueError)):
        be.send(2**40, b"x")
    for n in (0, -1, -2**70):
        with pytest.raises(ValueError):
            be.recv(a.fileno(), n)
    with pytest.raises(TypeError):
        be.send(a.fileno(), "text")
    with pytest.raises(TypeError):
        be.send(a.fileno(), 12)
    with pytest.raises(TypeError):
        be.sendv(a.fileno(), ["text"], 10)
    with pytest.raises(ValueError):
        be.sendv(a.fileno(), [b"x"], -1)
    # huge lengths are clamped, never trusted
    b.send(b"abc")
    assert wait_readable(a)
    assert be.recv(a.fileno(), 2**80) == b"abc"
    assert be.sendv(a.fileno(), [b"xy"], 2**80) == 2
    assert b.recv(10) == b"xy"


def wait_readable(sock, timeout=2.0):
    import select
    r, _, _ = select.select([sock], [], [], timeout)
    return bool(r)


# ---- plain-fd I/O ------------------------------------------------------------------------------

def test_send_recv_counts(be, pair):
    a, b = pair
    assert be.send(a.fileno(), b"hello") == 5
    assert be.send(a.fileno(), bytearray(b" world")) == 6
    assert be.send(a.fileno(), memoryview(b"!!")[:1]) == 1
    assert be.send(a.fileno(), b"") == 0
    assert wait_readable(b)
    assert be.recv(b.fileno(), 3) == b"hel"
    assert be.recv(b.fileno(), 100) == b"lo world!"
    assert be.recv(b.fileno(), 100) == -errno.EAGAIN


def test_recv_clamped_to_64k(be, pair):
    a, b = pair
    a.setblocking(True)
    data = os.urandom(200000)
    import threading
    t = threading.Thread(target=a.sendall, args=(data,))
    t.start()
    got = bytearray()
    deadline = time.monotonic() + 10
    while len(got) < len(data) and time.monotonic() < deadline:
        wait_readable(b, 1.0)
        r = be.recv(b.fileno(), 1 << 20)
        if isinstance(r, int):
            assert r == -errno.EAGAIN
            continue
        assert 0 < len(r) <= 65536
        got += r
    t.join(5)
    assert bytes(got) == data


def test_send_eagain_when_full(be, pair):
    a, b = pair
    chunk = b"x" * 65536
    for _ in range(10000):
        r = be.send(a.fileno(), chunk)
        if r < 0:
            assert r == -errno.EAGAIN
            break
        assert 0 < r <= len(chunk)
    else:
        pytest.fail("socket buffer never filled")
    q = be.SendQueue()
    q.push(b"more")
    assert q.send(a.fileno(), 100) == -errno.EAGAIN
    assert len(q) == 4
    assert be.sendv(a.fileno(), [b"a", b"b"], 10) == -errno.EAGAIN


def test_recv_eof_and_epipe(be, pair):
    a, b = pair
    b.close()
    assert be.recv(a.fileno(), 10) == b""
    r = be.send(a.fileno(), b"x")
    assert r in (-errno.EPIPE, -errno.ECONNRESET)


def test_closed_and_non_socket_fds(be, tmp_path):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert be.send(r, b"x") == -errno.EBADF
    assert be.recv(r, 10) == -errno.EBADF
    assert be.sendv(r, [b"x"], 10) == -errno.EBADF
    with open(tmp_path / "f", "wb") as f:
        assert be.send(f.fileno(), b"x") == -errno.ENOTSOCK
        assert be.recv(f.fileno(), 1) == -errno.ENOTSOCK
        assert be.sendv(f.fileno(), [b"x"], 1) == -errno.ENOTSOCK
        os.fstat(f.fileno())  # the fd was borrowed, never closed
        f.write(b"still open")


def test_sendv(be, pair):
    a, b = pair
    chunks = [b"ab", bytearray(b"cd"), memoryview(b"efgh"), b"", b"ij"]
    assert be.sendv(a.fileno(), chunks, 7) == 7
    assert wait_readable(b)
    assert b.recv(100) == b"abcdefg"
    assert be.sendv(a.fileno(), chunks, 100) == 10
    assert b.recv(100) == b"abcdefghij"
    assert be.sendv(a.fileno(), [], 100) == 0
    assert be.sendv(a.fileno(), [b"x"], 0) == 0
    # more chunks than IOV_MAX: clamped, still one call
    many = [b"z"] * 3000
    n = be.sendv(a.fileno(), many, 10**6)
    assert 0 < n <= 1024
    assert b.recv(4096) == b"z" * n


SIGPIPE_CHILD = textwrap.dedent("""
    import signal, socket, sys
    sys.path[:0] = %r
    import importlib
    mod = importlib.import_module(%r)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # default action: death
    a, b = socket.socketpair()
    b.close()
    r1 = mod.send(a.fileno(), b"x")
    r2 = mod.sendv(a.fileno(), [b"x", b"y"], 10)
    q = mod.SendQueue(); q.push(b"z"); r3 = q.send(a.fileno(), 10)
    print(r1, r2, r3)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGPIPE"), reason="no SIGPIPE")
def test_no_sigpipe_death(be):
    import fastasyncore
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastasyncore.__file__)))
    code = SIGPIPE_CHILD % ([root], be.__name__)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    vals = [int(x) for x in proc.stdout.split()]
    assert all(v in (-errno.EPIPE, -errno.ECONNRESET) for v in vals), vals


# ---- EINTR ----------------------------------------------------------------------------------------

class _Boom(Exception):
    pass


@pytest.fixture
def itimer():
    old = signal.getsignal(signal.SIGALRM)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no setitimer")
def test_eintr_raising_handler_propagates(poller, pair, itimer):
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLIN)

    def boom(signum, frame):
        raise _Boom()

    signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    t = time.monotonic()
    with pytest.raises(_Boom):
        p.wait(5000)
    assert time.monotonic() - t < 2.0
    # the poller is still usable afterwards
    b.send(b"x")
    assert ready(p, 1000) == {a.fileno(): mod.POLLIN}


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no setitimer")
def test_eintr_quiet_handler_full_timeout(poller, pair, itimer):
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLIN)
    hits = []
    signal.signal(signal.SIGALRM, lambda s, f: hits.append(s))
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)  # repeatedly
    t = time.monotonic()
    assert p.wait(400) == []
    dt = time.monotonic() - t
    signal.setitimer(signal.ITIMER_REAL, 0)
    assert hits  # the handler ran (during the wait)
    assert 0.39 <= dt < 3.0


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no setitimer")
def test_eintr_with_pending_changes(poller, pair, itimer):
    mod, p = poller
    a, b = pair
    hits = []
    signal.signal(signal.SIGALRM, lambda s, f: hits.append(s))
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    p.modify(a.fileno(), mod.POLLIN)  # applied by the interrupted wait
    assert p.wait(200) == []
    assert hits
    b.send(b"x")
    assert ready(p, 1000) == {a.fileno(): mod.POLLIN}


# ---- threads -----------------------------------------------------------------------------------

def test_close_from_another_thread_during_wait(poller, pair):
    import threading
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLIN)
    lock = getattr(p, "_lock", None)    # the cffi poller's: held by wait()

    def close_during_wait():
        # Close once the wait is under way (not on a timer alone: under
        # valgrind on a loaded machine 0.1 s can pass before wait() starts).
        deadline = time.monotonic() + 2.0
        while lock is not None and not lock.locked() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        p.close()

    closer = threading.Timer(0.1, close_during_wait)
    waker = threading.Timer(0.3, b.send, (b"x",))
    closer.start()
    waker.start()
    try:
        got = p.wait(3000)  # returns (woken by data); memory stays valid
        assert got in ([], [(a.fileno(), mod.POLLIN)])
        closer.join()
        assert p.closed
        with pytest.raises(ValueError):
            p.wait(0)
    finally:
        closer.cancel()
        waker.cancel()


def test_modify_from_another_thread_during_wait(poller, pair):
    import threading
    mod, p = poller
    a, b = pair
    p.modify(a.fileno(), mod.POLLIN)
    t = threading.Timer(0.1, p.modify, (b.fileno(), mod.POLLOUT))
    t.start()
    try:
        p.wait(300)  # the change made meanwhile must not be lost
        t.join()
        assert ready(p, 1000) == {b.fileno(): mod.POLLOUT}
    finally:
        t.cancel()


def test_concurrent_wait_refused(be, pair):
    import threading
    if be.NAME != "cffi":
        pytest.skip("the select objects allow it; only the C poller guards it")
    a, b = pair
    p = be.Poller()
    p.modify(a.fileno(), be.POLLIN)
    th = threading.Thread(target=p.wait, args=(2000,))
    th.start()
    try:
        time.sleep(0.1)
        with pytest.raises(RuntimeError):
            p.wait(0)
    finally:
        b.send(b"x")
        th.join(5)
        p.close()


def test_sendqueue_threads(be, pair):
    import threading
    a, b = pair
    q = be.SendQueue()
    stop = time.monotonic() + 1.0
    total = [0]

    def pusher():
        while time.monotonic() < stop:
            q.push(b"y" * 1000)
            total[0] += 1000

    th = threading.Thread(target=pusher)
    th.start()
    sent = 0
    got = 0
    while th.is_alive() or q:
        r = q.send(a.fileno(), 65536)
        if r > 0:
            sent += r
        try:
            got += len(b.recv(1 << 20))
        except BlockingIOError:
            pass
        if time.monotonic() > stop + 10:
            break
    th.join()
    while got < sent:
        wait_readable(b, 1.0)
        got += len(b.recv(1 << 20))
    assert sent == got == total[0]


# ---- SendQueue ------------------------------------------------------------------------------------

def test_sendqueue_basics(be):
    q = be.SendQueue()
    assert len(q) == 0 and not q and q.getvalue() == b"" and q.peek(10) == b""
    ba = bytearray(b"hello")
    q.push(ba)
    ba[:] = b"XXXXXXXXXXXXX"  # mutated (and resized) after push: no effect
    q.push(b" ")
    q.push(memoryview(b"world"))
    q.push(b"")
    assert q and len(q) == 11
    assert q.peek(3) == b"hel"
    assert q.peek(100) == b"hello world"
    q.consume(6)
    assert q.getvalue() == b"world"
    q.consume(100)
    assert len(q) == 0 and q.getvalue() == b""
    q.push(b"abc")
    q.clear()
    assert not q
    with pytest.raises(TypeError):
        q.push("str")
    with pytest.raises(TypeError):
        q.push(None)
    with pytest.raises(TypeError):
        q.push(5)
    with pytest.raises(ValueError):
        q.consume(-1)
    assert len(q) == 0


def test_sendqueue_send(be, pair):
    a, b = pair
    q = be.SendQueue()
    assert q.send(a.fileno(), 100) == 0  # empty: nothing to do
    q.push(b"0123456789")
    assert q.send(a.fileno(), 4) == 4
    assert q.getvalue() == b"456789"
    assert q.send(a.fileno(), 100) == 6
    assert not q
    assert wait_readable(b)
    assert b.recv(100) == b"0123456789"
    with pytest.raises(ValueError):
        q.send(-1, 10)
    with pytest.raises(TypeError):
        q.send("x", 10)
    q.push(b"x")
    assert q.send(a.fileno(), 2**80) == 1  # huge max_bytes is clamped


def test_sendqueue_large_drain(be, pair):
    a, b = pair
    q = be.SendQueue()
    data = os.urandom(1 << 20)
    for i in range(0, len(data), 1000):
        q.push(data[i:i + 1000])
    got = bytearray()
    deadline = time.monotonic() + 20
    while (q or len(got) < len(data)) and time.monotonic() < deadline:
        if q:
            r = q.send(a.fileno(), 65536)
            assert r > 0 or r == -errno.EAGAIN
        try:
            got += b.recv(1 << 20)
        except BlockingIOError:
            pass
    assert bytes(got) == data


if given is not None:
    OPS = st.lists(st.one_of(
        st.tuples(st.just("push"), st.binary(max_size=3000)),
        st.tuples(st.just("consume"), st.integers(0, 5000)),
        st.tuples(st.just("peek"), st.integers(0, 5000)),
        st.tuples(st.just("clear"), st.just(0)),
        st.tuples(st.just("send"), st.integers(0, 5000)),
    ), max_size=80)

    @settings(max_examples=150, deadline=None)
    @given(ops=OPS)
    def test_sendqueue_model(ops):
        for name in ("pure", "cffi"):
            try:
                mod = _load(name)
            except pytest.skip.Exception:
                continue
            q = mod.SendQueue()
            model = bytearray()
            a, b = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            for op, arg in ops:
                if op == "send":
                    r = q.send(a.fileno(), arg)
                    assert 0 <= r <= min(arg, len(model))
                    if r:
                        wait_readable(b)
                        got = b""
                        while len(got) < r:
                            got += b.recv(r - len(got))
                        assert got == bytes(model[:r])
                        del model[:r]
                elif op == "push":
                    q.push(arg)
                    model += arg
                elif op == "consume":
                    q.consume(arg)
                    del model[:arg]
                elif op == "peek":
                    assert q.peek(arg) == bytes(model[:arg])
                else:
                    q.clear()
                    model.clear()
                assert len(q) == len(model) == q.nbytes
                assert bool(q) == bool(model)
            assert q.getvalue() == bytes(model)
            a.close()
            b.close()

    @settings(max_examples=300, deadline=None)
    @given(buf=st.binary(max_size=200), term=st.binary(min_size=1, max_size=4),
           start=st.integers(0, 210), limit=st.integers(-1, 50))
    def test_scan_model(buf, term, start, limit):
        expect = []
        i = start
        while len(expect) < limit:
            j = buf.find(term, i)
            if j < 0:
                break
            expect.append(j)
            i = j + len(term)
        for name in ("pure", "cffi"):
            try:
                mod = _load(name)
            except pytest.skip.Exception:
                continue
            assert mod.scan(buf, start, term, limit) == expect

    @settings(max_examples=300, deadline=None)
    @given(hay=st.binary(max_size=20), needle=st.binary(max_size=6))
    def test_prefix_at_end_model(hay, needle):
        l = len(needle) - 1
        while l and not hay.endswith(needle[:l]):
            l -= 1
        for name in ("pure", "cffi"):
            try:
                mod = _load(name)
            except pytest.skip.Exception:
                continue
            assert mod.prefix_at_end(hay, needle) == l


# ---- scan / prefix_at_end ----------------------------------------------------------------------------

def test_scan(be):
    buf = b"a\r\nbb\r\n\r\nccc"
    assert be.scan(buf, 0, b"\r\n", 10) == [1, 5, 7]
    assert be.scan(buf, 0, b"\r\n", 2) == [1, 5]
    assert be.scan(buf, 2, b"\r\n", 10) == [5, 7]
    assert be.scan(buf, 100, b"\r\n", 10) == []
    assert be.scan(buf, 0, b"\r\n", 0) == []
    assert be.scan(b"aaaa", 0, b"aa", 10) == [0, 2]  # non-overlapping
    assert be.scan(bytearray(buf), 0, b"\n", 10) == [2, 6, 8]
    assert be.scan(memoryview(buf), 0, bytearray(b"c"), 10) == [9, 10, 11]
    assert be.scan(b"\n" * 100000, 0, b"\n", 100000) == list(range(100000))
    with pytest.raises(ValueError):
        be.scan(buf, 0, b"", 10)
    with pytest.raises(ValueError):
        be.scan(buf, -1, b"x", 10)
    with pytest.raises(TypeError):
        be.scan(buf, 0, "x", 10)
    with pytest.raises(TypeError):
        be.scan("abc", 0, b"x", 10)


def test_prefix_at_end(be):
    assert be.prefix_at_end(b"qwerty\r", b"\r\n") == 1
    assert be.prefix_at_end(b"qwertydkjf", b"\r\n") == 0
    assert be.prefix_at_end(b"abc", b"bcd") == 2
    assert be.prefix_at_end(b"", b"ab") == 0
    assert be.prefix_at_end(b"a", b"ab") == 1
    assert be.prefix_at_end(b"x", b"") == -1
    assert be.prefix_at_end(bytearray(b"ab"), memoryview(b"bc")) == 1
    with pytest.raises(TypeError):
        be.prefix_at_end("ab", b"b")


# ---- packaging: the top-level build.py must not hide pypa/build -------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "build.py")),
                    reason="not a source checkout")
def test_build_py_hands_over_to_pypa_build():
    probe = subprocess.run([sys.executable, "-c", "import build"], cwd="/",
                           capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("pypa 'build' is not installed")
    # `import build` from the project root (cibuildwheel does this) gets pypa's
    code = "from build import ProjectBuilder; import build; print(build.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert os.path.abspath(proc.stdout.strip()) != os.path.join(ROOT, "build.py")
    # `python -m build --version` from the project root runs pypa's CLI
    proc = subprocess.run([sys.executable, "-m", "build", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("build "), proc.stdout
    assert not os.path.exists(os.path.join(ROOT, "_core.c"))


# -- poll_list: the stateless poll(2) ------------------------------------------

def test_poll_list_readiness_nval_and_regular_files(be, tmp_path):
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    f = open(tmp_path / "plain", "wb")
    try:
        b.send(b"x")
        gone = c.fileno()
        c.close()                                # a closed fd in the list
        ready = dict(be.poll_list({a.fileno(): be.POLLIN,
                                   d.fileno(): be.POLLIN,
                                   gone: be.POLLIN,
                                   f.fileno(): be.POLLIN | be.POLLOUT}, 0))
        assert ready[a.fileno()] & be.POLLIN
        assert ready[gone] & be.POLLNVAL
        assert ready[f.fileno()] & (be.POLLIN | be.POLLOUT) == be.POLLIN | be.POLLOUT
        assert ready[d.fileno()] & be.POLLHUP      # its peer was closed
    finally:
        for s_ in (a, b, d):
            s_.close()
        f.close()


def test_poll_list_timeout_and_empty(be):
    a, b = socket.socketpair()
    try:
        t0 = time.monotonic()
        assert be.poll_list({a.fileno(): be.POLLIN}, 50) == []
        assert time.monotonic() - t0 >= 0.04
        assert be.poll_list({}, 0) == []
    finally:
        a.close()
        b.close()


def test_sendqueue_large_bytes_then_more_keeps_order(be):
    """A big immutable push (borrowed by the C backend) followed by small
    ones: peek/consume/getvalue/send see one ordered stream."""
    q = be.SendQueue()
    big = bytes(range(256)) * 1024             # 256 KiB
    q.push(big)
    q.push(b"tail-1")
    q.push(bytearray(b"tail-2"))
    want = big + b"tail-1tail-2"
    assert len(q) == len(want) and q.getvalue() == want
    assert q.peek(10) == want[:10]
    q.consume(len(big) - 3)
    assert q.peek(9) == want[len(big) - 3:len(big) + 6]
    assert q.getvalue() == want[len(big) - 3:]
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        sent = 0
        while q:
            r = q.send(a.fileno(), 5)
            assert r > 0
            sent += r
        got = b.recv(100)
        assert got == want[len(big) - 3:]
    finally:
        a.close()
        b.close()


def test_sendqueue_copies_mutable_buffers(be):
    q = be.SendQueue()
    ba = bytearray(b"x" * 100000)
    q.push(memoryview(ba))
    ba[:5] = b"YYYYY"
    assert q.peek(5) == b"xxxxx"


# ---- fa_poll_once: the C loop's stateless poll(2) ------------------------------

def _core_or_skip():
    try:
        from fastasyncore._core import ffi, lib
    except ImportError as exc:
        if os.environ.get("FASTASYNCORE_REQUIRE_CORE") == "1":
            pytest.fail("the C core is required: %s" % exc)
        pytest.skip("the C core (fastasyncore._core) is not built: %s" % exc)
    return ffi, lib


def test_fa_poll_once_reports_ready_fds_only():
    ffi, lib = _core_or_skip()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        b.send(b"x")                       # a readable; c idle
        fds = ffi.new("int[]", [a.fileno(), lib.FA_POLLIN, c.fileno(), lib.FA_POLLIN])
        out = ffi.new("int[]", 4)
        n = lib.fa_poll_once(fds, 2, 0, out, 2)
        assert n == 1 and (out[0], out[1]) == (a.fileno(), lib.FA_POLLIN)
        # writable interest on c is reported; maxout caps the pairs written
        fds[3] = lib.FA_POLLOUT
        assert lib.fa_poll_once(fds, 2, 0, out, 1) == 1
        assert lib.fa_poll_once(fds, 2, 0, out, 2) == 2
        assert (out[2], out[3]) == (c.fileno(), lib.FA_POLLOUT)
        # a closed fd: POLLNVAL, as poll(2) (and select.poll) report it
        fd = c.fileno()
        c.close()
        fds[2], fds[3] = fd, lib.FA_POLLIN
        n = lib.fa_poll_once(fds, 2, 0, out, 2)
        assert (fd, lib.FA_POLLNVAL) in [(out[2 * i], out[2 * i + 1]) for i in range(n)]
        # nothing to watch: waits the timeout, returns 0
        t0 = time.monotonic()
        assert lib.fa_poll_once(ffi.NULL, 0, 30, out, 2) == 0
        assert time.monotonic() - t0 >= 0.02
    finally:
        for s in (a, b, d):
            s.close()


def test_fa_poll_once_many_fds_heap_path():
    ffi, lib = _core_or_skip()
    pairs = [socket.socketpair() for _ in range(100)]   # > the 64-entry stack array
    try:
        for _, w in pairs[::2]:
            w.send(b"x")
        flat = []
        for r, _ in pairs:
            flat += [r.fileno(), lib.FA_POLLIN]
        fds = ffi.new("int[]", flat)
        out = ffi.new("int[]", 200)
        n = lib.fa_poll_once(fds, 100, 0, out, 100)
        assert sorted(out[2 * i] for i in range(n)) == sorted(r.fileno() for r, _ in pairs[::2])
    finally:
        for r, w in pairs:
            r.close()
            w.close()
