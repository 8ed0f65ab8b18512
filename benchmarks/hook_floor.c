/* hook_floor.c: the least work any loop keeping asyncore's hook API can do
 * per iteration of the docs-pattern rows, in C.  benchmarks/hook_floor.py
 * builds it as a Python extension (hook_floor.iterate) and times it beside
 * 3.11's loop and ours.  A measuring stick, not a loop: it routes no
 * exception (one ends the run), keeps no owner table (an event goes to
 * whatever map.get(fd) is then), has no services, no persistent poller, no
 * limit checks beyond allocation.
 *
 * One iteration, as 3.11 does it minus what these rows' channels let it
 * skip: ask writable() of every channel in map order (readable() is taken as
 * True: no row overrides it; accepting is read only where writable() says
 * yes, as 3.11's poll2 does), one poll(2), then for each reported fd
 * handle_read_event() / handle_write_event() / handle_close() of
 * map.get(fd).  Each call from C goes through PyObject_CallMethodObjArgs,
 * the cheapest generic call of the limited API. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <poll.h>
#include <stdlib.h>

static PyObject *s_writable, *s_accepting, *s_read, *s_write, *s_close;
static struct pollfd *pfd;
static PyObject **held;
static size_t cap;

static int
reserve(size_t n)
{
    struct pollfd *p;
    PyObject **h;
    if (n <= cap)
        return 0;
    if (!(p = realloc(pfd, 2 * n * sizeof *p)))
        return -1;
    pfd = p;
    if (!(h = realloc(held, 2 * n * sizeof *h)))
        return -1;
    held = h;
    cap = 2 * n;
    return 0;
}

static int
call(PyObject *obj, PyObject *name)
{
    PyObject *r = PyObject_CallMethodObjArgs(obj, name, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* iterate(map, timeout_ms) -> None: one iteration over a dict map */
static PyObject *
iterate(PyObject *self, PyObject *args)
{
    PyObject *map, *key, *obj;
    Py_ssize_t pos = 0, n = 0, i;
    int ms, rc;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!i", &PyDict_Type, &map, &ms))
        return NULL;
    if (reserve((size_t)PyDict_Size(map) + 1) < 0)
        return PyErr_NoMemory();
    while (PyDict_Next(map, &pos, &key, &obj)) {
        PyObject *r;
        short events = POLLIN | POLLPRI;
        int w;
        long fd = PyLong_AsLong(key);
        if (fd == -1 && PyErr_Occurred())
            goto fail;
        Py_INCREF(obj);                 /* a predicate may change the map */
        held[n] = obj;
        pfd[n].fd = (int)fd;
        pfd[n].revents = 0;
        n++;
        if (!(r = PyObject_CallMethodObjArgs(obj, s_writable, NULL)))
            goto fail;
        w = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (w < 0)
            goto fail;
        if (w) {
            if (!(r = PyObject_GetAttr(obj, s_accepting)))
                goto fail;
            w = PyObject_IsTrue(r);
            Py_DECREF(r);
            if (w < 0)
                goto fail;
            if (!w)
                events |= POLLOUT;
        }
        pfd[n - 1].events = events;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = poll(pfd, (nfds_t)n, ms);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    for (i = 0; i < n && rc > 0; i++) {
        short re = pfd[i].revents;
        int s = 0;
        if (!re)
            continue;
        rc--;
        if (!(key = PyLong_FromLong(pfd[i].fd)))
            goto fail;
        obj = PyDict_GetItemWithError(map, key);
        Py_DECREF(key);
        if (obj == NULL) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        Py_INCREF(obj);
        if (re & POLLIN)
            s = call(obj, s_read);
        if (s == 0 && (re & POLLOUT))
            s = call(obj, s_write);
        if (s == 0 && (re & (POLLHUP | POLLERR | POLLNVAL)))
            s = call(obj, s_close);
        Py_DECREF(obj);
        if (s < 0)
            goto fail;
    }
    for (i = 0; i < n; i++)
        Py_DECREF(held[i]);
    Py_RETURN_NONE;
fail:
    for (i = 0; i < n; i++)
        Py_DECREF(held[i]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"iterate", iterate, METH_VARARGS, "iterate(map, timeout_ms): one iteration"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "hook_floor", NULL, -1, methods,
    NULL, NULL, NULL, NULL
};

PyMODINIT_FUNC
PyInit_hook_floor(void)
{
    if (!(s_writable = PyUnicode_InternFromString("writable")) ||
        !(s_accepting = PyUnicode_InternFromString("accepting")) ||
        !(s_read = PyUnicode_InternFromString("handle_read_event")) ||
        !(s_write = PyUnicode_InternFromString("handle_write_event")) ||
        !(s_close = PyUnicode_InternFromString("handle_close")))
        return NULL;
    return PyModule_Create(&module);
}
