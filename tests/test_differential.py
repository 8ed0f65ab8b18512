"""Differential tests: one scripted scenario, run under stdlib 3.11 asyncore /
asynchat (when importable), the pure backend and the C backend, must produce
the same sequence of hook calls and the same bytes on the wire.

The only differences allowed are the ones in docs/compatibility.md; the
scenarios below avoid them (no fd reuse inside an iteration, no POLLHUP after an
EOF close, no closed-behind-the-back sockets) except where a test normalises a
documented one explicitly.

Plus a Hypothesis property: random chunkings of random terminator streams fed
to async_chat give the same collect/found events everywhere (B3, M6).
"""

import contextlib
import socket
import sys
import time
import warnings

import pytest

from fastasyncore import _backend
from reliability_helpers import pair, drain

try:
    from hypothesis import given, settings, strategies as st, HealthCheck
except ImportError:          # pragma: no cover
    given = None


def _stdlib_modules():
    if sys.version_info >= (3, 12):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import asyncore
        import asynchat
    from fastasyncore import asyncore as ours
    if asyncore is ours:
        return None
    return asyncore, asynchat


def _cffi_ok():
    try:
        _backend.load("cffi")
        from fastasyncore import _cffi  # noqa: F401
        return True
    except ImportError:
        return False


@contextlib.contextmanager
def _on(name):
    prev = _backend.current.NAME
    _backend.set_backend(name)
    try:
        from fastasyncore import asyncore, asynchat
        yield asyncore, asynchat
    finally:
        _backend.set_backend(prev)


def implementations():
    """[(name, context manager yielding (asyncore, asynchat))], stdlib first."""
    out = []
    std = _stdlib_modules()
    if std is not None:
        out.append(("stdlib", contextlib.nullcontext(std)))
    out.append(("pure", _on("pure")))
    if _cffi_ok():
        out.append(("cffi", _on("cffi")))
    return out


def run_everywhere(scenario, *args):
    results = {}
    for name, ctx in implementations():
        with ctx as (asyncore, asynchat):
            results[name] = scenario(name, asyncore, asynchat, *args)
    return results


def assert_all_equal(results):
    names = list(results)
    if len(names) < 2:
        pytest.skip("one implementation only here (no stdlib asyncore, no C core)")
    ref = names[0]
    for n in names[1:]:
        assert results[n] == results[ref], "%s differs from %s" % (n, ref)


def settle(asyncore, m, use_poll, rounds=30):
    """Iterate until a few consecutive iterations do nothing (bounded)."""
    for _ in range(rounds):
        if not m:
            return
        asyncore.loop(timeout=0.02, use_poll=use_poll, map=m, count=1)


# -- scenario 1: a line/length protocol over async_chat ------------------------------

CHAT_SCRIPT = [b"HELLO\r", b"\nLEN 5\r\n", b"abcdeLEN 12\r\n0123", b"456789",
               b"ab\r\nnoterm", b"inated-but-", b"\r\nQUIT\r\n"]


def chat_scenario(name, asyncore, asynchat, use_poll):
    m = {}
    s, peer = pair()
    log = []

    class Proto(asynchat.async_chat):
        def __init__(self, sock, map):
            asynchat.async_chat.__init__(self, sock, map)
            self.set_terminator(b"\r\n")
            self.buf = []

        def collect_incoming_data(self, data):
            log.append(("collect", bytes(data)))
            self.buf.append(bytes(data))

        def found_terminator(self):
            log.append(("found", self.get_terminator()))
            line = b"".join(self.buf)
            self.buf = []
            if isinstance(self.get_terminator(), int):
                self.push(b"GOT " + line + b"\r\n")
                self.set_terminator(b"\r\n")
            elif line.startswith(b"LEN "):
                self.set_terminator(int(line[4:]))
            elif line == b"QUIT":
                self.push(b"BYE\r\n")
                self.close_when_done()
            else:
                self.push(b"ECHO " + line + b"\r\n")

        def handle_write(self):
            log.append(("handle_write",))
            asynchat.async_chat.handle_write(self)

        def handle_close(self):
            log.append(("handle_close",))
            self.close()

    Proto(s, m)
    wire = bytearray()
    try:
        for chunk in CHAT_SCRIPT:
            peer.send(chunk)
            settle(asyncore, m, use_poll, rounds=3)
            drain(peer, wire)
        settle(asyncore, m, use_poll)
        drain(peer, wire)
    finally:
        asyncore.close_all(map=m)
        peer.close()
    return log, bytes(wire), bool(m)


