/*
 * fa_chanio.c: dispatcher.send(), dispatcher.recv() and
 * dispatcher_with_send.send() in C (part of the module fastasyncore._cloop,
 * beside fa_cloop.c; asyncore.py installs them on the cffi backend).
 *
 * Why: on a busy map the loop is no longer where a message's user-space CPU
 * goes; the library's own per-call Python is.  Measured on 3.11 (64-byte
 * messages over a socketpair, CPU beyond the bare socket call):
 * dispatcher_with_send.send 560 ns (3.11's own: 414), dispatcher.send 145
 * ns (3.11's: 79), dispatcher.recv 85 ns plus an 8 KiB malloc/realloc.
 * The kernel's share of such a message is fixed (about 58%), so these
 * frames decide the ratio to 3.11.
 *
 * Exactness rules (the Python methods stay in asyncore.py, unchanged, as
 * the reference and the pure backend's code):
 *   - the fast path runs only where its outcome is "data moved": the
 *     socket is exactly socket.socket with timeout 0.0 and an open fd, the
 *     data is bytes (or bytearray for dispatcher.send), the arguments are
 *     positional, and for dispatcher_with_send.send: debug off, an empty
 *     queue, initiate_send and dispatcher.send not replaced.  Anything else
 *     calls the Python method with the same arguments (nothing observable
 *     happened before: only attribute reads);
 *   - every other outcome of the syscall (EOF, an error other than
 *     EWOULDBLOCK on send) goes to a Python function of asyncore.py whose
 *     code is named like the method ("recv", "send"): it calls
 *     handle_close() or raises the OSError socket.recv/send would have
 *     raised, so handle_error()'s compact_traceback() keeps its shape;
 *   - the GIL is held across the syscall: the socket is non-blocking
 *     (timeout 0.0), so the call returns at once, and the receive buffer
 *     below is guarded by the GIL (free-threaded builds take the Python
 *     path);
 *   - EINTR: PyErr_CheckSignals() (a handler's exception propagates), then
 *     everything is looked up again -- a signal handler may have closed or
 *     replaced the socket, so the old fd number must not be reused (PEP
 *     475 retries, as socket.send/recv do).
 *
 * Limited API 3.9.  METH_FASTCALL is not declared there before 3.10, but
 * its value and calling convention are the same on every 3.7+ runtime
 * (it became part of the stable ABI in 3.10 unchanged).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/types.h>
#include <sys/socket.h>

#include "fa_chanio.h"
#include "fa_pyutil.h"

#ifndef METH_FASTCALL
#define METH_FASTCALL 0x0080
#endif

/* recv(n), n up to RBUF (larger n: the Python method).  socket.recv
 * mallocs n bytes, receives, then shrinks the bytes (_PyBytes_Resize, not in
 * the limited API).  For the usual recv(8192) or recv(65536) of a short
 * message that malloc/realloc/free of 8-64 KiB costs more than everything
 * else in the call: d.recv(65536) of 64 bytes was 300 ns dearer than
 * receiving into one GIL-guarded buffer and copying out the exact size.
 * For bulk data the copy is the dearer part (64 KiB: +9% of the recv), and
 * asking the kernel first (FIONREAD) cost as much as it saved.  So the fd's
 * last read decides: after a read of more than RSMALL bytes the next recv
 * with n > RSMALL calls socket.recv (its malloc-and-shrink path, without
 * the Python frame); after a shorter one, the buffer.  A wrong guess costs
 * one copy or one malloc.  Either way one recv(2) of n bytes, as
 * socket.recv makes. */
#define RSMALL 8192
#define RBUF 65536
#define HINTS 65536                 /* fds with a bulk hint (others: none) */

static struct {
    PyObject *socket, *fileno, *gettimeout, *debug, *fa_out, *nbytes,
        *initiate_send, *send, *recv, *func, *self_, *obs, *fifo,
        *connected, *ibs, *fa_cur, *max_in, *get_terminator,
        *terminator, *collect, *found, *ac_in_buffer;
} N;

static int g_on;                    /* the cffi backend is active */
static int g_flags;                 /* MSG_NOSIGNAL where it exists */
static PyObject *g_sock_type;       /* socket.socket */
static PyObject *g_method_type;     /* types.MethodType */
static PyObject *g_py_send, *g_py_recv, *g_py_wsend;   /* the Python methods */
static PyObject *g_send_tail, *g_recv_tail, *g_wsend_rest;
static PyObject *g_dispatcher, *g_dws_initiate;
static PyObject *g_d_send;          /* our dispatcher.send descriptor */
static PyObject *g_py_push, *g_ac_initiate, *g_push_rest;   /* async_chat */
static PyObject *g_py_read, *g_get_term, *g_read_error;
#ifndef Py_GIL_DISABLED
static char g_rbuf[RBUF];     /* GIL-guarded (see RSMALL) */
static unsigned char g_bulk[HINTS / 8];   /* fd's last read > RSMALL */

static int
bulk_get(int fd)
{
    return fd < HINTS && (g_bulk[fd >> 3] >> (fd & 7)) & 1;
}

static void
bulk_set(int fd, int on)
{
    if (fd < HINTS) {
        if (on)
            g_bulk[fd >> 3] |= (unsigned char)(1u << (fd & 7));
        else
            g_bulk[fd >> 3] &= (unsigned char)~(1u << (fd & 7));
    }
}
#endif

