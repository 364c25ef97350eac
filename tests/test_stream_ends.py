"""How a stream ends (docs/stream-ends.md), driven by hand: the smux session without sockets, then
one smux session on a socket pair and the relays on real sockets. Each case fixes one interleaving
that lost bytes or left a target open before."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from backhaul.mux.session import MuxConnection, MuxSettings, MuxStream
from backhaul.protocol import smux
from backhaul.protocol.smux import (
    FIN,
    HELLO_SID,
    NOP,
    PSH,
    SYN,
    Session,
    StreamEnded,
    StreamReset,
    encode_frame,
)
from backhaul.reactor import Reactor
from tests.harness import ends_with_reset, on_reactor

pytestmark = pytest.mark.timeout(30)

SETTINGS = {"frame_size": 32768, "receive_buffer": 4194304, "stream_buffer": 65536}


def ours(version: int, opener: bool) -> Session:
    return Session(version, opener, **SETTINGS)


def go(version: int, opener: bool) -> Session:
    """A session that speaks as the Go program's smux does: no hello, FIN closes for good."""
    return Session(version, opener, **SETTINGS, hello=False)


def exchange(a: Session, b: Session) -> tuple[list, list]:
    """Deliver what each side queued to the other until both are quiet: (a's events, b's events)."""
    got_a: list = []
    got_b: list = []
    while a.has_outgoing or b.has_outgoing:
        if a.has_outgoing:
            got_b += b.receive(a.outgoing(), 0.0)
        if b.has_outgoing:
            got_a += a.receive(b.outgoing(), 0.0)
    return got_a, got_b


