"""Benchmark worker processes: servers and clients under test, micro-benchmarks.

Run by :mod:`fastasyncore._bench.runner` as ``python -m fastasyncore._bench.worker
COMMAND ...``, each in its own process pinned to one CPU.  Every command is
bounded: servers stop when their stdin reaches EOF or their deadline passes,
clients and micro-benchmarks have deadlines of their own.

Implementations (``--impl``):

* ``fastasyncore-cffi`` / ``fastasyncore-pure``: fastasyncore with that backend
  (the runner sets ``FASTASYNCORE_BACKEND``), ``loop()`` in its default select
  mode; ``fastasyncore-cffi-poll`` / ``fastasyncore-pure-poll`` with use_poll=True;
* ``asyncore-select`` / ``asyncore-poll``: the stdlib modules (3.11 and older,
  or pyasyncore/pyasynchat on 3.12+ when installed);
* ``asyncio`` / ``uvloop``: Protocol-based equivalents;
* ``fastasyncore-cffi-pyloop`` (``-poll``): the C backend with the Python loop
  (the runner sets ``FASTASYNCORE_LOOP=py``; versions without that switch
  ignore it).

``busy`` runs one in-process "busy small map" workload (spin, pp_docs, pp_dws):
every event is produced and consumed inside one socket map of this process.
"""

import argparse
import json
import os
import socket
import sys
import time
import warnings

HOST = "127.0.0.1"
HTTP_REQ = b"GET /index.html HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: fabench\r\n\r\n"


# --------------------------------------------------------------------------
# implementations

def stdlib_modules():
    """(asyncore, asynchat, label) of the stdlib (or pyasyncore) modules, or raise ImportError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import asyncore
        import asynchat
    if getattr(asyncore, "__name__", "") == "fastasyncore.asyncore":
        raise ImportError("`import asyncore` gives fastasyncore (install() is active)")
    where = getattr(asyncore, "__file__", "") or ""
    label = "pyasyncore" if "site-packages" in where or "dist-packages" in where else "stdlib"
    return asyncore, asynchat, label


def asyncore_impl(impl):
    """-> (asyncore, asynchat, use_poll) for an asyncore-family impl."""
    if impl.startswith("fastasyncore-"):
        import fastasyncore
        from fastasyncore import asyncore, asynchat
        want = impl.split("-")[1]
        if fastasyncore.BACKEND != want:
            from fastasyncore import _backend
            _backend.set_backend(want)
        return asyncore, asynchat, impl.endswith("-poll")
    if impl in ("asyncore-select", "asyncore-poll"):
        asyncore, asynchat, _ = stdlib_modules()
        return asyncore, asynchat, impl == "asyncore-poll"
    raise ValueError("not an asyncore implementation: %s" % impl)


def new_event_loop(impl):
    import asyncio
    if impl == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def raise_nofile():
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return None


class StdinWatch:
    """Non-blocking check whether the parent closed our stdin (= stop)."""

    def __init__(self):
        self.fd = 0
        try:
            os.set_blocking(self.fd, False)
        except OSError:
            self.fd = None

    def closed(self):
        if self.fd is None:
            return False
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not data


# --------------------------------------------------------------------------
# asyncore-family servers

def make_asyncore_server(asyncore, asynchat, pattern, chan_map, stats):
    """Build the listening dispatcher for ``pattern``; returns it."""

    def note_error(obj):
        stats["errors"] += 1
        if stats["first_error"] is None:
            stats["first_error"] = repr(sys.exc_info()[1])
        obj.close()

    class DocsHandler(asyncore.dispatcher):
        """The asyncore docs' pattern: a bytes buffer, writable() overridden."""

        echo = pattern != "oneway"

        def __init__(self, sock, map):
            asyncore.dispatcher.__init__(self, sock, map=map)
            self.buffer = b""

        def handle_read(self):
            data = self.recv(65536)
            if data and self.echo:
                self.buffer += data

        def writable(self):
            return bool(self.buffer)

        def handle_write(self):
            sent = self.send(self.buffer)
            self.buffer = self.buffer[sent:]

        def handle_close(self):
            self.close()

        def handle_error(self):
            note_error(self)

    class ManagedHandler(asyncore.dispatcher_with_send):
        """dispatcher_with_send; readable()/writable() not overridden."""

        def handle_read(self):
            data = self.recv(65536)
            if data:
                self.send(data)

        def handle_close(self):
            self.close()

        def handle_error(self):
            note_error(self)

    class ChatLines(asynchat.async_chat):
        """async_chat line echo: terminator b"\\n", one push per line."""

        def __init__(self, sock, map):
            asynchat.async_chat.__init__(self, sock, map=map)
            self.set_terminator(b"\n")
            self.parts = []

        def collect_incoming_data(self, data):
            self.parts.append(data)

        def found_terminator(self):
            self.parts.append(b"\n")
            self.push(b"".join(self.parts))
            self.parts = []

        def handle_close(self):
            self.close()

        def handle_error(self):
            note_error(self)

    consumed = stats["consumed"]

    class ChatFlood(asynchat.async_chat):
        """async_chat fed a stream of b"\\n" only: counts the terminators."""

        def __init__(self, sock, map):
            asynchat.async_chat.__init__(self, sock, map=map)
            self.set_terminator(b"\n")

        def collect_incoming_data(self, data):
            consumed[0] += len(data)

        def found_terminator(self):
            consumed[0] += 1

        def handle_close(self):
            self.close()

        def handle_error(self):
            note_error(self)

    handler = {"docs": DocsHandler, "oneway": DocsHandler, "managed": ManagedHandler,
               "chat-lines": ChatLines, "chat-flood": ChatFlood}[pattern]

    class Server(asyncore.dispatcher):
        def __init__(self):
            asyncore.dispatcher.__init__(self, map=chan_map)
            self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
            self.set_reuse_addr()
            self.bind((HOST, 0))
            self.listen(4096)

        def handle_accept(self):
            # Accept everything queued (setting up 10,000 idle connections one
            # accept per iteration would be quadratic in the stdlib loop).
            while True:
                pair = self.accept()
                if pair is None:
                    return
                sock, _ = pair
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                handler(sock, chan_map)

        def handle_error(self):
            note_error(self)

    return Server()


