"""Parts of the tunnel core in this process, on real sockets: the control carrier's bound, name
lookups that never hold the relay workers, the pipe pool's budget and sizes, and an smux
session's receive buffer."""

from __future__ import annotations

import collections
import hashlib
import random
import socket
import threading
import time

import pytest

from backhaul import pipes as pipes_module
from backhaul import resolver as resolver_module
from backhaul.mux.session import MuxConnection, MuxSettings, MuxStream
from backhaul.pipes import SMALL, PipePool
from backhaul.protocol.smux import Session
from backhaul.reactor import Reactor
from backhaul.relay.splice import Relay
from backhaul.resolver import Resolver
from backhaul.tunnel.carrier import SocketCarrier
from backhaul.tunnel.control import ServerChannel
from backhaul.tunnel.mux_sessions import QUIET_SESSIONS_PER_POOL, SessionLinks
from tests.harness import wait_until

pytestmark = pytest.mark.timeout(60)



def on_reactor(reactor: Reactor, fn):
    """Run ``fn`` on the reactor thread and return its result."""
    done = threading.Event()
    box = []
    reactor.call_soon(lambda: (box.append(fn()), done.set()))
    assert done.wait(5)
    return box[0]


# --- the control channel's output bound -------------------------------------------------------

def test_link_requests_to_a_client_that_never_reads_end_the_channel_at_the_bound(reactor: Reactor) -> None:
    """Every byte to the client, 0x01 requests included, goes through the one bounded carrier."""
    ours, theirs = socket.socketpair()
    # Small socket buffers, so the kernel's share of what the peer never reads is small on every
    # system, and requests go on until the carrier's own backlog is past its bound.
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    lost: list[str] = []
    backlog = 4096
    carrier = SocketCarrier(reactor, ours, "client test", backlog=backlog)
    channel = ServerChannel(reactor, carrier, 3600, rtt_probe=True, on_lost=lambda reason, _g: lost.append(reason))
    on_reactor(reactor, channel.start)
    try:
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:  # the peer never reads
            on_reactor(reactor, lambda: channel.request_links(4096))
        wait_until(lambda: lost, 5, "the channel to be dropped")
        assert "does not read its control channel" in lost[0]
        assert on_reactor(reactor, lambda: len(carrier._out)) == 0  # released with the socket
        assert ours.fileno() == -1
    finally:
        theirs.close()
        if ours.fileno() >= 0:
            on_reactor(reactor, carrier.close)


# --- name lookups -----------------------------------------------------------------------------

def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    outer = socket.create_connection(listener.getsockname()[:2], timeout=10)
    inner, _ = listener.accept()
    return outer, inner


def test_slow_lookups_never_stall_a_running_relay(reactor: Reactor, monkeypatch: pytest.MonkeyPatch) -> None:
    """More stuck lookups than the pool has workers, and a bulk transfer (which needs the workers)
    still completes before any lookup returns."""
    release = threading.Event()
    real_resolve = resolver_module.resolve

    def stuck_resolve(host: str, port: int):
        release.wait(30)
        return real_resolve("127.0.0.1", port)

    monkeypatch.setattr(resolver_module, "resolve", stuck_resolve)
    resolver = Resolver(reactor)
    answers: list[object] = []
    for i in range(6):
        on_reactor(reactor, lambda i=i: resolver.lookup(f"slow{i}.example", 80, 30,
                                                        lambda result, _r: answers.append(result)))
    listener = socket.create_server(("127.0.0.1", 0))
    user, near = tcp_pair(listener)
    far, target = tcp_pair(listener)
    closed = threading.Event()
    try:
        relay = Relay(reactor, near, far, on_close=lambda _r: closed.set())
        reactor.call_soon(relay.start)
        data = random.Random(7).randbytes(32 << 20)
        sender = threading.Thread(target=lambda: (user.sendall(data), user.shutdown(socket.SHUT_WR)))
        sender.start()
        digest, got = hashlib.sha256(), 0
        target.settimeout(10)
        while True:
            chunk = target.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        sender.join(10)
        assert got == len(data) and digest.digest() == hashlib.sha256(data).digest()
        assert not answers, "a lookup finished before the transfer: the test proves nothing"
    finally:
        release.set()
        wait_until(lambda: len(answers) == 6, 10, "the lookups to answer")
        resolver.close()
        target.close()
        user.close()
        listener.close()
        wait_until(closed.is_set, 10, "the relay to close")


