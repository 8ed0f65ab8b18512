"""Requests/s of an asyncore echo server under loop() and under aio.serve().

One run, same machine state: for each pattern (``docs``: writable()
overridden; ``managed``: dispatcher_with_send) the same server code runs in
a child process driven by ``asyncore.loop(use_poll=...)`` or by
``await fastasyncore.aio.serve()`` on the default asyncio loop and on uvloop
(when installed), against the C load generator (``fabench client``, ping-pong
over --conns connections).  The server code is the bench harness's
(``fastasyncore._bench.worker``); drivers are interleaved over --rounds and
the median is reported, with the server's CPU time per request.  Linux only (the load generator uses epoll).

    python benchmarks/aio_echo.py [--conns 50] [--duration 3] [--rounds 3] [--backend cffi]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

DRIVERS = ["loop", "loop-poll", "serve-asyncio", "serve-uvloop"]


def serve_child(driver: str, pattern: str) -> None:
    """The server (the bench harness's, _bench.worker): print PORT, serve
    until stdin reaches EOF."""
    from fastasyncore import asynchat, asyncore
    from fastasyncore._bench.worker import make_asyncore_server

    m: dict = {}
    stats = {"errors": 0, "first_error": None, "consumed": [0]}
    srv = make_asyncore_server(asyncore, asynchat, pattern, m, stats)

    class Stdin(asyncore.file_dispatcher):
        def handle_read(self):
            if not self.recv(100):
                asyncore.close_all(m)

        def writable(self):
            return False

    Stdin(0, map=m)
    print("PORT %d" % srv.socket.getsockname()[1], flush=True)
    if driver.startswith("loop"):
        asyncore.loop(timeout=1.0, use_poll=driver == "loop-poll", map=m)
    else:
        import asyncio
        from fastasyncore.aio import serve
        if driver == "serve-uvloop":
            import uvloop
            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        loop.run_until_complete(serve(m))
        loop.close()
    if stats["errors"]:
        print("server errors: %(errors)d, first: %(first_error)s" % stats, file=sys.stderr)


def measure(fabench: str, driver: str, pattern: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, FASTASYNCORE_BACKEND=args.backend)
    srv = subprocess.Popen([sys.executable, __file__, "--serve", driver, pattern],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = srv.stdout.readline()            # type: ignore[union-attr]
        if not line.startswith("PORT "):
            return {"ok": False, "error": "server did not start"}
        cmd = [fabench, "client", "--port", line.split()[1], "--mode", "pingpong",
               "--conns", str(args.conns), "--warmup", "0.5",
               "--duration", str(args.duration), "--pid", str(srv.pid),
               "--setup-timeout", "10"]
        out = subprocess.run(cmd, capture_output=True, text=True,
                             timeout=args.duration + 30).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        srv.stdin.close()                       # type: ignore[union-attr]
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--backend", default="cffi", choices=["cffi", "pure"])
    p.add_argument("--patterns", default="docs,managed")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.serve:
        serve_child(*args.serve)
        return 0
    from fastasyncore._bench import runner
    work = tempfile.mkdtemp(prefix="aio-echo-")
    fabench, msg = runner.build_c(work, lambda s: None)
    if fabench is None:
        print(msg, file=sys.stderr)
        return 1
    try:
        import uvloop  # noqa: F401
        drivers = DRIVERS
    except ImportError:
        drivers = DRIVERS[:-1]
        print("(uvloop not installed: no serve-uvloop column)")
    print("backend=%s conns=%d duration=%.1fs rounds=%d python=%s; median r/s "
          "(server CPU us per request)" % (args.backend, args.conns, args.duration,
                                           args.rounds, sys.version.split()[0]))
    print("%-8s" % "pattern" + "".join("%22s" % d for d in drivers))
    for pattern in args.patterns.split(","):
        runs: dict = {d: [] for d in drivers}
        for _ in range(args.rounds):            # interleaved: same conditions
            for d in drivers:
                res = measure(fabench, d, pattern, args)
                if res.get("ok") and res["requests"]:
                    runs[d].append((res["requests"] / res["elapsed"],
                                    1e6 * res["server_cpu"] / res["requests"]))
                time.sleep(0.2)
        row = []
        for d in drivers:
            if runs[d]:
                rate = statistics.median(r for r, _ in runs[d])
                cpu = statistics.median(c for _, c in runs[d])
                row.append("%9.0f r/s (%5.1f)" % (rate, cpu))
            else:
                row.append("failed")
        print("%-8s" % pattern + "".join("%22s" % c for c in row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
