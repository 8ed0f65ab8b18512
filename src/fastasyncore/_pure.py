"""The pure-Python backend: the reference twin of ``fastasyncore._cffi``.

Implements docs/backend-interface.md on the ``select`` module (epoll, kqueue,
poll or select) and ``socket``. It mirrors the C core's behaviour, including
the poll(2) emulation for fds that epoll refuses (EBADF -> POLLNVAL, EPERM ->
always ready), so that one test body checks both backends.
"""

import errno as _errno
import math as _math
import os as _os
import select as _select
import socket as _socket
import sys as _sys
import threading as _threading
from typing import Dict, List, Sequence, Tuple

__all__ = [
    "NAME", "POLLER_KINDS", "POLLIN", "POLLPRI", "POLLOUT", "POLLERR",
    "POLLHUP", "POLLNVAL", "POLLFAULT", "FAULT_SHIFT", "Poller", "send", "recv", "sendv", "SendQueue",
    "scan", "prefix_at_end", "poll_list",
]

NAME = "pure"

# poll(2)'s values; also the select module's on Linux and the BSDs.
POLLIN = 0x01
POLLPRI = 0x02
POLLOUT = 0x04
POLLERR = 0x08
POLLHUP = 0x10
POLLNVAL = 0x20

_INTEREST = POLLIN | POLLPRI | POLLOUT
_REPORTED = 0x3F
# Not a poll(2) bit: the kernel refused the fd (register/modify) with the
# errno in the bits from FAULT_SHIFT up; reported once (fastasyncore.h).
POLLFAULT = 0x8000
FAULT_SHIFT = 16
# _refused modes (fa_poller.c's REF_*)
_REF_READY, _REF_NVAL, _REF_FAULT, _REF_SILENT = 0, 1, 2, 3
_INT_MAX = 2**31 - 1
_RECV_MAX = 65536
_IOV_MAX = 1024
_MAX_IO = 1 << 30
FD_SETSIZE = 512 if _sys.platform == "win32" else 1024
# MSG_NOSIGNAL where the kernel has it; SO_NOSIGPIPE on Apple (as in C).
if _sys.platform == "darwin":
    _MSG_NOSIGNAL = 0
    _SO_NOSIGPIPE = getattr(_socket, "SO_NOSIGPIPE", 0x1022)
else:
    _MSG_NOSIGNAL = getattr(_socket, "MSG_NOSIGNAL", 0)
    _SO_NOSIGPIPE = 0 if _MSG_NOSIGNAL else getattr(_socket, "SO_NOSIGPIPE", 0)


def _select_bits_are_poll_bits() -> bool:
    names = ("POLLIN", "POLLPRI", "POLLOUT", "POLLERR", "POLLHUP", "POLLNVAL")
    values = (POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP, POLLNVAL)
    return all(getattr(_select, n, v) == v for n, v in zip(names, values))


# Translation between the select module's poll bits and poll(2)'s canonical
# ones (identity everywhere we know of; kept for exotic platforms).
_SAME_BITS = _select_bits_are_poll_bits()
if _SAME_BITS:
    def _from_select(bits: int) -> int:
        return bits & _REPORTED

    def _to_select(bits: int) -> int:
        return bits
else:  # pragma: no cover - no such platform in CI
    _PAIRS = [(getattr(_select, n, 0), v) for n, v in (
        ("POLLIN", POLLIN), ("POLLPRI", POLLPRI), ("POLLOUT", POLLOUT),
        ("POLLERR", POLLERR), ("POLLHUP", POLLHUP), ("POLLNVAL", POLLNVAL))]

    def _from_select(bits: int) -> int:
        return sum(v for s, v in _PAIRS if bits & s)

    def _to_select(bits: int) -> int:
        return sum(s for s, v in _PAIRS if bits & v)


def _can_use(kind: str) -> bool:
    """Probe the syscall, like selectors._can_use: hasattr is not enough."""
    try:
        if kind == "epoll":
            _select.epoll().close()
        elif kind == "kqueue":
            _select.kqueue().close()
        elif kind == "poll":
            _select.poll().poll(0)
        elif kind == "select":
            return hasattr(_select, "select")
        else:
            return False
        return True
    except (AttributeError, OSError):
        return False


