"""One loop for both backends: interest tracking, waiting, dispatch.

asyncore 3.11 rebuilds the kernel's interest set on every iteration: it asks
every channel ``readable()``/``writable()`` and hands the whole list to
``select()``/``poll()``.  Here each socket map owns a persistent poller
(:class:`MapState`), and an iteration only does work for what changed:

* *managed* channels -- our own ``dispatcher``, ``dispatcher_with_send`` and
  ``async_chat`` (and subclasses) that keep our ``readable()``/``writable()`` --
  are never asked.  Their interest is a function of state our code changes
  (connect, accept, send buffers, close); those places call :func:`touch`, and
  after each dispatch the channel's interest is recomputed.  An idle managed
  channel costs nothing per iteration.
* *consulted* channels -- anything that overrides ``readable()`` or
  ``writable()`` (class or instance), and duck-typed objects -- are asked
  every iteration, in map order, exactly as 3.11 does; the kernel is only told
  when an answer changes.

Events are delivered only to the dispatcher that owned the fd when the wait
began, and never to a dispatcher after it left the map (closed) in the same
iteration; see docs/compatibility.md.

Nothing here knows the asyncore module: the API module calls :func:`run`
(a whole loop() over a dict map; ``_cloop.run`` where the C loop serves the
backend) or :func:`poll_once` (one iteration, any mapping).
"""

import errno
import math
from itertools import compress as _compress
from operator import ne as _ne
import os
import threading
import time
from types import BuiltinMethodType as _BuiltinMethodType, MethodType as _MethodType
from typing import Any, Dict, List, Optional, Set, Tuple

from . import _backend, _services

__all__ = [
    "ExitNow", "REraised", "DISCONNECTED", "POLLIN", "POLLPRI", "POLLOUT",
    "MapState", "poll_once", "touch", "note_added", "note_removed",
    "forget_map", "forget_all", "poller_kind", "register_managed", "suspend",
    "bound_is", "reclassify", "INHERITED", "LOOP_VALID", "c_run",
    "loop_impl", "set_loop", "run", "attach_services", "ready_now", "wakeup",
    "set_waker", "note_services", "cloop_module",
]

POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP, POLLNVAL = 1, 2, 4, 8, 16, 32
_READ = POLLIN | POLLPRI
_RW = _READ | POLLOUT
_CLOSE_BITS = POLLHUP | POLLERR | POLLNVAL
# Not a poll(2) bit: the poller refused the fd, errno above _FAULT_SHIFT
# (both backends' POLLFAULT/FAULT_SHIFT; csrc/fastasyncore.h).
_FAULT = 0x8000
_FAULT_SHIFT = 16


class ExitNow(Exception):
    pass


REraised = (ExitNow, KeyboardInterrupt, SystemExit)
DISCONNECTED = frozenset({errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN,
                          errno.ECONNABORTED, errno.EPIPE, errno.EBADF})

# ---------------------------------------------------------------------------
# Which channels are managed.
#
# A class is managed when its (readable, writable, _fa_mask) triple is one we
# registered and both predicates are still the API module's data descriptors
# (so that an assignment on an instance reaches reclassify()): then
# _fa_mask() computes, from plain attributes, exactly what readable()/
# writable() would answer.  Cached per class (_kind_cache).
_MANAGED_TRIPLES: Set[Tuple[Any, Any, Any]] = set()

#: Class default of the slots where the predicate descriptors keep an
#: instance's own readable/writable: "none assigned".
INHERITED: Any = type("_Inherited", (), {"__repr__": lambda self: "<inherited>"})()


class WatchedPredicate:
    """Base of the API module's readable/writable data descriptors: an
    instance's own predicate is kept in the attribute named ``_slot``
    (INHERITED when it has none), and assigning one calls reclassify()."""

    __slots__ = ()
    _slot: str


# class -> _classify_class()'s triple + _slots()'s pair (_kind())
_kind_cache: Dict[type, Tuple[bool, bool, bool, Optional[str], Optional[str]]] = {}


#: _fa_mask functions the C loop computes itself instead of calling them
#: (fa_cloop.c's c_mask(): the same attribute reads, in the same order):
#: function -> 1 (dispatcher), 2 (dispatcher_with_send), 3 (async_chat).
C_MASKS: Dict[Any, int] = {}
_C_MASK_KINDS = {"dispatcher": 1, "dispatcher_with_send": 2, "async_chat": 3}


def register_managed(cls: type, c_mask: Optional[str] = None) -> None:
    """Declare that ``cls``'s readable/writable are mirrored by its _fa_mask
    (which the C loop may compute as ``c_mask`` describes)."""
    _MANAGED_TRIPLES.add((cls.readable, cls.writable, cls._fa_mask))
    _kind_cache.clear()
    if c_mask is not None:
        C_MASKS[cls.__dict__["_fa_mask"]] = _C_MASK_KINDS[c_mask]
    _states_changed()


def _static_attr(cls: type, name: str) -> Any:
    """The class attribute as stored (no descriptor call), or None."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def _is_watched(cls: type, name: str) -> bool:
    return hasattr(type(_static_attr(cls, name)), "__set__")


def _classify_class(cls: type) -> Tuple[bool, bool, bool]:
    """-> (managed, must_call_readable, must_call_writable)."""
    r = getattr(cls, "readable", None)
    w = getattr(cls, "writable", None)
    m = getattr(cls, "_fa_mask", None)
    if (r, w, m) in _MANAGED_TRIPLES and _is_watched(cls, "readable") \
            and _is_watched(cls, "writable"):
        res = (True, False, False)
    else:
        # A consulted class: call only the predicates the user defined.  Ours
        # (the base dispatcher's "return True") have no side effects, so not
        # calling them is unobservable.
        known_r = {t[0] for t in _MANAGED_TRIPLES}
        known_w = {t[1] for t in _MANAGED_TRIPLES}
        res = (False, r not in known_r or m is None, w not in known_w or m is None)
    return res


def bound_is(obj: Any, name: str, func: Any) -> bool:
    """True when ``obj.<name>`` is ``func`` bound to obj: neither the class nor
    the instance overrides it, so calling it is calling ``func(obj)``.

    Never ``name in obj.__dict__``: on CPython 3.11 and 3.12 reading
    ``obj.__dict__`` turns the instance's inline attribute values into a real
    dict for good, and every later ``self.x`` of the object takes a slower
    path (a handler reading 10 attributes: 78 -> 211 ns here; 8,000
    writable() calls: 266 -> 365 us).
    """
    m = getattr(obj, name, None)
    t = type(m)
    if t is _MethodType:
        return m.__func__ is func and m.__self__ is obj
    # a C method (asyncore's send/recv on the cffi backend, csrc/fa_chanio.c)
    # binds to a builtin method, which has no __func__: the class's attribute
    # is func and the instance's is a method of that name bound to obj
    return t is _BuiltinMethodType and m.__self__ is obj \
        and getattr(type(obj), name, None) is func and m.__name__ == func.__name__


def _instance_overrides(obj: Any, name: str) -> bool:
    """Has obj its own ``name`` (assigned on the instance)?  A false positive
    only makes the loop ask the predicate, as 3.11 does."""
    return not bound_is(obj, name, getattr(type(obj), name, None))


def reclassify(obj: Any) -> None:
    """obj got or lost its own readable()/writable(): from the next iteration
    on the loop asks it (or stops asking it), as 3.11 asks its predicates at
    the start of each iteration.  Called by the predicate descriptors, maybe
    from another thread: only the loop's own thread changes its state."""
    try:
        st = _states.get(id(obj._map))
        fd = obj._fileno
    except AttributeError:
        return          # not in a map yet: add_channel() classifies it
    if st is not None and fd is not None:
        st.reclass.add(fd)
        st.pending.add(fd)
        if _wakers:
            _wake(st)


def _slots(cls: type) -> Tuple[Optional[str], Optional[str]]:
    """-> (slot of readable, slot of writable): the attribute where a
    WatchedPredicate keeps an instance's override, or None where the class's
    predicate is something else."""
    r, w = (_static_attr(cls, n) for n in ("readable", "writable"))
    return (r._slot if isinstance(r, WatchedPredicate) else None,
            w._slot if isinstance(w, WatchedPredicate) else None)


def _own(obj: Any, slot: Optional[str], name: str) -> bool:
    """Has obj its own readable/writable (``name``)?  Where the class's is a
    WatchedPredicate, its slot says so (every assignment goes through the
    descriptor); else bound_is() decides (a getattr and a bound method:
    ~1 us each, twice per channel a loop adopts)."""
    if slot is not None:
        return getattr(obj, slot, INHERITED) is not INHERITED
    return _instance_overrides(obj, name)


def _kind(cls: type) -> Tuple[bool, bool, bool, Optional[str], Optional[str]]:
    """_classify_class(cls) + _slots(cls), cached: _classify() looks it up
    once per channel a loop adopts (a client adopts one per connection)."""
    res = _kind_cache[cls] = _classify_class(cls) + _slots(cls)
    return res


