"""Methods assigned on an instance, and the instances' attribute layout.

The fast paths ask "is this hook still ours?" through the bound method, not
through ``obj.__dict__``: on CPython 3.11 and 3.12 reading ``__dict__`` turns
an instance's inline attribute values into a dict for good, which slows every
later attribute access of that dispatcher (see _loop.bound_is).
"""

import gc
import socket
import sys

import pytest

from reliability_helpers import pump


def _pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _values_materialized(obj):
    """True when obj's attributes live in a real __dict__ (3.11/3.12 only)."""
    return any(type(r) is dict and "socket" in r for r in gc.get_referents(obj))


@pytest.mark.skipif(not (3, 11) <= sys.version_info[:2] <= (3, 12),
                    reason="inline instance values that a __dict__ read "
                           "materializes exist on CPython 3.11 and 3.12 only")
def test_loop_keeps_instance_attributes_inline(impl, use_poll):
    asyncore, asynchat = impl.asyncore, impl.asynchat
    m = {}
    got = []

    class Server(asynchat.async_chat):
        def __init__(self, sock, map):
            asynchat.async_chat.__init__(self, sock, map=map)
            self.set_terminator(b"\n")
            self.buf = []

        def collect_incoming_data(self, data):
            self.buf.append(data)

        def found_terminator(self):
            line = b"".join(self.buf)
            self.buf = []
            got.append(line)
            self.push(line + b"\n")
            self.push(b"second\n")          # two chunks: the gather path

    class Client(asyncore.dispatcher_with_send):
        def __init__(self, sock, map):
            asyncore.dispatcher_with_send.__init__(self, sock, map=map)
            self.data = b""

        def handle_read(self):
            self.data += self.recv(4096)

    s, c = _pair()
    srv = Server(s, m)
    cli = Client(c, m)
    assert not _values_materialized(srv) and not _values_materialized(cli)
    try:
        for i in range(5):
            cli.send(b"line %d\n" % i)
            want = b"".join(b"line %d\nsecond\n" % j for j in range(i + 1))
            assert pump(asyncore, m, lambda: cli.data == want, use_poll=use_poll)
        assert got == [b"line %d" % i for i in range(5)]
        assert not _values_materialized(srv)
        assert not _values_materialized(cli)
    finally:
        asyncore.close_all(map=m)


def test_instance_send_on_chat_is_called(impl, use_poll):
    """chan.send = spy: every queued chunk goes through it, one per initiate_send."""
    asyncore, asynchat = impl.asyncore, impl.asynchat
    m = {}
    s, peer = _pair()
    chan = asynchat.async_chat(s, map=m)
    sent = []
    real = chan.send

    def spy(data):
        sent.append(bytes(data))
        return real(data)

    chan.send = spy
    try:
        chan.push(b"a")
        chan.push(b"b")
        chan.push(b"c")
        assert pump(asyncore, m, lambda: b"".join(sent) == b"abc", use_poll=use_poll)
        assert sent == [b"a", b"b", b"c"]
        assert peer.recv(10) == b"abc"
    finally:
        asyncore.close_all(map=m)
        peer.close()


def test_instance_initiate_send_is_called(impl):
    """d.initiate_send = spy on dispatcher_with_send and async_chat."""
    asyncore, asynchat = impl.asyncore, impl.asynchat
    m = {}
    s1, p1 = _pair()
    s2, p2 = _pair()
    calls = []
    d = asyncore.dispatcher_with_send(s1, map=m)
    d.initiate_send = lambda: calls.append("dws")
    chan = asynchat.async_chat(s2, map=m)
    chan.initiate_send = lambda: calls.append("chat")
    try:
        d.send(b"x")
        chan.push(b"y")
        assert calls == ["dws", "chat"]
        assert bytes(d.out_buffer) == b"x"      # queued, not sent by us
        with pytest.raises(BlockingIOError):
            p1.recv(1)
        with pytest.raises(BlockingIOError):
            p2.recv(1)
    finally:
        asyncore.close_all(map=m)
        p1.close()
        p2.close()


