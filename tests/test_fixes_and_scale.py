"""Deliberate differences from 3.11 (docs/compatibility.md) and O(active) iterations."""

import socket
import sys

import pytest



@pytest.fixture(autouse=True)
def _both_loop_modes(loop_mode):
    """Every test here runs with the persistent poller and the stateless poll."""

def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


# -- bpo-30931: an event is never delivered to a new owner of a reused fd --------

def _stale_event_run(asyncore, use_poll):
    m = {}
    log = []
    peers = []
    holder = {}

    class Victim(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            log.append("%s.read" % self.name)
            other = holder["b"] if self is holder["a"] else holder["a"]
            if other.socket is not None and other._fileno is not None:
                old_fd = other._fileno
                other.close()
                # The next socket gets the lowest free fd: the one just closed.
                c_sock, c_peer = pair()
                peers.append(c_peer)
                c = New(c_sock, map=m)
                holder["c_fd_reused"] = c._fileno == old_fd
            self.recv(10)

        def handle_error(self):
            log.append("%s.error:%s" % (self.name, sys.exc_info()[0].__name__))
            self.close()

    class New(asyncore.dispatcher):
        name = "C"

        def writable(self):
            return False

        def handle_read(self):
            log.append("C.read")
            self.recv(10)

        def handle_error(self):
            log.append("C.error:%s" % sys.exc_info()[0].__name__)
            self.close()

    for name in "ab":
        s, peer = pair()
        peers.append(peer)
        d = Victim(s, map=m)
        d.name = name.upper()
        holder[name] = d
        peer.send(b"x")
    asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=1)
    asyncore.close_all(map=m)
    for p in peers:
        p.close()
    return log, holder.get("c_fd_reused")


def test_stale_event_not_delivered_to_new_owner(backend, use_poll):
    from fastasyncore import asyncore
    log, reused = _stale_event_run(asyncore, use_poll)
    assert reused, "test setup: C did not land on the closed fd"
    assert len(log) == 1 and log[0] in ("A.read", "B.read")


def test_stale_event_stdlib_reference(use_poll):
    if sys.version_info >= (3, 12):
        pytest.skip("stdlib asyncore was removed in 3.12")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import asyncore
    log, reused = _stale_event_run(asyncore, use_poll)
    assert reused
    # 3.11 hands B's event to C, whose recv raises BlockingIOError.
    assert "C.read" in log and "C.error:BlockingIOError" in log


# -- del_channel removes only its own entry ------------------------------------

def test_stale_dispatcher_close_keeps_new_owner(impl):
    asyncore = impl.asyncore
    m = {}
    s, peer = pair()
    old = asyncore.dispatcher(s, map=m)
    fd = old._fileno
    s.close()                               # closed behind the dispatcher
    s2, peer2 = pair()
    assert s2.fileno() == fd
    new = asyncore.dispatcher(s2, map=m)
    old._fileno = fd                        # as if old never noticed
    old.del_channel()
    try:
        if impl.name == "stdlib":
            assert fd not in m              # 3.11 removes the new owner
        else:
            assert m.get(fd) is new
    finally:
        asyncore.close_all(map=m)
        for p in (peer, peer2):
            p.close()


# -- no handler runs after close() in the same iteration ------------------------

def test_close_then_no_more_handlers_in_iteration(impl):
    asyncore = impl.asyncore
    m = {}
    s, peer = pair()
    log = []

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            log.append("read")
            self.recv(10)            # b"" -> handle_close

        def handle_close(self):
            log.append("close")
            self.close()

    D(s, map=m)
    peer.close()                     # socketpair: EOF + POLLHUP together
    asyncore.loop(timeout=0.5, use_poll=True, map=m, count=1)
    if impl.name == "stdlib":
        assert log == ["read", "close", "close"]
    else:
        assert log == ["read", "close"]


# -- O(active): idle managed channels cost no Python calls ----------------------

