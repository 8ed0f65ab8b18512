"""A class supporting chat-style (command/response) protocols.

A drop-in for CPython 3.11's ``asynchat`` on top of :mod:`fastasyncore.asyncore`
(derived from CPython's asynchat.py, Sam Rushing, PSF licence).

The input side walks an offset over the received bytes instead of re-slicing
the buffer once per terminator, so a burst of N short records costs O(N) rather
than O(N * buffer); ``collect_incoming_data()``/``found_terminator()`` see exactly
the sequence 3.11 produces, and ``ac_in_buffer`` still reads and assigns as the
pending bytes.
"""

import inspect as _inspect
from collections import deque
from types import MethodType as _MethodType

from . import _backend
from . import asyncore
from ._loop import touch as _touch, POLLIN as _POLLIN, POLLPRI as _POLLPRI, \
     POLLOUT as _POLLOUT
from . import _loop
from ._loop import bound_is as _bound_is

__all__ = ["async_chat", "simple_producer", "find_prefix_at_end"]

_READ = _POLLIN | _POLLPRI
_BYTES_TYPES = (bytes, bytearray, memoryview)
_RECV = object()        # handle_read(): receive first (the method as called)


class async_chat(asyncore.dispatcher):
    """This is an abstract class.  You must derive from this class, and add
    the two methods collect_incoming_data() and found_terminator()"""

    # these are overridable defaults

    ac_in_buffer_size = 65536
    ac_out_buffer_size = 65536

    # we don't want to enable the use of encoding by default, because that is a
    # sign of an application bug that we don't want to pass silently

    use_encoding = 0
    encoding = 'latin-1'

    # Opt-in limits (fastasyncore extensions; None = unlimited, as 3.11).
    #: Bytes collected while waiting for a bytes terminator above which
    #: handle_input_overflow() is called (default: close the channel).
    max_input_bytes = None
    #: Queued output bytes above which push() calls handle_output_overflow().
    max_output_bytes = None
    _fa_since_term = 0

    # The unconsumed input is buf[pos:] of the list _fa_cur = [buf, pos];
    # ac_in_buffer materialises it.  One list, made by the first assignment
    # of ac_in_buffer (__init__'s) and only mutated afterwards, so that the
    # C handle_read (csrc/fa_chanio.c) reads and writes its two items
    # without an attribute lookup each (from C a read costs ~210
    # instructions and a write ~300, where the interpreter's specialized
    # bytecode pays ~10).  An instance attribute only, see
    # asyncore.dispatcher.__init__.  (A shallow copy of a channel shares it,
    # as it shares 3.11's `incoming` list and `producer_fifo`.)

    def __init__(self, sock=None, map=None):
        # for string terminator matching
        self.ac_in_buffer = b''

        # we use a list here rather than io.BytesIO for a few reasons...
        # del lst[:] is faster than bio.truncate(0)
        # lst = [] is faster than bio.truncate(0)
        self.incoming = []

        # we toss the use of the "simple producer" and replace it with
        # a pure deque, which the original fifo was a wrapping of
        self.producer_fifo = deque()
        asyncore.dispatcher.__init__(self, sock, map)

    @property
    def ac_in_buffer(self):
        cur = self._fa_cur
        pos = cur[1]
        if pos:
            cur[0] = cur[0][pos:]
            cur[1] = 0
        return cur[0]

    @ac_in_buffer.setter
    def ac_in_buffer(self, value):
        try:
            cur = self._fa_cur
        except AttributeError:      # the first assignment (__init__'s)
            self._fa_cur = [value, 0]
            return
        cur[0] = value
        cur[1] = 0

    def collect_incoming_data(self, data):
        raise NotImplementedError("must be implemented in subclass")

    def handle_input_overflow(self):
        """More than ``max_input_bytes`` arrived without a terminator.

        The default closes the channel; the unread input is dropped.
        """
        self.log_info('input limit of %d bytes exceeded, closing channel %r'
                      % (self.max_input_bytes, self), 'warning')
        self.discard_buffers()
        self.close()

    def handle_output_overflow(self):
        """push() took the queued output above ``max_output_bytes``.

        The default closes the channel (a peer that does not read must not
        make us buffer without bound); override to throttle instead.
        """
        self.log_info('output limit of %d bytes exceeded, closing channel %r'
                      % (self.max_output_bytes, self), 'warning')
        self.discard_buffers()
        self.close()

    def output_queued(self):
        """How many bytes are queued for sending (producers not counted)."""
        n = 0
        for x in self.producer_fifo:
            if isinstance(x, (bytes, bytearray, memoryview)):
                n += len(x)
        return n

    def _collect_incoming_data(self, data):
        self.incoming.append(data)

    def _get_data(self):
        d = b''.join(self.incoming)
        del self.incoming[:]
        return d

    def found_terminator(self):
        raise NotImplementedError("must be implemented in subclass")

    def set_terminator(self, term):
        """Set the input delimiter.

        Can be a fixed string of any length, an integer, or None.
        """
        if isinstance(term, str) and self.use_encoding:
            term = bytes(term, self.encoding)
        elif isinstance(term, int) and term < 0:
            raise ValueError('the number of received bytes must be positive')
        self.terminator = term

    def get_terminator(self):
        return self.terminator

    # grab some more data from the socket,
    # throw it to the collector method,
    # check for the terminator,
    # if found, transition to the next state.

    def handle_read(self, _fa_data=_RECV):
        # (_fa_data: the C method's entry, see _install_c_methods(); not
        # part of the API, and hidden from inspect.signature.  Positional:
        # 3.11 specializes calls of functions with defaults, not those with
        # keyword-only parameters)
        if _fa_data is None:
            # the C method hands over between records, the state in
            # _fa_cur as each iteration leaves it
            cur = self._fa_cur
            buf, pos = cur
        else:
            if _fa_data is _RECV:
                try:
                    data = self.recv(self.ac_in_buffer_size)
                except BlockingIOError:
                    return
                except OSError:
                    self.handle_error()
                    return
            else:
                data = _fa_data     # what the C method's recv returned

            if isinstance(data, str) and self.use_encoding:
                data = bytes(str, self.encoding)   # 3.11's latent bug, kept
            # self.ac_in_buffer = self.ac_in_buffer + data, without the
            # property (after the recv, as 3.11 reads ac_in_buffer)
            cur = self._fa_cur
            buf, pos = cur
            if pos:
                buf = buf[pos:]
            buf = buf + data if buf else b'' + data
            cur[0] = buf
            cur[1] = pos = 0
            limit = self.max_input_bytes
            if limit is not None and not self._fa_check_input(buf, pos, limit):
                return
        # Continue to search for self.terminator in self.ac_in_buffer,
        # while calling self.collect_incoming_data.  The while loop
        # is necessary because we might read several data+terminator
        # combos with a single recv(4096).
        #
        # Same steps as 3.11, over buf[pos:] instead of a re-sliced buffer.
        # Before each callback the offset is stored (so ac_in_buffer reads
        # right inside it); after it, buf/pos are reloaded (the callback may
        # have assigned ac_in_buffer or called discard_buffers()).
        fast = None     # get_terminator() not overridden?  Asked when needed.
        while len(buf) > pos:
            terminator = self.get_terminator()
            if not terminator:
                # no terminator, collect it all
                self.collect_incoming_data(buf[pos:] if pos else buf)
                self.ac_in_buffer = b''
            elif isinstance(terminator, int):
                # numeric terminator
                n = terminator
                lb = len(buf) - pos     # (3.11's lb: buf, pos are not reloaded
                                        # after get_terminator())
                if lb < n:
                    self.collect_incoming_data(buf[pos:] if pos else buf)
                    self.ac_in_buffer = b''
                    self.terminator = self.terminator - lb
                else:
                    self.collect_incoming_data(buf[pos:pos + n])
                    if cur[0] is buf and cur[1] == pos:
                        cur[1] = pos + n
                    else:
                        self.ac_in_buffer = self.ac_in_buffer[n:]
                    self.terminator = 0
                    self.found_terminator()
            else:
                # 3 cases:
                # 1) end of buffer matches terminator exactly:
                #    collect data, transition
                # 2) end of buffer matches some prefix:
                #    collect data to the prefix
                # 3) end of buffer does not match any prefix:
                #    collect data
                terminator_len = len(terminator)
                index = buf.find(terminator, pos)
                if index != -1:
                    # we found the terminator
                    if index > pos:
                        # don't bother reporting the empty string
                        # (source of subtle bugs)
                        self.collect_incoming_data(buf[pos:index])
                        if cur[0] is not buf or cur[1] != pos:
                            # The callback replaced the buffer: do what
                            # 3.11 does to whatever it holds now.
                            self.ac_in_buffer = self.ac_in_buffer[
                                index - pos + terminator_len:]
                            self.found_terminator()
                            buf, pos = cur
                            continue
                    cur[1] = pos = index + terminator_len
                    # This does the Right Thing if the terminator
                    # is changed here.
                    self.found_terminator()
                    if len(buf) > pos:
                        if fast is None:
                            fast = _bound_is(self, 'get_terminator',
                                             async_chat.get_terminator)
                        if fast:
                            self._fa_records(cur, buf, pos, terminator, terminator_len)
                else:
                    # check for a prefix of the terminator
                    index = _prefix_at_end(buf, pos, terminator)
                    if index:
                        if index != len(buf) - pos:
                            # we found a prefix, collect up to the prefix
                            self.collect_incoming_data(buf[pos:len(buf) - index])
                            self.ac_in_buffer = self.ac_in_buffer[-index:]
                        break
                    else:
                        # no prefix, collect it all
                        self.collect_incoming_data(buf[pos:] if pos else buf)
                        self.ac_in_buffer = b''
            buf, pos = cur

    def _fa_records(self, cur, buf, pos, terminator, terminator_len):
        # More records with the same terminator object in the same buffer:
        # the steps of handle_read(), without asking get_terminator() again
        # (it is not overridden).  The backend's scan() finds up to 256 of
        # them in one call (one C call per batch in the cffi backend); a
        # callback that changes the terminator or the buffer ends the batch
        # and handle_read() continues exactly as 3.11 would.
        scan = _backend.current.scan
        while True:
            indices = scan(buf, pos, terminator, 256)
            if not indices:
                return
            for index in indices:
                if self.terminator is not terminator or cur[0] is not buf \
                        or cur[1] != pos:
                    return
                if index > pos:
                    self.collect_incoming_data(buf[pos:index])
                    if cur[0] is not buf or cur[1] != pos:
                        self.ac_in_buffer = self.ac_in_buffer[
                            index - pos + terminator_len:]
                        self.found_terminator()
                        return
                cur[1] = pos = index + terminator_len
                self.found_terminator()
            if len(indices) < 256:
                return

    def _fa_check_input(self, buf, pos, limit):
        # Bytes waiting for a bytes terminator: what is buffered now plus
        # what was collected since the last terminator.
        term = getattr(self, 'terminator', None)
        if not term or isinstance(term, int):
            self._fa_since_term = 0
            return True
        if buf.find(term, pos) != -1:
            self._fa_since_term = 0
            return True
        self._fa_since_term += len(buf) - pos
        if self._fa_since_term > limit:
            self._fa_since_term = 0
            self.handle_input_overflow()
            return False
        return True

    def handle_write(self):
        self.initiate_send()

    def handle_close(self):
        self.close()

    def push(self, data):
        if not isinstance(data, _BYTES_TYPES):
            raise TypeError('data argument must be byte-ish (%r)',
                            type(data))
        sabs = self.ac_out_buffer_size
        fifo = self.producer_fifo
        f = self.initiate_send if not fifo and len(data) <= sabs \
            and self.connected else None
        # _bound_is(self, 'initiate_send', <ours>), inline (a call saved)
        if type(f) is _MethodType and f.__func__ is _INITIATE_SEND and f.__self__ is self:
            # 3.11's append + initiate_send() on an empty queue, as one step:
            # one self.send(data), and only what it did not take is queued.
            if data:
                try:
                    num_sent = self.send(data)
                except OSError:
                    fifo.append(data)      # where 3.11 has it at this point
                    self.handle_error()
                    return
                # (a user send() may return None)
                if not num_sent or num_sent < len(data):
                    self._fa_queue_rest(fifo, data, num_sent)
                return
            fifo.append(data)
            self.initiate_send()   # 3.11 makes a 0-byte send here
            return
        if len(data) > sabs:
            for i in range(0, len(data), sabs):
                fifo.append(data[i:i+sabs])
        else:
            fifo.append(data)
        if self.max_output_bytes is not None and \
                self.output_queued() > self.max_output_bytes:
            self.handle_output_overflow()
            return
        self.initiate_send()

    def _fa_queue_rest(self, fifo, data, num_sent):
        # push()'s fast branch: what the first send left goes to the queue
        if num_sent:
            data = data[num_sent:]
        fifo.append(data)
        if self.max_output_bytes is not None and \
                self.output_queued() > self.max_output_bytes:
            self.handle_output_overflow()
            return
        if self._fa_mask() != self._fa_regmask:
            _touch(self)

    def push_with_producer(self, producer):
        self.producer_fifo.append(producer)
        self.initiate_send()

    @asyncore._managed_predicate
    def readable(self):
        "predicate for inclusion in the readable for select()"
        # cannot use the old predicate, it violates the claim of the
        # set_terminator method.

        # return (len(self.ac_in_buffer) <= self.ac_in_buffer_size)
        return 1

    @asyncore._managed_predicate
    def writable(self):
        "predicate for inclusion in the writable for select()"
        return self.producer_fifo or (not self.connected)

    def _fa_mask(self):
        if not self.accepting and (self.producer_fifo or not self.connected):
            return _READ | _POLLOUT
        return _READ

    def close_when_done(self):
        "automatically close this channel once the outgoing queue is empty"
        self.producer_fifo.append(None)
        _touch(self)

    def initiate_send(self):
        try:
            if len(self.producer_fifo) > 1:
                fd = asyncore._fast_fd(self.socket)
                if fd >= 0 and _bound_is(self, 'send', asyncore.dispatcher.send):
                    self._initiate_sendv(fd)
                    return
            self._initiate_send()
        finally:
            if self._fa_mask() != self._fa_regmask:
                _touch(self)

    def _initiate_sendv(self, fd):
        # The wire bytes of 3.11's initiate_send (at most ac_out_buffer_size
        # per call), but leading byte chunks go out in one sendmsg() without
        # slicing them first.  Anything else -- a producer, None, an empty
        # entry, str with use_encoding -- takes 3.11's exact path.
        fifo = self.producer_fifo
        if not (fifo and self.connected):
            return
        first = fifo[0]
        if not first or first.__class__ not in _BYTES_TYPES:
            return self._initiate_send()
        obs = self.ac_out_buffer_size
        chunks = []
        total = 0
        for x in fifo:
            if not x or x.__class__ not in _BYTES_TYPES:
                break
            chunks.append(x)
            total += len(x)
            if total >= obs or len(chunks) >= 512:
                break
        try:
            n = _backend.current.sendv(fd, chunks, obs)
            if n < 0:
                err = -n
                if err == asyncore.EWOULDBLOCK:
                    return
                if err in asyncore._DISCONNECTED:
                    self.handle_close()
                    return
                raise OSError(err, asyncore._strerror(err))
        except OSError:
            self.handle_error()
            return
        while n:
            x = fifo[0]
            if len(x) <= n:
                n -= len(x)
                fifo.popleft()
            else:
                fifo[0] = x[n:]
                n = 0

    def _initiate_send(self):
        while self.producer_fifo and self.connected:
            first = self.producer_fifo[0]
            # handle empty string/buffer or None entry
            if not first:
                del self.producer_fifo[0]
                if first is None:
                    self.handle_close()
                    return

            # handle classic producer behavior
            obs = self.ac_out_buffer_size
            try:
                data = first[:obs]
            except TypeError:
                data = first.more()
                if data:
                    self.producer_fifo.appendleft(data)
                else:
                    del self.producer_fifo[0]
                continue

            if isinstance(data, str) and self.use_encoding:
                data = bytes(data, self.encoding)

            # send the data
            try:
                num_sent = self.send(data)
            except OSError:
                self.handle_error()
                return

            if num_sent:
                if num_sent < len(data) or obs < len(first):
                    self.producer_fifo[0] = first[num_sent:]
                else:
                    del self.producer_fifo[0]
            # we tried to send some actual data
            return

    def discard_buffers(self):
        # Emergencies only!
        self.ac_in_buffer = b''
        del self.incoming[:]
        self.producer_fifo.clear()
        _touch(self)