def _classify(obj: Any) -> Tuple[bool, bool, bool]:
    try:
        managed, call_r, call_w, slot_r, slot_w = _kind_cache[type(obj)]
    except KeyError:
        managed, call_r, call_w, slot_r, slot_w = _kind(type(obj))
    # a predicate already asked needs no look at the instance: its own one
    # is found by the call (and managed is False whenever one is asked);
    # _own(), inline where the class's predicate keeps its slot
    own_r = not call_r and (getattr(obj, slot_r, INHERITED) is not INHERITED
                            if slot_r is not None else _own(obj, None, "readable"))
    own_w = not call_w and (getattr(obj, slot_w, INHERITED) is not INHERITED
                            if slot_w is not None else _own(obj, None, "writable"))
    if own_r or own_w:
        return False, call_r or own_r, call_w or own_w
    return managed, call_r, call_w


# ---------------------------------------------------------------------------
_ADAPT_EVERY = 64          # iterations between two adapt() decisions
_ADAPT_FIRST = 8           # ... and before the first one: short-lived client
                           # loops (a few dozen iterations) must not spend
                           # them all in the wrong mode
#: Tests set this to "persistent" or "rebuild" to pin the wait strategy.
_force_mode: Optional[str] = None
_REBUILD_MAX_FDS = 4096    # above this a stateless poll(2) never pays
_SMALL_MAP = 32            # up to this many fds a stateless poll(2) always pays
_INT_MAX = 2**31 - 1
_get_ident = threading.get_ident
_monotonic = time.monotonic        # (fa_cloop.c reads it where not Linux)
_INF = float("inf")
# The map's own key object for each fd number (fa_cloop.c's g_keys): the
# wait reports fds as new int objects (above 256, where ints are not
# shared), and a dict lookup with an equal but distinct key pays a rich
# compare (~110 instructions) where the identical one is a pointer test.
# The dispatch makes several per event (owner, map, consulted).  Any value
# at index i is an int equal to i, so a stale entry is only slower.
_keys: List[Any] = list(range(1024))
_KEYS_MAX = 65536


def _remember_key(fd: Any) -> None:
    if type(fd) is int and fd > 256:
        try:
            _keys[fd] = fd
        except IndexError:
            if fd < _KEYS_MAX:
                _keys.extend(range(len(_keys), min(2 * fd, _KEYS_MAX)))
                _keys[fd] = fd


try:
    from select import poll as _select_poll
except ImportError:         # pragma: no cover - no poll() here (Windows)
    _select_poll = None


def _new_poller() -> Any:
    try:
        return _backend.current.Poller()
    except OSError:
        # epoll/kqueue need an fd of their own; out of fds (EMFILE), a
        # poll()-based poller still works (the listener can back off).
        if "poll" not in _backend.current.POLLER_KINDS:
            raise
        return _backend.current.Poller("poll")


def _can_poll_list() -> bool:
    return "poll" in _backend.current.POLLER_KINDS


_VEC_MIN = 8   # fewer consulted channels: the plain loop is never dearer


def _vectorize(snap: Tuple[Any, ...]) -> Optional[Tuple[str, Tuple[Any, ...], Tuple[Any, ...]]]:
    """("w"|"r", fds, objs) when every consulted channel overrides the same
    one predicate; None otherwise (then consult() walks them one by one)."""
    if len(snap) < _VEC_MIN:
        return None
    # (zip, not comprehensions: rebuilt whenever a consulted channel comes
    # or goes, e.g. per connection a client closes)
    fds, objs, call_r, call_w = zip(*snap)
    r, w = set(call_r), set(call_w)
    if r == _FALSE and w == _TRUE:
        which = "w"
    elif r == _TRUE and w == _FALSE:
        which = "r"
    else:
        return None
    return (which, fds, objs)


_TRUE, _FALSE = frozenset({True}), frozenset({False})


def _ask(which: str, objs: Tuple[Any, ...], select_mode: bool) -> List[int]:
    """The vectorized consult's question (MapState._consult_vec, and
    fa_cloop.c's consult_vec): each channel's mask in map order, asking the
    one predicate they all override (``which``: "w" writable, "r" readable)
    and reading ``accepting`` where 3.11 reads it.  One comprehension: its
    Python-to-Python calls cost less than calls from C."""
    if which == "w":
        return [(_READ if o.accepting else _RW) if o.writable() else _READ
                for o in objs]
    extra = POLLPRI if select_mode else 0
    w_only = extra | POLLOUT
    return [(_READ if o.accepting else _RW) if o.readable()
            else (extra if o.accepting else w_only) for o in objs]


def _map_order(m: Dict[Any, Any], fds: List[Any]) -> List[Any]:
    """fds (keys of m) in m's order, looked for from m's end, where keys
    set since the last iteration are."""
    want = set(fds)
    found = []
    try:
        keys = reversed(m)
    except TypeError:       # a map without reversed(): from the start
        return [fd for fd in m if fd in want]
    for fd in keys:
        if fd in want:
            found.append(fd)
            if len(found) == len(want):
                break
    found.reverse()
    return found


def _check_key(fd: Any) -> None:
    # What Poller.modify() checks, for keys that reach only poll_list().
    if not isinstance(fd, int):
        raise TypeError("fd must be an int, not %s" % type(fd).__name__)
    if fd < 0:
        raise ValueError("fd must be >= 0, got %d" % fd)
    if fd > _INT_MAX:
        raise OverflowError("fd %d is too large" % fd)


# The fields of MapState the C loop reads and writes: in _cloop.StateBase, a
# C struct, where that module is built (a pointer read each for fa_cloop.c
# instead of a getattr of ~150 instructions; to Python they are what
# __slots__ fields are), else in MapState's own __slots__.
_C_FIELDS = ("map", "thread", "poller", "owner", "mask", "consulted", "pending",
             "batch", "suspended", "full", "iters", "nchg", "nev", "adapt_at",
             "csnap", "cvec", "cprev", "spoll", "svc", "wakefd",
             "dead", "reclass", "disp", "faults")


def cloop_module() -> Any:
    """fastasyncore._cloop, or None where it is not built or may not load:
    FASTASYNCORE_BACKEND=pure stands for a platform without our compiled
    code, and loads none of it (no C channel methods, no StateBase)."""
    if os.environ.get("FASTASYNCORE_BACKEND", "auto").strip().lower() == "pure":
        return None
    try:
        from . import _cloop
    except ImportError:
        return None
    return _cloop


class _NoStateBase:
    """MapState's base where the C loop cannot run (no _cloop.StateBase):
    then MapState keeps _C_FIELDS in its own __slots__ and its bookkeeping
    is _PyBookkeeping's."""

    __slots__ = ()


def _state_base() -> type:
    """_cloop.StateBase, or _NoStateBase where the C loop cannot run."""
    base = getattr(cloop_module(), "StateBase", None)
    if base is None or not all(hasattr(base, f) for f in _C_FIELDS + _BOOKKEEPING):
        return _NoStateBase
    return base


#: MapState's per-fd bookkeeping, which _cloop.StateBase has in C (the
#: same steps; it comes first in MapState's MRO) and _PyBookkeeping has
#: in Python (the reference, and the pure backend's).
_BOOKKEEPING = ("_set_mask", "_drop", "_adopt")
_StateBase: Any = _state_base()


