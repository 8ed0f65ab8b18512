"""fastasyncore.tls (issue 13): TLS for dispatchers, on every backend case.

Certificates come from trustme, made at test time; peers are blocking ``ssl``
sockets in threads, or TLS dispatchers in the same map.  Loopback only; every
loop is bounded in iterations and time.
"""

import hashlib
import socket
import ssl
import threading
import time

import pytest

trustme = pytest.importorskip("trustme")

from fastasyncore import _loop, _tlssock, asynchat, asyncore  # noqa: E402
from fastasyncore.tls import TLSMixin  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def certs():
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trustme.CA().configure_trust(untrusting)
    return server, client, untrusting


def run_until(m, done, use_poll, seconds=15.0):
    """Iterate the loop until done() (at most `seconds`); assert it came."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        asyncore.loop(timeout=0.02, use_poll=use_poll, map=m, count=1)
    assert done(), "timed out"


class Thread(threading.Thread):
    """A peer in a thread; join() re-raises its exception."""

    def __init__(self, target, *args):
        super().__init__(target=self._run, args=(target,) + args, daemon=True)
        self.exc = None
        self.result = None

    def _run(self, target, *args):
        try:
            self.result = target(*args)
        except BaseException as e:   # reported by join()
            self.exc = e

    def join(self, timeout=10.0):
        super().join(timeout)
        assert not self.is_alive(), "peer thread hung"
        if self.exc is not None:
            raise self.exc
        return self.result


class Listener(asyncore.dispatcher):
    """Accepts into handler_class(sock, map); counts its own errors."""

    def __init__(self, m, handler_class, *args):
        super().__init__(map=m)
        self.m = m
        self.handler_class = handler_class
        self.args = args
        self.handlers = []
        self.errors = 0
        self.create_socket()
        self.set_reuse_addr()
        self.bind(("127.0.0.1", 0))
        self.listen(64)
        self.port = self.socket.getsockname()[1]

    def handle_accepted(self, sock, addr):
        self.handlers.append(self.handler_class(sock, self.m, *self.args))

    def handle_error(self):
        self.errors += 1
        raise


class Recorder:
    """Mixed into test channels: what happened to them."""

    established = 0
    closes = 0

    def handle_tls_established(self):
        assert self.tls_established
        self.established += 1

    def handle_close(self):
        self.closes += 1
        self.close()

    def handle_error(self):
        self.error = asyncore.sys.exc_info()[1]
        self.close()


class EchoChat(Recorder, TLSMixin, asynchat.async_chat):
    """Implicit TLS line echo server (start_tls() in the constructor)."""

    error = None

    def __init__(self, sock, m, ctx):
        super().__init__(sock, m)
        self.set_terminator(b"\n")
        self.data = []
        self.start_tls(ctx, server_side=True)

    def collect_incoming_data(self, data):
        self.data.append(data)

    def found_terminator(self):
        self.push(b"".join(self.data) + b"\n")
        self.data = []


def tls_client(port, ctx, work):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            return work(s)


def lines_client(lines):
    def work(s):
        f = s.makefile("rwb")
        for line in lines:
            f.write(line + b"\n")
        f.flush()
        return [f.readline()[:-1] for _ in lines]
    return work


def test_fast_paths_refuse_tls_sockets(certs):
    a, b = socket.socketpair()
    try:
        t = _tlssock.TLSSocket(a, certs[0], True, None, 0, lambda: None)
        assert asyncore._fast_fd(t) == -1
        ssl_sock = certs[0].wrap_socket(b, server_side=True, do_handshake_on_connect=False)
        assert asyncore._fast_fd(ssl_sock) == -1
        ssl_sock.close()
    finally:
        a.close()
        b.close()


@pytest.fixture
def fast_fd_calls(monkeypatch):
    """(socket type, answer) of every asyncore._fast_fd() call: the gate of
    the C send paths (dispatcher_with_send's queue, async_chat's writev)."""
    calls = []
    real_fast_fd = asyncore._fast_fd

    def spy(sock):
        fd = real_fast_fd(sock)
        calls.append((type(sock), fd))
        return fd
    monkeypatch.setattr(asyncore, "_fast_fd", spy)
    return calls


def assert_tls_sockets_refused(calls):
    tls = [fd for t, fd in calls if t is _tlssock.TLSSocket]
    assert tls and all(fd == -1 for fd in tls), calls[:10]


def test_echo_server_blocking_clients(backend, use_poll, certs, fast_fd_calls):
    m = {}
    lst = Listener(m, EchoChat, certs[0])
    many = [b"line %d" % i for i in range(3000)]
    big = [b"0123456789abcdef" * 65536]          # one 1 MiB line
    peers = [Thread(tls_client, lst.port, certs[1], lines_client(many)),
             Thread(tls_client, lst.port, certs[1], lines_client(big))]
    for p in peers:
        p.start()
    run_until(m, lambda: not any(p.is_alive() for p in peers), use_poll, 40)
    assert peers[0].join() == many
    assert peers[1].join() == big
    assert [h.established for h in lst.handlers] == [1, 1]
    assert all(h.error is None for h in lst.handlers)
    assert lst.errors == 0
    # async_chat's writev and the C send paths were refused for every TLS socket
    assert_tls_sockets_refused(fast_fd_calls)
    asyncore.close_all(m)


class DWSClient(Recorder, TLSMixin, asyncore.dispatcher_with_send):
    error = None

    def __init__(self, m, port, ctx, payload):
        super().__init__(map=m)
        self.got = b""
        self.reads = 0
        self.create_socket()
        self.connect(("127.0.0.1", port))
        self.was_connected = self.connected
        self.start_tls(ctx, server_hostname="localhost")
        self.send(payload)                   # queued before the handshake

    def handle_connect(self):
        pass

    def handle_read(self):
        self.reads += 1
        self.got += self.recv(65536)


def serve_once(lsock, ctx, work):
    conn, _ = lsock.accept()
    conn.settimeout(10)
    with ctx.wrap_socket(conn, server_side=True) as s:
        return work(s)


def listening_socket():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    return lsock


def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_client_dws_queued_before_handshake(backend, use_poll, certs, fast_fd_calls):
    payload = b"0123456789abcdef" * 20000         # 320,000 bytes
    ticket_seen = threading.Event()
    go_on = threading.Event()

    def work(s):
        got = recv_exactly(s, len(payload))
        ticket_seen.set()                     # tickets went out long ago
        go_on.wait(10)
        s.sendall(hashlib.sha256(got).hexdigest().encode())
        return got

    m = {}
    with listening_socket() as lsock:
        peer = Thread(serve_once, lsock, certs[0], work)
        peer.start()
        c = DWSClient(m, lsock.getsockname()[1], certs[1], payload)
        # the connect completes after start_tls() (loopback: EINPROGRESS)
        assert not c.was_connected
        run_until(m, ticket_seen.is_set, use_poll)
        # TLS 1.3 session tickets reached neither handle_read nor handle_close
        run_until(m, lambda: c.tls_established, use_poll)
        asyncore.loop(timeout=0.02, use_poll=use_poll, map=m, count=5)
        assert c.reads == 0 and c.closes == 0 and c.error is None
        assert c.socket.ssl_socket.version() == "TLSv1.3"
        go_on.set()
        run_until(m, lambda: len(c.got) == 64, use_poll)
        assert peer.join() == payload
    assert c.got == hashlib.sha256(payload).hexdigest().encode()
    assert c.established == 1
    assert_tls_sockets_refused(fast_fd_calls)   # the send queue's C path
    c.close()


BANNER = b"250-" + b"x" * (1 << 20) + b"\r\n"     # still queued at STARTTLS


class LineServer(Recorder, TLSMixin, asynchat.async_chat):
    """HELLO -> a 1 MiB line and 250 (plain); STARTTLS -> 220 (plain), then
    TLS; PING -> PONG."""

    error = None

    def __init__(self, sock, m, ctx):
        super().__init__(sock, m)
        self.ctx = ctx
        self.set_terminator(b"\r\n")
        self.data = []

    def collect_incoming_data(self, data):
        self.data.append(data)

    def found_terminator(self):
        line = b"".join(self.data)
        self.data = []
        if line == b"HELLO":
            self.push(BANNER)
            self.push_with_producer(asynchat.simple_producer(b"250 plain\r\n", 4))
        elif line == b"STARTTLS":
            assert self.producer_fifo         # the plain reply is still queued
            self.push(b"220 go ahead\r\n")
            self.start_tls(self.ctx, server_side=True)
            self.push(b"after\r\n")            # must leave encrypted
        elif line == b"PING":
            self.push(b"PONG %s\r\n" % self.socket.ssl_socket.version().encode())


class DWSStartTLS(Recorder, TLSMixin, asyncore.dispatcher_with_send):
    """dispatcher_with_send: a plain banner queued, then TLS."""

    error = None

    def __init__(self, sock, m, ctx):
        super().__init__(sock, m)
        self.send(BANNER + b"250 plain\r\n" + b"220 go ahead\r\n")
        self.start_tls(ctx, server_side=True)
        self.send(b"after\r\n")

    def handle_read(self):
        if self.recv(100) == b"PING\r\n":
            self.send(b"PONG %s\r\n" % self.socket.ssl_socket.version().encode())


@pytest.mark.parametrize("server", [LineServer, DWSStartTLS])
def test_starttls_mid_stream(backend, use_poll, certs, server, fast_fd_calls):
    def work():
        with socket.create_connection(("127.0.0.1", lst.port), timeout=10) as raw:
            if server is LineServer:      # (DWSStartTLS reads nothing plain)
                raw.sendall(b"HELLO\r\nSTARTTLS\r\n")
            plain = BANNER + b"250 plain\r\n220 go ahead\r\n"
            assert recv_exactly(raw, len(plain)) == plain
            with certs[1].wrap_socket(raw, server_hostname="localhost") as s:
                f = s.makefile("rwb")
                first = f.readline()
                f.write(b"PING\r\n")
                f.flush()
                return first, f.readline()

    m = {}
    lst = Listener(m, server, certs[0])
    peer = Thread(work)
    peer.start()
    run_until(m, lambda: not peer.is_alive(), use_poll)
    assert peer.join() == (b"after\r\n", b"PONG TLSv1.3\r\n")
    assert lst.handlers[0].established == 1
    assert lst.handlers[0].error is None
    assert_tls_sockets_refused(fast_fd_calls)
    asyncore.close_all(m)


class LateMarker(TLSMixin, asynchat.async_chat):
    """A STARTTLS server whose end-of-plain marker is still queued."""

    def __init__(self, sock, m):
        super().__init__(sock, map=m)
        self.set_terminator(b"\r\n")
        self.buf = []
        self.established = 0
        self.error = None

    def collect_incoming_data(self, data):
        self.buf.append(data)

    def found_terminator(self):
        self.buf = []
        self.push(b"PONG\r\n")

    def handle_tls_established(self):
        self.established += 1

    def handle_error(self):
        import sys
        self.error = sys.exc_info()[1]
        self.close()


def test_starttls_client_hello_before_the_marker_is_reached(backend, use_poll, certs):
    # The plain reply has left, async_chat has not reached the end-of-plain
    # marker yet (that takes a write event), and the peer's ClientHello is
    # already there: the next read event is TLS, not a plain read of it.
    # (Hit under load in CI: the read comes before the write in an iteration.)
    import select
    m = {}
    a, b = socket.socketpair()
    ch = LateMarker(a, m)
    # the state a write event leaves when its send took exactly the plain
    # reply: the reply gone, the marker next in the queue
    ch.producer_fifo.append(b"220 go ahead\r\n")
    ch.start_tls(certs[0], server_side=True)
    a.sendall(ch.producer_fifo.popleft())
    assert len(ch.producer_fifo) == 1
    assert type(ch.producer_fifo[0]).__name__ == "_EndOfPlain"

    def client():
        b.settimeout(10)
        assert recv_exactly(b, 14) == b"220 go ahead\r\n"
        with certs[1].wrap_socket(b, server_hostname="localhost") as s:
            f = s.makefile("rwb")
            f.write(b"PING\r\n")
            f.flush()
            return f.readline()

    peer = Thread(client)
    peer.start()
    assert select.select([a], [], [], 5)[0]     # the ClientHello is waiting
    time.sleep(0.05)
    run_until(m, lambda: not peer.is_alive(), use_poll)
    assert peer.join() == b"PONG\r\n"
    assert ch.error is None and ch.established == 1
    asyncore.close_all(m)


def test_failed_handshakes_beside_a_good_client(backend, use_poll, certs):
    def untrusting():
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_client(lst.port, certs[2], lambda s: None)

    def plaintext():
        with socket.create_connection(("127.0.0.1", lst.port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                return raw.recv(100)          # the server closes (or alerts)
            except ConnectionResetError:
                return b""

    m = {}
    lst = Listener(m, EchoChat, certs[0])
    bad = [Thread(untrusting), Thread(plaintext)]
    for p in bad:
        p.start()
    run_until(m, lambda: len(lst.handlers) == 2 and not any(p.is_alive() for p in bad),
              use_poll)
    for p in bad:
        p.join()
    good = Thread(tls_client, lst.port, certs[1], lines_client([b"still here"]))
    good.start()
    run_until(m, lambda: not good.is_alive(), use_poll)
    assert good.join() == [b"still here"]
    errors = [h.error for h in lst.handlers[:2]]
    assert all(isinstance(e, ssl.SSLError) for e in errors), errors
    assert lst.errors == 0 and m.get(lst._fileno) is lst
    assert lst.handlers[2].established == 1
    asyncore.close_all(m)


class SmallReader(Recorder, TLSMixin, asyncore.dispatcher):
    error = None

    def __init__(self, sock, m, ctx):
        super().__init__(sock, m)
        self.sizes = []
        self.start_tls(ctx, server_side=True)

    def handle_write(self):
        pass

    def handle_read(self):
        data = self.recv(1024)
        self.sizes.append(len(data))
        if sum(self.sizes) == 16000:
            self.socket.send(b"done")


class SmallReaderConsulted(SmallReader):
    def writable(self):
        return False


def counting_ready_now(monkeypatch):
    """_loop.ready_now, counting the channels it is asked for."""
    asked = []
    real = _loop.ready_now

    def ready_now(obj, map=None):
        asked.append(obj)
        real(obj, map)
    monkeypatch.setattr(_loop, "ready_now", ready_now)
    return asked


def test_pending_drained_with_small_recv(backend, use_poll, certs, monkeypatch):
    asked = counting_ready_now(monkeypatch)
    for cls in (SmallReader, SmallReaderConsulted):
        m = {}
        lst = Listener(m, cls, certs[0])
        # one 16,000-byte record: after the first 1 KiB recv the rest sits
        # in the SSL object; no socket event will announce it
        peer = Thread(tls_client, lst.port, certs[1],
                      lambda s: (s.sendall(b"x" * 16000), recv_exactly(s, 4))[1])
        peer.start()
        run_until(m, lambda: not peer.is_alive(), use_poll)
        assert peer.join() == b"done"
        h = lst.handlers[0]
        assert max(h.sizes) == 1024 and sum(h.sizes) == 16000
        assert asked.count(h) >= 14     # the loop's ready-now delivered it
        assert _loop._classify(h)[0] is (cls is SmallReader)
        asyncore.close_all(m)


class BulkSender(Recorder, TLSMixin, asynchat.async_chat):
    error = None

    def __init__(self, sock, m, ctx, data):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        super().__init__(sock, m)
        self.start_tls(ctx, server_side=True)
        self.push(data)

    def collect_incoming_data(self, data):
        pass

    def found_terminator(self):
        pass


def test_small_sndbuf_hits_want_write(backend, use_poll, certs, monkeypatch):
    blocked = []
    real = _tlssock._would_block

    def counting():
        blocked.append(1)
        return real()
    monkeypatch.setattr(_tlssock, "_would_block", counting)
    data = hashlib.sha256(b"seed").digest() * (4 << 15)     # 4 MiB

    def work(s):
        time.sleep(0.2)                       # let the server's buffers fill
        return hashlib.sha256(recv_exactly(s, len(data))).digest()

    m = {}
    lst = Listener(m, BulkSender, certs[0], data)
    peer = Thread(tls_client, lst.port, certs[1], work)
    peer.start()
    run_until(m, lambda: not peer.is_alive(), use_poll, 40)
    assert peer.join() == hashlib.sha256(data).digest()
    assert lst.handlers[0].error is None
    assert len(blocked) > 0                   # SSLWantWrite was met and waited out
    asyncore.close_all(m)


def test_peer_closes_mid_handshake(backend, use_poll, certs):
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = certs[1].wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    m = {}
    lst = Listener(m, EchoChat, certs[0])
    with socket.create_connection(("127.0.0.1", lst.port), timeout=10) as raw:
        raw.sendall(hello[: len(hello) // 2])
        run_until(m, lambda: lst.handlers, use_poll)
        asyncore.loop(timeout=0.02, use_poll=use_poll, map=m, count=5)
    h = lst.handlers[0]
    run_until(m, lambda: h.closes, use_poll)
    assert h.closes == 1 and h.error is None and h.established == 0
    assert m.get(h._fileno) is not h and list(m.values()) == [lst]
    asyncore.close_all(m)


class ByeServer(EchoChat):
    def found_terminator(self):
        self.close()


def test_close_sends_close_notify(backend, use_poll, certs):
    def work(s):
        s.sendall(b"bye\n")
        s.unwrap()                            # raises unless close_notify came
        return True

    m = {}
    lst = Listener(m, ByeServer, certs[0])
    peer = Thread(tls_client, lst.port, certs[1], work)
    peer.start()
    run_until(m, lambda: not peer.is_alive(), use_poll)
    assert peer.join() is True
    asyncore.close_all(m)


class IdleServer(Recorder, TLSMixin, asyncore.dispatcher_with_send):
    error = None

    def __init__(self, sock, m, ctx):
        super().__init__(sock, m)
        self.start_tls(ctx, server_side=True)

    def handle_read(self):
        self.send(self.recv(100))


class IdleConsulted(IdleServer):
    def writable(self):
        return False


def test_idle_tls_channel_does_not_spin(backend, use_poll, certs):
    for cls in (IdleServer, IdleConsulted):
        release = threading.Event()

        def work(s):
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
            release.wait(10)

        m = {}
        lst = Listener(m, cls, certs[0])
        peer = Thread(tls_client, lst.port, certs[1], work)
        peer.start()
        run_until(m, lambda: lst.handlers and lst.handlers[0].established, use_poll)
        asyncore.loop(timeout=0.05, use_poll=use_poll, map=m, count=10)
        h = lst.handlers[0]
        assert _loop._classify(h)[0] is (cls is IdleServer)
        t0 = time.monotonic()
        asyncore.loop(timeout=0.1, use_poll=use_poll, map=m, count=4)
        idle = time.monotonic() - t0
        release.set()
        peer.join()
        assert idle >= 0.3, "an idle TLS channel woke the loop (%.3f s)" % idle
        asyncore.close_all(m)


class AsyncClient(Recorder, TLSMixin, asynchat.async_chat):
    error = None

    def __init__(self, m, port, ctx, n):
        super().__init__(map=m)
        self.set_terminator(b"\n")
        self.data = []
        self.replies = []
        self.create_socket()
        self.connect(("127.0.0.1", port))
        self.start_tls(ctx, server_hostname="localhost")
        for i in range(n):
            self.push(b"msg %d from %d\n" % (i, id(self)))

    def handle_connect(self):
        pass

    def collect_incoming_data(self, data):
        self.data.append(data)

    def found_terminator(self):
        self.replies.append(b"".join(self.data))
        self.data = []


def test_many_concurrent_tls_connections(backend, use_poll, certs):
    m = {}
    lst = Listener(m, EchoChat, certs[0])
    clients = [AsyncClient(m, lst.port, certs[1], 10) for _ in range(50)]
    run_until(m, lambda: all(len(c.replies) == 10 for c in clients), use_poll, 40)
    for c in clients:
        assert c.replies == [b"msg %d from %d" % (i, id(c)) for i in range(10)]
        assert c.established == 1 and c.error is None
    assert len(lst.handlers) == 50 and all(h.error is None for h in lst.handlers)
    # stock predicates: both ends stayed on the managed path
    assert all(_loop._classify(ch)[0] for ch in lst.handlers + clients)
    asyncore.close_all(m)


class Collector(Recorder, TLSMixin, asyncore.dispatcher):
    error = None

    def __init__(self, sock, m, ctx):
        super().__init__(sock, m)
        self.got = b""
        self.start_tls(ctx, server_side=True)

    def handle_write(self):
        pass

    def handle_read(self):
        self.got += self.recv(65536)          # b"": handle_close() ran


@pytest.mark.parametrize("ending", ["close_notify", "unclean"])
def test_end_of_stream_is_handle_close(backend, use_poll, certs, ending):
    def work(s):
        s.sendall(b"last words")
        time.sleep(0.05)
        if ending == "close_notify":
            s.unwrap()
        else:
            # the TCP connection ends without close_notify
            socket.socket(fileno=s.detach()).close()
    m = {}
    lst = Listener(m, Collector, certs[0])
    peer = Thread(tls_client, lst.port, certs[1], work)
    peer.start()
    run_until(m, lambda: lst.handlers and lst.handlers[0].closes, use_poll)
    peer.join()
    h = lst.handlers[0]
    assert h.got == b"last words" and h.closes == 1 and h.error is None
    asyncore.close_all(m)


def test_read_event_without_data_is_harmless(backend, use_poll, certs):
    release = threading.Event()
    m = {}
    lst = Listener(m, Collector, certs[0])
    peer = Thread(tls_client, lst.port, certs[1], lambda s: release.wait(10))
    peer.start()
    run_until(m, lambda: lst.handlers and lst.handlers[0].established, use_poll)
    h = lst.handlers[0]
    for _ in range(3):          # what a spurious ready_now() would do
        h.handle_read_event()
    asyncore.loop(timeout=0.02, use_poll=use_poll, map=m, count=3)
    assert h.got == b"" and h.closes == 0 and h.error is None and m.get(h._fileno) is h
    release.set()
    peer.join()
    asyncore.close_all(m)


def test_inherited_predicates_are_wrapped():
    class Base(asynchat.async_chat):
        def writable(self):
            return False

    class Chat(TLSMixin, Base):
        pass

    class Stock(TLSMixin, asynchat.async_chat):
        pass

    assert Chat.writable.__wrapped__ is Base.__dict__["writable"]
    assert "writable" not in Stock.__dict__ and "readable" not in Stock.__dict__
    m = {}
    a, b = socket.socketpair()
    try:
        chat, stock = Chat(a, m), Stock(b, m)
        assert _loop._classify(chat)[0] is False
        assert _loop._classify(stock)[0] is True
        assert chat.writable() is False       # no TLS yet: the user's answer
    finally:
        asyncore.close_all(m)


class FakeSSL:
    """Stands in for the SSLSocket: send() and recv() raise what their plans
    say first (want-read on a write, want-write on a read: renegotiation or a
    key update), then succeed."""

    def __init__(self, raw, send_plan, recv_plan):
        self.raw = raw
        self.send_plan = list(send_plan)
        self.recv_plan = list(recv_plan)
        self.sent = b""

    def fileno(self):
        return self.raw.fileno()

    def pending(self):
        return 0

    def send(self, data):
        if self.send_plan:
            raise self.send_plan.pop(0)()
        self.sent += bytes(data)
        return len(data)

    def recv(self, n):
        if self.recv_plan:
            raise self.recv_plan.pop(0)()
        return b"data"

    def unwrap(self):
        raise ssl.SSLWantReadError()

    def close(self):
        self.raw.close()


class FakeChan(TLSMixin, asyncore.dispatcher_with_send):
    def handle_read(self):
        self.reads.append(self.recv(100))


def fake_established(certs, send_plan, recv_plan):
    m = {}
    a, b = socket.socketpair()
    chan = FakeChan(a, m)
    chan.reads = []
    chan.start_tls(certs[0], server_side=True)
    t = chan._fa_tls
    t.phase, t._sock = _tlssock.ESTABLISHED, FakeSSL(a, send_plan, recv_plan)
    return m, b, chan, t


def test_want_read_on_write(backend, certs):
    want_read = ssl.SSLWantReadError
    m, b, chan, t = fake_established(certs, [want_read], [want_read])
    try:
        chan.send(b"abc")                     # SSLWantRead: kept, waits for a read
        assert t.write_wants_read and chan.out_buffer == b"abc"
        assert chan._fa_mask() & _tlssock.READ
        chan.handle_read_event()              # no data yet, but the write goes
        assert not t.write_wants_read and chan.reads == []
        assert t._sock.sent == b"abc" and chan.out_buffer == b""
        assert chan._fa_mask() == _tlssock.READ
    finally:
        asyncore.close_all(m)
        b.close()


def test_want_write_on_read(backend, certs):
    m, b, chan, t = fake_established(certs, [], [ssl.SSLWantWriteError])
    try:
        read, out = _tlssock.READ, _loop.POLLOUT
        assert chan._fa_mask() == read
        chan.handle_read_event()              # SSLWantWrite: the read waits for POLLOUT
        assert t.read_wants_write and chan.reads == []
        assert chan._fa_mask() == read | out
        chan.handle_write_event()             # POLLOUT: the read is retried
        assert chan.reads == [b"data"] and not t.read_wants_write
        assert chan._fa_mask() == read and _loop._classify(chan)[0] is True
    finally:
        asyncore.close_all(m)
        b.close()