_loop.register_managed(async_chat, c_mask='async_chat')
_INITIATE_SEND = async_chat.initiate_send
# 3.11's signature: handle_read(self)
async_chat.handle_read.__signature__ = _inspect.signature(
    async_chat.handle_read).replace(parameters=[_inspect.Parameter(
        'self', _inspect.Parameter.POSITIONAL_OR_KEYWORD)])

# ---------------------------------------------------------------------------
# async_chat.push and handle_read in C (csrc/fa_chanio.c), where asyncore's C
# methods are installed.  The methods stay the reference: push's C fast
# branch ends only where the whole message went out in one send on a plain
# non-blocking socket; handle_read's handles records ended by a bytes
# terminator and hands everything else to the Python method, called with
# _fa_data (positional): the bytes its recv returned, or None to continue
# from the state in _fa_cur at the start of an iteration.  What
# follows a send that did not take everything, or a failed recv, happens
# here, in functions named like the methods (an OSError is caught in a frame
# named as 3.11's).
# ---------------------------------------------------------------------------


def push(self, fifo, data, num_sent, err):
    # async_chat.push after the C send of data: num_sent bytes sent (0:
    # EWOULDBLOCK), or err, the errno of a failed send
    if err:
        try:
            num_sent = asyncore._send_tail(self, err)
        except OSError:
            fifo.append(data)      # where 3.11 has it at this point
            self.handle_error()
            return
    async_chat._fa_queue_rest(self, fifo, data, num_sent)


