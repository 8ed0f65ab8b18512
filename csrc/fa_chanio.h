/* fa_chanio.h: the channel I/O methods of fastasyncore._cloop (fa_chanio.c),
 * registered in fa_cloop.c's method table. */
#ifndef FA_CHANIO_H
#define FA_CHANIO_H

#include <Python.h>

/* chan_methods(socket_type, method_type, py_send, py_recv, py_wsend,
 *              send_tail, recv_tail, wsend_rest, dispatcher,
 *              dws_initiate_send, flags)
 *   -> (dispatcher.send, dispatcher.recv, dispatcher_with_send.send) */
PyObject *fa_chan_methods(PyObject *module, PyObject *args);
/* chat_methods(py_push, async_chat_initiate_send, push_rest, py_handle_read,
 *              async_chat_get_terminator, read_error)
 *   -> (async_chat.push, async_chat.handle_read); after chan_methods() */
PyObject *fa_chat_methods(PyObject *module, PyObject *args);
/* chan_io(on): the fast paths on (cffi backend) or off (every call goes to
 * the Python method) */
PyObject *fa_chan_io(PyObject *module, PyObject *arg);
/* sock_head([on]) -> bool: the socket objects' fd and timeout read from
 * their C struct (checked by chan_methods()) rather than by method calls */
PyObject *fa_sock_head(PyObject *module, PyObject *args);

#endif
