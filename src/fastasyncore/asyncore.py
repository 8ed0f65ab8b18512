"""Basic infrastructure for asynchronous socket service clients and servers.

A drop-in for CPython 3.11's ``asyncore`` module (same names, same hooks, same
observable behaviour; see docs/compatibility.md for the bugs we fix), driven by
fastasyncore's persistent poller (epoll/kqueue/poll) instead of a per-iteration
``select()``.  Derived from CPython's asyncore.py (Sam Rushing, PSF licence).

Module globals (``socket_map``, ``socket``, ``select``...) are looked up at call
time, so programs and tests may rebind them as they could with the stdlib.
"""

import errno as _errno
import select
import socket
import sys
import time
import warnings
from types import MethodType as _MethodType

import os
from errno import EALREADY, EINPROGRESS, EWOULDBLOCK, ECONNRESET, EINVAL, \
     ENOTCONN, ESHUTDOWN, EISCONN, EBADF, ECONNABORTED, EPIPE, EAGAIN, \
     errorcode

from collections.abc import MutableMapping as _MutableMapping
from time import monotonic as _monotonic

from . import _backend
from . import _loop
from ._services import _check_callback, _check_delay
from ._loop import ExitNow, bound_is as _bound_is, touch as _touch, \
     POLLIN as _POLLIN, \
     POLLPRI as _POLLPRI, POLLOUT as _POLLOUT

__all__ = [
    "ExitNow", "close_all", "compact_traceback", "dispatcher",
    "dispatcher_with_send", "loop", "poll", "poll2", "poll3", "read",
    "readwrite", "socket_map", "write",
]
if os.name == "posix":
    __all__ += ["file_dispatcher", "file_wrapper"]

ExitNow.__module__ = __name__

_DISCONNECTED = frozenset({ECONNRESET, ENOTCONN, ESHUTDOWN, ECONNABORTED, EPIPE,
                           EBADF})

try:
    socket_map
except NameError:
    socket_map = {}

_READ = _POLLIN | _POLLPRI
# accept() errors that mean "no resources now", not "this listener is broken".
_ACCEPT_BACKOFF = frozenset(getattr(_errno, n) for n in
                            ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
                            if hasattr(_errno, n))
_ACCEPT_BACKOFF_SECONDS = 0.1
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_SOCKET_TYPE = socket.socket
_ACCEPT_BACKOFF_MAX = 1.0


def _strerror(err):
    try:
        return os.strerror(err)
    except (ValueError, OverflowError, NameError):
        if err in errorcode:
            return errorcode[err]
        return "Unknown error %s" % err


_reraised_exceptions = (ExitNow, KeyboardInterrupt, SystemExit)


def read(obj):
    try:
        obj.handle_read_event()
    except _reraised_exceptions:
        raise
    except:
        obj.handle_error()


def write(obj):
    try:
        obj.handle_write_event()
    except _reraised_exceptions:
        raise
    except:
        obj.handle_error()


def _exception(obj):
    try:
        obj.handle_expt_event()
    except _reraised_exceptions:
        raise
    except:
        obj.handle_error()


def readwrite(obj, flags):
    try:
        if flags & select.POLLIN:
            obj.handle_read_event()
        if flags & select.POLLOUT:
            obj.handle_write_event()
        if flags & select.POLLPRI:
            obj.handle_expt_event()
        if flags & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            obj.handle_close()
    except OSError as e:
        if e.errno not in _DISCONNECTED:
            obj.handle_error()
        else:
            obj.handle_close()
    except _reraised_exceptions:
        raise
    except:
        obj.handle_error()


