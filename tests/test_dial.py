"""The reactor's non-blocking dial (backhaul.net.dial), on real sockets on loopback.

To a host of this machine the handshake is over when ``connect`` returns: the dial must finish
then, without waiting for the socket to turn writable. When the handshake is still on its way
(here: a listener whose backlog is full drops the SYN, and the kernel sends it again a second
later) the dial must wait for it, and say why when it never comes.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from backhaul.net import dial
from backhaul.reactor import Reactor
from backhaul.resolver import Resolver

pytestmark = pytest.mark.timeout(20)


class Outcome:
    """What the dial handed to ``done``, and whether ``dial`` had returned by then."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.error = ""
        self.inside_dial = False
        self.watched = -1
        self.finished = threading.Event()



@pytest.fixture
def resolver(reactor):
    resolver = Resolver(reactor, threads=1)
    yield resolver
    resolver.close()


def start_dial(reactor: Reactor, resolver: Resolver, port: int, timeout: float) -> Outcome:
    outcome = Outcome()
    dialing = threading.Event()

    def done(sock: socket.socket | None, error: str) -> None:
        outcome.sock, outcome.error = sock, error
        outcome.inside_dial = dialing.is_set()
        if sock is not None:
            outcome.watched = reactor.watched(sock)
            reactor.forget(sock)
        outcome.finished.set()

    def run() -> None:
        dialing.set()
        dial(reactor, resolver, "127.0.0.1", port, timeout, done)
        dialing.clear()

    reactor.call_soon(run)
    return outcome


def test_a_dial_to_this_host_is_done_before_dial_returns_and_unwatched(reactor, resolver):
    listener = socket.create_server(("127.0.0.1", 0))
    outcome = start_dial(reactor, resolver, listener.getsockname()[1], 5.0)
    try:
        assert outcome.finished.wait(5)
        assert outcome.error == ""
        assert outcome.inside_dial, "the dial waited for WRITE on a connection that was up already"
        assert outcome.watched == 0, "the socket came back watched: the caller's watch would cost two calls"
        peer, _ = listener.accept()
        with peer:
            outcome.sock.sendall(b"through")
            assert peer.recv(100) == b"through"
    finally:
        if outcome.sock is not None:
            outcome.sock.close()
        listener.close()


def test_a_refused_dial_names_the_address_and_the_reason(reactor, resolver):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    outcome = start_dial(reactor, resolver, port, 5.0)
    assert outcome.finished.wait(5)
    assert outcome.sock is None
    assert outcome.error == f"cannot connect to 127.0.0.1:{port}: connection refused"


def full_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: the next SYN it gets is dropped."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    queued = []
    for _ in range(2):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(listener.getsockname())
        queued.append(sock)
    time.sleep(0.05)
    return listener, queued


def test_a_handshake_still_on_its_way_is_waited_for(reactor, resolver):
    listener, queued = full_listener()
    accepted: list[socket.socket] = []
    try:
        outcome = start_dial(reactor, resolver, listener.getsockname()[1], 8.0)
        time.sleep(0.3)
        assert not outcome.finished.is_set(), "a dial whose SYN was dropped finished at once"
        for _ in queued:   # room in the queue: the SYN sent again (after ~1 s) is answered
            accepted.append(listener.accept()[0])
        assert outcome.finished.wait(8)
        assert outcome.error == ""
        assert not outcome.inside_dial
        peer, _ = listener.accept()
        accepted.append(peer)
        outcome.sock.sendall(b"late")
        assert peer.recv(100) == b"late"
    finally:
        if outcome.sock is not None:
            outcome.sock.close()
        for sock in accepted + queued:
            sock.close()
        listener.close()


def test_a_handshake_that_never_comes_times_out(reactor, resolver):
    listener, queued = full_listener()
    try:
        port = listener.getsockname()[1]
        outcome = start_dial(reactor, resolver, port, 0.3)
        assert outcome.finished.wait(5)
        assert outcome.sock is None
        assert outcome.error == f"cannot connect to 127.0.0.1:{port}: timed out after 0.3 s"
    finally:
        for sock in queued:
            sock.close()
        listener.close()