def frames(wire: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while wire:
        _ver, cmd, length, sid = struct.unpack_from("<BBHI", wire)
        out.append((cmd, sid, wire[8:8 + length]))
        wire = wire[8 + length:]
    return out


# ------------------------------------------------------------------------------------------------
# the session, sans-IO

@pytest.mark.parametrize("version", [1, 2])
def test_hello_is_the_openers_first_frame_and_the_acceptors_first_answer(version):
    server, client = ours(version, True), ours(version, False)
    assert server.outgoing() == encode_frame(version, NOP, HELLO_SID)
    assert not client.has_outgoing, "a client speaks first on a new session: read as a handshake"
    sid = server.open_stream()
    client.receive(encode_frame(version, NOP, HELLO_SID) + server.outgoing(), 0.0)
    assert frames(client.outgoing())[0] == (NOP, HELLO_SID, b"")
    assert server.peer_half_closes is False and client.peer_half_closes is True
    server.receive(encode_frame(version, NOP, HELLO_SID), 0.0)
    assert server.peer_half_closes is True
    assert sid in server


@pytest.mark.parametrize("version", [1, 2])
def test_a_peer_without_hello_closes_both_ways_with_its_fin(version):
    """Item 2 at its root: a Go server sends FIN only once the stream is closed for good and
    discards what comes after. Before, our client took that FIN as a half-close and went on
    sending its target's bytes into the dead stream (GB/s, for as long as the target sent)."""
    server, client = go(version, True), ours(version, False)
    sid = server.open_stream()
    server.write(sid, b"\x00\x0412345")
    server.close_stream(sid)                      # the user went: Go closes the stream
    _, events = exchange(server, client)
    assert StreamEnded(sid) in events
    assert client.final_fin(sid)
    assert client.read(sid, 100) == b"\x00\x0412345"
    assert client.read(sid, 100) is None
    assert client.write(sid, b"x" * 100_000) == 100_000   # taken and dropped: the peer would drop it
    assert not [f for f in frames(client.outgoing()) if f[0] == PSH], "bytes sent into a closed stream"
    client.close_stream(sid)
    assert frames(client.outgoing()) == [(FIN, sid, b"")]  # what a Go peer expects, and ignores


@pytest.mark.parametrize("version", [1, 2])
def test_between_our_peers_fin_is_a_half_close(version):
    server, client = ours(version, True), ours(version, False)
    sid = server.open_stream()
    server.write(sid, b"request")
    server.shutdown_stream(sid)
    _, events = exchange(server, client)
    assert StreamEnded(sid) in events and not client.final_fin(sid)
    assert client.read(sid, 100) == b"request" and client.read(sid, 100) is None
    assert client.write(sid, b"answer") == 6
    client.shutdown_stream(sid)
    events, _ = exchange(server, client)
    assert server.read(sid, 100) == b"answer" and server.read(sid, 100) is None
    assert sid not in server and sid not in client  # both ends forgot it: a clean end, no reset
    assert not [e for e in events if isinstance(e, StreamReset)]


@pytest.mark.parametrize("version", [1, 2])
def test_a_stream_left_before_the_peer_ended_is_reset_between_our_peers(version):
    """Item 2 with our server: the user read part of an endless download and closed. The server
    had sent its FIN (the user's half-close) and then dropped the stream; the client only ever
    saw that FIN, so its target stayed open and kept sending. Now the drop is a reset."""
    server, client = ours(version, True), ours(version, False)
    sid = server.open_stream()
    server.shutdown_stream(sid)                   # the user half-closed
    exchange(server, client)
    assert client.write(sid, b"download" * 1000) == 8000
    server.receive(client.outgoing(), 0.0)
    server.close_stream(sid)                      # the user is gone for good
    wire = server.outgoing()
    assert frames(wire) == [(NOP, sid, b"")]
    assert client.receive(wire, 0.0) == [StreamReset(sid)]
    assert sid not in client and client.buffered == 0
    # frames the peer had in flight for it are read and dropped, not an error
    assert client.receive(encode_frame(version, PSH, sid, b"late"), 0.0) == []


@pytest.mark.parametrize("version", [1, 2])
def test_an_error_before_our_fin_is_a_reset_not_a_clean_end(version):
    """A side that fails mid-transfer (its socket reset) must not send FIN: the peer would read a
    clean end of data that did not all arrive."""
    server, client = ours(version, True), ours(version, False)
    sid = server.open_stream()
    server.write(sid, b"part of it")
    exchange(server, client)
    client.close_stream(sid)                      # the target broke before the client's FIN
    wire = client.outgoing()
    assert frames(wire) == [(NOP, sid, b"")]
    assert server.receive(wire, 0.0) == [StreamReset(sid)]


@pytest.mark.parametrize("version", [1, 2])
def test_a_stream_cut_before_the_peer_said_hello_waits_for_it_and_is_reset(version):
    """A user cut its upload on a session so new that the client's hello had not arrived: the
    server sent FIN, and the target read a clean end of an upload that did not all arrive (one
    run in 130 of bench/contention.py on wssmux). The end now waits for the peer's first bytes."""
    server, client = ours(version, True), ours(version, False)
    sid = server.open_stream()
    server.write(sid, b"\x00\x04part of an upload")
    server.close_stream(sid)                      # the user's reset, before the client spoke
    wire = server.outgoing()
    assert [f[0] for f in frames(wire)] == [NOP, SYN, PSH], "no end before the peer is known"
    assert server.next_deadline() <= smux.HELLO_WAIT
    client.receive(wire, 0.0)
    answer = client.outgoing()
    assert frames(answer)[0] == (NOP, HELLO_SID, b"")
    server.receive(answer, 0.01)
    end = server.outgoing()
    assert frames(end) == [(NOP, sid, b"")]
    assert client.receive(end, 0.01) == [StreamReset(sid)]


@pytest.mark.parametrize("peer_speaks", [True, False])
def test_a_stream_cut_before_a_go_peer_spoke_ends_with_fin(peer_speaks):
    """A Go client never says hello: its first bytes, or HELLO_WAIT of silence, settle it, and
    the stream ends with the FIN it understands."""
    server, client = ours(1, True), go(1, False)
    sid = server.open_stream()
    other = server.open_stream()
    server.close_stream(sid)
    client.receive(server.outgoing(), 0.0)
    assert not client.has_outgoing
    if peer_speaks:
        client.write(other, b"answer")
        server.receive(client.outgoing(), 0.5)
    else:
        server.tick(0.5)
        assert not [f for f in frames(server.outgoing()) if f[1] == sid], "ended before the wait"
        server.tick(smux.HELLO_WAIT)
    assert frames(server.outgoing()) == [(FIN, sid, b"")]
    assert server.next_deadline() > smux.HELLO_WAIT


def test_a_reset_from_a_peer_without_hello_is_ignored():
    """smux ignores a NOP's stream id: from a peer that never said hello it means nothing."""
    client = ours(1, False)
    client.receive(encode_frame(1, SYN, 3), 0.0)
    assert client.receive(encode_frame(1, NOP, 3), 0.0) == []
    assert 3 in client


def test_a_reset_of_a_stream_never_opened_is_a_protocol_error():
    from backhaul.errors import ProtocolError

    client = ours(1, False)
    client.receive(encode_frame(1, NOP, HELLO_SID) + encode_frame(1, SYN, 3), 0.0)
    with pytest.raises(ProtocolError, match="stream 9, which was never opened"):
        client.receive(encode_frame(1, NOP, 9), 0.0)


def test_our_opener_never_uses_the_hello_id():
    server = ours(1, True)
    server._last_opened = HELLO_SID - 2
    from backhaul.errors import ProtocolError

    with pytest.raises(ProtocolError, match="used up"):
        server.open_stream()


# ------------------------------------------------------------------------------------------------
# one smux session on a socket pair

class Pair:
    """An opener (server role) and an acceptor (client role) session on a socket pair, on one
    reactor; the acceptor's streams are collected as they open."""

    def __init__(self, version: int = 1, receive_buffer: int = 4194304) -> None:
        self.reactor = Reactor(2)
        self.reactor.start()
        a, b = socket.socketpair()
        settings = MuxSettings(version, 32768, receive_buffer, 65536)
        self.lost: list[str] = []
        self.accepted: list[MuxStream] = []
        self.opener = MuxConnection(self.reactor, a, "client", settings, opener=True, on_stream=None,
                                    on_lost=lambda _c, why: self.lost.append(f"opener: {why}"))
        self.acceptor = MuxConnection(self.reactor, b, "server", settings, opener=False,
                                      on_stream=self.accepted.append,
                                      on_lost=lambda _c, why: self.lost.append(f"acceptor: {why}"))
        self.on_reactor(self.opener.start)
        self.on_reactor(self.acceptor.start)

    def on_reactor(self, fn, *args):
        return on_reactor(self.reactor, fn, *args)

    def until(self, predicate, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.on_reactor(predicate):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.005)

    def close(self) -> None:
        self.on_reactor(self.opener.close)
        self.on_reactor(self.acceptor.close)
        self.reactor.stop()
        self.reactor.close()


@pytest.fixture
def pair(request):
    p = Pair(getattr(request, "param", 1))
    yield p
    p.close()


def read_all_now(stream: MuxStream) -> tuple[bytes, bool]:
    """What the stream has buffered, and whether EOF follows it."""
    chunks = []
    while True:
        data = stream.read(1 << 20)
        if data is None:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), False
        chunks.append(data)