def serve_asyncore(args):
    asyncore, asynchat, use_poll = asyncore_impl(args.impl)
    chan_map = {}
    stats = {"errors": 0, "first_error": None, "consumed": [0]}
    consumed = stats["consumed"]
    server = make_asyncore_server(asyncore, asynchat, args.pattern, chan_map, stats)
    print("PORT %d" % server.socket.getsockname()[1], flush=True)
    watch = StdinWatch()
    loop = asyncore.loop
    monotonic = time.monotonic
    start = monotonic()
    deadline = start + args.max_seconds
    samples = [(start, 0, 0)]
    it = 0
    next_sample = start + 0.01
    while True:
        loop(timeout=0.01, use_poll=use_poll, map=chan_map, count=1)
        it += 1
        t = monotonic()
        if t >= next_sample:
            samples.append((t, it, consumed[0]))
            next_sample = t + 0.01
            if t >= deadline or watch.closed():
                break
    asyncore.close_all(map=chan_map)
    stats["consumed"] = consumed[0]
    return {"samples": samples, "iterations": it, **stats}


def serve_asyncio(args):
    import asyncio
    stats = {"errors": 0, "first_error": None}
    oneway = args.pattern == "oneway"
    if args.pattern not in ("docs", "managed", "oneway"):
        raise SystemExit("asyncio server: no %s pattern" % args.pattern)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data):
            if not oneway:
                self.transport.write(data)

    loop = new_event_loop(args.impl)
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(Echo, HOST, 0, backlog=4096, reuse_address=True))
    print("PORT %d" % server.sockets[0].getsockname()[1], flush=True)
    stop = loop.create_future()

    def on_stdin():
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data and not stop.done():
            stop.set_result(None)

    os.set_blocking(0, False)
    loop.add_reader(0, on_stdin)
    loop.call_later(args.max_seconds, lambda: stop.done() or stop.set_result(None))
    loop.run_until_complete(stop)
    loop.remove_reader(0)
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.close()
    return {"samples": [], "iterations": None, **stats}


def cmd_serve(args):
    raise_nofile()
    if args.impl in ("asyncio", "uvloop"):
        res = serve_asyncio(args)
    else:
        res = serve_asyncore(args)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# --------------------------------------------------------------------------
# W4: the client under test