def poll(timeout=0.0, map=None):
    """One select()-style iteration: every read, then every write, then OOB.

    Unlike 3.11 this is not limited to fds below FD_SETSIZE.
    """
    if map is None:
        map = socket_map
    if map:
        if type(map) is dict:
            (_loop.c_run() or _loop.run)(map, timeout, True, 1)
        else:
            _loop.poll_once(map, timeout, True)
    elif not _loop._services.idle(map):
        # no channels, but loop services: wait for the next timer (within
        # timeout, woken by call_soon_threadsafe/wakeup) and run what is due
        _loop.poll_once(map, timeout, True)


def poll2(timeout=0.0, map=None):
    """One poll()-style iteration: read, write, priority, close per fd."""
    if map is None:
        map = socket_map
    if map:
        if type(map) is dict:
            (_loop.c_run() or _loop.run)(map, timeout, False, 1)
        else:
            _loop.poll_once(map, timeout, False)
    elif not _loop._services.idle(map):
        # no channels, but loop services: wait for the next timer (within
        # timeout, woken by call_soon_threadsafe/wakeup) and run what is due
        _loop.poll_once(map, timeout, False)


poll3 = poll2                           # Alias for backward compatibility
_poll, _poll2 = poll, poll2            # ours, for loop()'s one-call path


def loop(timeout=30.0, use_poll=False, map=None, count=None):
    if map is None:
        map = socket_map

    if use_poll and hasattr(select, 'poll'):
        poll_fun = poll2
    else:
        poll_fun = poll

    # Our own poll()/poll2() on a plain dict: one call runs the whole loop,
    # in C where the C loop is available, else in Python (_loop.run).  A
    # poll function replaced by the user is called each iteration, as in
    # 3.11, and so is ours for other maps and counts.
    select_mode = True if poll_fun is _poll else False if poll_fun is _poll2 else None
    if select_mode is not None and type(map) is dict \
            and (count is None or type(count) is int):
        (_loop.c_run() or _loop.run)(map, timeout, select_mode, count)
        return

    if count is None:
        while map:
            poll_fun(timeout, map)

    else:
        while map and count > 0:
            poll_fun(timeout, map)
            count = count - 1


def _fast_fd(sock):
    """The fd for the C core's buffer I/O, or -1 to use sock's own methods.

    Only a plain, non-blocking ``socket.socket`` on the C backend: SSL
    sockets, file wrappers, mocks and subclasses keep their own methods (and
    their semantics); the pure backend has nothing faster than them.
    """
    if type(sock) is socket.socket and sock.timeout == 0.0 \
            and _backend.current.NAME == "cffi":
        return sock.fileno()
    return -1


class _managed_predicate(_loop.WatchedPredicate):
    """``readable``/``writable`` of our managed classes (see _loop.py).

    A data descriptor, so that a hook assigned on an instance
    (``chan.writable = f``, ``mock.patch.object``) reaches the loop at once,
    from anywhere: from then on the channel is asked every iteration, as 3.11
    asks it, and ``del chan.writable`` hands it back.  Reading gives what a
    plain method gives: the function on the class, the override or a bound
    method on an instance.  The loop needs no per-event check for it.
    """

    def __init__(self, func):
        self.__func__ = func
        self.__wrapped__ = func
        self.__name__ = func.__name__
        self.__qualname__ = func.__qualname__
        self.__doc__ = func.__doc__
        self._slot = '_fa_own_' + func.__name__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self.__func__
        own = getattr(obj, self._slot)
        if own is _INHERITED:
            return _MethodType(self.__func__, obj)
        return own

    def __set__(self, obj, value):
        setattr(obj, self._slot, value)
        _loop.reclassify(obj)

    def __delete__(self, obj):
        if getattr(obj, self._slot) is _INHERITED:
            raise AttributeError(self.__name__)
        delattr(obj, self._slot)
        _loop.reclassify(obj)


_INHERITED = _loop.INHERITED


# Only on 3.11: 3.12+ specialize a class attribute read through an instance
# (LOAD_ATTR_NONDESCRIPTOR_*) but not one the instance shadows, so there the
# copy would make every read generic (see dispatcher.__init__).
_COPY_ACCEPTING = sys.version_info[:2] == (3, 11)


