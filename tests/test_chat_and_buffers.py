"""async_chat input/output and dispatcher_with_send, against the stdlib as reference."""

import socket

import pytest


def make_chat(asynchat, chunks, terminator, switch=None):
    """A chat whose recv() returns scripted chunks; records collect/found events."""
    events = []

    class Chat(asynchat.async_chat):
        def recv(self, n):
            return chunks.pop(0)

        def collect_incoming_data(self, data):
            events.append(bytes(data))

        def found_terminator(self):
            events.append("T")
            if switch:
                switch(self, events)

    c = Chat(map={})
    c.set_terminator(terminator)
    return c, events


def feed(c, n):
    for _ in range(n):
        c.handle_read()


def test_terminator_split_across_reads(impl):
    c, ev = make_chat(impl.asynchat, [b"ab\r", b"\ncd\r\nef", b"\r"], b"\r\n")
    feed(c, 3)
    assert ev == [b"ab", "T", b"cd", "T", b"ef"]
    assert c.ac_in_buffer == b"\r"


def test_terminator_changed_inside_found_terminator(impl):
    def switch(chat, events):
        if events.count("T") == 1:
            chat.set_terminator(2)
        elif chat.get_terminator() == 0:
            chat.set_terminator(2)

    c, ev = make_chat(impl.asynchat, [b"HDR\r\n12rest"], b"\r\n", switch)
    feed(c, 1)
    assert ev == [b"HDR", "T", b"12", "T", b"re", "T", b"st", "T"]


def test_numeric_terminator_counts_across_reads(impl):
    c, ev = make_chat(impl.asynchat, [b"abc", b"defgh"], 5)
    feed(c, 2)
    assert ev == [b"abc", b"de", "T", b"fgh"]
    assert c.get_terminator() == 0


@pytest.mark.parametrize("term", [None, 0, b""])
def test_falsy_terminator_collects_everything(impl, term):
    c, ev = make_chat(impl.asynchat, [b"abc", b"de"], term)
    feed(c, 2)
    assert ev == [b"abc", b"de"]


def test_adjacent_terminators_no_empty_collect(impl):
    c, ev = make_chat(impl.asynchat, [b"\n\n\nx\n"], b"\n")
    feed(c, 1)
    assert ev == ["T", "T", "T", b"x", "T"]


def test_ac_in_buffer_readable_and_assignable_inside_callback(impl):
    seen = []

    def switch(chat, events):
        seen.append(chat.ac_in_buffer)
        if len(seen) == 1:
            chat.ac_in_buffer = b"NEW\n"

    c, ev = make_chat(impl.asynchat, [b"a\nb\nc"], b"\n", switch)
    feed(c, 1)
    assert seen == [b"b\nc", b""]
    assert ev == [b"a", "T", b"NEW", "T"]


def test_flood_of_terminators(impl):
    c, ev = make_chat(impl.asynchat, [b"\n" * 5000], b"\n")
    feed(c, 1)
    assert ev == ["T"] * 5000


def test_push_rejects_non_bytes(impl):
    c, _ = make_chat(impl.asynchat, [], b"\n")
    for bad in ("str", None, 3):
        with pytest.raises(TypeError):
            c.push(bad)


def test_find_prefix_at_end(impl):
    f = impl.asynchat.find_prefix_at_end
    assert f("qwerty\r", "\r\n") == 1
    assert f("qwertydkjf", "\r\n") == 0
    assert f(b"ab\r\n\r", b"\r\n\r\n") == 3


def test_initiate_send_one_send_per_call(impl):
    sent = []

    class Chat(impl.asynchat.async_chat):
        def send(self, data):
            sent.append(len(data))
            return len(data)

    c = Chat(map={})
    c.connected = True
    c.push(b"x" * 200000)
    assert sent == [65536]
    assert len(c.producer_fifo) == 3
    c.initiate_send()
    assert sent == [65536, 65536]


def test_close_when_done_closes_after_queue(impl):
    closed = []

    class Chat(impl.asynchat.async_chat):
        def send(self, data):
            return len(data)

        def handle_close(self):
            closed.append(True)

    c = Chat(map={})
    c.connected = True
    c.push(b"abc")
    c.close_when_done()
    assert closed == []
    c.initiate_send()
    assert closed == [True]


def test_producers_and_simple_producer(impl):
    asynchat = impl.asynchat
    out = []

    class Chat(asynchat.async_chat):
        def send(self, data):
            out.append(bytes(data))
            return len(data)

    c = Chat(map={})
    c.connected = True
    c.push_with_producer(asynchat.simple_producer(b"hello world", buffer_size=4))
    for _ in range(10):
        c.initiate_send()
    assert b"".join(out) == b"hello world"


def _pump(asyncore, m, peer, want, limit=2000):
    got = bytearray()
    for _ in range(limit):
        asyncore.loop(timeout=0.01, map=m, count=1)
        try:
            while True:
                chunk = peer.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        except BlockingIOError:
            pass
        if len(got) >= want:
            break
    return bytes(got)


