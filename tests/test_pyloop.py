"""The Python loop's own machinery: _loop.run() (the Python twin of
_cloop.run, used by loop()/poll()/poll2() where the C loop is not), the
select.poll it keeps in line with the interest set for the stateless wait,
and the single-pass select-mode dispatch that freezes the wait's owners and
masks when a handler changes them.

Runs on the pure backend and on the cffi backend with the Python loop
("cffi-pyloop"); the comparisons with the C loop run where _cloop is built.
"""

import random
import socket
import threading

import pytest

from conftest import backend_case
from fastasyncore import _backend, _loop, _pure


@pytest.fixture(params=["pure", "cffi-pyloop"])
def pyloop(request):
    """fastasyncore.asyncore with the Python loop, on each backend."""
    with backend_case(request.param):
        if _loop.loop_impl() != "py":        # cffi without _cloop: "cffi" is it
            _loop.set_loop("py")
        from fastasyncore import asyncore
        yield asyncore


def _have_cloop():
    try:
        from fastasyncore import _cloop  # noqa: F401
        from fastasyncore import _cffi  # noqa: F401
        return True
    except ImportError:
        return False


class Socks:
    def __init__(self):
        self.all = []

    def pair(self):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
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
    s = Socks()
    yield s
    s.close()


def _reader(asyncore, log, name):
    class R(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            log.append((name, self.recv(100)))

    return R


# ---------------------------------------------------------------------------
# run(): one MapState held for the whole loop() call

def test_loop_runs_in_one_call_of_run(pyloop, use_poll, socks, monkeypatch):
    asyncore = pyloop
    m, log = {}, []
    s, p = socks.pair()
    _reader(asyncore, log, "a")(s, map=m)
    calls = []
    real = _loop.run
    monkeypatch.setattr(_loop, "run", lambda *a: (calls.append(a[2:]), real(*a)))
    p.send(b"x")
    asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=3)
    assert log == [("a", b"x")]
    assert calls == [(not use_poll, 3)]
    # poll()/poll2(): one iteration, through run() as well
    (asyncore.poll2 if use_poll else asyncore.poll)(0, m)
    assert calls[-1] == (not use_poll, 1)
    asyncore.close_all(map=m)


def test_state_held_for_the_call_and_given_back(pyloop, use_poll, socks):
    asyncore = pyloop
    m, seen = {}, []
    s, p = socks.pair()

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            self.recv(10)
            seen.append(_loop._states[id(m)].thread)

    D(s, map=m)
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)   # a state exists
    st = _loop._states[id(m)]
    assert st.thread is None
    for _ in range(3):
        p.send(b"x")
        asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=1)
    assert seen == [threading.get_ident()] * 3
    assert st.thread is None
    asyncore.close_all(map=m)


def test_iterations_counted_as_poll_once_counts_them(pyloop, use_poll, socks):
    asyncore = pyloop
    counts = []
    for how in ("run", "poll_once"):
        m = {}
        s, p = socks.pair()
        _reader(asyncore, [], "a")(s, map=m)
        if how == "run":
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=5)
        else:
            for _ in range(5):
                _loop.poll_once(m, 0, not use_poll)
        st = _loop._states[id(m)]
        counts.append((st.iters, st.adapt_at))
        asyncore.close_all(map=m)
    assert counts[0] == counts[1] == (5, _loop._ADAPT_FIRST)


def test_exception_gives_the_state_back(pyloop, use_poll, socks):
    asyncore = pyloop
    m = {}
    s, p = socks.pair()

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            self.recv(10)
            raise asyncore.ExitNow("out")

    D(s, map=m)
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)
    st = _loop._states[id(m)]
    iters = st.iters
    p.send(b"x")
    with pytest.raises(asyncore.ExitNow):
        asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=5)
    assert st.thread is None
    assert st.iters == iters + 1          # the iteration that raised counts
    asyncore.close_all(map=m)


def test_emptied_map_is_forgotten(pyloop, use_poll, socks):
    asyncore = pyloop
    m = {}
    s, p = socks.pair()

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            self.recv(10)
            self.close()

    D(s, map=m)
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
    assert id(m) in _loop._states
    p.send(b"x")
    asyncore.loop(timeout=0.5, use_poll=use_poll, map=m)       # until empty
    assert not m and id(m) not in _loop._states


