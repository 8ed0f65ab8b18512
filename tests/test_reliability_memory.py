"""Reliability §4.5 (memory safety of the C part, threads, leaks): M1..M5, L6.

M2 is a Hypothesis state machine driving each backend's SendQueue over a real
socketpair (random pushes, partial sends of 0/1/n-1/n/n+1/huge bytes,
would-block, peer reset) against a bytearray model.  M6 (fallback parity) is
the ``backend``/``impl`` parametrisation of every test plus
tests/test_differential.py.
"""

import errno
import gc
import os
import socket
import sys
import threading
import time
import weakref

import pytest

from reliability_helpers import pair, pump, drain, open_fds

try:
    from hypothesis import settings, strategies as st, HealthCheck
    from hypothesis.stateful import (RuleBasedStateMachine, rule, invariant,
                                     precondition, initialize)
except ImportError:          # pragma: no cover
    RuleBasedStateMachine = None


# -- M1: object lifetime across the wait -----------------------------------------------

def test_m1_close_and_collect_other_dispatcher_mid_iteration(backend, use_poll):
    from fastasyncore import asyncore
    m = {}
    log = []
    refs = {}
    peers = []

    class D(asyncore.dispatcher):
        def writable(self):
            return True

        def handle_read(self):
            log.append((self.name, "read"))
            self.recv(10)
            other = refs.pop("other" if self.name == "first" else "first", None)
            if other is not None:
                w = weakref.ref(other)
                other.close()
                del other
                gc.collect()
                refs["weak"] = w

        def handle_write(self):
            log.append((self.name, "write"))

    for name in ("first", "other"):
        s, p = pair()
        peers.append(p)
        d = D(s, map=m)
        d.name = name
        refs[name] = d
        p.send(b"x")
    del d
    try:
        asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=1)
        names = {n for n, _ in log}
        assert len(names) == 1                   # the closed one got nothing
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
        gc.collect()
        assert refs["weak"]() is None            # freed once the iteration ended
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()


def test_m1_close_self_in_read_with_pollout_pending(backend, use_poll):
    from fastasyncore import asyncore
    m = {}
    s, peer = pair()
    log = []

    class D(asyncore.dispatcher):
        def writable(self):
            return True

        def handle_read(self):
            log.append("read")
            self.close()

        def handle_write(self):
            log.append("write")

    w = weakref.ref(D(s, map=m))
    peer.send(b"x")
    asyncore.loop(timeout=0.5, use_poll=use_poll, map=m, count=1)
    gc.collect()
    assert log == ["read"]
    assert w() is None and not m
    peer.close()


def test_m1_bytearray_resized_from_thread_while_sending(backend):
    """Another thread resizes a queued bytearray while the loop sends: never a
    crash; a resize either happens (the new bytes go out) or raises BufferError."""
    from fastasyncore import asyncore, asynchat
    m = {}
    s, peer = socket.socketpair()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setblocking(False)

    class Chat(asynchat.async_chat):
        def handle_error(self):
            raise

    c = Chat(s, map=m)
    shared = [bytearray(b"a" * 5000) for _ in range(50)]
    stop = threading.Event()
    outcomes = {"ok": 0, "BufferError": 0}

    def mutate():
        i = 0
        while not stop.is_set():
            ba = shared[i % len(shared)]
            try:
                # Grow and shrink around 5,000 bytes, so no buffer grows
                # without bound however fast this thread runs (3.11 re-slices
                # a queued bytearray per send: a huge one drains slowly).
                if len(ba) < 5000:
                    ba.extend(b"b" * 100)
                else:
                    del ba[-50:]
                outcomes["ok"] += 1
            except BufferError:
                outcomes["BufferError"] += 1
            i += 1
            if i % 64 == 0:
                time.sleep(0)

    t = threading.Thread(target=mutate)
    t.start()
    got = bytearray()
    try:
        for ba in shared:
            c.push(ba)
        for _ in range(3000):
            asyncore.loop(timeout=0, map=m, count=1)
            drain(peer, got)
            if not c.producer_fifo:
                break
        # The mutator only grows half of the buffers: stop it, then let the
        # queue drain (bounded) before judging what went out.
        stop.set()
        t.join(5)
        deadline = time.monotonic() + 10
        while c.producer_fifo and time.monotonic() < deadline:
            asyncore.loop(timeout=0.01, map=m, count=1)
            drain(peer, got)
    finally:
        stop.set()
        t.join(5)
        asyncore.close_all(map=m)
        peer.close()
    assert not c.producer_fifo
    assert set(got) <= {ord("a"), ord("b")}
    assert outcomes["ok"] > 0


# -- M2: SendQueue state machine (C buffers vs a bytearray model) --------------------