def _idle_channels(asyncore, asynchat, n, m, kind):
    chans, peers = [], []

    class Chat(asynchat.async_chat):
        def collect_incoming_data(self, data):
            pass

        def found_terminator(self):
            pass

    for i in range(n):
        s, peer = pair()
        peers.append(peer)
        if kind == "chat":
            c = Chat(s, map=m)
            c.set_terminator(b"\n")
        else:
            c = asyncore.dispatcher_with_send(s, map=m)
        chans.append(c)
    return chans, peers


@pytest.mark.parametrize("kind", ["chat", "with_send"])
def test_idle_managed_channels_are_not_called(backend, use_poll, kind):
    from fastasyncore import asyncore, asynchat
    m = {}
    chans, peers = _idle_channels(asyncore, asynchat, 1000, m, kind)
    ids = {id(c) for c in chans}
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)   # warm up
        calls = []

        def prof(frame, event, arg):
            if event == "call" and id(frame.f_locals.get("self")) in ids:
                calls.append(frame.f_code.co_name)

        sys.setprofile(prof)
        try:
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        finally:
            sys.setprofile(None)
        assert calls == []
        # ...and they still work: push on one of them goes out.
        if kind == "chat":
            chans[7].push(b"ping\n")
        else:
            chans[7].send(b"ping\n")
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
        assert peers[7].recv(100) == b"ping\n"
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()


def test_overriding_channels_are_asked_like_stdlib(impl, use_poll):
    asyncore = impl.asyncore
    m, peers = {}, []
    counts = {"r": 0, "w": 0}

    class Docs(asyncore.dispatcher):
        def readable(self):
            counts["r"] += 1
            return True

        def writable(self):
            counts["w"] += 1
            return False

    for _ in range(50):
        s, peer = pair()
        peers.append(peer)
        Docs(s, map=m)
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)
        assert counts == {"r": 150, "w": 150}
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()


def test_no_fd_leak_per_map(backend):
    """Pollers of maps that emptied are released (tests create many maps)."""
    import os
    from fastasyncore import asyncore
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        m = {}
        s, peer = pair()
        d = asyncore.dispatcher(s, map=m)
        d.writable = lambda: False
        asyncore.loop(timeout=0, map=m, count=1)
        d.close()
        peer.close()
    assert len(os.listdir("/proc/self/fd")) - before < 5


def test_predicate_assigned_on_instance_later_is_honoured(impl, use_poll):
    """A managed channel that later gets its own readable() is asked again."""
    asyncore = impl.asyncore
    m = {}
    s, peer = pair()
    d = asyncore.dispatcher_with_send(s, map=m)
    d.handle_read = lambda: d.recv(10)
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
        calls = []
        d.readable = lambda: calls.append("r") or True
        peer.send(b"x")                       # an event, then the next turns
        asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=4)
        assert len(calls) >= 3
    finally:
        asyncore.close_all(map=m)
        peer.close()


def _channels(cls, n, m, peers):
    """n cls(sock, map=m) over socketpairs; their peers go to peers."""
    chans = []
    for _ in range(n):
        s, peer = pair()
        peers.append(peer)
        chans.append(cls(s, map=m))
    return chans


def test_vectorized_consult_sees_changed_answers(backend, use_poll):
    """Many docs-pattern channels: only the one whose answer flips writes."""
    from fastasyncore import asyncore
    m, peers, writes = {}, [], []

    class Docs(asyncore.dispatcher):
        want = False

        def writable(self):
            return self.want

        def handle_write(self):
            writes.append(self._fileno)
            self.want = False

    chans = _channels(Docs, 30, m, peers)
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)
        assert writes == []
        chans[17].want = True
        asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=3)
        assert writes == [chans[17]._fileno]
        chans[3].want = chans[29].want = True
        asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=3)
        assert sorted(writes[1:]) == sorted([chans[3]._fileno, chans[29]._fileno])
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()