class dispatcher:

    debug = False
    connected = False
    accepting = False
    connecting = False
    closing = False
    addr = None
    ignore_log_types = frozenset({'warning'})
    _fa_accept_pause = None  # accept() back-off (EMFILE): seconds of the next pause
    _fa_own_readable = _fa_own_writable = _INHERITED  # see _managed_predicate

    def __init__(self, sock=None, map=None):
        if map is None:
            self._map = socket_map
        else:
            self._map = map

        self._fileno = None
        # The interest the loop registered for us (a managed channel; -1:
        # none yet).  An instance attribute only, as _fa_out and
        # async_chat's _fa_cur: CPython 3.12+ read an instance
        # attribute that shadows a class attribute generically (~100
        # instructions more per read; the loop reads this one per event).
        self._fa_regmask = -1
        if _COPY_ACCEPTING and type(self).accepting is False:
            # The class's plain False, copied to the instance (the value
            # read is the same): every event and every consult of a
            # writable() that answers True reads self.accepting, and
            # CPython 3.11's specializing interpreter reads an instance
            # value inline (~15 instructions) but a class attribute through
            # an instance only generically (~170).  Never where a subclass
            # made accepting something else (a property, True).
            self.accepting = False

        if sock:
            # Set to nonblocking just to make sure for cases where we
            # get a socket from a blocking source.
            sock.setblocking(False)
            self.set_socket(sock, map)
            self.connected = True
            # The constructor no longer requires that the socket
            # passed be connected.
            try:
                self.addr = sock.getpeername()
            except OSError as err:
                if err.errno in (ENOTCONN, EINVAL):
                    # To handle the case where we got an unconnected
                    # socket.
                    self.connected = False
                else:
                    # The socket is broken in some unknown way, alert
                    # the user and remove it from the map (to prevent
                    # polling of broken sockets).
                    self.del_channel(map)
                    raise
        else:
            self.socket = None

    def __repr__(self):
        status = [self.__class__.__module__+"."+self.__class__.__qualname__]
        if self.accepting and self.addr:
            status.append('listening')
        elif self.connected:
            status.append('connected')
        if self.addr is not None:
            try:
                status.append('%s:%d' % self.addr)
            except TypeError:
                status.append(repr(self.addr))
        return '<%s at %#x>' % (' '.join(status), id(self))

    def add_channel(self, map=None):
        if map is None:
            map = self._map
        map[self._fileno] = self
        _loop.note_added(map, self._fileno)

    def del_channel(self, map=None):
        fd = self._fileno
        if map is None:
            map = self._map
        # Remove only our own entry: a stale dispatcher whose fd number was
        # reused must not unregister the new owner (3.11 deletes any entry).
        if map.get(fd) is self:
            del map[fd]
            _loop.note_removed(map, fd)
        self._fileno = None

    def create_socket(self, family=socket.AF_INET, type=socket.SOCK_STREAM):
        self.family_and_type = family, type
        sock = socket.socket(family, type)
        sock.setblocking(False)
        self.set_socket(sock)

    def set_socket(self, sock, map=None):
        self.socket = sock
        self._fileno = sock.fileno()
        self.add_channel(map)

    def set_reuse_addr(self):
        # try to re-use a server port if possible
        try:
            self.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEADDR,
                self.socket.getsockopt(socket.SOL_SOCKET,
                                       socket.SO_REUSEADDR) | 1
                )
        except OSError:
            pass

    # ==================================================
    # predicates for select()
    # these are used as filters for the lists of sockets
    # to pass to select().
    # ==================================================

    @_managed_predicate
    def readable(self):
        return True

    @_managed_predicate
    def writable(self):
        return True

    def _fa_mask(self):
        # What readable()/writable() above answer, as poll bits (the loop
        # uses this instead of calling them; see _loop.py).
        if self.accepting:
            return _READ
        return _READ | _POLLOUT

    # ==================================================
    # socket object methods.
    # ==================================================

    def listen(self, num):
        self.accepting = True
        _touch(self)
        if os.name == 'nt' and num > 5:
            num = 5
        return self.socket.listen(num)

    def bind(self, addr):
        self.addr = addr
        return self.socket.bind(addr)

    def connect(self, address):
        self.connected = False
        self.connecting = True
        # _touch(self), inline where it returns at once (once per connection
        # of a client: a channel no loop registered yet, no loop services):
        # touch()'s own first test, without the call
        try:
            if self._fa_regmask != -1 or _loop._wakers:
                _touch(self)
        except AttributeError:
            pass                # (what touch() does without it)
        err = self.socket.connect_ex(address)
        if err in (EINPROGRESS, EALREADY, EWOULDBLOCK) \
        or err == EINVAL and os.name == 'nt':
            self.addr = address
            return
        if err in (0, EISCONN):
            self.addr = address
            self.handle_connect_event()
        else:
            raise OSError(err, errorcode[err])

    def accept(self):
        # XXX can return either an address pair or None
        try:
            conn, addr = self.socket.accept()
        except TypeError:
            return None
        except OSError as why:
            if why.errno in (EWOULDBLOCK, ECONNABORTED, EAGAIN):
                return None
            if why.errno in _ACCEPT_BACKOFF:
                # Out of fds/memory: 3.11 raises, and the default
                # handle_error() then closes the *listener* for good (or a
                # logging handle_error spins: the pending connection keeps
                # the listener readable).  Stop polling the listener for a
                # moment instead and tell the user once per episode.
                pause = self._fa_accept_pause
                if pause is None:
                    pause = _ACCEPT_BACKOFF_SECONDS
                    self.log_info('accept() failed (%s); pausing accepts '
                                  '(%.1f s, doubling up to %.0f s) until it '
                                  'succeeds' % (why, pause, _ACCEPT_BACKOFF_MAX),
                                  'error')
                _loop.suspend(self, pause)
                self._fa_accept_pause = min(pause * 2, _ACCEPT_BACKOFF_MAX)
                return None
            raise
        else:
            if self._fa_accept_pause is not None:
                self._fa_accept_pause = None
            return conn, addr

    def send(self, data):
        # The socket's own send/recv, as 3.11: on the success path they beat
        # a cffi call plus a copy out of a C buffer (measured: sock.recv is
        # ~330 ns cheaper per call); the C core pays off in the buffer paths
        # (dispatcher_with_send, async_chat) and the poller.
        try:
            sock = self.socket
            if type(sock) is _SOCKET_TYPE:
                # MSG_NOSIGNAL: a peer reset gives EPIPE (-> handle_close)
                # even where SIGPIPE was reset to SIG_DFL, instead of
                # killing the process.  Only plain sockets take flags (the
                # real socket.socket, not what a test put in `socket`).
                return sock.send(data, _MSG_NOSIGNAL)
            return sock.send(data)
        except OSError as why:
            if why.errno == EWOULDBLOCK:
                return 0
            elif why.errno in _DISCONNECTED:
                self.handle_close()
                return 0
            else:
                raise

    def recv(self, buffer_size):
        try:
            data = self.socket.recv(buffer_size)
            if not data:
                # a closed connection is indicated by signaling
                # a read condition, and having recv() return 0.
                self.handle_close()
                return b''
            else:
                return data
        except OSError as why:
            # winsock sometimes raises ENOTCONN
            if why.errno in _DISCONNECTED:
                self.handle_close()
                return b''
            else:
                raise

    def close(self):
        self.connected = False
        self.accepting = False
        self.connecting = False
        self.del_channel()
        if self.socket is not None:
            try:
                self.socket.close()
            except OSError as why:
                if why.errno not in (ENOTCONN, EBADF):
                    raise

    # log and log_info may be overridden to provide more sophisticated
    # logging and warning methods. In general, log is for 'hit' logging
    # and 'log_info' is for informational, warning and error logging.

    def log(self, message):
        sys.stderr.write('log: %s\n' % str(message))

    def log_info(self, message, type='info'):
        if type not in self.ignore_log_types:
            print('%s: %s' % (type, message))

    def handle_read_event(self):
        if self.accepting:
            # accepting sockets are never connected, they "spawn" new
            # sockets that are connected
            self.handle_accept()
        elif not self.connected:
            if self.connecting:
                self.handle_connect_event()
            self.handle_read()
        else:
            self.handle_read()

    def handle_connect_event(self):
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            raise OSError(err, _strerror(err))
        self.handle_connect()
        self.connected = True
        self.connecting = False
        try:                    # _touch(self), inline: see connect()
            if self._fa_regmask != -1 or _loop._wakers:
                _touch(self)
        except AttributeError:
            pass

    def handle_write_event(self):
        if self.accepting:
            # Accepting sockets shouldn't get a write event.
            # We will pretend it didn't happen.
            return

        if not self.connected:
            if self.connecting:
                self.handle_connect_event()
        self.handle_write()

    def handle_expt_event(self):
        # handle_expt_event() is called if there might be an error on the
        # socket, or if there is OOB data
        # check for the error condition first
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            # we can get here when select.select() says that there is an
            # exceptional condition on the socket
            # since there is an error, we'll go ahead and close the socket
            # like we would in a subclassed handle_read() that received no
            # data
            self.handle_close()
        else:
            self.handle_expt()

    def handle_error(self):
        nil, t, v, tbinfo = compact_traceback()

        # sometimes a user repr method will crash.
        try:
            self_repr = repr(self)
        except:
            self_repr = '<__repr__(self) failed for object at %0x>' % id(self)

        self.log_info(
            'uncaptured python exception, closing channel %s (%s:%s %s)' % (
                self_repr,
                t,
                v,
                tbinfo
                ),
            'error'
            )
        self.handle_close()

    def handle_expt(self):
        self.log_info('unhandled incoming priority event', 'warning')

    def handle_read(self):
        self.log_info('unhandled read event', 'warning')

    def handle_write(self):
        self.log_info('unhandled write event', 'warning')

    def handle_connect(self):
        self.log_info('unhandled connect event', 'warning')

    def handle_accept(self):
        pair = self.accept()
        if pair is not None:
            self.handle_accepted(*pair)

    def handle_accepted(self, sock, addr):
        sock.close()
        self.log_info('unhandled accepted event', 'warning')

    def handle_close(self):
        self.log_info('unhandled close event', 'warning')
        self.close()