class _PyBookkeeping:
    """MapState's bookkeeping of one fd, and reconcile(), in Python: the
    reference (and the pure backend's).  fa_cloop.c's StateBase has the same
    four methods in C, step for step, and comes first in MapState's MRO
    where it is built: a client making a connection per request runs
    _adopt() and _drop() once per connection, and the loop runs reconcile()
    in every iteration after a managed channel's interest changed."""

    __slots__ = ()
    mask: Dict[Any, int]
    batch: Dict[Any, int]
    owner: Dict[Any, Any]
    consulted: Dict[Any, Tuple[Any, Any, bool, bool]]
    suspended: Dict[Any, float]
    reclass: Set[Any]
    dead: Dict[Any, Any]
    faults: List[Tuple[Any, Any, int]]
    disp: Optional[List[Any]]
    spoll: Any
    poller: Optional[Any]
    nchg: int
    wakefd: int
    csnap: Optional[Tuple[Any, ...]]
    cvec: Optional[Tuple[str, Tuple[Any, ...], Tuple[Any, ...]]]
    cprev: Optional[Tuple[bool, List[bool]]]
    map: Dict[Any, Any]
    pending: Set[Any]
    full: bool

    # (and MapState's _freeze(), _managed_mask(), _direct(), _direct_lost(),
    # _route_faults() and _reconcile_all(), which these call: Python in both)

    def _set_mask(self, fd: Any, m: int) -> None:
        cur = self.mask.get(fd, 0)
        if cur != m:
            if cur and m:
                self.mask[fd] = m
                sp = self.spoll
                if sp is not None and self.poller is None:
                    sp.register(fd, m)
                    self.nchg += 1
                else:
                    self.batch[fd] = m
                return
            # A first registration (the key is validated: a bad one raises
            # here and is not recorded, or every later iteration would fail
            # too) or a removal (applied at once, before a close).
            self.nchg += 1
            self.batch.pop(fd, None)
            if self.poller is not None:
                self.poller.modify(fd, m)
            else:
                if m and not (type(fd) is int and 0 <= fd <= _INT_MAX):
                    _check_key(fd)      # (raises)
                sp = self.spoll
                if sp is not None:
                    if m:
                        sp.register(fd, m)
                    else:
                        _unregister(sp, fd)
            if m:
                self.mask[fd] = m
            else:
                del self.mask[fd]

    def _drop(self, fd: Any) -> None:
        if self.disp is not None:
            self._freeze()
        if self.dead:
            self.dead.pop(fd, None)
        self.owner.pop(fd, None)
        if self.reclass:            # (mostly empty: a test is cheaper)
            self.reclass.discard(fd)
        if self.suspended:
            self.suspended.pop(fd, None)
        if self.consulted.pop(fd, None) is not None:
            # (cvec too: it holds the channel until the next consult
            # rebuilds both, so a closed channel is let go of at once)
            self.csnap = self.cvec = None
            _consulted_changed()
        if self.batch:
            self.batch.pop(fd, None)
        if fd in self.mask:
            del self.mask[fd]
            self.nchg += 1
            if self.poller is not None:
                self.poller.modify(fd, 0)
            elif self.spoll is not None:
                _unregister(self.spoll, fd)

    def _adopt(self, fd: Any, obj: Any) -> None:
        err = 0
        if self.dead and self.dead.get(fd) is obj:
            closed = True
        else:
            try:                # its socket closed without close()?
                closed = obj.socket.fileno() == -1
            except Exception:
                closed = False
        if closed:
            # Closed behind the dispatcher before the loop met it: its old
            # number may belong to anything now (our own poller, another
            # socket), so it is never registered.  3.11 would get EBADF
            # from select() (or POLLNVAL): routed as such, once.
            err = errno.EBADF
        elif fd == self.wakefd:
            # A stale key that is our wake-up fd's number now: as epoll
            # refuses its own fd (POLLFAULT), EINVAL.
            err = errno.EINVAL
        if err:
            self.owner[fd] = obj
            if self.consulted.pop(fd, None) is not None:
                self.csnap = None
                _consulted_changed()
            if fd in self.mask:
                self._set_mask(fd, 0)
            if fd not in self.dead:
                self.dead[fd] = obj
                self.faults.append((fd, obj, err))
            return
        managed, call_r, call_w = _classify(obj)
        if type(fd) is int and fd > 256:
            try:
                _keys[fd] = fd      # _remember_key(fd), inline but for growing
            except IndexError:
                _remember_key(fd)
        self.owner[fd] = obj
        if managed:
            if self.consulted.pop(fd, None) is not None:
                self.csnap = None
                _consulted_changed()
            m = self._managed_mask(fd, obj)
            self._set_mask(fd, m)
            obj._fa_regmask = m
        else:
            self.consulted[fd] = (fd, obj, call_r, call_w)
            self.csnap = None
            _consulted_changed()

    def reconcile(self) -> None:
        """Bring owner/mask/consulted in line with the map for changed fds.

        The fds the map reported (add_channel/del_channel, touch(), ...) are
        in ``pending``; only when the map still differs from ``owner`` after
        them (a key set or deleted on the map itself) or after fork/forget
        (``full``) does it walk the whole map.  (It walked it whenever the
        sizes differed, i.e. for every channel added: one accept() on a
        server of 8,000 channels cost 7 ms.)"""
        if self.full:
            self._reconcile_all()
            return
        m = self.map
        pending = self.pending
        owner = self.owner
        consulted = self.consulted
        mask = self.mask
        susp = self.suspended
        sp = self._direct()
        added: Optional[List[Any]] = None
        while pending:
            fd = pending.pop()
            obj = m.get(fd)
            if obj is None:
                self._drop(fd)
            elif owner.get(fd) is not obj:
                if fd in owner:
                    self._drop(fd)
                    self._adopt(fd, obj)
                    continue
                # A new fd (a client adds one per connection, a server one
                # per accept): of what _drop() does, only this can apply to
                # an fd no channel holds here (owner has every fd that dead,
                # consulted, mask and batch have).
                if self.disp is not None:
                    self._freeze()
                if self.reclass:
                    self.reclass.discard(fd)
                if self.suspended:
                    self.suspended.pop(fd, None)
                if added is None:
                    added = [fd]
                else:
                    added.append(fd)
            elif self.dead and fd in self.dead:
                continue            # never registered (see _adopt)
            elif self.reclass and fd in self.reclass:
                self.reclass.discard(fd)
                self._adopt(fd, obj)
            elif fd in consulted:
                self.cprev = None    # e.g. listen(): re-read accepting
            else:
                # The managed channel's answer, inline (hot: once per event).
                new = 0 if (susp and fd in susp) else obj._fa_mask()
                cur = mask.get(fd, 0)
                if new != cur:
                    if cur and new:
                        mask[fd] = new
                        if sp is None:
                            self.batch[fd] = new
                        else:
                            sp.register(fd, new)
                            self.nchg += 1
                    else:
                        self._set_mask(fd, new)
                obj._fa_regmask = new
        if added is not None:
            # Adopted in map order, as the full walk does: a consulted
            # channel is asked in that order, as 3.11 asks them.  Keys set
            # since the last iteration are the map's last ones.
            if len(added) > 1:
                added = _map_order(m, added)
            for fd in added:
                obj = m.get(fd)
                if obj is not None and fd not in owner:
                    self._adopt(fd, obj)
        if sp is not None and self.spoll is not sp:
            self._direct_lost(sp)
        if self.faults:
            self._route_faults()
        if len(m) != len(owner):
            self._reconcile_all()    # a change the map did not report