/* The Python method, called as the C one was. */
static PyObject *
fallback(PyObject *func, PyObject *self, PyObject *const *args,
         Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t i, nkw = kwnames ? PyTuple_Size(kwnames) : 0;
    PyObject *t, *kw = NULL, *r = NULL;

    if (nkw < 0 || !(t = PyTuple_New(nargs + 1)))
        return NULL;
    Py_INCREF(self);
    PyTuple_SetItem(t, 0, self);                   /* steals */
    for (i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SetItem(t, i + 1, args[i]);
    }
    if (nkw) {
        if (!(kw = PyDict_New()))
            goto out;
        for (i = 0; i < nkw; i++)
            if (PyDict_SetItem(kw, PyTuple_GetItem(kwnames, i), args[nargs + i]) < 0)
                goto out;
    }
    r = PyObject_Call(func, t, kw);
out:
    Py_DECREF(t);
    Py_XDECREF(kw);
    return r;
}

/* _socket.socket's own fileno() and gettimeout(), taken from socket.socket
 * once (chan_methods()).  Called unbound on an exact socket.socket: what
 * sock.fileno() and sock.timeout give (the type has no instance dict, and
 * the `timeout` getter is gettimeout()'s C function), without the by-name
 * lookups of a method call.  Being the C type's own, they read the fd and
 * timeout that socket.send/recv themselves use, even where a test replaced
 * socket.socket.fileno.  Used where sockhead (below) does not fit. */
static PyObject *g_fileno_m, *g_gettimeout_m;

/* The head of CPython's socket object (PySocketSockObject in
 * Modules/socketmodule.h; the same from 3.9 to 3.13): what socket.send and
 * socket.recv read, the fd and the timeout (nanoseconds; 0 when
 * non-blocking, -1 s when blocking).  Reading them costs two loads; the two
 * unbound method calls above cost ~700 instructions per send (a float and
 * often an int made and freed: 4% of a small request's user-space work,
 * callgrind, 3.11).  It is no API, so chan_methods() checks it against the
 * methods on sockets it makes (fd, family, type, three timeouts, closed)
 * and uses it only where every value matched (g_head): another layout, a
 * free-threaded build, a socket that cannot be made -- the method calls,
 * as before. */
typedef struct {
    PyObject_HEAD
    int sock_fd;                    /* SOCKET_T: an int on POSIX */
    int sock_family, sock_type, sock_proto;
    PyObject *(*errorhandler)(void);
    long long sock_timeout;         /* _PyTime_t: ns, -1 s when blocking */
} sockhead;

static int g_head_ok;               /* the check passed */
static int g_head;                  /* ... and it is in use (sock_head()) */

#define HEAD(sock) ((const sockhead *)(sock))

/* sock.timeout == 0.0?  1, 0 (no error set: errors count as "no"). */
static int
timeout_zero(PyObject *sock)
{
    PyObject *v;
    int ok;
    if (g_head)
        return HEAD(sock)->sock_timeout == 0;
    if (!(v = PyObject_CallFunctionObjArgs(g_gettimeout_m, sock, NULL))) {
        PyErr_Clear();
        return 0;
    }
    ok = PyFloat_Check(v) && PyFloat_AsDouble(v) == 0.0;
    Py_DECREF(v);
    return ok;
}

/* sock.fileno() as a C long; -2 with an error set. */
static long
sock_fileno(PyObject *sock)
{
    PyObject *v;
    long fd;
    if (g_head)
        return HEAD(sock)->sock_fd;
    if (!(v = PyObject_CallFunctionObjArgs(g_fileno_m, sock, NULL)))
        return -2;
    fd = PyLong_AsLong(v);
    Py_DECREF(v);
    if (fd == -1 && PyErr_Occurred())
        return -2;
    return fd;
}

/* Does sockhead read what the methods say on sock?  (see sockhead) */
static int
head_matches(PyObject *sock, int type)
{
    static const struct { double t; long long ns; } tmo[] = {
        {1.5, 1500000000LL}, {-1.0, -1000000000LL}, {0.0, 0LL}};
    PyObject *r;
    size_t i;
    long fd;
    g_head = 0;
    if ((fd = sock_fileno(sock)) < 0 || HEAD(sock)->sock_fd != fd ||
            HEAD(sock)->sock_family != AF_INET || HEAD(sock)->sock_type != type)
        return 0;
    for (i = 0; i < sizeof(tmo) / sizeof(tmo[0]); i++) {
        r = tmo[i].t < 0 ? PyObject_CallMethod(sock, "settimeout", "O", Py_None)
                         : PyObject_CallMethod(sock, "settimeout", "d", tmo[i].t);
        if (r == NULL)
            return 0;
        Py_DECREF(r);
        if (HEAD(sock)->sock_timeout != tmo[i].ns || timeout_zero(sock) != (tmo[i].ns == 0))
            return 0;
    }
    return 1;
}