_loop.register_managed(dispatcher, c_mask='dispatcher')

# ---------------------------------------------------------------------------
# adds simple buffered output capability, useful for simple clients.
# [for more sophisticated usage use asynchat.async_chat]
# ---------------------------------------------------------------------------


class dispatcher_with_send(dispatcher):
    """A dispatcher with an output buffer.

    ``send()`` queues and returns None, as in 3.11.  The queue is linear
    (pushing N bytes costs O(N)); ``out_buffer`` still reads as the pending
    bytes and may be assigned.
    """

    def __init__(self, sock=None, map=None):
        self._fa_out = _backend.current.SendQueue()
        dispatcher.__init__(self, sock, map)

    # (_fa_out: an instance attribute only, see dispatcher.__init__)

    def _fa_queue(self):
        # Subclasses may skip our __init__ (calling dispatcher.__init__ and
        # assigning out_buffer themselves): create the queue on first use.
        try:
            return self._fa_out
        except AttributeError:
            q = self._fa_out = _backend.current.SendQueue()
            return q

    @property
    def out_buffer(self):
        return self._fa_queue().getvalue()

    @out_buffer.setter
    def out_buffer(self, value):
        q = self._fa_queue()
        q.clear()
        if value:
            q.push(value)
        _touch(self)

    def initiate_send(self):
        out = self._fa_queue()
        fd = _fast_fd(self.socket)
        if fd >= 0 and out.nbytes:
            # (an empty queue takes the path below: 3.11 sends b'' then,
            # which reports a closed peer -- EPIPE -> handle_close())
            # dispatcher.send(self, out_buffer[:65536]) without the copy.
            result = out.send(fd, 65536)
            if result < 0:
                err = -result
                if err in _DISCONNECTED:
                    self.handle_close()
                elif err != EWOULDBLOCK:
                    raise OSError(err, _strerror(err))
        else:
            num_sent = dispatcher.send(self, out.peek(65536))
            out.consume(num_sent)
        _touch(self)

    def handle_write(self):
        self.initiate_send()

    @_managed_predicate
    def writable(self):
        return (not self.connected) or len(self._fa_queue())

    def _fa_mask(self):
        if self.accepting:
            return _READ
        try:
            q = self._fa_out
        except AttributeError:
            q = None        # (no queue yet: see _fa_queue)
        if self.connected and (q is None or not q.nbytes):
            return _READ
        return _READ | _POLLOUT

    def send(self, data):
        if self.debug:
            self.log_info('sending %s' % repr(data))
        try:
            q = self._fa_out
        except AttributeError:
            q = self._fa_queue()
        if not q.nbytes:
            # _bound_is(self, 'initiate_send', <ours>), inline (one call per
            # message saved): neither the class nor the instance replaced it.
            f = self.initiate_send
            if type(f) is _MethodType and f.__func__ is _DWS_INITIATE_SEND \
                    and f.__self__ is self:
                # 3.11 with an empty buffer: out_buffer = data, then one
                # dispatcher.send(self, out_buffer[:65536]).  Same call,
                # without copying the data into the queue first; only the
                # rest is queued.
                if type(data) is not bytes \
                        and not isinstance(data, (bytes, bytearray, memoryview)):
                    raise TypeError("can't concat %s to bytes" % type(data).__name__)
                num_sent = dispatcher.send(self, data[:65536])
                if num_sent < len(data):
                    q.push(memoryview(data)[num_sent:])
                    _touch(self)
                return
        q.push(data)
        self.initiate_send()