def _sendq_machine(backend_name):
    class SendQueueMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            from fastasyncore import _backend
            try:
                self.mod = _backend.load(backend_name)
            except ImportError:
                pytest.skip("the C core is not built")
            if self.mod.NAME != backend_name:
                pytest.skip("the C core is not built")
            self.q = self.mod.SendQueue()
            self.model = bytearray()
            self.wire = bytearray()       # bytes the model says were sent
            self.got = bytearray()        # bytes the peer received
            self.a = self.b = None
            self._new_pair()

        def _new_pair(self):
            for s in (self.a, self.b):
                if s is not None:
                    s.close()
            self.a, self.b = socket.socketpair()
            self.a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            self.b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.a.setblocking(False)
            self.b.setblocking(False)
            self.wire = bytearray()
            self.got = bytearray()

        def teardown(self):
            for s in (self.a, self.b):
                if s is not None:
                    s.close()

        @rule(data=st.one_of(st.binary(max_size=64),
                             st.binary(min_size=1000, max_size=20000),
                             st.integers(0, 1 << 20).map(lambda n: os.urandom(n % 300000))),
              kind=st.sampled_from(["bytes", "bytearray", "memoryview"]))
        def push(self, data, kind):
            obj = {"bytes": bytes, "bytearray": bytearray,
                   "memoryview": memoryview}[kind](data)
            self.q.push(obj)
            if kind == "bytearray":
                obj[:] = b"MUTATED"          # push copied it
            self.model += data

        @rule(n=st.integers(0, 70000))
        def peek(self, n):
            assert self.q.peek(n) == bytes(self.model[:n])

        @rule(n=st.one_of(st.integers(0, 70000), st.just(2**40)))
        def consume(self, n):
            self.q.consume(n)
            del self.model[:n]

        @rule(which=st.sampled_from(["0", "1", "n-1", "n", "n+1", "huge", "rand"]),
              r=st.integers(1, 100000))
        def send(self, which, r):
            n = len(self.model)
            max_bytes = {"0": 0, "1": 1, "n-1": max(n - 1, 0), "n": n, "n+1": n + 1,
                         "huge": 2**62, "rand": r}[which]
            before = bytes(self.model)
            res = self.q.send(self.a.fileno(), max_bytes)
            if res >= 0:
                assert res <= min(max_bytes, n)
                assert (res == 0) == (max_bytes == 0 or n == 0) or res == 0
                self.wire += self.model[:res]
                del self.model[:res]
            else:
                assert res in (-errno.EAGAIN, -errno.EWOULDBLOCK)
                assert bytes(self.model) == before      # would-block: unchanged
            assert len(self.q) == len(self.model)

        @rule()
        def peer_reads(self):
            drain(self.b, self.got)
            assert self.got == self.wire[:len(self.got)]

        @rule()
        def peer_resets(self):
            drain(self.b, self.got)
            assert self.got == self.wire[:len(self.got)]
            self.b.close()
            self.b = None
            before = bytes(self.model)
            if self.model:
                res = self.q.send(self.a.fileno(), 65536)
                assert res in (-errno.EPIPE, -errno.ECONNRESET), res
                assert self.q.getvalue() == before
            self._new_pair()

        @rule()
        def clear(self):
            self.q.clear()
            self.model.clear()

        @invariant()
        def lengths(self):
            assert len(self.q) == len(self.model) == self.q.nbytes
            assert bool(self.q) == bool(self.model)

        @invariant()
        def front(self):
            assert self.q.peek(16) == bytes(self.model[:16])

    SendQueueMachine.__name__ = "SendQueueMachine_" + backend_name
    return SendQueueMachine


if RuleBasedStateMachine is not None:
    _SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])
    TestSendQueuePure = _sendq_machine("pure").TestCase
    TestSendQueuePure.settings = _SETTINGS
    TestSendQueueCffi = _sendq_machine("cffi").TestCase
    TestSendQueueCffi.settings = _SETTINGS


# -- M3: threads ------------------------------------------------------------------------

def test_m3_close_from_another_thread_during_wait(backend, use_poll):
    from fastasyncore import asyncore
    m = {}
    log = []
    peers = []

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            log.append((self.name, self.recv(10)))

    ds = []
    for name in "ab":
        s, p = pair()
        peers.append(p)
        d = D(s, map=m)
        d.name = name
        ds.append(d)
    done = threading.Event()
    errors = []

    def run():
        try:
            asyncore.loop(timeout=0.3, use_poll=use_poll, map=m, count=4)
        except BaseException as e:                   # pragma: no cover
            errors.append(e)
        done.set()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)                       # thread A is blocked in the wait
    ds[0].close()                         # thread B closes one of them
    s, p = pair()
    peers.append(p)
    late = D(s, map=m)                    # and creates another
    late.name = "late"
    peers[1].send(b"b")
    p.send(b"L")
    t.join(5)
    try:
        assert done.is_set() and not errors
        assert ("a", b"x") not in log
        assert ("b", b"b") in log
        assert ("late", b"L") in log
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()


