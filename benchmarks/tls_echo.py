"""TLS echo servers side by side: fastasyncore.tls (each backend/loop) and asyncio.

    python benchmarks/tls_echo.py [--seconds S] [--mib N]

Each server runs in its own process (pinned to CPU 1 where taskset exists);
the clients are blocking ``ssl`` sockets in this process.  Two numbers per
server: handshakes/s (4 client threads, connect + TLS 1.3 handshake + one
echo + close, for S seconds) and MB/s (one connection, N MiB echoed in 64 KiB
writes).  Loopback only; a throwaway certificate from trustme.  The
fastasyncore server sets TCP_NODELAY on accepted sockets, as asyncio does.
"""

import argparse
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time


def server_fastasyncore(ctx, ready):
    from fastasyncore import asyncore
    from fastasyncore._tlsdemo import TLSEchoServer   # sets TCP_NODELAY

    s = TLSEchoServer(ctx)
    ready(s.socket.getsockname()[1])
    asyncore.loop(timeout=1.0, use_poll=True)


def server_asyncio(ctx, ready):
    import asyncio

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport

        def data_received(self, data):
            self.t.write(data)

    async def main():
        srv = await asyncio.get_running_loop().create_server(
            Echo, "127.0.0.1", 0, ssl=ctx, backlog=128)
        ready(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


def serve(kind, certdir):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(certdir, "cert.pem"))

    def ready(port):
        print(port, flush=True)
    (server_asyncio if kind == "asyncio" else server_fastasyncore)(ctx, ready)


def handshakes(port, ctx, seconds, threads=4):
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(i):
        while time.monotonic() < stop:
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(b"x")
                    s.recv(1)
            counts[i] += 1
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def throughput(port, ctx, mib):
    total = mib << 20
    chunk = b"y" * 65536
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            got = [0]

            def reader():
                while got[0] < total:
                    n = len(s.recv(262144))
                    if not n:
                        break
                    got[0] += n
            t0 = time.monotonic()
            r = threading.Thread(target=reader)
            r.start()
            for _ in range(total // len(chunk)):
                s.sendall(chunk)
            r.join()
            dt = time.monotonic() - t0
    assert got[0] == total, got[0]
    return total / dt / 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--certdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args.serve, args.certdir)
    import trustme
    ca = trustme.CA()
    certdir = tempfile.mkdtemp()
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        os.path.join(certdir, "cert.pem"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    pin = ["taskset", "-c", "1"] if shutil.which("taskset") and os.cpu_count() > 1 else []
    cases = [("fastasyncore cffi, C loop", "fa", {"FASTASYNCORE_BACKEND": "cffi"}),
             ("fastasyncore cffi, Python loop", "fa",
              {"FASTASYNCORE_BACKEND": "cffi", "FASTASYNCORE_LOOP": "py"}),
             ("fastasyncore pure", "fa", {"FASTASYNCORE_BACKEND": "pure"}),
             ("asyncio", "asyncio", {})]
    print("| server | handshakes/s | MB/s echoed |\n|---|---:|---:|")
    try:
        for label, kind, env in cases:
            proc = subprocess.Popen(pin + [sys.executable, __file__, "--serve", kind,
                                           "--certdir", certdir],
                                    env=dict(os.environ, **env), stdout=subprocess.PIPE,
                                    text=True)
            try:
                port = int(proc.stdout.readline())
                hs = handshakes(port, ctx, args.seconds)
                mbs = throughput(port, ctx, args.mib)
            finally:
                proc.kill()
                proc.wait()
            print("| %s | %.0f | %.0f |" % (label, hs, mbs), flush=True)
    finally:
        shutil.rmtree(certdir, ignore_errors=True)


if __name__ == "__main__":
    main()
