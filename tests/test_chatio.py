"""async_chat.push and async_chat.handle_read: every outcome, every case.

On the cffi backend these are C methods (csrc/fa_chanio.c): push sends a
whole message in one call where 3.11's fast branch would, handle_read
delivers records ended by a bytes terminator; everything else goes to the
Python code of asynchat.py.  Each test runs on every backend case and on
CPython 3.11's asynchat (the ``impl`` fixture), so the expected values below
are 3.11's: the callbacks' sequence, the queue, the bytes the peer gets,
handler calls and the name of the frame an error passed through.
"""

import errno
import socket
import sys

import pytest

from test_chanio import assert_flat, drain, last_frame_name, reset, tcp_pair


def chat(impl, term=b"\n", cls_attrs=None, **inst):
    """(channel, its socket, the peer): an async_chat recording its callbacks
    in ch.log as ("data", bytes) / ("term", terminator at the call)."""
    attrs = {
        "collect_incoming_data": lambda self, d: self.log.append(("data", bytes(d))),
        "found_terminator": lambda self: self.log.append(("term", self.get_terminator())),
        "handle_close": lambda self: (self.log.append(("close",)), self.close()),
        "handle_error": lambda self: self.log.append(("error", sys.exc_info()[0],
                                                      last_frame_name())),
    }
    attrs.update(cls_attrs or {})
    C = type("C", (impl.asynchat.async_chat,), attrs)
    a, b = socket.socketpair()
    ch = C(a, map={})
    ch.log = []
    ch.set_terminator(term)
    for k, v in inst.items():
        setattr(ch, k, v)
    return ch, a, b


def feed(ch, b, data):
    b.sendall(data)
    ch.handle_read()


# ---------------------------------------------------------------- handle_read


@pytest.mark.parametrize("data, log, left", [
    (b"one\n", [("data", b"one"), ("term", b"\n")], b""),
    (b"a\nbb\n\nccc\n", [("data", b"a"), ("term", b"\n"), ("data", b"bb"), ("term", b"\n"),
                        ("term", b"\n"), ("data", b"ccc"), ("term", b"\n")], b""),
    (b"a\npart", [("data", b"a"), ("term", b"\n"), ("data", b"part")], b""),
    (b"\n", [("term", b"\n")], b""),
])
def test_read_records(impl, data, log, left):
    ch, a, b = chat(impl)
    try:
        feed(ch, b, data)
        assert ch.log == log
        assert ch.ac_in_buffer == left
    finally:
        ch.close()
        b.close()


def test_read_prefix_kept_then_completed(impl):
    ch, a, b = chat(impl, term=b"\r\n")
    try:
        feed(ch, b, b"x\r\nhalf\r")
        assert ch.log == [("data", b"x"), ("term", b"\r\n"), ("data", b"half")]
        assert ch.ac_in_buffer == b"\r"
        feed(ch, b, b"\nnext\r\n")
        assert ch.log[3:] == [("term", b"\r\n"), ("data", b"next"), ("term", b"\r\n")]
        assert ch.ac_in_buffer == b""
    finally:
        ch.close()
        b.close()


def test_read_terminator_changed_by_found_terminator(impl):
    # b"\n", then a 3-byte count, then None (collect everything), then b";"
    order = [3, None, b";"]

    def found(self):
        self.log.append(("term", self.get_terminator()))
        if order:
            self.set_terminator(order.pop(0))

    ch, a, b = chat(impl, cls_attrs={"found_terminator": found})
    try:
        feed(ch, b, b"hdr\nabcrest")
        assert ch.log == [("data", b"hdr"), ("term", b"\n"), ("data", b"abc"), ("term", 0),
                          ("data", b"rest")]
        ch.set_terminator(b";")
        feed(ch, b, b"x;y;")
        assert ch.log[5:] == [("data", b"x"), ("term", b";"), ("data", b"y"), ("term", b";")]
    finally:
        ch.close()
        b.close()