def test_differential_chat_protocol(use_poll):
    results = run_everywhere(chat_scenario, use_poll)
    assert_all_equal(results)
    log, wire, left = results["pure"]
    assert wire == (b"ECHO HELLO\r\nGOT abcde\r\nGOT 0123456789ab\r\nECHO \r\n"
                    b"ECHO noterminated-but-\r\nBYE\r\n")
    assert log[-2:] == [("handle_write",), ("handle_close",)] and not left


# -- scenario 2: TCP lifecycle (accept, connect, echo, close) ------------------------

def lifecycle_scenario(name, asyncore, asynchat, use_poll):
    m = {}
    log = []

    class Handler(asyncore.dispatcher_with_send):
        def handle_read(self):
            data = self.recv(100)
            log.append(("handler.read", data))
            if data:
                self.send(data.upper())

        def handle_close(self):
            log.append(("handler.close",))
            self.close()

    class Server(asyncore.dispatcher):
        def handle_accepted(self, sock, addr):
            log.append(("server.accepted",))
            Handler(sock, map=m)

    class Client(asyncore.dispatcher):
        sent = False

        def writable(self):
            return not self.sent

        def handle_connect(self):
            log.append(("client.connect",))

        def handle_write(self):
            log.append(("client.write",))
            self.send(b"ping")
            self.sent = True

        def handle_read(self):
            data = self.recv(100)
            log.append(("client.read", data))
            if data == b"PING":
                self.close()

        def handle_close(self):
            log.append(("client.close",))
            self.close()

    srv = Server(map=m)
    srv.create_socket()
    srv.set_reuse_addr()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    c = Client(map=m)
    c.create_socket()
    c.connect(srv.socket.getsockname())
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(m) > 1:
            asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=1)
            if ("handler.close",) in log:
                break
        settle(asyncore, m, use_poll, rounds=5)
    finally:
        asyncore.close_all(map=m)

    # Hook order between the two ends depends on the kernel; compare per role.
    def role(r):
        return [e for e in log if e[0].startswith(r + ".")]
    return role("server"), role("client"), role("handler")


def test_differential_tcp_lifecycle(use_poll):
    results = run_everywhere(lifecycle_scenario, use_poll)
    assert_all_equal(results)
    server, client, handler = results["pure"]
    assert server == [("server.accepted",)]
    assert client == [("client.connect",), ("client.write",), ("client.read", b"PING")]
    # recv() calls handle_close before it returns b"" (as 3.11)
    assert handler == [("handler.read", b"ping"), ("handler.close",),
                       ("handler.read", b"")]


# -- scenario 3: exception routing and the documented poll-path double close --------

