"""Loop services: timers, thread-safe calls, the wake-up fd, "ready now".

What asyncore never had and every real program hand-rolls (pyftpdlib's
scheduler, medusa's ``trigger`` self-pipe dispatcher), owned by the loop so
that it costs nothing to programs that do not use it:

* :class:`Services` -- one per socket map that uses them (``_svcs``, keyed by
  ``id(map)``; it outlives the map's MapState, which is dropped whenever the
  map empties): a heap of timers, a FIFO of thread-safe calls and the
  channels whose input is buffered above the kernel (``ready_now``).  A
  MapState points at its map's Services (``st.svc``); only when it is set do
  the loops look at it around each wait: the next deadline (``due``) shortens
  the wait (``timeout_ms()``, inline in both loops), and ``_loop._svc_run()``
  runs what is waiting or due after the iteration's I/O.
* :class:`Waker` -- one per MapState, created with it: an eventfd (a
  non-blocking pipe where there is none) that the wait always watches, so a
  ``wakeup()`` from another thread reaches a wait that already started.  It
  is never a key of the map, is released with the MapState, and after
  ``fork()`` the child makes its own (``_loop._after_fork_in_child``).

Nothing here knows dispatchers beyond calling ``handle_read_event()`` for
``ready_now``; the API (``call_later`` ...) is in asyncore.py.
"""

import heapq
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

__all__ = ["Timer", "Services", "Waker", "lookup", "services_for", "idle", "release"]

log = logging.getLogger("fastasyncore")
_monotonic = time.monotonic
_INT_MAX = 2**31 - 1
_INF = float("inf")


def _check_callback(callback: Any) -> None:
    if not callable(callback):
        raise TypeError("callback must be callable, not %s" % type(callback).__name__)


def _check_delay(delay: Any, what: str) -> float:
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise TypeError("%s must be a number, not %s" % (what, type(delay).__name__))
    d = float(delay)
    if math.isnan(d):
        raise ValueError("%s must not be NaN" % what)
    if d < 0:
        raise ValueError("%s must be >= 0, got %r" % (what, delay))
    if math.isinf(d):
        raise ValueError("%s must be finite, got %r" % (what, delay))
    return d


class Timer:
    """A scheduled call (``call_later``/``call_at``/``call_every``).

    ``when`` is its deadline on ``time.monotonic()``.  ``cancel()`` and
    ``reset()`` are for the loop's thread (use ``call_soon_threadsafe`` from
    others).
    """

    __slots__ = ("when", "cancelled", "_delay", "_interval", "_callback",
                 "_args", "_map", "_seq", "_svc")

    def __init__(self, when: float, delay: float, interval: Optional[float],
                 callback: Callable[..., Any], args: Tuple[Any, ...],
                 map: Any) -> None:
        self.when = when
        self.cancelled = False
        self._delay = delay
        self._interval = interval
        self._callback = callback
        self._args = args
        self._map = map
        self._seq = -1          # the heap entry that is live (-1: none)
        self._svc: Optional["Services"] = None

    def cancel(self) -> None:
        """Stop it from running (again).  Idempotent."""
        self.cancelled = True
        svc = self._svc
        if svc is not None and self._seq >= 0:
            self._seq = -1
            svc.dead += 1
            svc._maybe_compact()

    def reset(self) -> None:
        """Re-arm from now with the original delay (also after it ran or was
        cancelled): the idle-timeout idiom."""
        self.cancelled = False
        svc = self._svc
        if svc is not None and self._seq >= 0:
            self._seq = -1
            svc.dead += 1
        services_for(self._map).push(self, _monotonic() + self._delay)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else ("pending" if self._seq >= 0 else "done")
        return "<Timer %s when=%.3f %r>" % (state, self.when, self._callback)


class Waker:
    """One MapState's wake-up fd (see the module docstring)."""

    __slots__ = ("rfd", "wfd", "lock", "closed")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed = False
        self.rfd = self.wfd = -1
        try:
            if hasattr(os, "eventfd"):
                # Linux, Python 3.10+: one fd, a counter (8-byte writes)
                self.rfd = self.wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            else:
                # os.pipe() fds are close-on-exec (non-inheritable) already
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.set_blocking(w, False)
                self.rfd, self.wfd = r, w
        except OSError:
            # out of fds (EMFILE): no wake-ups for this map; the loop still
            # runs what was queued at its next iteration
            self.closed = True

    def wake(self) -> None:
        """Make the wait return (any thread).  Under the lock, so that it can
        never write to a number that close() released and something else got."""
        with self.lock:
            if self.closed:
                return
            try:
                if self.rfd == self.wfd:
                    os.eventfd_write(self.wfd, 1)   # type: ignore[attr-defined]
                else:
                    os.write(self.wfd, b"\0")
            except (BlockingIOError, InterruptedError):
                pass        # full: readable already, which is all we need

    def drain(self) -> None:
        """The wait reported the fd (the loop's thread): empty it, so that a
        level-triggered wait blocks again."""
        if self.closed:
            return
        try:
            if self.rfd == self.wfd:
                os.eventfd_read(self.rfd)           # type: ignore[attr-defined]
            else:
                while os.read(self.rfd, 512):
                    pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            os.close(self.rfd)
            if self.wfd != self.rfd:
                os.close(self.wfd)


_COMPACT_MIN = 64       # dead heap entries before a compaction is considered