class MapState(_StateBase, _PyBookkeeping):  # type: ignore[misc]
    """The persistent poller and bookkeeping for one socket map."""

    __slots__ = (("cvec_on", "wake", "__weakref__")
                 + (_C_FIELDS if _StateBase is _NoStateBase else ()))

    def __init__(self, map: Dict[Any, Any]) -> None:
        self.map = map
        # The wake-up fd (_services.Waker): watched by every wait of this
        # state, never a key of the map (_adopt refuses it as one).
        self.wake = _services.Waker()
        self.wakefd: int = self.wake.rfd
        self.svc: Optional[_services.Services] = _services.lookup(map)
        # The first iterations wait with a stateless poll(2) where it can
        # serve the map (adapt() decides from the 8th on): registering every
        # fd with epoll first costs a syscall per fd and per interest
        # change, which a short-lived client loop never earns back (1,000
        # connecting clients: ~8,000 epoll_ctl calls in their first 8
        # iterations).
        self.poller: Optional[Any] = None
        if len(map) > _REBUILD_MAX_FDS or not _can_poll_list():
            self.poller = self._new_poller()
        # The containers below are never replaced, only mutated: the C loop
        # (fa_cloop.c) holds them for the whole of a loop() call.
        self.owner: Dict[Any, Any] = {}       # fd -> object the kernel entry is for
        self.mask: Dict[Any, int] = {}        # fd -> registered interest (non-zero)
        # fd -> (fd, obj, call_readable, call_writable): channels asked each turn
        self.consulted: Dict[Any, Tuple[Any, Any, bool, bool]] = {}
        self.pending: Set[Any] = set()        # fds to reconcile before waiting
        self.reclass: Set[Any] = set()        # ... and classify again (reclassify())
        self.csnap: Optional[Tuple[Any, ...]] = None  # consulted, as a tuple
        self.cvec: Optional[Tuple[str, Tuple[Any, ...], Tuple[Any, ...]]] = None
        self.cprev: Optional[Tuple[bool, List[bool]]] = None  # last masks (_consult_vec)
        self.cvec_on = True                   # use cvec (see consult())
        self.full = True                      # reconcile every fd of the map
        self.thread: Any = None     # thread inside poll_once (an int), or aio._SERVING
        self.suspended: Dict[Any, float] = {}  # fd -> monotonic time to resume
        # Interest changes of fds the poller already validated, handed over
        # in one update() call before the wait (one call per iteration).
        self.batch: Dict[Any, int] = {}
        # Interest changes seen over the last `iters` iterations: decides
        # between the persistent poller and a stateless poll (see adapt()).
        self.iters = 0
        self.nchg = 0
        self.nev = 0                          # events delivered (adapt())
        self.adapt_at = _ADAPT_FIRST
        # The Python loop's stateless wait (poller None): a select.poll kept
        # in line with `mask` (see _spoll()).
        self.spoll: Any = None
        # [owner, mask.get, events] of a select-mode dispatch pass in
        # progress (_dispatch()); _freeze() points the first two at copies.
        self.disp: Optional[List[Any]] = None
        # fd -> channel never registered: its socket was closed (fileno()
        # -1) when the loop met it; the fault is routed once (faults, by
        # reconcile()), then it stays silent until it leaves the map.
        self.dead: Dict[Any, Any] = {}
        self.faults: List[Tuple[Any, Any, int]] = []

    def _new_poller(self) -> Any:
        poller = _new_poller()
        if self.wakefd >= 0:
            poller.modify(self.wakefd, POLLIN)
        return poller

    def _woken(self) -> None:
        # The wait reported the wake-up fd (which no channel owns).
        self.wake.drain()

    def _direct(self) -> Any:
        """The select.poll to hand interest changes to at once, or None (then
        they go to the batch, for the persistent poller's update() or for
        fa_cloop.c).  In the stateless mode of the Python loop every change
        of an fd's mask goes to `spoll` as it is made."""
        return self.spoll if self.poller is None else None

    def _direct_lost(self, sp: Any) -> None:
        """A callback run meanwhile (a nested loop on this map, from a
        predicate) switched the wait mode: the changes handed to ``sp``
        since are not where the wait looks.  Rare; redo it all."""
        if self.spoll is sp:
            return
        if self.poller is not None:
            for fd, m in self.mask.items():
                self.poller.modify(fd, m)
        else:
            self.spoll = None      # built from mask at the wait

    def flush(self) -> None:
        batch = self.batch
        self.nchg += len(batch)
        if self.poller is not None:
            self.poller.update(batch)
        elif self.spoll is not None:
            register = self.spoll.register
            for fd, m in batch.items():
                register(fd, m)
        batch.clear()

    def adapt(self) -> None:
        """Pick the cheaper way to wait for the coming iterations.

        A persistent poller (epoll/kqueue) costs one kernel call per interest
        change, and its level-triggered readiness is dear per *event* too:
        the kernel runs a wake-up callback for every write to a watched
        socket and polls every ready item again at each wait.  A stateless
        poll(2) costs a little per registered fd and nothing per event or
        change.  Measured on Linux 6.18 (C loop, 3.11): one stock channel
        spinning 1.37 -> 1.02 us per iteration, a dispatcher_with_send
        ping-pong 5.05 -> 4.33 us per message over 1 socketpair and 4.20 ->
        3.74 over 100, the docs pattern (writable() toggling) 7.8 -> 5.7:
        all with poll(2).  So small maps, and maps where most fds are ready
        or change every iteration, use the stateless poll (which is what
        3.11 does, in C); large maps of mostly idle channels move to (or,
        above _REBUILD_MAX_FDS, start with) the persistent poller, which wins
        there by far (8,000 idle channels: ~1 us per iteration instead of
        milliseconds).  A map starts with the stateless poll (__init__), and
        the two thresholds below leave a band where either mode stays: a map
        of 33 to 64 idle fds keeps the stateless poll it started with.
        """
        if self.iters:
            chg = self.nchg / self.iters
            ev = self.nev / self.iters
        else:
            chg = ev = 0.0
        n = len(self.mask)
        self.iters = 0
        self.nchg = 0
        self.nev = 0
        self.adapt_at = _ADAPT_EVERY
        if _force_mode is not None:
            chg = ev = float(n if _force_mode == "rebuild" else -_SMALL_MAP)
        # fds a stateless poll may scan per iteration and still be cheaper:
        # by the changes it saves, or (a different cost) by the events
        churn = 5 * chg
        busy = _SMALL_MAP + 4 * ev
        if self.poller is not None:
            if (n < churn or n <= busy) and n <= _REBUILD_MAX_FDS and _can_poll_list():
                self.poller.close()
                self.poller = None
                self.spoll = None    # built at the first wait
        elif (n > 2 * churn and n > 2 * busy) or n > _REBUILD_MAX_FDS:
            poller = self._new_poller()
            for fd, m in self.mask.items():
                poller.modify(fd, m)
            self.poller = poller
            self.spoll = None

    def _freeze(self) -> None:
        """An owner or a mask is about to change during a select-mode
        dispatch pass: keep what they were when the wait returned, for the
        rest of the pass (fa_cloop.c collects them before dispatching)."""
        ctx = self.disp
        self.disp = None
        owner = self.owner
        mask = self.mask
        fds = [e[0] for e in ctx[2]]              # type: ignore[index]
        ctx[0] = {fd: owner[fd] for fd in fds if fd in owner}  # type: ignore[index]
        ctx[1] = {fd: mask.get(fd, 0) for fd in fds}.get  # type: ignore[index]

    def _managed_mask(self, fd: Any, obj: Any) -> int:
        if self.suspended and fd in self.suspended:
            return 0
        return obj._fa_mask()

    def _reconcile_all(self) -> None:
        m = self.map
        self.full = False
        self.pending.clear()
        for fd in [fd for fd in self.owner if m.get(fd) is not self.owner[fd]]:
            self._drop(fd)
        # Rebuild consulted in map order (3.11 asks channels in map order).
        old = self.consulted.copy()
        self.consulted.clear()
        self.csnap = None
        _consulted_changed()
        reclass = self.reclass
        dead = self.dead
        for fd, obj in list(m.items()):
            if self.owner.get(fd) is obj and fd not in old and fd not in reclass:
                if dead and dead.get(fd) is obj:
                    continue
                mm = self._managed_mask(fd, obj)
                self._set_mask(fd, mm)
                obj._fa_regmask = mm
            else:
                self._adopt(fd, obj)
        reclass.clear()
        if self.faults:
            self._route_faults()

    def _route_faults(self) -> None:
        # After the bookkeeping (a handler may close or add channels): the
        # channels _adopt() found closed, each routed once, if still mapped.
        faults = self.faults
        m = self.map
        while faults:
            fd, obj, err = faults.pop(0)
            if m.get(fd) is obj:
                _route_fault(obj, _FAULT | err << _FAULT_SHIFT)

    def snapshot(self) -> Tuple[Any, ...]:
        """The consulted channels as a tuple, in map order (cached)."""
        snap = self.csnap
        if snap is None:
            snap = self.csnap = tuple(self.consulted.values())
            self.cvec = _vectorize(snap)
            self.cprev = None
        return snap

    def consult(self, select_mode: bool) -> None:
        """Ask consulted channels, as 3.11 does, and record changed answers.
        (fa_cloop.c's consult() is the plain loop below, in C; where every
        consulted channel overrides the same one predicate it always takes
        the vectorized pass, consult_vec(): there the comparing is in C, so
        flipping answers cost no more than stable ones, and cvec_on -- this
        method's switch -- is not used.)"""
        snap = self.snapshot()
        vec = self.cvec
        if vec is not None and not self.suspended:
            if self.cvec_on:
                changed = self._consult_vec(vec, select_mode)
                if changed * 4 > len(vec[1]):
                    self.cvec_on = False    # most answers flip: one by one is cheaper
                return
            changed = self._consult_one(vec, select_mode)
            self.cprev = None
            if changed * 8 <= len(vec[1]):
                self.cvec_on = True         # mostly stable answers: vectorize again
            return
        changed = direct = 0
        mask = self.mask
        batch = self.batch
        susp = self.suspended
        extra = POLLPRI if select_mode else 0   # select(): r-or-w go in xlist
        owner = self.owner
        sp = self._direct()
        w_only = extra | POLLOUT
        for fd, obj, call_r, call_w in snap:
            # 3.11: readable(), then writable(), then (when writable)
            # accepting; r-or-w also in select()'s xlist (`extra`, which
            # _READ holds already).  Constants, no int operations.
            if not call_r or obj.readable():
                if not call_w or obj.writable():
                    m = _READ if obj.accepting else _RW
                else:
                    m = _READ
            elif not call_w or obj.writable():
                m = extra if obj.accepting else w_only
            else:
                m = 0
            if susp and fd in susp:
                m = 0
            cur = mask.get(fd, 0)
            if cur != m:
                changed += 1
                if cur and m:
                    mask[fd] = m
                    if sp is None:
                        batch[fd] = m
                    else:
                        sp.register(fd, m)
                        direct += 1
                elif owner.get(fd) is obj:   # not closed by an earlier answer
                    self._set_mask(fd, m)
        if sp is not None:
            self.nchg += direct
            if self.spoll is not sp:
                self._direct_lost(sp)
        self.cprev = None
        if vec is not None and changed * 8 <= len(snap):
            self.cvec_on = True         # mostly stable answers: vectorize again

    def _consult_one(self, vec: Tuple[str, Tuple[Any, ...], Tuple[Any, ...]],
                     select_mode: bool) -> int:
        # The plain loop below consult(), for channels that all override the
        # same one predicate (the docs pattern, its answers flipping): the
        # same calls and reads, in the same order, with the predicate known.
        # -> how many masks changed.
        which, fds, objs = vec
        mask = self.mask
        batch = self.batch
        owner = self.owner
        sp = self._direct()
        # (counting the unchanged answers: this pass runs where most flip)
        same = rare = 0
        if which == "w":
            for fd, obj in zip(fds, objs):
                if obj.writable():
                    m = _READ if obj.accepting else _RW
                else:
                    m = _READ
                try:
                    if mask[fd] == m:   # (a subscript: no method call)
                        same += 1
                        continue
                except KeyError:
                    # not registered (m is never 0 here): the channel's
                    # first answer (_adopt leaves a consulted channel to its
                    # first consult), or one closed by an earlier answer
                    rare += 1
                    if owner.get(fd) is obj:   # not closed by an earlier answer
                        self._set_mask(fd, m)
                    continue
                mask[fd] = m
                if sp is None:
                    batch[fd] = m
                else:
                    sp.register(fd, m)
        else:
            extra = POLLPRI if select_mode else 0
            w_only = extra | POLLOUT
            for fd, obj in zip(fds, objs):
                if obj.readable():
                    m = _READ if obj.accepting else _RW
                else:
                    m = extra if obj.accepting else w_only
                try:
                    cur = mask[fd]
                except KeyError:
                    cur = 0     # not registered: the first answer, an
                                # answer of 0 (a paused listener, poll mode),
                                # or a channel closed by an earlier answer
                if cur == m:
                    same += 1
                elif cur and m:
                    mask[fd] = m
                    if sp is None:
                        batch[fd] = m
                    else:
                        sp.register(fd, m)
                else:
                    rare += 1
                    if owner.get(fd) is obj:
                        self._set_mask(fd, m)
        changed = len(fds) - same
        if sp is not None:
            self.nchg += changed - rare     # (_set_mask() counts its own)
            if self.spoll is not sp:
                self._direct_lost(sp)
        return changed

    def _consult_vec(self, vec: Tuple[str, Tuple[Any, ...], Tuple[Any, ...]],
                     select_mode: bool) -> int:
        # Every consulted channel overrides the same one predicate (the docs
        # pattern: writable() only).  Ask them all in one comprehension
        # (_ask()) and only look at the channels whose mask changed since the
        # last iteration.  -> how many changed (0 when there was no previous
        # pass to compare with).  Cheaper than the plain loop in consult()
        # unless most answers flip every iteration, hence consult()'s switch.
        # (fa_cloop.c's consult_vec() is this method after the _ask() call,
        # in C, where it is the cheaper pass whatever the answers do.)
        which, fds, objs = vec
        masks = _ask(which, objs, select_mode)
        prev = self.cprev
        key = (select_mode, masks)
        if prev is not None and prev[0] == select_mode:
            if prev[1] == masks:
                return 0
            todo: Any = list(_compress(zip(fds, objs, masks), map(_ne, masks, prev[1])))
            changed = len(todo)
        else:
            todo = zip(fds, objs, masks)
            changed = 0
        self.cprev = key
        mask = self.mask
        batch = self.batch
        owner = self.owner
        sp = self._direct()
        direct = 0
        for fd, obj, m in todo:
            cur = mask.get(fd, 0)
            if cur != m:
                if cur and m:
                    mask[fd] = m
                    if sp is None:
                        batch[fd] = m
                    else:
                        sp.register(fd, m)
                        direct += 1
                elif owner.get(fd) is obj:   # not closed by an earlier answer
                    self._set_mask(fd, m)
        if sp is not None:
            self.nchg += direct
            if self.spoll is not sp:
                self._direct_lost(sp)
        return changed

    def close(self) -> None:
        if self.poller is not None:
            self.poller.close()
        self.wake.close()
        _services.release(self.map)
        self.spoll = None
        self.owner.clear()
        self.mask.clear()
        self.consulted.clear()
        self.csnap = None
        _consulted_changed()



