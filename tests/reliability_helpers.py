"""Shared helpers for the reliability tests (tests/test_reliability_*.py).

Everything here is loopback-only and bounded: every pump has an iteration cap
and a wall-clock deadline.
"""

import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import fastasyncore

SRC_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastasyncore.__file__)))


def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def tcp_pair():
    """(client, server) connected TCP sockets on loopback, non-blocking."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    cli = socket.create_connection(lst.getsockname(), timeout=5)
    srv, _ = lst.accept()
    lst.close()
    cli.setblocking(False)
    srv.setblocking(False)
    return cli, srv


def rst_close(sock):
    """Close with SO_LINGER (1, 0): the peer gets a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pump(asyncore, m, until, timeout=5.0, use_poll=False, step=0.01, limit=100000):
    """Run single iterations until until() is true (bounded); returns until()."""
    deadline = time.monotonic() + timeout
    for _ in range(limit):
        if until():
            return True
        if not m or time.monotonic() > deadline:
            break
        asyncore.loop(timeout=step, use_poll=use_poll, map=m, count=1)
    return until()


def drain(sock, into):
    """Read whatever a non-blocking socket has now; returns False at EOF."""
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return False
            into += chunk
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False


def run_child(code, backend_name=None, timeout=60, env=None, **kw):
    """Run ``code`` in a fresh interpreter that imports this checkout."""
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC_ROOT + os.pathsep + e.get("PYTHONPATH", "")
    if backend_name is not None:
        e["FASTASYNCORE_BACKEND"] = backend_name
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, env=e, timeout=timeout, **kw)


def open_fds():
    try:
        return set(os.listdir("/proc/self/fd"))
    except OSError:
        return None
