"""TLS for dispatchers: a non-blocking handshake run by the loop, STARTTLS.

Opt-in: nothing here changes what code written for 3.11's asyncore sees.
Put the mixin before the dispatcher class::

    class Handler(TLSMixin, asynchat.async_chat): ...

and call :meth:`TLSMixin.start_tls` on a connected channel (implicit TLS, or
STARTTLS in the middle of a line protocol) or on a client whose ``connect()``
is in progress.  The wrap and the handshake happen in the channel's own
events; :meth:`TLSMixin.handle_tls_established` is called once it completes.

Interest: a channel that keeps the stock ``readable()``/``writable()`` stays
*managed* (never asked per iteration): the mixin's ``_fa_mask()`` combines
the TLS layer's needs with the base class's answer, and every change of the
TLS state calls ``_loop.touch()``.  A class that overrides a predicate gets
it wrapped at class creation, so that the TLS layer decides during the
handshake and adds want-read/want-write after it.
"""

import functools
import ssl
from typing import Any, Callable, Optional

from . import _loop
from ._loop import POLLOUT, touch as _touch
from ._tlssock import ESTABLISHED, PLAIN, READ, TLSSocket

__all__ = ["TLSMixin"]


def _stock_pairs() -> Any:
    # (readable, writable) of the library's managed classes (_loop's registry)
    return {(t[0], t[1]) for t in _loop._MANAGED_TRIPLES}


def _wrap_predicate(func: Callable[[Any], Any], bit: int) -> Callable[[Any], Any]:
    """A user's readable()/writable() with the TLS layer's say added."""

    def predicate(self: Any) -> Any:
        t = self._fa_tls
        if t is None or self.accepting or t.phase == PLAIN:
            return func(self)
        if t.phase != ESTABLISHED:
            return bool(t.interest(0) & bit)
        answer = func(self)
        if not answer and t.interest(0) & bit:
            return True
        if answer and bit & READ and t.buffered():
            self._tls_ready_now()   # readable again, data already decrypted
        return answer

    functools.update_wrapper(predicate, func)
    predicate._fa_tls_wrapped = True        # type: ignore[attr-defined]
    return predicate


