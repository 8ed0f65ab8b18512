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

__all__ = ["run_tls_demo", "NO_TRUSTME"]

NO_TRUSTME = ("demo --tls: needs the 'trustme' package for a throwaway certificate "
              "(pip install trustme)")


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
    from fastasyncore import asyncore
    from fastasyncore.tls import TLSMixin

    channels: Dict[int, Any] = {}
    stats: Dict[str, Any] = {"handshakes": 0, "requests": 0, "errors": 0,
                             "first_error": None}

    class Failing:
        def handle_error(self) -> None:
            stats["errors"] += 1
            if stats["first_error"] is None:
                stats["first_error"] = repr(sys.exc_info()[1])
            self.close()                     # type: ignore[attr-defined]

    class EchoHandler(Failing, TLSMixin, asyncore.dispatcher_with_send):
        def handle_read(self) -> None:
            data = self.recv(65536)
            if data:
                self.send(data)

        def handle_close(self) -> None:
            self.close()

    class Server(Failing, asyncore.dispatcher):
        def handle_accepted(self, sock: socket.socket, addr: Any) -> None:
            EchoHandler(sock, map=channels).start_tls(server_ctx, server_side=True)

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

    server = Server(map=channels)
    server.create_socket()
    server.set_reuse_addr()
    server.bind(("127.0.0.1", 0))
    server.listen(min(max(clients, 5), socket.SOMAXCONN))
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