def _no_c_loop() -> None:
    pass


#: Called wherever a MapState.consulted changes: the C loop's dispatch
#: trusts what it found consulted until then (fa_cloop.c's owner_of()).
#: _cloop.consulted_changed once the C loop is configured.
_consulted_changed: Any = _no_c_loop

_states: Dict[int, MapState] = {}
_MAX_IDLE_STATES = 32


def _state(map: Dict[Any, Any]) -> MapState:
    st = _states.get(id(map))
    if st is None or st.map is not map:
        if len(_states) >= _MAX_IDLE_STATES:
            # States are caches; drop those of maps that are empty now.
            for key, other in list(_states.items()):
                if not other.map and other.thread is None:
                    other.close()
                    del _states[key]
        st = _states[id(map)] = MapState(map)
        # Services made by another thread between MapState() and the line
        # above found no state to attach to (attach_services): look again.
        st.svc = _services.lookup(map)
    return st


def touch(obj: Any) -> None:
    """A managed channel's state changed: recompute its interest before the next wait."""
    try:
        rm = obj._fa_regmask
        if rm == -1 and not _wakers:
            # Never registered as a managed channel (a consulted one, or one
            # no loop has met yet): the consult that asks it every
            # iteration, or its adoption, reads the new state.  (A client's
            # connect() and handle_connect_event() make this test inline and
            # do not call: it is the common case once per connection.)
            return
        if obj._fa_mask() == rm:
            return      # the kernel already has this interest: nothing to do
        st = _states.get(id(obj._map))
    except AttributeError:
        return
    if st is not None:
        fd = obj._fileno
        if fd is not None:
            st.pending.add(fd)
            if _wakers:
                _wake(st)


def suspend(obj: Any, seconds: float) -> None:
    """Stop polling obj's fd for ``seconds`` (EMFILE back-off on accept)."""
    try:
        st = _states.get(id(obj._map))
    except AttributeError:
        return
    fd = obj._fileno
    if st is not None and fd is not None:
        st.suspended[fd] = time.monotonic() + seconds
        st.pending.add(fd)
        if _wakers:
            _wake(st)


def note_added(map: Dict[Any, Any], fd: Any) -> None:
    st = _states.get(id(map))
    if st is not None and st.map is map:
        st.pending.add(fd)
        if _wakers:
            _wake(st)


def note_removed(map: Dict[Any, Any], fd: Any) -> None:
    """fd left the map: unregister it now, before its socket is closed."""
    st = _states.get(id(map))
    if st is not None and st.map is map:
        st._drop(fd)
        st.pending.discard(fd)
        if not map and st.thread is None:
            forget_map(map)
        if _wakers:
            _wake(st)


def forget_map(map: Dict[Any, Any]) -> None:
    st = _states.get(id(map))
    if st is None or st.map is not map:
        return
    if st.thread is not None:
        # Another thread (or an outer frame) is inside this poller's wait:
        # freeing it now would pull the memory from under the C call.  The
        # owner of the wait forgets the map when it returns (poll_once).
        st.full = True
        _states_changed()       # a C loop holding st reads st.full again
        return
    del _states[id(map)]
    st.close()


def forget_all() -> None:
    for st in list(_states.values()):
        forget_map(st.map)


#: Bumped by _states_changed(): run() looks its held state up again only then.
_states_gen = 0


def _states_changed() -> None:
    # The loops cache a MapState (the C loop: and per-class facts) across
    # iterations: a held state can only be replaced (fork) or told to
    # reconcile in full (forget_map) through here.
    global _states_gen
    _states_gen += 1
    if _crun is not None:
        from . import _cloop
        _cloop.states_changed()


def _after_fork_in_child() -> None:
    # The child shares the parent's epoll/kqueue instance through the
    # inherited fd: changing it would change the parent's registrations.
    # Drop every state; the next iteration builds a fresh poller.
    for st in list(_states.values()):
        try:
            if st.poller is not None:
                st.poller.close()
        except OSError:
            pass
        try:
            # the child's copies (the parent keeps its own); a fresh lock:
            # another thread of the parent may have held it at the fork
            st.wake.lock = threading.Lock()
            st.wake.close()
        except OSError:
            pass
    _states.clear()
    _states_changed()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def poller_kind() -> str:
    return _backend.current.POLLER_KINDS[0]


# ---------------------------------------------------------------------------
# Dispatch: the same exception routing as asyncore 3.11's read/write/_exception
# and readwrite, plus the owner checks.



def _route_fault(obj: Any, ev: int) -> None:
    """A refused fd (POLLFAULT: errno in ev's high bits) reaches its channel
    as 3.11's readwrite() routes an OSError from the socket: handle_close()
    for the disconnect errnos, handle_error() otherwise (inside the except
    clause, so that handle_error() sees it).  fa_cloop.c: set_fault()."""
    err = ev >> _FAULT_SHIFT
    try:
        raise OSError(err, os.strerror(err))
    except OSError:
        if err in DISCONNECTED:
            obj.handle_close()
        else:
            obj.handle_error()


def _readwrite(obj: Any, flags: int, map: Dict[Any, Any], fd: Any) -> None:
    if flags & _FAULT:
        _route_fault(obj, flags)
        return
    try:
        if flags & POLLIN:
            obj.handle_read_event()
            if map.get(fd) is not obj:
                return
        if flags & POLLOUT:
            obj.handle_write_event()
            if map.get(fd) is not obj:
                return
        if flags & POLLPRI:
            obj.handle_expt_event()
            if map.get(fd) is not obj:
                return
        if flags & _CLOSE_BITS:
            obj.handle_close()
    except OSError as e:
        if e.errno not in DISCONNECTED:
            obj.handle_error()
        else:
            obj.handle_close()
    except REraised:
        raise
    except BaseException:
        obj.handle_error()


