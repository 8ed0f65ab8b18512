"""F6b-F6f (docs/reliability.md): one bad fd never stops the loop.

A fault in one channel's fd stays in that channel: it reaches the channel as
3.11 routes an OSError from its socket (handle_close() for the disconnect
errnos, EBADF among them; handle_error() otherwise), once, and the other
channels are served in the same iteration.  Every case runs on each backend
case (pure, cffi with the C loop, cffi with the Python loop), in both
``use_poll`` modes and both wait strategies (persistent poller, stateless
poll), unless it is about one of them.
"""

import errno
import os
import socket
import sys
import time

import pytest

from fastasyncore import _loop, asyncore

pytestmark = pytest.mark.timeout(30)


def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class Chan(asyncore.dispatcher):
    """Records its hooks; handle_close()/handle_error() close unless told not to."""

    def __init__(self, sock, name, log, map, closes=True):
        super().__init__(sock, map=map)
        self.name = name
        self.log = log
        self.closes = closes

    def writable(self):
        return False

    def handle_read(self):
        self.log.append((self.name, "read", self.recv(100)))

    def handle_close(self):
        self.log.append((self.name, "close"))
        if self.closes:
            self.close()

    def handle_error(self):
        exc = sys.exc_info()[1]
        self.log.append((self.name, "error", getattr(exc, "errno", exc)))
        if self.closes:
            self.close()


class Managed(asyncore.dispatcher):
    """Keeps the stock predicates (the managed path)."""

    def __init__(self, sock, name, log, map):
        super().__init__(sock, map=map)
        self.name = name
        self.log = log

    def handle_read(self):
        self.log.append((self.name, "read", self.recv(100)))

    def handle_write(self):
        pass

    def handle_close(self):
        self.log.append((self.name, "close"))
        self.close()


@pytest.fixture(params=[Chan, Managed], ids=["consulted", "managed"])
def chan_cls(request):
    return request.param


def test_f6b_closed_before_the_poller_exists(backend, use_poll, loop_mode, chan_cls):
    # The case: A's socket closed behind A (fileno() -1) before the
    # map's first loop(); the poller that loop creates gets A's old number.
    m, log = {}, []
    a, a_peer = pair()
    b, b_peer = pair()
    A = chan_cls(a, "A", log, m)
    B = chan_cls(b, "B", log, m)
    old = A._fileno
    a.close()
    assert A.socket.fileno() == -1
    b_peer.send(b"x")
    try:
        asyncore.loop(timeout=0.1, use_poll=use_poll, map=m, count=1)
        # A: handle_close() once (EBADF); B served in the same iteration
        assert log == [("A", "close"), ("B", "read", b"x")]
        assert m == {B._fileno: B}
        st = _loop._states.get(id(m))
        if st is not None and st.poller is not None and st.poller.fileno() == old:
            # the number A held is the poller's now: never registered
            assert old not in st.mask
    finally:
        asyncore.close_all(map=m, ignore_all=True)
        a_peer.close()
        b_peer.close()


def test_f6c_number_reused_by_a_socket_not_in_the_map(backend, use_poll, loop_mode):
    m, log = {}, []
    a, a_peer = pair()
    b, b_peer = pair()
    A = Chan(a, "A", log, m)
    B = Chan(b, "B", log, m)
    old = A._fileno
    a.close()
    other, other_peer = pair()      # takes the lowest free number: A's
    try:
        if other.fileno() != old:
            pytest.skip("the new socket did not get the freed number here")
        other_peer.send(b"not ours")
        b_peer.send(b"y")
        asyncore.loop(timeout=0.1, use_poll=use_poll, map=m, count=3)
        assert log == [("A", "close"), ("B", "read", b"y")]
        # never watched, never read, never closed by us
        assert other.fileno() == old
        assert other.recv(100) == b"not ours"
        other.send(b"still open")
        assert other_peer.recv(100) == b"still open"
    finally:
        asyncore.close_all(map=m, ignore_all=True)
        for s in (a_peer, b_peer, other, other_peer):
            s.close()


def test_f6d_closed_channel_that_stays_is_told_once_and_never_spins(backend, use_poll, loop_mode):
    # handle_close() that does not close: the channel stays in the map,
    # silent (3.11 would get EBADF from select() at every iteration).
    m, log = {}, []
    a, a_peer = pair()
    b, b_peer = pair()
    A = Chan(a, "A", log, m, closes=False)
    B = Chan(b, "B", log, m)
    a.close()
    try:
        t0 = time.monotonic()
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=4)
        assert log == [("A", "close")]
        assert time.monotonic() - t0 >= 0.15    # every iteration waited
        b_peer.send(b"z")
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=2)
        assert log == [("A", "close"), ("B", "read", b"z")]
        assert m == {A._fileno: A, B._fileno: B}
        # leaving the map and coming back (a new channel at the number) is a
        # new meeting: told again
        del m[A._fileno]
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        m[A._fileno] = A
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        assert log.count(("A", "close")) == 2
    finally:
        asyncore.close_all(map=m, ignore_all=True)
        a_peer.close()
        b_peer.close()