class TLSMixin:
    """TLS for ``dispatcher``, ``dispatcher_with_send`` and ``async_chat``."""

    #: True once the handshake completed (before handle_tls_established()).
    tls_established: bool = False
    _fa_tls: Optional[TLSSocket] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, bit in (("readable", READ), ("writable", POLLOUT)):
            f = _loop._static_attr(cls, name)
            if f is None or hasattr(type(f), "__set__") \
                    or getattr(f, "_fa_tls_wrapped", False):
                continue        # the library's managed predicate, or done
            setattr(cls, name, _wrap_predicate(f, bit))
        if (getattr(cls, "readable", None), getattr(cls, "writable", None)) \
                in _stock_pairs():
            # Stock predicates: our _fa_mask mirrors them plus the TLS state.
            _loop.register_managed(cls)

    # -- API --------------------------------------------------------------
    def start_tls(self, context: ssl.SSLContext, *, server_side: bool = False,
                  server_hostname: Optional[str] = None) -> None:
        """Switch the channel to TLS; the handshake runs from the loop.

        Output queued before this call leaves in plain text first; output
        queued after it leaves encrypted once the handshake completed.
        """
        if self._fa_tls is not None:
            raise ValueError("start_tls() was already called on this channel")
        sock = getattr(self, "socket", None)
        if sock is None or getattr(self, "accepting", False):
            raise ValueError("start_tls() needs a connected or connecting channel")
        fifo = getattr(self, "producer_fifo", None)
        if fifo is not None:                  # async_chat: a marker in the queue
            plain: Optional[int] = None if fifo else 0
        else:                                 # dispatcher(_with_send): a count
            q = getattr(self, "_fa_out", None)
            plain = q.nbytes if q is not None else 0
        t = TLSSocket(sock, context, server_side, server_hostname, plain,
                      lambda: _touch(self))
        self._fa_tls = t
        self.socket = t
        if fifo is not None and plain is None:
            fifo.append(_EndOfPlain(t))
        _touch(self)

    def handle_tls_established(self) -> None:
        """Called once, when the handshake completed."""

    # -- interest ---------------------------------------------------------
    def _fa_mask(self) -> int:
        base = super()._fa_mask()             # type: ignore[misc]
        t = self._fa_tls
        if t is None or self.accepting:       # type: ignore[attr-defined]
            return int(base)
        return t.interest(base)

    def _tls_ready_now(self) -> None:
        # Records already decrypted and kept by the SSL object: no socket
        # event will announce them.  The loop delivers a read event at the end
        # of the next iteration, whose wait does not block (_loop.ready_now).
        _loop.ready_now(self)

    # -- events -----------------------------------------------------------
    def _tls_setup(self, t: TLSSocket) -> bool:
        """An event before the TLS session is up: complete a connect() in
        progress, then wrap or advance the handshake.  -> True when the
        event is spent (no data for the channel yet)."""
        if not self.connected:                # type: ignore[attr-defined]
            if not self.connecting:           # type: ignore[attr-defined]
                return True
            self.handle_connect_event()       # type: ignore[attr-defined]
        if t.phase == ESTABLISHED:
            return False
        self._tls_handshake(t)
        return True

    def _tls_handshake(self, t: TLSSocket) -> None:
        try:
            done = t.handshake()
        except EOFError:
            self.handle_close()               # type: ignore[attr-defined]
            return
        if done:
            self.tls_established = True
            self.handle_tls_established()
            self._tls_ready_now()   # a record that came with the Finished

    def handle_read_event(self) -> None:
        t = self._fa_tls
        if t is not None and t.phase == PLAIN:
            self._tls_plain_sent(t)
        if t is None or t.phase == PLAIN or self.accepting:  # type: ignore[attr-defined]
            super().handle_read_event()       # type: ignore[misc]
            return
        if self._tls_setup(t):
            return
        retry_write = t.write_wants_read
        if retry_write:
            t.write_wants_read = False
        if t.fill():
            super().handle_read_event()       # type: ignore[misc]
        if not self._tls_mapped():
            return
        if retry_write:
            self.handle_write_event()
        if t.buffered():
            self._tls_ready_now()

    def _tls_plain_sent(self, t: TLSSocket) -> None:
        # async_chat reaches the end-of-plain marker only at its next write
        # event; when all the plain output before it has left, a read event
        # may already carry the peer's first TLS record (it answered our
        # plain reply, e.g. "220 Ready to start TLS"): TLS from here on, not
        # a plain read of the ClientHello.
        fifo = getattr(self, "producer_fifo", None)
        if fifo and isinstance(fifo[0], _EndOfPlain):
            fifo.popleft()
            t.end_plain()

    def _tls_mapped(self) -> bool:
        fd = self._fileno                     # type: ignore[attr-defined]
        return fd is not None and self._map.get(fd) is self  # type: ignore[attr-defined]

    def handle_write_event(self) -> None:
        t = self._fa_tls
        if t is None or self.accepting:       # type: ignore[attr-defined]
            super().handle_write_event()      # type: ignore[misc]
            return
        if t.phase == PLAIN:
            super().handle_write_event()      # type: ignore[misc]
            if t.phase == PLAIN or not self._tls_mapped():
                return
        if self._tls_setup(t):
            return
        if t.read_wants_write:
            t.read_wants_write = False
            self.handle_read_event()
            if not self._tls_mapped():
                return
        super().handle_write_event()          # type: ignore[misc]


class _EndOfPlain:
    """async_chat's producer_fifo marker: what is queued before it (when
    start_tls() was called) is plain text."""

    def __init__(self, t: TLSSocket) -> None:
        self._t = t

    def more(self) -> bytes:
        self._t.end_plain()
        return b""
