"""The C-core backend: a thin wrapper over the cffi module ``fastasyncore._core``.

Implements docs/backend-interface.md. Every operation is one cffi call over
memory preallocated here; nothing in C calls back into Python. Importing this
module raises ImportError when the core was not built.
"""

import errno as _errno
from array import array as _array
from itertools import chain as _chain
import math as _math
import os as _os
import threading as _threading
import time as _time
from typing import Dict, List, Sequence, Tuple

from ._core import ffi, lib  # ImportError when the core is not built

__all__ = [
    "NAME", "POLLER_KINDS", "POLLIN", "POLLPRI", "POLLOUT", "POLLERR",
    "POLLHUP", "POLLNVAL", "POLLFAULT", "FAULT_SHIFT", "Poller", "send", "recv", "sendv", "SendQueue",
    "scan", "prefix_at_end", "poll_list",
]

NAME = "cffi"

POLLIN = lib.FA_POLLIN
POLLPRI = lib.FA_POLLPRI
POLLOUT = lib.FA_POLLOUT
POLLERR = lib.FA_POLLERR
POLLHUP = lib.FA_POLLHUP
POLLNVAL = lib.FA_POLLNVAL
POLLFAULT = lib.FA_POLLFAULT        # a refused fd, once (fastasyncore.h)
FAULT_SHIFT = lib.FA_FAULT_SHIFT

_INTEREST = POLLIN | POLLPRI | POLLOUT
_KIND_NAMES = {lib.FA_KIND_EPOLL: "epoll", lib.FA_KIND_KQUEUE: "kqueue",
               lib.FA_KIND_POLL: "poll"}
_KIND_IDS = {v: k for k, v in _KIND_NAMES.items()}


def _kinds() -> Tuple[str, ...]:
    buf = ffi.new("int[8]")
    n = lib.fa_poller_kinds(buf, 8)
    return tuple(_KIND_NAMES[k] for k in ffi.unpack(buf, n))


POLLER_KINDS: Tuple[str, ...] = _kinds()

_INT_MAX = 2**31 - 1
_SIZE_MAX = 2**63 - 1  # clamp for size_t arguments (C clamps further)
_RECV_BUF = 65536      # the reusable recv buffer: below the 128 KiB mmap threshold
_EINTR = _errno.EINTR
_wait = lib.fa_poller_wait
_from_buffer = ffi.from_buffer
_unpack = ffi.unpack
_monotonic = _time.monotonic

#: The address of fa_poller_wait, for the C loop (fastasyncore._cloop calls
#: the core through it: one copy of the poller code, one ABI).
WAIT_ADDR: int = int(ffi.cast("uintptr_t", ffi.addressof(lib, "fa_poller_wait")))
#: ... and of fa_poll_once, its stateless poll(2).
POLL_ADDR: int = int(ffi.cast("uintptr_t", ffi.addressof(lib, "fa_poll_once")))


def _check_fd(fd: int) -> int:
    if not isinstance(fd, int):
        raise TypeError("fd must be an int, not %s" % type(fd).__name__)
    if fd < 0:
        raise ValueError("fd must be >= 0, got %d" % fd)
    if fd > _INT_MAX:
        raise OverflowError("fd %d is too large" % fd)
    return fd


def _oserror(neg_errno: int) -> OSError:
    code = -neg_errno
    return OSError(code, _os.strerror(code))


