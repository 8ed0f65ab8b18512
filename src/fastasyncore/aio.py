"""Run an asyncore socket map on the running asyncio event loop.

``await serve(map)`` drives the map's dispatchers from the asyncio loop's own
thread, beside asyncio tasks and callbacks, until the map is empty::

    import asyncio
    from fastasyncore import asyncore
    from fastasyncore.aio import serve

    async def main():
        EchoServer("127.0.0.1", 8007)            # asyncore, unchanged
        web = await asyncio.start_server(...)     # asyncio, same thread
        await serve()                             # until the map is empty

How it works.  The map's :class:`~fastasyncore._loop.MapState` keeps doing
the bookkeeping it does under ``loop()`` (which fds a channel wants polled,
asking the channels that override ``readable()``/``writable()``, picking up
channels added or closed), but the poller it talks to is a :class:`_Bridge`:
each interest change becomes ``add_reader``/``add_writer``/``remove_*`` on
the asyncio loop.  Readiness the asyncio loop reports is collected and handed
to the loop's own dispatch (``_loop._dispatch``, ``poll2()``'s routing) in one
batch, after a zero-timeout ``poll()`` over the batch's fds has confirmed it:
the default selector loop reports an fd again in the iteration before a batch
ran, and such a stale report must never reach a handler.  A channel that
starts wanting to write is polled by the next batch first and gets an asyncio
writer only if it is not writable then (the docs pattern toggles writable()
at every message: no add_writer/remove_writer pair each time).  Removals
reach asyncio at once, before the dispatcher's close() closes the socket, so
an fd number reused within a batch starts clean.  The loop's own poller
(epoll/kqueue) is closed while serving; loop() starts again from its
stateless wait and adapts.

Semantics (see README, "asyncio bridge"):

* ``poll2()``-style dispatch (``loop(use_poll=True)``): the same handler calls
  and exception routing; ``ExitNow``, ``KeyboardInterrupt`` and
  ``SystemExit`` from a handler end ``serve()`` by raising there.
* Channels that override ``readable()``/``writable()`` are asked after every
  batch of events and every :data:`CONSULT_INTERVAL` seconds when idle; an
  idle map of managed channels costs nothing.
* Cancelling the task stops at once (no handler runs after ``cancel()``),
  removes the asyncio registrations and leaves the channels in the map.
* One map, one driver: ``serve()`` refuses a map that another ``serve()`` or
  a ``loop()`` in another thread is driving, and ``loop()``/``poll()`` on a
  served map -- from another thread, another task, or a handler -- raise
  ``RuntimeError`` (a nested loop would block the asyncio loop).
* Priority data (``POLLPRI``) is delivered with the map's next batch, not on
  its own: asyncio watches readability and writability only.
"""

import asyncio
import errno
import select
import threading
from time import monotonic as _monotonic
from typing import Any, Dict, List, Optional, Set, Tuple

from . import _loop
from . import asyncore as _asyncore

__all__ = ["serve", "CONSULT_INTERVAL"]

#: Seconds between two consultations of an idle map's ``readable()`` /
#: ``writable()`` overrides (``loop()`` asks at least every ``timeout``).
CONSULT_INTERVAL = 1.0

_READ = _loop.POLLIN | _loop.POLLPRI
_WRITE = _loop.POLLOUT
_NEVER = 1 << 62        # st.adapt_at while bridged: the wait mode is ours
_ALWAYS = frozenset({errno.EPERM, errno.EBADF})


_select_poll = getattr(select, "poll", None)
_INF = float("inf")


def _select_now(want: Dict[int, int]) -> List[Tuple[int, int]]:
    """A zero-timeout poll(2) over ``want`` (fd -> interest) made of
    select(), where there is no poll() (Windows): (fd, revents) pairs, a
    closed fd as POLLNVAL."""
    if not want:
        return []
    rl = [fd for fd, m in want.items() if m & _loop.POLLIN]
    wl = [fd for fd, m in want.items() if m & _loop.POLLOUT]
    xl = [fd for fd, m in want.items() if m & _loop.POLLPRI]
    try:
        r, w, x = select.select(rl, wl, xl, 0)
    except (OSError, ValueError):
        if len(want) == 1:
            return [(fd, _loop.POLLNVAL) for fd in want]
        out: List[Tuple[int, int]] = []
        for fd, m in want.items():
            out += _select_now({fd: m})
        return out
    bits: Dict[int, int] = {}
    for fds, bit in ((r, _loop.POLLIN), (w, _loop.POLLOUT), (x, _loop.POLLPRI)):
        for fd in fds:
            bits[fd] = bits.get(fd, 0) | bit
    return list(bits.items())