def _timeout_ms(timeout: Optional[float], select_mode: bool) -> int:
    if timeout is None:
        return -1
    if select_mode:
        if timeout < 0:
            raise ValueError("timeout must be non-negative")
        # select() has microsecond resolution; round up so that a short
        # timeout is not turned into a busy poll.
        return math.ceil(timeout * 1000)
    # poll2(): int(timeout*1000) truncation, negative blocks (3.11 behaviour).
    ms = int(timeout * 1000)
    return -1 if ms < 0 else ms


def _resume_due(st: MapState) -> int:
    """Resume suspended fds whose time came; -> ms until the next one, or -1."""
    now = time.monotonic()
    nxt = None
    for fd, t in list(st.suspended.items()):
        if t <= now:
            del st.suspended[fd]
            st.pending.add(fd)
        elif nxt is None or t < nxt:
            nxt = t
    return -1 if nxt is None else math.ceil((nxt - now) * 1000)


# ---------------------------------------------------------------------------
# Which loop runs the iterations: the C loop (fastasyncore._cloop, beside the
# cffi core; csrc/fa_cloop.c) or the Python one below, its reference and the
# pure backend's loop.  FASTASYNCORE_LOOP=auto|c|py, read once at import:
# auto = C whenever the cffi backend is active and _cloop was built; c = the
# same, but a cffi backend without _cloop is an ImportError; py = never C.

LOOP_VALID = ("auto", "c", "py")
_loop_choice = os.environ.get("FASTASYNCORE_LOOP", "auto").strip().lower() or "auto"
_crun: Any = None          # _cloop.run, configured for _crun_backend
_crun_backend: Any = None  # the backend module _crun was resolved for


def _resolve_crun(backend: Any) -> Any:
    if _loop_choice == "py" or backend.NAME != "cffi":
        return None
    try:
        from . import _cloop
        if _StateBase is not getattr(_cloop, "StateBase", None):
            # (FASTASYNCORE_BACKEND=pure at import, cffi now: the states
            # are plain Python objects, which the C loop cannot read)
            raise ImportError("MapState is not built on _cloop.StateBase")
    except ImportError as exc:
        if _loop_choice == "c":
            raise ImportError("FASTASYNCORE_LOOP='c' but the C loop "
                              "(fastasyncore._cloop) is not available: %s" % exc) from exc
        return None
    _cloop.configure(__import__(__name__, fromlist=["_"]), backend.WAIT_ADDR,
                     backend.POLL_ADDR)
    global _consulted_changed
    _consulted_changed = _cloop.consulted_changed
    return _cloop.run


def c_run() -> Any:
    """``_cloop.run`` when the C loop serves the current backend, else None."""
    global _crun, _crun_backend
    be = _backend.current
    if be is not _crun_backend:
        _crun = _resolve_crun(be)
        _crun_backend = be
    return _crun


def loop_impl() -> str:
    """"c" when loop()/poll()/poll2() iterate in C now, else "py"."""
    return "c" if c_run() is not None else "py"


def set_loop(name: str) -> None:
    """Choose the loop at run time (tests, benchmarks): auto, c or py."""
    global _loop_choice, _crun_backend
    if name not in LOOP_VALID:
        raise ValueError("loop must be one of %s, not %r" % (", ".join(LOOP_VALID), name))
    _loop_choice = name
    _crun_backend = None
    c_run()


if _loop_choice not in LOOP_VALID:
    raise ImportError("FASTASYNCORE_LOOP=%r: expected one of %s"
                      % (_loop_choice, ", ".join(repr(v) for v in LOOP_VALID)))


def poll_once(map: Dict[Any, Any], timeout: Optional[float], select_mode: bool) -> None:
    """One iteration of asyncore.poll (select_mode) or asyncore.poll2."""
    st = _state(map)
    me = threading.get_ident()
    outer = st.thread
    if outer is not None and outer != me:
        raise RuntimeError(_busy_message(outer))
    st.thread = me
    try:
        _poll_once(st, map, timeout, select_mode)
    finally:
        st.thread = outer
        if outer is None and not map:
            forget_map(map)


def _busy_message(holder: Any) -> str:
    """Why poll_once() refuses a map whose state ``holder`` (st.thread) holds:
    another thread's loop, or a foreign event loop (fastasyncore.aio) that
    says so itself."""
    msg = getattr(holder, "busy_message", None)
    if msg is not None:
        return str(msg)
    return ("the same socket map is being polled from two threads "
            "at once; asyncore maps are not thread-safe")


# ---------------------------------------------------------------------------
# Foreign event loops (fastasyncore.aio.serve()).  A map they drive can get
# work from outside their dispatch -- a channel added or an interest changed
# by another task -- which the loops above only see at their next iteration.
# touch(), suspend(), reclassify(), note_added() and note_removed() call the
# driver's waker, so that it reconciles soon instead of at its next timer.

#: id(MapState) -> callable(): the waker of the foreign loop driving that state
_wakers: Dict[int, Any] = {}


def set_waker(st: MapState, waker: Optional[Any]) -> None:
    """Install (or, with None, remove) the waker of a foreign loop driving st."""
    if waker is None:
        _wakers.pop(id(st), None)
    else:
        _wakers[id(st)] = waker


def note_services(map: Any) -> None:
    """The map's Services got an earlier deadline or work from outside an
    iteration: a map served on asyncio (aio.py) arms its bridge for it."""
    st = _states.get(id(map))
    if st is not None and st.map is map:
        _wake(st)


def _wake(st: MapState) -> None:
    w = _wakers.get(id(st))
    if w is not None:
        w()


_DONE = -2   # _prepare(): the iteration is over (it slept: nothing to wait on)


def _sleep(seconds: Any) -> None:
    # fa_cloop.c's select() of empty lists (time.sleep looked up at call time)
    time.sleep(seconds)



def _prepare(st: MapState, map: Dict[Any, Any], timeout: Optional[float],
             select_mode: bool) -> int:
    """Everything of an iteration before the wait: resume suspended fds,
    reconcile, consult, flush the batch, adapt.  -> ms to wait (< 0: block),
    or _DONE.  Shared by the Python loop and the C loop (which calls it only
    when one of these steps has work to do, see fa_cloop.c)."""
    resume_ms = _prepare_head(st, map)
    if st.consulted:
        st.consult(select_mode)
        if st.pending or len(map) != len(st.owner):
            st.reconcile()
    return _prepare_tail(st, timeout, select_mode, resume_ms)


def _prepare_head(st: MapState, map: Dict[Any, Any]) -> int:
    """_prepare()'s steps before the consult.  -> ms until a suspended fd
    resumes, or -1.  (The C loop calls the head and the tail and consults
    in between itself: a client's first iteration asks every new channel,
    and answers them, there -- not in MapState.consult().)"""
    if st.disp is not None:
        st._freeze()        # a nested iteration, from a handler
    resume_ms = -1
    if st.suspended:
        resume_ms = _resume_due(st)
    if st.pending or st.full or len(map) != len(st.owner):
        st.reconcile()
    return resume_ms


def _prepare_tail(st: MapState, timeout: Optional[float],
                  select_mode: bool, resume_ms: int) -> int:
    """_prepare()'s steps after the consult (flush, the timeout, adapt)."""
    if st.batch:
        st.flush()
    ms = _timeout_ms(timeout, select_mode)
    svc = st.svc
    if resume_ms >= 0 and (ms < 0 or resume_ms < ms):
        ms = resume_ms
        if not st.mask and select_mode and svc is None:
            time.sleep(ms / 1000.0)
            return _DONE
    if not st.mask and select_mode and svc is None:
        # (with loop services the wait runs: it watches the wake-up fd)
        time.sleep(timeout)  # type: ignore[arg-type]  # 3.11: TypeError for None
        return _DONE
    st.iters += 1
    if st.iters >= st.adapt_at or _force_mode is not None:
        st.adapt()
    return ms


def _spoll(st: MapState) -> Any:
    """A select.poll holding st.mask, for the stateless wait (st.poller None).

    The Python loop keeps it in line with the mask as the mask changes
    (_set_mask, flush, _drop), so that an iteration costs one poll() instead
    of a fresh poll object plus a register() per fd (what poll_list and 3.11
    do: 0.44 instead of 0.85 us for one fd on 3.11).  Where the C loop
    changes the mask without it, it drops it (fa_cloop.c's spoll_stale()),
    so a spoll that is there holds the mask: no loop() call compares it with
    a mirror dict (O(n) per call, paid per iteration by a user's own
    ``while ...: loop(count=1)``), and no change is written twice."""
    sp = _select_poll()
    register = sp.register
    for fd, m in st.mask.items():
        register(fd, m)
    if st.wakefd >= 0:
        register(st.wakefd, POLLIN)     # (never in mask: _adopt refuses it)
    st.spoll = sp
    return sp