def test_m3_two_threads_two_maps_are_independent(backend, use_poll):
    from fastasyncore import asyncore
    results = {}

    def worker(k):
        m = {}
        got = []
        s, p = pair()

        class D(asyncore.dispatcher):
            def writable(self):
                return False

            def handle_read(self):
                got.append(self.recv(100))

        D(s, map=m)
        for i in range(50):
            p.send(b"%d," % i)
            asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=1)
        asyncore.close_all(map=m)
        p.close()
        results[k] = b"".join(got)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    expect = b"".join(b"%d," % i for i in range(50))
    assert results == {k: expect for k in range(4)}


# -- M4: errno mapping is the same on every path ---------------------------------------

def test_m4_would_block_and_disconnect_mapping(impl):
    asyncore = impl.asyncore
    m = {}
    s, peer = socket.socketpair()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    d = asyncore.dispatcher(s, map=m)
    closes = []
    d.handle_close = lambda: closes.append(1)
    try:
        with pytest.raises(BlockingIOError):   # kept: recv re-raises EWOULDBLOCK
            d.recv(10)
        sent = [d.send(b"x" * 65536) for _ in range(64)]
        assert sent[-1] == 0 and not closes    # EAGAIN -> 0, not a close
        peer.close()
        assert d.send(b"y") == 0 and closes == [1]     # EPIPE -> handle_close
        assert d.recv(10) == b"" and closes == [1, 1]  # ECONNRESET/EOF -> close
    finally:
        d.socket.close()
        m.clear()


# -- M5 / L6: churn leaves nothing behind ----------------------------------------------

def _churn(asyncore, asynchat, m, n_conn, in_flight, refs):
    class Echo(asynchat.async_chat):
        def __init__(self, sock, map):
            asynchat.async_chat.__init__(self, sock, map)
            self.set_terminator(b"\n")
            self.buf = []

        def collect_incoming_data(self, data):
            self.buf.append(data)

        def found_terminator(self):
            self.push(b"".join(self.buf) + b"\n")
            self.buf = []

    class Server(asyncore.dispatcher):
        def handle_accepted(self, sock, addr):
            refs.append(weakref.ref(Echo(sock, m)))

    class Client(asyncore.dispatcher_with_send):
        def __init__(self, port, i):
            asyncore.dispatcher_with_send.__init__(self, map=m)
            self.create_socket()
            self.connect(("127.0.0.1", port))
            self.msg = b"req-%d\n" % i
            self.send(self.msg)
            self.got = b""

        def handle_connect(self):
            pass

        def handle_read(self):
            self.got += self.recv(100)
            if self.got.endswith(b"\n"):
                results.append(self.got == self.msg)
                self.close()

        def handle_close(self):
            self.close()

    results = []
    srv = Server(map=m)
    srv.create_socket()
    srv.set_reuse_addr()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    port = srv.socket.getsockname()[1]
    started = 0
    deadline = time.monotonic() + 20
    while len(results) < n_conn and time.monotonic() < deadline:
        live = sum(1 for x in m.values() if isinstance(x, Client))
        while started < n_conn and live < in_flight:
            refs.append(weakref.ref(Client(port, started)))
            started += 1
            live += 1
        asyncore.loop(timeout=0.01, map=m, count=1)
    # let the server side see the closes
    pump(asyncore, m, lambda: len(m) == 1, timeout=5)
    srv.close()
    return results


@pytest.mark.skipif(open_fds() is None, reason="needs /proc/self/fd")
def test_m5_l6_churn_restores_fds_map_and_frees_dispatchers(backend):
    from fastasyncore import asyncore, asynchat
    gc.collect()
    fds0 = open_fds()
    m = {}
    refs = []
    results = _churn(asyncore, asynchat, m, 300, 20, refs)
    assert len(results) == 300 and all(results)
    asyncore.loop(timeout=0, map=m, count=1)
    assert not m
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert alive == []
    # the per-map poller is released when the map empties
    assert open_fds() - fds0 == set()


# -- the soak script itself (benchmarks/soak.py) stays runnable ---------------------

def test_soak_script_smoke(backend):
    import json
    from reliability_helpers import SRC_ROOT, run_child
    root = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
    script = os.path.join(root, "benchmarks", "soak.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/soak.py not in this tree")
    # A short run says nothing about RSS (and sanitizer builds inflate it):
    # only the other checks are asserted here; the real soak is run by hand.
    proc = run_child("import runpy, sys; sys.argv = [%r, '--requests', '3000', "
                     "'--json', '--rss-limit', '4096', '--backend', %r]; "
                     "runpy.run_path(%r, run_name='__main__')"
                     % (script, backend.NAME, script), backend.NAME, timeout=120)
    res = json.loads(proc.stdout)
    failed = [k for k, v in res["checks"].items() if not v]
    assert failed == [], res
    assert proc.returncode == 0, proc.stderr
    assert res["bytes_lost"] == 0 and res["backend"] == backend.NAME
