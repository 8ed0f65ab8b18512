"""Command line: ``python -m fastasyncore {demo,info,run,bench}``.

* ``demo``  -- an embedded loopback echo server and many client dispatchers in
  one fastasyncore loop, bounded in time and count; prints the backend, the
  poller, connections, requests and requests/s.  ``demo --tls``: the same
  over TLS (:mod:`fastasyncore.tls`, a throwaway certificate from trustme).
* ``info``  -- version, backend, poller, which loop runs the iterations (the
  C loop, fastasyncore._cloop, or the Python one, and why), Python, platform
  and whether/where the C core and the C loop are built.
* ``run SCRIPT [ARGS...]`` (or ``run -m MODULE [ARGS...]``) -- run an unmodified
  legacy program with :func:`fastasyncore.install` active, so its
  ``import asyncore`` / ``import asynchat`` get fastasyncore's modules.
* ``bench`` -- the benchmark harness (:mod:`fastasyncore._bench.runner`):
  fastasyncore's backends beside stdlib asyncore, asyncio, uvloop and a C
  epoll floor; progress on stderr, a markdown table on stdout.
"""

import argparse
import os
import platform
import socket
import sys
import time


def _fa():
    """Import the package, turning a bad FASTASYNCORE_BACKEND into a clean error."""
    try:
        import fastasyncore
    except ImportError as exc:
        raise SystemExit("fastasyncore: cannot import: %s" % exc)
    return fastasyncore


def _poller(fastasyncore):
    try:
        return str(getattr(fastasyncore, "POLLER", "?"))
    except Exception as exc:  # informational only
        return "? (%s)" % exc


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------

def _fd_budget():
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return None
        return soft
    except (ImportError, ValueError, OSError):
        return None