@pytest.mark.parametrize("pair", [1, 2], indirect=True)
def test_a_session_that_ends_keeps_the_bytes_of_streams_that_ended_cleanly(pair):
    """Item 1: the server's stream had both FINs and the client's last bytes unread (its user
    reads slowly) when the client closed the session. Before, the session's end failed every
    stream, so those bytes were dropped and the user read a short clean EOF."""
    stream = pair.on_reactor(pair.opener.open_stream)
    pair.on_reactor(stream.write_whole, b"\x00\x04tail")
    pair.on_reactor(stream.shutdown_write)       # the user half-closed
    pair.until(lambda: pair.accepted, "the stream to open")
    far = pair.accepted[0]
    pair.until(lambda: read_all_now(far) == (b"\x00\x04tail", True), "the request and its FIN")
    tail = bytes(range(256)) * 800                # within a v2 window: one write, no reads needed
    pair.on_reactor(lambda: far.write_whole(tail))
    pair.on_reactor(far.shutdown_write)
    pair.on_reactor(far.close)                    # the client's relay is done with it
    pair.until(lambda: pair.opener.session._streams[stream.sid].fin_received, "the tail and its FIN")
    pair.on_reactor(pair.acceptor.close)          # the client's session goes
    pair.until(lambda: pair.opener.closed, "the session's end")
    got, eof = pair.on_reactor(read_all_now, stream)
    assert (len(got), eof) == (len(tail), True) and got == tail
    pair.on_reactor(stream.close)


@pytest.mark.parametrize("pair", [1, 2], indirect=True)
def test_a_session_that_ends_resets_the_streams_still_running(pair):
    stream = pair.on_reactor(pair.opener.open_stream)
    pair.on_reactor(stream.write_whole, b"\x00\x01x")
    pair.until(lambda: pair.accepted, "the stream to open")
    pair.on_reactor(pair.acceptor.close)
    pair.until(lambda: pair.opener.closed, "the session's end")
    with pytest.raises(ConnectionResetError):
        pair.on_reactor(stream.read, 100)
    pair.on_reactor(stream.close)
    assert pair.lost == ["opener: the peer closed the connection"]