class Services:
    """The timers, thread-safe calls and ready-now channels of one map."""

    __slots__ = ("map", "heap", "seq", "dead", "calls", "ready", "due")

    def __init__(self, map: Any) -> None:
        self.map = map
        # The containers below are mutated, never replaced: the C loop holds
        # calls, ready and due while it runs (fa_cloop.c, read_svc()).
        self.heap: List[Tuple[float, int, Timer]] = []
        self.seq = 0
        self.dead = 0                           # cancelled entries in heap
        self.calls: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = deque()
        self.ready: Dict[Any, Any] = {}         # fd -> channel (ready_now)
        # [the heap top's deadline] (inf: none); may be a cancelled entry's,
        # which only costs an early look.  Lets the loops skip run() and
        # timeout_ms() in iterations where nothing is due.
        self.due: List[float] = [_INF]

    def empty(self) -> bool:
        return not (self.heap or self.calls or self.ready)

    # -- timers ------------------------------------------------------------
    def push(self, timer: Timer, when: float) -> None:
        seq = self.seq
        self.seq = seq + 1
        timer.when = when
        timer._seq = seq
        timer._svc = self
        heapq.heappush(self.heap, (when, seq, timer))
        if when < self.due[0]:
            self.due[0] = when
            _note(self.map)

    def _set_due(self) -> None:
        heap = self.heap
        self.due[0] = heap[0][0] if heap else _INF

    def _maybe_compact(self) -> None:
        # Lazy deletion keeps cancel() O(1); rebuilding the heap once half of
        # it is dead keeps memory bounded and every operation O(log n)
        # amortized (100,000 timers scheduled then cancelled leave nothing).
        heap = self.heap
        if self.dead > _COMPACT_MIN and self.dead * 2 > len(heap):
            heap[:] = [e for e in heap if e[2]._seq == e[1]]
            heapq.heapify(heap)
            self.dead = 0
            self._set_due()
        elif self.dead == len(heap):
            heap.clear()
            self.dead = 0
            self.due[0] = _INF

    def timeout_ms(self, ms: int) -> int:
        """The wait's timeout (ms, < 0 blocks), shortened to the next due
        timer (rounded up), or 0 when calls or ready channels are waiting."""
        if self.calls or self.ready:
            return 0
        heap = self.heap
        if heap and heap[0][2]._seq != heap[0][1]:
            while heap and heap[0][2]._seq != heap[0][1]:
                heapq.heappop(heap)              # a cancelled or re-armed entry
                self.dead -= 1
            self._set_due()
        if not heap:
            return ms
        left = heap[0][0] - _monotonic()
        if left <= 0:
            return 0
        t = math.ceil(left * 1000.0)
        if t > _INT_MAX:
            t = _INT_MAX
        return t if ms < 0 or t < ms else ms

    # -- after the iteration's I/O ----------------------------------------
    def run(self) -> None:
        """The iteration's services, in the loop's thread, after its I/O and
        the ready-now channels (_loop._svc_run): the thread-safe calls queued
        so far (FIFO), then the timers due now in deadline order (ties:
        scheduling order).  What these schedule runs next time."""
        calls = self.calls
        n = len(calls)
        while n > 0 and calls:
            n -= 1
            cb, args = calls.popleft()
            _call(cb, args)
        heap = self.heap
        if not heap:
            self.due[0] = _INF
            return
        now = _monotonic()
        limit = self.seq            # nothing scheduled from here on runs now
        ran = False                 # a callback ran since `now` was read
        while heap:
            when, seq, timer = heap[0]
            if timer._seq != seq:
                heapq.heappop(heap)
                self.dead -= 1
                continue
            if when > now or seq >= limit:
                break
            heapq.heappop(heap)
            timer._seq = -1
            iv = timer._interval
            if iv is not None:
                # fixed rate, never early, missed runs skipped (not bunched):
                # the first deadline after now on the original grid.  "Now"
                # is read again once a callback of this pass has run: one
                # that took longer than the interval would otherwise leave
                # this timer armed in the past, and it would run twice in a
                # row (a burst of the runs it missed meanwhile).
                t = _monotonic() if ran else now
                nxt = when + iv
                if nxt <= t:
                    nxt = when + iv * (math.floor((t - when) / iv) + 1)
                    if nxt <= t:
                        nxt += iv
                self.push(timer, nxt)
            self._set_due()
            ran = True
            _call(timer._callback, timer._args)
        self._set_due()


def _note(map: Any) -> None:
    # A map served on asyncio (aio.py) arms its bridge for the new deadline.
    _loop = sys.modules["fastasyncore._loop"]
    if _loop._wakers:
        _loop.note_services(map)


def _call(cb: Callable[..., Any], args: Tuple[Any, ...]) -> None:
    from ._loop import REraised
    try:
        cb(*args)
    except REraised:
        raise
    except BaseException:
        log.error("Exception in callback %r", cb, exc_info=True)


# ---------------------------------------------------------------------------
# The registry: one Services per map that used them.

_svcs: Dict[int, Services] = {}
_lock = threading.Lock()      # creation may race with another thread's


def lookup(map: Any) -> Optional[Services]:
    svc = _svcs.get(id(map))
    return svc if svc is not None and svc.map is map else None


def services_for(map: Any) -> Services:
    """The map's Services, made (and handed to its MapState) if needed."""
    svc = _svcs.get(id(map))
    if svc is not None and svc.map is map:
        return svc
    with _lock:
        svc = _svcs.get(id(map))
        if svc is None or svc.map is not map:
            svc = _svcs[id(map)] = Services(map)
            from . import _loop
            _loop.attach_services(map, svc)
    return svc


def idle(map: Any) -> bool:
    """No timers, calls or ready channels are waiting on map."""
    svc = lookup(map)
    return svc is None or svc.empty()


def release(map: Any) -> None:
    """The map's loop state is going away: drop its Services if they hold
    nothing (timers and calls outlive the state: a map that empties and
    fills again keeps them)."""
    svc = lookup(map)
    if svc is not None and svc.empty():
        with _lock:
            if _svcs.get(id(map)) is svc:
                del _svcs[id(map)]


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