_push_rest = push
del push


def handle_read(self, exc):
    # async_chat.handle_read's except clauses, for the C method's recv:
    # exc, an OSError other than BlockingIOError (re-raised here, so that
    # the traceback handle_error() sees starts in a frame of this name)
    try:
        raise exc
    except OSError:
        self.handle_error()
    finally:
        exc = None


_read_error = handle_read
del handle_read


def _install_c_methods():
    if not asyncore._C_METHODS:
        return False
    from . import _cloop
    make = getattr(_cloop, "chat_methods", None)
    if make is None:
        return False
    async_chat.push, async_chat.handle_read = make(
        async_chat.push, async_chat.initiate_send, _push_rest,
        async_chat.handle_read, async_chat.get_terminator, _read_error)
    return True


_C_METHODS = _install_c_methods()


class simple_producer:

    def __init__(self, data, buffer_size=512):
        self.data = data
        self.buffer_size = buffer_size

    def more(self):
        if len(self.data) > self.buffer_size:
            result = self.data[:self.buffer_size]
            self.data = self.data[self.buffer_size:]
            return result
        else:
            result = self.data
            self.data = b''
            return result


# Given 'haystack', see if any prefix of 'needle' is at its end.  This
# assumes an exact match has already been checked.  Return the number of
# characters matched.
# for example:
# f_p_a_e ("qwerty\r", "\r\n") => 1
# f_p_a_e ("qwertydkjf", "\r\n") => 0
# f_p_a_e ("qwerty\r\n", "\r\n") => <undefined>

# this could maybe be made faster with a computed regex?
# [answer: no; circa Python-2.0, Jan 2001]
# new python:   28961/s
# old python:   18307/s
# re:        12820/s
# regex:     14035/s

def find_prefix_at_end(haystack, needle):
    l = len(needle) - 1
    while l and not haystack.endswith(needle[:l]):
        l -= 1
    return l


def _prefix_at_end(buf, pos, needle):
    # find_prefix_at_end(buf[pos:], needle) without the copy.
    l = min(len(needle) - 1, len(buf) - pos)
    while l and not buf.endswith(needle[:l], pos):
        l -= 1
    return l