class Poller:
    """A persistent level-triggered readiness set (epoll, kqueue or poll in C).

    One thread waits at a time (a second concurrent wait() raises
    RuntimeError). modify() and close() may be called from other threads while
    a wait blocks: changes made meanwhile are kept for the next wait, and a
    close() during a wait frees the C state only once that wait has returned
    (the C code runs without the GIL, so it must never see freed memory).
    """

    __slots__ = ("kind", "_p", "_reg", "_pending", "_chg", "_chgcap",
                 "_out", "_outcap", "_napplied", "closed", "_lock", "_freed",
                 "_one", "_chg_keep", "addr")

    def __init__(self, kind: "str | None" = None) -> None:
        if kind is None:
            kind = POLLER_KINDS[0]
        if kind not in POLLER_KINDS:
            raise ValueError("unknown poller kind %r (available here: %s)"
                             % (kind, ", ".join(POLLER_KINDS)))
        self.closed = True
        self._freed = True
        pp = ffi.new("fa_poller **")
        rc = lib.fa_poller_new(_KIND_IDS[kind], pp)
        if rc < 0:
            raise _oserror(rc)
        self._p = ffi.gc(pp[0], lib.fa_poller_free)
        # The C state's address, for the C loop (valid while not _freed; the
        # C loop checks `closed` under _lock before using it, as wait() does).
        self.addr = int(ffi.cast("uintptr_t", pp[0]))
        self._freed = False
        self._lock = _threading.Lock()  # held while C uses self._p
        self.kind = kind
        self.closed = False
        # _reg and _pending are never replaced, only mutated: the C loop
        # (fa_cloop.c) holds them while it uses this poller.
        self._reg: Dict[int, int] = {}
        self._pending: Dict[int, int] = {}
        self._chgcap = 64
        self._chg = ffi.new("int[]", 2 * self._chgcap)
        self._outcap = 256
        self._out = ffi.new("int[]", 2 * self._outcap)
        self._napplied = ffi.new("size_t *")
        self._one = ffi.new("int[2]")

    def modify(self, fd: int, events: int) -> None:
        """Set fd's interest to events; applied at the next wait().

        ``events == 0`` removes fd at once (before the caller closes it; see
        fa_poller_apply), unless a wait is running in another thread: then
        the removal is applied by the next wait.
        """
        _check_fd(fd)
        if not isinstance(events, int):
            raise TypeError("events must be an int")
        events &= _INTEREST
        if events:
            self._pending[fd] = events
            self._reg[fd] = events
            return
        self._reg.pop(fd, None)
        lock = self._lock
        if not self.closed and lock.acquire(False):
            try:
                self._pending.pop(fd, None)
                chg = self._one
                chg[0] = fd
                chg[1] = 0
                lib.fa_poller_apply(self._p, chg, 1, self._napplied)
            finally:
                lock.release()
        else:
            self._pending[fd] = 0

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
        if self.closed:
            return -1
        return lib.fa_poller_fileno(self._p)

    def _free(self) -> None:
        # Called with self._lock held.
        if not self._freed:
            self._freed = True
            ffi.release(self._p)  # runs fa_poller_free now, not at GC time

    def close(self) -> None:
        """Close the poller (idempotent); deferred while another thread waits."""
        self.closed = True
        self._pending.clear()
        if self._lock.acquire(False):
            try:
                self._free()
            finally:
                self._lock.release()
        # else: the waiting thread frees it when its wait returns

    def __enter__(self) -> "Poller":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_changes(self, pending: Dict[int, int]) -> int:
        # One C-speed pass: the (fd, events) pairs into an int array, which
        # cffi then passes without a copy (kept alive in self._chg).
        arr = _array("i", list(_chain.from_iterable(pending.items())))
        self._chg_keep = arr
        self._chg = _from_buffer("int[]", arr)
        return len(pending)

    def wait(self, timeout_ms: int) -> List[Tuple[int, int]]:
        """Apply pending changes, wait up to timeout_ms (< 0 blocks), return ready pairs."""
        if type(timeout_ms) is int:
            tmo = -1 if timeout_ms < 0 else (
                timeout_ms if timeout_ms <= _INT_MAX else _INT_MAX)
        elif timeout_ms is None or timeout_ms < 0:
            tmo = -1
        else:  # a float: round up so that 0.5 ms does not become a busy loop
            tmo = min(int(_math.ceil(timeout_ms)), _INT_MAX)
        lock = self._lock
        if not lock.acquire(False):
            if self.closed:
                raise ValueError("I/O operation on a closed poller")
            raise RuntimeError("Poller.wait() is already running in another thread")
        try:
            if self.closed:
                raise ValueError("I/O operation on a closed poller")
            # Take the pending changes; modify() calls made while we wait go
            # into a fresh dict and are applied by the next wait.
            pending = self._pending
            if pending:
                # (never a new dict: the C loop holds this one)
                pending = pending.copy()
                self._pending.clear()
                nchg = self._load_changes(pending)
                if len(self._reg) > self._outcap:
                    self._grow_out()
            else:
                nchg = 0
            # Only a blocking wait with a finite timeout needs a deadline (PEP 475).
            deadline = _monotonic() + tmo / 1000.0 if tmo > 0 else 0.0
            n = _wait(self._p, self._chg, nchg, tmo, self._out, self._outcap,
                      self._napplied)
            if n < 0:
                n = self._wait_error(n, pending, nchg, tmo, deadline)
            if n == 1:
                # The common case of a latency-bound loop: two cdata reads
                # cost a quarter of unpack + zip (0.08 vs 0.34 us).
                out = self._out
                return [(out[0], out[1])]
            if n:
                it = iter(_unpack(self._out, n + n))
                return list(zip(it, it))
            return []
        finally:
            lock.release()
            if self.closed and not self._freed:
                self._free_after_close()

    def _grow_out(self) -> None:
        # room for every registered fd: all ready fds come back in one call
        while self._outcap < len(self._reg):
            self._outcap *= 2
        self._out = ffi.new("int[]", 2 * self._outcap)

    def _free_after_close(self) -> None:
        # close() ran while we waited: it could not free the C state then.
        if self._lock.acquire(False):
            try:
                self._free()
            finally:
                self._lock.release()

    def _wait_error(self, n: int, pending: Dict[int, int], nchg: int,
                    tmo: int, deadline: float) -> int:
        """The slow path of wait(): OS errors and EINTR retries (lock held)."""
        while True:
            if nchg:
                applied = self._napplied[0]
                if applied < nchg:  # keep the changes C did not reach
                    rest = dict(list(pending.items())[applied:])
                    rest.update(self._pending)
                    self._pending.clear()
                    self._pending.update(rest)
                nchg = 0
            if n != -_EINTR:
                raise _oserror(n)
            # EINTR: back in the interpreter, pending signal handlers run at
            # the next check (at the latest this loop's backward jump); one
            # that raises propagates out of wait(). Otherwise retry with the
            # time left.
            if tmo > 0:
                left = deadline - _monotonic()
                if left <= 0:
                    return 0
                tmo = int(_math.ceil(left * 1000.0))
            n = _wait(self._p, self._chg, 0, tmo, self._out, self._outcap,
                      self._napplied)
            if n >= 0:
                return n

    def __repr__(self) -> str:
        return "<fastasyncore._cffi.Poller kind=%s fds=%d%s>" % (
            self.kind, len(self._reg), " closed" if self.closed else "")