def test_read_collect_replaces_the_buffer(impl):
    # 3.11: after collect_incoming_data() the terminator is cut off whatever
    # ac_in_buffer holds then
    def collect(self, d):
        self.log.append(("data", d))
        if d == b"a":
            self.ac_in_buffer = b"0123456789"

    ch, a, b = chat(impl, cls_attrs={"collect_incoming_data": collect})
    try:
        feed(ch, b, b"a\nb\n")
        assert ch.log == [("data", b"a"), ("term", b"\n"), ("data", b"23456789")]
        assert ch.ac_in_buffer == b""
    finally:
        ch.close()
        b.close()


@pytest.mark.parametrize("new", [b"q\nr", bytearray(b"q\nr")])
def test_read_found_terminator_replaces_the_buffer(impl, new):
    # Reading goes on from whatever a callback leaves in ac_in_buffer: bytes
    # (the C method reads on) or anything else (the Python method does).
    def found(self):
        self.log.append(("term",))
        if len(self.log) == 2:
            self.ac_in_buffer = new + self.ac_in_buffer

    ch, a, b = chat(impl, cls_attrs={"found_terminator": found})
    try:
        feed(ch, b, b"a\nb\n")
        assert ch.log == [("data", b"a"), ("term",), ("data", b"q"), ("term",),
                          ("data", b"rb"), ("term",)]
        assert bytes(ch.ac_in_buffer) == b""
        feed(ch, b, b"c\n")
        assert ch.log[6:] == [("data", b"c"), ("term",)]
    finally:
        ch.close()
        b.close()


def test_read_without_async_chat_init_receives_first(impl):
    # A subclass that skips async_chat.__init__ has no input buffer: as in
    # 3.11, handle_read() receives first and then fails on the missing
    # buffer (the bytes are gone from the socket).
    class C(impl.asynchat.async_chat):
        def __init__(self, sock):
            impl.asyncore.dispatcher.__init__(self, sock, map={})

    a, b = socket.socketpair()
    ch = C(a)
    try:
        b.sendall(b"lost\n")
        with pytest.raises(AttributeError):
            ch.handle_read()
        b.sendall(b"next")
        assert a.recv(100) == b"next"
    finally:
        ch.close()
        b.close()


def test_read_found_terminator_discards_or_closes(impl):
    def found(self):
        self.log.append(("term",))
        if len(self.log) == 2:
            self.discard_buffers()
        elif len(self.log) > 3:
            self.close()

    ch, a, b = chat(impl, cls_attrs={"found_terminator": found})
    try:
        feed(ch, b, b"a\nlost\n")
        assert ch.log == [("data", b"a"), ("term",)]
        feed(ch, b, b"b\nc\nd\n")
        # close() in found_terminator does not end the loop (3.11)
        assert ch.log[2:] == [("data", b"b"), ("term",), ("data", b"c"), ("term",),
                              ("data", b"d"), ("term",)]
        assert ch.socket.fileno() == -1
    finally:
        ch.close()
        b.close()


def test_read_overridden_get_terminator_is_asked(impl):
    asked = []

    def get_terminator(self):
        asked.append(1)
        return self.terminator

    ch, a, b = chat(impl, cls_attrs={"get_terminator": get_terminator})
    try:
        feed(ch, b, b"a\nb\n")
        assert ch.log == [("data", b"a"), ("term", b"\n"), ("data", b"b"), ("term", b"\n")]
        assert len(asked) == 4          # twice per record: the loop, the log
    finally:
        ch.close()
        b.close()


def test_read_input_limit(impl):
    if impl.name == "stdlib":
        pytest.skip("max_input_bytes is a fastasyncore extension")
    ch, a, b = chat(impl, max_input_bytes=8)
    try:
        feed(ch, b, b"ok\n")
        assert ch.log == [("data", b"ok"), ("term", b"\n")]
        feed(ch, b, b"x" * 20)          # handle_input_overflow(): close()
        assert ch.log[2:] == []
        assert ch.socket.fileno() == -1
    finally:
        ch.close()
        b.close()


