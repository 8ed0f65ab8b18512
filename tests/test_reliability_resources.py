"""Reliability §4.4 (resource limits) and §4.6 (security): R2..R4, X1, X3, X4,
plus interpreter exit with live dispatchers (§4.7).

R1 (fd >= FD_SETSIZE) is covered by test_loop_contract.py and test_backend.py.
Process-level cases (RLIMIT_NOFILE, SIGPIPE=SIG_DFL, exit) run in subprocesses.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from reliability_helpers import pair, tcp_pair, rst_close, pump, drain, run_child, \
    SRC_ROOT, open_fds


# -- R2: EMFILE on accept -----------------------------------------------------------

EMFILE_SERVER = r"""
import json, os, resource, socket, sys, time
from fastasyncore import asyncore
MODE = %r
m = {}
accepted = []
calls = [0]
errors = []

class Echo(asyncore.dispatcher_with_send):
    def handle_read(self):
        data = self.recv(100)
        if data:
            self.send(data)
    def handle_close(self):
        self.close()

class Server(asyncore.dispatcher):
    def handle_accepted(self, sock, addr):
        accepted.append(1)
        Echo(sock, map=m)
    def handle_accept(self):
        calls[0] += 1
        asyncore.dispatcher.handle_accept(self)
    if MODE == "log-only":
        def handle_error(self):       # common in servers: log, keep going
            errors.append(sys.exc_info()[0].__name__)
    def log_info(self, msg, type="info"):
        errors.append(type)

srv = Server(map=m)
srv.create_socket()
srv.set_reuse_addr()
srv.bind(("127.0.0.1", 0))
srv.listen(50)
asyncore.loop(timeout=0, map=m, count=1)          # the poller exists now
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
hogs = []
try:
    while True:
        hogs.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print(srv.socket.getsockname()[1], flush=True)
sys.stdin.readline()                              # the clients are connected
t0 = time.monotonic()
iters = 0
while time.monotonic() - t0 < 1.0 and iters < 1000000:
    asyncore.loop(timeout=0.1, map=m, count=1)
    iters += 1
listener_alive = m.get(srv._fileno) is srv and srv.socket.fileno() != -1
calls_exhausted = calls[0]
for h in hogs[:30]:
    os.close(h)
t1 = time.monotonic()
while time.monotonic() - t1 < 3 and len(accepted) < 3 and m:
    asyncore.loop(timeout=0.05, map=m, count=1)
t2 = time.monotonic()
while time.monotonic() - t2 < 0.5 and m:
    asyncore.loop(timeout=0.05, map=m, count=1)
print(json.dumps(dict(listener_alive=listener_alive, calls=calls_exhausted,
                      iters=iters, accepted=len(accepted), errors=errors[:5])),
      flush=True)
"""

# Behaviour (docs/reliability.md): accept() under EMFILE/ENFILE/ENOBUFS/ENOMEM
# logs once per episode, stops polling the listener for 0.1 s (doubling up to
# 1 s) and returns None; the listener stays open and service resumes.


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT + /proc")
@pytest.mark.parametrize("mode", ["default", "log-only"])
def test_r2_emfile_on_accept_keeps_listener_and_does_not_spin(backend, mode):
    env = dict(os.environ, PYTHONPATH=SRC_ROOT, FASTASYNCORE_BACKEND=backend.NAME)
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER % mode], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    clients = []
    try:
        port = int(proc.stdout.readline())
        for i in range(3):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"ping%d" % i)
            clients.append(c)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        res = json.loads(proc.stdout.readline())
        echoes = []
        for c in clients:
            try:
                echoes.append(c.recv(100))
            except OSError:
                echoes.append(None)
        proc.wait(20)
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert res["listener_alive"], res
    assert res["calls"] <= 10, res          # no busy loop while exhausted
    assert res["accepted"] == 3, res        # service resumes once fds are freed
    assert echoes == [b"ping0", b"ping1", b"ping2"]


EMFILE_CLIENT = r"""
import os, resource, sys
from fastasyncore import asyncore
m = {}
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
made = []
err = None
for i in range(200):
    d = asyncore.dispatcher(map=m)
    try:
        d.create_socket()
    except OSError as e:
        err = e.errno
        break
    made.append(d)
