"""MapState's per-fd bookkeeping in C against its Python reference.

_loop._PyBookkeeping has _set_mask(), _drop(), _adopt() and reconcile() in
Python (the pure backend's); _cloop.StateBase has them in C, step for step,
and so has
_cloop note_added()/note_removed() for _loop's Python functions.  Each
script below runs once through each implementation, on a fresh MapState
with recording stand-ins for the stateless wait's select.poll ("spoll") and
the persistent poller, and everything the operations leave behind -- every
field, every call made on the stand-ins, every exception -- must be the same.
Skipped where _cloop is not built (or, with FASTASYNCORE_REQUIRE_CORE=1,
failed).
"""

import errno
import os

import pytest

from fastasyncore import _loop
from fastasyncore import asyncore

REQUIRE_CORE = os.environ.get("FASTASYNCORE_REQUIRE_CORE") == "1"


def _c_state_base():
    base = _loop._StateBase
    if base is _loop._NoStateBase:
        why = "MapState has no C base here (_cloop not built, or the pure backend)"
        if REQUIRE_CORE:
            pytest.fail(why + " (FASTASYNCORE_REQUIRE_CORE=1)")
        pytest.skip(why)
    return base


class Recorder:
    """select.poll / poller stand-in: records calls; unregister() of fd 13
    raises KeyError (an fd the poll object never had), of fd 14 OSError."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def register(self, fd, m):
        self.calls.append((self.name, "register", fd, m))

    def unregister(self, fd):
        self.calls.append((self.name, "unregister", fd))
        if fd == 13:
            raise KeyError(fd)
        if fd == 14:
            raise OSError(errno.EBADF, "stand-in")

    def modify(self, fd, m):
        self.calls.append((self.name, "modify", fd, m))

    def close(self):
        pass


class FakeSock:
    def __init__(self, no):
        self.no = no

    def fileno(self):
        if isinstance(self.no, BaseException):
            raise self.no
        return self.no

    def close(self):
        pass


class Docs(asyncore.dispatcher):          # consulted: writable() overridden
    def writable(self):
        return False


class Both(asyncore.dispatcher):          # consulted: both predicates
    def readable(self):
        return True

    def writable(self):
        return True


class BadMask(asyncore.dispatcher):       # managed; its interest raises once broken
    broken = False

    @property
    def accepting(self):
        if self.broken:
            raise ZeroDivisionError("accepting")
        return False

    @accepting.setter
    def accepting(self, value):
        pass


def _channel(kind, fd):
    """A channel no map holds, whose socket is a stand-in."""
    if kind == "docs":
        ch = Docs()
    elif kind == "badmask":
        ch = BadMask()
    elif kind == "both":
        ch = Both()
    elif kind == "dws":
        ch = asyncore.dispatcher_with_send()
        ch.connected = True
    else:
        ch = asyncore.dispatcher()
    ch.socket = FakeSock(fd)
    if kind == "closed":
        ch.socket = FakeSock(-1)
    elif kind == "fileno-raises":
        ch.socket = FakeSock(OSError(errno.EBADF, "gone"))
    elif kind == "no-socket":
        del ch.socket
    elif kind == "own-writable":
        ch.writable = lambda: False         # an instance's own predicate
    elif kind == "accepting":
        ch.accepting = True

    return ch


WAKEFD = 250

# Each step: (operation, *arguments).  "WAKE" stands for the state's wake-up
# fd.  A step's exception is recorded and the script goes on.
SCRIPTS = {
    "adopt managed, stateless, then drop": [
        ("adopt", 300, "stock"), ("adopt", 301, "accepting"), ("adopt", 302, "dws"),
        ("drop", 300), ("drop", 301), ("drop", 999)],
    "adopt with a select.poll, change, drop": [
        ("spoll",), ("adopt", 300, "stock"), ("set_mask", 300, 1), ("set_mask", 300, 1),
        ("set_mask", 300, 5), ("drop", 300), ("adopt", 13, "stock"), ("drop", 13)],
    "adopt with a persistent poller": [
        ("poller",), ("adopt", 300, "stock"), ("adopt", 301, "docs"), ("set_mask", 301, 4),
        ("set_mask", 301, 1), ("set_mask", 301, 0), ("drop", 300), ("drop", 301)],
    "consulted channels": [
        ("csnap",), ("adopt", 300, "docs"), ("csnap",), ("adopt", 301, "both"),
        ("csnap",), ("adopt", 302, "own-writable"), ("csnap",), ("drop", 301),
        ("csnap",), ("drop", 999), ("adopt", 300, "stock"), ("adopt", 302, "docs")],
    "closed behind the dispatcher": [
        ("adopt", 300, "closed"), ("adopt", 300, "closed"), ("adopt", 301, "fileno-raises"),
        ("adopt", 302, "no-socket"), ("drop", 300), ("adopt", 300, "closed")],
    "a dead channel adopted again": [
        ("adopt", 300, "stock"), ("dead", 300), ("adopt", 300, "SAME"), ("drop", 300)],
    "the wake-up fd as a key": [
        ("adopt", "WAKE", "stock"), ("adopt", "WAKE", "docs"), ("drop", "WAKE")],
    "bad keys": [
        ("adopt", -5, "stock"), ("adopt", 2 ** 40, "stock"), ("adopt", "x", "stock"),
        ("adopt", 7.0, "stock"), ("set_mask", 400, "notanint"), ("set_mask", 401, 2 ** 70),
        ("spoll",), ("adopt", True, "stock")],
    "suspended, reclassified, batched": [
        ("adopt", 300, "stock"), ("adopt", 301, "stock"), ("suspend", 302),
        ("adopt", 302, "stock"), ("reclass", 300), ("batch", 301, 4),
        ("set_mask", 301, 5), ("drop", 300), ("drop", 301), ("drop", 302)],
    "unregister errors": [
        ("spoll",), ("adopt", 14, "stock"), ("drop", 14), ("adopt", 13, "stock"),
        ("set_mask", 13, 0)],
    "note_added, note_removed": [
        ("map", 300, "stock"), ("note_added", 300), ("map", 301, "docs"),
        ("note_added", 301), ("reconcile",), ("unmap", 300), ("note_removed", 300),
        ("note_added", 999), ("unmap", 301), ("note_removed", 301), ("gone",)],
    "reconcile: managed answers, stateless then with a select.poll": [
        ("map", 300, "stock"), ("map", 301, "dws"), ("map", 302, "docs"),
        ("pending", 300), ("pending", 301), ("pending", 302), ("reconcile",),
        ("set", 300, "accepting", True), ("pending", 300), ("reconcile",),
        ("spoll",), ("set", 300, "accepting", False), ("pending", 300), ("reconcile",),
        ("pending", 300), ("reconcile",), ("cprev",), ("pending", 302), ("reconcile",),
        ("pending", 999), ("reconcile",)],
    "reconcile: replaced, dead, reclassified, suspended": [
        ("map", 300, "stock"), ("map", 301, "stock"), ("pending", 300), ("pending", 301),
        ("reconcile",), ("map", 300, "dws"), ("pending", 300), ("reconcile",),
        ("dead", 300), ("pending", 300), ("reconcile",), ("reclass", 301),
        ("pending", 301), ("reconcile",), ("suspend", 301), ("pending", 301),
        ("reconcile",), ("suspend", 302), ("reclass", 302), ("map", 302, "stock"),
        ("pending", 302), ("reconcile",), ("unmap", 300), ("pending", 300), ("reconcile",)],
    "reconcile: new fds in map order, a frozen pass, faults": [
        ("spoll",), ("map", 305, "stock"), ("map", 303, "docs"), ("map", 304, "dws"),
        ("map", 306, "closed"), ("map", "WAKE", "stock"), ("disp",),
        ("pending", 303), ("pending", 304), ("pending", 305), ("pending", 306),
        ("pending", "WAKE"), ("reconcile",), ("pending", 306), ("reconcile",)],
    "reconcile: the full walk, an unreported change": [
        ("map", 300, "stock"), ("map", 301, "docs"), ("full",), ("reconcile",),
        ("map", 302, "dws"), ("pending", 300), ("reconcile",), ("unmap", 301),
        ("reconcile",), ("poller",), ("map", 303, "stock"), ("pending", 303),
        ("reconcile",)],
    "reconcile: one channel added to a running map": (
        [("map", fd, "docs" if fd % 2 else "stock") for fd in range(300, 310)]
        + [("pending", fd) for fd in range(300, 310)] + [("reconcile",), ("csnap",),
           ("map", 310, "docs"), ("pending", 310), ("reconcile",)]),
    "reconcile: errors": [
        ("map", 300, "stock"), ("map", -7, "stock"), ("pending", -7), ("pending", 300),
        ("reconcile",), ("map", 301, "badmask"), ("pending", 301), ("reconcile",),
        ("set", 301, "broken", True), ("pending", 301), ("pending", 300), ("reconcile",),
        ("set", 301, "broken", False), ("reconcile",)],
}


class RecordingMap(dict):
    """A map whose get() is its own (recorded): reconcile() must call it."""

    def __init__(self):
        super().__init__()
        self.gets = []

    def get(self, key, default=None):
        self.gets.append(key)
        return super().get(key, default)


def _run(script, impl, map_type=dict):
    """-> what the script left: a tuple to compare between implementations."""
    py = impl == "py"
    m = map_type()
    st = _loop._states[id(m)] = _loop.MapState(m)
    # The wake-up fd's number, as _adopt() compares keys with it: fixed, so
    # that no key of the scripts is the real one's (which depends on what
    # else the process has open; under valgrind, 13).
    st.wakefd = WAKEFD
    st.full = False         # (what the first iteration's full walk leaves)
    calls = []
    chans = {}
    log = []
    names = {}

    def name(obj):
        return names.get(id(obj), repr(obj))

    def key(k):
        return st.wakefd if k == "WAKE" else k

    cls = _loop._PyBookkeeping if py else _loop._StateBase
    added = _loop._py_note_added if py else _loop.note_added
    removed = _loop._py_note_removed if py else _loop.note_removed
    try:
        for step in script:
            op, args = step[0], step[1:]
            try:
                if op == "adopt":
                    fd, kind = key(args[0]), args[1]
                    ch = chans[fd] if kind == "SAME" else _channel(kind, fd)
                    chans[fd] = ch
                    names[id(ch)] = "%s@%r" % (kind, args[0])
                    cls._adopt(st, fd, ch)
                elif op == "drop":
                    cls._drop(st, key(args[0]))
                elif op == "set_mask":
                    cls._set_mask(st, args[0], args[1])
                elif op == "spoll":
                    st.poller, st.spoll = None, Recorder("spoll", calls)
                elif op == "poller":
                    st.poller, st.spoll = Recorder("poller", calls), None
                elif op == "csnap":
                    st.csnap = st.cvec = ("stale",)
                elif op == "dead":
                    st.dead[args[0]] = chans[args[0]]
                elif op == "suspend":
                    st.suspended[args[0]] = 1e9
                elif op == "reclass":
                    st.reclass.add(args[0])
                elif op == "batch":
                    st.batch[args[0]] = args[1]
                elif op == "map":
                    fd = key(args[0])
                    ch = chans[fd] = _channel(args[1], fd)
                    names[id(ch)] = "%s@%r" % (args[1], args[0])
                    # (a fault's routing, recorded: 3.11's handle_close()
                    # would close the stand-in socket and log)
                    ch.handle_close = lambda n=names[id(ch)]: log.append(("handle_close", n))
                    m[fd] = ch
                elif op == "pending":
                    st.pending.add(key(args[0]))
                elif op == "set":
                    setattr(chans[args[0]], args[1], args[2])
                elif op == "cprev":
                    st.cprev = (False, [1])
                elif op == "disp":
                    st.disp = [st.owner, st.mask.get, [(fd, 1) for fd in st.owner]]
                elif op == "full":
                    st.full = True
                elif op == "unmap":
                    del m[args[0]]
                elif op == "note_added":
                    added(m, args[0])
                elif op == "note_removed":
                    removed(m, args[0])
                elif op == "reconcile":
                    cls.reconcile(st)
                elif op == "gone":
                    log.append(("state kept", _loop._states.get(id(m)) is st))
                else:
                    raise AssertionError(op)
                log.append((step, "ok"))
            except Exception as e:
                log.append((step, type(e).__name__, str(e)))
        return (
            log, calls,
            {k: name(v) for k, v in st.owner.items()},
            dict(st.mask), dict(st.batch),
            {k: (name(v[1]), v[0] is k, v[2], v[3]) for k, v in st.consulted.items()},
            {k: name(v) for k, v in st.dead.items()},
            [(fd, name(o), e) for fd, o, e in st.faults],
            sorted(st.suspended), sorted(st.reclass, key=repr), sorted(st.pending, key=repr),
            st.nchg, st.csnap, st.cvec,
            {name(c): c.__dict__.get("_fa_regmask") for c in chans.values()},
            (st.cprev, st.full, st.disp is None, sorted(m, key=repr),
             len(getattr(m, "gets", ()))),
        )
    finally:
        if _loop._states.get(id(m)) is st:
            del _loop._states[id(m)]
        st.close()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_c_bookkeeping_does_what_the_python_reference_does(script):
    base = _c_state_base()
    assert _loop.MapState.__mro__[1:3] == (base, _loop._PyBookkeeping)
    assert _loop.MapState._drop is base._drop
    assert _loop.note_added is not _loop._py_note_added
    ref = _run(SCRIPTS[script], "py")
    got = _run(SCRIPTS[script], "c")
    for part, (a, b) in enumerate(zip(ref, got)):
        assert b == a, "part %d differs" % part


def test_the_scripts_reach_what_they_are_about():
    # What the reference leaves, for the scripts the names promise (so that
    # equal results mean the same work was done, not the same nothing).
    _c_state_base()
    ref = {k: _run(v, "py") for k, v in SCRIPTS.items()}
    (log, calls, owner, mask, batch, consulted, dead, faults, susp, reclass, pending,
     nchg, csnap, cvec, regmask, extra) = ref["closed behind the dispatcher"]
    assert faults == [(300, "closed@300", errno.EBADF)] * 2 and dead == {300: "closed@300"}
    assert mask == {301: 7, 302: 7}          # a fileno() that raises is no fault
    assert regmask["closed@300"] == -1       # never registered
    assert [f[2] for f in ref["the wake-up fd as a key"][7]] == [errno.EINVAL]
    log, calls, owner, mask, batch, consulted, *_, csnap, cvec, regmask, extra = ref["consulted channels"]
    assert consulted == {302: ("docs@302", True, False, True)}
    assert owner == {300: "stock@300", 302: "docs@302"} and mask == {300: 7}
    assert csnap is None and cvec == ("stale",)      # _drop() resets both, _adopt() csnap
    calls = ref["adopt with a select.poll, change, drop"][1]
    assert calls == [("spoll", "register", 300, 7), ("spoll", "register", 300, 1),
                     ("spoll", "register", 300, 5), ("spoll", "unregister", 300),
                     ("spoll", "register", 13, 7), ("spoll", "unregister", 13)]
    assert ref["adopt with a persistent poller"][1][-1] == ("poller", "modify", 300, 0)
    log, calls, owner, mask = ref["bad keys"][:4]
    assert [e[1] for e in log[:4]] == ["ValueError", "OverflowError", "TypeError", "TypeError"]
    assert mask == {400: "notanint", 401: 2 ** 70, True: 7}
    assert ref["unregister errors"][0][2][1] == "OSError"
    assert ref["suspended, reclassified, batched"][14]["stock@302"] == 0   # suspended: no interest
    res = ref["note_added, note_removed"]
    assert res[0][-2] == ("state kept", False)          # forget_map() on the empty map
    assert res[10] == [999]                             # pending: the fd no one holds


def test_the_reconcile_scripts_reach_what_they_are_about():
    _c_state_base()
    ref = {k: _run(v, "py") for k, v in SCRIPTS.items() if k.startswith("reconcile")}
    log, calls, owner, mask, batch, consulted, *_, extra = \
        ref["reconcile: managed answers, stateless then with a select.poll"]
    assert batch == {300: 3}                            # a change while stateless
    assert calls == [("spoll", "register", 300, 7)]     # ... and with a select.poll
    assert extra[0] is None and list(consulted) == [302]    # cprev reset for a consulted fd
    log, calls, owner, mask, batch, consulted, dead, faults, susp, *_, regmask, extra = \
        ref["reconcile: replaced, dead, reclassified, suspended"]
    assert regmask["dws@300"] == 3 and regmask["stock@301"] == 0 and susp == [301]
    log, calls, owner, *_, extra = ref["reconcile: new fds in map order, a frozen pass, faults"]
    assert calls == [("spoll", "register", 305, 7), ("spoll", "register", 304, 3)]
    assert ("handle_close", "closed@306") in log and extra[2]      # routed; pass frozen
    owner = ref["reconcile: the full walk, an unreported change"][2]
    assert sorted(owner) == [300, 302, 303]
    log = ref["reconcile: errors"][0]
    assert [e[1] for e in log if len(e) == 3] == ["ValueError", "ZeroDivisionError"]


def test_c_reconcile_of_a_dict_subclass_map_calls_its_get():
    # StateBase.reconcile runs the Python reference for a map that is not
    # exactly a dict (its get() and its order are its own)
    _c_state_base()
    script = SCRIPTS["reconcile: managed answers, stateless then with a select.poll"]
    ref = _run(script, "py", RecordingMap)
    got = _run(script, "c", RecordingMap)
    assert got == ref                               # map.get() calls included
    assert ref[-1][-1] > 0                          # ... which there were
    plain = _run(script, "py")
    assert ref[:-1] == plain[:-1] and ref[-1][:-1] == plain[-1][:-1]   # same work


def test_the_recording_map_records():
    m = RecordingMap()
    m[1] = 2
    assert m.get(1) == 2 and m.gets == [1]