def test_finish_sends_every_queued_frame_before_the_session_ends():
    """Item 1, the client's side: a fail-back or a reload closed the session while the tail of a
    download still waited in its outbox (the server read slowly), and it was dropped."""
    pair = Pair(1, receive_buffer=64 * 1024)   # the server stops reading at 64 KiB unread
    try:
        stream = pair.on_reactor(pair.opener.open_stream)
        pair.on_reactor(stream.write_whole, b"\x00\x01x")
        pair.on_reactor(stream.shutdown_write)
        pair.until(lambda: pair.accepted, "the stream to open")
        far = pair.accepted[0]
        pair.until(lambda: read_all_now(far) == (b"\x00\x01x", True), "the header and the FIN")
        tail = bytes(range(256)) * (16 * 1024)  # 4 MiB: far more than the socket pair holds
        pair.on_reactor(far.write_whole, tail)
        pair.on_reactor(far.shutdown_write)
        pair.on_reactor(far.close)
        pair.on_reactor(pair.acceptor.finish, 10.0)
        assert pair.on_reactor(lambda: bool(pair.acceptor._pending or pair.acceptor.session.has_outgoing)), \
            "frames must still wait when the session finishes, or this test shows nothing"
        received = bytearray()
        eof = False
        deadline = time.monotonic() + 20
        while not eof and time.monotonic() < deadline:
            data, eof = pair.on_reactor(read_all_now, stream)
            received += data
            time.sleep(0.002)
        assert eof and len(received) == len(tail) and bytes(received) == tail
        pair.until(lambda: pair.acceptor.closed and pair.opener.closed, "both ends to close")
        assert pair.lost == ["opener: the peer closed the connection"], "finish is no loss to its owner"
        pair.on_reactor(stream.close)
    finally:
        pair.close()


def test_finish_resets_what_still_runs_when_the_wait_is_over(pair):
    stream = pair.on_reactor(pair.opener.open_stream)
    pair.on_reactor(stream.write_whole, b"\x00\x01x")
    pair.until(lambda: pair.accepted, "the stream to open")
    pair.on_reactor(pair.acceptor.finish, 0.2)
    pair.until(lambda: pair.acceptor.closed, "the wait to end")
    with pytest.raises(ConnectionResetError):
        pair.on_reactor(pair.accepted[0].read, 10)
    pair.until(lambda: pair.opener.closed, "the server's end")
    pair.on_reactor(pair.accepted[0].close)
    pair.on_reactor(stream.close)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname()[:2], timeout=10)
        inner, _ = listener.accept()
    inner.settimeout(10)
    return outer, inner


@pytest.mark.parametrize("mode", ["splice", "copy", "stream"])
def test_a_reset_on_one_side_reaches_the_other_side_as_a_reset(mode):
    """user -> relay(s) -> target: the user's reset mid-upload must reach the target as a reset.
    Before, both relays shut the other socket down (a FIN): the target read a clean end of an
    upload that was cut."""
    from backhaul.relay import splice
    from backhaul.relay.stream import StreamRelay
    from tests.memstream import memory_stream_pair

    if mode == "splice" and not splice.HAS_SPLICE:
        pytest.skip("no splice here")
    reactor = Reactor(2)
    reactor.start()
    user, near = tcp_pair()
    far, target = tcp_pair()
    closed = threading.Semaphore(0)
    try:
        if mode == "stream":
            a, b = memory_stream_pair(reactor)
            relays = [StreamRelay(reactor, near, a, on_close=lambda _r: closed.release()),
                      StreamRelay(reactor, far, b, on_close=lambda _r: closed.release())]
        else:
            relays = [splice.Relay(reactor, near, far, on_close=lambda _r: closed.release(), mode=mode)]
        for relay in relays:
            reactor.call_soon(relay.start)
        user.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(target.recv(1 << 20))
        user.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        user.close()
        assert ends_with_reset(target), "the target read a clean end of an upload that was cut"
        for _ in relays:
            assert closed.acquire(timeout=10)
    finally:
        target.close()
        reactor.stop()
        reactor.close()


def test_a_final_eof_of_the_stream_closes_the_socket_once_its_bytes_are_delivered():
    """A Go peer's FIN (or a WebSocket's TCP EOF) ends both ways: the relay delivers what came
    before it, then closes the socket, instead of a half-close that leaves the target open and
    sending into a link nobody reads."""
    from backhaul.relay.stream import StreamRelay
    from tests.memstream import memory_stream_pair

    reactor = Reactor(2)
    reactor.start()
    far, target = tcp_pair()
    a, b = memory_stream_pair(reactor)
    b.final_eof = True
    closed = threading.Event()
    relay = StreamRelay(reactor, far, b, on_close=lambda _r: closed.set())
    try:
        reactor.call_soon(relay.start)
        done = threading.Event()

        def peer() -> None:   # the Go side: its last bytes, then FIN
            a.write(b"last words")
            a.shutdown_write()
            done.set()

        reactor.call_soon(peer)
        assert done.wait(5)
        got = b""
        while chunk := target.recv(100):
            got += chunk
        assert got == b"last words"
        assert closed.wait(5), "the relay kept the target's socket open after the peer's final EOF"
    finally:
        target.close()
        reactor.call_soon(a.close)
        reactor.stop()
        reactor.close()