def test_instance_get_terminator_is_used(impl, use_poll):
    asyncore, asynchat = impl.asyncore, impl.asynchat
    m = {}
    s, peer = _pair()
    records = []

    class Chat(asynchat.async_chat):
        def __init__(self, sock, map):
            asynchat.async_chat.__init__(self, sock, map=map)
            self.set_terminator(b"\n")
            self.buf = b""

        def collect_incoming_data(self, data):
            self.buf += data

        def found_terminator(self):
            records.append(self.buf)
            self.buf = b""

    chan = Chat(s, m)
    chan.get_terminator = lambda: b"|"
    try:
        peer.send(b"a|b\nc|")
        assert pump(asyncore, m, lambda: len(records) == 2, use_poll=use_poll)
        assert records == [b"a", b"b\nc"]
    finally:
        asyncore.close_all(map=m)
        peer.close()


def test_own_predicate_detection(backend):
    """Assigned readable/writable are found however they were assigned."""
    from fastasyncore import asyncore, _loop
    socks = []

    def chan(cls=asyncore.dispatcher_with_send):
        a, b = _pair()
        socks.extend((a, b))
        return cls(a, map={})

    class Alias(asyncore.dispatcher):
        writable = asyncore.dispatcher.writable    # a plain function again

    plain, lam, other_bound, self_bound = chan(), chan(), chan(), chan()
    lam.writable = lambda: False
    other_bound.readable = plain.readable            # the same function, another self
    self_bound.writable = self_bound.handle_write    # self, another function
    try:
        assert _loop._classify(plain) == (True, False, False)
        assert _loop._classify(lam) == (False, False, True)
        assert _loop._classify(other_bound) == (False, True, False)
        assert _loop._classify(self_bound) == (False, False, True)
        # Not managed: an instance assignment could not reach the loop.
        alias = chan(Alias)
        assert _loop._classify(alias) == (False, False, False)
        # ... so the instance is looked at: a plain instance attribute
        alias.writable = lambda: False
        assert _loop._classify(alias) == (False, False, True)
        # ... and through the descriptor that readable still is
        alias.readable = lambda: True
        assert _loop._classify(alias) == (False, True, True)
        del alias.readable
        assert _loop._classify(alias) == (False, False, True)
        del lam.writable
        assert _loop._classify(lam) == (True, False, False)
        assert _loop.bound_is(plain, "send", asyncore.dispatcher_with_send.send)
        assert not _loop.bound_is(plain, "send", asyncore.dispatcher.send)
    finally:
        for s in socks:
            s.close()


def test_predicate_assigned_from_outside_on_idle_channel(impl, use_poll):
    """No event needed: the next iteration asks the assigned predicate, and
    after del the class's own answer is back (3.11 asks it every time)."""
    asyncore = impl.asyncore
    m = {}
    s, peer = _pair()
    d = asyncore.dispatcher_with_send(s, map=m)
    d.handle_write = lambda: writes.append(1)
    writes, asked = [], []
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
        d.writable = lambda: asked.append(1) or True        # idle: no event
        asyncore.loop(timeout=0.2, use_poll=use_poll, map=m, count=2)
        assert len(asked) == 2 and len(writes) == 2
        del d.writable
        assert d.writable() == 0                  # connected, nothing queued
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=2)
        assert len(asked) == 2 and len(writes) == 2
        with pytest.raises(AttributeError):
            del d.writable
    finally:
        asyncore.close_all(map=m)
        peer.close()


def test_mock_patch_object_on_predicate(impl, use_poll):
    from unittest import mock
    asyncore = impl.asyncore
    m = {}
    s, peer = _pair()
    d = asyncore.dispatcher(s, map=m)
    d.connected = True
    d.handle_read = lambda: None
    try:
        with mock.patch.object(d, "readable", return_value=False) as r:
            asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=3)
            assert r.call_count == 3
        assert d.readable() is True
        assert type(asyncore.dispatcher.__dict__["readable"]).__name__ in (
            "function", "_managed_predicate")
        assert asyncore.dispatcher.readable(d) is True
        assert asyncore.dispatcher.writable.__name__ == "writable"
    finally:
        asyncore.close_all(map=m)
        peer.close()