class _Serving:
    """st.thread while a map is served: loop() on it raises busy_message."""

    __slots__ = ()
    busy_message = ("this socket map is being served by fastasyncore.aio.serve() "
                    "on an asyncio event loop; loop()/poll() cannot drive it at "
                    "the same time")

    def __repr__(self) -> str:
        return "<served by fastasyncore.aio.serve()>"


_SERVING = _Serving()


class _Bridge:
    """The MapState's poller while served: interest -> asyncio registrations,
    asyncio readiness -> one batch dispatched through the loop's _dispatch."""

    def __init__(self, aloop: asyncio.AbstractEventLoop, st: _loop.MapState,
                 map: Any) -> None:
        self.aloop = aloop
        self.st = st
        self.map = map
        self.tid = threading.get_ident()
        self.reg: Dict[int, int] = {}       # fd -> _READ/_WRITE bits told to asyncio
        self.ready: Dict[int, int] = {}     # fd -> bits asyncio reported
        self.always: Set[int] = set()       # refused (EPERM/EBADF): poll(2) decides
        # fds that want POLLOUT and have no asyncio writer yet: the next
        # batch polls them first (a socket is mostly writable at once: no
        # add_writer/remove_writer pair per write, the docs pattern's cost)
        self.wpend: Set[int] = set()
        self.faults: List[Tuple[int, int]] = []  # refused otherwise: reported once
        self.done: "asyncio.Future[None]" = aloop.create_future()
        self.scheduled = False      # a batch is due (or running)
        self.forced = False         # ... and must reconcile/consult (wake())
        self.timer: Optional[asyncio.Handle] = None
        self.timer_at = 0.0
        # the loop services' next deadline (time.monotonic(), as timers')
        self.svc_timer: Optional[asyncio.TimerHandle] = None
        self.svc_at = 0.0

    # -- the poller interface MapState uses (see _pure.Poller) -------------
    def modify(self, fd: int, events: int) -> None:
        _loop._check_key(fd)
        self._apply(fd, events)
        if not events and not self.map:
            self.wake()             # the map was emptied: serve() returns

    def update(self, changes: Dict[int, int]) -> None:
        for fd, events in changes.items():
            self._apply(fd, events)

    def wait(self, timeout_ms: int) -> List[Tuple[int, int]]:
        raise RuntimeError(_Serving.busy_message)

    def close(self) -> None:
        pass                        # the registrations go in stop()

    # -- asyncio registrations ---------------------------------------------
    def _apply(self, fd: int, events: int) -> None:
        want = (_READ if events & _READ else 0) | (_WRITE if events & _WRITE else 0)
        have = self.reg.get(fd, 0)
        if want & _WRITE and not have & _WRITE and fd not in self.always:
            self.wpend.add(fd)      # registered by _confirmed() if not writable
            want &= ~_WRITE
            if not self.scheduled:  # (a running batch looks at wpend last)
                self.scheduled = True
                self.aloop.call_soon(self.batch)
        elif self.wpend:
            self.wpend.discard(fd)
        self._register(fd, want, have)

    def _register(self, fd: int, want: int, have: int) -> None:
        if want == have:
            return
        if fd in self.always:
            if not want:
                self.always.discard(fd)
                del self.reg[fd]
            else:
                self.reg[fd] = want
            return
        self._unwatch(fd, have & ~want)
        try:
            self._watch(fd, want & ~have)
        except OSError:
            # A stale key (the fd was closed and its number reused behind
            # our back): drop it all and register afresh, once.
            self._unwatch(fd, _READ | _WRITE)
            try:
                self._watch(fd, want)
            except OSError as exc:
                self._unwatch(fd, _READ | _WRITE)
                self._refused(fd, exc)
        if want:
            self.reg[fd] = want
        else:
            self.reg.pop(fd, None)

    def _watch(self, fd: int, bits: int) -> None:
        if bits & _READ:
            self.aloop.add_reader(fd, self.on_ready, fd, _READ)
        if bits & _WRITE:
            self.aloop.add_writer(fd, self.on_ready, fd, _WRITE)

    def _unwatch(self, fd: int, bits: int) -> None:
        # remove_* of an fd closed while registered raises in some versions
        # (selectors' modify() of a dead fd); the key is gone then anyway.
        if bits & _READ:
            try:
                self.aloop.remove_reader(fd)
            except OSError:
                pass
        if bits & _WRITE:
            try:
                self.aloop.remove_writer(fd)
            except OSError:
                pass

    def _refused(self, fd: int, exc: OSError) -> None:
        # What the backend pollers do with an fd the kernel refuses: a
        # closed one reads POLLNVAL and a regular file is always ready, as
        # poll(2) says (the zero-timeout poll of each batch asks it); any
        # other refusal is the fd's, reported once (POLLFAULT, errno).
        if exc.errno in _ALWAYS:
            self.always.add(fd)
        elif exc.errno is None:
            raise exc
        else:
            self.faults.append((fd, _loop._FAULT | exc.errno << _loop._FAULT_SHIFT))
        self.wake()

    def stop(self) -> None:
        """Remove every asyncio registration and timer (serve() is over)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.svc_timer is not None:
            self.svc_timer.cancel()
            self.svc_timer = None
        for fd, bits in list(self.reg.items()):
            if fd not in self.always:
                self._unwatch(fd, bits)
        self.reg.clear()
        self.always.clear()
        self.wpend.clear()
        self.ready.clear()

    # -- readiness and batches ---------------------------------------------
    def on_ready(self, fd: int, bit: int) -> None:
        """asyncio's reader/writer callback: note it, dispatch in a batch."""
        r = self.ready
        r[fd] = r.get(fd, 0) | bit
        if not self.scheduled:
            self.scheduled = True
            self.aloop.call_soon(self.batch)

    def wake(self) -> None:
        """Run a batch soon (the map changed outside a batch); any thread."""
        self.forced = True
        if self.scheduled:
            return
        self.scheduled = True
        if threading.get_ident() == self.tid:
            self.aloop.call_soon(self.batch)
        else:
            self.aloop.call_soon_threadsafe(self.batch)

    def _confirmed(self) -> List[Tuple[int, int]]:
        # The batch's events, as a zero-timeout poll(2) over its fds sees
        # them now, for the interest the MapState has now.
        ready = self.ready
        if self.always:
            for fd in self.always:
                ready.setdefault(fd, 0)
        wpend = self.wpend
        if wpend:
            for fd in wpend:
                ready.setdefault(fd, 0)
            self.wpend = set()
        self.ready = {}
        mask = self.st.mask
        if _select_poll is not None:
            p = _select_poll()
            n = 0
            for fd in ready:
                m = mask.get(fd)
                if m:
                    p.register(fd, m)
                    n += 1
            events = p.poll(0) if n else []
        else:
            events = _select_now({fd: mask[fd] for fd in ready if mask.get(fd)})
        if wpend:
            # Writable now: dispatched, and polled again by the next batch
            # while it wants POLLOUT.  Not writable: an asyncio writer waits.
            ok = {fd for fd, ev in events if ev & (_WRITE | _loop._CLOSE_BITS)}
            for fd in wpend:
                if not mask.get(fd, 0) & _WRITE or fd in self.always:
                    continue
                if fd in ok:
                    self.wpend.add(fd)
                else:
                    have = self.reg.get(fd, 0)
                    self._register(fd, have | _WRITE, have)
        if self.faults:
            events = self.faults + events
            self.faults = []
        return events

    def batch(self) -> None:
        """Dispatch the collected events, then bring the registrations in
        line with the map (reconcile, consult, flush: _loop._prepare).

        self.scheduled stays set while it runs: what handlers change is
        seen by this batch's prepare(), not by another batch.  A batch
        woken by a change made outside a batch prepares before it
        dispatches too.  A batch whose reports all proved stale dispatches
        nothing and, unless woken, skips prepare(): nothing changed since
        the last one."""
        if self.done.done():
            self.scheduled = False
            return                  # cancelled or finished: no handler runs
        st, map = self.st, self.map
        try:
            if map and (self.forced or st.pending):
                # Changed outside a batch (another task): first bring the
                # interest up to date, so that the confirming poll and the
                # dispatch see it, as loop() prepares before it waits.
                self.prepare()
                self.forced = False
            events = None
            if self.ready or self.faults or self.always or self.wpend:
                events = self._confirmed()
                if events:
                    st.nev += len(events)
                    _loop._dispatch(st, map, events, False)
            if map and st.svc is not None:
                # the loop services, as loop() runs them after the
                # iteration's I/O: ready-now channels, thread-safe calls,
                # due timers; then the next deadline is armed on asyncio
                _loop._svc_run(st, map, False)
                self.arm_services()
            if map and (events or self.forced or st.pending or st.full
                        or len(map) != len(st.owner)):
                self.prepare()
                self.forced = False
        except BaseException as exc:
            self.scheduled = False
            self.finish(exc)
            return
        self.scheduled = False
        if not map:
            self.finish(None)
        elif self.always or self.wpend or self.faults or self.ready or self.forced:
            # poll(2) would report these now: as loop() does, iterate again
            self.scheduled = True
            self.aloop.call_soon(self.batch)

    def prepare(self) -> None:
        st = self.st
        if st.poller is not self:
            self.adopt()            # a test's _force_mode made adapt() switch
        st.adapt_at = _NEVER
        ms = _loop._prepare(st, self.map, None, False)
        if st.poller is not self:
            self.adopt()
        delay: Optional[float] = CONSULT_INTERVAL if st.consulted else None
        if ms >= 0 and (delay is None or ms / 1000.0 < delay):
            delay = ms / 1000.0     # a suspended fd (accept back-off) resumes
        if delay is not None:
            at = self.aloop.time() + delay
            if self.timer is None or self.timer_at > at:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = self.aloop.call_at(at, self.on_timer)
                self.timer_at = at

    def on_timer(self) -> None:
        self.timer = None
        self.wake()

    def arm_services(self) -> None:
        """A batch for the map's loop services when they need one: at once
        for waiting calls or ready channels, else at the next deadline."""
        svc = self.st.svc
        if svc is None:
            return
        if svc.calls or svc.ready:
            self.forced = True          # the end of the batch runs another
            return
        due = svc.due[0]
        if due == _INF:
            return
        if self.svc_timer is not None:
            if self.svc_at <= due:
                return
            self.svc_timer.cancel()
        self.svc_at = due
        self.svc_timer = self.aloop.call_later(max(0.0, due - _monotonic()),
                                               self.on_svc_timer)

    def on_svc_timer(self) -> None:
        self.svc_timer = None
        self.wake()

    def on_wakefd(self) -> None:
        """The MapState's wake-up fd (call_soon_threadsafe, wakeup()): empty
        it and run a batch, which runs the services."""
        self.st._woken()
        self.wake()

    def adopt(self) -> None:
        """Become the MapState's poller: register what it holds."""
        st = self.st
        old = st.poller
        if old is not None and old is not self:
            old.close()
        st.poller = self
        st.spoll = None
        self.stop()
        for fd, m in st.mask.items():
            self._apply(fd, m)
        st.batch.clear()

    def finish(self, exc: Optional[BaseException]) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