def test_dispatcher_with_send_semantics_and_order(impl):
    asyncore = impl.asyncore
    m = {}
    s, peer = socket.socketpair()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setblocking(False)
    d = asyncore.dispatcher_with_send(s, map=m)
    try:
        blob = bytes(range(256)) * 4096          # 1 MiB
        pieces = [blob[i:i + 1000] for i in range(0, len(blob), 1000)]
        for p in pieces:
            assert d.send(p) is None
        assert d.out_buffer                      # data still pending (small SNDBUF)
        assert isinstance(d.out_buffer, bytes)
        assert d.writable()
        got = _pump(asyncore, m, peer, len(blob))
        assert got == blob
        assert not d.out_buffer
        assert not d.writable()
    finally:
        asyncore.close_all(map=m)
        peer.close()


def test_dispatcher_with_send_out_buffer_assignable(impl):
    asyncore = impl.asyncore
    m = {}
    s, peer = socket.socketpair()
    peer.setblocking(False)
    d = asyncore.dispatcher_with_send(s, map=m)
    try:
        d.out_buffer = b"direct"
        assert d.out_buffer == b"direct"
        assert _pump(asyncore, m, peer, 6) == b"direct"
    finally:
        asyncore.close_all(map=m)
        peer.close()


def test_dispatcher_with_send_subclass_that_skips_its_init(backend):
    """A subclass calling dispatcher.__init__ only has no queue until it
    sends (or assigns out_buffer): the loop asks and registers it (the C
    loop's mask and the Python one) without one, and send() makes it."""
    from fastasyncore import asyncore
    m = {}
    s, peer = socket.socketpair()
    peer.setblocking(False)

    class Bare(asyncore.dispatcher_with_send):
        def __init__(self, sock, map):
            asyncore.dispatcher.__init__(self, sock, map=map)

        def handle_read(self):
            data = self.recv(100)
            if data != b"quiet":        # (a read that leaves it queue-less)
                self.send(data.upper())

    d = Bare(s, m)
    try:
        peer.send(b"quiet")
        for _ in range(3):
            asyncore.loop(timeout=0, map=m, count=1)    # adopted, queue-less
        assert not d.writable() and d.out_buffer == b""
        peer.send(b"ping")
        assert _pump(asyncore, m, peer, 4) == b"PING"
    finally:
        asyncore.close_all(map=m)
        peer.close()


def test_bookkeeping_attributes_shadow_no_class_attribute(backend):
    """Our per-channel state (_fa_regmask, dispatcher_with_send's _fa_out,
    async_chat's _fa_cur) lives on the instance only.  CPython 3.12+
    read an instance attribute that shadows a class attribute generically
    (no LOAD_ATTR_INSTANCE_VALUE): a class default would make every read of
    it, several per message, ~100 instructions dearer there."""
    from fastasyncore import asyncore, asynchat
    m = {}
    pairs = [socket.socketpair() for _ in range(3)]

    class Chat(asynchat.async_chat):
        def collect_incoming_data(self, data):
            pass

        def found_terminator(self):
            self.push(b"ok\n")

    chans = [asyncore.dispatcher(pairs[0][0], map=m),
             asyncore.dispatcher_with_send(pairs[1][0], map=m),
             Chat(pairs[2][0], map=m)]
    chans[2].set_terminator(b"\n")
    try:
        chans[1].send(b"x")
        pairs[2][1].send(b"line\n")
        for _ in range(5):
            asyncore.loop(timeout=0.01, map=m, count=1)
        assert pairs[2][1].recv(10) == b"ok\n"
        for c in chans:
            own = [n for n in vars(c) if n.startswith("_fa_")]
            assert "_fa_regmask" in own
            assert [n for n in own if hasattr(type(c), n)] == [], type(c)
        assert {"_fa_out"} <= set(vars(chans[1]))
        assert {"_fa_cur"} <= set(vars(chans[2]))
    finally:
        asyncore.close_all(map=m)
        for a, b in pairs:
            b.close()


def test_push_of_bytearray_later_mutated_is_sent_as_pushed(backend):
    from fastasyncore import asyncore, asynchat
    m = {}
    s, peer = socket.socketpair()
    peer.setblocking(False)

    class Chat(asynchat.async_chat):
        pass

    c = Chat(s, map=m)
    c.connected = False          # queue without sending yet
    data = bytearray(b"original")
    c.push(data)
    c.connected = True
    # 3.11 keeps a reference to the bytearray: mutation before sending changes
    # what goes out.  We match that (the deque holds the caller's object).
    data[:] = b"mutated!"
    try:
        assert _pump(asyncore, m, peer, 8) == b"mutated!"
    finally:
        asyncore.close_all(map=m)
        peer.close()


def test_many_records_with_a_switch_deep_in_the_buffer(impl):
    """More records than one scan batch, and a terminator change at record
    300 (inside the second batch): the same events as 3.11."""
    def switch(chat, events):
        if events.count("T") == 300:
            chat.set_terminator(b";")

    stream = b"".join(b"r%d\n" % i for i in range(300)) + b"a;b\nc;d"
    c, ev = make_chat(impl.asynchat, [stream], b"\n", switch)
    feed(c, 1)
    expect = []
    for i in range(300):
        expect += [b"r%d" % i, "T"]
    expect += [b"a", "T", b"b\nc", "T", b"d"]
    assert ev == expect
