/* fa_pyutil.h: small Python-API helpers shared by the two sources of
 * fastasyncore._cloop (fa_cloop.c, fa_chanio.c).  Limited API 3.9. */
#ifndef FA_PYUTIL_H
#define FA_PYUTIL_H

#include <Python.h>

/* A new reference to None.  Not Py_RETURN_NONE: the 3.12+ headers define it
 * as `return Py_None` (None is immortal there) even under Py_LIMITED_API,
 * so an abi3 module built by 3.12+ would drop a reference to None at every
 * call when run on 3.9-3.11, until None is freed ("none_dealloc"). */
static inline PyObject *
none_ref(void)
{
    Py_INCREF(Py_None);
    return Py_None;
}

/* getattr(obj, name) is true?  1, 0, -1 (error set) */
static inline int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    int r;
    if (v == NULL)
        return -1;
    r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

#endif