ok = err in (%d, %d) and len(m) == len(made) and all(m[x._fileno] is x for x in made)
asyncore.close_all(map=m)
print("ok" if ok and not m else "bad %%r %%d %%d" %% (err, len(m), len(made)))
""" % (errno.EMFILE, errno.ENFILE)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT")
def test_r2_client_create_socket_emfile_raises_and_map_stays_clean(backend):
    proc = run_child(EMFILE_CLIENT, backend.NAME)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok", proc.stdout


# -- R3 / R4: allocation failure and 2 GiB+ lengths in the C size arithmetic ------

@pytest.fixture
def core():
    try:
        from fastasyncore._core import ffi, lib
    except ImportError:
        pytest.skip("the C core is not built")
    return ffi, lib


SIZE_MAX = 2**64 - 1


def test_r3_sendq_push_allocation_failure_leaves_queue_unchanged(core):
    ffi, lib = core
    q = ffi.gc(lib.fa_sendq_new(), lib.fa_sendq_free)
    assert lib.fa_sendq_push(q, b"abc", 3) == 0
    fake = ffi.cast("char *", 1)          # never dereferenced: the size check or
    sizes = [SIZE_MAX - 3 + 1, SIZE_MAX]  # malloc fails first
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        sizes.append(2**62)               # ASan aborts on such a request by default
    for n in sizes:
        assert lib.fa_sendq_push(q, fake, n) == -errno.ENOMEM
        assert lib.fa_sendq_len(q) == 3
        assert ffi.unpack(lib.fa_sendq_data(q), 3) == b"abc"
    # still usable
    assert lib.fa_sendq_push(q, b"de", 2) == 0
    assert ffi.unpack(lib.fa_sendq_data(q), 5) == b"abcde"
    assert lib.fa_sendq_consume(q, SIZE_MAX) == 5       # clamped, no wrap
    assert lib.fa_sendq_len(q) == 0


def _small_pair():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_r4_huge_lengths_are_clamped_counts_exact(core):
    ffi, lib = core
    a, b = _small_pair()
    try:
        big = ffi.new("char[]", os.urandom(1 << 20))
        ref = ffi.buffer(big)[:]
        # send: a length far beyond the buffer; the kernel copies only what fits
        # in the socket buffer (< 1 MiB), the count must be exact.
        n = lib.fa_send(a.fileno(), big, SIZE_MAX)
        assert 0 < n < (1 << 20)
        got = bytearray()
        drain(b, got)
        assert bytes(got) == ref[:n]
        # sendv: lens whose sum overflows size_t, max_bytes = SIZE_MAX
        hdr = ffi.new("char[]", b"HEAD!")
        bufs = ffi.new("char *[]", [hdr, big])
        lens = ffi.new("size_t[]", [5, SIZE_MAX])
        n = lib.fa_sendv(a.fileno(), bufs, lens, 2, SIZE_MAX)
        assert 5 < n < (1 << 20)
        got = bytearray()
        drain(b, got)
        assert bytes(got) == (b"HEAD!" + ref)[:n]
        # sendv: max_bytes cuts inside the first chunk
        lens2 = ffi.new("size_t[]", [SIZE_MAX, SIZE_MAX])
        bufs2 = ffi.new("char *[]", [big, big])
        assert lib.fa_sendv(a.fileno(), bufs2, lens2, 2, 7) == 7
        got = bytearray()
        drain(b, got)
        assert bytes(got) == ref[:7]
        # send queue: max_bytes beyond what is queued
        q = ffi.gc(lib.fa_sendq_new(), lib.fa_sendq_free)
        assert lib.fa_sendq_push(q, b"queued", 6) == 0
        assert lib.fa_sendq_send(q, a.fileno(), SIZE_MAX) == 6
        got = bytearray()
        drain(b, got)
        assert bytes(got) == b"queued"
        # scan: a start offset beyond the buffer (no unsigned underflow)
        out = ffi.new("size_t[]", 4)
        for start in (7, 2**31 + 1, 2**63, SIZE_MAX):
            assert lib.fa_scan(b"abc\n", 4, start, b"\n", 1, out, 4) == 0
        assert lib.fa_scan(b"abc\n", 4, 0, b"\n", 1, out, SIZE_MAX) == 1
        assert lib.fa_prefix_at_end(b"ab", 2, b"bcdefgh", 7) == 1
    finally:
        a.close()
        b.close()


def test_r4_python_wrappers_clamp_huge_sizes(backend):
    a, b = _small_pair()
    try:
        assert backend.sendv(a.fileno(), [b"12", b"345"], 2**80) == 5
        q = backend.SendQueue()
        q.push(b"xyz")
        assert q.send(a.fileno(), 2**64 + 1) == 3
        r = backend.recv(b.fileno(), 2**70)
        assert r == b"12345xyz"
        with pytest.raises((ValueError, OverflowError)):
            backend.send(2**40, b"x")
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(os.environ.get("FASTASYNCORE_SLOW_TESTS") != "1",
                    reason="memory heavy (~5 GiB): set FASTASYNCORE_SLOW_TESTS=1")
@pytest.mark.timeout(600)
def test_r4_real_push_beyond_2gib(backend):
    q = backend.SendQueue()
    blob = bytearray(2**31 + 10)
    blob[-10:] = b"0123456789"
    q.push(blob)
    del blob
    assert len(q) == 2**31 + 10
    q.consume(2**31)
    assert len(q) == 10 and q.getvalue() == b"0123456789"


# -- X1: TLS sockets never take the plain-fd fast path -------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    key, cert = str(d / "key.pem"), str(d / "cert.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj",
                    "/CN=localhost"], check=True, capture_output=True, timeout=60)
    return key, cert


def _tls_pair(tls_files):
    import ssl
    key, cert = tls_files
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    a, b = socket.socketpair()
    out = {}

    def server():
        out["s"] = sctx.wrap_socket(a, server_side=True)

    t = threading.Thread(target=server)
    t.start()
    c = cctx.wrap_socket(b, server_hostname="localhost")
    t.join(10)
    s = out["s"]
    s.setblocking(False)
    c.setblocking(False)
    return s, c


@pytest.mark.parametrize("sender", ["async_chat", "dispatcher_with_send"])
def test_x1_tls_sockets_bytes_intact(backend, use_poll, tls_files, sender):
    import ssl
    from fastasyncore import asyncore, asynchat
    m = {}
    s, c = _tls_pair(tls_files)
    records = [bytes([65 + i]) * 100 for i in range(2)]
    got = bytearray()

    class Client(asyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            try:
                got.extend(self.recv(10))
                while self.socket.pending():          # drain what poll can't see
                    got.extend(self.recv(10))
            except ssl.SSLWantReadError:
                pass

    if sender == "async_chat":
        class Server(asynchat.async_chat):
            def collect_incoming_data(self, data):
                pass

            def found_terminator(self):
                pass

        srv = Server(s, map=m)
        for r in records:
            srv.push(r)
    else:
        srv = asyncore.dispatcher_with_send(s, map=m)
        for r in records:
            srv.send(r)
    Client(c, map=m)
    try:
        pump(asyncore, m, lambda: len(got) >= 200, timeout=5, use_poll=use_poll)
        assert bytes(got) == b"".join(records)
    finally:
        asyncore.close_all(map=m)


# -- X3: SIGPIPE with SIG_DFL (dispatcher level, subprocess) --------------------

SIGPIPE_CHILD = r"""
import select, signal, socket, struct, sys, time
from fastasyncore import asyncore, asynchat
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
KIND = %r
def connected_then_reset(make):
    # the dispatcher is made on a live connection, then the peer resets
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
    c = socket.create_connection(l.getsockname()); s, _ = l.accept(); l.close()
    d = make(c)
    assert d.connected
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    select.select([c], [], [], 5)     # the RST has arrived
    return d
