"""The socket a channel holds after ``start_tls()`` (see :mod:`fastasyncore.tls`).

Every byte a dispatcher sends or receives goes through ``self.socket``; after
``start_tls()`` that is a :class:`TLSSocket`.  It is not a ``socket.socket``,
so the C core's buffer I/O (``asyncore._fast_fd``: the send queue of
``dispatcher_with_send``, the writev path of ``async_chat``) never takes it,
and ``dispatcher.send``/``recv`` called on the base class reach it too.

Phases: PLAIN (output queued before ``start_tls()`` still leaving in plain
text), WRAP (to be wrapped at the channel's next event), HANDSHAKE,
ESTABLISHED.  Before ESTABLISHED, ``send()``/``recv()`` after the plain part
say EWOULDBLOCK (``dispatcher.send`` returns 0: the queues keep the data).
"""

import errno
import ssl
from typing import Any, Callable, Optional

from ._loop import DISCONNECTED, POLLIN, POLLPRI, POLLOUT

__all__ = ["TLSSocket", "PLAIN", "WRAP", "HANDSHAKE", "ESTABLISHED"]

PLAIN, WRAP, HANDSHAKE, ESTABLISHED = "plain", "wrap", "handshake", "established"
READ = POLLIN | POLLPRI
RW = READ | POLLOUT
#: one TLS record's worth: what a read event takes out of the SSL object
READ_SIZE = 16384


def _would_block() -> BlockingIOError:
    return BlockingIOError(errno.EWOULDBLOCK, "TLS layer not ready")


class TLSSocket:
    """``self.socket`` of a TLS channel: the raw socket, then the SSLSocket."""

    def __init__(self, raw: Any, context: ssl.SSLContext, server_side: bool,
                 server_hostname: Optional[str], plain_left: Optional[int],
                 changed: Callable[[], None]) -> None:
        self._sock: Any = raw
        self._context = context
        self._server_side = server_side
        self._server_hostname = server_hostname
        #: plain bytes still to send (None: until the channel says so)
        self.plain_left = plain_left
        self.phase = PLAIN if plain_left or plain_left is None else WRAP
        self._changed = changed       # the channel's touch()
        self.want_write = False       # the handshake waits for POLLOUT
        self.write_wants_read = False
        self.read_wants_write = False
        self._rbuf = b""              # decrypted, not yet recv()ed
        self._eof = False

    # -- delegation -------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return "<TLSSocket %s %r>" % (self.phase, self._sock)

    def fileno(self) -> int:
        return int(self._sock.fileno())

    @property
    def ssl_socket(self) -> Optional[ssl.SSLSocket]:
        s = self._sock
        return s if isinstance(s, ssl.SSLSocket) else None

    # -- phases -----------------------------------------------------------
    def end_plain(self) -> None:
        if self.phase == PLAIN:
            self.phase = WRAP
            self._changed()

    def interest(self, base: int) -> int:
        """The poll bits the channel needs, given what its predicates want."""
        phase = self.phase
        if phase == ESTABLISHED:
            if self.write_wants_read:
                base |= READ
            if self.read_wants_write:
                base |= POLLOUT
            return base
        if phase == HANDSHAKE:
            return RW if self.want_write else READ
        if phase == WRAP:
            return RW
        return base

    def handshake(self) -> bool:
        """Wrap (first time) and advance the handshake: True once done.

        SSLError propagates (handle_error); an unclean EOF is EOFError.
        """
        if self.phase == WRAP:
            self._sock = self._context.wrap_socket(
                self._sock, server_side=self._server_side,
                server_hostname=self._server_hostname,
                do_handshake_on_connect=False, suppress_ragged_eofs=True)
            self.phase = HANDSHAKE
            self._changed()
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self.want_write = False
        except ssl.SSLWantWriteError:
            self.want_write = True
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            raise EOFError("the peer closed the connection during the TLS handshake")
        except OSError as e:
            if not isinstance(e, ssl.SSLError) and e.errno in DISCONNECTED:
                raise EOFError("the peer reset the connection during the TLS handshake")
            raise
        else:
            self.phase = ESTABLISHED
            self.want_write = False
            self._changed()
            return True
        self._changed()
        return False

    # -- data -------------------------------------------------------------
    def send(self, data: Any, flags: int = 0) -> int:
        phase = self.phase
        if phase == PLAIN:
            left = self.plain_left
            if left is not None:
                data = memoryview(data)[:left]
            n = int(self._sock.send(data))
            if left is not None:
                self.plain_left = left - n
                if self.plain_left <= 0:
                    self.end_plain()
            return n
        if phase != ESTABLISHED:
            raise _would_block()
        if not data:
            return 0
        try:
            return int(self._sock.send(data))
        except ssl.SSLWantWriteError:
            raise _would_block() from None
        except ssl.SSLWantReadError:
            if not self.write_wants_read:
                self.write_wants_read = True
                self._changed()
            raise _would_block() from None

    def fill(self) -> bool:
        """Take the next record's data out of the SSL object (a read event).

        -> True when there is something for handle_read(): data or the end
        of the stream; False for a record without application data (a
        session ticket) or a partial record.
        """
        if self._rbuf or self._eof:
            return True
        try:
            data = self._sock.recv(READ_SIZE)
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:
            if not self.read_wants_write:
                self.read_wants_write = True
                self._changed()
            return False
        except OSError as e:
            if isinstance(e, ssl.SSLError) or e.errno not in DISCONNECTED:
                raise
            data = b""
        if data:
            self._rbuf = data
        else:
            self._eof = True
        return True

    def buffered(self) -> bool:
        """Data (or the end) is waiting above the socket: no event will come."""
        if self._rbuf or self._eof:
            return True
        s = self._sock
        return self.phase == ESTABLISHED and s.fileno() >= 0 and s.pending() > 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        phase = self.phase
        if phase == PLAIN:
            return bytes(self._sock.recv(bufsize))
        if phase != ESTABLISHED:
            raise _would_block()
        buf = self._rbuf
        if not buf:
            if self._eof or not self.fill():
                if self._eof:
                    return b""
                raise _would_block()
            buf = self._rbuf
        if len(buf) <= bufsize:
            self._rbuf = b""
            return buf
        self._rbuf = buf[bufsize:]
        return buf[:bufsize]

    def close(self) -> None:
        """Send close_notify (best effort, never blocks), then close."""
        s = self._sock
        if self.phase == ESTABLISHED and s.fileno() >= 0:
            try:
                s.unwrap()
            except (OSError, ValueError):
                pass    # want-read (the peer's close_notify) or a dead peer
        s.close()
