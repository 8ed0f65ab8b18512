"""fastasyncore.aio.serve(): an asyncore map on the running asyncio loop.

Every test runs on each backend case (``backend`` fixture) and on the default
asyncio loop and uvloop (skipped when uvloop is not importable).
"""

import asyncio
import os
import socket
import sys
import threading
import time

import pytest

from fastasyncore import _loop, aio, asynchat, asyncore


@pytest.fixture(params=["asyncio", "uvloop"])
def aloop(request, backend):
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def amap():
    m = {}
    yield m
    asyncore.close_all(m)


def run(aloop, coro, timeout=10.0):
    return aloop.run_until_complete(asyncio.wait_for(coro, timeout))


errors = []


class Recorded:
    """handle_error() records the exception (and closes, as 3.11 does)."""

    def handle_error(self):
        errors.append(sys.exc_info()[1])
        self.close()


@pytest.fixture(autouse=True)
def no_errors():
    errors.clear()
    yield
    assert errors == []


class DocsEcho(Recorded, asyncore.dispatcher):
    """The docs pattern: a buffer, writable() overridden."""

    def __init__(self, sock, map):
        super().__init__(sock, map=map)
        self.buf = b""

    def handle_read(self):
        self.buf += self.recv(8192)

    def writable(self):
        return bool(self.buf)

    def handle_write(self):
        self.buf = self.buf[self.send(self.buf):]

    def handle_close(self):
        self.close()


class SendEcho(Recorded, asyncore.dispatcher_with_send):
    def handle_read(self):
        data = self.recv(8192)
        if data:
            self.send(data)

    def handle_close(self):
        self.close()


class Server(Recorded, asyncore.dispatcher):
    def __init__(self, handler, map):
        super().__init__(map=map)
        self.handler = handler
        self.create_socket()
        self.set_reuse_addr()
        self.bind(("127.0.0.1", 0))
        self.listen(64)
        self.port = self.socket.getsockname()[1]

    def handle_accepted(self, sock, addr):
        self.handler(sock, self._map)


class Pair(Recorded, asyncore.dispatcher):
    """One end of a socketpair in the map; counts its events."""

    def __init__(self, sock, map):
        super().__init__(sock, map=map)
        self.reads = 0

    def handle_read(self):
        self.reads += 1
        self.recv(100)

    def writable(self):
        return False


async def _echo_clients(port, nclients, nmsgs):
    async def client(i):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for j in range(nmsgs):
            msg = b"%d:%d;" % (i, j) * (1 + j % 50)
            w.write(msg)
            assert await r.readexactly(len(msg)) == msg
        w.close()
        await w.wait_closed()
    await asyncio.gather(*(client(i) for i in range(nclients)))


@pytest.mark.parametrize("handler", [DocsEcho, SendEcho], ids=["docs", "with_send"])
def test_asyncio_clients_against_asyncore_echo(aloop, amap, handler):
    srv = Server(handler, amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await _echo_clients(srv.port, 8, 40)
        # the handlers closed their channels (clients gone): only the listener
        for _ in range(100):
            if len(amap) == 1:
                break
            await asyncio.sleep(0.01)
        assert list(amap.values()) == [srv]
        srv.close()
        await task          # the map is empty: serve() returns

    run(aloop, main())
    assert amap == {}
    assert _loop._wakers == {}


@pytest.mark.parametrize("handler", [DocsEcho, SendEcho], ids=["docs", "with_send"])
def test_bulk_echo_waits_for_writability(aloop, amap, handler):
    # 4 MiB through one channel, read back only once all of it was sent:
    # the echo's sends fill the socket buffer, and only an asyncio writer
    # (no more reads to piggyback on) tells it when to go on.
    srv = Server(handler, amap)
    blob = bytes(range(256)) * (4 << 12)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)

        w.write(blob)
        await w.drain()
        await asyncio.sleep(0.05)       # the echo's sends are stuck by now
        assert await r.readexactly(len(blob)) == blob
        w.close()
        srv.close()
        await task

    run(aloop, main(), timeout=30)