POLLER_KINDS: Tuple[str, ...] = tuple(
    k for k in ("epoll", "kqueue", "poll", "select") if _can_use(k))


def _check_fd(fd: int) -> int:
    if not isinstance(fd, int):
        raise TypeError("fd must be an int, not %s" % type(fd).__name__)
    if fd < 0:
        raise ValueError("fd must be >= 0, got %d" % fd)
    if fd > _INT_MAX:
        raise OverflowError("fd %d is too large" % fd)
    return fd


def _fd_is_closed(fd: int) -> bool:
    try:
        _os.fstat(fd)
    except OSError as exc:
        return exc.errno == _errno.EBADF
    return False


class Poller:
    """A persistent level-triggered readiness set over the ``select`` module.

    Not thread-safe: use one poller per thread, like the ``select`` objects.
    """

    def __init__(self, kind: "str | None" = None) -> None:
        if kind is None:
            kind = POLLER_KINDS[0]
        if kind not in POLLER_KINDS:
            raise ValueError("unknown poller kind %r (available here: %s)"
                             % (kind, ", ".join(POLLER_KINDS)))
        self.kind = kind
        self.closed = False
        self._reg: Dict[int, int] = {}       # recorded interest
        self._pending: Dict[int, int] = {}   # changes not yet applied
        self._kreg: Dict[int, int] = {}      # what the kernel object holds
        # fd -> (events, mode, errno): the poll(2) emulation (fa_poller.c)
        self._refused: Dict[int, Tuple[int, int, int]] = {}
        self._sweep_pos = 0
        if kind == "epoll":
            self._obj = _select.epoll()  # EPOLL_CLOEXEC, as in C
        elif kind == "kqueue":
            self._obj = _select.kqueue()
        elif kind == "poll":
            self._obj = _select.poll()
        else:
            self._obj = None

    # -- the interface --------------------------------------------------------

    def modify(self, fd: int, events: int) -> None:
        """Set fd's interest to events (0 removes); applied at the next wait()."""
        _check_fd(fd)
        if not isinstance(events, int):
            raise TypeError("events must be an int")
        events &= _INTEREST
        if events and self.kind == "select" and fd >= FD_SETSIZE:
            raise ValueError("fd %d >= FD_SETSIZE (%d) cannot be used with select()"
                             % (fd, FD_SETSIZE))
        if events:
            self._pending[fd] = events
            self._reg[fd] = events
            return
        # Removal is applied at once: the caller is about to close fd, and an
        # epoll registration outlives the close when the file description
        # does (dup, fork, file_dispatcher); see fa_poller_apply in C.
        self._reg.pop(fd, None)
        self._pending.pop(fd, None)
        if not self.closed:
            self._refused.pop(fd, None)
            getattr(self, "_change_" + self.kind)(fd, 0)

    def update(self, changes: Dict[int, int]) -> None:
        """Record many interest changes at once (the loop's per-iteration batch).

        For fds already validated by modify(); every value must be a non-zero
        interest mask (removals go through modify(fd, 0), which is immediate).
        """
        self._pending.update(changes)
        self._reg.update(changes)

    def registered(self) -> Dict[int, int]:
        return dict(self._reg)

    def fileno(self) -> int:
        if self.closed or self._obj is None or self.kind == "poll":
            return -1
        return self._obj.fileno()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.kind in ("epoll", "kqueue"):
                self._obj.close()  # a wait running in another thread gets EBADF or returns
            self._pending.clear()
            self._kreg.clear()
            self._refused.clear()

    def __enter__(self) -> "Poller":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, timeout_ms: int) -> List[Tuple[int, int]]:
        """Apply pending changes, wait up to timeout_ms (< 0 blocks), return ready pairs."""
        if self.closed:
            raise ValueError("I/O operation on a closed poller")
        if type(timeout_ms) is int:     # the loop's case: no float round trip
            tmo = -1 if timeout_ms < 0 else (
                timeout_ms if timeout_ms <= _INT_MAX else _INT_MAX)
        elif timeout_ms is None or timeout_ms < 0:
            tmo = -1
        else:
            tmo = min(int(_math.ceil(timeout_ms)), _INT_MAX)
        if self._pending:
            self._apply()
        out: List[Tuple[int, int]] = []
        if self._refused:
            refused = self._refused
            for fd, (ev, mode, err) in list(refused.items()):
                if mode == _REF_NVAL:
                    out.append((fd, POLLNVAL))
                elif mode == _REF_READY:
                    if ev & (POLLIN | POLLOUT):
                        out.append((fd, ev & (POLLIN | POLLOUT)))
                elif mode == _REF_FAULT:
                    out.append((fd, POLLFAULT | err << FAULT_SHIFT))
                    refused[fd] = (ev, _REF_SILENT, err)
            if out:
                tmo = 0  # poll(2) would not block either
        kind = self.kind
        # The select module retries EINTR itself with the remaining time and
        # runs signal handlers (PEP 475); one that raises propagates.
        if kind == "epoll":
            kreg = self._kreg
            ready = self._obj.poll(-1 if tmo < 0 else tmo / 1000.0, len(kreg) or 1)
            if ready:
                # (an fd not in kreg: a stale registration, see fa_poller.c)
                out += [(fd, ev & _REPORTED) for fd, ev in ready if fd in kreg]
            if not out and tmo != 0:
                self._sweep_closed()
        elif kind == "poll":
            ready = self._obj.poll(tmo)
            if ready:
                if _SAME_BITS:
                    out += [(fd, ev & _REPORTED) for fd, ev in ready]
                else:  # pragma: no cover - no such platform in CI
                    out += [(fd, _from_select(ev)) for fd, ev in ready]
        elif kind == "kqueue":
            out.extend(self._kqueue_wait(tmo))
            if not out and tmo != 0:
                self._sweep_closed()
        else:
            out.extend(self._select_wait(tmo))
        return out

    def __repr__(self) -> str:
        return "<fastasyncore._pure.Poller kind=%s fds=%d%s>" % (
            self.kind, len(self._reg), " closed" if self.closed else "")

    def _sweep_closed(self) -> None:
        # epoll/kqueue forget fds closed without being removed; poll(2) would
        # report POLLNVAL. After an idle wait, check up to 64 of them (round
        # robin) and report the closed ones as POLLNVAL from now on. See
        # sweep_closed() in csrc/fa_poller.c.
        kreg = self._kreg
        if not kreg:
            return
        fds = sorted(kreg)
        start = self._sweep_pos if self._sweep_pos < len(fds) else 0
        batch = fds[start:start + 64]
        self._sweep_pos = start + len(batch)
        for fd in batch:
            if _fd_is_closed(fd):
                self._refused[fd] = (kreg.pop(fd), _REF_NVAL, 0)

    # -- applying changes ------------------------------------------------------

    def _apply(self) -> None:
        pending = self._pending
        change = getattr(self, "_change_" + self.kind)
        refused = self._refused
        own = self.fileno()
        while pending:
            fd = next(iter(pending))
            ev = pending.pop(fd)  # consumed even if it fails, as in C
            if refused and fd in refused:
                old = refused[fd]
                if old[1] >= _REF_FAULT:
                    # not retried at each interest change: only removal clears it
                    refused[fd] = (ev, old[1], old[2])
                    continue
                del refused[fd]
            if fd == own:
                # our own epoll/kqueue fd under a map key (see apply_change)
                refused[fd] = (ev, _REF_FAULT, _errno.EINVAL)
                continue
            change(fd, ev)

    def _fault(self, fd: int, ev: int, exc: OSError) -> None:
        # Any other refusal of one fd is that fd's, reported once (fa_poller.c).
        if exc.errno is None or exc.errno == _errno.ENOMEM:
            raise exc
        self._refused[fd] = (ev, _REF_FAULT, exc.errno)

    def _change_epoll(self, fd: int, ev: int) -> None:
        ep, kreg = self._obj, self._kreg
        cur = kreg.get(fd, 0)
        if ev == 0:
            if cur:
                del kreg[fd]
                try:
                    ep.unregister(fd)
                except OSError as exc:
                    if exc.errno not in (_errno.ENOENT, _errno.EBADF):
                        raise
            return
        if cur:
            try:
                ep.modify(fd, ev)
                kreg[fd] = ev
                return
            except OSError as exc:
                del kreg[fd]
                if exc.errno == _errno.EBADF:
                    self._refused[fd] = (ev, _REF_NVAL, 0)
                    return
                if exc.errno != _errno.ENOENT:
                    self._fault(fd, ev, exc)
                    return
        try:
            ep.register(fd, ev)
        except OSError as exc:
            err = exc.errno
            if err == _errno.EEXIST:
                try:
                    ep.modify(fd, ev)
                except OSError as exc2:
                    err = exc2.errno
                    exc = exc2
                else:
                    kreg[fd] = ev
                    return
            if err == _errno.EPERM:
                self._refused[fd] = (ev, _REF_READY, 0)
                return
            if err == _errno.EBADF:
                self._refused[fd] = (ev, _REF_NVAL, 0)
                return
            self._fault(fd, ev, exc)    # EINVAL (our own fd), ELOOP, ENOSPC
            return
        kreg[fd] = ev

    def _change_poll(self, fd: int, ev: int) -> None:
        # poll(2) reports closed fds (POLLNVAL) and regular files itself.
        if ev == 0:
            if self._kreg.pop(fd, 0):
                self._obj.unregister(fd)
            return
        self._obj.register(fd, _to_select(ev))  # register == modify for poll
        self._kreg[fd] = ev

    def _change_select(self, fd: int, ev: int) -> None:
        if ev == 0:
            self._kreg.pop(fd, None)
        else:
            self._kreg[fd] = ev

    def _change_kqueue(self, fd: int, ev: int) -> None:  # pragma: no cover (BSD)
        kq, kreg = self._obj, self._kreg
        cur = kreg.get(fd, 0)
        ops = []
        for bit, filt in ((POLLIN, _select.KQ_FILTER_READ),
                          (POLLOUT, _select.KQ_FILTER_WRITE)):
            if ev & bit and not cur & bit:
                ops.append(_select.kevent(fd, filt, _select.KQ_EV_ADD))
            elif cur & bit and not ev & bit:
                ops.append(_select.kevent(fd, filt, _select.KQ_EV_DELETE))
        err = 0
        for op in ops:
            try:
                kq.control([op], 0, 0)
            except OSError as exc:
                if op.flags & _select.KQ_EV_DELETE and exc.errno in (
                        _errno.ENOENT, _errno.EBADF):
                    continue
                err = exc.errno
                break
        if not err:
            if ev:
                kreg[fd] = ev
            else:
                kreg.pop(fd, None)
            return
        for filt in (_select.KQ_FILTER_READ, _select.KQ_FILTER_WRITE):
            try:
                kq.control([_select.kevent(fd, filt, _select.KQ_EV_DELETE)], 0, 0)
            except OSError:
                pass
        kreg.pop(fd, None)
        if ev == 0:
            return
        if err == _errno.EBADF:
            self._refused[fd] = (ev, _REF_NVAL, 0)
        elif err in (_errno.EPERM, _errno.EINVAL, _errno.ENODEV):
            self._refused[fd] = (ev, _REF_READY, 0)
        else:
            self._fault(fd, ev, OSError(err, _os.strerror(err)))

    # -- waiting ---------------------------------------------------------------------

    def _kqueue_wait(self, tmo: int) -> List[Tuple[int, int]]:  # pragma: no cover
        nmax = max(2 * len(self._kreg), 1)
        ready: Dict[int, int] = {}
        kreg = self._kreg
        for kev in self._obj.control(None, nmax, None if tmo < 0 else tmo / 1000.0):
            fd = kev.ident
            if fd not in kreg:
                continue
            if kev.filter == _select.KQ_FILTER_READ:
                bits = POLLIN
            elif kev.filter == _select.KQ_FILTER_WRITE:
                bits = POLLOUT
            else:
                continue
            if kev.flags & _select.KQ_EV_ERROR:
                bits |= POLLERR
            ready[fd] = ready.get(fd, 0) | bits
        return list(ready.items())

    def _select_wait(self, tmo: int) -> List[Tuple[int, int]]:
        kreg = self._kreg
        while True:
            r = [fd for fd, ev in kreg.items() if ev & POLLIN]
            w = [fd for fd, ev in kreg.items() if ev & POLLOUT]
            x = [fd for fd, ev in kreg.items() if ev & POLLPRI]
            if not (r or w or x):
                # select() with no fds just sleeps; keep the timeout semantics
                if tmo != 0:
                    import time
                    time.sleep(tmo / 1000.0 if tmo > 0 else 3600.0)
                return []
            try:
                rr, ww, xx = _select.select(r, w, x, None if tmo < 0 else tmo / 1000.0)
                break
            except OSError as exc:
                if exc.errno != _errno.EBADF:
                    raise
                # select fails as a whole on a closed fd: report it as
                # POLLNVAL (like poll) and select the others.
                bad = [fd for fd in kreg if _fd_is_closed(fd)]
                if not bad:
                    raise
                for fd in bad:
                    self._refused[fd] = (kreg.pop(fd), _REF_NVAL, 0)
                return [(fd, POLLNVAL) for fd in bad]
        ready: Dict[int, int] = {}
        for fds, bit in ((rr, POLLIN), (ww, POLLOUT), (xx, POLLPRI)):
            for fd in fds:
                ready[fd] = ready.get(fd, 0) | bit
        return list(ready.items())