_loop.register_managed(dispatcher_with_send, c_mask='dispatcher_with_send')
_DWS_INITIATE_SEND = dispatcher_with_send.initiate_send

# ---------------------------------------------------------------------------
# dispatcher.send/recv and dispatcher_with_send.send in C (csrc/fa_chanio.c),
# on the cffi backend.  The methods above stay the reference: the C ones run
# their fast path only where its outcome is data moved on a plain
# non-blocking socket and call them for everything else.  What follows a
# syscall other than data moved happens here, in functions whose code is
# named like the method, so that compact_traceback() shows the same frame.
# ---------------------------------------------------------------------------


def recv(self, err):
    # dispatcher.recv after its socket.recv(): EOF (err 0) or an error
    if not err or err in _DISCONNECTED:
        self.handle_close()
        return b''
    raise OSError(err, _strerror(err))


def send(self, err):
    # dispatcher.send's except clause (EWOULDBLOCK never comes here)
    if err in _DISCONNECTED:
        self.handle_close()
        return 0
    raise OSError(err, _strerror(err))


_recv_tail, _send_tail = recv, send
del recv, send


def _dws_rest(self, q, data, num_sent):
    # dispatcher_with_send.send: what its first dispatcher.send left
    q.push(memoryview(data)[num_sent:])
    _touch(self)