async def serve(map: Optional[Dict[int, Any]] = None) -> None:
    """Drive the socket ``map`` (default ``asyncore.socket_map``) on the
    running asyncio event loop until the map is empty.

    Returns at once for an empty map.  Raises ``RuntimeError`` when the map
    is already driven (another ``serve()``, or ``loop()`` in another
    thread), and what a handler lets through (``ExitNow``,
    ``KeyboardInterrupt``, ``SystemExit``, an error of ``handle_error()``).
    Cancelling the task stops serving at once; the channels stay in the map.
    """
    if map is None:
        map = _asyncore.socket_map
    if not map:
        return
    aloop = asyncio.get_running_loop()
    st = _loop._state(map)
    if st.thread is not None:
        if st.thread is _SERVING:
            raise RuntimeError("this socket map is already being served by "
                               "another fastasyncore.aio.serve()")
        raise RuntimeError("this socket map is being polled by loop()/poll() "
                           "(in another thread, or an outer frame); it cannot "
                           "be served at the same time")
    bridge = _Bridge(aloop, st, map)
    st.thread = _SERVING
    _loop.set_waker(st, bridge.wake)
    wakefd = st.wakefd
    try:
        if wakefd >= 0:
            aloop.add_reader(wakefd, bridge.on_wakefd)
        bridge.adopt()
        bridge.prepare()
        bridge.arm_services()
        if bridge.forced:
            bridge.wake()
        if not map:
            return
        await bridge.done
    finally:
        bridge.stop()
        if wakefd >= 0:
            aloop.remove_reader(wakefd)
        _loop.set_waker(st, None)
        # Back to the loop's stateless wait; loop() adapts from there.
        st.poller = None
        st.spoll = None
        st.batch.clear()
        st.iters = st.nchg = st.nev = 0
        st.adapt_at = _loop._ADAPT_FIRST
        _loop._run_release(st, map)