closes = []
m = {}
if KIND == "dispatcher":
    class Keep(asyncore.dispatcher):
        def handle_close(self):          # does not close: keeps writing
            closes.append(1)
    d = connected_then_reset(lambda s: Keep(s, map=m))
    r = [d.send(b"x" * 1000) for _ in range(10)]
    assert r[-1] == 0, r
elif KIND == "dispatcher_with_send":
    w = connected_then_reset(lambda s: asyncore.dispatcher_with_send(s, map=m))
    w.handle_close = lambda: closes.append(1)
    for _ in range(10):
        w.send(b"y" * 1000)
else:
    class Chat(asynchat.async_chat):
        def handle_close(self):          # does not close: keeps writing
            closes.append(1)
    ch = connected_then_reset(lambda s: Chat(s, map=m))
    for _ in range(10):
        ch.push(b"z" * 1000)
        ch.push(b"z" * 1000)
    ch.push_with_producer(asynchat.simple_producer(b"p" * 5000, 100))
    for _ in range(10):
        ch.initiate_send()
print("alive", sorted(set(closes)))
"""

@pytest.mark.skipif(not hasattr(signal, "SIGPIPE"), reason="no SIGPIPE")
@pytest.mark.parametrize("kind", ["dispatcher", "dispatcher_with_send", "async_chat"])
def test_x3_sigpipe_default_handler_no_death(backend, kind, request):
    proc = run_child(SIGPIPE_CHILD % kind, backend.NAME)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.strip() == "alive [1]", proc.stdout


# -- X4: fds the library creates are not inherited --------------------------------

@pytest.mark.skipif(open_fds() is None, reason="needs /proc/self/fd")
def test_x4_library_fds_are_non_inheritable(backend, use_poll):
    from fastasyncore import asyncore
    before = open_fds()
    m = {}
    s, peer = pair()
    d = asyncore.dispatcher(s, map=m)
    d.writable = lambda: False
    srv = asyncore.dispatcher(map=m)
    srv.create_socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        asyncore.loop(timeout=0, use_poll=use_poll, map=m, count=1)
        new = open_fds() - before
        assert new, "expected some new fds"
        for fd in new:
            try:
                assert not os.get_inheritable(int(fd)), fd
            except OSError:
                pass            # the listdir fd itself, already closed
    finally:
        asyncore.close_all(map=m)
        peer.close()


# -- §4.7: interpreter exit with live dispatchers ----------------------------------

EXIT_CHILD = r"""
import socket, sys
from fastasyncore import asyncore, asynchat
m = {}
class D(asynchat.async_chat):
    def collect_incoming_data(self, data): pass
    def found_terminator(self): sys.exit(3)
a, b = socket.socketpair()
c, d = socket.socketpair()
x = D(a, map=m); x.set_terminator(b"\n")
y = asyncore.dispatcher_with_send(c, map=m); y.send(b"pending" * 100000)
b.send(b"go\n")
asyncore.loop(timeout=1, map=m)
"""


def test_exit_with_live_dispatchers_is_quiet(backend):
    proc = run_child(EXIT_CHILD, backend.NAME)
    assert proc.returncode == 3
    assert proc.stderr == ""