class Duck:
    """A duck-typed channel with no socket: only its key names its fd."""

    def __init__(self, log):
        self.log = log
        self.accepting = False

    def readable(self):
        return True

    def writable(self):
        return False

    def handle_read_event(self):
        self.log.append(("duck", "read"))

    def handle_write_event(self):
        self.log.append(("duck", "write"))

    def handle_expt_event(self):
        self.log.append(("duck", "expt"))

    def handle_close(self):
        self.log.append(("duck", "close"))

    def handle_error(self):
        exc = sys.exc_info()[1]
        self.log.append(("duck", "error", getattr(exc, "errno", exc)))


def test_f6e_map_key_is_the_pollers_own_fd(backend, use_poll):
    # A stale key whose number is the persistent poller's own fd: registering
    # it would ask epoll to watch itself (EINVAL).  handle_error() once, with
    # that OSError; the others are served in the same iteration; no spin.
    _loop._force_mode = "persistent"
    m, log = {}, []
    b, b_peer = pair()
    B = Chan(b, "B", log, m)
    pfd = None
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        st = _loop._states[id(m)]
        pfd = st.poller.fileno()
        if pfd < 0:
            pytest.skip("this poller kind has no fd of its own")
        m[pfd] = Duck(log)
        b_peer.send(b"w")
        t0 = time.monotonic()
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=4)
        assert log[0] == ("duck", "error", errno.EINVAL)
        assert ("B", "read", b"w") in log
        assert log.count(("duck", "error", errno.EINVAL)) == 1
        assert len(log) == 2
        assert time.monotonic() - t0 >= 0.1     # no spin on the silent fd
        assert os.fstat(pfd)                    # our poller is intact ...
        b_peer.send(b"v")
        asyncore.loop(timeout=0.1, use_poll=use_poll, map=m, count=1)
        assert log[-1] == ("B", "read", b"v")   # ... and still works
    finally:
        _loop._force_mode = None
        m.pop(pfd, None)
        asyncore.close_all(map=m, ignore_all=True)
        b_peer.close()


def test_f6e_default_handle_error_closes_only_that_channel(backend, use_poll, capsys):
    # The stock handle_error() (log, then handle_close() -> close()) on a
    # dispatcher whose fd number is the poller's: the poller survives it.
    _loop._force_mode = "persistent"
    m, log = {}, []
    b, b_peer = pair()
    B = Chan(b, "B", log, m)
    x, x_peer = pair()
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        pfd = _loop._states[id(m)].poller.fileno()
        if pfd < 0:
            pytest.skip("this poller kind has no fd of its own")

        class Stale(asyncore.dispatcher):
            def handle_read(self):
                pass
        # A dispatcher registered under the poller's number (as when its
        # socket was closed and the number taken): its own socket is x, so
        # close() closes x, not the number.
        s = Stale(map={})
        s.set_socket(x, map={})
        s._fileno = pfd
        s._map = m
        m[pfd] = s
        b_peer.send(b"q")
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=3)
        assert pfd not in m                    # handle_error -> handle_close -> close
        assert log == [("B", "read", b"q")]
        assert "uncaptured python exception" in capsys.readouterr().out
        assert os.fstat(pfd)
    finally:
        _loop._force_mode = None
        asyncore.close_all(map=m, ignore_all=True)
        b_peer.close()
        x_peer.close()


def test_f6f_poller_reports_a_refused_fd_once(backend):
    # The backend interface itself (docs/backend-interface.md): a refusal
    # other than EBADF/EPERM is reported once as POLLFAULT | errno << 16, is
    # not retried on an interest change, and is cleared by removal.
    kinds = [k for k in backend.POLLER_KINDS if k in ("epoll", "kqueue")]
    if not kinds:
        pytest.skip("no epoll/kqueue here")
    p = backend.Poller(kinds[0])
    a, b = pair()
    try:
        own = p.fileno()
        p.modify(a.fileno(), backend.POLLIN)
        p.modify(own, backend.POLLIN)
        b.send(b"1")
        fault = backend.POLLFAULT | errno.EINVAL << backend.FAULT_SHIFT
        assert sorted(p.wait(1000)) == sorted([(own, fault), (a.fileno(), backend.POLLIN)])
        assert p.wait(0) == [(a.fileno(), backend.POLLIN)]
        p.modify(own, backend.POLLIN | backend.POLLOUT)     # not retried
        assert p.wait(0) == [(a.fileno(), backend.POLLIN)]
        p.modify(own, 0)
        p.modify(own, backend.POLLIN)                       # a new registration
        assert sorted(p.wait(0)) == sorted([(own, fault), (a.fileno(), backend.POLLIN)])
    finally:
        p.close()
        a.close()
        b.close()