def _parse_need(buf):
    """Bytes of the first complete response in buf, or None if not known yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    length = 0
    for line in buf[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return end + 4 + length


def w4_asyncore(impl, port, conns, rounds, deadline):
    asyncore, _, use_poll = asyncore_impl(impl)
    chan_map = {}
    state = {"requests": 0, "errors": 0, "first_error": None}

    class HTTPClient(asyncore.dispatcher):
        """The asyncore docs' http_client, doing ``rounds`` requests per connection."""

        def __init__(self):
            asyncore.dispatcher.__init__(self, map=chan_map)
            self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
            self.connect((HOST, port))
            self.buffer = HTTP_REQ
            self.inbuf = b""
            self.need = None
            self.left = rounds

        def handle_connect(self):
            pass

        def handle_close(self):
            self.close()

        def handle_error(self):
            state["errors"] += 1
            if state["first_error"] is None:
                state["first_error"] = repr(sys.exc_info()[1])
            self.close()

        def writable(self):
            return len(self.buffer) > 0

        def handle_write(self):
            sent = self.send(self.buffer)
            self.buffer = self.buffer[sent:]

        def handle_read(self):
            data = self.recv(8192)
            if not data:
                return
            self.inbuf += data
            while True:
                if self.need is None:
                    self.need = _parse_need(self.inbuf)
                    if self.need is None:
                        return
                if len(self.inbuf) < self.need:
                    return
                self.inbuf = self.inbuf[self.need:]
                self.need = None
                state["requests"] += 1
                self.left -= 1
                if self.left <= 0:
                    self.close()
                    return
                self.buffer = HTTP_REQ

    for _ in range(conns):
        HTTPClient()
    loop = asyncore.loop
    while chan_map:
        if time.monotonic() > deadline:
            asyncore.close_all(map=chan_map)
            raise SystemExit("W4 client: deadline passed")
        loop(timeout=0.05, use_poll=use_poll, map=chan_map, count=1)
    return state


def w4_asyncio(impl, port, conns, rounds, deadline):
    import asyncio
    state = {"requests": 0, "errors": 0, "first_error": None}

    class Client(asyncio.Protocol):
        def __init__(self, done):
            self.done = done
            self.inbuf = b""
            self.need = None
            self.left = rounds

        def connection_made(self, transport):
            self.transport = transport
            transport.write(HTTP_REQ)

        def data_received(self, data):
            self.inbuf += data
            while True:
                if self.need is None:
                    self.need = _parse_need(self.inbuf)
                    if self.need is None:
                        return
                if len(self.inbuf) < self.need:
                    return
                self.inbuf = self.inbuf[self.need:]
                self.need = None
                state["requests"] += 1
                self.left -= 1
                if self.left <= 0:
                    self.transport.close()
                    if not self.done.done():
                        self.done.set_result(None)
                    return
                self.transport.write(HTTP_REQ)

        def connection_lost(self, exc):
            if not self.done.done():
                self.done.set_result(None)

    async def one(loop):
        done = loop.create_future()
        await loop.create_connection(lambda: Client(done), HOST, port)
        await done

    async def job(loop):
        await asyncio.wait_for(asyncio.gather(*(one(loop) for _ in range(conns))),
                               max(1.0, deadline - time.monotonic()))

    loop = new_event_loop(impl)
    try:
        loop.run_until_complete(job(loop))
    finally:
        loop.close()
    return state


