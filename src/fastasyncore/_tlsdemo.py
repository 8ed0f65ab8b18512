"""``python -m fastasyncore demo --tls``: the echo demo over TLS.

A throwaway CA and certificate (trustme), a TLS echo server and TLS clients
(:class:`fastasyncore.tls.TLSMixin`) in one loop, loopback only, bounded in
time.  Prints handshakes/s and requests/s.
"""

import socket
import ssl
import sys
import time
from typing import Any, Dict, Optional, TextIO, Tuple

from . import asyncore
from .tls import TLSMixin

__all__ = ["run_tls_demo", "NO_TRUSTME", "TLSEcho", "TLSEchoServer"]

NO_TRUSTME = ("demo --tls: needs the 'trustme' package for a throwaway certificate "
              "(pip install trustme)")


class TLSEcho(TLSMixin, asyncore.dispatcher_with_send):
    """Sends back what it reads (over TLS once start_tls() was called)."""

    def handle_read(self) -> None:
        data = self.recv(65536)
        if data:
            self.send(data)

    def handle_close(self) -> None:
        self.close()


class TLSEchoServer(asyncore.dispatcher):
    """Listens on 127.0.0.1 (port 0); accepted sockets become ``handler``
    channels with implicit TLS, and TCP_NODELAY as asyncio sets it (see the
    README's latency note)."""

    handler: Any = TLSEcho

    def __init__(self, context: ssl.SSLContext, map: Optional[Dict[int, Any]] = None,
                 backlog: int = 128) -> None:
        super().__init__(map=map)
        self.context = context
        self.create_socket()
        self.set_reuse_addr()
        self.bind(("127.0.0.1", 0))
        self.listen(backlog)

    def handle_accepted(self, sock: socket.socket, addr: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.handler(sock, map=self._map).start_tls(self.context, server_side=True)


def _contexts() -> Optional[Tuple[ssl.SSLContext, ssl.SSLContext]]:
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


def run_tls_demo(clients: int = 50, duration: float = 2.0, size: int = 64,
                 use_poll: bool = False, out: Optional[TextIO] = sys.stdout
                 ) -> Optional[Dict[str, Any]]:
    """-> stats, or None without trustme."""
    ctxs = _contexts()
    if ctxs is None:
        return None
    server_ctx, client_ctx = ctxs
    import fastasyncore

    channels: Dict[int, Any] = {}
    stats: Dict[str, Any] = {"handshakes": 0, "requests": 0, "errors": 0,
                             "first_error": None}

    class Failing:
        def handle_error(self) -> None:
            stats["errors"] += 1
            if stats["first_error"] is None:
                stats["first_error"] = repr(sys.exc_info()[1])
            self.close()                     # type: ignore[attr-defined]

    class EchoHandler(Failing, TLSEcho):
        pass

    class Server(Failing, TLSEchoServer):
        handler = EchoHandler

    class Client(Failing, TLSMixin, asyncore.dispatcher_with_send):
        def __init__(self, address: Any) -> None:
            super().__init__(map=channels)
            self.create_socket()
            self.connect(address)
            self.start_tls(client_ctx, server_hostname="localhost")
            self.payload = b"x" * size
            self.got = 0
            self.send(self.payload)          # leaves once the handshake is done

        def handle_connect(self) -> None:
            pass

        def handle_tls_established(self) -> None:
            stats["handshakes"] += 1
            if stats["handshakes"] == clients:
                stats["handshake_seconds"] = time.monotonic() - start

        def handle_read(self) -> None:
            self.got += len(self.recv(65536))
            if self.got >= size:
                self.got -= size
                stats["requests"] += 1
                self.send(self.payload)

        def handle_close(self) -> None:
            self.close()

    server = Server(server_ctx, channels, min(max(clients, 5), socket.SOMAXCONN))
    start = time.monotonic()
    for _ in range(clients):
        Client(server.socket.getsockname())
    deadline = start + duration
    iterations = 0
    while channels and iterations < 10000000:
        now = time.monotonic()
        if now >= deadline:
            break
        asyncore.loop(timeout=min(0.1, deadline - now), use_poll=use_poll,
                      map=channels, count=1)
        iterations += 1
    elapsed = time.monotonic() - start
    asyncore.close_all(map=channels)
    hs = stats.get("handshake_seconds")
    stats.update(backend=fastasyncore.BACKEND, loop=fastasyncore.LOOP, seconds=elapsed,
                 handshakes_per_second=clients / hs if hs else 0.0,
                 requests_per_second=stats["requests"] / elapsed if elapsed > 0 else 0.0)
    if out is not None:
        print("fastasyncore demo --tls: loopback TLS echo, %d clients x %d-byte "
              "ping-pong, one loop (throwaway certificate)" % (clients, size), file=out)
        print("  backend:       %s (%s loop)" % (stats["backend"], stats["loop"]), file=out)
        print("  handshakes:    %d/%d (%.0f/s, both ends in this process)"
              % (stats["handshakes"], clients, stats["handshakes_per_second"]), file=out)
        print("  requests:      %d in %.2f s (%d loop iterations)"
              % (stats["requests"], elapsed, iterations), file=out)
        print("  requests/s:    %.0f" % stats["requests_per_second"], file=out)
        if stats["errors"]:
            print("  errors:        %d (first: %s)" % (stats["errors"], stats["first_error"]),
                  file=out)
    return stats