def test_async_chat_lines(aloop, amap):
    class Upper(Recorded, asynchat.async_chat):
        def __init__(self, sock, map):
            super().__init__(sock, map=map)
            self.set_terminator(b"\n")
            self.buf = []

        def collect_incoming_data(self, data):
            self.buf.append(data)

        def found_terminator(self):
            line = b"".join(self.buf)
            self.buf = []
            self.push(line.upper() + b"\n")
            if line == b"quit":
                self.close_when_done()

    srv = Server(Upper, amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        r, w = await asyncio.open_connection("127.0.0.1", srv.port)
        w.write(b"one\ntwo\nthr")
        assert await r.readline() == b"ONE\n"
        assert await r.readline() == b"TWO\n"
        w.write(b"ee\n" + b"x" * 100000 + b"\nquit\n")
        assert await r.readline() == b"THREE\n"
        assert await r.readexactly(100001) == b"X" * 100000 + b"\n"
        assert await r.readline() == b"QUIT\n"
        assert await r.read() == b""            # close_when_done()
        srv.close()
        await task

    run(aloop, main())


def test_confirming_with_select_where_there_is_no_poll(aloop, amap, monkeypatch):
    monkeypatch.setattr(aio, "_select_poll", None)      # as on Windows
    srv = Server(DocsEcho, amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await _echo_clients(srv.port, 3, 10)
        srv.close()
        await task

    run(aloop, main())


def test_select_now_reports_like_poll():
    IN, OUT, NVAL = _loop.POLLIN, _loop.POLLOUT, _loop.POLLNVAL
    a, b = socket.socketpair()
    c = socket.socket()
    closed = c.fileno()
    c.close()
    try:
        assert aio._select_now({}) == []
        assert aio._select_now({a.fileno(): IN | OUT}) == [(a.fileno(), OUT)]
        b.send(b"x")
        assert aio._select_now({a.fileno(): IN}) == [(a.fileno(), IN)]
        got = sorted(aio._select_now({a.fileno(): IN | OUT, closed: IN}))
        assert got == sorted([(a.fileno(), IN | OUT), (closed, NVAL)])
    finally:
        a.close()
        b.close()


def test_asyncore_client_against_asyncio_server(aloop, amap):
    got = []

    class Client(Recorded, asyncore.dispatcher_with_send):
        def __init__(self, port):
            super().__init__(map=amap)
            self.create_socket()
            self.connect(("127.0.0.1", port))
            self.send(b"hello\n")
            self.data = b""

        def handle_read(self):
            self.data += self.recv(100)
            if self.data.endswith(b"\n"):
                got.append(self.data)
                self.close()

    async def handle(reader, writer):
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        keep = Server(SendEcho, amap)       # an idle channel keeps serve() up
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.05)
        # added by another task, outside any handler: picked up at once,
        # not at the next periodic consultation (CONSULT_INTERVAL)
        t0 = time.monotonic()
        Client(port)
        while not got and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.005)
        assert got == [b"HELLO\n"]
        assert time.monotonic() - t0 < aio.CONSULT_INTERVAL / 2
        keep.close()
        await task
        server.close()
        await server.wait_closed()

    run(aloop, main())


def test_cancel_then_loop_finishes(aloop, amap):
    srv = Server(DocsEcho, amap)
    cli = socket.create_connection(("127.0.0.1", srv.port))
    calls = []

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.05)
        assert len(amap) == 2               # accepted
        echo = [o for o in amap.values() if o is not srv][0]
        orig = echo.handle_read
        echo.handle_read = lambda: (calls.append(1), orig())
        task.cancel()
        cli.sendall(b"ping")                # ready while cancelled
        with pytest.raises(asyncio.CancelledError):
            await task
        c0 = time.process_time()
        await asyncio.sleep(0.2)            # no registration is left behind:
        assert time.process_time() - c0 < 0.05      # no spinning on it
        aloop = asyncio.get_running_loop()
        for fd in amap:         # (uvloop answers None: the CPU check covers it)
            assert not aloop.remove_reader(fd) and not aloop.remove_writer(fd)
        return echo

    echo = run(aloop, main())
    assert calls == []
    assert set(amap.values()) == {srv, echo}
    assert _loop._states[id(amap)].thread is None
    cli.settimeout(5)
    t = threading.Thread(target=lambda: asyncore.loop(0.02, map=amap, count=50))
    t.start()
    assert cli.recv(10) == b"ping"
    cli.close()
    t.join()
    assert calls and list(amap.values()) == [srv]