def errors_scenario(name, asyncore, asynchat, use_poll):
    m = {}
    log = []
    peers = []

    class D(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            data = self.recv(10)
            log.append((self.tag, "read", data))
            if data == b"raise":
                raise ValueError("boom")
            if data == b"oserr":
                raise ConnectionResetError(104, "reset")

        def handle_error(self):
            log.append((self.tag, "error", sys.exc_info()[0].__name__))
            self.close()

        def handle_close(self):
            log.append((self.tag, "close"))
            self.close()

    for tag, payload in (("a", b"raise"), ("b", b"oserr"), ("c", b"fine"),
                         ("d", None)):
        s, p = pair()
        d = D(s, map=m)
        d.tag = tag
        peers.append(p)
        if payload is None:
            p.close()                       # EOF (+ POLLHUP on the poll path)
        else:
            p.send(payload)
    try:
        settle(asyncore, m, use_poll, rounds=4)
    finally:
        asyncore.close_all(map=m)
        for p in peers:
            p.close()
    by_tag = {}
    for e in log:
        by_tag.setdefault(e[0], []).append(e[1:])
    if name == "stdlib" and use_poll:
        # documented difference: 3.11's poll path calls handle_close again for
        # the POLLHUP that came with the EOF; we stop after the close.
        assert by_tag["d"] == [("close",), ("read", b""), ("close",)]
        by_tag["d"] = by_tag["d"][:2]
    return by_tag


def test_differential_exception_routing(use_poll):
    results = run_everywhere(errors_scenario, use_poll)
    assert_all_equal(results)
    by_tag = results["pure"]
    assert by_tag["a"] == [("read", b"raise"), ("error", "ValueError")]
    if use_poll:
        assert by_tag["b"] == [("read", b"oserr"), ("close",)]
    else:
        assert by_tag["b"] == [("read", b"oserr"), ("error", "ConnectionResetError")]
    assert by_tag["c"] == [("read", b"fine")]
    assert by_tag["d"] == [("close",), ("read", b"")]


# -- scenario 4: output paths, byte-exact -----------------------------------------------

def output_scenario(name, asyncore, asynchat, use_poll):
    m = {}
    s, peer = socket.socketpair()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    peer.setblocking(False)

    class Chat(asynchat.async_chat):
        def collect_incoming_data(self, data):
            pass

        def found_terminator(self):
            pass

    c = Chat(s, map=m)
    expect = bytearray()
    for i in range(200):
        piece = (b"<%d>" % i) * (i % 13 + 1)
        c.push(piece)
        expect += piece
        if i % 40 == 0:
            c.push_with_producer(asynchat.simple_producer(b"P" * 3000, 100))
            expect += b"P" * 3000
    c.push(b"Z" * 200000)
    expect += b"Z" * 200000
    c.close_when_done()
    wire = bytearray()
    deadline = time.monotonic() + 10
    while m and time.monotonic() < deadline:
        asyncore.loop(timeout=0.01, use_poll=use_poll, map=m, count=1)
        drain(peer, wire)
    drain(peer, wire)
    asyncore.close_all(map=m)
    peer.close()
    return bytes(wire) == bytes(expect), len(wire), bool(m)


def test_differential_output_bytes(use_poll):
    results = run_everywhere(output_scenario, use_poll)
    assert_all_equal(results)
    assert results["pure"][0] is True and results["pure"][2] is False


# -- property: random chunkings of random terminator streams (B3) -------------------

def chat_events(asynchat, chunks, terminators):
    chunks = list(chunks)
    terms = list(terminators)
    events = []

    class Chat(asynchat.async_chat):
        def recv(self, n):
            return chunks.pop(0)

        def collect_incoming_data(self, data):
            events.append(bytes(data))

        def found_terminator(self):
            events.append(("T", self.get_terminator()))
            if terms:
                self.set_terminator(terms.pop(0))

    c = Chat(map={})
    c.set_terminator(terms.pop(0) if terms else None)
    while chunks:
        c.handle_read()
    return events, bytes(c.ac_in_buffer), c.get_terminator()


def _chunk(data, cuts):
    cuts = sorted({x % (len(data) + 1) for x in cuts})
    out, last = [], 0
    for x in cuts + [len(data)]:
        if x > last:
            out.append(data[last:x])
            last = x
    return out or [b""]


if given is not None:
    TERM = st.one_of(
        st.binary(min_size=1, max_size=4).map(
            lambda b: bytes(b"ab\r\n"[x % 4] for x in b)),
        st.integers(0, 12),
        st.none())

    @settings(max_examples=200, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(stream=st.binary(max_size=300).map(
               lambda b: bytes(b"ab\r\nx"[x % 5] for x in b)),
           cuts=st.lists(st.integers(0, 400), max_size=40),
           terms=st.lists(TERM, min_size=1, max_size=12))
    def test_property_chat_chunkings_same_events_everywhere(stream, cuts, terms):
        chunks = [c for c in _chunk(stream, cuts) if c]
        if not chunks:
            return
        results = {}
        for name, ctx in implementations():
            with ctx as (asyncore, asynchat):
                results[name] = chat_events(asynchat, chunks, terms)
        assert_all_equal(results)
        # and the concatenation of collected data is the stream minus terminators
        events = results["pure"][0]
        collected = b"".join(e for e in events if isinstance(e, bytes))
        assert len(collected) <= len(stream)

    @settings(max_examples=100, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(records=st.lists(st.binary(max_size=40).map(
               lambda b: bytes(b"abcd\r"[x % 5] for x in b)), max_size=15),
           cuts=st.lists(st.integers(0, 800), max_size=60))
    def test_property_line_protocol_any_chunking(records, cuts):
        """Records joined with CRLF come out record by record, whatever the
        chunking (terminator split across reads included)."""
        stream = b"".join(r.replace(b"\r", b"") + b"\r\n" for r in records)
        chunks = [c for c in _chunk(stream, cuts) if c] or [b""]
        if chunks == [b""]:
            return
        for name, ctx in implementations():
            with ctx as (asyncore, asynchat):
                events, rest, _ = chat_events(asynchat, chunks, [b"\r\n"])
            lines, cur = [], b""
            for e in events:
                if isinstance(e, bytes):
                    cur += e
                else:
                    lines.append(cur)
                    cur = b""
            assert lines == [r.replace(b"\r", b"") for r in records], name
            assert rest == b"" and cur == b""