# ---- plain-fd I/O ----------------------------------------------------------

_tls = _threading.local()
_new_noclear = ffi.new_allocator(should_clear_after_alloc=False)


def _recv_buf():
    try:
        return _tls.buf
    except AttributeError:
        buf = _tls.buf = _new_noclear("char[]", _RECV_BUF)
        return buf


def send(fd: int, data) -> int:
    """One send(2) with MSG_NOSIGNAL: bytes sent or -errno."""
    _check_fd(fd)
    if type(data) is bytes:
        return lib.fa_send(fd, data, len(data))
    buf = ffi.from_buffer(data)
    return lib.fa_send(fd, buf, len(buf))


def recv(fd: int, n: int):
    """One recv(2) of at most n bytes (clamped to 64 KiB): bytes or -errno."""
    _check_fd(fd)
    if not isinstance(n, int):
        raise TypeError("n must be an int")
    if n <= 0:
        raise ValueError("n must be > 0, got %d" % n)
    if n > _RECV_BUF:
        n = _RECV_BUF
    buf = _recv_buf()
    r = lib.fa_recv(fd, buf, n)
    if r < 0:
        return r
    return ffi.unpack(buf, r)


def sendv(fd: int, chunks: Sequence, max_bytes: int) -> int:
    """One sendmsg(2) of up to max_bytes from chunks: bytes sent or -errno."""
    _check_fd(fd)
    if not isinstance(max_bytes, int):
        raise TypeError("max_bytes must be an int")
    if max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    if max_bytes > _SIZE_MAX:
        max_bytes = _SIZE_MAX
    chunks = list(chunks)[:lib.FA_IOV_MAX]
    n = len(chunks)
    if n == 0 or max_bytes == 0:
        return 0
    # from_buffer keeps each chunk's buffer exported (and alive) until `keep`
    # goes away, i.e. after the call returns.
    keep = [ffi.from_buffer(c) for c in chunks]
    bufs = ffi.new("char *[]", keep)
    lens = ffi.new("size_t[]", [len(b) for b in keep])
    return lib.fa_sendv(fd, bufs, lens, n, max_bytes)