def _install_c_methods():
    """Put the C methods on the classes (_cloop built, and the C core not
    refused by FASTASYNCORE_BACKEND=pure); their fast paths run while the
    cffi backend is active (_backend.set_backend() turns them off and on)."""
    _cloop = _loop.cloop_module()
    make = getattr(_cloop, "chan_methods", None)
    if make is None:
        return False
    d_send, d_recv, w_send = make(
        _SOCKET_TYPE, _MethodType, dispatcher.send, dispatcher.recv,
        dispatcher_with_send.send, _send_tail, _recv_tail, _dws_rest,
        dispatcher, _DWS_INITIATE_SEND, _MSG_NOSIGNAL)
    dispatcher.send = d_send
    dispatcher.recv = d_recv
    dispatcher_with_send.send = w_send
    _cloop.chan_io(_backend.current.NAME == "cffi")
    return True


_C_METHODS = _install_c_methods()

# ---------------------------------------------------------------------------
# used for debugging.
# ---------------------------------------------------------------------------


def compact_traceback():
    t, v, tb = sys.exc_info()
    tbinfo = []
    if not tb: # Must have a traceback
        raise AssertionError("traceback does not exist")
    while tb:
        tbinfo.append((
            tb.tb_frame.f_code.co_filename,
            tb.tb_frame.f_code.co_name,
            str(tb.tb_lineno)
            ))
        tb = tb.tb_next

    # just to be safe
    del tb

    file, function, line = tbinfo[-1]
    info = ' '.join(['[%s|%s|%s]' % x for x in tbinfo])
    return (file, function, line), t, v, info