def _unregister(sp: Any, fd: Any) -> None:
    """Take a removed fd out of the stateless wait's select.poll (it holds
    the mask, so the fd is there; an fd the mask never had is no error)."""
    try:
        sp.unregister(fd)
    except KeyError:
        pass


def _stateless_wait(st: MapState, ms: int) -> List[Tuple[int, int]]:
    """One stateless poll(2) over st.mask, waiting up to ms (< 0: block)."""
    if _select_poll is None:
        return _backend.current.poll_list(st.mask, ms)
    sp = st.spoll
    if sp is None:
        sp = _spoll(st)
    return sp.poll(ms if ms <= _INT_MAX else _INT_MAX)


def _poll_once(st: MapState, map: Dict[Any, Any], timeout: Optional[float],
               select_mode: bool) -> None:
    ms = _prepare(st, map, timeout, select_mode)
    if ms == _DONE:
        return
    svc = st.svc
    if svc is not None:
        ms = svc.timeout_ms(ms)
    if st.poller is None:
        events = _stateless_wait(st, ms)
    else:
        events = st.poller.wait(ms)
    if events:
        st.nev += len(events)
        _dispatch(st, map, events, select_mode)
    if st.svc is not None:
        _svc_run(st, map, select_mode)


# ---------------------------------------------------------------------------
# Loop services (_services.py): the hooks the loops call around the wait
# when the map has Services (st.svc), and what asyncore.py's API uses.

def attach_services(map: Any, svc: Any) -> None:
    """A map got its Services: its state (if any) runs them from now on."""
    st = _states.get(id(map))
    if st is not None and st.map is map:
        st.svc = svc
        _states_changed()       # the loops holding st read st.svc again


def _svc_run(st: MapState, map: Any, select_mode: bool) -> None:
    """After the iteration's I/O: ready-now channels (a read event each,
    routed as the wait's would be), then calls and due timers."""
    svc = st.svc
    if svc is None:
        return
    if svc.ready:
        # as a POLLIN from the wait, for the channels still where they were
        owner = st.owner
        ready = [(fd, POLLIN) for fd, obj in svc.ready.items()
                 if map.get(fd) is obj and owner.get(fd) is obj]
        svc.ready.clear()
        if ready:
            _dispatch(st, map, ready, select_mode)
    svc.run()


def wakeup(map: Any) -> None:
    """Make the current wait on map return (any thread): its state's wake-up
    fd.  No state: no loop is iterating on map (a state exists for as long
    as one does), and the next one looks at its Services first."""
    st = _states.get(id(map))
    if st is not None and st.map is map:
        st.wake.wake()


def ready_now(obj: Any, map: Any = None) -> None:
    """obj has input buffered above the kernel (records a TLS layer has
    decrypted and keeps): at the end of the next iteration, whose wait does
    not block, the loop calls obj.handle_read_event() (3.11's routing) if obj
    is still in its map under the same fd.  One-shot: call it again for more.
    For the loop's thread."""
    if map is None:
        map = obj._map
    fd = obj._fileno
    if fd is not None:
        _services.services_for(map).ready[fd] = obj


def _run_release(st: MapState, map: Dict[Any, Any]) -> None:
    # What poll_once's `finally` does for a state run() held (fa_cloop.c's
    # loopst_release): the thread back, an emptied map forgotten.
    st.thread = None
    if not map:
        forget_map(map)


def run(map: Dict[Any, Any], timeout: Optional[float], select_mode: bool,
        count: Optional[int]) -> None:
    """asyncore.loop()'s iterations over a dict map; ``count`` None (until the
    map is empty) or an int.  The Python twin, and the reference, of
    ``_cloop.run`` (fa_cloop.c's cloop_run), used where the C loop is not.

    Each iteration does what poll_once(map, timeout, select_mode) does, with
    the map's MapState held for the whole call instead of per iteration
    (st.thread set once, given back at the end, also on an exception) and
    _prepare() called only when the iteration needs more than the common
    steps: suspended fds, a full reconcile, adapt() (iterations and events
    are counted here and handed to the state before it looks), a pinned
    ``_force_mode``.  An iteration whose state is missing, used by an outer
    frame or another thread, or was replaced (fork, forget_map) runs through
    poll_once, as in C.
    """
    if count is None:
        left = -1               # never reaches 0
    elif count <= 0:
        return
    else:
        left = count
    states = _states
    key = id(map)
    me = None
    st: Optional[MapState] = None
    ms = None                   # _timeout_ms(), computed once when needed
    nit = nev = room = 0
    owner = mask = pending = consulted = batch = None
    wakefd = -1
    extra = POLLPRI if select_mode else 0   # select(): r-or-w go in xlist
    w_only = extra | POLLOUT
    gen = -1
    svc = None                  # st.svc, read again when _states_gen moves
    busy = False                # the last stateless wait found events
    skip = backoff = 0          # timeout-0 tries skipped after a miss
    try:
        while left and map:
            left -= 1
            if st is None or gen != _states_gen:
                cur = states.get(key)
                gen = _states_gen
                svc = cur.svc if cur is not None else None
            else:
                cur = st
            if cur is not st:
                # first iteration, or the state was dropped (fork, forget)
                if st is not None:
                    st.iters += nit
                    st.nev += nev
                    nit = nev = 0
                    held, st = st, None
                    _run_release(held, map)
                if cur is not None and cur.map is map and cur.thread is None:
                    if me is None:
                        me = _get_ident()
                    cur.thread = me
                    st = cur
                    owner = st.owner
                    mask = st.mask
                    pending = st.pending
                    consulted = st.consulted
                    batch = st.batch
                    wakefd = st.wakefd
                    room = st.adapt_at - st.iters - 1
            if st is None:
                # no state yet, or in use by an outer frame (a handler calling
                # loop() on its own map) or another thread (which raises)
                poll_once(map, timeout, select_mode)
                continue
            # -- prepare (_prepare's steps; fa_cloop.c's prepare/prep_kind)
            if room <= 0 or st.full or st.suspended or _force_mode is not None:
                st.iters += nit
                st.nev += nev
                nit = nev = 0
                wms = _prepare(st, map, timeout, select_mode)
                room = st.adapt_at - st.iters - 1
                if wms == _DONE:
                    continue
                if wms > _INT_MAX:
                    wms = _INT_MAX
            else:
                if pending or len(map) != len(owner):
                    st.reconcile()
                if consulted:
                    snap = st.csnap
                    if snap is None or st.cvec is not None:
                        st.consult(select_mode)
                    else:
                        # consult()'s plain loop, inline (few consulted
                        # channels, none suspended: the light path's terms)
                        sp = st.spoll if st.poller is None else None
                        nd = 0
                        for cfd, cobj, call_r, call_w in snap:
                            if not call_r or cobj.readable():
                                if not call_w or cobj.writable():
                                    m = _READ if cobj.accepting else _RW
                                else:
                                    m = _READ
                            elif not call_w or cobj.writable():
                                m = extra if cobj.accepting else w_only
                            else:
                                m = 0
                            cm = mask.get(cfd, 0)
                            if cm != m:
                                if cm and m:
                                    mask[cfd] = m
                                    if sp is None:
                                        batch[cfd] = m
                                    else:
                                        sp.register(cfd, m)
                                        nd += 1
                                elif owner.get(cfd) is cobj:  # not closed meanwhile
                                    st._set_mask(cfd, m)
                        if sp is not None:
                            st.nchg += nd
                            if st.spoll is not sp:
                                st._direct_lost(sp)
                        # (st.cprev only matters to the vectorized pass)
                    if pending or len(map) != len(owner):
                        st.reconcile()
                if batch:
                    # flush(), inline
                    st.nchg += len(batch)
                    poller = st.poller
                    if poller is not None:
                        poller.update(batch)
                    else:
                        sp = st.spoll
                        if sp is not None:
                            for cfd, m in batch.items():
                                sp.register(cfd, m)
                    batch.clear()
                if ms is None:
                    ms = _timeout_ms(timeout, select_mode)
                    if ms > _INT_MAX:
                        ms = _INT_MAX
                if select_mode and not mask and svc is None:
                    _sleep(timeout)         # 3.11's select() of empty lists
                    continue
                nit += 1
                room -= 1
                wms = ms
            if svc is not None:
                # Services.timeout_ms(), inline (an iteration with a timer
                # pending but not due makes no call)
                if svc.calls or svc.ready:
                    wms = 0
                else:
                    due = svc.due[0]
                    if due != _INF:
                        due -= _monotonic()     # (not `left`: the count)
                        t = 0 if due <= 0 else min(math.ceil(due * 1000.0), _INT_MAX)
                        if wms < 0 or t < wms:
                            wms = t
            # -- wait
            poller = st.poller
            if poller is not None:
                events = poller.wait(wms)
            elif _select_poll is not None:
                sp = st.spoll
                if sp is None:
                    sp = _spoll(st)
                if not wms:
                    events = sp.poll(0)
                elif busy and skip <= 0:
                    # the last wait found events: most likely there are
                    # some now, and a poll(2) without a timeout queues no
                    # wait entries and arms no timer; after a miss the next
                    # 1, 2, 4 ... 64 tries are skipped (fa_cloop.c,
                    # wait_stateless)
                    events = sp.poll(0)
                    if events:
                        backoff = 0
                    else:
                        backoff = min(backoff * 2, 64) if backoff else 1
                        skip = backoff
                        events = sp.poll(wms)
                        busy = bool(events)
                else:
                    skip -= 1
                    events = sp.poll(wms)
                    busy = bool(events)
            else:
                events = _backend.current.poll_list(mask, wms)
            if not events:
                if svc is not None and (svc.calls or svc.ready or svc.due[0] <= _monotonic()):
                    _svc_run(st, map, select_mode)
                continue
            nev += len(events)
            if len(events) != 1:
                _dispatch(st, map, events, select_mode)
                svc = st.svc        # (made by a thread that woke us?)
                if svc is not None and (svc.calls or svc.ready or svc.due[0] <= _monotonic()):
                    _svc_run(st, map, select_mode)
                continue
            # -- dispatch of the one event (the common case of a busy small
            # map): _dispatch() inline, one handler for POLLIN / POLLOUT
            fd, ev = events[0]
            if fd == wakefd:
                st._woken()
                svc = st.svc        # (made by the thread that woke us?)
                if svc is not None and (svc.calls or svc.ready or svc.due[0] <= _monotonic()):
                    _svc_run(st, map, select_mode)
                continue
            try:
                fd = _keys[fd]      # the map's own key object (_keys)
            except IndexError:
                pass
            try:
                obj = owner[fd]     # (the wait reports registered fds: mask's
            except KeyError:        # keys, all owned; a subscript, no call)
                continue
            if select_mode:
                if ev == POLLIN:
                    if map.get(fd) is obj:
                        try:
                            obj.handle_read_event()
                        except REraised:
                            raise
                        except BaseException:
                            obj.handle_error()
                        if fd not in consulted and obj._fa_mask() != obj._fa_regmask:
                            pending.add(fd)
                elif ev == POLLOUT:     # (registered for it: see _dispatch)
                    if map.get(fd) is obj:
                        try:
                            obj.handle_write_event()
                        except REraised:
                            raise
                        except BaseException:
                            obj.handle_error()
                        if fd not in consulted and obj._fa_mask() != obj._fa_regmask:
                            pending.add(fd)
                else:
                    _dispatch(st, map, events, True)
            elif map.get(fd) is obj:
                if ev == POLLIN or ev == POLLOUT:
                    try:
                        if ev == POLLIN:
                            obj.handle_read_event()
                        else:
                            obj.handle_write_event()
                    except OSError as e:
                        if e.errno not in DISCONNECTED:
                            obj.handle_error()
                        else:
                            obj.handle_close()
                    except REraised:
                        raise
                    except BaseException:
                        obj.handle_error()
                else:
                    _readwrite(obj, ev, map, fd)
                if fd not in consulted and obj._fa_mask() != obj._fa_regmask:
                    pending.add(fd)
            if svc is not None and (svc.calls or svc.ready or svc.due[0] <= _monotonic()):
                _svc_run(st, map, select_mode)
    finally:
        if st is not None:
            st.iters += nit
            st.nev += nev
            _run_release(st, map)


