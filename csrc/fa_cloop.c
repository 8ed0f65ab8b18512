/*
 * fa_cloop.c: fastasyncore's loop in C (the module fastasyncore._cloop).
 *
 * Why this exists beside the cffi core: cffi has no cheap way from C into
 * Python, and a loop iteration is mostly calls into Python handlers plus the
 * bookkeeping around them (owner/map checks, exception routing, the managed
 * re-check).  In Python that bookkeeping costs more than the handlers'
 * calls themselves (../shared/spec/c-loop-notes.md: 135 vs 57 ns per event
 * on 3.11).  So this small CPython-API module runs the iterations of
 * asyncore.loop()/poll()/poll2() for the cffi backend:
 *
 *   - the iteration's preparation (reconcile, consult, flush, adapt): the
 *     consult and the reconcile here (the reconcile is StateBase's, see
 *     bk_reconcile(); its rare paths -- a full walk, routing faults -- call
 *     back into Python), the rest in Python (_loop._prepare's steps; the
 *     flush here too, except in a full preparation, see prep_kind()), each
 *     only when it has work to do; a map whose channels are all managed
 *     and unchanged goes straight to the wait;
 *   - the wait calls the cffi core's fa_poller_wait() through a function
 *     pointer (one copy of the poller code, one ABI truth: fastasyncore.h),
 *     on the very poller object _cffi.Poller owns, under the same lock
 *     protocol, with the GIL released around the kernel call only;
 *   - the dispatch is _loop._dispatch() in C: the same 3.11 exception
 *     routing, the same owner/map checks, the same re-check of managed
 *     channels' interest.  _loop.py stays the reference; tests run both.
 *
 * Limited API (Py_LIMITED_API=0x03090000, one abi3 build for 3.9+).  Rules
 * that keep it memory-safe while handlers mutate everything:
 *   - every object taken from a dict is INCREF'd before any call into
 *     Python (a handler may close itself, others, or clear the map);
 *   - the event array is owned by this call (a handler may call loop() on
 *     the same map: the nested wait gets its own buffer);
 *   - nothing iterates a dict while calling into Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <string.h>
#include <time.h>
#include <stddef.h>
#include <stdint.h>          /* uintptr_t */
#include "structmember.h"       /* PyMemberDef, T_OBJECT_EX (3.9-3.11) */

#include "fastasyncore.h"
#include "fa_chanio.h"
#include "fa_pyutil.h"

typedef int (*fa_wait_fn)(fa_poller *, const int *, size_t, int, int *,
                          size_t, size_t *);
typedef int (*fa_poll_fn)(const int *, size_t, int, int *, size_t);

#define CLOSE_BITS (FA_POLLHUP | FA_POLLERR | FA_POLLNVAL)
#define LOCAL_PAIRS 64          /* events kept on the stack; more: PyMem */
#define DONE (-2)               /* _loop._DONE */

/* Interned attribute/method names, created once at import. */
static struct {
    PyObject *handle_read_event, *handle_write_event, *handle_expt_event,
        *handle_close, *handle_error, *fa_mask, *fa_regmask, *errno_, *lock,
        *closed, *p_pending, *reg, *addr, *freed, *free_after_close,
        *acquire, *release, *force_mode, *wait, *snapshot, *reconcile,
        *set_mask, *accepting, *readable, *writable, *fa_out, *connected,
        *nbytes, *producer_fifo, *woken, *calls, *ready, *due, *register_,
        *unregister, *modify, *freeze, *socket, *fileno, *reconcile_all,
        *direct_lost, *route_faults;
} S;

/* Set by configure() from _loop.py (strong references, kept for good). */
static PyObject *g_ExitNow, *g_disconnected, *g_states, *g_prep_head,
    *g_prep_tail,
    *g_poll_once, *g_timeout_ms, *g_forget_map, *g_loopdict,
    *g_sleep, *g_state, *g_cmasks, *g_route_fault, *g_svc_run, *g_ask;
static fa_wait_fn g_wait;      /* the core's fa_poller_wait */
static fa_poll_fn g_poll;      /* the core's fa_poll_once */
/* _loop.forget_all() / fork: bumped by states_changed(), so a run() holding
 * a MapState knows to look it up again (instead of a dict lookup per
 * iteration: id(map) is a big int, ~140 instructions). */
static unsigned long g_states_gen;

/* ------------------------------------------------------------------------ */
/* small helpers */

/* The small ints CPython shares (0..256 here) read by their address.  A
 * PyLong_AsLong() costs ~27 instructions, and the loop reads interest masks
 * (0..7) and low fds several times per event (pp_docs, W1: ~10 reads per
 * message).  At import the 257 objects are taken once (PyLong_FromLong()
 * returns the shared ones); where they lie at one stride from each other,
 * as they do on 3.10-3.13 (checked here, not assumed), an int's value is
 * its distance from the first divided by the stride.  The address test
 * (g_small[i] == o) sends any other layout (3.9 allocates them one by one:
 * the fast path stays off), another interpreter's objects and every other
 * int to PyLong_AsLong(). */
#define FA_SMALL_N 257
static PyObject *g_small[FA_SMALL_N];
static uintptr_t g_small_span;          /* 0: the fast path is off */
static uintptr_t g_small_stride;

static int
small_ints_init(void)
{
    size_t i;
    for (i = 0; i < FA_SMALL_N; i++)
        if (!(g_small[i] = PyLong_FromLong((long)i)))
            return -1;
    if ((uintptr_t)g_small[1] <= (uintptr_t)g_small[0])
        return 0;
    g_small_stride = (uintptr_t)g_small[1] - (uintptr_t)g_small[0];
    for (i = 0; i < FA_SMALL_N; i++)
        if ((uintptr_t)g_small[i] != (uintptr_t)g_small[0] + i * g_small_stride)
            return 0;
    g_small_span = FA_SMALL_N * g_small_stride;
    return 0;
}

/* PyLong_AsLong(o), with the same result and errors. */
static inline long
fa_long(PyObject *o)
{
    uintptr_t d = (uintptr_t)o - (uintptr_t)g_small[0];   /* (wraps when below) */
    if (d < g_small_span) {
        uintptr_t i = d / g_small_stride;
        if (g_small[i] == o)
            return (long)i;
    }
    return PyLong_AsLong(o);
}

static PyObject *
call0(PyObject *obj, PyObject *name)
{
    return PyObject_CallMethodObjArgs(obj, name, NULL);
}

/* ------------------------------------------------------------------------ */
/* _cloop.StateBase: the fields of _loop.MapState that this loop reads and
 * writes, as a C struct.  MapState subclasses it wherever this module is
 * built (and keeps its other fields in __slots__).
 *
 * Why: PyObject_GetAttr() of a __slots__ field costs ~150 instructions
 * (the generic getattr, the type's MRO lookup, the member descriptor), and
 * the loop made ~8 such reads and writes per iteration of a map with
 * consulted channels (csnap, cvec, cprev, poller, nchg, spoll: ~13% of a
 * 1-socketpair docs-pattern ping-pong, by callgrind) and ~15 per loop()
 * call (a user's `while ...: loop(count=1)` pays them per iteration).
 * Here each is a pointer read.  To Python these fields are what __slots__
 * fields are -- member descriptors (T_OBJECT_EX: AttributeError until
 * set), read and written at the same speed -- so _loop.py, the Python
 * loop included, uses them unchanged.  The C loop runs only where
 * MapState is a subclass (_loop._resolve_crun), and checks that every
 * state it takes is one. */
enum {
    F_MAP, F_THREAD, F_POLLER, F_OWNER, F_MASK, F_CONSULTED, F_PENDING,
    F_BATCH, F_SUSPENDED, F_FULL, F_ITERS, F_NCHG, F_NEV, F_ADAPT_AT,
    F_CSNAP, F_CVEC, F_CPREV, F_SPOLL, F_SVC, F_WAKEFD,
    F_DEAD, F_RECLASS, F_DISP, F_FAULTS, NFIELDS
};
static const char *const g_fnames[NFIELDS] = {
    "map", "thread", "poller", "owner", "mask", "consulted", "pending",
    "batch", "suspended", "full", "iters", "nchg", "nev", "adapt_at",
    "csnap", "cvec", "cprev", "spoll", "svc", "wakefd",
    "dead", "reclass", "disp", "faults"
};

typedef struct {
    PyObject_HEAD
    PyObject *f[NFIELDS];
} stbase;

static PyObject *g_StateBase;   /* the type (a strong reference) */
static PyObject *g_rec_descr;   /* StateBase.reconcile, the method descriptor */
#define STF(st, k) (((stbase *)(st))->f[k])

/* The AttributeError of a field never set (as getattr raises it). */
static void
st_unset(int k)
{
    PyErr_Format(PyExc_AttributeError, "'%s' of the map state is not set",
                 g_fnames[k]);
}

/* st.<field k>, a new reference; NULL with AttributeError where unset. */
static PyObject *
st_get(PyObject *st, int k)
{
    PyObject *v = STF(st, k);
    if (v == NULL) {
        st_unset(k);
        return NULL;
    }
    Py_INCREF(v);
    return v;
}

/* st.<field k>, borrowed: only to compare with None or by identity before
 * any call into Python.  NULL with AttributeError where unset. */
static PyObject *
st_peek(PyObject *st, int k)
{
    PyObject *v = STF(st, k);
    if (v == NULL)
        st_unset(k);
    return v;
}

/* st.<field k> = v (v: a borrowed reference, or NULL for the caller's
 * failed call).  0 or -1.  The old value goes last: its deallocation may
 * run Python code, which then sees the new value. */
static int
st_set(PyObject *st, int k, PyObject *v)
{
    PyObject *old = STF(st, k);
    if (v == NULL)
        return -1;
    Py_INCREF(v);
    STF(st, k) = v;
    Py_XDECREF(old);
    return 0;
}