def test_a_lookup_that_outlives_its_timeout_answers_once_with_a_reason(reactor: Reactor,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(resolver_module, "resolve", lambda host, port: (release.wait(10), None)[1])
    resolver = Resolver(reactor)
    answers: list[tuple[object, str]] = []
    try:
        on_reactor(reactor, lambda: resolver.lookup("slow.example", 80, 0.3,
                                                    lambda result, reason: answers.append((result, reason))))
        wait_until(lambda: answers, 5, "the timeout to answer")
        assert answers == [(None, "lookup of slow.example timed out after 0.3 s")]
    finally:
        release.set()
        resolver.close()
    on_reactor(reactor, lambda: None)  # a late result would have been queued by now
    assert len(answers) == 1


# --- pipes ------------------------------------------------------------------------------------

def test_pipes_report_the_size_the_kernel_gave_and_refusals_once(caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_fcntl = pipes_module.fcntl.fcntl

    def refusing(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == pipes_module._F_SETPIPE_SZ:  # as for an unprivileged user past its pipe pages
            raise PermissionError(1, "Operation not permitted")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(pipes_module.fcntl, "fcntl", refusing)
    pool = PipePool()
    pipes = [pool.get() for _ in range(3)]
    try:
        assert all(p.size >= 4096 for p in pipes)
        assert pool.refused == 3
        assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    finally:
        for p in pipes:
            pool.discard(p)
        pool.close()


def test_past_the_pinned_budget_a_direction_takes_what_its_receiver_has_room_for() -> None:
    """A receiver that stopped reading (its send buffer full) gives a small bite past the
    budget, one with room a pipe's worth; within the budget, both a pipe's worth."""
    pool = PipePool(budget=2 << 20)
    pipe = pool.get()
    with socket.create_server(("127.0.0.1", 0)) as server:
        stalled = socket.create_connection(server.getsockname()[:2], timeout=10)
        never_reads, _ = server.accept()
        roomy = socket.create_connection(server.getsockname()[:2], timeout=10)
        reads, _ = server.accept()
    try:
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                stalled.send(bytes(1 << 20))
        assert pool.bite(pipe, stalled) == pool.bite(pipe, roomy) == pipe.size
        pool.pin(2 << 20)
        assert pool.bite(pipe, stalled) == min(pipe.size, SMALL)
        assert pool.bite(pipe, roomy) == min(pipe.size, max(SMALL, pipes_module.send_room(roomy)))
        assert pipes_module.send_room(roomy) > SMALL
        pool.pin(-(2 << 20))
        assert pool.bite(pipe, stalled) == pipe.size
    finally:
        for sock in (stalled, never_reads, roomy, reads):
            sock.close()
        pool.discard(pipe)
        pool.close()


# --- timers -----------------------------------------------------------------------------------

def test_cancelled_timers_are_swept_and_live_ones_still_run(reactor: Reactor) -> None:
    """A dial's timeout is cancelled at once: thousands of them must not pile up in the heap,
    and a live timer among them still fires, once."""
    fired: list[int] = []

    def schedule() -> None:
        for _ in range(5000):
            reactor.call_later(60, fired.append, -1).cancel()
        reactor.call_later(0.05, fired.append, 1)
        for _ in range(5000):
            reactor.call_later(60, fired.append, -1).cancel()

    on_reactor(reactor, schedule)
    wait_until(lambda: fired, 5, "the live timer to fire")
    assert fired == [1]
    assert on_reactor(reactor, lambda: len(reactor._heap.entries)) < 3000


# --- an smux session's receive buffer ---------------------------------------------------------

class _Heard:
    """A stream listener that only notes what it is told."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def stream_readable(self) -> None:
        self.told.append("readable")

    def stream_writable(self) -> None:
        self.told.append("writable")

    def stream_failed(self, reason: str) -> None:
        self.told.append(f"failed: {reason}")


def test_a_stream_closed_unread_gives_its_share_of_the_receive_buffer_back(reactor: Reactor) -> None:
    """One stream's unread bytes fill the session's receive buffer, so the session stops reading
    its socket (TCP backpressure); closing that stream drops them, and the session must read on
    for its other streams instead of waiting for a read that never comes."""
    receive_buffer = 64 * 1024
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname()[:2], timeout=10)
        ours, _ = server.accept()
    opened: list[MuxStream] = []
    lost: list[str] = []
    conn = MuxConnection(reactor, ours, "peer test", MuxSettings(1, 32768, receive_buffer, receive_buffer),
                         opener=False, on_stream=opened.append, on_lost=lambda _c, why: lost.append(why))
    peer = Session(1, True, 32768, 1 << 20, 1 << 20, now=time.monotonic())
    try:
        on_reactor(reactor, lambda: conn.start(b""))
        hog, other = peer.open_stream(), peer.open_stream()
        peer.write(hog, b"h" * (2 * receive_buffer))  # never read on our side
        theirs.sendall(peer.outgoing())
        wait_until(lambda: len(opened) == 2 and not on_reactor(reactor, lambda: conn.session.wants_input), 10,
                   "the receive buffer to fill")
        heard = _Heard()
        on_reactor(reactor, lambda: opened[1].listen(heard))
        on_reactor(reactor, opened[0].close)
        peer.write(other, b"still here")
        theirs.sendall(peer.outgoing())
        got = wait_until(lambda: on_reactor(reactor, lambda: opened[1].read(1024)), 10,
                         "the other stream's data (the session no longer reads its socket)")
        assert got == b"still here"
        assert "readable" in heard.told and not lost
    finally:
        on_reactor(reactor, conn.close)
        theirs.close()


class _Counted:
    """A stand-in for an smux session: only its streams are counted."""

    closed = False
    finishing = False
    busy = False

    def __init__(self, streams: int) -> None:
        self.streams = dict.fromkeys(range(streams))

    def busy_at(self, _now: float) -> bool:
        return self.busy


def _session_links(mux_con: int, *counts: int) -> tuple[SessionLinks, list[_Counted]]:
    """SessionLinks over stand-in sessions, told of each as a stream of it ended."""
    links = SessionLinks.__new__(SessionLinks)
    links.config = type("Config", (), {"mux_con": mux_con})()
    links._empty, links._with_room = {}, {}
    sessions = [_Counted(n) for n in counts]
    for conn in sessions:
        links._note_room(conn)  # type: ignore[arg-type]
    return links, sessions


def test_a_new_stream_goes_to_the_session_with_the_fewest_streams_that_has_room() -> None:
    """The server spreads users over the client's sessions: an empty one first (the one empty
    the longest), else the fewest streams, none past mux_con; a look or two per user."""
    links, sessions = _session_links(4, 4, 2, 3, 2, 5)
    assert links._free() is sessions[1]
    links, sessions = _session_links(4, 3, 2, 0, 1, 0)
    assert links._free() is sessions[2]
    sessions[2].streams[9] = None  # a stream opened there
    assert links._free() is sessions[4]
    sessions[4].streams[9] = None
    assert links._free() is sessions[2]   # none empty: the first with one stream
    sessions[1].streams.clear()           # its streams ended
    links._note_room(sessions[1])  # type: ignore[arg-type]
    assert links._free() is sessions[1]
    sessions[1].closed = True             # a session that ended is never given a stream
    assert links._free() is sessions[2]
    links, sessions = _session_links(4, 4, 7)
    assert links._free() is None


def test_a_new_stream_avoids_a_session_that_bulk_crosses() -> None:
    """Catches: an interactive user's stream put on the session that carries a download, where
    its frames wait behind the download's in the socket (fewer streams do not make up for it),
    or no session given when every one with room is busy."""
    links, sessions = _session_links(8, 1, 2, 1)
    sessions[0].busy = True
    assert links._free() is sessions[2]   # the quiet one with one stream, not the busy one
    sessions[2].busy = True
    assert links._free() is sessions[1]   # a quiet session with more streams still wins
    sessions[1].busy = True
    assert links._free() is sessions[0]   # all busy: the fewest streams, as before


def test_bulk_on_every_session_with_room_asks_for_one_quiet_session() -> None:
    """Catches: no session asked for when bulk crosses every session with room (the next user's
    stream would wait behind a download's losses), more than one asked at a time, a full quiet
    session taken for room, or sessions asked past QUIET_SESSIONS_PER_POOL x connection_pool."""
    links, sessions = _session_links(8, 1, 8)   # one stream, and a session that is full
    links.config.connection_pool = 2
    links.config.channel_size = 64
    links.sessions = list(sessions)
    links.requested = collections.deque()
    asked: list[int] = []
    links.ask = asked.append
    links._bulk_began(sessions[0])
    assert asked == []                   # it is quiet yet: nothing to do
    sessions[0].busy = True
    links._bulk_began(sessions[0])
    assert asked == [1]                  # the full session does not count as room
    links._bulk_began(sessions[0])
    assert asked == [1]                  # one on its way already
    links.requested[0] -= 60             # ... and never came: asked again
    links._bulk_began(sessions[0])
    assert asked == [1, 1]
    links.requested.clear()
    most = QUIET_SESSIONS_PER_POOL * links.config.connection_pool
    while len(links.sessions) < most:
        arrived = _Counted(0)
        arrived.busy = True
        links.sessions.append(arrived)
    links._bulk_began(sessions[0])
    assert asked == [1, 1]               # the bound: bulk everywhere, but enough sessions open