# ---------------------------------------------------------------------------
# Loop services (fastasyncore's, not 3.11's: not in __all__, so that
# ``from asyncore import *`` gives what 3.11 gave).  Timers and calls belong
# to a socket map and run in the thread running loop()/poll()/poll2() on it,
# after the iteration's I/O events: first the thread-safe calls (FIFO), then
# the due timers in deadline order.  loop() still ends when the map is empty:
# pending timers do not keep it running.  See _services.py.

from typing import Any, Callable, Optional, Tuple   # noqa: E402

from ._services import Timer          # noqa: E402


def _services_map(map: "Optional[_MutableMapping[Any, Any]]") -> "_MutableMapping[Any, Any]":
    if map is None:
        map = socket_map
    elif not isinstance(map, _MutableMapping):
        raise TypeError("map must be a socket map (a dict), not %s"
                        % type(map).__name__)
    return map


def _schedule(when: float, delay: float, interval: Optional[float],
              callback: Callable[..., Any], args: Tuple[Any, ...],
              map: "_MutableMapping[Any, Any]") -> Timer:
    timer = Timer(when, delay, interval, callback, args, map)
    _loop._services.services_for(map).push(timer, when)
    return timer


def call_later(delay: float, callback: Callable[..., Any], *args: Any,
               map: "Optional[_MutableMapping[Any, Any]]" = None) -> Timer:
    """Run ``callback(*args)`` once, ``delay`` seconds from now (>= 0), in the
    thread running the loop on ``map`` (default ``socket_map``).  For the
    loop's own thread; from other threads use call_soon_threadsafe().
    Returns a Timer (``cancel()``, ``reset()``, ``when``, ``cancelled``)."""
    _check_callback(callback)
    d = _check_delay(delay, "delay")
    map = _services_map(map)
    return _schedule(_monotonic() + d, d, None, callback, args, map)


def call_at(when: float, callback: Callable[..., Any], *args: Any,
            map: "Optional[_MutableMapping[Any, Any]]" = None) -> Timer:
    """Run ``callback(*args)`` once at ``when`` (on ``time.monotonic()``).
    For the loop's own thread; from other threads use call_soon_threadsafe()."""
    _check_callback(callback)
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        raise TypeError("when must be a number, not %s" % type(when).__name__)
    if when != when or when in (float("inf"), float("-inf")):
        raise ValueError("when must be finite, got %r" % (when,))
    map = _services_map(map)
    d = max(0.0, when - _monotonic())
    return _schedule(float(when), d, None, callback, args, map)