/* int(st.<field k>) into *out.  0 or -1. */
static int
st_long(PyObject *st, int k, long *out)
{
    PyObject *v = STF(st, k);
    if (v == NULL) {
        st_unset(k);
        return -1;
    }
    *out = PyLong_AsLong(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* st.<field k> = a new int n.  0 or -1. */
static int
st_set_long(PyObject *st, int k, long n)
{
    PyObject *v = PyLong_FromLong(n);
    int rc = st_set(st, k, v);
    Py_XDECREF(v);
    return rc;
}

static int
stbase_traverse(PyObject *self, visitproc visit, void *arg)
{
    int k;
    for (k = 0; k < NFIELDS; k++)
        Py_VISIT(STF(self, k));
    Py_VISIT((PyObject *)Py_TYPE(self));    /* a heap type's instances do */
    return 0;
}

static int
stbase_clear(PyObject *self)
{
    int k;
    for (k = 0; k < NFIELDS; k++)
        Py_CLEAR(STF(self, k));
    return 0;
}

static void
stbase_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    PyObject_GC_UnTrack(self);
    stbase_clear(self);
    tp_free(self);
    Py_DECREF(tp);
}

static PyMemberDef stbase_members[NFIELDS + 1];

/* MapState's bookkeeping of one fd, in C (defined below, after c_mask). */
static PyObject *stbase_set_mask(PyObject *st, PyObject *args);
static PyObject *stbase_drop(PyObject *st, PyObject *fd);
static PyObject *stbase_adopt(PyObject *st, PyObject *args);
static PyObject *stbase_reconcile(PyObject *st, PyObject *unused);

static PyMethodDef stbase_methods[] = {
    {"_set_mask", stbase_set_mask, METH_VARARGS,
     "_set_mask(fd, m): _loop._PyBookkeeping._set_mask, in C"},
    {"_drop", stbase_drop, METH_O,
     "_drop(fd): _loop._PyBookkeeping._drop, in C"},
    {"_adopt", stbase_adopt, METH_VARARGS,
     "_adopt(fd, obj): _loop._PyBookkeeping._adopt, in C"},
    {"reconcile", stbase_reconcile, METH_NOARGS,
     "reconcile(): _loop._PyBookkeeping.reconcile, in C"},
    {NULL, NULL, 0, NULL}
};

static PyType_Slot stbase_slots[] = {
    {Py_tp_doc, "The fields of _loop.MapState the C loop reads (csrc/fa_cloop.c)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, stbase_dealloc},
    {Py_tp_traverse, stbase_traverse},
    {Py_tp_clear, stbase_clear},
    {Py_tp_members, stbase_members},
    {Py_tp_methods, stbase_methods},
    {0, NULL}
};

static PyType_Spec stbase_spec = {
    "fastasyncore._cloop.StateBase", sizeof(stbase), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    stbase_slots
};

static PyObject *
stbase_type_new(void)
{
    int k;
    for (k = 0; k < NFIELDS; k++) {
        stbase_members[k].name = g_fnames[k];
        stbase_members[k].type = T_OBJECT_EX;
        stbase_members[k].offset = (Py_ssize_t)(offsetof(stbase, f) + k * sizeof(PyObject *));
        stbase_members[k].flags = 0;
        stbase_members[k].doc = NULL;
    }
    return PyType_FromSpec(&stbase_spec);
}

/* st.nchg += n (the interest changes adapt() weighs).  0 or -1. */
static int
add_nchg(PyObject *st, Py_ssize_t n)
{
    long nchg;
    if (st_long(st, F_NCHG, &nchg) < 0)
        return -1;
    return st_set_long(st, F_NCHG, nchg + (long)n);
}

/* The consult changed masks without a poller (nstateless): st.spoll, the
 * Python loop's select.poll that mirrors the mask, did not get them.  Drop
 * it (the Python wait builds it again from the mask), so that the Python
 * loop can trust spoll whenever it is there and never checks it against
 * the mask (an O(n) compare per loop() call, which a `loop(count=1)` in a
 * user's own loop -- a common pattern -- pays per iteration). */
static int
spoll_stale(PyObject *st)
{
    PyObject *t, *v, *tb, *sp;
    int rc = -1, had = PyErr_Occurred() != NULL;
    if (had)
        PyErr_Fetch(&t, &v, &tb);           /* the caller's error comes first */
    if (!(sp = st_peek(st, F_SPOLL)))
        goto out;
    if (sp == Py_None || st_set(st, F_SPOLL, Py_None) == 0)
        rc = 0;
out:
    if (had) {
        PyErr_Clear();
        PyErr_Restore(t, v, tb);
    }
    return rc;
}

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Event pairs of one wait, owned by one iteration. */
typedef struct {
    int *pairs;
    Py_ssize_t n;
    Py_ssize_t cap;
    int local[2 * LOCAL_PAIRS];
} evbuf;

static int
evbuf_reserve(evbuf *b, Py_ssize_t cap)
{
    if (cap <= LOCAL_PAIRS) {
        b->pairs = b->local;
        b->cap = LOCAL_PAIRS;
        return 0;
    }
    if ((size_t)cap > (size_t)PY_SSIZE_T_MAX / (2 * sizeof(int))) {
        PyErr_NoMemory();
        return -1;
    }
    b->pairs = PyMem_Malloc((size_t)cap * 2 * sizeof(int));
    if (b->pairs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->cap = cap;
    return 0;
}

static void
evbuf_release(evbuf *b)
{
    if (b->pairs != NULL && b->pairs != b->local)
        PyMem_Free(b->pairs);
    b->pairs = NULL;
}

/* A list of (fd, events) tuples (Poller.wait(), poll_list()) into b. */
static int
evbuf_from_list(evbuf *b, PyObject *lst)
{
    Py_ssize_t i, n;
    if (!PyList_Check(lst)) {
        PyErr_SetString(PyExc_TypeError, "a wait must return a list of (fd, events)");
        return -1;
    }
    n = PyList_Size(lst);
    if (n < 0 || evbuf_reserve(b, n) < 0)
        return -1;
    for (i = 0; i < n; i++) {
        PyObject *t, *fd, *ev;
        long f, e;
        t = PyList_GetItem(lst, i);     /* borrowed; no call into Python below */
        if (t == NULL)
            return -1;
        Py_INCREF(t);
        fd = PyTuple_GetItem(t, 0);
        ev = fd ? PyTuple_GetItem(t, 1) : NULL;
        if (ev == NULL) {
            Py_DECREF(t);
            return -1;
        }
        f = PyLong_AsLong(fd);
        e = PyLong_AsLong(ev);
        Py_DECREF(t);
        if ((f == -1 || e == -1) && PyErr_Occurred())
            return -1;
        b->pairs[2 * i] = (int)f;
        b->pairs[2 * i + 1] = (int)e;
    }
    b->n = n;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* What one run() holds of a map's MapState and of its poller.  The
 * containers are never replaced on the Python side (only mutated), so they
 * are fetched once; the scalars are read where they can change. */

typedef struct {
    PyObject *st;                 /* the MapState we own (st.thread is ours) */
    PyObject *owner, *mask, *pending, *consulted, *batch, *suspended;
    long iters, adapt_at;         /* st.iters when read, st.adapt_at */
    long citers;                  /* iterations counted here, not yet in st */
    long cev;                     /* ... and events (st.nev, for adapt()) */
    PyObject *poller;             /* the poller the fields below belong to */
    PyObject *acquire, *release, *p_pending, *reg;
    fa_poller *p;
    int ran_python;               /* the last iteration called a handler */
    unsigned long gen;            /* g_states_gen when st was taken */
    int check_full;               /* st.full may be set: read it */
    /* Loop services (_services.py): st.svc (NULL for None: then nothing
     * runs around the wait), read when st is taken and whenever the states'
     * generation moves (attach_services() moves it); st.wakefd, the wake-up
     * fd every wait watches and no channel owns; woke: the wait reported it. */
    PyObject *svc;
    PyObject *svc_calls, *svc_ready, *svc_due;  /* its containers (kept) */
    int wakefd;
    int woke;
    int busy;                     /* the last stateless wait found events */
    int skip, backoff;            /* timeout-0 tries skipped after a miss */
    int own_rec;                  /* st's reconcile() is StateBase's: 1 yes,
                                   * 2 no, 0 not looked up yet */
} loopst;

static void
svc_forget(loopst *c)
{
    Py_CLEAR(c->svc);
    Py_CLEAR(c->svc_calls);
    Py_CLEAR(c->svc_ready);
    Py_CLEAR(c->svc_due);
}

/* c->svc = st.svc (NULL for None), and its calls/ready/due.  0 or -1. */
static int
read_svc(loopst *c)
{
    PyObject *v = st_get(c->st, F_SVC);
    if (v == NULL)
        return -1;
    svc_forget(c);
    if (v == Py_None) {
        Py_DECREF(v);
        return 0;
    }
    c->svc = v;
    if (!(c->svc_calls = PyObject_GetAttr(v, S.calls)) ||
        !(c->svc_ready = PyObject_GetAttr(v, S.ready)) ||
        !(c->svc_due = PyObject_GetAttr(v, S.due)))
        goto fail;
    if (!PyDict_Check(c->svc_ready) || !PyList_Check(c->svc_due) ||
        PyList_Size(c->svc_due) != 1) {
        PyErr_SetString(PyExc_TypeError, "unexpected Services layout");
        goto fail;
    }
    return 0;
fail:
    svc_forget(c);
    return -1;
}

/* time.monotonic(): CLOCK_MONOTONIC is what CPython reads on Linux; other
 * systems ask it (macOS's differs). */
static PyObject *g_monotonic;
static double
py_monotonic(void)
{
#ifdef __linux__
    return monotonic();
#else
    PyObject *r = PyObject_CallObject(g_monotonic, NULL);
    double t;
    if (r == NULL)
        return -1.0;
    t = PyFloat_AsDouble(r);
    Py_DECREF(r);
    return t;
#endif
}

/* Is anything of the services waiting: calls, ready channels (-> 1), a
 * timer (-> 2 with *due set), nothing (-> 0)?  -1 on error. */
static int
svc_pending(loopst *c, double *due)
{
    Py_ssize_t n = PyObject_Size(c->svc_calls);
    PyObject *d;
    if (n < 0)
        return -1;
    if (n > 0 || PyDict_Size(c->svc_ready) > 0)
        return 1;
    if (!(d = PyList_GetItem(c->svc_due, 0)))
        return -1;
    *due = PyFloat_AsDouble(d);
    if (*due == -1.0 && PyErr_Occurred())
        return -1;
    return isinf(*due) ? 0 : 2;
}

static void
poller_forget(loopst *c)
{
    Py_CLEAR(c->poller);
    Py_CLEAR(c->acquire);
    Py_CLEAR(c->release);
    Py_CLEAR(c->p_pending);
    Py_CLEAR(c->reg);
    c->p = NULL;
}

static int
poller_take(loopst *c, PyObject *poller)
{
    PyObject *lock, *a;
    poller_forget(c);
    Py_INCREF(poller);
    c->poller = poller;
    if (!(lock = PyObject_GetAttr(poller, S.lock)))
        return -1;
    c->acquire = PyObject_GetAttr(lock, S.acquire);
    c->release = PyObject_GetAttr(lock, S.release);
    Py_DECREF(lock);
    if (!c->acquire || !c->release ||
        !(c->p_pending = PyObject_GetAttr(poller, S.p_pending)) ||
        !(c->reg = PyObject_GetAttr(poller, S.reg)) ||
        !(a = PyObject_GetAttr(poller, S.addr)))
        goto fail;
    if (!PyDict_Check(c->p_pending) || !PyDict_Check(c->reg)) {
        PyErr_SetString(PyExc_TypeError, "Poller._pending/_reg must be dicts");
        Py_DECREF(a);
        goto fail;
    }
    c->p = (fa_poller *)PyLong_AsVoidPtr(a);
    Py_DECREF(a);
    if (c->p == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "poller has no C state");
        goto fail;
    }
    return 0;
fail:
    poller_forget(c);
    return -1;
}

static int
read_iters(loopst *c)
{
    return (st_long(c->st, F_ITERS, &c->iters) < 0 ||
            st_long(c->st, F_ADAPT_AT, &c->adapt_at) < 0) ? -1 : 0;
}

/* Hand the iterations counted here to st.iters (before _prepare/adapt looks
 * at them, and when the run ends). */
static int
flush_iters(loopst *c)
{
    long now;
    int r;
    if (c->cev) {
        if (st_long(c->st, F_NEV, &now) < 0)
            return -1;
        r = st_set_long(c->st, F_NEV, now + c->cev);
        c->cev = 0;
        if (r < 0)
            return -1;
    }
    if (!c->citers)
        return 0;
    if (st_long(c->st, F_ITERS, &now) < 0)
        return -1;
    r = st_set_long(c->st, F_ITERS, now + c->citers);
    c->citers = 0;
    return r;
}

static int
loopst_take(loopst *c, PyObject *st, PyObject *me)
{
    memset(c, 0, sizeof(*c));
    if (!PyObject_TypeCheck(st, (PyTypeObject *)g_StateBase)) {
        PyErr_SetString(PyExc_TypeError, "the map state is not a _cloop.StateBase");
        return -1;
    }
    if (st_set(st, F_THREAD, me) < 0)
        return -1;
    Py_INCREF(st);
    c->st = st;
#define GET(field, k) \
    if (!(c->field = st_get(st, k))) goto fail
    GET(owner, F_OWNER);
    GET(mask, F_MASK);
    GET(pending, F_PENDING);
    GET(consulted, F_CONSULTED);
    GET(batch, F_BATCH);
    GET(suspended, F_SUSPENDED);
#undef GET
    if (!PyDict_Check(c->owner) || !PyDict_Check(c->mask) ||
        !PyAnySet_Check(c->pending) || !PyDict_Check(c->consulted) ||
        !PyDict_Check(c->batch) || !PyDict_Check(c->suspended)) {
        PyErr_SetString(PyExc_TypeError, "unexpected MapState layout");
        goto fail;
    }
    if (read_iters(c) < 0 || read_svc(c) < 0)
        goto fail;
    {
        long w;
        if (st_long(st, F_WAKEFD, &w) < 0)
            goto fail;
        c->wakefd = (w >= 0 && w <= INT_MAX) ? (int)w : -1;
    }
    c->gen = g_states_gen;
    c->check_full = 1;
    return 0;
fail:
    return -1;           /* the caller runs loopst_release() */
}

/* Give the state back: st.thread = None, the counted iterations, and an
 * emptied map forgotten (what _loop.poll_once's `finally` does).  Keeps an
 * error that is already set (a failure here replaces it, as in Python). */
static int
loopst_release(loopst *c, PyObject *map)
{
    PyObject *t = NULL, *v = NULL, *tb = NULL;
    int had = PyErr_Occurred() != NULL, rc = 0;
    if (c->st == NULL)
        return 0;
    if (had)
        PyErr_Fetch(&t, &v, &tb);
    if (flush_iters(c) < 0 || st_set(c->st, F_THREAD, Py_None) < 0) {
        rc = -1;
    } else if (PyDict_Size(map) == 0) {
        PyObject *r = PyObject_CallFunctionObjArgs(g_forget_map, map, NULL);
        if (r == NULL)
            rc = -1;
        Py_XDECREF(r);
    }
    poller_forget(c);
    Py_CLEAR(c->owner);
    Py_CLEAR(c->mask);
    Py_CLEAR(c->pending);
    Py_CLEAR(c->consulted);
    Py_CLEAR(c->batch);
    Py_CLEAR(c->suspended);
    svc_forget(c);
    Py_CLEAR(c->st);
    if (had) {
        if (rc < 0) {
            Py_XDECREF(t);
            Py_XDECREF(v);
            Py_XDECREF(tb);
        } else {
            PyErr_Restore(t, v, tb);
        }
        return -1;
    }
    return rc;
}

/* ------------------------------------------------------------------------ */
/* exception routing: asyncore 3.11's read()/write()/_exception() (rw == 0)
 * and readwrite() (rw == 1).  Called with an exception set, raised by one of
 * obj's handlers.  0: routed to a handler that returned; -1: propagate (the
 * error is set). */

static int
is_disconnect(PyObject *exc)
{
    PyObject *e = PyObject_GetAttr(exc, S.errno_);
    int r;
    if (e == NULL)
        return -1;
    /* errno None (OSError("x")) is not in DISCONNECTED: handle_error */
    r = PySet_Contains(g_disconnected, e);
    Py_DECREF(e);
    return r;
}

static int
route(PyObject *obj, int rw)
{
    PyObject *t, *v, *tb, *ot, *ov, *otb, *name = S.handle_error, *r = NULL;
    int oserr = rw && PyErr_ExceptionMatches(PyExc_OSError);

    /* 3.11: `except OSError` comes first in readwrite(); ExitNow and
     * KeyboardInterrupt/SystemExit are never OSErrors, so the order only
     * matters for readability. */
    if (!oserr && (PyErr_ExceptionMatches(g_ExitNow) ||
                   PyErr_ExceptionMatches(PyExc_KeyboardInterrupt) ||
                   PyErr_ExceptionMatches(PyExc_SystemExit)))
        return -1;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb != NULL && v != NULL)
        PyException_SetTraceback(v, tb);
    Py_XINCREF(v);
    /* From here on we are "in the except block": handle_error() reads
     * sys.exc_info() (compact_traceback), and an exception raised here --
     * by the errno lookup, or by the handler -- gets this one as its
     * __context__, as in Python.  The outer one is put back afterwards. */
    PyErr_GetExcInfo(&ot, &ov, &otb);
    PyErr_SetExcInfo(t, v, tb);                 /* steals t, v, tb */
    if (oserr) {
        int d = is_disconnect(v);               /* e.errno in DISCONNECTED */
        if (d < 0)
            goto out;
        if (d)
            name = S.handle_close;
    }
    r = call0(obj, name);
out:
    Py_XDECREF(v);
    PyErr_SetExcInfo(ot, ov, otb);              /* steals */
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}


/* Which of the library's _fa_mask functions a class has (_loop.C_MASKS):
 * 1..3, -2 none, -1 error.  Cached per class, as _loop._kind_cache caches
 * the managed classification (a class whose _fa_mask is replaced after its
 * channels were first polled keeps its kind; _loop.register_managed()
 * clears the cache).  The cache holds its classes (no address reuse). */
#define TCACHE 8
static struct {
    PyObject *tp;
    long kind;
} tcache[TCACHE];
static int tcache_next;

static void
tcache_clear(void)
{
    int i;
    for (i = 0; i < TCACHE; i++) {
        Py_CLEAR(tcache[i].tp);
        tcache[i].kind = 0;
    }
    tcache_next = 0;
}

static long
type_kind(PyTypeObject *tp)
{
    PyObject *f, *k;
    long kind;
    int i;
    for (i = 0; i < TCACHE; i++)
        if (tcache[i].tp == (PyObject *)tp)
            return tcache[i].kind;
    f = PyObject_GetAttr((PyObject *)tp, S.fa_mask);
    if (f == NULL) {
        PyErr_Clear();             /* the call reports it, as in Python */
        return -2;
    }
    k = PyDict_GetItemWithError(g_cmasks, f);
    Py_DECREF(f);
    if (k == NULL && PyErr_Occurred())
        return -1;
    kind = k == NULL ? -2 : PyLong_AsLong(k);
    if (kind == -1 && PyErr_Occurred())
        return -1;
    i = tcache_next;
    tcache_next = (tcache_next + 1) % TCACHE;
    Py_XDECREF(tcache[i].tp);
    Py_INCREF(tp);
    tcache[i].tp = (PyObject *)tp;
    tcache[i].kind = kind;
    return kind;
}

/* obj._fa_mask() for the library's own three (_loop.C_MASKS): the same
 * attribute reads in the same order as the Python methods, without the
 * call (a Python frame costs more than the reads: ~1,000 instructions of a
 * spinning iteration's 5,000).  -> the mask, -1 with an error, or -2:
 * not one of ours (the caller calls _fa_mask()). */
static long
c_mask(PyObject *obj)
{
    PyObject *q;
    long kind;
    int t;

    kind = type_kind(Py_TYPE(obj));
    if (kind < 0)
        return kind;
    if ((t = attr_true(obj, S.accepting)) != 0)
        return t < 0 ? -1 : (FA_POLLIN | FA_POLLPRI);
    switch (kind) {
    case 1:            /* dispatcher: READ if accepting else READ | OUT */
        return FA_POLLIN | FA_POLLPRI | FA_POLLOUT;
    case 2:            /* dispatcher_with_send */
        if (!(q = PyObject_GetAttr(obj, S.fa_out))) {
            /* no queue yet (a subclass that skipped our __init__) */
            if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                return -1;
            PyErr_Clear();
            Py_INCREF(Py_None);
            q = Py_None;
        }
        if ((t = attr_true(obj, S.connected)) > 0 && q != Py_None) {
            int more = attr_true(q, S.nbytes);
            t = more < 0 ? -1 : !more;
        }
        Py_DECREF(q);
        if (t < 0)
            return -1;
        return t ? (FA_POLLIN | FA_POLLPRI) : (FA_POLLIN | FA_POLLPRI | FA_POLLOUT);
    case 3:            /* async_chat: OUT while producers wait or not connected */
        if ((t = attr_true(obj, S.producer_fifo)) == 0)
            t = attr_true(obj, S.connected) == 0 ? 1 : 0;   /* error -> below */
        if (t < 0 || PyErr_Occurred())
            return -1;
        return t ? (FA_POLLIN | FA_POLLPRI | FA_POLLOUT) : (FA_POLLIN | FA_POLLPRI);
    default:
        return -2;
    }
}

/* fd -> the key object dispatch looks the fd up with (owner, map,
 * consulted).  Those dicts hold the map's own key objects; an int above
 * 256 made here with PyLong_FromLong() is another object of equal value,
 * and every lookup with it compares values (an allocation and three value
 * comparisons per event: ~300 instructions, the W4 client's fds are all
 * above 256).  So the consult remembers the exact-int keys it meets by
 * value (g_keys[fd]: strong references to ints whose value is their index,
 * right for every map whatever it holds -- a key that is not the dict's own
 * object only makes the lookup slower), and dispatch uses them.  A cache:
 * a failed allocation leaves it as it is. */
#define KEYS_MAX 65536
static PyObject **g_keys;
static size_t g_nkeys;

static void
remember_key(PyObject *fdobj)
{
    long v;
    if (!PyLong_CheckExact(fdobj))
        return;                         /* (an int subclass may compare otherwise) */
    v = fa_long(fdobj);
    if (v <= 256 || v >= KEYS_MAX) {    /* (small ints are shared objects) */
        if (v == -1 && PyErr_Occurred())
            PyErr_Clear();
        return;
    }
    if ((size_t)v >= g_nkeys) {
        size_t n = (size_t)v * 2 < 1024 ? 1024 : (size_t)v * 2, i;
        PyObject **k;
        if (n > KEYS_MAX)
            n = KEYS_MAX;
        k = PyMem_Realloc(g_keys, n * sizeof(PyObject *));
        if (k == NULL)
            return;
        for (i = g_nkeys; i < n; i++)
            k[i] = NULL;
        g_keys = k;
        g_nkeys = n;
    }
    if (g_keys[v] != fdobj) {
        PyObject *old = g_keys[v];
        Py_INCREF(fdobj);
        g_keys[v] = fdobj;
        Py_XDECREF(old);                /* an int: no code runs */
    }
}

/* A new reference to a key for fd (NULL with an error set). */
static PyObject *
fd_key(int fd)
{
    if (fd > 256 && (size_t)fd < g_nkeys && g_keys[fd] != NULL) {
        Py_INCREF(g_keys[fd]);
        return g_keys[fd];
    }
    return PyLong_FromLong(fd);
}

/* Bumped by consulted_changed(), which _loop.MapState calls wherever a
 * MapState.consulted changes (_adopt, _drop, a full reconcile, close). */
static unsigned long g_cgen;

/* ------------------------------------------------------------------------ */
/* MapState's bookkeeping of one fd -- _set_mask(), _drop(), _adopt() of
 * _loop._PyBookkeeping, the reference the pure backend runs -- in C, step
 * for step: the same fields read again after every call that may run
 * Python code, the same container operations in the same order, the same
 * Python calls (poller.modify(), spoll.register(), obj.socket.fileno(),
 * obj._fa_mask() where c_mask() does not know the class).  Paths no
 * well-formed channel takes (a class _classify() has not cached, a mask
 * that is not an int) call the Python reference instead.
 *
 * Why: a client that makes a connection per request pays _adopt() (with
 * _classify()) and _drop() once per connection, ~180 bytecodes: by
 * callgrind ~6,000 of the ~10,000 instructions per connection by which the
 * C loop's W4_1 row exceeded 3.11's whole loop. */

static struct {
    PyObject *kind_cache, *classify, *check_key, *keys, *remember_key,
        *inherited, *py_set_mask, *states, *wakers, *wake, *forget_map,
        *map_order, *py_reconcile;
} BK;           /* from _loop, by bookkeeping() at its import */

static int first_key_ok(PyObject *fd);

/* st.<field k>, a new reference, which must be a dict. */
static PyObject *
st_dict(PyObject *st, int k)
{
    PyObject *d = st_get(st, k);
    if (d != NULL && !PyDict_Check(d)) {
        PyErr_Format(PyExc_TypeError, "'%s' of the map state must be a dict",
                     g_fnames[k]);
        Py_CLEAR(d);
    }
    return d;
}

/* d.pop(key, None) with the value dropped (after the removal: its
 * deallocation may run Python code).  1: there was a value and it is not
 * None (the `is not None` of the Python code), 0: not, -1: error. */
static int
dict_pop(PyObject *d, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(d, key);
    int had;
    if (v == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(v);
    if (PyDict_DelItem(d, key) < 0) {
        Py_DECREF(v);
        return -1;
    }
    had = v != Py_None;
    Py_DECREF(v);
    return had;
}

/* `if st.<k>: st.<k>.pop(fd, None)` for a dict field (pop only: when the
 * field is empty, as the Python code's truth test skips it).  As dict_pop. */
static int
field_pop(PyObject *st, int k, PyObject *fd, int only_if_any)
{
    PyObject *d = st_dict(st, k);
    int r;
    if (d == NULL)
        return -1;
    r = (only_if_any && PyDict_Size(d) == 0) ? 0 : dict_pop(d, fd);
    Py_DECREF(d);
    return r;
}

/* st.<k>[key] = v, or del st.<k>[key] where v is NULL.  0 or -1. */
static int
field_store(PyObject *st, int k, PyObject *key, PyObject *v)
{
    PyObject *d = st_dict(st, k);
    int r;
    if (d == NULL)
        return -1;
    r = v ? PyDict_SetItem(d, key, v) : PyDict_DelItem(d, key);
    Py_DECREF(d);
    return r;
}

/* key in st.<k>: 1, 0, -1. */
static int
field_has(PyObject *st, int k, PyObject *key)
{
    PyObject *d = st_dict(st, k);
    int r;
    if (d == NULL)
        return -1;
    r = PyDict_Contains(d, key);
    Py_DECREF(d);
    return r;
}

/* obj.<name>(a, b) with the result dropped.  0 or -1. */
static int
call2(PyObject *obj, PyObject *name, PyObject *a, PyObject *b)
{
    PyObject *r = PyObject_CallMethodObjArgs(obj, name, a, b, NULL);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* _loop._unregister(sp, fd): sp.unregister(fd), a KeyError ignored. */
static int
sp_unregister(PyObject *sp, PyObject *fd)
{
    PyObject *r = PyObject_CallMethodObjArgs(sp, S.unregister, fd, NULL);
    if (r == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(r);
    return 0;
}

/* Consulted changed: the snapshots go (csnap; cvec too with `both`), and
 * dispatch learns it (consulted_changed()). */
static int
consulted_dropped(PyObject *st, int both)
{
    g_cgen++;
    if (st_set(st, F_CSNAP, Py_None) < 0)
        return -1;
    return both ? st_set(st, F_CVEC, Py_None) : 0;
}

/* MapState._set_mask(fd, mo).  0 or -1. */
static int
bk_set_mask(PyObject *st, PyObject *fd, PyObject *mo)
{
    PyObject *mask, *cv, *sp, *p;
    long cur, m;
    int r;

    if (!PyLong_Check(mo) || ((m = fa_long(mo)) == -1 && PyErr_Occurred()))
        goto python;
    if (!(mask = st_dict(st, F_MASK)))
        return -1;
    cv = PyDict_GetItemWithError(mask, fd);
    if (cv == NULL && PyErr_Occurred()) {
        Py_DECREF(mask);
        return -1;
    }
    cur = 0;
    if (cv != NULL && (!PyLong_Check(cv) ||
                       ((cur = fa_long(cv)) == -1 && PyErr_Occurred()))) {
        Py_DECREF(mask);
        goto python;
    }
    Py_DECREF(mask);
    if (cur == m)
        return 0;
    if (cur && m) {
        if (field_store(st, F_MASK, fd, mo) < 0 || !(sp = st_get(st, F_SPOLL)))
            return -1;
        p = Py_None;
        if (sp != Py_None && !(p = st_peek(st, F_POLLER))) {
            Py_DECREF(sp);
            return -1;
        }
        if (sp != Py_None && p == Py_None) {
            r = call2(sp, S.register_, fd, mo);
            if (r == 0)
                r = add_nchg(st, 1);
        } else {
            r = field_store(st, F_BATCH, fd, mo);
        }
        Py_DECREF(sp);
        return r;
    }
    /* A first registration (the key is validated: a bad one raises here
     * and is not recorded) or a removal (applied at once, before a close). */
    if (add_nchg(st, 1) < 0 || field_pop(st, F_BATCH, fd, 0) < 0 ||
        !(p = st_get(st, F_POLLER)))
        return -1;
    if (p != Py_None) {
        r = call2(p, S.modify, fd, mo);
        Py_DECREF(p);
        if (r < 0)
            return -1;
    } else {
        Py_DECREF(p);
        if (m && !first_key_ok(fd)) {
            PyObject *c = PyObject_CallFunctionObjArgs(BK.check_key, fd, NULL);
            if (c == NULL)
                return -1;
            Py_DECREF(c);
        }
        if (!(sp = st_get(st, F_SPOLL)))
            return -1;
        r = sp == Py_None ? 0 : m ? call2(sp, S.register_, fd, mo) : sp_unregister(sp, fd);
        Py_DECREF(sp);
        if (r < 0)
            return -1;
    }
    return field_store(st, F_MASK, fd, m ? mo : NULL);

python:
    PyErr_Clear();
    p = PyObject_CallFunctionObjArgs(BK.py_set_mask, st, fd, mo, NULL);
    Py_XDECREF(p);
    return p ? 0 : -1;
}

/* `if st.reclass: st.reclass.discard(fd)`.  0 or -1. */
static int
reclass_discard(PyObject *st, PyObject *fd)
{
    PyObject *o = st_get(st, F_RECLASS);
    int t;
    if (o == NULL)
        return -1;
    t = PyObject_IsTrue(o);
    if (t > 0)
        t = PySet_Discard(o, fd);
    Py_DECREF(o);
    return t < 0 ? -1 : 0;
}

/* MapState._drop(fd).  0 or -1. */
static int
bk_drop(PyObject *st, PyObject *fd)
{
    PyObject *o, *r;
    int t;

    if (!(o = st_peek(st, F_DISP)))
        return -1;
    if (o != Py_None) {
        if (!(r = call0(st, S.freeze)))
            return -1;
        Py_DECREF(r);
    }
    if (field_pop(st, F_DEAD, fd, 1) < 0 || field_pop(st, F_OWNER, fd, 0) < 0 ||
        reclass_discard(st, fd) < 0 || field_pop(st, F_SUSPENDED, fd, 1) < 0 ||
        (t = field_pop(st, F_CONSULTED, fd, 0)) < 0)
        return -1;
    /* (cvec too: it holds the channel until the next consult rebuilds
     * both, so a closed channel is let go of at once) */
    if (t && consulted_dropped(st, 1) < 0)
        return -1;
    if (field_pop(st, F_BATCH, fd, 1) < 0 || (t = field_has(st, F_MASK, fd)) < 0)
        return -1;
    if (!t)
        return 0;
    if (field_store(st, F_MASK, fd, NULL) < 0 || add_nchg(st, 1) < 0 ||
        !(o = st_get(st, F_POLLER)))
        return -1;
    if (o != Py_None) {
        PyObject *zero = PyLong_FromLong(0);
        t = zero ? call2(o, S.modify, fd, zero) : -1;
        Py_XDECREF(zero);
    } else {
        Py_DECREF(o);
        if (!(o = st_get(st, F_SPOLL)))
            return -1;
        t = o == Py_None ? 0 : sp_unregister(o, fd);
    }
    Py_DECREF(o);
    return t;
}

/* _adopt()'s "closed behind the dispatcher" test:
 *     try: closed = obj.socket.fileno() == -1
 *     except Exception: closed = False
 * then `if closed:`.  1, 0, -1. */
static int
socket_closed(PyObject *obj)
{
    PyObject *s = PyObject_GetAttr(obj, S.socket), *no = NULL, *cmp = NULL;
    PyObject *minus1;
    int t;
    if (s != NULL) {
        no = call0(s, S.fileno);
        Py_DECREF(s);
    }
    if (no != NULL) {
        if ((minus1 = PyLong_FromLong(-1)) != NULL) {
            cmp = PyObject_RichCompare(no, minus1, Py_EQ);
            Py_DECREF(minus1);
        }
        Py_DECREF(no);
    }
    if (cmp == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyErr_Clear();
        return 0;
    }
    t = PyObject_IsTrue(cmp);
    Py_DECREF(cmp);
    return t;
}

/* _adopt()'s answer for a key it may not register (err: EBADF, EINVAL). */
static int
adopt_fault(PyObject *st, PyObject *fd, PyObject *obj, int err)
{
    PyObject *zero, *f, *item;
    int t;
    if (field_store(st, F_OWNER, fd, obj) < 0 ||
        (t = field_pop(st, F_CONSULTED, fd, 0)) < 0 ||
        (t && consulted_dropped(st, 0) < 0) ||
        (t = field_has(st, F_MASK, fd)) < 0)
        return -1;
    if (t) {
        if (!(zero = PyLong_FromLong(0)))
            return -1;
        t = bk_set_mask(st, fd, zero);
        Py_DECREF(zero);
        if (t < 0)
            return -1;
    }
    if ((t = field_has(st, F_DEAD, fd)) != 0)
        return t < 0 ? -1 : 0;
    if (field_store(st, F_DEAD, fd, obj) < 0 || !(f = st_get(st, F_FAULTS)))
        return -1;
    item = Py_BuildValue("(OOi)", fd, obj, err);
    t = item ? PyList_Append(f, item) : -1;
    Py_XDECREF(item);
    Py_DECREF(f);
    return t;
}

/* getattr(obj, slot, INHERITED) is not INHERITED: 1, 0, -1. */
static int
own_pred(PyObject *obj, PyObject *slot)
{
    PyObject *v = PyObject_GetAttr(obj, slot);
    if (v == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(v);
    return v != BK.inherited;
}

/* _loop._classify(obj) -> *managed, *call_r, *call_w (0/1).  The cached
 * class kind and the instance's slots, as the Python function reads them;
 * a class not cached yet, or a predicate without a slot, calls it. */
static int
classify(PyObject *obj, int *managed, int *call_r, int *call_w)
{
    PyObject *k = PyDict_GetItemWithError(BK.kind_cache, (PyObject *)Py_TYPE(obj));
    PyObject *sr, *sw, *res;
    int own_r = 0, own_w = 0, rc = -1;

    if (k == NULL && PyErr_Occurred())
        return -1;
    if (k != NULL && PyTuple_Check(k) && PyTuple_Size(k) == 5) {
        Py_INCREF(k);       /* (a getattr below may run code that clears the cache) */
        sr = PyTuple_GetItem(k, 3);
        sw = PyTuple_GetItem(k, 4);
        if ((*managed = PyObject_IsTrue(PyTuple_GetItem(k, 0))) < 0 ||
            (*call_r = PyObject_IsTrue(PyTuple_GetItem(k, 1))) < 0 ||
            (*call_w = PyObject_IsTrue(PyTuple_GetItem(k, 2))) < 0)
            goto done;
        if ((!*call_r && !PyUnicode_Check(sr)) || (!*call_w && !PyUnicode_Check(sw))) {
            Py_DECREF(k);
            goto python;            /* (bound_is() decides: _own()) */
        }
        if ((!*call_r && (own_r = own_pred(obj, sr)) < 0) ||
            (!*call_w && (own_w = own_pred(obj, sw)) < 0))
            goto done;
        if (own_r || own_w) {
            *managed = 0;
            *call_r = *call_r || own_r;
            *call_w = *call_w || own_w;
        }
        rc = 0;
    done:
        Py_DECREF(k);
        return rc;
    }
python:
    res = PyObject_CallFunctionObjArgs(BK.classify, obj, NULL);
    if (res == NULL)
        return -1;
    if (!PyTuple_Check(res) || PyTuple_Size(res) != 3) {
        PyErr_SetString(PyExc_TypeError, "_classify() must return a 3-tuple");
    } else if ((*managed = PyObject_IsTrue(PyTuple_GetItem(res, 0))) >= 0 &&
               (*call_r = PyObject_IsTrue(PyTuple_GetItem(res, 1))) >= 0 &&
               (*call_w = PyObject_IsTrue(PyTuple_GetItem(res, 2))) >= 0) {
        rc = 0;
    }
    Py_DECREF(res);
    return rc;
}

/* `_keys[fd] = fd`, or _remember_key(fd) where the list is too short. */
static int
keep_key(PyObject *fd)
{
    int overflow = 0;
    long v;
    PyObject *r;
    if (!PyLong_CheckExact(fd))
        return 0;
    v = PyLong_AsLongAndOverflow(fd, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (!overflow && v <= 256)
        return 0;
    if (!overflow && PyList_Check(BK.keys) && v < PyList_Size(BK.keys)) {
        Py_INCREF(fd);
        return PyList_SetItem(BK.keys, v, fd);   /* (the old one: an int) */
    }
    r = PyObject_CallFunctionObjArgs(BK.remember_key, fd, NULL);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* MapState._adopt(fd, obj).  0 or -1. */
static int
bk_adopt(PyObject *st, PyObject *fd, PyObject *obj)
{
    PyObject *d, *v, *mo, *item;
    int closed = 0, err = 0, managed, call_r, call_w, t;
    long m;

    if (!(d = st_dict(st, F_DEAD)))
        return -1;
    if (PyDict_Size(d)) {
        v = PyDict_GetItemWithError(d, fd);
        if (v == NULL && PyErr_Occurred()) {
            Py_DECREF(d);
            return -1;
        }
        closed = v == obj;
    }
    Py_DECREF(d);
    if (!closed && (closed = socket_closed(obj)) < 0)
        return -1;
    if (closed) {
        /* Closed behind the dispatcher before the loop met it: its old
         * number may belong to anything now, so it is never registered
         * (see _PyBookkeeping._adopt). */
        err = EBADF;
    } else {
        /* A stale key that is our wake-up fd's number now (EINVAL) */
        if (!(v = st_get(st, F_WAKEFD)))
            return -1;
        d = PyObject_RichCompare(fd, v, Py_EQ);
        Py_DECREF(v);
        if (d == NULL)
            return -1;
        t = PyObject_IsTrue(d);
        Py_DECREF(d);
        if (t < 0)
            return -1;
        if (t)
            err = EINVAL;
    }
    if (err)
        return adopt_fault(st, fd, obj, err);
    if (classify(obj, &managed, &call_r, &call_w) < 0 || keep_key(fd) < 0 ||
        field_store(st, F_OWNER, fd, obj) < 0)
        return -1;
    if (!managed) {
        item = PyTuple_Pack(4, fd, obj, call_r ? Py_True : Py_False,
                            call_w ? Py_True : Py_False);
        t = item ? field_store(st, F_CONSULTED, fd, item) : -1;
        Py_XDECREF(item);
        return t < 0 ? -1 : consulted_dropped(st, 0);
    }
    if ((t = field_pop(st, F_CONSULTED, fd, 0)) < 0 ||
        (t && consulted_dropped(st, 0) < 0))
        return -1;
    /* m = self._managed_mask(fd, obj) */
    if (!(d = st_dict(st, F_SUSPENDED)))
        return -1;
    t = PyDict_Size(d) ? PyDict_Contains(d, fd) : 0;
    Py_DECREF(d);
    if (t < 0)
        return -1;
    if (t)
        mo = PyLong_FromLong(0);
    else if ((m = g_cmasks ? c_mask(obj) : -2) == -2)
        mo = call0(obj, S.fa_mask);
    else
        mo = m < 0 ? NULL : PyLong_FromLong(m);
    if (mo == NULL)
        return -1;
    t = bk_set_mask(st, fd, mo);
    if (t == 0)
        t = PyObject_SetAttr(obj, S.fa_regmask, mo);
    Py_DECREF(mo);
    return t;
}

/* The methods need _loop's helpers (bookkeeping()). */
static int
bk_ready(void)
{
    if (BK.kind_cache != NULL)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "fastasyncore._cloop.bookkeeping() was not called");
    return 0;
}

/* _states.get(id(map)) where its .map is map: a new reference, or NULL
 * (with an error set, or none: no state of this map). */
static PyObject *
state_of(PyObject *map)
{
    PyObject *key = PyLong_FromVoidPtr(map), *st, *m;
    int same;
    if (key == NULL)
        return NULL;
    st = PyDict_GetItemWithError(BK.states, key);
    Py_DECREF(key);
    if (st == NULL)
        return NULL;
    Py_INCREF(st);
    if (PyObject_TypeCheck(st, (PyTypeObject *)g_StateBase)) {
        same = STF(st, F_MAP) == map;
    } else {                        /* (never: every state is a MapState) */
        if (!(m = PyObject_GetAttrString(st, "map"))) {
            Py_DECREF(st);
            return NULL;
        }
        same = m == map;
        Py_DECREF(m);
    }
    if (!same)
        Py_CLEAR(st);
    return st;
}

/* `if _wakers: _wake(st)`.  0 or -1. */
static int
wake_if_serving(PyObject *st)
{
    PyObject *r;
    int t = PyObject_IsTrue(BK.wakers);
    if (t <= 0)
        return t;
    r = PyObject_CallFunctionObjArgs(BK.wake, st, NULL);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* _loop.note_added(map, fd) / note_removed(map, fd) (the Python functions
 * are the reference): asyncore's add_channel() and del_channel() call them
 * once per channel, a Python frame each where this is a C call. */
static int
two_args(PyObject *args, const char *sig, PyObject **a, PyObject **b)
{
    if (!bk_ready())
        return -1;
    if (!PyTuple_Check(args) || PyTuple_Size(args) != 2) {
        PyErr_Format(PyExc_TypeError, "%s takes 2 arguments", sig);
        return -1;
    }
    *a = PyTuple_GetItem(args, 0);
    *b = PyTuple_GetItem(args, 1);
    return 0;
}

static PyObject *
cloop_note_added(PyObject *self, PyObject *args)
{
    PyObject *map, *fd, *st, *pending;
    int rc = -1;
    (void)self;
    if (two_args(args, "note_added(map, fd)", &map, &fd) < 0)
        return NULL;
    if (!(st = state_of(map)))
        return PyErr_Occurred() ? NULL : none_ref();
    if ((pending = st_get(st, F_PENDING)) != NULL) {
        rc = PySet_Add(pending, fd);
        Py_DECREF(pending);
        if (rc == 0)
            rc = wake_if_serving(st);
    }
    Py_DECREF(st);
    return rc < 0 ? NULL : none_ref();
}

static PyObject *
cloop_note_removed(PyObject *self, PyObject *args)
{
    PyObject *map, *fd, *st, *o, *r;
    int rc = -1, t;
    (void)self;
    if (two_args(args, "note_removed(map, fd)", &map, &fd) < 0)
        return NULL;
    if (!(st = state_of(map)))
        return PyErr_Occurred() ? NULL : none_ref();
    /* st._drop(fd): MapState's is StateBase's (bk_drop) */
    if (bk_drop(st, fd) < 0 || !(o = st_get(st, F_PENDING)))
        goto out;
    t = PySet_Discard(o, fd);
    Py_DECREF(o);
    if (t < 0 || (t = PyObject_IsTrue(map)) < 0)
        goto out;
    if (!t) {
        if (!(o = st_peek(st, F_THREAD)))
            goto out;
        if (o == Py_None) {
            if (!(r = PyObject_CallFunctionObjArgs(BK.forget_map, map, NULL)))
                goto out;
            Py_DECREF(r);
        }
    }
    rc = wake_if_serving(st);
out:
    Py_DECREF(st);
    return rc < 0 ? NULL : none_ref();
}

static PyObject *
stbase_set_mask(PyObject *st, PyObject *args)
{
    PyObject *fd, *m;
    if (two_args(args, "_set_mask(fd, m)", &fd, &m) < 0 || bk_set_mask(st, fd, m) < 0)
        return NULL;
    return none_ref();
}

static PyObject *
stbase_drop(PyObject *st, PyObject *fd)
{
    if (!bk_ready() || bk_drop(st, fd) < 0)
        return NULL;
    return none_ref();
}

static PyObject *
stbase_adopt(PyObject *st, PyObject *args)
{
    PyObject *fd, *obj;
    if (two_args(args, "_adopt(fd, obj)", &fd, &obj) < 0 || bk_adopt(st, fd, obj) < 0)
        return NULL;
    return none_ref();
}

/* ------------------------------------------------------------------------ */
/* MapState.reconcile() -- _loop._PyBookkeeping.reconcile, the reference --
 * in C, step for step (the same reads of the fields, container operations
 * and calls, in the same order).  A map or a container of an unexpected
 * type runs the reference instead.
 *
 * Why: the C loop reconciles in every iteration after a managed channel's
 * interest changed (a dispatcher_with_send or async_chat that queued or
 * finished a reply: twice per request) and after a channel arrived or left
 * (once per connection of a client): a Python frame of ~40-90 bytecodes
 * each time, the last one on those paths. */

/* obj.<name>(arg) (arg NULL: no argument) with the result dropped.  0 or -1. */
static int
call_drop(PyObject *obj, PyObject *name, PyObject *arg)
{
    PyObject *r = PyObject_CallMethodObjArgs(obj, name, arg, NULL);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* `self.<k> and fd in self.<k>` for a dict or set field.  1, 0, -1. */
static int
field_any_has(PyObject *st, int k, PyObject *fd)
{
    PyObject *o = st_get(st, k);
    int t;
    if (o == NULL)
        return -1;
    t = PyObject_IsTrue(o);
    if (t > 0)
        t = PySequence_Contains(o, fd);
    Py_DECREF(o);
    return t;
}

/* The managed channel's answer (reconcile()'s last branch):
 *     new = 0 if (susp and fd in susp) else obj._fa_mask()
 *     cur = mask.get(fd, 0)
 *     if new != cur:
 *         if cur and new: mask[fd] = new; batch[fd] = new or sp.register(...)
 *         else: self._set_mask(fd, new)
 *     obj._fa_regmask = new                                      0 or -1 */
static int
rec_managed(PyObject *st, PyObject *fd, PyObject *obj, PyObject *mask,
            PyObject *susp, PyObject *sp)
{
    PyObject *newo, *curo;
    long m;
    int t;

    t = PyDict_Size(susp) ? PyDict_Contains(susp, fd) : 0;
    if (t < 0)
        return -1;
    if (t)
        newo = PyLong_FromLong(0);
    else if ((m = g_cmasks ? c_mask(obj) : -2) == -2)
        newo = call0(obj, S.fa_mask);
    else
        newo = m < 0 ? NULL : PyLong_FromLong(m);
    if (newo == NULL)
        return -1;
    curo = PyDict_GetItemWithError(mask, fd);
    if (curo == NULL) {
        if (PyErr_Occurred())
            goto fail;
        curo = PyLong_FromLong(0);
        if (curo == NULL)
            goto fail;
    } else {
        Py_INCREF(curo);
    }
    t = PyObject_RichCompareBool(newo, curo, Py_NE);
    if (t > 0) {
        int both = PyObject_IsTrue(curo);
        if (both > 0)
            both = PyObject_IsTrue(newo);
        if (both < 0) {
            t = -1;
        } else if (both) {
            t = PyDict_SetItem(mask, fd, newo);
            if (t == 0)
                t = sp == Py_None ? field_store(st, F_BATCH, fd, newo)
                                  : call2(sp, S.register_, fd, newo);
            if (t == 0 && sp != Py_None)
                t = add_nchg(st, 1);
        } else {
            t = bk_set_mask(st, fd, newo);
        }
    }
    Py_DECREF(curo);
    if (t < 0)
        goto fail;
    t = PyObject_SetAttr(obj, S.fa_regmask, newo);
    Py_DECREF(newo);
    return t;
fail:
    Py_DECREF(newo);
    return -1;
}

/* The pending loop's step for one fd (obj: map.get(fd), NULL for None).
 * *added: the new fds' list, made here.  0 or -1. */
static int
rec_one(PyObject *st, PyObject *fd, PyObject *obj, PyObject *owner,
        PyObject *consulted, PyObject *mask, PyObject *susp, PyObject *sp,
        PyObject **added)
{
    PyObject *cur, *o;
    int t;

    if (obj == NULL)
        return bk_drop(st, fd);
    cur = PyDict_GetItemWithError(owner, fd);
    if (cur == NULL && PyErr_Occurred())
        return -1;
    if (cur != obj) {
        if (cur != NULL) {              /* fd in owner: another channel's */
            if (bk_drop(st, fd) < 0)
                return -1;
            return bk_adopt(st, fd, obj);
        }
        /* A new fd (a client adds one per connection, a server one per
         * accept): of what _drop() does, only this can apply to it. */
        if (!(o = st_peek(st, F_DISP)))
            return -1;
        if (o != Py_None && call_drop(st, S.freeze, NULL) < 0)
            return -1;
        if (reclass_discard(st, fd) < 0 || field_pop(st, F_SUSPENDED, fd, 1) < 0)
            return -1;
        if (*added == NULL && !(*added = PyList_New(0)))
            return -1;
        return PyList_Append(*added, fd);
    }
    if ((t = field_any_has(st, F_DEAD, fd)) != 0)
        return t < 0 ? -1 : 0;          /* never registered (see _adopt) */
    if ((t = field_any_has(st, F_RECLASS, fd)) != 0) {
        if (t < 0 || reclass_discard(st, fd) < 0)
            return -1;
        return bk_adopt(st, fd, obj);
    }
    if ((t = PyDict_Contains(consulted, fd)) != 0)
        return t < 0 ? -1 : st_set(st, F_CPREV, Py_None);  /* re-read accepting */
    return rec_managed(st, fd, obj, mask, susp, sp);
}

static int
bk_reconcile(PyObject *st)
{
    PyObject *m, *pending, *owner, *consulted, *mask, *susp, *sp = NULL;
    PyObject *added = NULL, *fd = NULL, *obj, *o, *it = NULL;
    int t, rc = -1;

    if (!bk_ready())
        return -1;
    m = STF(st, F_MAP);
    pending = STF(st, F_PENDING);
    owner = STF(st, F_OWNER);
    consulted = STF(st, F_CONSULTED);
    mask = STF(st, F_MASK);
    susp = STF(st, F_SUSPENDED);
    if (!m || !PyDict_CheckExact(m) || !pending || Py_TYPE(pending) != &PySet_Type ||
        !owner || !PyDict_Check(owner) || !consulted || !PyDict_Check(consulted) ||
        !mask || !PyDict_Check(mask) || !susp || !PyDict_Check(susp)) {
        /* (a map that is not a dict: its get() and order are its own) */
        o = PyObject_CallFunctionObjArgs(BK.py_reconcile, st, NULL);
        Py_XDECREF(o);
        return o ? 0 : -1;
    }
    if (!(o = st_get(st, F_FULL)))
        return -1;
    t = PyObject_IsTrue(o);
    Py_DECREF(o);
    if (t)
        return t < 0 ? -1 : call_drop(st, S.reconcile_all, NULL);
    Py_INCREF(m);
    Py_INCREF(pending);
    Py_INCREF(owner);
    Py_INCREF(consulted);
    Py_INCREF(mask);
    Py_INCREF(susp);
    /* sp = self._direct() */
    if (!(o = st_peek(st, F_POLLER)))
        goto out;
    if (o != Py_None) {
        Py_INCREF(Py_None);
        sp = Py_None;
    } else if (!(sp = st_get(st, F_SPOLL))) {
        goto out;
    }
    while (PySet_Size(pending) > 0) {
        if (!(fd = PySet_Pop(pending)))
            goto out;
        obj = PyDict_GetItemWithError(m, fd);
        if (obj == NULL && PyErr_Occurred())
            goto out;
        if (obj == Py_None)
            obj = NULL;
        Py_XINCREF(obj);
        t = rec_one(st, fd, obj, owner, consulted, mask, susp, sp, &added);
        Py_XDECREF(obj);
        Py_CLEAR(fd);
        if (t < 0)
            goto out;
    }
    if (added != NULL) {
        /* adopted in map order, as the full walk does (_map_order) */
        if (PyList_Size(added) > 1) {
            o = PyObject_CallFunctionObjArgs(BK.map_order, m, added, NULL);
            if (o == NULL)
                goto out;
            Py_DECREF(added);
            added = o;
        }
        if (!(it = PyObject_GetIter(added)))
            goto out;
        while ((fd = PyIter_Next(it)) != NULL) {
            obj = PyDict_GetItemWithError(m, fd);
            if (obj == NULL && PyErr_Occurred())
                goto out;
            if (obj != NULL && obj != Py_None) {
                if ((t = PyDict_Contains(owner, fd)) < 0)
                    goto out;
                if (!t) {
                    Py_INCREF(obj);
                    t = bk_adopt(st, fd, obj);
                    Py_DECREF(obj);
                    if (t < 0)
                        goto out;
                }
            }
            Py_CLEAR(fd);
        }
        if (PyErr_Occurred())
            goto out;
    }
    if (sp != Py_None) {
        if (!(o = st_peek(st, F_SPOLL)))
            goto out;
        if (o != sp && call_drop(st, S.direct_lost, sp) < 0)
            goto out;
    }
    if (!(o = st_get(st, F_FAULTS)))
        goto out;
    t = PyObject_IsTrue(o);
    Py_DECREF(o);
    if (t != 0 && (t < 0 || call_drop(st, S.route_faults, NULL) < 0))
        goto out;
    if (PyDict_Size(m) != PyDict_Size(owner) && call_drop(st, S.reconcile_all, NULL) < 0)
        goto out;
    rc = 0;
out:
    Py_XDECREF(fd);
    Py_XDECREF(it);
    Py_XDECREF(added);
    Py_XDECREF(sp);
    Py_DECREF(m);
    Py_DECREF(pending);
    Py_DECREF(owner);
    Py_DECREF(consulted);
    Py_DECREF(mask);
    Py_DECREF(susp);
    return rc;
}

static PyObject *
stbase_reconcile(PyObject *st, PyObject *unused)
{
    (void)unused;
    if (bk_reconcile(st) < 0)
        return NULL;
    return none_ref();
}

/* The channel that owns key, borrowed (NULL: none, or an error is set),
 * and in *cons whether it is consulted.  consulted[fd] is (fd, obj,
 * call_r, call_w) with obj the one owner[fd] holds (_loop.MapState._adopt
 * sets both, _drop pops both), so for a consulted channel -- the docs
 * pattern's -- one lookup answers both questions, where owner and then
 * recheck()'s `fd in consulted` took two (each ~80 instructions, four per
 * message). */
static PyObject *
owner_of(loopst *c, PyObject *key, int *cons)
{
    /* (a map of managed channels only -- dispatcher_with_send, async_chat,
     * the stock predicates -- has no consulted channel to look for) */
    PyObject *e = PyDict_Size(c->consulted) ?
        PyDict_GetItemWithError(c->consulted, key) : NULL;
    if (e == NULL && PyErr_Occurred())
        return NULL;
    *cons = e != NULL;
    if (e != NULL && PyTuple_Check(e) && PyTuple_Size(e) == 4)
        return PyTuple_GetItem(e, 1);
    return PyDict_GetItemWithError(c->owner, key);
}

/* After a handler of a managed channel: did it change what readable()/
 * writable() would answer?  -> pending.add(fd).  (_loop._dispatch)
 * cons: whether owner_of() found the channel consulted, when g_cgen was
 * cgen0; if no consulted dict changed since, that still holds, and a
 * consulted channel needs nothing here. */
static int
recheck(PyObject *consulted, PyObject *pending, PyObject *key, PyObject *obj,
        int cons, unsigned long cgen0)
{
    PyObject *m, *rm;
    long cm;
    int c;
    if (g_cgen == cgen0) {
        if (cons)
            return 0;
    } else if ((c = PyDict_Contains(consulted, key)) != 0) {
        return c < 0 ? -1 : 0;
    }
    cm = c_mask(obj);
    if (cm == -1)
        return -1;
    if (cm == -2) {
        /* not one of ours: call it, and compare as _loop._dispatch does */
        if (!(m = call0(obj, S.fa_mask)))
            return -1;
        rm = PyObject_GetAttr(obj, S.fa_regmask);
        if (rm == NULL) {
            Py_DECREF(m);
            return -1;
        }
        c = PyObject_RichCompareBool(m, rm, Py_NE);
        Py_DECREF(m);
        Py_DECREF(rm);
    } else {
        /* _fa_regmask: what reconcile() registered for it (an int) */
        long r;
        rm = PyObject_GetAttr(obj, S.fa_regmask);
        if (rm == NULL)
            return -1;
        r = PyLong_Check(rm) ? fa_long(rm) : -1;
        Py_DECREF(rm);
        if (r == -1 && PyErr_Occurred())
            return -1;
        c = r != cm;
    }
    if (c > 0)
        return PySet_Add(pending, key);
    return c;
}

/* map.get(key) is obj?  1 yes, 0 no, -1 error */
static int
still_owner(PyObject *map, PyObject *key, PyObject *obj)
{
    PyObject *cur = PyDict_GetItemWithError(map, key);
    if (cur == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return cur == obj;
}

/* ------------------------------------------------------------------------ */
/* dispatch */

typedef struct {
    PyObject *key;
    PyObject *obj;
    int err;        /* a refused fd (FA_POLLFAULT): its errno; else 0 */
    int cons;       /* owner_of() found it consulted (when the pass began) */
} item;

/* Queue obj's event for key (new references taken) in dispatch_select(). */
static void
todo_add(item *t, Py_ssize_t *cnt, PyObject *key, PyObject *obj, int err, int cons)
{
    Py_INCREF(key);
    Py_INCREF(obj);
    t[*cnt].key = key;
    t[*cnt].obj = obj;
    t[*cnt].err = err;
    t[*cnt].cons = cons;
    (*cnt)++;
}

/* An fd the poller refused (FA_POLLFAULT in ev, rare): _loop._route_fault
 * raises the OSError 3.11 would have seen from the socket and routes it as
 * readwrite() does (handle_close() for the disconnect errnos, handle_error()
 * otherwise).  In Python, because handle_error() needs a traceback, which
 * the limited API cannot make.  0, or -1 with the handler's error set. */
static int
route_fault(PyObject *obj, int ev)
{
    PyObject *e = PyLong_FromLong(ev), *r;
    if (e == NULL)
        return -1;
    r = PyObject_CallFunctionObjArgs(g_route_fault, obj, e, NULL);
    Py_DECREF(e);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
dispatch_poll(loopst *c, PyObject *map, evbuf *b)
{
    PyObject *pending = c->pending, *consulted = c->consulted;
    Py_ssize_t i;
    int rc = -1;

    for (i = 0; i < b->n; i++) {
        int ev = b->pairs[2 * i + 1], s, cons;
        unsigned long cgen0;
        PyObject *key, *obj, *r;
        if (b->pairs[2 * i] == c->wakefd) {
            /* the wake-up fd (checked first: a dead stale key may own the
             * number in st.owner, see _adopt) */
            c->woke = 1;
            continue;
        }
        key = fd_key(b->pairs[2 * i]);
        if (key == NULL)
            goto out;
        cgen0 = g_cgen;
        obj = owner_of(c, key, &cons);
        if (obj == NULL || (s = still_owner(map, key, obj)) == 0) {
            Py_DECREF(key);
            if (PyErr_Occurred())
                goto out;
            continue;
        }
        if (s < 0) {
            Py_DECREF(key);
            goto out;
        }
        Py_INCREF(obj);               /* held until its last call returned */
        if (ev & FA_POLLFAULT) {
            s = route_fault(obj, ev);
            goto done;
        }
        /* 3.11 readwrite(): read, write, priority, close; stop when a
         * handler closed the channel (our fix: no handler after close()) */
        /* The map check after a handler only decides whether the next
         * one runs: after the last one it is skipped (the same outcome, a
         * lookup less per event). */
        s = 0;
        if (ev & FA_POLLIN) {
            r = call0(obj, S.handle_read_event);
            if (r == NULL)
                goto exc;
            Py_DECREF(r);
            if ((ev & (FA_POLLOUT | FA_POLLPRI | CLOSE_BITS)) &&
                    (s = still_owner(map, key, obj)) <= 0)
                goto done;
        }
        if (ev & FA_POLLOUT) {
            r = call0(obj, S.handle_write_event);
            if (r == NULL)
                goto exc;
            Py_DECREF(r);
            if ((ev & (FA_POLLPRI | CLOSE_BITS)) &&
                    (s = still_owner(map, key, obj)) <= 0)
                goto done;
        }
        if (ev & FA_POLLPRI) {
            r = call0(obj, S.handle_expt_event);
            if (r == NULL)
                goto exc;
            Py_DECREF(r);
            if ((ev & CLOSE_BITS) && (s = still_owner(map, key, obj)) <= 0)
                goto done;
        }
        if (ev & CLOSE_BITS) {
            r = call0(obj, S.handle_close);
            if (r == NULL)
                goto exc;
            Py_DECREF(r);
        }
        s = 0;
        goto done;
    exc:
        s = route(obj, 1);
    done:
        if (s >= 0)
            s = recheck(consulted, pending, key, obj, cons, cgen0);
        Py_DECREF(obj);
        Py_DECREF(key);
        if (s < 0)
            goto out;
    }
    rc = 0;
out:
    return rc;
}

static int
dispatch_select(loopst *c, PyObject *map, evbuf *b)
{
    PyObject *pending = c->pending, *consulted = c->consulted, *mask = c->mask;
    item *todo[3] = {NULL, NULL, NULL}, *all = NULL;
    unsigned long cgen0;
    Py_ssize_t cnt[3] = {0, 0, 0}, i, n = b->n;
    item local[3 * 8];
    PyObject *names[3];
    int rc = -1, k;

    names[0] = S.handle_read_event;
    names[1] = S.handle_write_event;
    names[2] = S.handle_expt_event;
    if (n <= 8) {
        all = local;
    } else {
        all = PyMem_Malloc(3 * (size_t)n * sizeof(item));
        if (all == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    todo[0] = all;
    todo[1] = all + n;
    todo[2] = all + 2 * n;
    /* 3.11 order: every read, then every write, then every exception. */
    cgen0 = g_cgen;
    for (i = 0; i < n; i++) {
        int ev = b->pairs[2 * i + 1], cons;
        long m;
        PyObject *key, *obj, *mv;
        if (b->pairs[2 * i] == c->wakefd) {
            c->woke = 1;        /* the wake-up fd (see dispatch_poll) */
            continue;
        }
        key = fd_key(b->pairs[2 * i]);
        if (key == NULL)
            goto out;
        obj = owner_of(c, key, &cons);
        if (obj == NULL) {
            Py_DECREF(key);
            if (PyErr_Occurred())
                goto out;
            continue;
        }
        if (ev == FA_POLLIN || (ev & FA_POLLFAULT)) {
            /* the common case; the kernel reports POLLIN only for fds
             * registered for it, so the mask test is moot.  A refused fd is
             * routed in the read pass (_loop._dispatch does the same). */
            todo_add(todo[0], &cnt[0], key, obj, (ev & FA_POLLFAULT) ? ev : 0, cons);
            Py_DECREF(key);
            continue;
        }
        if (ev == FA_POLLOUT) {
            /* the other common one: reported only for fds registered for
             * it too (the pollers' stand-ins for refused fds as well) */
            todo_add(todo[1], &cnt[1], key, obj, 0, cons);
            Py_DECREF(key);
            continue;
        }
        mv = PyDict_GetItemWithError(mask, key);
        if (mv == NULL && PyErr_Occurred()) {
            Py_DECREF(key);
            goto out;
        }
        m = mv ? fa_long(mv) : 0;
        if (m == -1 && PyErr_Occurred()) {
            Py_DECREF(key);
            goto out;
        }
        if (ev & FA_POLLNVAL)
            /* select() would fail with EBADF; poll() reports NVAL: a read
             * (its recv fails with EBADF -> handle_close()) */
            ev |= FA_POLLIN | FA_POLLOUT;
        if ((m & FA_POLLIN) && (ev & (FA_POLLIN | FA_POLLHUP | FA_POLLERR))) {
            todo_add(todo[0], &cnt[0], key, obj, 0, cons);
        }
        if ((m & FA_POLLOUT) && (ev & (FA_POLLOUT | FA_POLLERR | FA_POLLHUP))) {
            todo_add(todo[1], &cnt[1], key, obj, 0, cons);
        }
        if ((m & FA_POLLPRI) && (ev & FA_POLLPRI)) {
            todo_add(todo[2], &cnt[2], key, obj, 0, cons);
        }
        Py_DECREF(key);
    }
    for (k = 0; k < 3; k++) {
        for (i = 0; i < cnt[k]; i++) {
            PyObject *key = todo[k][i].key, *obj = todo[k][i].obj, *r;
            int s = still_owner(map, key, obj);
            if (s < 0)
                goto out;
            if (!s)
                continue;
            if (todo[k][i].err) {
                if (route_fault(obj, todo[k][i].err) < 0)
                    goto out;
                if (recheck(consulted, pending, key, obj, todo[k][i].cons, cgen0) < 0)
                    goto out;
                continue;
            }
            r = call0(obj, names[k]);
            if (r == NULL) {
                if (route(obj, 0) < 0)
                    goto out;
            } else {
                Py_DECREF(r);
            }
            if (recheck(consulted, pending, key, obj, todo[k][i].cons, cgen0) < 0)
                goto out;
        }
    }
    rc = 0;
out:
    for (k = 0; k < 3; k++)
        for (i = 0; i < cnt[k]; i++) {
            Py_DECREF(todo[k][i].key);
            Py_DECREF(todo[k][i].obj);
        }
    if (all != local)
        PyMem_Free(all);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* the wait */

/* Put the changes fa_poller_wait did not reach back in front of the ones
 * made meanwhile (Poller._wait_error does the same), in the same dict. */
static int
keep_unapplied(PyObject *pend, const int *chg, size_t nchg, size_t applied)
{
    PyObject *rest = PyDict_New();
    size_t i;
    int rc = -1;
    if (rest == NULL)
        return -1;
    for (i = applied; i < nchg; i++) {
        PyObject *k = PyLong_FromLong(chg[2 * i]);
        PyObject *v = PyLong_FromLong(chg[2 * i + 1]);
        int s = (k && v) ? PyDict_SetItem(rest, k, v) : -1;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (s < 0)
            goto out;
    }
    if (PyDict_Update(rest, pend) < 0)
        goto out;
    PyDict_Clear(pend);
    rc = PyDict_Update(pend, rest);
out:
    Py_DECREF(rest);
    return rc;
}

/* Poller.wait(ms) on the C side: the same lock protocol, EINTR/deadline
 * handling (PEP 475) and error values.  0 with b filled, 1 when the poller is
 * busy or closed (the caller then calls Poller.wait() itself, which raises
 * the right error), -1 on error. */
static int
wait_cffi(loopst *c, PyObject *poller, long ms, evbuf *b)
{
    PyObject *r, *pend;
    PyObject *t = NULL, *v = NULL, *tb = NULL;
    int *chg = NULL, chg_local[2 * 16];
    size_t nchg = 0, napplied = 0;
    Py_ssize_t nreg;
    int tmo, n, rc = -1, closed;
    double deadline = 0.0;

    if (poller != c->poller && poller_take(c, poller) < 0)
        return -1;
    r = PyObject_CallFunctionObjArgs(c->acquire, Py_False, NULL);
    if (r == NULL)
        return -1;
    if (r != Py_True) {                       /* another thread waits */
        Py_DECREF(r);
        return 1;
    }
    Py_DECREF(r);
    /* From here the lock is held: close() from another thread defers the
     * free of the C state to us (see _cffi.Poller). */
    closed = attr_true(poller, S.closed);
    if (closed != 0) {
        rc = closed < 0 ? -1 : 1;
        goto unlock;
    }
    pend = c->p_pending;
    {
        Py_ssize_t np = PyDict_Size(pend), pos = 0;
        PyObject *k, *vv;
        if (np > 0) {
            chg = np <= 16 ? chg_local : PyMem_Malloc((size_t)np * 2 * sizeof(int));
            if (chg == NULL) {
                PyErr_NoMemory();
                goto unlock;
            }
            while (PyDict_Next(pend, &pos, &k, &vv)) {
                long f = PyLong_AsLong(k), e = PyLong_AsLong(vv);
                if ((f == -1 || e == -1) && PyErr_Occurred())
                    goto unlock;
                chg[2 * nchg] = (int)f;
                chg[2 * nchg + 1] = (int)e;
                nchg++;
            }
            /* changes made while we wait (another thread's modify()) go to
             * the emptied dict and are applied by the next wait */
            PyDict_Clear(pend);
        }
    }
    nreg = PyDict_Size(c->reg);
    if (evbuf_reserve(b, nreg > LOCAL_PAIRS ? nreg : LOCAL_PAIRS) < 0)
        goto unlock;
    tmo = ms < 0 ? -1 : (ms > INT_MAX ? INT_MAX : (int)ms);
    if (tmo > 0)
        deadline = monotonic() + tmo / 1000.0;
    for (;;) {
        if (tmo == 0 && c->ran_python) {
            /* Not blocking, and the handlers of the last iteration ran
             * Python code, which hands the GIL over when another thread
             * asks for it (the eval loop's drop request): no release
             * needed for fairness, and it costs ~5% of an iteration. */
            n = g_wait(c->p, chg, nchg, tmo, b->pairs, (size_t)b->cap, &napplied);
        } else {
            Py_BEGIN_ALLOW_THREADS
            n = g_wait(c->p, chg, nchg, tmo, b->pairs, (size_t)b->cap, &napplied);
            Py_END_ALLOW_THREADS
        }
        if (n >= 0)
            break;
        if (nchg) {
            if (napplied < nchg && keep_unapplied(pend, chg, nchg, napplied) < 0)
                goto unlock;
            nchg = 0;
        }
        if (n != -EINTR) {
            errno = -n;
            PyErr_SetFromErrno(PyExc_OSError);
            goto unlock;
        }
        /* EINTR: run the signal handlers (one that raises ends the loop),
         * then retry with the time left */
        if (PyErr_CheckSignals() < 0)
            goto unlock;
        if (tmo > 0) {
            double left = deadline - monotonic();
            if (left <= 0) {
                n = 0;
                break;
            }
            left = ceil(left * 1000.0);
            tmo = left > INT_MAX ? INT_MAX : (int)left;
        }
    }
    b->n = n;
    rc = 0;
unlock:
    if (chg != NULL && chg != chg_local)
        PyMem_Free(chg);
    if (rc < 0)
        PyErr_Fetch(&t, &v, &tb);
    r = PyObject_CallFunctionObjArgs(c->release, NULL);
    if (r == NULL)
        goto failed_after;
    Py_DECREF(r);
    /* close() ran while we waited: it could not free the C state then */
    closed = attr_true(poller, S.closed);
    if (closed < 0)
        goto failed_after;
    if (closed) {
        int freed = attr_true(poller, S.freed);
        if (freed < 0)
            goto failed_after;
        if (!freed) {
            r = call0(poller, S.free_after_close);
            if (r == NULL)
                goto failed_after;
            Py_DECREF(r);
        }
        poller_forget(c);
    }
    if (rc < 0)
        PyErr_Restore(t, v, tb);
    return rc;
failed_after:
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    return -1;
}

/* The stateless poll(2) over st.mask (poll_list() in C), for a busy map
 * whose interests change every iteration (adapt() chose it).  EINTR as in
 * wait_cffi (PEP 475).  0 or -1. */
static int
wait_stateless(loopst *c, long ms, evbuf *b)
{
    Py_ssize_t n = PyDict_Size(c->mask), pos = 0, k = 0;
    /* The wake-up fd only in a wait that can block: one more pollfd costs
     * ~40 ns per poll(2) (measured: a spinning channel 0.675 -> 0.711 us per
     * iteration), and a wait that does not block needs no waking; the fd,
     * left readable, is drained by the next blocking wait. */
    int watch_wake = c->wakefd >= 0 && ms != 0;
    Py_ssize_t need = n + watch_wake;
    int local[2 * LOCAL_PAIRS], *fds = local, tmo, r, rc = -1;
    PyObject *key, *val;
    double deadline = 0.0;

    if (need > LOCAL_PAIRS) {
        if ((size_t)need > (size_t)PY_SSIZE_T_MAX / (2 * sizeof(int)) ||
            !(fds = PyMem_Malloc((size_t)need * 2 * sizeof(int)))) {
            PyErr_NoMemory();
            return -1;
        }
    }
    /* no call into Python while iterating */
    while (k < n && PyDict_Next(c->mask, &pos, &key, &val)) {
        long f = fa_long(key), e = fa_long(val);
        if ((f == -1 || e == -1) && PyErr_Occurred())
            goto out;
        if (f < 0 || f > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "bad fd %ld in the interest set", f);
            goto out;
        }
        fds[2 * k] = (int)f;
        fds[2 * k + 1] = (int)e;
        k++;
    }
    if (watch_wake) {           /* never in the mask: _adopt refuses it */
        fds[2 * k] = c->wakefd;
        fds[2 * k + 1] = FA_POLLIN;
        k++;
    }
    if (evbuf_reserve(b, k > LOCAL_PAIRS ? k : LOCAL_PAIRS) < 0)
        goto out;
    tmo = ms < 0 ? -1 : (ms > INT_MAX ? INT_MAX : (int)ms);
    if (tmo != 0 && c->busy && --c->skip < 0) {
        /* A busy map (the last wait found events) most likely has events
         * now: poll(2) with timeout 0 first.  With a timeout the kernel
         * queues a wait entry on every fd it scans (__pollwait) and arms a
         * timer, and the GIL is released around the call: ~270 ns of a
         * 1-socketpair ping-pong's 3 us iteration (perf, 3.11).  When
         * nothing is ready the real wait follows, one syscall more, and the
         * next tries are skipped for 1, 2, 4 ... 64 waits: a server whose
         * every wait sleeps for its one peer (W1_c1) stops paying for
         * them.  The wake-up fd is not needed in a call that cannot
         * block. */
        if (c->ran_python) {                  /* see wait_cffi */
            r = g_poll(fds, (size_t)(k - watch_wake), 0, b->pairs, (size_t)b->cap);
        } else {
            Py_BEGIN_ALLOW_THREADS
            r = g_poll(fds, (size_t)(k - watch_wake), 0, b->pairs, (size_t)b->cap);
            Py_END_ALLOW_THREADS
        }
        if (r > 0) {
            c->skip = c->backoff = 0;
            b->n = r;
            rc = 0;
            goto out;
        }
        /* nothing ready (or an error, which the wait below reports) */
        c->backoff = c->backoff ? (c->backoff < 64 ? 2 * c->backoff : 64) : 1;
        c->skip = c->backoff;
    }
    if (tmo > 0)
        deadline = monotonic() + tmo / 1000.0;
    for (;;) {
        if (tmo == 0 && c->ran_python) {      /* see wait_cffi */
            r = g_poll(fds, (size_t)k, tmo, b->pairs, (size_t)b->cap);
        } else {
            Py_BEGIN_ALLOW_THREADS
            r = g_poll(fds, (size_t)k, tmo, b->pairs, (size_t)b->cap);
            Py_END_ALLOW_THREADS
        }
        if (r >= 0)
            break;
        if (r != -EINTR) {
            errno = -r;
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
        if (PyErr_CheckSignals() < 0)
            goto out;
        if (tmo > 0) {
            double left = deadline - monotonic();
            if (left <= 0) {
                r = 0;
                break;
            }
            left = ceil(left * 1000.0);
            tmo = left > INT_MAX ? INT_MAX : (int)left;
        }
    }
    b->n = r;
    c->busy = r > 0;
    rc = 0;
out:
    if (fds != local)
        PyMem_Free(fds);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* one iteration */

/* What this iteration's preparation needs (the conditions of
 * _loop._prepare): PREP_NONE: go straight to the wait; PREP_LIGHT:
 * reconcile/consult/flush, done here (reconcile() in Python); PREP_FULL:
 * suspended fds, a full reconcile, adapt() or a pinned mode: the same with
 * _prepare_head() and _prepare_tail() around the consult. */
enum { PREP_NONE, PREP_LIGHT, PREP_FULL };

static int
prep_kind(loopst *c, PyObject *map)
{
    PyObject *fm;
    int t;

    if (PyDict_Size(c->suspended) || c->iters + c->citers + 1 >= c->adapt_at)
        return PREP_FULL;
    /* st.full is set by MapState() and by forget_map() (which tells us
     * through states_changed()); reconcile() clears it */
    if (c->check_full) {
        /* held: its __bool__ may run Python code, which may replace it */
        PyObject *full = st_get(c->st, F_FULL);
        if (full == NULL)
            return -1;
        t = PyObject_IsTrue(full);
        Py_DECREF(full);
        if (t < 0)
            return -1;
        if (t)
            return PREP_FULL;
        c->check_full = 0;
    }
    fm = PyDict_GetItemWithError(g_loopdict, S.force_mode);
    if (fm == NULL ? PyErr_Occurred() != NULL : fm != Py_None)
        return fm == NULL ? -1 : PREP_FULL;
    if (PySet_Size(c->pending) || PyDict_Size(c->owner) != PyDict_Size(map) ||
        PyDict_Size(c->consulted) || PyDict_Size(c->batch) ||
        !PyDict_Size(c->mask))
        return PREP_LIGHT;
    return PREP_NONE;
}

static int
reconcile_if_needed(loopst *c, PyObject *map)
{
    PyObject *r;
    if (!PySet_Size(c->pending) && PyDict_Size(c->owner) == PyDict_Size(map))
        return 0;
    if (!c->own_rec) {
        /* once per loop() call: MapState's reconcile() is StateBase's
         * (bk_reconcile), unless someone replaced it on the class */
        if (!(r = PyObject_GetAttr((PyObject *)Py_TYPE(c->st), S.reconcile)))
            return -1;
        c->own_rec = r == g_rec_descr ? 1 : 2;
        Py_DECREF(r);
    }
    if (c->own_rec == 1)
        return bk_reconcile(c->st);
    r = call0(c->st, S.reconcile);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* One consulted channel's answer as poll bits (MapState.consult). */
static int
ask(PyObject *obj, PyObject *call_r, PyObject *call_w, int extra, long *m)
{
    PyObject *r;
    int t = 1;
    if (call_r == Py_True) {
        if (!(r = call0(obj, S.readable)))
            return -1;
        t = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (t < 0)
            return -1;
    }
    *m = t ? (FA_POLLIN | FA_POLLPRI) : 0;
    t = 1;
    if (call_w == Py_True) {
        if (!(r = call0(obj, S.writable)))
            return -1;
        t = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (t < 0)
            return -1;
    }
    if (t) {
        *m |= extra;                    /* select(): r-or-w go in xlist too */
        if (!(r = PyObject_GetAttr(obj, S.accepting)))
            return -1;
        t = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (t < 0)
            return -1;
        if (!t)
            *m |= FA_POLLOUT;
    }
    return 0;
}

/* Would _loop._check_key() accept fd without a word?  An exact int in
 * [0, INT_MAX]; anything else (a subclass, a negative or huge number) goes
 * through _set_mask(), which raises what it raises. */
static int
first_key_ok(PyObject *fd)
{
    int overflow = 0;
    long v;
    if (!PyLong_CheckExact(fd))
        return 0;
    v = PyLong_AsLongAndOverflow(fd, &overflow);
    return !overflow && v >= 0 && v <= INT_MAX;
}

/* st.poller is None now?  (Read again: a predicate asked earlier in this
 * pass may have run a nested loop on the map, whose adapt() made one.)
 * 1, 0, -1. */
static int
still_stateless(loopst *c)
{
    PyObject *p = st_peek(c->st, F_POLLER);
    if (p == NULL)
        return -1;
    return p == Py_None;
}

/* A consulted answer that changes mask[fd] between two nonzero masks: into
 * the mask, and into the batch for a persistent poller; without one flush()
 * only counts it (*nstateless).  0 or -1. */
static int
set_nonzero_change(loopst *c, PyObject *fd, PyObject *mo, int stateless,
                   Py_ssize_t *nstateless)
{
    if (PyDict_SetItem(c->mask, fd, mo) < 0)
        return -1;
    if (stateless) {
        (*nstateless)++;
        return 0;
    }
    return PyDict_SetItem(c->batch, fd, mo);
}

/* Apply channel obj's consulted answer m (mo: the same as an int object, or
 * NULL) for key fd, if it differs from the mask in force.  A change between
 * two nonzero masks goes into the batch for a persistent poller; without one
 * flush() only counts it (*nstateless), which saves a dict insert: the docs
 * pattern changes two answers per message.  A first registration without a
 * poller is made here too (_set_mask()'s steps, for a key it would accept);
 * any other first registration, and a removal, goes through _set_mask(),
 * which validates the key and applies it at once -- unless an earlier
 * answer in this pass closed the channel.
 * Returns 1 if the answer was a change, 0 if not, -1 on error. */
static int
apply_answer(loopst *c, PyObject *fd, PyObject *obj, PyObject *mo, long m,
             int stateless, Py_ssize_t *nstateless)
{
    PyObject *mv = PyDict_GetItemWithError(c->mask, fd), *r;
    long cur;
    int s;
    if (mv == NULL && PyErr_Occurred())
        return -1;
    cur = mv ? fa_long(mv) : 0;
    if (cur == -1 && PyErr_Occurred())
        return -1;
    if (cur == m)
        return 0;
    if (mo != NULL)
        Py_INCREF(mo);
    else if (!(mo = PyLong_FromLong(m)))
        return -1;
    if (cur && m) {
        s = set_nonzero_change(c, fd, mo, stateless, nstateless);
    } else {
        PyObject *o = PyDict_GetItemWithError(c->owner, fd);
        s = 0;
        if (o == NULL && PyErr_Occurred())
            s = -1;
        else if (o == obj && stateless && m && first_key_ok(fd) &&
                 (s = still_stateless(c)) > 0) {
            /* _set_mask()'s first registration without a poller, here: a
             * consulted channel's first answer, once per connection (a
             * client making 1,000 connections pays a Python call and the
             * key check ~2,500 instructions each otherwise).  The same
             * steps: no batched change survives, the key is valid (an int
             * _check_key() accepts), the mask records it, nchg counts it
             * (flush()'s count, via *nstateless; that also drops st.spoll,
             * which does not have it). */
            s = 0;
            if (PyDict_Size(c->batch) && PyDict_DelItem(c->batch, fd) < 0) {
                if (PyErr_ExceptionMatches(PyExc_KeyError))
                    PyErr_Clear();
                else
                    s = -1;
            }
            if (s == 0 && (s = PyDict_SetItem(c->mask, fd, mo)) == 0)
                (*nstateless)++;
        } else if (s < 0) {
            ;
        } else if (o == obj) {
            r = PyObject_CallMethodObjArgs(c->st, S.set_mask, fd, mo, NULL);
            if (r == NULL)
                s = -1;
            Py_XDECREF(r);
        }
    }
    Py_DECREF(mo);
    return s < 0 ? -1 : 1;
}

/* MapState._consult_vec() after its _ask() call: every consulted channel
 * overrides the same one predicate (st.cvec, set by snapshot()), and one
 * comprehension in Python asks them all -- its Python-to-Python calls cost
 * ~300 instructions a channel where a call from C costs ~800 (pp_docs_100:
 * two per message).  Here the answers are compared with the last pass's
 * (st.cprev: the masks are small ints, so mostly an identity test) and only
 * the changed ones are looked at, as _consult_vec() does. */
static int
consult_vec(loopst *c, int select_mode)
{
    PyObject *vec, *fds, *objs, *masks = NULL, *prev = NULL, *pm = NULL,
        *sm = select_mode ? Py_True : Py_False, *key, *p;
    Py_ssize_t i, n, nstateless = 0;
    int rc = -1, stateless, s, same;

    if (!(vec = st_get(c->st, F_CVEC)))
        return -1;
    if (!PyTuple_Check(vec) || PyTuple_Size(vec) != 3 ||
        !PyTuple_Check(fds = PyTuple_GetItem(vec, 1)) ||
        !PyTuple_Check(objs = PyTuple_GetItem(vec, 2)) ||
        (n = PyTuple_Size(fds)) != PyTuple_Size(objs)) {
        PyErr_SetString(PyExc_TypeError, "bad MapState.cvec");
        goto out;
    }
    /* fds, objs: borrowed from vec, which we hold */
    masks = PyObject_CallFunctionObjArgs(g_ask, PyTuple_GetItem(vec, 0), objs, sm, NULL);
    if (masks == NULL)
        goto out;
    if (!PyList_Check(masks) || PyList_Size(masks) != n) {
        PyErr_SetString(PyExc_TypeError, "_ask() must return a list of masks");
        goto out;
    }
    /* read after the answers: a predicate may have run a nested loop on
     * this map (which may have reset it) */
    if (!(prev = st_get(c->st, F_CPREV)))
        goto out;
    if (PyTuple_Check(prev) && PyTuple_Size(prev) == 2) {
        s = PyObject_IsTrue(PyTuple_GetItem(prev, 0));
        if (s < 0)
            goto out;
        pm = PyTuple_GetItem(prev, 1);
        if (s != select_mode || !PyList_Check(pm) || PyList_Size(pm) != n)
            pm = NULL;              /* borrowed from prev, which we hold */
    }
    if (!(key = PyTuple_Pack(2, sm, masks)))
        goto out;
    s = st_set(c->st, F_CPREV, key);
    Py_DECREF(key);
    if (s < 0)
        goto out;
    if (!(p = st_peek(c->st, F_POLLER)))
        goto out;
    stateless = p == Py_None;
    /* Still the same cvec after the answers (no channel of it dropped by a
     * predicate)?  Then, with pm, the last pass ran over the same channels
     * (a new cvec comes with cprev None, see MapState.snapshot()), each
     * its map's owner, and left mask[fd] == pm[i] where that is nonzero
     * (apply_answer()): a change between two nonzero masks needs no look
     * at the mask (a lookup less per flipped answer, two per message of
     * the docs pattern). */
    if (!(p = st_peek(c->st, F_CVEC)))
        goto out;
    same = pm != NULL && p == vec;      /* compared by identity only */
    for (i = 0; i < n; i++) {
        /* borrowed: masks, fds and objs are held here; the list is ours
         * (and st.cprev's, which no Python code mutates) */
        PyObject *mo = PyList_GetItem(masks, i), *fd;
        long m;
        if (mo == NULL)
            goto out;
        if (pm != NULL) {
            PyObject *q = PyList_GetItem(pm, i);
            if (q == NULL)
                goto out;
            if (q == mo)
                continue;               /* the same small int: unchanged */
        }
        m = fa_long(mo);
        if (m == -1 && PyErr_Occurred())
            goto out;
        if (pm != NULL) {
            /* another object: _ask's masks are exact small ints, so most
             * likely another value; compared as C longs (the generic
             * compare costs ~100 instructions per flipped answer) */
            PyObject *q = PyList_GetItem(pm, i);
            long a;
            if (q == NULL)
                goto out;
            if (PyLong_CheckExact(q)) {
                if ((a = fa_long(q)) == -1 && PyErr_Occurred())
                    goto out;
                if (a == m)
                    continue;
                if (same && a && m) {
                    /* apply_answer()'s change between nonzero masks */
                    fd = PyTuple_GetItem(fds, i);
                    remember_key(fd);
                    if (set_nonzero_change(c, fd, mo, stateless, &nstateless) < 0)
                        goto out;
                    continue;
                }
            } else if ((s = PyObject_RichCompareBool(q, mo, Py_EQ)) != 0) {
                if (s < 0)
                    goto out;
                continue;
            }
        }
        fd = PyTuple_GetItem(fds, i);
        remember_key(fd);
        if (apply_answer(c, fd, PyTuple_GetItem(objs, i), mo, m, stateless,
                         &nstateless) < 0)
            goto out;
    }
    if (nstateless && add_nchg(c->st, nstateless) < 0)     /* flush()'s count of them */
        goto out;
    rc = 0;
out:
    /* (also after an error: the changes made so far are in the mask) */
    if (nstateless && spoll_stale(c->st) < 0)
        rc = -1;
    Py_XDECREF(prev);
    Py_XDECREF(masks);
    Py_DECREF(vec);
    return rc;
}

/* MapState.consult()'s plain loop: ask the channels that override a
 * predicate, in map order, as 3.11 does; record changed answers.  Where
 * they all override the same one (st.cvec) and none is suspended,
 * consult_vec() instead. */
static int
consult(loopst *c, int select_mode)
{
    PyObject *snap, *cprev, *p;
    Py_ssize_t i, n, nstateless = 0;
    int extra = select_mode ? FA_POLLPRI : 0, rc = -1, stateless;

    if (!(snap = st_get(c->st, F_CSNAP)))
        return -1;
    if (snap == Py_None) {
        Py_DECREF(snap);
        if (!(snap = call0(c->st, S.snapshot)))
            return -1;
    }
    if (!PyTuple_Check(snap)) {
        PyErr_SetString(PyExc_TypeError, "MapState.csnap must be a tuple");
        goto out;
    }
    if (!(p = st_peek(c->st, F_CVEC)))
        goto out;
    if (p != Py_None && !PyDict_Size(c->suspended)) {
        rc = consult_vec(c, select_mode);
        goto out;
    }
    /* consult()'s vectorized pass compares with the answers it saw last;
     * the answers asked here make those stale */
    if (!(cprev = st_peek(c->st, F_CPREV)))
        goto out;
    if (cprev != Py_None && st_set(c->st, F_CPREV, Py_None) < 0)
        goto out;
    if (!(p = st_peek(c->st, F_POLLER)))
        goto out;
    stateless = p == Py_None;
    n = PyTuple_Size(snap);
    for (i = 0; i < n; i++) {
        /* borrowed from snap, which we hold */
        PyObject *e = PyTuple_GetItem(snap, i), *fd, *obj;
        long m;
        int s;
        if (e == NULL || !PyTuple_Check(e) || PyTuple_Size(e) != 4) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "bad consulted entry");
            goto out;
        }
        fd = PyTuple_GetItem(e, 0);
        obj = PyTuple_GetItem(e, 1);
        if (ask(obj, PyTuple_GetItem(e, 2), PyTuple_GetItem(e, 3), extra, &m) < 0)
            goto out;
        if (PyDict_Size(c->suspended)) {
            if ((s = PyDict_Contains(c->suspended, fd)) < 0)
                goto out;
            if (s)
                m = 0;
        }
        if ((s = apply_answer(c, fd, obj, NULL, m, stateless, &nstateless)) < 0)
            goto out;
        if (s)
            remember_key(fd);
    }
    if (nstateless && add_nchg(c->st, nstateless) < 0)     /* flush()'s count of them */
        goto out;
    rc = 0;
out:
    /* (also after an error: the changes made so far are in the mask) */
    if (nstateless && spoll_stale(c->st) < 0)
        rc = -1;
    Py_DECREF(snap);
    return rc;
}

/* MapState.flush(): hand the batched interest changes to the poller (its
 * update(): _pending and _reg). */
static int
flush(loopst *c)
{
    Py_ssize_t n = PyDict_Size(c->batch);
    PyObject *poller;
    int rc = 0;
    if (n == 0)
        return 0;
    if (add_nchg(c->st, n) < 0 || !(poller = st_get(c->st, F_POLLER)))
        return -1;
    if (poller != Py_None) {
        if ((poller != c->poller && poller_take(c, poller) < 0) ||
            PyDict_Update(c->p_pending, c->batch) < 0 ||
            PyDict_Update(c->reg, c->batch) < 0)
            rc = -1;
    }
    Py_DECREF(poller);
    if (rc == 0)
        PyDict_Clear(c->batch);
    return rc;
}

static int
timeout_ms(PyObject *timeout, PyObject *mode, long *ms_cache)
{
    PyObject *r;
    double x = 0.0;
    int have = 0;
    if (*ms_cache != LONG_MIN)
        return 0;
    /* _loop._timeout_ms() of the common arguments -- None, a float, a
     * small int -- here: a Python call per loop() call otherwise (~500
     * instructions of a 10,000-instruction `loop(count=1)`).  The same
     * double arithmetic: timeout * 1000, then math.ceil() (select mode)
     * or int() (poll mode; negative: -1).  Anything else -- negative in
     * select mode (its ValueError), non-finite or huge, other types --
     * asks _timeout_ms(). */
    if (timeout == Py_None) {
        *ms_cache = -1;
        return 0;
    }
    if (PyFloat_CheckExact(timeout)) {
        x = PyFloat_AsDouble(timeout);
        have = 1;
    } else if (PyLong_CheckExact(timeout)) {
        int overflow = 0;
        long v = PyLong_AsLongAndOverflow(timeout, &overflow);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (!overflow && v > -1000000000L && v < 1000000000L) {
            x = (double)v;              /* exact, and so is x * 1000 */
            have = 1;
        }
    }
    if (have) {
        x *= 1000.0;
        if (x > -1e15 && x < 1e15) {    /* (false for NaN) */
            if (mode != Py_True) {
                long ms = (long)x;      /* int(): toward zero */
                *ms_cache = ms < 0 ? -1 : ms;
                return 0;
            }
            if (x >= 0) {
                *ms_cache = (long)ceil(x);
                return 0;
            }
        }
    }
    r = PyObject_CallFunctionObjArgs(g_timeout_ms, timeout, mode, NULL);
    if (r == NULL)
        return -1;
    *ms_cache = PyLong_AsLong(r);
    Py_DECREF(r);
    if (*ms_cache == -1 && PyErr_Occurred()) {
        *ms_cache = LONG_MIN;
        return -1;
    }
    return 0;
}

/* _loop._prepare.  -> 0 with *ms set, DONE when the iteration is over
 * (select mode, nothing to wait on: it slept), -1. */
static int
prepare(loopst *c, PyObject *map, PyObject *timeout, int select_mode,
        long *ms_cache, long *ms)
{
    PyObject *mode = select_mode ? Py_True : Py_False, *r;
    int kind = prep_kind(c, map);

    if (kind < 0)
        return -1;
    if (kind == PREP_FULL) {
        /* _prepare(), with its consult here: _prepare_head() (a full
         * reconcile adopts every channel of a new map), the consult and its
         * reconcile as in PREP_LIGHT, _prepare_tail() (flush, adapt).  A
         * client's first iteration asks and registers all its new channels
         * in C then (~130 Python opcodes per connection otherwise). */
        PyObject *rm;
        if (flush_iters(c) < 0)
            return -1;
        rm = PyObject_CallFunctionObjArgs(g_prep_head, c->st, map, NULL);
        if (rm == NULL)
            return -1;
        if (PyDict_Size(c->consulted) &&
            (consult(c, select_mode) < 0 || reconcile_if_needed(c, map) < 0)) {
            Py_DECREF(rm);
            return -1;
        }
        r = PyObject_CallFunctionObjArgs(g_prep_tail, c->st, timeout, mode, rm, NULL);
        Py_DECREF(rm);
        if (r == NULL)
            return -1;
        *ms = PyLong_AsLong(r);
        Py_DECREF(r);
        if ((*ms == -1 && PyErr_Occurred()) || read_iters(c) < 0)
            return -1;
        return *ms == DONE ? DONE : 0;
    }
    if (kind == PREP_LIGHT) {
        if (reconcile_if_needed(c, map) < 0)
            return -1;
        if (PyDict_Size(c->consulted) &&
            (consult(c, select_mode) < 0 || reconcile_if_needed(c, map) < 0))
            return -1;
        if (flush(c) < 0)
            return -1;
    }
    if (timeout_ms(timeout, mode, ms_cache) < 0)
        return -1;
    *ms = *ms_cache;
    if (select_mode && !PyDict_Size(c->mask) && c->svc == NULL) {
        /* 3.11's select() of empty lists: time.sleep(timeout) (with loop
         * services the wait runs instead: it watches the wake-up fd) */
        r = PyObject_CallFunctionObjArgs(g_sleep, timeout, NULL);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return DONE;
    }
    c->citers++;
    return 0;
}

static int
iteration(loopst *c, PyObject *map, PyObject *timeout, int select_mode,
          long *ms_cache)
{
    PyObject *poller;
    evbuf b;
    long ms;
    int rc = -1, fast;

    b.pairs = NULL;
    b.n = 0;
    fast = prepare(c, map, timeout, select_mode, ms_cache, &ms);
    if (fast == DONE)
        return 0;
    if (fast < 0)
        return -1;
    if (c->svc != NULL) {
        /* calls or ready channels waiting: don't block; the next timer
         * shortens the wait, rounded up (Services.timeout_ms, in C: no
         * Python call in an iteration where nothing is due) */
        double due = 0.0;
        int k = svc_pending(c, &due);
        if (k < 0)
            return -1;
        if (k == 1) {
            ms = 0;
        } else if (k == 2) {
            double now = py_monotonic(), left;
            if (now < 0 && PyErr_Occurred())
                return -1;
            left = ceil((due - now) * 1000.0);
            if (left < 0)
                left = 0;
            if (left > INT_MAX)
                left = INT_MAX;
            if (ms < 0 || (long)left < ms)
                ms = (long)left;
        }
    }
    poller = st_get(c->st, F_POLLER);
    if (poller == NULL)
        return -1;
    if (poller == Py_None) {
        if (wait_stateless(c, ms, &b) < 0)
            goto out;
    } else {
        int w = wait_cffi(c, poller, ms, &b);
        if (w < 0)
            goto out;
        if (w > 0) {
            /* busy or closed: Poller.wait() says why (or waits itself) */
            PyObject *msv = PyLong_FromLong(ms), *lst;
            evbuf_release(&b);
            lst = msv ? PyObject_CallMethodObjArgs(poller, S.wait, msv, NULL) : NULL;
            Py_XDECREF(msv);
            if (lst == NULL)
                goto out;
            fast = evbuf_from_list(&b, lst);
            Py_DECREF(lst);
            if (fast < 0)
                goto out;
        }
    }
    c->ran_python = b.n > 0;
    c->cev += (long)b.n;
    if (b.n > 0) {
        if ((select_mode ? dispatch_select(c, map, &b) : dispatch_poll(c, map, &b)) < 0)
            goto out;
    }
    if (c->woke) {
        /* the wake-up fd was reported: empty it (st._woken()) */
        PyObject *r = call0(c->st, S.woken);
        c->woke = 0;
        if (r == NULL)
            goto out;
        Py_DECREF(r);
        /* woken by a thread that just gave the map its Services? */
        if (c->svc == NULL && read_svc(c) < 0)
            goto out;
    }
    if (c->svc != NULL) {
        /* ready-now channels, thread-safe calls, due timers (_svc_run),
         * when any of them is waiting */
        double due = 0.0;
        int k = svc_pending(c, &due);
        if (k < 0)
            goto out;
        if (k == 2) {
            double now = py_monotonic();
            if (now < 0 && PyErr_Occurred())
                goto out;
            k = now >= due;
        }
        if (k) {
            PyObject *r = PyObject_CallFunctionObjArgs(
                g_svc_run, c->st, map, select_mode ? Py_True : Py_False, NULL);
            if (r == NULL)
                goto out;
            Py_DECREF(r);
            c->ran_python = 1;
        }
    }
    rc = 0;
out:
    Py_DECREF(poller);
    evbuf_release(&b);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* module functions */

PyDoc_STRVAR(run_doc,
"run(map, timeout, select_mode, count) -> None\n\n"
"asyncore.loop()'s iterations over a dict map: `count` None (until the map\n"
"is empty) or an int.  Each iteration is _loop.poll_once(map, timeout,\n"
"select_mode); those that the C path cannot own (the map's state is in use\n"
"by an outer frame or another thread, or was dropped) call it in Python.");

static PyObject *
cloop_run(PyObject *self, PyObject *args)
{
    PyObject *map, *timeout, *count, *me = NULL, *mapid = NULL;
    int select_mode, failed = 0;
    long long left = -1;
    long ms_cache = LONG_MIN;
    loopst c;
    (void)self;

    memset(&c, 0, sizeof(c));
    /* run(map, timeout, select_mode, count) as asyncore.loop() calls it,
     * unpacked here (PyArg_ParseTuple costs ~500 instructions, 5% of a
     * `loop(count=1)`); anything else gets its checks and messages */
    if (PyTuple_Size(args) == 4 && PyDict_Check(PyTuple_GetItem(args, 0)) &&
        (PyTuple_GetItem(args, 2) == Py_True || PyTuple_GetItem(args, 2) == Py_False)) {
        map = PyTuple_GetItem(args, 0);
        timeout = PyTuple_GetItem(args, 1);
        select_mode = PyTuple_GetItem(args, 2) == Py_True;
        count = PyTuple_GetItem(args, 3);
    } else if (!PyArg_ParseTuple(args, "O!OpO:run", &PyDict_Type, &map, &timeout,
                                 &select_mode, &count)) {
        return NULL;
    }
    if (g_wait == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "fastasyncore._cloop is not configured");
        return NULL;
    }
    if (count != Py_None) {
        int overflow;
        left = PyLong_AsLongLongAndOverflow(count, &overflow);
        if (left == -1 && PyErr_Occurred())
            return NULL;
        if (overflow > 0)
            left = -1;    /* > 2**63 iterations: as good as `until empty` */
        else if (overflow < 0 || left <= 0)
            return none_ref();
    }
    me = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    mapid = PyLong_FromVoidPtr(map);          /* id(map): _loop._states' key */
    if (me == NULL || mapid == NULL)
        goto fail;
    while (PyDict_Size(map) > 0 && left != 0) {
        PyObject *st;
        if (left > 0)
            left--;
        /* handlers check signals as they run; an iteration without events
         * must too (Ctrl-C in loop(timeout=0)) */
        if (PyErr_CheckSignals() < 0)
            goto fail;
        if (c.st != NULL && c.gen == g_states_gen) {
            st = c.st;            /* nothing dropped states since we took it */
        } else {
            st = PyDict_GetItemWithError(g_states, mapid);
            if (st != NULL && st == c.st) {
                c.gen = g_states_gen;
                c.check_full = 1;  /* forget_map() may have set st.full */
                if (read_svc(&c) < 0)   /* attach_services() */
                    goto fail;
            }
        }
        if (st == NULL) {
            /* a map's first iteration: _state() makes its MapState */
            PyObject *r;
            if (PyErr_Occurred())
                goto fail;
            r = PyObject_CallFunctionObjArgs(g_state, map, NULL);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
            st = PyDict_GetItemWithError(g_states, mapid);
            if (st == NULL && PyErr_Occurred())
                goto fail;
        }
        if (st != c.st) {
            /* first iteration, or the state was dropped (fork, forget) */
            if (loopst_release(&c, map) < 0)
                goto fail;
            if (st != NULL) {
                PyObject *stmap, *stth;
                int own;
                if (!PyObject_TypeCheck(st, (PyTypeObject *)g_StateBase)) {
                    PyErr_SetString(PyExc_TypeError,
                                    "the map state is not a _cloop.StateBase");
                    goto fail;
                }
                Py_INCREF(st);
                stmap = st_peek(st, F_MAP);
                stth = stmap ? st_peek(st, F_THREAD) : NULL;
                own = stmap == map && stth == Py_None;
                if (stth == NULL || (own && loopst_take(&c, st, me) < 0)) {
                    Py_DECREF(st);
                    goto fail;
                }
                Py_DECREF(st);
            }
        }
        if (c.st != NULL) {
            if (iteration(&c, map, timeout, select_mode, &ms_cache) < 0)
                goto fail;
        } else {
            /* the state is in use by an outer frame (a handler calling
             * loop() on its own map) or another thread: the Python path
             * runs the iteration (and raises the two-threads error) */
            PyObject *r = PyObject_CallFunctionObjArgs(
                g_poll_once, map, timeout, select_mode ? Py_True : Py_False, NULL);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
        }
    }
    goto done;
fail:
    failed = 1;
done:
    if (loopst_release(&c, map) < 0)
        failed = 1;
    Py_XDECREF(me);
    Py_XDECREF(mapid);
    if (failed)
        return NULL;
    return none_ref();
}

PyDoc_STRVAR(configure_doc,
"configure(loop_module, wait_addr, poll_addr) -> None\n\n"
"Bind to _loop.py's state and to the cffi core's fa_poller_wait and\n"
"fa_poll_once (their addresses as ints).");

static int
set_ref(PyObject **slot, PyObject *v)
{
    PyObject *old = *slot;
    if (v == NULL)
        return -1;
    *slot = v;
    Py_XDECREF(old);
    return 0;
}

static PyObject *
getattr_s(PyObject *o, const char *name)
{
    return PyObject_GetAttrString(o, name);
}

static PyObject *
cloop_configure(PyObject *self, PyObject *args)
{
    PyObject *mod, *addr, *paddr;
    void *w, *pl;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO:configure", &mod, &addr, &paddr))
        return NULL;
    w = PyLong_AsVoidPtr(addr);
    pl = w ? PyLong_AsVoidPtr(paddr) : NULL;
    if (w == NULL || pl == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "the core's addresses must not be 0");
        return NULL;
    }
    if (set_ref(&g_ExitNow, getattr_s(mod, "ExitNow")) < 0 ||
        set_ref(&g_disconnected, getattr_s(mod, "DISCONNECTED")) < 0 ||
        set_ref(&g_states, getattr_s(mod, "_states")) < 0 ||
        set_ref(&g_prep_head, getattr_s(mod, "_prepare_head")) < 0 ||
        set_ref(&g_prep_tail, getattr_s(mod, "_prepare_tail")) < 0 ||
        set_ref(&g_poll_once, getattr_s(mod, "poll_once")) < 0 ||
        set_ref(&g_timeout_ms, getattr_s(mod, "_timeout_ms")) < 0 ||
        set_ref(&g_forget_map, getattr_s(mod, "forget_map")) < 0 ||
        set_ref(&g_loopdict, getattr_s(mod, "__dict__")) < 0 ||
        set_ref(&g_sleep, getattr_s(mod, "_sleep")) < 0 ||
        set_ref(&g_route_fault, getattr_s(mod, "_route_fault")) < 0 ||
        set_ref(&g_svc_run, getattr_s(mod, "_svc_run")) < 0 ||
        set_ref(&g_ask, getattr_s(mod, "_ask")) < 0 ||
        set_ref(&g_monotonic, getattr_s(mod, "_monotonic")) < 0 ||
        set_ref(&g_state, getattr_s(mod, "_state")) < 0 ||
        set_ref(&g_cmasks, getattr_s(mod, "C_MASKS")) < 0)
        return NULL;
    if (!PyDict_Check(g_states) || !PyDict_Check(g_loopdict)) {
        PyErr_SetString(PyExc_TypeError, "_loop._states must be a dict");
        return NULL;
    }
    g_wait = (fa_wait_fn)w;
    g_poll = (fa_poll_fn)pl;
    return none_ref();
}

static PyObject *
cloop_states_changed(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    g_states_gen++;
    tcache_clear();
    return none_ref();
}

static PyObject *
cloop_consulted_changed(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    g_cgen++;
    return none_ref();
}

static PyObject *
cloop_timeout_ms(PyObject *self, PyObject *args)
{
    PyObject *timeout, *mode;
    long ms = LONG_MIN;
    int t;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO:timeout_ms", &timeout, &mode))
        return NULL;
    if (g_timeout_ms == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "fastasyncore._cloop is not configured");
        return NULL;
    }
    if ((t = PyObject_IsTrue(mode)) < 0 ||
        timeout_ms(timeout, t ? Py_True : Py_False, &ms) < 0)
        return NULL;
    return PyLong_FromLong(ms);
}

static PyObject *
cloop_bookkeeping(PyObject *self, PyObject *ns)
{
    static const char *const names[] = {
        "_kind_cache", "_classify", "_check_key", "_keys", "_remember_key",
        "INHERITED", "_PyBookkeeping", "_states", "_wakers", "_wake", "forget_map",
        "_map_order", "_PyBookkeeping"
    };
    /* of these, the attribute used (the reference methods) */
    static const char *const attrs[] = {
        NULL, NULL, NULL, NULL, NULL, NULL, "_set_mask", NULL, NULL, NULL, NULL,
        NULL, "reconcile"
    };
    PyObject **slots[] = {
        &BK.kind_cache, &BK.classify, &BK.check_key, &BK.keys, &BK.remember_key,
        &BK.inherited, &BK.py_set_mask, &BK.states, &BK.wakers, &BK.wake,
        &BK.forget_map, &BK.map_order, &BK.py_reconcile
    };
    PyObject *v[13];
    int i, n = 13;
    (void)self;
    if (!PyDict_Check(ns)) {
        PyErr_SetString(PyExc_TypeError, "bookkeeping() takes _loop's globals()");
        return NULL;
    }
    for (i = 0; i < n; i++) {
        PyObject *o = PyDict_GetItemString(ns, names[i]);
        if (o == NULL) {
            PyErr_Format(PyExc_KeyError, "_loop has no %s", names[i]);
            goto fail;
        }
        v[i] = attrs[i] ? PyObject_GetAttrString(o, attrs[i]) : (Py_INCREF(o), o);
        if (v[i] == NULL)
            goto fail;
    }
    if (!PyDict_Check(v[0]) || !PyList_Check(v[3]) || !PyDict_Check(v[7]) ||
        !PyDict_Check(v[8])) {
        PyErr_SetString(PyExc_TypeError, "bookkeeping(): _kind_cache, _states and "
                        "_wakers must be dicts, _keys a list");
        goto fail;
    }
    for (i = 0; i < n; i++)
        set_ref(slots[i], v[i]);
    return none_ref();
fail:
    while (--i >= 0)
        Py_DECREF(v[i]);
    return NULL;
}

static PyMethodDef cloop_methods[] = {
    {"bookkeeping", cloop_bookkeeping, METH_O,
     "bookkeeping(_loop's globals()) -> None\n\nWhat StateBase's "
     "_set_mask/_drop/_adopt and note_added/note_removed use of _loop "
     "(which calls this at import)."},
    {"note_added", cloop_note_added, METH_VARARGS,
     "note_added(map, fd) -> None\n\n_loop.note_added, in C."},
    {"note_removed", cloop_note_removed, METH_VARARGS,
     "note_removed(map, fd) -> None\n\n_loop.note_removed, in C."},
    {"timeout_ms", cloop_timeout_ms, METH_VARARGS,
     "timeout_ms(timeout, select_mode) -> int\n\nThe wait in ms run() derives "
     "from loop()'s timeout (tests: the C arithmetic against _loop._timeout_ms)."},
    {"consulted_changed", cloop_consulted_changed, METH_NOARGS,
     "consulted_changed() -> None\n\nA MapState.consulted changed: a channel "
     "dispatch found consulted may not be any more."},
    {"states_changed", cloop_states_changed, METH_NOARGS,
     "states_changed() -> None\n\nMapStates were dropped (fork, forget_all) or "
     "classes registered: run() looks its state up again."},
    {"run", cloop_run, METH_VARARGS, run_doc},
    {"configure", cloop_configure, METH_VARARGS, configure_doc},
    {"chan_methods", fa_chan_methods, METH_VARARGS,
     "chan_methods(...) -> (dispatcher.send, dispatcher.recv, "
     "dispatcher_with_send.send) in C (csrc/fa_chanio.c)"},
    {"chat_methods", fa_chat_methods, METH_VARARGS,
     "chat_methods(...) -> (async_chat.push, async_chat.handle_read) "
     "in C (csrc/fa_chanio.c)"},
    {"chan_io", fa_chan_io, METH_O,
     "chan_io(on) -> None\n\nThe C channel methods' fast paths on (cffi "
     "backend) or off (they call the Python methods)."},
    {"sock_head", fa_sock_head, METH_VARARGS,
     "sock_head([on]) -> bool\n\nWhether the C channel methods read a "
     "socket's fd and timeout from its C struct (where chan_methods() found "
     "it matches this interpreter's) rather than calling fileno() and "
     "gettimeout(); with an argument, turn that on (if it matched) or off."},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef cloop_module = {
    PyModuleDef_HEAD_INIT, "fastasyncore._cloop",
    "fastasyncore's loop iterations in C (see csrc/fa_cloop.c).", -1,
    cloop_methods, NULL, NULL, NULL, NULL
};

#define INTERN(field, str) \
    if ((S.field = PyUnicode_InternFromString(str)) == NULL) return NULL

PyMODINIT_FUNC
PyInit__cloop(void)
{
    INTERN(handle_read_event, "handle_read_event");
    INTERN(handle_write_event, "handle_write_event");
    INTERN(handle_expt_event, "handle_expt_event");
    INTERN(handle_close, "handle_close");
    INTERN(woken, "_woken");
    INTERN(calls, "calls");
    INTERN(ready, "ready");
    INTERN(due, "due");
    INTERN(handle_error, "handle_error");
    INTERN(fa_mask, "_fa_mask");
    INTERN(fa_regmask, "_fa_regmask");
    INTERN(errno_, "errno");
    INTERN(lock, "_lock");
    INTERN(closed, "closed");
    INTERN(p_pending, "_pending");
    INTERN(reg, "_reg");
    INTERN(addr, "addr");
    INTERN(freed, "_freed");
    INTERN(free_after_close, "_free_after_close");
    INTERN(acquire, "acquire");
    INTERN(release, "release");
    INTERN(force_mode, "_force_mode");
    INTERN(wait, "wait");
    INTERN(snapshot, "snapshot");
    INTERN(reconcile, "reconcile");
    INTERN(set_mask, "_set_mask");
    INTERN(accepting, "accepting");
    INTERN(readable, "readable");
    INTERN(writable, "writable");
    INTERN(fa_out, "_fa_out");
    INTERN(connected, "connected");
    INTERN(nbytes, "nbytes");
    INTERN(producer_fifo, "producer_fifo");
    INTERN(register_, "register");
    INTERN(unregister, "unregister");
    INTERN(modify, "modify");
    INTERN(freeze, "_freeze");
    INTERN(socket, "socket");
    INTERN(fileno, "fileno");
    INTERN(reconcile_all, "_reconcile_all");
    INTERN(direct_lost, "_direct_lost");
    INTERN(route_faults, "_route_faults");
    if (small_ints_init() < 0)
        return NULL;
    {
        PyObject *m = PyModule_Create(&cloop_module);
        if (m == NULL)
            return NULL;
        if (!(g_StateBase = stbase_type_new())) {
            Py_DECREF(m);
            return NULL;
        }
        if (!(g_rec_descr = PyObject_GetAttrString(g_StateBase, "reconcile"))) {
            Py_DECREF(m);
            return NULL;
        }
        Py_INCREF(g_StateBase);             /* ours, beside the module's */
        if (PyModule_AddObject(m, "StateBase", g_StateBase) < 0) {
            Py_DECREF(g_StateBase);
            Py_DECREF(m);
            return NULL;
        }
        return m;
    }
}