# ---- plain-fd I/O ----------------------------------------------------------------

class _FdSocket:
    """A socket object borrowing fd for one call (never closes it)."""

    __slots__ = ("sock",)

    def __init__(self, fd: int, sending: bool = False) -> None:
        s = _socket.socket(fileno=fd)
        try:
            if _socket.getdefaulttimeout() is not None:
                s.settimeout(0.0)  # never let a default timeout make us wait
            if sending and _SO_NOSIGPIPE:
                try:
                    s.setsockopt(_socket.SOL_SOCKET, _SO_NOSIGPIPE, 1)
                except OSError:
                    pass
        except BaseException:
            s.detach()
            raise
        self.sock = s

    def __enter__(self) -> _socket.socket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.detach()


def send(fd: int, data) -> int:
    """One send(2) with MSG_NOSIGNAL: bytes sent or -errno."""
    _check_fd(fd)
    if isinstance(data, str):
        raise TypeError("a bytes-like object is required, not 'str'")
    with memoryview(data) as mv:
        try:
            with _FdSocket(fd, True) as s:
                return s.send(mv[:_MAX_IO] if mv.nbytes > _MAX_IO else mv,
                              _MSG_NOSIGNAL)
        except OSError as exc:
            return -(exc.errno or _errno.EIO)