def _dispatch(st: MapState, map: Dict[Any, Any], events: List[Tuple[int, int]],
              select_mode: bool) -> None:
    """Deliver one wait's events (the reference for fa_cloop.c's dispatch)."""
    owner = st.owner
    pending = st.pending
    consulted = st.consulted
    # After each handler of a managed channel: did it change what
    # readable()/writable() would answer?  (A predicate assigned on the
    # instance reaches reclassify() through the descriptor instead.)
    wakefd = st.wakefd
    keys = _keys
    if not select_mode:
        for fd, ev in events:
            if fd == wakefd:        # (checked first: a dead stale key may own it)
                st._woken()
                continue
            try:
                fd = keys[fd]       # the map's own key object (_keys)
            except IndexError:
                pass
            try:
                obj = owner[fd]     # (absent: closed by an earlier handler)
            except KeyError:
                continue
            if map.get(fd) is not obj:
                continue
            if ev == POLLIN or ev == POLLOUT:
                # _readwrite() of one handler, inline (the common events)
                try:
                    if ev == POLLIN:
                        obj.handle_read_event()
                    else:
                        obj.handle_write_event()
                except OSError as e:
                    if e.errno not in DISCONNECTED:
                        obj.handle_error()
                    else:
                        obj.handle_close()
                except REraised:
                    raise
                except BaseException:
                    obj.handle_error()
            else:
                _readwrite(obj, ev, map, fd)
            if fd not in consulted and obj._fa_mask() != obj._fa_regmask:
                pending.add(fd)
        return
    # 3.11 order: every read, then every write, then every exception; each
    # event goes to the fd's owner, and is filtered by its interest, as they
    # were when the wait returned.  The reads run in the same pass as the
    # lookups (no list of them): until a handler changes an owner or a mask
    # (_drop(): a channel closed; _prepare(): a nested iteration), the
    # current ones are those, and the first such change freezes them for
    # the rest of the pass (MapState._freeze(): ctx[0], ctx[1] redirected).
    writes: Optional[List[Tuple[Any, Any]]] = None
    expts: Optional[List[Tuple[Any, Any]]] = None
    ctx = [owner, st.mask.get, events]
    outer = st.disp
    st.disp = ctx
    try:
        for fd, ev in events:
            if fd == wakefd:
                st._woken()
                continue
            try:
                fd = keys[fd]       # the map's own key object (_keys)
            except IndexError:
                pass
            try:
                obj = ctx[0][fd]    # (absent: closed by an earlier handler,
            except KeyError:        # or no one's when the pass was frozen)
                continue
            if ev != POLLIN:
                # (POLLIN alone or POLLOUT alone, the common cases: the kernel
                # -- and the pure poller's stand-ins for it -- reports them
                # only for fds registered for them, so the mask test is moot.)
                if ev == POLLOUT:
                    if writes is None:
                        writes = [(fd, obj)]
                    else:
                        writes.append((fd, obj))
                    continue
                if ev & _FAULT:
                    # a refused fd: routed in the read pass (as in C)
                    if map.get(fd) is obj:
                        _route_fault(obj, ev)
                        if fd not in consulted and obj._fa_mask() != obj._fa_regmask:
                            pending.add(fd)
                    continue
                m = ctx[1](fd, 0)
                if ev & POLLNVAL:
                    # select() would fail with EBADF; poll() reports NVAL.
                    # Let the dispatcher see it as a read (its recv then
                    # fails with EBADF, which asyncore turns into
                    # handle_close()).
                    ev |= POLLIN | POLLOUT
                if m & POLLOUT and ev & (POLLOUT | POLLERR | POLLHUP):
                    if writes is None:
                        writes = []
                    writes.append((fd, obj))
                if m & POLLPRI and ev & POLLPRI:
                    if expts is None:
                        expts = []
                    expts.append((fd, obj))
                if not (m & POLLIN and ev & (POLLIN | POLLHUP | POLLERR)):
                    continue
            # 3.11's read()/write()/_exception(): the same exception routing.
            if map.get(fd) is obj:
                try:
                    obj.handle_read_event()
                except REraised:
                    raise
                except BaseException:
                    obj.handle_error()
                if fd not in consulted and obj._fa_mask() != obj._fa_regmask:
                    pending.add(fd)
    finally:
        st.disp = outer
    if writes is not None:
        for fd, obj in writes:
            if map.get(fd) is obj:
                try:
                    obj.handle_write_event()
                except REraised:
                    raise
                except BaseException:
                    obj.handle_error()
                if fd not in consulted and obj._fa_mask() != obj._fa_regmask:
                    pending.add(fd)
    if expts is not None:
        for fd, obj in expts:
            if map.get(fd) is obj:
                try:
                    obj.handle_expt_event()
                except REraised:
                    raise
                except BaseException:
                    obj.handle_error()
                if fd not in consulted and obj._fa_mask() != obj._fa_regmask:
                    pending.add(fd)


# Where MapState's base is _cloop.StateBase, its per-fd bookkeeping runs in
# C (see _PyBookkeeping), and so do note_added() and note_removed(), which
# asyncore's add_channel() and del_channel() call once per channel: the
# Python functions above are the reference (and the pure backend's).
_py_note_added, _py_note_removed = note_added, note_removed
if _StateBase is not _NoStateBase:
    cloop_module().bookkeeping(globals())
    note_added = cloop_module().note_added  # noqa: F811
    note_removed = cloop_module().note_removed  # noqa: F811