static int
check_head(PyObject *sock_type)
{
    PyObject *a = NULL, *b = NULL, *bs, *r;
    long size;
    int ok = 0;
    if (!(bs = PyObject_GetAttrString(sock_type, "__basicsize__")))
        goto out;
    size = PyLong_AsLong(bs);
    Py_DECREF(bs);
    if (size < (long)sizeof(sockhead))
        goto out;
    a = PyObject_CallFunction(sock_type, "ii", AF_INET, SOCK_STREAM);
    b = a ? PyObject_CallFunction(sock_type, "ii", AF_INET, SOCK_DGRAM) : NULL;
    if (b == NULL || Py_TYPE(a) != (PyTypeObject *)sock_type)
        goto out;
    ok = head_matches(a, SOCK_STREAM) && head_matches(b, SOCK_DGRAM);
    if (ok) {
        /* closed: the fd reads -1, as fileno() says */
        r = PyObject_CallMethod(b, "close", NULL);
        Py_XDECREF(r);
        ok = r != NULL && HEAD(b)->sock_fd == -1 && sock_fileno(b) == -1;
    }
out:
    if (a && (r = PyObject_CallMethod(a, "close", NULL)))
        Py_DECREF(r);
    if (b && (r = PyObject_CallMethod(b, "close", NULL)))
        Py_DECREF(r);
    Py_XDECREF(a);
    Py_XDECREF(b);
    PyErr_Clear();
    return ok;
}

/* The fd of self.socket when it is a plain socket.socket (with timeout
 * 0.0 unless any_timeout: the caller then makes a call that cannot block
 * and looks at the timeout only when the kernel says it would have to
 * wait); *sockp holds the socket (the caller releases it after the
 * syscall).  -1: not eligible (no error set: any lookup error is left for
 * the Python method to raise from its own frame). */
static int
plain_fd(PyObject *self, PyObject **sockp, int any_timeout)
{
    PyObject *sock;
    long fd;

    if (!(sock = PyObject_GetAttr(self, N.socket))) {
        PyErr_Clear();
        return -1;
    }
    if ((PyObject *)Py_TYPE(sock) != g_sock_type)
        goto no;
    /* timeout 0.0: the fd is O_NONBLOCK, socket.send/recv make one call */
    if (!any_timeout && !timeout_zero(sock))
        goto no;
    fd = sock_fileno(sock);
    if (fd < 0 || fd > INT_MAX) {            /* closed: -1 (socket.recv: EBADF) */
        if (fd == -2)
            PyErr_Clear();
        goto no;
    }
    *sockp = sock;
    return (int)fd;
no:
    Py_DECREF(sock);
    return -1;
}

/* asyncore._recv_tail / _send_tail (self, errno): the Python end of an
 * outcome other than data moved. */
static PyObject *
tail(PyObject *func, PyObject *self, int err)
{
    PyObject *e = PyLong_FromLong(err), *r;
    if (e == NULL)
        return NULL;
    r = PyObject_CallFunctionObjArgs(func, self, e, NULL);
    Py_DECREF(e);
    return r;
}

/* One send(2) of data[:cap] on self's plain socket.
 * 1: sent, *out = bytes sent (0 for EWOULDBLOCK, as dispatcher.send);
 * 2: failed, *out = errno (for the tail); 0: not eligible; -1: error set. */
static int
fast_send(PyObject *self, PyObject *data, Py_ssize_t cap, Py_ssize_t *out)
{
    PyObject *sock;
    char *p;
    Py_ssize_t len;
    ssize_t r;
    int fd, err;

again:
    if (PyBytes_CheckExact(data)) {
        p = PyBytes_AsString(data);
        len = PyBytes_Size(data);
    } else if (PyByteArray_CheckExact(data)) {
        p = PyByteArray_AsString(data);
        len = PyByteArray_Size(data);
    } else {
        return 0;
    }
    if (p == NULL || len < 0) {
        PyErr_Clear();
        return 0;
    }
    if (len > cap)
        len = cap;
    if ((fd = plain_fd(self, &sock, 0)) < 0)
        return 0;
    /* MSG_NOSIGNAL: a reset peer gives EPIPE, never SIGPIPE (as the Python
     * method passes it to socket.send) */
    r = send(fd, p, (size_t)len, g_flags);
    err = errno;
    Py_DECREF(sock);
    if (r >= 0) {
        *out = (Py_ssize_t)r;
        return 1;
    }
    if (err == EINTR) {
        if (PyErr_CheckSignals() < 0)
            return -1;
        goto again;
    }
    if (err == EWOULDBLOCK) {        /* 3.11: `if why.errno == EWOULDBLOCK` */
        *out = 0;
        return 1;
    }
    *out = err;
    return 2;
}

/* dispatcher.send(self, data) */
static PyObject *
d_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t n;
    int s;

    if (!g_on || nargs != 1 || kwnames != NULL)
        return fallback(g_py_send, self, args, nargs, kwnames);
    s = fast_send(self, args[0], PY_SSIZE_T_MAX, &n);
    if (s == 1)
        return PyLong_FromSsize_t(n);
    if (s == 2)
        return tail(g_send_tail, self, (int)n);
    if (s < 0)
        return NULL;
    return fallback(g_py_send, self, args, nargs, kwnames);
}

/* socket.recv raised: an OSError goes to the tail with its errno (which
 * raises its equal from a frame named recv, or closes); others propagate. */