def test_cancel_then_serve_resumes(aloop, amap):
    srv = Server(SendEcho, amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        task = asyncio.ensure_future(aio.serve(amap))
        await _echo_clients(srv.port, 2, 5)
        srv.close()
        await task

    run(aloop, main())


def test_suspended_listener_resumes_on_time(aloop, amap):
    # The accept back-off (EMFILE) suspends a listener: serve() stops
    # watching it and a timer resumes it, with no event to wake it.
    accepted = []
    srv = Server(lambda sock, m: (accepted.append(time.monotonic()), sock.close()), amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.02)
        t0 = time.monotonic()
        _loop.suspend(srv, 0.3)
        cli = socket.create_connection(("127.0.0.1", srv.port))
        await asyncio.sleep(0.15)
        assert accepted == []
        for _ in range(200):
            if accepted:
                break
            await asyncio.sleep(0.01)
        assert accepted and 0.25 <= accepted[0] - t0 < 1.0
        cli.close()
        task.cancel()

    run(aloop, main())


def test_exitnow_ends_serve(aloop, amap):
    a, b = socket.socketpair()

    class Quit(Pair):
        def handle_read(self):
            super().handle_read()
            raise asyncore.ExitNow("stop")

    q = Quit(a, amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.02)
        b.send(b"x")
        with pytest.raises(asyncore.ExitNow, match="stop"):
            await task

    run(aloop, main())
    assert q.reads == 1 and amap == {a.fileno(): q}     # left open
    b.close()


_KBI_CHILD = r"""
import asyncio, socket, sys
from fastasyncore import asyncore, aio, _loop
m = {}
a, b = socket.socketpair()
class P(asyncore.dispatcher):
    def writable(self): return False
    def handle_read(self):
        self.recv(10)
        raise KeyboardInterrupt
P(a, map=m)
async def main():
    t = asyncio.ensure_future(aio.serve(m))
    await asyncio.sleep(0.02)
    b.send(b"x")
    await t
if sys.argv[1] == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
else:
    loop = asyncio.new_event_loop()
try:
    loop.run_until_complete(main())
except KeyboardInterrupt:
    print("KBI", len(m), _loop._states[id(m)].thread is None, _loop._wakers == {})
"""


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_keyboardinterrupt_from_handler_ends_serve(kind, backend):
    # In a child: a KeyboardInterrupt through the test's own process would
    # disturb pytest.
    import subprocess
    from _subproc import subprocess_env
    if kind == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed")
    proc = subprocess.run([sys.executable, "-c", _KBI_CHILD, kind], capture_output=True,
                          text=True, timeout=60,
                          env=subprocess_env(FASTASYNCORE_BACKEND=backend.NAME))
    assert proc.stdout.split() == ["KBI", "1", "True", "True"], proc.stderr


def test_handler_error_routed_like_loop(aloop, amap):
    a, b = socket.socketpair()
    seen = []

    class Boom(Pair):
        def handle_read(self):
            super().handle_read()
            raise ValueError("boom")

        def handle_error(self):
            seen.append(sys.exc_info()[0])
            self.close()

    Boom(a, amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.02)
        b.send(b"x")
        await task                          # handle_error closed it: map empty

    run(aloop, main())
    assert seen == [ValueError]
    b.close()


def test_idle_map_costs_nothing(aloop, amap):
    asked = []

    class Idle(Pair):
        def readable(self):
            asked.append(1)
            return True

    a, b = socket.socketpair()
    Idle(a, amap)
    Server(SendEcho, amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.05)
        n0 = len(asked)
        c0 = time.process_time()
        await asyncio.sleep(0.5)
        cpu = time.process_time() - c0
        task.cancel()
        return cpu, len(asked) - n0

    cpu, nasked = run(aloop, main())
    assert cpu < 0.1, cpu
    assert nasked <= 2, nasked              # CONSULT_INTERVAL = 1 s
    b.close()


def test_map_emptied_inside_handler(aloop, amap):
    a, b = socket.socketpair()
    c, d = socket.socketpair()

    class Closer(Pair):
        def handle_read(self):
            super().handle_read()
            asyncore.close_all(self._map)

    Closer(a, amap)
    Pair(c, amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.02)
        b.send(b"x")
        d.send(b"y")
        await task

    run(aloop, main())
    assert amap == {}
    for s in (b, d):
        s.close()


def test_closed_and_reused_fd_in_one_batch(aloop, amap):
    # A's handler closes B and opens C, which gets B's fd number; B's report
    # in the same batch must not reach C (no data: a recv would fail).
    pairs = [socket.socketpair() for _ in range(2)]
    made = []

    class Killer(Pair):
        def handle_read(self):
            super().handle_read()
            victim = amap[pairs[1][0].fileno()]
            fd = victim._fileno
            victim.close()
            x, y = socket.socketpair()
            made.append((Pair(x, amap), y, fd))

    Killer(pairs[0][0], amap)
    Pair(pairs[1][0], amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.02)
        pairs[1][1].send(b"y")
        pairs[0][1].send(b"x")
        await asyncio.sleep(0.1)
        c, y, fd = made[0]
        assert c.reads == 0
        y.send(b"z")                        # C is registered and served
        for _ in range(100):
            if c.reads:
                break
            await asyncio.sleep(0.01)
        assert c.reads == 1
        task.cancel()

    run(aloop, main())
    for a, b in pairs:
        b.close()
    made[0][1].close()


def test_stale_reports_never_reach_handlers(aloop, amap):
    # Each handler reads exactly what is there; a read without data would
    # raise BlockingIOError, which the Recorded handler would record.
    class Strict(Recorded, asyncore.dispatcher):
        def __init__(self, sock, map):
            super().__init__(sock, map=map)
            self.n = 0

        def handle_read(self):
            assert self.recv(1) == b"."
            self.n += 1

        def writable(self):
            return False

    ends = []
    objs = []
    for _ in range(5):
        a, b = socket.socketpair()
        ends.append(b)
        objs.append(Strict(a, amap))

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        for _ in range(20):
            for b in ends:
                b.send(b".")
            await asyncio.sleep(0)
        for _ in range(200):
            if all(o.n == 20 for o in objs):
                break
            await asyncio.sleep(0.005)
        task.cancel()

    run(aloop, main())
    assert [o.n for o in objs] == [20] * 5
    for b in ends:
        b.close()


def test_one_driver_per_map(aloop, amap):
    a, b = socket.socketpair()
    Pair(a, amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.02)
        with pytest.raises(RuntimeError, match="already being served"):
            await aio.serve(amap)
        res = []

        def other_thread():
            try:
                asyncore.loop(0.01, map=amap, count=2)
            except RuntimeError as e:
                res.append(e)

        t = threading.Thread(target=other_thread)
        t.start()
        await asyncio.get_running_loop().run_in_executor(None, t.join)
        assert len(res) == 1 and "served by fastasyncore.aio.serve()" in str(res[0])
        # and from inside the map's own thread (another task, a handler)
        with pytest.raises(RuntimeError, match="served by"):
            asyncore.loop(0.01, map=amap, use_poll=True, count=1)
        task.cancel()

    run(aloop, main())

    # serve() while loop() runs in another thread
    inside = threading.Event()
    release = threading.Event()

    class Waiting(Pair):
        def readable(self):
            inside.set()
            release.wait(5)
            return True

    c, d = socket.socketpair()
    w = Waiting(c, amap)
    t = threading.Thread(target=lambda: asyncore.loop(0.01, map=amap, count=1))
    t.start()
    assert inside.wait(5)
    try:
        with pytest.raises(RuntimeError, match="being polled by loop"):
            run(aloop, aio.serve(amap))
    finally:
        release.set()
        t.join()
    w.close()
    for s in (b, d):
        s.close()


def test_empty_map_returns_at_once(aloop):
    run(aloop, aio.serve({}), timeout=1)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_serve_and_loop_in_turn_leak_no_fds(aloop, amap):
    a, b = socket.socketpair()
    p = Pair(a, amap)
    asyncore.loop(0.01, map=amap, count=2)      # the map's own poller exists

    async def cycle():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.005)
        b.send(b"x")
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    own = _loop._states[id(amap)].poller
    nfds = len(os.listdir("/proc/self/fd"))
    for i in range(10):
        run(aloop, cycle())
        b.send(b"y")
        asyncore.loop(0.01, map=amap, count=2)
        assert p.reads == 2 * (i + 1)
    assert len(os.listdir("/proc/self/fd")) <= nfds
    assert own is None or own.fileno() == -1    # closed by the first serve()
    assert _loop._states[id(amap)].thread is None
    b.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_example_runs():
    """The README's migration example, on free ports, driven by a check."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## asyncio bridge"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    echo_port, web_port = _free_port(), _free_port()
    code = code.replace("8007", str(echo_port)).replace("8008", str(web_port))
    code = code.replace("asyncio.run(main())", "")
    ns = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), ns)

    async def check():
        task = asyncio.ensure_future(ns["main"]())
        for _ in range(100):
            try:
                r, w = await asyncio.open_connection("127.0.0.1", echo_port)
                break
            except OSError:
                await asyncio.sleep(0.01)
        w.write(b"hi\n")
        assert await r.readline() == b"hi\n"
        r2, w2 = await asyncio.open_connection("127.0.0.1", web_port)
        w2.write(b"\n")
        assert await r2.readline() == b"2 channels\n"     # listener + echo
        w.close()
        for _ in range(100):
            if len(asyncore.socket_map) == 1:
                break
            await asyncio.sleep(0.01)
        asyncore.close_all()
        await asyncio.wait_for(task, 5)         # serve() returned: map empty

    try:
        asyncio.run(check())
    finally:
        asyncore.close_all()


class Quiet(Recorded, asyncore.dispatcher):
    """A channel that keeps the map non-empty and waits for input."""

    def writable(self):
        return False

    def handle_read(self):
        self.recv(100)


def test_loop_services_run_on_the_asyncio_loop(aloop, amap):
    # timers (from outside a batch, from a callback, repeating) and
    # call_soon_threadsafe from another thread, while the map is served
    a, b = socket.socketpair()
    ch = Quiet(a, amap)
    out = []
    t0 = time.monotonic()

    def other_thread():
        time.sleep(0.1)
        sent.append(time.monotonic())
        asyncore.call_soon_threadsafe(
            lambda: out.append(("ts", threading.get_ident())), map=amap)

    sent = []
    every = asyncore.call_every(0.03, lambda: out.append("every"), map=amap)

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0)
        # scheduled by another task while serve() runs
        asyncore.call_later(0.05, lambda: (
            out.append(("later", round(time.monotonic() - t0, 2))),
            asyncore.call_later(0, out.append, "chained", map=amap)), map=amap)
        th = threading.Thread(target=other_thread)
        th.start()
        deadline = time.monotonic() + 3
        while ("ts", threading.get_ident()) not in out or "chained" not in out:
            assert time.monotonic() < deadline, out
            await asyncio.sleep(0.01)
        th.join()
        got = time.monotonic()
        every.cancel()
        ch.close()
        await task
        return got

    run(aloop, main())
    assert any(isinstance(e, tuple) and e[0] == "later" and e[1] >= 0.05 for e in out)
    assert out.index("chained") > [i for i, e in enumerate(out)
                                   if isinstance(e, tuple) and e[0] == "later"][0]
    assert out.count("every") >= 2
    b.close()


def test_call_soon_threadsafe_wakes_a_served_idle_map_promptly(aloop, amap):
    a, b = socket.socketpair()
    ch = Quiet(a, amap)
    lat = []

    async def main():
        task = asyncio.ensure_future(aio.serve(amap))
        await asyncio.sleep(0.05)
        done = asyncio.Event()
        t = []

        def other():
            t.append(time.monotonic())
            asyncore.call_soon_threadsafe(
                lambda: (lat.append(time.monotonic() - t[0]), done.set()), map=amap)

        threading.Thread(target=other).start()
        await asyncio.wait_for(done.wait(), 2)
        ch.close()
        await task

    run(aloop, main())
    assert lat and lat[0] < 0.1
    b.close()