def call_every(interval: float, callback: Callable[..., Any], *args: Any,
               map: "Optional[_MutableMapping[Any, Any]]" = None) -> Timer:
    """Run ``callback(*args)`` every ``interval`` seconds (> 0), the first
    time ``interval`` after this call, on a fixed rate: never early, no
    drift accumulating, runs missed while the loop was busy skipped (not
    bunched).  An exception from it is logged and it keeps repeating.
    For the loop's own thread; from other threads use call_soon_threadsafe()."""
    _check_callback(callback)
    iv = _check_delay(interval, "interval")
    if iv == 0:
        raise ValueError("interval must be > 0")
    map = _services_map(map)
    return _schedule(_monotonic() + iv, iv, iv, callback, args, map)


def call_soon_threadsafe(callback: Callable[..., Any], *args: Any,
                         map: "Optional[_MutableMapping[Any, Any]]" = None) -> None:
    """From any thread: run ``callback(*args)`` in the thread running the
    loop on ``map`` at its next iteration (a blocked wait returns at once)."""
    _check_callback(callback)
    map = _services_map(map)
    _loop._services.services_for(map).calls.append((callback, args))
    _loop.wakeup(map)


def wakeup(map: "Optional[_MutableMapping[Any, Any]]" = None) -> None:
    """From any thread: make the current (or next) wait of ``map`` return."""
    map = _services_map(map)
    _loop._services.services_for(map)   # the loop then drains the wake-up fd
    _loop.wakeup(map)


def close_all(map=None, ignore_all=False):
    if map is None:
        map = socket_map
    for x in list(map.values()):
        try:
            x.close()
        except OSError as x:
            if x.errno == EBADF:
                pass
            elif not ignore_all:
                raise
        except _reraised_exceptions:
            raise
        except:
            if not ignore_all:
                raise
    map.clear()
    _loop.forget_map(map)

# Asynchronous File I/O:
#
# After a little research (reading man pages on various unixen, and
# digging through the linux kernel), I've determined that select()
# isn't meant for doing asynchronous file i/o.
# Heartening, though - reading linux/mm/filemap.c shows that linux
# supports asynchronous read-ahead.  So _MOST_ of the time, the data
# will be sitting in memory for us already when we go to read it.
#
# What other OS's (besides NT) support async file i/o?  [VMS?]
#
# Regardless, this is useful for pipes, and stdin/stdout...


if os.name == 'posix':
    class file_wrapper:
        # Here we override just enough to make a file
        # look like a socket for the purposes of asyncore.
        # The passed fd is automatically os.dup()'d

        def __init__(self, fd):
            self.fd = os.dup(fd)

        def __del__(self):
            if self.fd >= 0:
                warnings.warn("unclosed file %r" % self, ResourceWarning,
                              source=self)
            self.close()

        def recv(self, *args):
            return os.read(self.fd, *args)

        def send(self, *args):
            return os.write(self.fd, *args)

        def getsockopt(self, level, optname, buflen=None):
            if (level == socket.SOL_SOCKET and
                optname == socket.SO_ERROR and
                not buflen):
                return 0
            raise NotImplementedError("Only asyncore specific behaviour "
                                      "implemented.")

        read = recv
        write = send

        def close(self):
            if self.fd < 0:
                return
            fd = self.fd
            self.fd = -1
            os.close(fd)

        def fileno(self):
            return self.fd

    class file_dispatcher(dispatcher):

        def __init__(self, fd, map=None):
            dispatcher.__init__(self, None, map)
            self.connected = True
            try:
                fd = fd.fileno()
            except AttributeError:
                pass
            self.set_file(fd)
            # set it to non-blocking mode
            os.set_blocking(fd, False)

        def set_file(self, fd):
            self.socket = file_wrapper(fd)
            self._fileno = self.socket.fileno()
            self.add_channel()