static PyObject *
sock_error(PyObject *self)
{
    PyObject *t, *v, *tb, *e;
    long err;
    if (!PyErr_ExceptionMatches(PyExc_OSError))
        return NULL;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    e = v ? PyObject_GetAttrString(v, "errno") : NULL;
    err = (e && PyLong_Check(e)) ? PyLong_AsLong(e) : -1;
    Py_XDECREF(e);
    if (err <= 0 || err > INT_MAX) {
        PyErr_Clear();
        PyErr_Restore(t, v, tb);
        return NULL;
    }
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    return tail(g_recv_tail, self, (int)err);
}

/* dispatcher.recv(self, buffer_size) */
static PyObject *
d_recv(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
#ifndef Py_GIL_DISABLED
    PyObject *sock;
    Py_ssize_t n;
    ssize_t r;
    int fd, err;

    if (!g_on || nargs != 1 || kwnames != NULL || !PyLong_CheckExact(args[0]))
        return fallback(g_py_recv, self, args, nargs, kwnames);
    n = PyLong_AsSsize_t(args[0]);
    /* n 0: socket.recv returns b'' without a syscall (recv(2) would say
     * EWOULDBLOCK on an empty socket) */
    if (n < 1 || n > RBUF) {
        PyErr_Clear();
        return fallback(g_py_recv, self, args, nargs, kwnames);
    }
again:
    /* any timeout: MSG_DONTWAIT below never waits, and where data is
     * queued a socket with a timeout (or a blocking one) returns the same
     * bytes at once; only "would block" asks for the timeout (saves reading
     * it, a float object, on every call that gets data) */
    if ((fd = plain_fd(self, &sock, 1)) < 0)
        return fallback(g_py_recv, self, args, nargs, kwnames);
    if (n > RSMALL && bulk_get(fd)) {
        /* socket.recv's own malloc-and-shrink path, called from here */
        PyObject *res = PyObject_CallMethodObjArgs(sock, N.recv, args[0], NULL);
        Py_DECREF(sock);
        if (res == NULL)
            return sock_error(self);
        if (!PyBytes_Check(res) || PyBytes_Size(res) <= RSMALL)
            bulk_set(fd, 0);
        if (PyBytes_Check(res) && PyBytes_Size(res) == 0) {
            Py_DECREF(res);
            return tail(g_recv_tail, self, 0);
        }
        return res;
    }
    r = recv(fd, g_rbuf, (size_t)n, MSG_DONTWAIT);
    err = errno;
    if (r < 0 && (err == EWOULDBLOCK || err == EAGAIN) && !timeout_zero(sock)) {
        /* socket.recv would wait (timeout or blocking): its own path */
        Py_DECREF(sock);
        return fallback(g_py_recv, self, args, nargs, kwnames);
    }
    Py_DECREF(sock);
    if (r > 0) {
        if (r > RSMALL)
            bulk_set(fd, 1);
        return PyBytes_FromStringAndSize(g_rbuf, (Py_ssize_t)r);
    }
    if (r < 0 && err == EINTR) {
        if (PyErr_CheckSignals() < 0)
            return NULL;
        goto again;
    }
    /* EOF (0) or an error, EWOULDBLOCK included (3.11 raises it) */
    return tail(g_recv_tail, self, r == 0 ? 0 : err);
#else
    return fallback(g_py_recv, self, args, nargs, kwnames);
#endif
}

/* self.<name> is a bound method of `func` (ours) on self: not replaced on
 * the class or the instance (dispatcher_with_send.send's and
 * async_chat.push's test of initiate_send, async_chat.handle_read's of
 * get_terminator).  1, 0, -1 (error set). */
static int
own_method(PyObject *self, PyObject *name, PyObject *func)
{
    PyObject *m = PyObject_GetAttr(self, name), *v;
    int r = 0;
    if (m == NULL)
        return -1;
    if ((PyObject *)Py_TYPE(m) == g_method_type) {
        if (!(v = PyObject_GetAttr(m, N.func)))
            goto err;
        r = v == func;
        Py_DECREF(v);
        if (r) {
            if (!(v = PyObject_GetAttr(m, N.self_)))
                goto err;
            r = v == self;
            Py_DECREF(v);
        }
    }
    Py_DECREF(m);
    return r;
err:
    Py_DECREF(m);
    return -1;
}

/* dispatcher_with_send.send(self, data): the fast branch of the Python
 * method (3.11 with an empty buffer: one dispatcher.send(self,
 * data[:65536]), the rest queued), in C. */
