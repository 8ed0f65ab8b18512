"""Soak test: echo requests over continually churned loopback connections.

Not part of the default test run (reliability scenario L6 / issue 6).

One process, one socket map: an async_chat echo server and a stream of
clients, ``--in-flight`` of them alive at any time.  Each client sends
``--per-conn`` requests one after the other and checks every response byte
against what it sent; the server closes the connection after answering the
last request (server-side TIME_WAIT: no ephemeral-port exhaustion), the client
then sees EOF and closes too, and a new client replaces it.

Checks (exit status 1 if any fails):
  * bytes lost or reordered: 0
  * RSS growth after warm-up < 1 MiB (--rss-limit)
  * open fds and the map back to their baseline
  * every dispatcher garbage-collected (a WeakSet of all of them is empty)

    python benchmarks/soak.py                 # 1,000,000 requests
    python benchmarks/soak.py --quick         # 50,000 requests
    python benchmarks/soak.py --backend pure --use-poll
"""

import argparse
import gc
import json
import os
import resource
import socket
import sys
import time
import weakref


def rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fd_count(m):
    return len(fd_table(m))


def fd_table(m):
    """{fd: what it points to} for this process (Linux), {} elsewhere.

    Without the loop's own epoll/kqueue fd for map m: the loop may close it
    and open a new one whenever it switches wait strategy (see
    _loop.MapState.adapt), which is not a leak.
    """
    from fastasyncore import _loop
    st = _loop._states.get(id(m))
    own = st.poller.fileno() if st is not None and st.poller is not None else -1
    out = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            fd = int(name)
            if fd != own:
                out[fd] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass                      # the listdir fd itself, already closed
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--per-conn", type=int, default=10)
    ap.add_argument("--in-flight", type=int, default=50)
    ap.add_argument("--payload", type=int, default=64, help="bytes per request body")
    ap.add_argument("--backend", choices=["auto", "cffi", "pure"], default="auto")
    ap.add_argument("--use-poll", action="store_true")
    ap.add_argument("--warmup", type=float, default=0.05,
                    help="fraction of requests before the RSS baseline")
    ap.add_argument("--rss-limit", type=float, default=1.0, help="MiB")
    ap.add_argument("--quick", action="store_true", help="50,000 requests")
    ap.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests = 50_000

    if args.backend != "auto":
        os.environ["FASTASYNCORE_BACKEND"] = args.backend
    from fastasyncore import asyncore, asynchat, _backend
    if args.backend != "auto":
        _backend.set_backend(args.backend)

    m = {}
    alive = weakref.WeakSet()
    stats = {"requests_done": 0, "bytes_sent": 0, "bytes_ok": 0, "mismatch_bytes": 0,
             "lost_bytes": 0, "conns": 0, "errors": 0, "short_conns": 0}
    body = b"x" * max(0, args.payload - 16)

    class Echo(asynchat.async_chat):
        def __init__(self, sock):
            asynchat.async_chat.__init__(self, sock, m)
            self.set_terminator(b"\n")
            self.parts = []
            alive.add(self)

        def collect_incoming_data(self, data):
            self.parts.append(data)

        def found_terminator(self):
            line = b"".join(self.parts)
            self.parts = []
            self.push(line + b"\n")
            if line[:1] == b"Q":              # the client's last request
                self.close_when_done()

        def handle_error(self):
            stats["errors"] += 1
            self.close()

    class Server(asyncore.dispatcher):
        def handle_accepted(self, sock, addr):
            Echo(sock)

        def handle_error(self):
            stats["errors"] += 1
            raise

    class Client(asynchat.async_chat):
        def __init__(self, port, cid):
            asynchat.async_chat.__init__(self, map=m)
            self.create_socket()
            self.connect(("127.0.0.1", port))
            self.set_terminator(b"\n")
            self.cid = cid
            self.n = 0
            self.parts = []
            self.expect = b""
            alive.add(self)
            self._next()

        def _next(self):
            last = self.n == args.per_conn - 1
            req = b"%s%d:%d:%s" % (b"Q" if last else b"R", self.cid, self.n, body)
            self.expect = req
            stats["bytes_sent"] += len(req) + 1
            self.push(req + b"\n")

        def handle_connect(self):
            pass

        def collect_incoming_data(self, data):
            self.parts.append(data)

        def found_terminator(self):
            got = b"".join(self.parts)
            self.parts = []
            if got == self.expect:
                stats["bytes_ok"] += len(got) + 1
            else:
                stats["mismatch_bytes"] += len(got) + 1
            self.expect = None
            self.n += 1
            stats["requests_done"] += 1
            if self.n < args.per_conn:
                self._next()

        def handle_close(self):
            if self.n < args.per_conn:
                stats["short_conns"] += 1
                if self.expect is not None:
                    stats["lost_bytes"] += len(self.expect) + 1
            self.close()

        def handle_error(self):
            stats["errors"] += 1
            self.handle_close()

    srv = Server(map=m)
    srv.create_socket()
    srv.set_reuse_addr()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1024)
    port = srv.socket.getsockname()[1]
    alive.add(srv)

    asyncore.loop(timeout=0, use_poll=args.use_poll, map=m, count=1)  # poller made
    gc.collect()
    fds_start_table = fd_table(m)
    fds_start = len(fds_start_table)
    n_conns = -(-args.requests // args.per_conn)
    warm_conns = max(1, int(n_conns * args.warmup))
    started = 0
    base = None
    samples = []
    t0 = time.perf_counter()
    last_report = t0
    live = 0

    def n_live():
        return len(m) - 1 - sum(1 for x in m.values() if isinstance(x, Echo))

    while started < n_conns or len(m) > 1:
        live = n_live()
        while started < n_conns and live < args.in_flight:
            Client(port, started)
            started += 1
            live += 1
        asyncore.loop(timeout=0.05, use_poll=args.use_poll, map=m, count=1)
        if base is None and started >= warm_conns:
            gc.collect()
            base = {"rss": rss_bytes(), "fds": fd_count(m), "t": time.perf_counter(),
                    "done": stats["requests_done"]}
        now = time.perf_counter()
        if now - last_report >= 5:
            last_report = now
            samples.append((round(now - t0, 1), stats["requests_done"], rss_bytes()))
            if not args.json:
                print("  %6.1fs %9d requests  rss %.2f MiB  map %d" % (
                    now - t0, stats["requests_done"], rss_bytes() / 2**20, len(m)),
                    flush=True)
        if now - t0 > 3600:
            print("soak: giving up after an hour", file=sys.stderr)
            break
    elapsed = time.perf_counter() - t0

    gc.collect()
    end_rss = rss_bytes()
    end_table = fd_table(m)
    end_fds = len(end_table)
    new_fds = sorted("%d:%s" % kv for kv in end_table.items()
                     if fds_start_table.get(kv[0]) != kv[1])
    map_after = len(m)                        # the server only
    srv_alive_dispatchers = len(alive)        # the server only
    srv.close()
    del srv
    gc.collect()
    expected_bytes = stats["bytes_sent"]
    result = {
        "backend": _backend.current.NAME,
        "use_poll": args.use_poll,
        "requests": stats["requests_done"],
        "connections": started,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(stats["requests_done"] / elapsed),
        "connections_per_s": round(started / elapsed),
        "bytes_sent": expected_bytes,
        "bytes_echoed_ok": stats["bytes_ok"],
        "bytes_lost": expected_bytes - stats["bytes_ok"] - stats["mismatch_bytes"],
        "bytes_reordered_or_corrupt": stats["mismatch_bytes"],
        "short_connections": stats["short_conns"],
        "handler_errors": stats["errors"],
        "rss_baseline_mib": round(base["rss"] / 2**20, 3),
        "rss_end_mib": round(end_rss / 2**20, 3),
        "rss_growth_after_warmup_kib": round((end_rss - base["rss"]) / 1024, 1),
        "fds_start": fds_start,
        "fds_at_warmup": base["fds"],
        "fds_end": end_fds,
        "fds_new_at_end": new_fds,
        "map_len_end": map_after,
        "dispatchers_alive_end": srv_alive_dispatchers,
        "dispatchers_alive_after_server_close": len(alive),
    }
    checks = {
        "all requests answered": result["requests"] == args.requests or
        result["requests"] == n_conns * args.per_conn,
        "0 bytes lost": result["bytes_lost"] == 0,
        "0 bytes reordered/corrupt": result["bytes_reordered_or_corrupt"] == 0,
        "rss growth < %.1f MiB" % args.rss_limit:
            end_rss - base["rss"] < args.rss_limit * 2**20,
        "fds back to baseline": not new_fds and end_fds <= fds_start,
        "map back to the server only": map_after == 1,
        "all dispatchers collected": len(alive) == 0 and srv_alive_dispatchers == 1,
        "no handler errors": stats["errors"] == 0,
    }
    result["checks"] = {k: bool(v) for k, v in checks.items()}
    result["ok"] = all(checks.values())
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k != "checks":
                print("%-38s %s" % (k, v))
        for k, v in checks.items():
            print("  [%s] %s" % ("ok" if v else "FAIL", k))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