def test_read_callback_exception_propagates(impl):
    def found(self):
        raise KeyError("boom")

    ch, a, b = chat(impl, cls_attrs={"found_terminator": found})
    try:
        b.sendall(b"a\nb\n")
        with pytest.raises(KeyError):
            ch.handle_read()
        assert ch.log == [("data", b"a")]
        assert ch.ac_in_buffer == b"b\n"
    finally:
        ch.close()
        b.close()


def test_read_nothing_there_is_quiet(impl):
    ch, a, b = chat(impl)
    try:
        ch.handle_read()                 # BlockingIOError: return
        assert ch.log == []
    finally:
        ch.close()
        b.close()


def test_read_eof_and_reset_close(impl):
    ch, a, b = chat(impl)
    b.close()
    ch.handle_read()
    assert ch.log == [("close",)]
    C = type(ch)
    ch, a, b = tcp_pair(C)
    ch.log = []
    ch.set_terminator(b"\n")
    reset(b)
    for _ in range(200):
        ch.handle_read()
        if ch.log:
            break
    assert ch.log == [("close",)]


def test_read_recv_error_goes_to_handle_error(impl):
    def recv(n):
        raise OSError(errno.EIO, "injected")

    ch, a, b = chat(impl)
    try:
        ch.recv = recv
        ch.handle_read()
        assert ch.log == [("error", OSError, "recv")]
    finally:
        ch.close()
        b.close()


def test_read_instance_recv_and_str_data(impl):
    ch, a, b = chat(impl)
    try:
        ch.recv = lambda n: bytearray(b"ba\n")
        ch.handle_read()
        assert ch.log == [("data", b"ba"), ("term", b"\n")]
    finally:
        ch.close()
        b.close()


def test_read_many_records_one_read(impl):
    ch, a, b = chat(impl)
    try:
        lines = [b"%d" % i for i in range(3000)]
        b.sendall(b"\n".join(lines) + b"\n")
        for _ in range(100):
            try:
                ch.handle_read()
            except BlockingIOError:
                pass
            if len(ch.log) == 6000:
                break
        assert [d for k, *d in ch.log if k == "data"] == [[x] for x in lines]
    finally:
        ch.close()
        b.close()


# ---------------------------------------------------------------- push


def test_push_sends_at_once(impl):
    ch, a, b = chat(impl)
    try:
        ch.push(b"hello\n")
        assert not ch.producer_fifo
        assert drain(b, 6) == b"hello\n"
    finally:
        ch.close()
        b.close()


def test_push_partial_and_full_socket(impl):
    ch, a, b = chat(impl)
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * 256                 # 65536: one send takes part
        ch.push(big)
        assert ch.producer_fifo and ch.writable()
        left = b"".join(ch.producer_fifo)
        assert big.endswith(left) and len(left) < len(big)
        ch.push(b"tail")                               # queued behind it
        got = b""
        for _ in range(2000):
            got += drain(b, 1, limit=1)
            if len(got) >= len(big) + 4:
                break
            ch.handle_write()
        assert got == big + b"tail"
    finally:
        ch.close()
        b.close()


def test_push_to_reset_peer_closes(impl):
    C = type(chat(impl)[0])
    ch, a, b = tcp_pair(C)
    ch.log = []
    reset(b)
    for _ in range(200):
        ch.push(b"x")
        if ch.log:
            break
    assert ch.log == [("close",)]


def test_push_send_error_goes_to_handle_error(impl):
    ch, a, b = chat(impl)
    b.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # EDESTADDRREQ
    u.setblocking(False)
    ch.del_channel()
    ch.set_socket(u, map={})
    ch.connected = True
    try:
        ch.push(b"dgram")
        assert ch.log == [("error", OSError, "send")]
        assert list(ch.producer_fifo) == [b"dgram"]
    finally:
        ch.close()