static PyObject *
w_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *data, *q, *v, *r;
    Py_ssize_t n;
    int t;

    if (!g_on || nargs != 1 || kwnames != NULL || !PyBytes_CheckExact(args[0]))
        return fallback(g_py_wsend, self, args, nargs, kwnames);
    data = args[0];
    /* the Python method's reads, in its order: debug, _fa_out, nbytes,
     * initiate_send, dispatcher.send */
    if ((t = attr_true(self, N.debug)) != 0)
        goto slow;
    if (!(q = PyObject_GetAttr(self, N.fa_out)))
        goto slow;
    if (q == Py_None || (t = attr_true(q, N.nbytes)) != 0)
        goto slow_q;
    if ((t = own_method(self, N.initiate_send, g_dws_initiate)) != 1)
        goto slow_q;
    if (!(v = PyObject_GetAttr(g_dispatcher, N.send)))
        goto slow_q;
    Py_DECREF(v);                    /* compared by identity only */
    if (v != g_d_send)
        goto slow_q;
    t = fast_send(self, data, 65536, &n);
    if (t == 0)
        goto slow_q;
    if (t < 0) {
        Py_DECREF(q);
        return NULL;
    }
    if (t == 2) {
        /* dispatcher.send's except clause: handle_close() -> 0, or raise */
        if (!(r = tail(g_send_tail, self, (int)n))) {
            Py_DECREF(q);
            return NULL;
        }
        n = PyLong_AsSsize_t(r);
        Py_DECREF(r);
        if (n == -1 && PyErr_Occurred()) {
            Py_DECREF(q);
            return NULL;
        }
    }
    if (n < PyBytes_Size(data)) {
        /* the rest goes to the queue (asyncore._dws_rest) */
        PyObject *k = PyLong_FromSsize_t(n);
        r = k ? PyObject_CallFunctionObjArgs(g_wsend_rest, self, q, data, k, NULL) : NULL;
        Py_XDECREF(k);
        Py_DECREF(q);
        if (r == NULL)
            return NULL;
        return r;
    }
    Py_DECREF(q);
    return none_ref();
slow_q:
    Py_DECREF(q);
slow:
    PyErr_Clear();
    return fallback(g_py_wsend, self, args, nargs, kwnames);
}


/* self.send is our dispatcher.send, bound to self (not replaced on the
 * class or the instance).  1, 0, -1 (error set). */
static int
own_send(PyObject *self)
{
    PyObject *m = PyObject_GetAttr(self, N.send);
    int r;
    if (m == NULL)
        return -1;
    r = PyCFunction_Check(m)
        && PyCFunction_GetFunction(m) == (PyCFunction)(void (*)(void))d_send
        && PyCFunction_GetSelf(m) == self;
    Py_DECREF(m);
    return r;
}

/* async_chat.push(self, data): the fast branch of the Python method (an
 * empty queue, data no longer than ac_out_buffer_size, connected,
 * initiate_send and send not replaced: one self.send(data), only what it
 * did not take is queued), in C.  Only "all of it sent" ends here; every
 * other outcome of the send goes to asynchat._push_rest (a function named
 * push: an OSError is handled there, in a frame named like 3.11's). */
static PyObject *
c_push(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *data, *v, *fifo = NULL;
    Py_ssize_t n, len, obs;
    int t;

    if (!g_on || nargs != 1 || kwnames != NULL || !PyBytes_CheckExact(args[0]))
        return fallback(g_py_push, self, args, nargs, kwnames);
    data = args[0];
    if ((len = PyBytes_Size(data)) <= 0)        /* b'': 3.11 sends 0 bytes */
        goto slow;
    /* the Python method's reads, in its order: ac_out_buffer_size,
     * producer_fifo (empty?), connected, initiate_send, send */
    if (!(v = PyObject_GetAttr(self, N.obs)))
        goto slow;
    obs = PyLong_CheckExact(v) ? PyLong_AsSsize_t(v) : -1;
    Py_DECREF(v);
    if (obs < len)                               /* (or not an int, overflow) */
        goto slow;
    if (!(fifo = PyObject_GetAttr(self, N.fifo)))
        goto slow;
    if (PyObject_IsTrue(fifo) != 0)
        goto slow;
    if (attr_true(self, N.connected) != 1)
        goto slow;
    if (own_method(self, N.initiate_send, g_ac_initiate) != 1 || own_send(self) != 1)
        goto slow;
    t = fast_send(self, data, PY_SSIZE_T_MAX, &n);
    if (t == 0)
        goto slow;
    if (t < 0) {
        Py_DECREF(fifo);
        return NULL;
    }
    if (t == 1 && n >= len) {
        Py_DECREF(fifo);
        return none_ref();
    }
    {
        /* _push_rest(self, fifo, data, sent, errno) */
        PyObject *k = PyLong_FromSsize_t(t == 1 ? n : 0);
        PyObject *e = k ? PyLong_FromSsize_t(t == 2 ? n : 0) : NULL;
        PyObject *r = e ? PyObject_CallFunctionObjArgs(g_push_rest, self, fifo,
                                                       data, k, e, NULL) : NULL;
        Py_XDECREF(k);
        Py_XDECREF(e);
        Py_DECREF(fifo);
        return r;
    }
slow:
    Py_XDECREF(fifo);
    PyErr_Clear();
    return fallback(g_py_push, self, args, nargs, kwnames);
}

/* obj.<name> is exactly `want` (compared by identity)?  1, 0 (lookup
 * errors: 0, cleared). */
static int
attr_is(PyObject *obj, PyObject *name, PyObject *want)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(v);                    /* compared by identity only */
    return v == want;
}

static PyObject *
call1(PyObject *self, PyObject *name, PyObject *arg)
{
    return PyObject_CallMethodObjArgs(self, name, arg, NULL);
}

/* The Python method, handle_read(self, data): data, the bytes its recv
 * would have returned, or None: continue from the state in _fa_cur. */
static PyObject *
read_rest(PyObject *self, PyObject *data)
{
    return PyObject_CallFunctionObjArgs(g_py_read, self, data, NULL);
}