def test_consult_switches_between_vectorized_and_plain_loop(backend, use_poll):
    """Many flipping answers use the plain loop, stable ones the vectorized
    pass (MapState.consult(); the C loop's consult always takes its
    vectorized pass); either way every answer is honoured in the next
    wait."""
    from fastasyncore import asyncore, _loop
    py_consult = backend.NAME == "pure" or _loop.loop_impl() == "py"
    m, peers, writes = {}, [], []

    class Docs(asyncore.dispatcher):
        mode = "off"

        def writable(self):
            if self.mode == "flip":
                self.flip = not getattr(self, "flip", False)
                return self.flip
            return self.mode == "on"

        def handle_write(self):
            writes.append(self._fileno)

    chans = _channels(Docs, 20, m, peers)
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)
        st = _loop._states[id(m)]
        assert st.cvec is not None and st.cvec_on and writes == []
        for c in chans:
            c.mode = "flip"
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=4)
        assert st.cvec_on is not py_consult    # most answers flip: plain loop
        assert len(writes) == 2 * len(chans)   # every other iteration, each
        for _ in range(3):      # still flipping: it stays with the plain loop
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
            assert st.cvec_on is not py_consult
        for c in chans:
            c.mode = "off"
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)
        assert st.cvec_on                      # stable again: vectorized
        del writes[:]
        chans[7].mode = "on"
        asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=2)
        assert writes == [chans[7]._fileno] * 2
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()


def test_plain_loop_with_flipping_readable_answers(backend, use_poll):
    """The readable() side of the same switch: channels that override only
    readable(), their answers flipping, stay with the plain loop in the
    Python consult, and each answer holds for the next wait (a read every
    other iteration: the unread byte keeps the fd ready)."""
    from fastasyncore import asyncore, _loop
    py_consult = backend.NAME == "pure" or _loop.loop_impl() == "py"
    m, peers, reads = {}, [], []

    class Flip(asyncore.dispatcher):
        on = False

        def readable(self):
            self.on = not self.on
            return self.on

        def handle_read(self):
            reads.append(self._fileno)      # (no recv: stays readable)

        def handle_write(self):
            pass

    chans = _channels(Flip, 20, m, peers)
    try:
        for p in peers:
            p.send(b"x")
        st = None
        for i in range(6):
            asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=1)
            st = st or _loop._states[id(m)]
            if i >= 2:
                assert st.cvec_on is not py_consult
        assert sorted(reads) == sorted([c._fileno for c in chans] * 3)
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()


def test_adding_a_channel_adopts_only_that_channel(backend, use_poll, monkeypatch):
    """A channel added to a running map is adopted alone: the loop does not
    walk the whole map for it (it did whenever the map's size changed, so
    every accept() cost O(channels))."""
    from fastasyncore import asyncore, _loop
    m, peers, adopted = {}, [], []

    class Docs(asyncore.dispatcher):
        def writable(self):
            return False

    _channels(Docs, 30, m, peers)
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
        adopt = _loop.MapState._adopt

        def counting(self, fd, obj):
            adopted.append(fd)
            return adopt(self, fd, obj)

        monkeypatch.setattr(_loop.MapState, "_adopt", counting)
        # StateBase.reconcile (C, where built) calls its own _adopt, not the
        # class attribute: count through the Python reference, which
        # test_bookkeeping.py holds the C one to
        monkeypatch.setattr(_loop.MapState, "reconcile", _loop._PyBookkeeping.reconcile)
        new = _channels(Docs, 1, m, peers)
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        assert adopted == [new[0]._fileno]
        # a key set on the map itself (no add_channel) is still found
        extra = _channels(Docs, 1, {}, peers)[0]
        m[extra._fileno] = extra
        del adopted[:]
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        assert extra._fileno in adopted
        assert _loop._states[id(m)].owner.get(extra._fileno) is extra
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()


def test_channels_added_together_are_asked_in_map_order(backend, use_poll):
    """Channels added between two iterations are asked in map order, as
    3.11 asks them (not in the order the loop heard of them)."""
    from fastasyncore import asyncore
    m, peers, asked = {}, [], []

    class Docs(asyncore.dispatcher):
        def writable(self):
            asked.append(self._fileno)
            return False

    _channels(Docs, 3, m, peers)
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        socks = [pair() for _ in range(6)]
        for s, p in reversed(socks):        # map order: descending fds
            peers.append(p)
            Docs(s, map=m)
        del asked[:]
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        assert asked == list(m)
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()