def recv(fd: int, n: int):
    """One recv(2) of at most n bytes (clamped to 64 KiB): bytes or -errno."""
    _check_fd(fd)
    if not isinstance(n, int):
        raise TypeError("n must be an int")
    if n <= 0:
        raise ValueError("n must be > 0, got %d" % n)
    try:
        with _FdSocket(fd) as s:
            return s.recv(n if n < _RECV_MAX else _RECV_MAX)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)


def sendv(fd: int, chunks: Sequence, max_bytes: int) -> int:
    """One sendmsg(2) of up to max_bytes from chunks: bytes sent or -errno."""
    _check_fd(fd)
    if not isinstance(max_bytes, int):
        raise TypeError("max_bytes must be an int")
    if max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    max_bytes = min(max_bytes, _MAX_IO)
    views = []
    total = 0
    for c in list(chunks)[:_IOV_MAX]:
        if isinstance(c, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        mv = memoryview(c).cast("B")
        if total >= max_bytes:
            continue  # still type-check the rest, as the C wrapper does
        if not mv.nbytes:
            continue
        take = min(mv.nbytes, max_bytes - total)
        views.append(mv[:take])
        total += take
    if not views:
        return 0
    try:
        with _FdSocket(fd, True) as s:
            return s.sendmsg(views, (), _MSG_NOSIGNAL)
    except OSError as exc:
        return -(exc.errno or _errno.EIO)


# ---- stateless poll ----------------------------------------------------------------

def poll_list(interest: Dict[int, int], timeout_ms: int) -> List[Tuple[int, int]]:
    """One poll(2) over the (fd, events) items of ``interest``; ready pairs.

    Stateless (what asyncore 3.11's poll2 does every iteration); select.poll
    retries EINTR itself (PEP 475) and lets a raising signal handler through.
    """
    p = _select.poll()
    register = p.register
    for fd, ev in interest.items():
        register(fd, ev)
    return p.poll(timeout_ms if timeout_ms >= 0 else None)


# ---- buffers -------------------------------------------------------------------------

class SendQueue:
    """FIFO of bytes in a bytearray with a moving head; push() copies its argument.

    A lock serialises the operations, as in the C twin: send() keeps a view of
    the bytearray exported while send(2) runs without the GIL, and a push()
    from another thread must wait rather than fail with BufferError.
    """

    __slots__ = ("_buf", "_head", "_lock", "nbytes")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head = 0
        self._lock = _threading.Lock()
        self.nbytes = 0         # pending bytes (read-only for callers)

    def push(self, data) -> None:
        if isinstance(data, str):
            raise TypeError("data must be a bytes-like object, not str")
        with memoryview(data) as mv, self._lock:
            self._buf += mv.cast("B")  # copies
            self.nbytes = len(self._buf) - self._head

    def __len__(self) -> int:
        return self.nbytes

    def __bool__(self) -> bool:
        return self.nbytes > 0

    def peek(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            h = self._head
            with memoryview(self._buf) as mv:
                return mv[h:h + n].tobytes()

    def consume(self, n: int) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._consume(n)

    def _consume(self, n: int) -> None:
        buf = self._buf
        h = min(self._head + n, len(buf))
        if h == len(buf):
            buf.clear()
            h = 0
        elif h >= 65536 and 2 * h >= len(buf):
            del buf[:h]  # amortised: the moved bytes are at most the consumed ones
            h = 0
        self._head = h
        self.nbytes = len(buf) - h

    def clear(self) -> None:
        with self._lock:
            self._buf = bytearray()
            self._head = 0
            self.nbytes = 0

    def getvalue(self) -> bytes:
        with self._lock, memoryview(self._buf) as mv:
            return mv[self._head:].tobytes()

    def send(self, fd: int, max_bytes: int) -> int:
        """One send of up to max_bytes from the front; consumes what was sent."""
        _check_fd(fd)
        if not isinstance(max_bytes, int):
            raise TypeError("max_bytes must be an int")
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        with self._lock:
            h = self._head
            if max_bytes == 0 or h == len(self._buf):
                return 0
            with memoryview(self._buf) as mv:
                with mv[h:h + min(max_bytes, _MAX_IO)] as part:
                    r = send(fd, part)
            if r > 0:
                self._consume(r)
        return r

    def __repr__(self) -> str:
        return "<fastasyncore._pure.SendQueue %d bytes>" % len(self)


def scan(buf, start: int, term, limit: int) -> List[int]:
    """Absolute start indices of up to limit non-overlapping term hits in buf[start:]."""
    if not isinstance(start, int) or not isinstance(limit, int):
        raise TypeError("start and limit must be ints")
    if isinstance(term, str) or isinstance(buf, str):
        raise TypeError("a bytes-like object is required, not 'str'")
    term = bytes(memoryview(term).cast("B"))
    if not term:
        raise ValueError("term must not be empty")
    if start < 0:
        raise ValueError("start must be >= 0")
    if not isinstance(buf, (bytes, bytearray)):
        buf = bytes(memoryview(buf).cast("B"))
    out: List[int] = []
    find = buf.find
    tlen = len(term)
    i = start
    while len(out) < limit:
        j = find(term, i)
        if j < 0:
            break
        out.append(j)
        i = j + tlen
    return out


def prefix_at_end(haystack, needle) -> int:
    """asynchat.find_prefix_at_end: longest proper prefix of needle ending haystack."""
    if isinstance(haystack, str) or isinstance(needle, str):
        raise TypeError("a bytes-like object is required, not 'str'")
    if not isinstance(haystack, bytes):
        haystack = bytes(memoryview(haystack).cast("B"))
    if not isinstance(needle, bytes):
        needle = bytes(memoryview(needle).cast("B"))
    # asynchat.find_prefix_at_end, verbatim (it returns -1 for b"")
    l = len(needle) - 1
    while l and not haystack.endswith(needle[:l]):
        l -= 1
    return l