/* self._fa_cur, the list [buf, pos] that holds async_chat's unconsumed
 * input buf[pos:] (asynchat.py: made once, only mutated afterwards).  Its
 * items are read and written here with list calls: an attribute read from
 * C costs ~210 instructions and a write ~300, and a record took eleven of
 * them on two attributes.  A new reference, or NULL without an error
 * where it is not such a list (then the Python method does it all). */
static PyObject *
chat_cursor(PyObject *self)
{
    PyObject *cur = PyObject_GetAttr(self, N.fa_cur);
    if (cur == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyList_CheckExact(cur) || PyList_Size(cur) != 2) {
        Py_DECREF(cur);
        return NULL;
    }
    return cur;
}

/* buf, pos = cur, where buf is exact bytes and pos an exact int in
 * [0, len(buf)]: 1 (*bufp a new reference); otherwise 0, no error set (a
 * callback assigned ac_in_buffer something else: the Python method goes
 * on from there).  The items are fetched afresh on every call: a callback
 * may have changed them. */
static int
cursor_get(PyObject *cur, PyObject **bufp, Py_ssize_t *posp)
{
    PyObject *b = PyList_GetItem(cur, 0), *q;
    Py_ssize_t pos;
    if (b == NULL || !PyBytes_CheckExact(b) || !(q = PyList_GetItem(cur, 1))
            || !PyLong_CheckExact(q)) {
        PyErr_Clear();
        return 0;
    }
    pos = PyLong_AsSsize_t(q);
    if (pos < 0 || pos > PyBytes_Size(b)) {
        PyErr_Clear();                  /* (an overflowing int) */
        return 0;
    }
    Py_INCREF(b);
    *bufp = b;
    *posp = pos;
    return 1;
}

/* cur[1] = pos, and first cur[0] = buf unless buf is NULL.  0, or -1
 * with an error set.  (PyList_SetItem() steals the new item and releases
 * the old one.) */
static int
cursor_set(PyObject *cur, PyObject *buf, Py_ssize_t pos)
{
    PyObject *v;
    if (buf != NULL) {
        Py_INCREF(buf);
        if (PyList_SetItem(cur, 0, buf) < 0)
            return -1;
    }
    if (!(v = PyLong_FromSsize_t(pos)))
        return -1;
    return PyList_SetItem(cur, 1, v);
}

/* cur is still [buf, pos] (the same objects; pos compared by value)?
 * 1, 0 (no error set). */
static int
cursor_is(PyObject *cur, PyObject *buf, Py_ssize_t pos)
{
    PyObject *b = PyList_GetItem(cur, 0), *q = b ? PyList_GetItem(cur, 1) : NULL;
    int r = q != NULL && b == buf && PyLong_CheckExact(q) && PyLong_AsSsize_t(q) == pos;
    PyErr_Clear();                      /* (an index error, an overflowing int) */
    return r;
}

/* async_chat.handle_read after its recv, for bytes terminators: each record
 * found in the buffer goes to collect_incoming_data()/found_terminator()
 * with exactly the reads, writes and calls of the Python method (the
 * reference); whatever else the buffer needs (a partial record, an int or
 * empty terminator, a buffer replaced by a callback with something that is
 * not bytes, an input limit, an overridden get_terminator) is handed to it
 * at the start of an iteration, where its state lives in _fa_cur:
 * read_rest(self, None) continues from there, and read_rest(self, data)
 * does it all when the first look fails. */
static PyObject *
read_data(PyObject *self, PyObject *data)
{
    PyObject *cur, *buf, *term = NULL, *v, *r;
    Py_ssize_t pos, len, tl, idx;
    const char *p, *hit;
    int t;

    /* what the reference reads before its loop: _fa_cur, max_input_bytes
     * (then get_terminator, in the loop) */
    if (!PyBytes_CheckExact(data) || !(cur = chat_cursor(self)))
        goto python_data;
    /* nothing left over: every byte of the buffer consumed (its offset at
     * the end: the usual state after a record) */
    t = cursor_get(cur, &buf, &pos);
    if (t) {
        t = pos == PyBytes_Size(buf);
        Py_DECREF(buf);
    }
    if (!t || !attr_is(self, N.max_in, Py_None)
            || own_method(self, N.get_terminator, g_get_term) != 1) {
        Py_DECREF(cur);
        goto python_data;
    }
    /* buf = b'' + data, which is data itself; stored with offset 0 */
    buf = data;
    Py_INCREF(buf);
    pos = 0;
    if (cursor_set(cur, buf, 0) < 0)
        goto error;
    while ((len = PyBytes_Size(buf)) > pos) {
        /* get_terminator(), not overridden */
        if (!(term = PyObject_GetAttr(self, N.terminator))) {
            PyErr_Clear();
            goto resume;
        }
        if (!PyBytes_CheckExact(term) || (tl = PyBytes_Size(term)) <= 0)
            goto resume;
        p = PyBytes_AsString(buf);
        hit = memmem(p + pos, (size_t)(len - pos), PyBytes_AsString(term), (size_t)tl);
        if (hit == NULL)
            goto resume;             /* a partial record: the prefix rules */
        idx = hit - p;
        if (idx > pos) {
            PyObject *chunk = PyBytes_FromStringAndSize(p + pos, idx - pos);
            if (chunk == NULL)
                goto error;
            r = call1(self, N.collect, chunk);
            Py_DECREF(chunk);
            if (r == NULL)
                goto error;
            Py_DECREF(r);
            if (!cursor_is(cur, buf, pos)) {
                /* The callback replaced the buffer: do what 3.11 does to
                 * whatever it holds now. */
                PyObject *s;
                if (!(v = PyObject_GetAttr(self, N.ac_in_buffer)))
                    goto error;
                s = PySequence_GetSlice(v, idx - pos + tl, PY_SSIZE_T_MAX);
                Py_DECREF(v);
                if (s == NULL)
                    goto error;
                t = PyObject_SetAttr(self, N.ac_in_buffer, s);
                Py_DECREF(s);
                if (t < 0)
                    goto error;
                goto found;
            }
        }
        pos = idx + tl;
        if (cursor_set(cur, NULL, pos) < 0)
            goto error;
found:
        if (!(r = PyObject_CallMethodObjArgs(self, N.found, NULL)))
            goto error;
        Py_DECREF(r);
        Py_CLEAR(term);
        /* buf, pos = cur */
        Py_DECREF(buf);
        if (!cursor_get(cur, &buf, &pos)) {
            Py_DECREF(cur);
            return read_rest(self, Py_None);
        }
    }
    Py_DECREF(buf);
    Py_DECREF(cur);
    return none_ref();
resume:
    Py_XDECREF(term);
    Py_DECREF(buf);
    Py_DECREF(cur);
    return read_rest(self, Py_None);
python_data:
    PyErr_Clear();
    return read_rest(self, data);
error:
    Py_XDECREF(term);
    Py_DECREF(buf);
    Py_DECREF(cur);
    return NULL;
}

