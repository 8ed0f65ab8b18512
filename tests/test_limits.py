"""Opt-in limits (fastasyncore extensions) and the coalesced output path."""

import socket

import pytest

from test_chat_and_buffers import _pump


class Lines:
    def __init__(self, asynchat):
        got = self.got = []
        events = self.events = []

        class Chat(asynchat.async_chat):
            def collect_incoming_data(self, data):
                got.append(bytes(data))

            def found_terminator(self):
                events.append("T")

            def handle_input_overflow(self):
                events.append("overflow")
                asynchat.async_chat.handle_input_overflow(self)

            def handle_output_overflow(self):
                events.append("out-overflow")
                asynchat.async_chat.handle_output_overflow(self)

        self.cls = Chat


def test_max_input_bytes_closes_and_bounds_memory(backend):
    from fastasyncore import asyncore, asynchat
    m = {}
    s, peer = socket.socketpair()
    h = Lines(asynchat)
    c = h.cls(s, map=m)
    c.set_terminator(b"\n")
    c.max_input_bytes = 10000
    c.ignore_log_types = frozenset({"warning"})
    try:
        peer.sendall(b"ok\n")
        for _ in range(20):
            try:
                peer.send(b"x" * 4096)
            except OSError:
                break
            asyncore.loop(timeout=0.01, map=m, count=1)
            if not m:
                break
        assert h.events[:1] == ["T"] and "overflow" in h.events
        assert not m                      # closed
        assert sum(len(g) for g in h.got) <= 10000 + 65536
    finally:
        asyncore.close_all(map=m)
        peer.close()


def test_max_input_bytes_unset_is_unlimited(backend):
    from fastasyncore import asynchat
    h = Lines(asynchat)
    c = h.cls(map={})
    assert c.max_input_bytes is None and c.max_output_bytes is None


def test_max_output_bytes_hook_and_output_queued(backend):
    from fastasyncore import asyncore, asynchat
    m = {}
    s, peer = socket.socketpair()
    h = Lines(asynchat)
    c = h.cls(s, map=m)
    c.max_output_bytes = 100000
    c.ignore_log_types = frozenset({"warning"})
    try:
        c.connected = False               # queue without sending
        c.push(b"a" * 60000)
        assert c.output_queued() == 60000
        assert h.events == []
        c.push(b"b" * 60000)
        assert h.events == ["out-overflow"]
        assert not m
    finally:
        asyncore.close_all(map=m)
        peer.close()


def test_coalesced_output_keeps_order_with_producers_and_close(backend):
    from fastasyncore import asyncore, asynchat
    m = {}
    s, peer = socket.socketpair()
    peer.setblocking(False)
    h = Lines(asynchat)
    c = h.cls(s, map=m)
    c.connected = False
    expect = bytearray()
    for i in range(300):
        piece = (b"%d," % i) * (i % 7 + 1)
        c.push(piece)
        expect += piece
        if i % 50 == 0:
            c.push_with_producer(asynchat.simple_producer(b"P%d|" % i * 30, 7))
            expect += b"P%d|" % i * 30
    c.push(bytearray(b"tail"))
    c.push(memoryview(b"-mv"))
    expect += b"tail-mv"
    c.close_when_done()
    c.connected = True
    try:
        got = _pump(asyncore, m, peer, len(expect))
        assert got == bytes(expect)
        for _ in range(10):
            asyncore.loop(timeout=0.01, map=m, count=1)
        assert not m                          # close_when_done took effect
    finally:
        asyncore.close_all(map=m)
        peer.close()