def test_state_of_another_thread_raises(pyloop, use_poll, socks):
    asyncore = pyloop
    m = {}
    s, p = socks.pair()
    _reader(asyncore, [], "a")(s, map=m)
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
    st = _loop._states[id(m)]
    st.thread = threading.get_ident() + 1          # "another thread" polls it
    try:
        with pytest.raises(RuntimeError, match="two threads"):
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
    finally:
        st.thread = None
    asyncore.close_all(map=m)


def test_state_replaced_under_the_loop(pyloop, use_poll, socks):
    """A fork (here: its handler) drops every state while loop() runs: the
    next iteration gives the old one back and builds a new one, as in C."""
    asyncore = pyloop
    m, log = {}, []
    s, p = socks.pair()

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            data = self.recv(10)
            log.append(data)
            if data == b"fork":
                _loop._after_fork_in_child()

    D(s, map=m)
    asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
    old = _loop._states[id(m)]
    p.send(b"fork")
    asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=1)
    assert old.thread is None and id(m) not in _loop._states
    p.send(b"more")
    asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=3)
    new = _loop._states[id(m)]
    assert new is not old and new.thread is None
    assert log == [b"fork", b"more"]
    asyncore.close_all(map=m)


# ---------------------------------------------------------------------------
# the select.poll of the stateless wait stays in line with the mask

def _same_as_poll_list(st):
    assert sorted(st.spoll.poll(0)) == sorted(_pure.poll_list(st.mask, 0))


@pytest.mark.parametrize("seed", range(4))
def test_stateless_poll_object_follows_the_mask(pyloop, use_poll, socks, seed):
    asyncore = pyloop
    rnd = random.Random(seed)
    m = {}
    chans = []

    class Flip(asyncore.dispatcher):
        r = w = True

        def readable(self):
            return self.r

        def writable(self):
            return self.w

        def handle_read(self):
            self.recv(100)

        def handle_write(self):
            pass

    class Managed(asyncore.dispatcher_with_send):
        def handle_read(self):
            self.recv(100)

    def new():
        s, p = socks.pair()
        cls = rnd.choice([Flip, Managed])
        d = cls(s, map=m)
        if rnd.random() < 0.5:
            p.send(b"x")
        chans.append((d, p))

    for _ in range(12):
        new()
    _loop._force_mode = "rebuild"
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
        st = _loop._states[id(m)]
        assert st.poller is None
        for step in range(60):
            op = rnd.random()
            d, p = rnd.choice(chans)
            if op < 0.4 and isinstance(d, Flip):
                d.r, d.w = rnd.random() < 0.5, rnd.random() < 0.5
            elif op < 0.5 and d in m.values():
                d.close()
            elif op < 0.6:
                new()
            elif op < 0.7 and isinstance(d, Managed) and d.connected:
                d.out_buffer = b"y" * rnd.randrange(2)
            elif op < 0.8:
                try:
                    p.send(b"z")
                except OSError:
                    pass
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=rnd.randrange(1, 3))
            if m:
                st = _loop._states[id(m)]
                if st.spoll is not None:
                    _same_as_poll_list(st)
    finally:
        _loop._force_mode = None
        asyncore.close_all(map=m)


@pytest.mark.skipif(not _have_cloop(), reason="needs fastasyncore._cloop")
def test_stateless_poll_object_rebuilt_after_the_c_loop(use_poll, socks):
    """The C loop changes the mask without flush(): the Python loop that
    takes the state next must not wait on its stale select.poll."""
    with backend_case("cffi"):
        from fastasyncore import asyncore
        m, log = {}, []
        hold = False

        class Docs(asyncore.dispatcher):
            buffer = b""

            def writable(self):
                return bool(self.buffer)

            def handle_read(self):
                log.append(self.recv(10))

            def handle_write(self):
                sent = self.send(self.buffer)
                if not hold:
                    self.buffer = self.buffer[sent:]

        chans = []
        for _ in range(4):
            s, p = socks.pair()
            chans.append((Docs(s, map=m), p))
        _loop._force_mode = "rebuild"
        try:
            _loop.set_loop("py")
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)
            st = _loop._states[id(m)]
            assert st.spoll is not None
            _loop.set_loop("c")
            _loop._force_mode = None            # (pinned, C calls _prepare() each time)
            assert st.poller is None            # a small map: adapt() keeps it so
            hold = True                         # writable from now on
            for d, p in chans:
                d.buffer = b"out"
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)
            assert all(p.recv(100).startswith(b"out") for d, p in chans)
            assert st.spoll is None              # stale, so the C loop dropped it
            _loop.set_loop("py")
            hold = False
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
            assert all(p.recv(100).startswith(b"out") for d, p in chans)
            assert all(not d.buffer for d, p in chans)
            chans[0][1].send(b"in")
            asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=2)
            assert log == [b"in"]
            _same_as_poll_list(st)
        finally:
            _loop._force_mode = None
            _loop.set_loop("auto")
            asyncore.close_all(map=m)