/* async_chat.handle_read(self) */
static PyObject *
c_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *n, *m, *data, *r;

    if (!g_on || nargs != 0 || kwnames != NULL)
        return fallback(g_py_read, self, args, nargs, kwnames);
    /* data = self.recv(self.ac_in_buffer_size) */
    if (!(n = PyObject_GetAttr(self, N.ibs))) {
        PyErr_Clear();
        return fallback(g_py_read, self, args, nargs, kwnames);
    }
    if (!(m = PyObject_GetAttr(self, N.recv))) {
        PyErr_Clear();
        Py_DECREF(n);
        return fallback(g_py_read, self, args, nargs, kwnames);
    }
    if (PyCFunction_Check(m)
            && PyCFunction_GetFunction(m) == (PyCFunction)(void (*)(void))d_recv
            && PyCFunction_GetSelf(m) == self)
        data = d_recv(self, &n, 1, NULL);
    else
        data = PyObject_CallFunctionObjArgs(m, n, NULL);
    Py_DECREF(m);
    Py_DECREF(n);
    if (data == NULL) {
        PyObject *t, *v, *tb;
        /* except BlockingIOError: return */
        if (PyErr_ExceptionMatches(PyExc_BlockingIOError)) {
            PyErr_Clear();
            return none_ref();
        }
        if (!PyErr_ExceptionMatches(PyExc_OSError))
            return NULL;
        /* except OSError: self.handle_error(), in asynchat's function
         * named handle_read, with the exception as sys.exc_info() */
        PyErr_Fetch(&t, &v, &tb);
        PyErr_NormalizeException(&t, &v, &tb);
        if (v == NULL) {
            PyErr_Restore(t, v, tb);
            return NULL;
        }
        if (tb != NULL)
            PyException_SetTraceback(v, tb);
        Py_XDECREF(t);
        Py_XDECREF(tb);
        r = PyObject_CallFunctionObjArgs(g_read_error, self, v, NULL);
        Py_DECREF(v);
        return r;
    }
    r = read_data(self, data);
    Py_DECREF(data);
    return r;
}

static PyMethodDef d_send_def = {
    "send", (PyCFunction)(void (*)(void))d_send, METH_FASTCALL | METH_KEYWORDS,
    "send($self, data)\n--\n\ndispatcher.send (C; asyncore.py has the reference)."};
static PyMethodDef d_recv_def = {
    "recv", (PyCFunction)(void (*)(void))d_recv, METH_FASTCALL | METH_KEYWORDS,
    "recv($self, buffer_size)\n--\n\ndispatcher.recv (C; asyncore.py has the reference)."};
static PyMethodDef w_send_def = {
    "send", (PyCFunction)(void (*)(void))w_send, METH_FASTCALL | METH_KEYWORDS,
    "send($self, data)\n--\n\ndispatcher_with_send.send (C; asyncore.py has the reference)."};
static PyMethodDef c_read_def = {
    "handle_read", (PyCFunction)(void (*)(void))c_read, METH_FASTCALL | METH_KEYWORDS,
    "handle_read($self)\n--\n\nasync_chat.handle_read (C; asynchat.py has the reference)."};
static PyMethodDef c_push_def = {
    "push", (PyCFunction)(void (*)(void))c_push, METH_FASTCALL | METH_KEYWORDS,
    "push($self, data)\n--\n\nasync_chat.push (C; asynchat.py has the reference)."};

static int
keep(PyObject **slot, PyObject *v)
{
    PyObject *old = *slot;
    Py_XINCREF(v);
    *slot = v;
    Py_XDECREF(old);
    return 0;
}