def cpu_split():
    """(utime, stime) of this process (getrusage: the /proc numbers at µs
    resolution; Linux splits its exact total by where the timer ticks fell,
    so over a short window the split is a sample, the sum is not)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def cpu_seconds():
    """utime+stime of this process."""
    return sum(cpu_split())


MAX_W4_BATCHES = 50     # a bound on --min-seconds' repeats


def cmd_w4client(args):
    raise_nofile()
    fn = w4_asyncio if args.impl in ("asyncio", "uvloop") else w4_asyncore
    deadline = time.monotonic() + args.timeout
    if args.warmup_conns:
        fn(args.impl, args.port, args.warmup_conns, args.rounds, deadline)
    la0 = os.getloadavg()[0]
    (u0, s0), t0 = cpu_split(), time.perf_counter()
    # Whole batches (conns connections x rounds requests each) until the
    # window is at least --min-seconds long: one batch of the default
    # 1,000 x 20 takes 0.3-0.4 s here, shorter than the other rows' windows.
    state = fn(args.impl, args.port, args.conns, args.rounds, deadline)
    batches = 1
    while (time.perf_counter() - t0 < args.min_seconds and not state["errors"]
           and batches < MAX_W4_BATCHES):
        more = fn(args.impl, args.port, args.conns, args.rounds, deadline)
        state["requests"] += more["requests"]
        state["errors"] += more["errors"]
        state["first_error"] = state["first_error"] or more["first_error"]
        batches += 1
    t1, (u1, s1) = time.perf_counter(), cpu_split()
    res = {"ok": True, "requests": state["requests"], "elapsed": t1 - t0,
           "client_cpu": (u1 - u0) + (s1 - s0), "client_user": u1 - u0, "client_sys": s1 - s0,
           "batches": batches, "loadavg_before": la0, "loadavg_after": os.getloadavg()[0],
           "errors": state["errors"], "first_error": state["first_error"],
           "process_cpu": cpu_seconds()}
    print(json.dumps(res), flush=True)
    return 0


# --------------------------------------------------------------------------
# Micro-benchmarks (issue 3), in one process so that the ratios are side by side

def _micro_impls(names):
    """[(name, asyncore, asynchat, use_poll)] of the available micro impls."""
    out, skipped = [], []
    for name in names:
        base = name[:-5] if name.endswith("-poll") else name
        base = base[:-7] if base.endswith("-select") else base
        use_poll = name.endswith("-poll")
        if base == "asyncore":
            try:
                a, c, _ = stdlib_modules()
            except ImportError as exc:
                skipped.append((name, "no stdlib asyncore (%s)" % exc))
                continue
            out.append((name, a, c, use_poll, None))
        else:
            from fastasyncore import asyncore as a, asynchat as c, _backend
            backend = base.split("-")[1]
            try:
                _backend.load(backend if backend == "pure" else "cffi")
                if backend == "cffi":
                    from fastasyncore import _cffi  # noqa: F401
            except ImportError as exc:
                skipped.append((name, "backend %s unavailable: %s" % (backend, exc)))
                continue
            out.append((name, a, c, use_poll, backend))
    return out, skipped


def _use_backend(backend):
    if backend is not None:
        from fastasyncore import _backend
        if _backend.BACKEND != backend:
            _backend.set_backend(backend)


def _cpu():
    return time.process_time()


def _idle_channel_class(asyncore, asynchat, kind):
    if kind == "managed-dws":
        class C(asyncore.dispatcher_with_send):
            def handle_read(self):
                self.recv(4096)
    elif kind == "managed-chat":
        class C(asynchat.async_chat):
            def __init__(self, sock, map):
                asynchat.async_chat.__init__(self, sock, map=map)
                self.set_terminator(b"\n")

            def collect_incoming_data(self, data):
                pass

            def found_terminator(self):
                pass
    else:
        class C(asyncore.dispatcher):
            def __init__(self, sock, map):
                asyncore.dispatcher.__init__(self, sock, map=map)
                self.buffer = b""

            def handle_read(self):
                self.buffer += self.recv(4096)

            def writable(self):
                return bool(self.buffer)
    return C


def _timed_per_iter(fn, target_s, repeats):
    """CPU seconds per call of fn(count) / count, count picked to take about target_s."""
    count = 1
    while True:
        c0 = _cpu()
        fn(count)
        dt = _cpu() - c0
        if dt >= target_s / 4 or count >= 1 << 22:
            break
        count *= 4
    count = max(1, int(count * target_s / max(dt, 1e-6)))
    per = []
    for _ in range(repeats):
        c0, w0 = _cpu(), time.perf_counter()
        fn(count)
        per.append(((_cpu() - c0) / count, (time.perf_counter() - w0) / count))
    return count, per


def micro_writable_floor(n_idle, target_s, repeats):
    """The Python floor for channels that override writable(): n calls per iteration."""

    class Docs:
        accepting = False

        def __init__(self):
            self.buffer = b""

        def writable(self):
            return bool(self.buffer)

    objs = [Docs() for _ in range(n_idle)]

    def run(count):
        for _ in range(count):
            for obj in objs:
                obj.writable()

    count, per = _timed_per_iter(run, target_s, repeats)
    return {"bench": "micro_idle", "kind": "override", "impl": "floor",
            "what": "only %d writable() calls per iteration, no loop" % n_idle,
            "idle": n_idle, "count": count, "runs_us": [p[0] * 1e6 for p in per],
            "wall_us": [p[1] * 1e6 for p in per]}


def micro_idle(impls, kinds, n_idle, target_s, repeats, progress):
    rows = []
    for kind in kinds:
        for name, asyncore, asynchat, use_poll, backend in impls:
            progress("micro_idle %s %s (%d idle channels)" % (kind, name, n_idle))
            _use_backend(backend)
            row = {"bench": "micro_idle", "kind": kind, "impl": name, "idle": n_idle}
            cls = _idle_channel_class(asyncore, asynchat, kind)
            chan_map = {}
            pairs = []
            try:
                for _ in range(n_idle):
                    a, b = socket.socketpair()
                    pairs.append((a, b))
                    cls(a, map=chan_map)
                loop = asyncore.loop
                try:
                    loop(timeout=0, use_poll=use_poll, map=chan_map, count=3)  # warm-up
                except (ValueError, OSError) as exc:
                    row.update(error="%s: %s" % (type(exc).__name__, exc))
                    rows.append(row)
                    continue
                # pick a count that takes about target_s
                count, per = _timed_per_iter(
                    lambda n: loop(timeout=0, use_poll=use_poll, map=chan_map, count=n),
                    target_s, repeats)
                row.update(count=count, runs_us=[p[0] * 1e6 for p in per],
                           wall_us=[p[1] * 1e6 for p in per])
                rows.append(row)
            finally:
                asyncore.close_all(map=chan_map)
                for a, b in pairs:
                    a.close()
                    b.close()
        if kind == "override":
            progress("micro_idle override floor: %d writable() calls" % n_idle)
            rows.append(micro_writable_floor(n_idle, target_s, repeats))
    return rows


def micro_send_floor(sizes, repeats, deadline):
    """The floor of micro_sendbuf: plain non-blocking socket sends of 64 KiB
    memoryview slices over the same socketpair shape, no asyncore."""
    import select
    rows = []
    for size in sizes:
        data = b"x" * size
        runs = []
        for _ in range(repeats):
            a, b = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            buf = bytearray(65536)
            view = memoryview(data)
            c0, w0 = _cpu(), time.perf_counter()
            off = got = 0
            while got < size:
                if time.monotonic() > deadline:
                    raise SystemExit("micro_sendbuf floor: deadline passed")
                select.select([], [a], [], 0)
                if off < size:
                    try:
                        off += a.send(view[off:off + 65536])
                    except (BlockingIOError, InterruptedError):
                        pass
                got += _drain(b, buf)
            runs.append((_cpu() - c0, time.perf_counter() - w0))
            a.close()
            b.close()
        rows.append({"bench": "micro_sendbuf", "impl": "floor", "bytes": size,
                     "what": "raw socket sends of 64 KiB slices",
                     "runs_s": [r[0] for r in runs], "wall_s": [r[1] for r in runs]})
    return rows


def _drain(sock, buf):
    got = 0
    while True:
        try:
            n = sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return got
        if not n:
            return got
        got += n


def micro_sendbuf(impls, sizes, repeats, progress, deadline):
    rows = []
    for name, asyncore, asynchat, use_poll, backend in impls:
        _use_backend(backend)

        class S(asyncore.dispatcher_with_send):
            def readable(self):      # nothing to read; keep it out of the way
                return False

        for size in sizes:
            progress("micro_sendbuf %s %d MiB" % (name, size >> 20))
            data = b"x" * size
            runs = []
            for _ in range(repeats):
                a, b = socket.socketpair()
                b.setblocking(False)
                buf = bytearray(65536)
                chan_map = {}
                s = S(a, map=chan_map)
                c0, w0 = _cpu(), time.perf_counter()
                s.send(data)
                got = 0
                while got < size:
                    if time.monotonic() > deadline:
                        raise SystemExit("micro_sendbuf: deadline passed")
                    asyncore.loop(timeout=0, use_poll=use_poll, map=chan_map, count=1)
                    got += _drain(b, buf)
                runs.append((_cpu() - c0, time.perf_counter() - w0))
                s.close()
                b.close()
            rows.append({"bench": "micro_sendbuf", "impl": name, "bytes": size,
                         "runs_s": [r[0] for r in runs], "wall_s": [r[1] for r in runs]})
    return rows


def micro_chat(impls, workloads, repeats, progress, deadline):
    rows = []
    for name, asyncore, asynchat, use_poll, backend in impls:
        _use_backend(backend)

        class Chat(asynchat.async_chat):
            def __init__(self, sock, map):
                asynchat.async_chat.__init__(self, sock, map=map)
                self.set_terminator(b"\n")
                self.count = 0
                self.parts = []

            def collect_incoming_data(self, data):
                self.parts.append(data)

            def found_terminator(self):
                self.count += 1
                if self.parts:
                    b"".join(self.parts)
                    self.parts = []

        for wl, payload, expect in workloads:
            progress("micro_chat %s %s (%d KiB)" % (name, wl, len(payload) >> 10))
            runs = []
            for _ in range(repeats):
                a, b = socket.socketpair()
                b.setblocking(False)
                chan_map = {}
                ch = Chat(a, map=chan_map)
                view = memoryview(payload)
                off = 0
                c0, w0 = _cpu(), time.perf_counter()
                while ch.count < expect:
                    if time.monotonic() > deadline:
                        raise SystemExit("micro_chat: deadline passed")
                    while off < len(payload):
                        try:
                            off += b.send(view[off:off + 65536])
                        except (BlockingIOError, InterruptedError):
                            break
                    asyncore.loop(timeout=0, use_poll=use_poll, map=chan_map, count=1)
                runs.append((_cpu() - c0, time.perf_counter() - w0))
                ch.close()
                b.close()
            rows.append({"bench": "micro_chat", "workload": wl, "impl": name,
                         "bytes": len(payload), "runs_s": [r[0] for r in runs],
                         "wall_s": [r[1] for r in runs]})
    return rows


def cmd_micro(args):
    nofile = raise_nofile()

    def progress(msg):
        print("  [micro] " + msg, file=sys.stderr, flush=True)

    deadline = time.monotonic() + args.timeout
    names = args.impls.split(",")
    impls, skipped = _micro_impls(names)
    res = {"skipped": skipped, "rows": [], "nofile": nofile}
    if args.which == "idle":
        n = args.idle
        if nofile is not None and 2 * n + 64 > nofile:
            n = max(16, (nofile - 64) // 2)
            res["note"] = "RLIMIT_NOFILE %d: %d idle channels instead of %d" % (
                nofile, n, args.idle)
        res["rows"] = micro_idle(impls, ["managed-dws", "managed-chat", "override"], n,
                                 args.target, args.repeats, progress)
    elif args.which == "sendbuf":
        sizes = [int(s) << 20 for s in args.sizes.split(",")]
        res["rows"] = micro_sendbuf(impls, sizes, args.repeats, progress, deadline)
        progress("micro_sendbuf floor: raw socket sends")
        res["rows"] += micro_send_floor(sizes, args.repeats, deadline)
    elif args.which == "chat":
        flood = b"\n" * (args.flood_kib << 10)
        line = b"y" * 1023 + b"\n"
        lines = line * args.lines_kib
        res["rows"] = micro_chat(impls, [("flood", flood, len(flood)),
                                         ("lines", lines, args.lines_kib)],
                                 args.repeats, progress, deadline)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# --------------------------------------------------------------------------
# In-process busy small maps: one process, one socket map, no load generator

BUSY_MSG = 64


def _busy_classes(asyncore, which, state):
    """The channel class of a busy workload (spin, pp_docs, pp_dws)."""

    def note_error(obj):
        state["errors"] += 1
        if state["first_error"] is None:
            state["first_error"] = repr(sys.exc_info()[1])
        obj.close()

    if which in ("spin", "spin_timer"):
        class Spin(asyncore.dispatcher):
            """Stock readable()/writable(): always writable, never anything to read."""

            def handle_read(self):
                self.recv(8192)

            def handle_write(self):
                pass

            def handle_close(self):
                state["closed"] += 1
                self.close()

            def handle_error(self):
                note_error(self)

        return Spin

    if which == "pp_docs":
        class Docs(asyncore.dispatcher):
            """The asyncore docs' pattern: self.buffer, writable() overridden."""

            def __init__(self, sock, map):
                asyncore.dispatcher.__init__(self, sock, map=map)
                self.buffer = b""

            def writable(self):
                return bool(self.buffer)

            def handle_write(self):
                sent = self.send(self.buffer)
                self.buffer = self.buffer[sent:]

            def handle_read(self):
                data = self.recv(8192)
                if data:
                    state["bytes"] += len(data)
                    self.buffer += data          # the reply: the message back

            def handle_close(self):
                state["closed"] += 1
                self.close()

            def handle_error(self):
                note_error(self)

        return Docs

    if which == "pp_dws":
        class Dws(asyncore.dispatcher_with_send):
            """dispatcher_with_send, no predicate overridden; replies via send()."""

            def handle_read(self):
                data = self.recv(8192)
                if data:
                    state["bytes"] += len(data)
                    self.send(data)

            def handle_close(self):
                state["closed"] += 1
                self.close()

            def handle_error(self):
                note_error(self)

        return Dws
    raise ValueError("unknown busy workload %r" % which)


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_busy(cpu):
    """user+nice+system+steal ticks of one CPU (None if unknown); as runner.cpu_busy,
    copied to keep the runner module out of the measured processes."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu%d " % cpu):
                    v = [int(x) for x in line.split()[1:9]]
                    return v[0] + v[1] + v[2] + v[7]
    except (OSError, ValueError, IndexError):
        pass
    return None


def _loop_info():
    """What this process runs for the fastasyncore loop (best effort, for the record)."""
    info = {"FASTASYNCORE_BACKEND": os.environ.get("FASTASYNCORE_BACKEND"),
            "FASTASYNCORE_LOOP": os.environ.get("FASTASYNCORE_LOOP")}
    mod = sys.modules.get("fastasyncore")
    if mod is not None:
        info["backend"] = getattr(mod, "BACKEND", None)
        # fastasyncore._loop.loop_impl() -> "c" | "py" where the C loop exists
        fn = getattr(sys.modules.get("fastasyncore._loop"), "loop_impl", None)
        if callable(fn):
            try:
                info["loop"] = str(fn())
            except Exception as exc:        # best effort: only for the record
                info["loop"] = "? (%s)" % exc
    return info


def busy_run(impl, which, pairs, count, warmup, deadline):
    """One measured run; -> result dict.  fastasyncore's backend and loop come from
    the environment the runner set, as for every worker.  The unit is one loop
    iteration (spin) or one 64-byte message delivered to a channel (pp_*: two
    messages per round trip)."""
    asyncore, _, use_poll = asyncore_impl(impl)
    state = {"errors": 0, "first_error": None, "closed": 0, "bytes": 0}
    cls = _busy_classes(asyncore, which, state)
    chan_map = {}
    socks = []
    loop = asyncore.loop
    monotonic = time.monotonic
    iters = [0]
    try:
        if which in ("spin", "spin_timer"):
            a, b = socket.socketpair()
            socks += [a, b]
            cls(a, map=chan_map)          # b stays open and silent, outside the map
            chunk = 1000
            if which == "spin_timer" and hasattr(asyncore, "call_every"):
                # fastasyncore's loop services in use (a far timer pending):
                # what they cost per iteration; stdlib runs plain spin
                asyncore.call_every(3600, int, map=chan_map)

            def units():
                return iters[0]
        else:
            starters = []
            for _ in range(pairs):
                a, b = socket.socketpair()
                socks += [a, b]
                starters.append(cls(a, map=chan_map))
                cls(b, map=chan_map)
            msg = b"m" * BUSY_MSG
            for ch in starters:         # one side starts; every message is answered
                if which == "pp_docs":
                    ch.buffer = msg
                else:
                    ch.send(msg)
            # a message takes 1 (dws) or 2 (docs) iterations per pair: 50-100
            # messages per chunk of loop(count=...)
            chunk = max(4, 100 // pairs)

            def units():
                return state["bytes"] // BUSY_MSG

        def run_until(target):
            while units() < target:
                if monotonic() > deadline:
                    raise SystemExit("busy %s %s: deadline passed" % (which, impl))
                if state["errors"] or state["closed"] or not chan_map:
                    raise SystemExit("busy %s %s: a channel failed or closed: %s" % (
                        which, impl, state["first_error"]))
                # pp_*: something is always ready; the timeout only bounds a stall
                loop(timeout=0 if which.startswith("spin") else 0.05, use_poll=use_poll,
                     map=chan_map, count=chunk)
                iters[0] += chunk

        run_until(warmup)
        u0, i0 = units(), iters[0]
        cpu_id = None
        try:
            aff = os.sched_getaffinity(0)
            if len(aff) == 1:
                cpu_id = next(iter(aff))
        except (AttributeError, OSError):
            pass
        busy0 = _cpu_busy(cpu_id) if cpu_id is not None else None
        la0 = os.getloadavg()[0]
        c0, w0 = time.process_time(), time.perf_counter()
        run_until(u0 + count)
        c1, w1 = time.process_time(), time.perf_counter()
        busy1 = _cpu_busy(cpu_id) if cpu_id is not None else None
        n, its = units() - u0, iters[0] - i0
        cpu, wall = c1 - c0, w1 - w0
        other = None
        if busy0 is not None and busy1 is not None and wall > 0:
            # /proc/stat counts in ticks: allow 2 ticks of rounding
            other = max(0.0, ((busy1 - busy0 - 2) / _HZ - cpu) / wall)
        return {"ok": True, "workload": which, "impl": impl, "use_poll": use_poll,
                "pairs": pairs if not which.startswith("spin") else 0,
                "channels": len(chan_map),
                "units": n, "iterations": its, "cpu_s": cpu, "wall_s": wall,
                "cpu_us_per_unit": cpu / n * 1e6 if n else None,
                "cpu_us_per_iter": cpu / its * 1e6 if its else None,
                "units_per_s": n / wall if wall > 0 else None,
                "other_load": other, "cpu": cpu_id,
                "loadavg_before": la0, "loadavg_after": os.getloadavg()[0],
                "errors": state["errors"], "first_error": state["first_error"],
                "loop_info": _loop_info()}
    finally:
        try:
            asyncore.close_all(map=chan_map)
        except OSError:
            pass
        for s_ in socks:
            s_.close()


def cmd_busy(args):
    deadline = time.monotonic() + args.timeout
    try:
        res = busy_run(args.impl, args.which, args.pairs, args.count, args.warmup, deadline)
    except SystemExit as exc:
        res = {"ok": False, "error": str(exc)}
    print("RESULT " + json.dumps(res), flush=True)
    return 0 if res.get("ok") else 1


# --------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastasyncore._bench.worker")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--impl", required=True)
    s.add_argument("--pattern", default="docs",
                   choices=["docs", "managed", "oneway", "chat-lines", "chat-flood"])
    s.add_argument("--max-seconds", type=float, default=120.0)
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("w4client")
    s.add_argument("--impl", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--conns", type=int, default=1000)
    s.add_argument("--rounds", type=int, default=20)
    s.add_argument("--warmup-conns", type=int, default=100)
    s.add_argument("--min-seconds", type=float, default=0.0,
                   help="repeat whole batches until the measured window is this long")
    s.add_argument("--timeout", type=float, default=60.0)
    s.set_defaults(func=cmd_w4client)
    s = sub.add_parser("micro")
    s.add_argument("--which", required=True, choices=["idle", "sendbuf", "chat"])
    s.add_argument("--impls", required=True)
    s.add_argument("--idle", type=int, default=8000)
    s.add_argument("--target", type=float, default=0.2, help="seconds per timed run")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--sizes", default="4,32", help="MiB, comma-separated")
    s.add_argument("--flood-kib", type=int, default=1024)
    s.add_argument("--lines-kib", type=int, default=4096)
    s.add_argument("--timeout", type=float, default=300.0)
    s.set_defaults(func=cmd_micro)
    s = sub.add_parser("busy", help="one in-process busy small map workload")
    s.add_argument("--impl", required=True)
    s.add_argument("--which", required=True,
                   choices=["spin", "spin_timer", "pp_docs", "pp_dws"])
    s.add_argument("--pairs", type=int, default=1, help="socketpairs (pp_*)")
    s.add_argument("--count", type=int, required=True,
                   help="measured units: loop iterations (spin) or messages (pp_*)")
    s.add_argument("--warmup", type=int, default=0, help="units before the measurement")
    s.add_argument("--timeout", type=float, default=60.0)
    s.set_defaults(func=cmd_busy)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