# ---------------------------------------------------------------------------
# select mode: the events go to the owners, through the masks, of the wait

def _freeze_scenario(asyncore, socks, nested):
    m, log = {}, []
    made = []

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            data = self.recv(10)
            log.append((self.tag, data))
            if self.tag == "a":
                b, c = self.others
                # b leaves the map and comes back: its event is still its own
                b.del_channel()
                b.set_socket(b.socket)
                # c is closed for good; a new channel may take its fd number
                c.close()
                if nested:
                    s, p = socks.pair()
                    d = D(s, map=m)
                    d.tag = "d"
                    made.append(d)
                    asyncore.loop(timeout=0, use_poll=False, map=m, count=1)

        def handle_close(self):
            log.append((self.tag, "close"))
            self.close()

        def handle_error(self):
            log.append((self.tag, "error"))
            self.close()

    chans = []
    for tag in "abc":
        s, p = socks.pair()
        d = D(s, map=m)
        d.tag = tag
        chans.append((d, p))
    chans[0][0].others = (chans[1][0], chans[2][0])
    asyncore.loop(timeout=0, use_poll=False, map=m, count=2)
    for d, p in chans:
        p.send(d.tag.encode())
    asyncore.loop(timeout=0.5, use_poll=False, map=m, count=1)
    asyncore.close_all(map=m)
    return log, [d._fileno for d in made]


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested-loop"])
def test_select_dispatch_uses_the_owners_of_the_wait(pyloop, socks, loop_mode, nested):
    log, _ = _freeze_scenario(pyloop, socks, nested)
    # a first; b re-added itself and still gets its read; c was closed
    assert log[0] == ("a", b"a")
    assert ("b", b"b") in log
    assert not any(t == "c" for t, _ in log)
    assert not any(t == "d" for t, _ in log)     # c's event is not d's


@pytest.mark.skipif(not _have_cloop(), reason="needs fastasyncore._cloop")
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested-loop"])
def test_select_dispatch_matches_the_c_loop(socks, loop_mode, nested):
    out = {}
    for which in ("c", "py"):
        with backend_case("cffi"):
            _loop.set_loop(which)
            try:
                from fastasyncore import asyncore
                out[which] = _freeze_scenario(asyncore, socks, nested)[0]
            finally:
                _loop.set_loop("auto")
    assert out["c"] == out["py"]


# ---------------------------------------------------------------------------
# _keys: the map's own key object per fd number, for identity hits in the
# dispatch's dict lookups

def test_high_fds_dispatch_with_the_maps_own_keys(pyloop, use_poll, socks):
    # fds above 256 are not shared int objects: the dispatch swaps the
    # wait's fd for the map's key.  Events still reach exactly their owners,
    # and every entry of _keys stays an int equal to its index (a stale one
    # is only slower, never wrong).
    import os
    pad = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]   # fds above 256
    try:
        log, m = [], {}
        a, b = socks.pair()
        c, d = socks.pair()
        R = _reader(pyloop, log, None)
        ra, rc = R(a, map=m), R(c, map=m)
        assert min(a.fileno(), c.fileno()) > 256
        ra.name, rc.name = "a", "c"
        R.handle_read = lambda self: log.append((self.name, self.recv(100)))
        b.send(b"x")
        d.send(b"y")
        for _ in range(20):
            pyloop.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
            if len(log) == 2:
                break
        assert sorted(log) == [("a", b"x"), ("c", b"y")]
        for fd in (a.fileno(), c.fileno()):
            assert _loop._keys[fd] is next(k for k in m if k == fd)
        assert all(type(k) is int and k == i for i, k in enumerate(_loop._keys))
        pyloop.close_all(map=m)
    finally:
        for fd in pad:
            os.close(fd)