#define INTERN(f, s) \
    if (!N.f && !(N.f = PyUnicode_InternFromString(s))) return NULL

PyObject *
fa_chan_methods(PyObject *module, PyObject *args)
{
    PyObject *sock_type, *method_type, *py_send, *py_recv, *py_wsend,
        *send_tail, *recv_tail, *wsend_rest, *disp, *dws_init, *ds, *dr, *ws;
    int flags;
    (void)module;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOi:chan_methods", &sock_type,
                          &method_type, &py_send, &py_recv, &py_wsend,
                          &send_tail, &recv_tail, &wsend_rest, &disp,
                          &dws_init, &flags))
        return NULL;
    INTERN(socket, "socket");
    INTERN(fileno, "fileno");
    INTERN(gettimeout, "gettimeout");
    INTERN(debug, "debug");
    INTERN(fa_out, "_fa_out");
    INTERN(nbytes, "nbytes");
    INTERN(initiate_send, "initiate_send");
    INTERN(send, "send");
    INTERN(recv, "recv");
    INTERN(func, "__func__");
    INTERN(self_, "__self__");
    INTERN(obs, "ac_out_buffer_size");
    INTERN(fifo, "producer_fifo");
    INTERN(connected, "connected");
    INTERN(ibs, "ac_in_buffer_size");
    INTERN(fa_cur, "_fa_cur");
    INTERN(max_in, "max_input_bytes");
    INTERN(get_terminator, "get_terminator");
    INTERN(terminator, "terminator");
    INTERN(collect, "collect_incoming_data");
    INTERN(found, "found_terminator");
    INTERN(ac_in_buffer, "ac_in_buffer");
    /* `object` as the descriptors' class: they accept any self, as the
     * Python functions do (a duck-typed dispatcher.send(obj, data) works) */
    ds = PyDescr_NewMethod(&PyBaseObject_Type, &d_send_def);
    dr = ds ? PyDescr_NewMethod(&PyBaseObject_Type, &d_recv_def) : NULL;
    ws = dr ? PyDescr_NewMethod(&PyBaseObject_Type, &w_send_def) : NULL;
    if (ws == NULL) {
        Py_XDECREF(ds);
        Py_XDECREF(dr);
        return NULL;
    }
    {
        PyObject *fm = PyObject_GetAttr(sock_type, N.fileno);
        PyObject *tm = fm ? PyObject_GetAttr(sock_type, N.gettimeout) : NULL;
        if (tm == NULL) {
            Py_XDECREF(fm);
            Py_DECREF(ds);
            Py_DECREF(dr);
            Py_DECREF(ws);
            return NULL;
        }
        keep(&g_fileno_m, fm);
        keep(&g_gettimeout_m, tm);
        Py_DECREF(fm);
        Py_DECREF(tm);
    }
    g_head = 0;
    g_head = g_head_ok = check_head(sock_type);
    keep(&g_sock_type, sock_type);
    keep(&g_method_type, method_type);
    keep(&g_py_send, py_send);
    keep(&g_py_recv, py_recv);
    keep(&g_py_wsend, py_wsend);
    keep(&g_send_tail, send_tail);
    keep(&g_recv_tail, recv_tail);
    keep(&g_wsend_rest, wsend_rest);
    keep(&g_dispatcher, disp);
    keep(&g_dws_initiate, dws_init);
    keep(&g_d_send, ds);
    g_flags = flags;
    g_on = 1;
    return Py_BuildValue("(NNN)", ds, dr, ws);
}

/* sock_head([on]): is the socket head read (sockhead) in use?  With an
 * argument: use it (only where the check passed) or not (tests run the
 * method calls too). */
PyObject *
fa_sock_head(PyObject *module, PyObject *args)
{
    int on = -1;
    (void)module;
    if (!PyArg_ParseTuple(args, "|p:sock_head", &on))
        return NULL;
    if (on >= 0)
        g_head = on && g_head_ok;
    return PyBool_FromLong(g_head);
}

PyObject *
fa_chan_io(PyObject *module, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    (void)module;
    if (on < 0)
        return NULL;
    g_on = on;
    return none_ref();
}

PyObject *
fa_chat_methods(PyObject *module, PyObject *args)
{
    PyObject *py_push, *ac_init, *push_rest, *py_read, *get_term, *rerr, *p, *h;
    (void)module;
    if (!PyArg_ParseTuple(args, "OOOOOO:chat_methods", &py_push, &ac_init,
                          &push_rest, &py_read, &get_term, &rerr))
        return NULL;
    if (g_d_send == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "chan_methods() first");
        return NULL;
    }
    if (!(p = PyDescr_NewMethod(&PyBaseObject_Type, &c_push_def)))
        return NULL;
    if (!(h = PyDescr_NewMethod(&PyBaseObject_Type, &c_read_def))) {
        Py_DECREF(p);
        return NULL;
    }
    keep(&g_py_push, py_push);
    keep(&g_ac_initiate, ac_init);
    keep(&g_push_rest, push_rest);
    keep(&g_py_read, py_read);
    keep(&g_get_term, get_term);
    keep(&g_read_error, rerr);
    return Py_BuildValue("(NN)", p, h);
}