# ---- stateless poll ----------------------------------------------------------

# The pure backend's poll_list (the stdlib's select.poll), on purpose: it fills
# its pollfd array from the dict in C, which no cffi route beats: the dict must
# first become an int array in Python (measured per call: 1.7 vs 2.9 us for 10
# fds, 12.5 vs 15.0 us for 100, 687 vs 686 us for 3,000).
from ._pure import poll_list  # noqa: E402


# ---- buffers ------------------------------------------------------------------

class SendQueue:
    """FIFO of bytes held in C memory; push() copies mutable arguments.

    A large immutable argument (``bytes``, or a read-only memoryview of
    bytes) pushed on an empty queue is *borrowed* instead: the queue keeps a
    reference and sends from an offset into it, so a 32 MiB send() costs no
    32 MiB copy into fresh memory (page faults dominated that).  Everything
    pushed while a borrowed buffer is pending goes to the C queue behind it.

    A lock serialises the operations: cffi calls run without the GIL, and a
    push() that reallocates the block while another thread's send() reads it
    would be a use-after-free (the pure twin is serialised by the GIL).
    """

    __slots__ = ("_q", "nbytes", "_lock", "_ext", "_extp", "_extoff", "_extlen")

    _BORROW_MIN = 65536

    def __init__(self) -> None:
        q = lib.fa_sendq_new()
        if q == ffi.NULL:
            raise MemoryError("fa_sendq_new")
        self._q = ffi.gc(q, lib.fa_sendq_free)
        self.nbytes = 0
        self._lock = _threading.Lock()
        self._ext = None      # the borrowed object (kept alive while pending)
        self._extp = None     # its cffi pointer
        self._extoff = 0
        self._extlen = 0

    def push(self, data) -> None:
        if type(data) is bytes:
            buf = data
            n = len(data)
            borrow = n >= self._BORROW_MIN
        else:
            if isinstance(data, str):
                raise TypeError("data must be a bytes-like object, not str")
            borrow = (type(data) is memoryview and data.readonly
                      and type(data.obj) is bytes and data.c_contiguous
                      and data.nbytes >= self._BORROW_MIN)
            buf = ffi.from_buffer(data)
            n = len(buf)
        with self._lock:
            if borrow and self.nbytes == 0:
                self._ext = data
                self._extp = buf if buf is not data else ffi.from_buffer(data)
                self._extoff = 0
                self._extlen = n
                self.nbytes = n
                return
            rc = lib.fa_sendq_push(self._q, buf, n)
            if rc < 0:
                raise MemoryError("SendQueue.push(%d bytes)" % n)
            self.nbytes += n

    def __len__(self) -> int:
        return self.nbytes

    def __bool__(self) -> bool:
        return self.nbytes > 0

    def _ext_left(self) -> int:
        return self._extlen - self._extoff if self._ext is not None else 0

    def _drop_ext_if_done(self) -> None:
        if self._ext is not None and self._extoff >= self._extlen:
            self._ext = self._extp = None
            self._extoff = self._extlen = 0

    def peek(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            if n > self.nbytes:
                n = self.nbytes
            if n == 0:
                return b""
            ext = self._ext_left()
            head = b""
            if ext:
                k = min(n, ext)
                head = ffi.unpack(self._extp + self._extoff, k)
                n -= k
                if not n:
                    return head
            return head + ffi.unpack(lib.fa_sendq_data(self._q), n)

    def consume(self, n: int) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            if n > self.nbytes:
                n = self.nbytes
            ext = self._ext_left()
            if ext:
                k = min(n, ext)
                self._extoff += k
                self.nbytes -= k
                n -= k
                self._drop_ext_if_done()
            if n:
                self.nbytes -= lib.fa_sendq_consume(self._q, n)

    def clear(self) -> None:
        with self._lock:
            lib.fa_sendq_clear(self._q)
            self._ext = self._extp = None
            self._extoff = self._extlen = 0
            self.nbytes = 0

    def getvalue(self) -> bytes:
        with self._lock:
            if not self.nbytes:
                return b""
            ext = self._ext_left()
            head = ffi.unpack(self._extp + self._extoff, ext) if ext else b""
            rest = self.nbytes - ext
            if not rest:
                return head
            return head + ffi.unpack(lib.fa_sendq_data(self._q), rest)

    def send(self, fd: int, max_bytes: int) -> int:
        """One send of up to max_bytes from the front; consumes what was sent."""
        _check_fd(fd)
        if not isinstance(max_bytes, int):
            raise TypeError("max_bytes must be an int")
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if max_bytes > _SIZE_MAX:
            max_bytes = _SIZE_MAX
        with self._lock:
            ext = self._ext_left()
            if ext:
                if max_bytes == 0:
                    return 0
                r = lib.fa_send(fd, self._extp + self._extoff, min(ext, max_bytes))
                if r > 0:
                    self._extoff += r
                    self.nbytes -= r
                    self._drop_ext_if_done()
                return r
            r = lib.fa_sendq_send(self._q, fd, max_bytes)
            if r > 0:
                self.nbytes -= r
        return r

    def __repr__(self) -> str:
        return "<fastasyncore._cffi.SendQueue %d bytes>" % self.nbytes


def _as_cbuf(data):
    if type(data) is bytes:
        return data, len(data)
    if isinstance(data, str):
        raise TypeError("a bytes-like object is required, not 'str'")
    b = ffi.from_buffer(data)
    return b, len(b)


def scan(buf, start: int, term, limit: int) -> List[int]:
    """Absolute start indices of up to limit non-overlapping term hits in buf[start:]."""
    if not isinstance(start, int) or not isinstance(limit, int):
        raise TypeError("start and limit must be ints")
    t, tlen = _as_cbuf(term)
    if tlen == 0:
        raise ValueError("term must not be empty")
    b, blen = _as_cbuf(buf)
    if start < 0:
        raise ValueError("start must be >= 0")
    if limit <= 0 or start >= blen:
        return []
    most = (blen - start) // tlen  # no more hits than that: bounds the array
    if limit > most:
        limit = most
    if limit == 0:
        return []
    out = _new_noclear("size_t[]", limit)
    n = lib.fa_scan(b, blen, start, t, tlen, out, limit)
    return ffi.unpack(out, n) if n else []


def prefix_at_end(haystack, needle) -> int:
    """asynchat.find_prefix_at_end: longest proper prefix of needle ending haystack."""
    h, hlen = _as_cbuf(haystack)
    nd, nlen = _as_cbuf(needle)
    return lib.fa_prefix_at_end(h, hlen, nd, nlen)
