"""The loop picks its wait strategy from the observed interest churn."""

import socket

from fastasyncore import _loop


def pairs(n):
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        out.append((a, b))
    return out


def assert_dispatches(asyncore, m, socks):
    """A byte from the first pair's peer is read by its channel."""
    got = []
    d = m[socks[0][0].fileno()]
    d.handle_read = lambda: got.append(d.recv(10))
    socks[0][1].send(b"x")
    asyncore.loop(timeout=0.5, use_poll=True, map=m, count=2)
    assert got == [b"x"]


def test_churning_docs_pattern_map_uses_stateless_poll(backend):
    from fastasyncore import asyncore
    m = {}
    socks = pairs(20)

    class Toggle(asyncore.dispatcher):
        flip = False

        def writable(self):
            self.flip = not self.flip      # a new answer every iteration
            return self.flip

        def handle_write(self):
            pass

    for a, _ in socks:
        Toggle(a, map=m)
    try:
        asyncore.loop(timeout=0, use_poll=True, map=m, count=_loop._ADAPT_FIRST)
        st = _loop._states[id(m)]
        assert st.poller is None            # switched to the stateless poll, early
        asyncore.loop(timeout=0, use_poll=True, map=m, count=_loop._ADAPT_EVERY * 2)
        assert st.poller is None            # and stays there
        assert_dispatches(asyncore, m, socks)
    finally:
        asyncore.close_all(map=m)
        for _, b in socks:
            b.close()


def test_idle_managed_map_uses_the_persistent_poller(backend):
    # (the first iterations use a stateless poll: adapt() moves a map of
    # more than 2 * _SMALL_MAP idle fds to the persistent poller)
    from fastasyncore import asyncore
    m = {}
    socks = pairs(2 * _loop._SMALL_MAP + 20)
    for a, _ in socks:
        asyncore.dispatcher_with_send(a, map=m)
    try:
        asyncore.loop(timeout=0, use_poll=True, map=m, count=_loop._ADAPT_EVERY * 2)
        st = _loop._states[id(m)]
        assert st.poller is not None
        assert st.poller.kind == backend.POLLER_KINDS[0]
    finally:
        asyncore.close_all(map=m)
        for _, b in socks:
            b.close()


def test_new_map_starts_with_the_stateless_poll(backend):
    # registering every fd with epoll costs a syscall per fd and per change
    # that a short-lived client loop never earns back: adapt() decides later
    from fastasyncore import asyncore
    if not _loop._can_poll_list():
        import pytest
        pytest.skip("no poll(2) here: the persistent poller from the start")
    m = {}
    socks = pairs(40)
    for a, _ in socks:
        asyncore.dispatcher_with_send(a, map=m)
    try:
        asyncore.loop(timeout=0, use_poll=True, map=m, count=1)
        st = _loop._states[id(m)]
        assert st.poller is None
        assert_dispatches(asyncore, m, socks)
    finally:
        asyncore.close_all(map=m)
        for _, b in socks:
            b.close()