def run_demo(clients=200, duration=2.0, max_requests=None, size=64, use_poll=False,
             out=sys.stdout):
    """Echo server + ``clients`` ping-pong clients in one map; returns a stats dict.

    Bounded: stops after ``duration`` seconds, or once ``max_requests`` echoes
    completed, whichever comes first (plus at most 5 s to connect).
    """
    fastasyncore = _fa()
    from fastasyncore import asyncore

    channels = {}
    stats = {"accepted": 0, "connected": 0, "requests": 0, "errors": 0, "mismatches": 0,
             "first_error": None}
    state = {"stop": False}

    def note_error(obj):
        stats["errors"] += 1
        if stats["first_error"] is None:
            nil, t, v, tbinfo = asyncore.compact_traceback()
            stats["first_error"] = "%s: %s %s" % (t, v, tbinfo)
        obj.close()

    class EchoHandler(asyncore.dispatcher_with_send):
        def handle_read(self):
            data = self.recv(65536)
            if data:
                self.send(data)

        def handle_close(self):
            self.close()

        def handle_error(self):
            note_error(self)

    class EchoServer(asyncore.dispatcher):
        def __init__(self, backlog):
            asyncore.dispatcher.__init__(self, map=channels)
            self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
            self.set_reuse_addr()
            self.bind(("127.0.0.1", 0))
            self.listen(backlog)

        def handle_accepted(self, sock, addr):
            stats["accepted"] += 1
            EchoHandler(sock, map=channels)

        def handle_error(self):
            note_error(self)

    class Client(asyncore.dispatcher):
        def __init__(self, address, ident):
            asyncore.dispatcher.__init__(self, map=channels)
            self.ident = ident
            self.seq = 0
            self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
            self.connect(address)
            self.next_request()

        def next_request(self):
            stamp = b"%d:%d:" % (self.ident, self.seq)
            self.expected = (stamp + b"x" * size)[:max(size, len(stamp))]
            self.buffer = self.expected
            self.got = []
            self.got_len = 0

        def handle_connect(self):
            stats["connected"] += 1

        def writable(self):
            return len(self.buffer) > 0

        def handle_write(self):
            sent = self.send(self.buffer)
            self.buffer = self.buffer[sent:]

        def handle_read(self):
            data = self.recv(65536)
            if not data:
                return
            self.got.append(data)
            self.got_len += len(data)
            if self.got_len >= len(self.expected):
                if b"".join(self.got) != self.expected:
                    stats["mismatches"] += 1
                stats["requests"] += 1
                if max_requests is not None and stats["requests"] >= max_requests:
                    state["stop"] = True
                self.seq += 1
                self.next_request()

        def handle_close(self):
            self.close()

        def handle_error(self):
            note_error(self)

    budget = _fd_budget()
    if budget is not None and 2 * clients + 32 > budget:
        raise SystemExit("demo: %d clients need about %d file descriptors but the limit "
                         "(ulimit -n) is %d; use --clients %d or raise the limit"
                         % (clients, 2 * clients + 32, budget, max(1, (budget - 32) // 2)))

    server = EchoServer(backlog=min(max(clients, 5), socket.SOMAXCONN))
    address = server.socket.getsockname()
    t_setup = time.monotonic()
    for i in range(clients):
        Client(address, i)

    # Bounded loop: wall-clock deadline, request cap, and an iteration cap.
    start = time.monotonic()
    deadline = start + duration
    iterations = 0
    max_iterations = 10000000
    while channels and not state["stop"] and iterations < max_iterations:
        now = time.monotonic()
        if now >= deadline:
            break
        asyncore.loop(timeout=min(0.1, deadline - now), use_poll=use_poll, map=channels,
                      count=1)
        iterations += 1
    elapsed = time.monotonic() - start
    asyncore.close_all(map=channels)

    stats.update(
        backend=fastasyncore.BACKEND,
        poller=_poller(fastasyncore),
        use_poll=use_poll,
        clients=clients,
        seconds=elapsed,
        setup_seconds=start - t_setup,
        iterations=iterations,
        requests_per_second=stats["requests"] / elapsed if elapsed > 0 else 0.0,
    )
    if out is not None:
        print("fastasyncore demo: loopback echo, %d clients x %d-byte ping-pong, one loop"
              % (clients, size), file=out)
        print("  backend:       %s" % stats["backend"], file=out)
        print("  poller:        %s (use_poll=%s)" % (stats["poller"], use_poll), file=out)
        print("  connections:   %d connected, %d accepted" % (stats["connected"],
                                                               stats["accepted"]), file=out)
        print("  requests:      %d in %.2f s (%d loop iterations)"
              % (stats["requests"], elapsed, iterations), file=out)
        print("  requests/s:    %.0f" % stats["requests_per_second"], file=out)
        if stats["errors"] or stats["mismatches"]:
            print("  errors:        %d (first: %s), mismatched echoes: %d"
                  % (stats["errors"], stats["first_error"], stats["mismatches"]), file=out)
    return stats


def cmd_demo(args):
    if args.clients < 1:
        raise SystemExit("demo: --clients must be at least 1")
    if not 0 < args.duration <= 600:
        raise SystemExit("demo: --duration must be in (0, 600] seconds")
    if args.size < 1:
        raise SystemExit("demo: --size must be at least 1")
    if args.tls:
        from ._tlsdemo import NO_TRUSTME, run_tls_demo
        stats = run_tls_demo(clients=args.clients, duration=args.duration,
                             size=args.size, use_poll=args.use_poll)
        if stats is None:
            print(NO_TRUSTME, file=sys.stderr)
            return 2
        return 0 if stats["handshakes"] == args.clients and stats["requests"] > 0 \
            and not stats["errors"] else 1
    stats = run_demo(clients=args.clients, duration=args.duration,
                     max_requests=args.requests, size=args.size, use_poll=args.use_poll)
    ok = stats["requests"] > 0 and not stats["errors"] and not stats["mismatches"]
    return 0 if ok else 1


# --------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------

def _module_status(name, missing):
    """(built, location, detail) for an extension module, found without selecting it."""
    import importlib
    import importlib.util
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        return False, None, str(exc)
    if spec is None or spec.origin is None:
        return False, None, missing
    try:
        importlib.import_module(name)
    except ImportError as exc:
        return False, spec.origin, "present but not loadable: %s" % exc
    return True, spec.origin, "loadable"


def core_status():
    """(built, location, detail) for fastasyncore._core, found without selecting it."""
    return _module_status("fastasyncore._core", "pure-Python install")


def cloop_status():
    """(built, location, detail) for fastasyncore._cloop (the C loop)."""
    return _module_status("fastasyncore._cloop", "not in this install")


def loop_status(fastasyncore):
    """``"C (fastasyncore._cloop)"`` or ``"Python (<why>)"``: the loop that runs now."""
    choice = os.environ.get("FASTASYNCORE_LOOP", "auto").strip().lower() or "auto"
    try:
        from fastasyncore import _loop
        impl = _loop.loop_impl()
    except ImportError as exc:        # FASTASYNCORE_LOOP=c without _cloop, bad value
        return "? (%s)" % exc
    if impl == "c":
        return "C (fastasyncore._cloop)"
    if fastasyncore.BACKEND != "cffi":
        why = "the %s backend always runs the Python loop" % fastasyncore.BACKEND
    elif choice == "py":
        why = "FASTASYNCORE_LOOP=py"
    else:
        built, _, detail = cloop_status()
        if built:
            why = "FASTASYNCORE_LOOP=%s" % choice
        elif detail == "not in this install":
            why = "fastasyncore._cloop not built"
        else:
            why = "fastasyncore._cloop %s" % detail
    return "Python (%s)" % why


def cmd_info(args):
    fastasyncore = _fa()
    built, where, detail = core_status()
    lbuilt, lwhere, ldetail = cloop_status()
    rows = [
        ("fastasyncore", "%s (%s)" % (getattr(fastasyncore, "__version__", "?"),
                                      os.path.dirname(fastasyncore.__file__))),
        ("backend", "%s (FASTASYNCORE_BACKEND=%s)" % (
            fastasyncore.BACKEND, os.environ.get("FASTASYNCORE_BACKEND", "auto"))),
        ("poller", _poller(fastasyncore)),
        ("loop", loop_status(fastasyncore)),
        ("python", "%s %s (%s)" % (platform.python_implementation(),
                                   platform.python_version(), sys.executable)),
        ("platform", "%s (%s)" % (platform.platform(), platform.machine())),
        ("C core", "built" if built else "not built (%s)" % detail),
        ("core path", where or "-"),
        ("C loop", "built" if lbuilt else "not built (%s)" % ldetail),
        ("C loop path", lwhere or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print("%-*s  %s" % (width + 1, key + ":", value))
    return 0


# --------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------

def cmd_run(args):
    import runpy
    if args.module is None and args.script is None:
        raise SystemExit("run: give a SCRIPT to run (or -m MODULE)")
    fastasyncore = _fa()
    fastasyncore.install()
    if args.module is not None:
        target_args = ([args.script] if args.script is not None else []) + args.args
        sys.argv = [args.module] + target_args
        sys.path.insert(0, os.getcwd())
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        return 0
    script = args.script
    if not os.path.exists(script):
        raise SystemExit("run: %s: no such file" % script)
    sys.argv = [script] + args.args
    # As ``python SCRIPT`` does: the script's directory comes first on sys.path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


def cmd_bench(args):
    from ._bench import runner
    return runner.run(args)


# --------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastasyncore",
        description="fastasyncore: a drop-in, C-accelerated asyncore/asynchat.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="loopback echo server + many clients; prints requests/s")
    p.add_argument("--clients", type=int, default=200, help="client connections (default 200)")
    p.add_argument("--duration", type=float, default=2.0,
                   help="seconds to run the echo traffic (default 2)")
    p.add_argument("--requests", type=int, default=None,
                   help="stop after this many completed echoes (default: no cap)")
    p.add_argument("--size", type=int, default=64, help="bytes per request (default 64)")
    p.add_argument("--use-poll", action="store_true", help="loop(use_poll=True)")
    p.add_argument("--tls", action="store_true",
                   help="TLS echo (fastasyncore.tls) with a throwaway certificate; "
                        "needs trustme")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="version, backend, poller, loop, Python, platform, C core")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "run", help="run a legacy asyncore program with fastasyncore.install() active",
        description="Run SCRIPT (or -m MODULE) as __main__ after fastasyncore.install(), so "
                    "its `import asyncore` / `import asynchat` get fastasyncore's modules.")
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a module, like python -m")
    p.add_argument("script", nargs="?", metavar="SCRIPT", help="path of the program to run")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="arguments passed to the program as sys.argv[1:]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "bench", help="benchmarks against stdlib asyncore, asyncio, uvloop and C",
        description="Loopback benchmarks (performance.md workloads W1-W4, async_chat, "
                    "issue-3 micro-benchmarks, in-process busy small maps: spin, "
                    "pp_docs_*, pp_dws_*): fastasyncore's backends beside stdlib "
                    "asyncore/asynchat, asyncio, uvloop and a C epoll floor, pinned to "
                    "different CPUs. Progress on stderr, a markdown table on stdout.")
    from ._bench import runner as _bench_runner
    _bench_runner.build_parser(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