def test_push_user_send_is_called(impl):
    sent = []

    def send(data):
        sent.append(data)
        return len(data)

    ch, a, b = chat(impl)
    try:
        ch.send = send
        ch.push(b"mine")
        assert sent == [b"mine"] and not ch.producer_fifo
    finally:
        ch.close()
        b.close()


@pytest.mark.parametrize("data", [bytearray(b"ba"), memoryview(b"mv"), b""])
def test_push_other_data(impl, data):
    ch, a, b = chat(impl)
    try:
        ch.push(data)
        assert drain(b, len(data)) == bytes(data) if data else True
        assert not ch.producer_fifo
        with pytest.raises(TypeError):
            ch.push("str")
    finally:
        ch.close()
        b.close()


def test_push_bigger_than_out_buffer_is_split(impl):
    ch, a, b = chat(impl, ac_out_buffer_size=4)
    try:
        ch.push(b"0123456789")
        got = b""
        for _ in range(20):
            got += drain(b, 1, limit=1)
            if len(got) == 10:
                break
            ch.handle_write()
        assert got == b"0123456789"
    finally:
        ch.close()
        b.close()


def test_push_unconnected_queues(impl):
    ch, a, b = chat(impl)
    try:
        ch.connected = False
        ch.push(b"later")
        assert list(ch.producer_fifo) == [b"later"]
    finally:
        ch.close()
        b.close()


# ---------------------------------------------------------------- references


def test_chat_methods_leak_nothing(backend):
    """Every path of push/handle_read in C, 20,000 rounds: the object count,
    the refcounts of the objects passed in and RSS stay flat."""
    from fastasyncore import asynchat
    if not (backend.NAME == "cffi" and asynchat._C_METHODS):
        pytest.skip("the C methods run on the cffi backend only")

    class C(asynchat.async_chat):
        def collect_incoming_data(self, d):
            self.n += 1
            if d == b"swap":
                self.ac_in_buffer = b"--x\n"

        def found_terminator(self):
            self.n += 1
            if self.n % 7 == 0:
                # something else than bytes: the Python method reads on
                self.ac_in_buffer = bytearray(b"y\n") + self.ac_in_buffer

    a, b = socket.socketpair()
    b.setblocking(False)
    ch = C(a, map={})
    ch.n = 0
    ch.set_terminator(b"\n")
    msg, inp = b"m" * 64, b"a\nbb\nswap\npart"
    keep = (msg, inp, ch, b"\n")

    def round_():
        ch.push(msg)
        b.recv(65536)
        b.send(inp)
        ch.handle_read()                 # records, a replaced buffer, a prefix
        b.send(b"\n")
        ch.handle_read()
        ch.handle_read()                 # nothing there
        ch.set_terminator(b"\n")
        ch.ac_in_buffer = b""

    try:
        assert_flat(round_, keep)
        assert ch.n > 20000
    finally:
        ch.close()
        b.close()


def test_fast_paths_only_on_the_c_backend(backend):
    from fastasyncore import asynchat
    ch, a, b = chat(type("I", (), {"asynchat": asynchat})())
    try:
        b.sendall(b"r1\nr2\n")
        lib = []

        def prof(frame, event, arg):
            if event == "call" and frame.f_code.co_filename.endswith(
                    ("asynchat.py", "asyncore.py")):
                lib.append(frame.f_code.co_name)
        sys.setprofile(prof)
        try:
            ch.handle_read()
            ch.push(b"x")
        finally:
            sys.setprofile(None)
        if backend.NAME == "cffi" and asynchat._C_METHODS:
            assert lib == ["get_terminator"] * 2      # (the log's, in found_terminator)
        else:
            assert "handle_read" in lib and "push" in lib
        assert ch.log == [("data", b"r1"), ("term", b"\n"), ("data", b"r2"), ("term", b"\n")]
        assert drain(b, 1) == b"x"
    finally:
        ch.close()
        b.close()
