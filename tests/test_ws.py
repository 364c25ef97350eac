"""The WebSocket link (backhaul/links/websocket.py) on real loopback sockets, with the reactor in this process.

Messages mode and the control carrier against a raw wsproto peer (a blocking socket in the test
thread, standing in for gorilla); stream mode through the relay conformance cases of
tests/test_relay.py, run over two stream relays back to back on a real WebSocket pair:
user <-> StreamRelay <-> WebSocketStream(client) <=> WebSocketStream(server) <-> StreamRelay <-> target,
plain and over TLS.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import logging
import os
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from backhaul.links import websocket as ws_module
from backhaul.links.websocket import (
    FIN_PING,
    FRAME_SIZE,
    MESSAGE_SIZE,
    SERVER_MESSAGE,
    WebSocket,
    WebSocketCarrier,
    WebSocketStream,
)
from backhaul.log import Throttle
from backhaul.protocol.ws_frame import frame_head
from backhaul.reactor import Reactor, Timer
from backhaul.relay.stream import READ_CHUNK, Stream, StreamListener, StreamRelay
from tests import conformance
from tests.conformance import read_all, read_until_closed, send_and_finish, send_until_broken, tcp_pair, wait_until

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def on_reactor(reactor: Reactor, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on the reactor thread and return its result (or raise its exception)."""
    done = threading.Event()
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn(*args))
        except BaseException as exc:
            box.append(exc)
        finally:
            done.set()

    reactor.call_soon(run)
    assert done.wait(10), "the reactor did not run a call"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class RawPeer:
    """The other end as a plain wsproto connection on a blocking socket, driven by the test."""

    def __init__(self, sock: socket.socket, *, client: bool) -> None:
        self.sock = sock
        sock.settimeout(10)
        self.conn = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self.pending: collections.deque[Event] = collections.deque()

    def wire(self, *events: Event) -> bytes:
        return b"".join(bytes(self.conn.send(event)) for event in events)

    def send(self, *events: Event) -> None:
        self.sock.sendall(self.wire(*events))

    def next_event(self) -> Event | None:
        """The next event, None at EOF."""
        while not self.pending:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.conn.receive_data(data)
            self.pending.extend(self.conn.events())
        return self.pending.popleft()

    def message_bytes(self, count: int) -> bytes:
        """Message payloads until ``count`` bytes arrived (pings answered on the way)."""
        got = bytearray()
        while len(got) < count:
            event = self.next_event()
            assert event is not None, f"EOF after {len(got)} of {count} bytes"
            if isinstance(event, BytesMessage | TextMessage):
                got += event.data if isinstance(event.data, bytes | bytearray) else event.data.encode()
            elif isinstance(event, Ping):
                self.send(event.response())
        return bytes(got)


class Messages:
    """Collects what a websocket in messages mode hands up (reactor thread) for the test thread."""

    def __init__(self) -> None:
        self.items: list[bytes | str] = []
        self.lost: list[str] = []
        self.changed = threading.Condition()

    def on_message(self, message: bytes | str) -> None:
        with self.changed:
            self.items.append(message)
            self.changed.notify_all()

    def on_lost(self, reason: str) -> None:
        with self.changed:
            self.lost.append(reason)
            self.changed.notify_all()

    def wait(self, predicate: Callable[[], object], what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, 10), f"timed out waiting for {what}: {self.items} {self.lost}"


class Collector:
    """A stream listener that reads everything into ``data`` until EOF or failure."""

    def __init__(self, stream: WebSocketStream) -> None:
        self.stream = stream
        self.data = bytearray()
        self.failed: str | None = None
        self.ended = threading.Event()
        self.eof = False

    def stream_readable(self) -> None:
        while True:
            data = self.stream.read(1 << 20)
            if data is None:
                self.eof = True
                self.ended.set()
                return
            if not data:
                return
            self.data += data

    def stream_writable(self) -> None:
        pass

    def stream_failed(self, reason: str) -> None:
        self.failed = reason
        self.ended.set()


def ws_on(reactor: Reactor, sock: socket.socket, *, client: bool, **options: Any) -> WebSocket:
    return on_reactor(reactor, lambda: WebSocket(reactor, sock, client=client, peer="peer", **options))


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, f"errors logged: {[r.getMessage() for r in errors]}"


# ------------------------------------------------------------------------------------------------
# messages mode and the control carrier

def test_control_bytes_both_ways_one_message_each(reactor, listener, caplog):
    client_sock, server_sock = tcp_pair(listener)
    cws = ws_on(reactor, client_sock, client=True)
    sws = ws_on(reactor, server_sock, client=False)
    got: dict[str, list[bytes]] = {"client": [], "server": []}
    lost: list[str] = []
    cond = threading.Condition()

    def data(side: str) -> Callable[[bytes], None]:
        def on_data(chunk: bytes) -> None:
            with cond:
                got[side].append(chunk)
                cond.notify_all()
        return on_data

    carriers = [WebSocketCarrier(cws), WebSocketCarrier(sws)]
    assert carriers[0].peer == "peer"
    on_reactor(reactor, carriers[0].start, data("client"), lost.append)
    on_reactor(reactor, carriers[1].start, data("server"), lost.append)
    on_reactor(reactor, carriers[0].send, b"\x00\x01\x03")   # several bytes: one message each
    on_reactor(reactor, carriers[1].send, b"\x00")
    on_reactor(reactor, carriers[1].send, b"\x01\x01")
    with cond:
        assert cond.wait_for(lambda: len(got["server"]) == 3 and len(got["client"]) == 3, 10)
    assert got["server"] == [b"\x00", b"\x01", b"\x03"]
    assert got["client"] == [b"\x00", b"\x01", b"\x01"]
    on_reactor(reactor, carriers[0].close)
    on_reactor(reactor, carriers[0].close)  # idempotent
    with cond:
        assert cond.wait_for(lambda: lost, 10)
    assert lost == ["peer closed the websocket connection"]  # the server's carrier saw EOF
    on_reactor(reactor, carriers[1].send, b"\x00")           # after the end: ignored
    assert cws.closed and sws.closed
    no_errors_logged(caplog)


def test_control_frames_on_the_wire_are_one_byte_binary_messages(reactor, listener):
    client_sock, server_sock = tcp_pair(listener)
    cws = ws_on(reactor, client_sock, client=True)
    carrier = WebSocketCarrier(cws)
    on_reactor(reactor, carrier.start, lambda _d: None, lambda _r: None)
    on_reactor(reactor, carrier.send, b"\x00\x03")
    peer = RawPeer(server_sock, client=False)
    first, second = peer.next_event(), peer.next_event()
    assert isinstance(first, BytesMessage) and first.data == b"\x00" and first.message_finished
    assert isinstance(second, BytesMessage) and second.data == b"\x03" and second.message_finished
    on_reactor(reactor, carrier.close)
    assert peer.next_event() is None
    server_sock.close()


@pytest.mark.parametrize(("event", "why"), [(BytesMessage(data=b""), "sent an empty control message"),
                                            (TextMessage(data="\x00"), "sent a text control message")],
                         ids=["empty", "text"])
def test_bad_control_message_loses_the_carrier(reactor, listener, caplog, event, why):
    client_sock, server_sock = tcp_pair(listener)
    sws = ws_on(reactor, server_sock, client=False)
    got = Messages()
    on_reactor(reactor, WebSocketCarrier(sws).start, got.on_message, got.on_lost)
    peer = RawPeer(client_sock, client=True)
    peer.send(BytesMessage(data=b"\x00"), event, BytesMessage(data=b"\x00"))
    got.wait(lambda: got.lost, "the carrier to be lost")
    assert got.items == [b"\x00"]                      # nothing after the bad message
    assert got.lost == [f"peer {why}"]
    assert peer.next_event() is None                   # our side closed the connection
    client_sock.close()
    assert sws.closed
    no_errors_logged(caplog)


def test_carrier_peer_that_does_not_read_is_dropped(reactor, listener):
    client_sock, server_sock = tcp_pair(listener)
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sws = ws_on(reactor, server_sock, client=False, out_limit=64 << 20)
    carrier = WebSocketCarrier(sws, backlog=8192)
    lost: list[str] = []
    on_reactor(reactor, carrier.start, lambda _d: None, lost.append)
    for _ in range(20):
        on_reactor(reactor, carrier.send, b"\x00" * 10000)
        if lost:
            break
    assert lost and "does not read its control channel" in lost[0]
    assert sws.closed
    client_sock.close()


def test_message_bigger_than_max_message_loses_the_websocket(reactor, listener, caplog):
    client_sock, server_sock = tcp_pair(listener)
    sws = ws_on(reactor, server_sock, client=False, max_message=1024)
    got = Messages()
    on_reactor(reactor, sws.messages, got.on_message, got.on_lost)
    peer = RawPeer(client_sock, client=True)
    peer.send(BytesMessage(data=b"a" * 1024))                           # exactly the limit: fine
    got.wait(lambda: got.items, "the first message")
    peer.send(BytesMessage(data=b"b" * 600, message_finished=False),    # fragments add up
              BytesMessage(data=b"b" * 600, message_finished=True))
    got.wait(lambda: got.lost, "the websocket to be lost")
    assert got.items == [b"a" * 1024]
    assert "more than 1024 bytes" in got.lost[0] and "1200 so far" in got.lost[0]
    assert peer.next_event() is None
    client_sock.close()
    no_errors_logged(caplog)


def test_ping_is_answered_and_close_is_answered_then_closed(reactor, listener):
    client_sock, server_sock = tcp_pair(listener)
    sws = ws_on(reactor, server_sock, client=False)
    got = Messages()
    on_reactor(reactor, sws.messages, got.on_message, got.on_lost)
    peer = RawPeer(client_sock, client=True)
    peer.send(Ping(payload=b"are you there"), TextMessage(data="8443"))
    pong = peer.next_event()
    assert isinstance(pong, Pong) and pong.payload == b"are you there"
    got.wait(lambda: got.items, "the text message")
    assert got.items == ["8443"]
    peer.send(CloseConnection(code=1000, reason="bye"))
    answer = peer.next_event()
    assert isinstance(answer, CloseConnection) and answer.code == 1000
    assert peer.next_event() is None                   # then the socket is closed
    got.wait(lambda: got.lost, "on_lost")
    assert got.lost == ["peer closed the websocket (code 1000: bye)"]
    client_sock.close()


def test_protocol_violation_loses_the_websocket(reactor, listener, caplog):
    client_sock, server_sock = tcp_pair(listener)
    sws = ws_on(reactor, server_sock, client=False)
    got = Messages()
    on_reactor(reactor, sws.messages, got.on_message, got.on_lost)
    client_sock.sendall(b"\x82\x01\x00")               # unmasked frame from a client
    got.wait(lambda: got.lost, "on_lost")
    assert "broke the websocket protocol" in got.lost[0] and "unmasked" in got.lost[0]
    client_sock.settimeout(5)
    assert read_until_closed(client_sock) == 0
    client_sock.close()
    no_errors_logged(caplog)


def test_first_bytes_come_before_the_sockets_eof(reactor, listener):
    client_sock, server_sock = tcp_pair(listener)
    first = RawPeer(server_sock, client=False).wire(BytesMessage(data=b"\x02"), TextMessage(data="8443"))
    server_sock.shutdown(socket.SHUT_WR)              # the socket is at EOF before we read it
    cws = ws_on(reactor, client_sock, client=True, first=first)
    got = Messages()
    on_reactor(reactor, cws.messages, got.on_message, got.on_lost)
    got.wait(lambda: got.lost, "on_lost")
    assert got.items == [b"\x02", "8443"]
    assert got.lost == ["peer closed the websocket connection"]
    server_sock.close()


def test_pings_from_a_peer_that_does_not_read_are_bounded(reactor, listener):
    client_sock, server_sock = tcp_pair(listener)
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sws = ws_on(reactor, server_sock, client=False, out_limit=16384)
    got = Messages()
    on_reactor(reactor, sws.messages, got.on_message, got.on_lost)
    peer = RawPeer(client_sock, client=True)
    ping = peer.wire(Ping(payload=b"p" * 125))
    try:
        for _ in range(100000):
            if got.lost:
                break
            peer.sock.sendall(ping * 100)
    except OSError:
        pass  # our side gave up and reset the connection
    got.wait(lambda: got.lost, "on_lost")
    assert "pings but does not read" in got.lost[0]
    client_sock.close()


def test_close_is_idempotent_and_leaves_nothing_in_the_reactor(reactor, listener):
    client_sock, server_sock = tcp_pair(listener)
    sws = ws_on(reactor, server_sock, client=False)
    got = Messages()
    on_reactor(reactor, sws.messages, got.on_message, got.on_lost)
    fd = server_sock.fileno()
    assert on_reactor(reactor, lambda: fd in reactor._masks)
    on_reactor(reactor, sws.send_binary, b"\x02")
    on_reactor(reactor, sws.close)
    on_reactor(reactor, sws.close)
    on_reactor(reactor, sws.abort)
    assert server_sock.fileno() == -1
    assert not on_reactor(reactor, lambda: fd in reactor._masks)
    on_reactor(reactor, sws.send_binary, b"\x02")      # ignored
    peer = RawPeer(client_sock, client=True)
    event = peer.next_event()
    assert isinstance(event, BytesMessage) and event.data == b"\x02"   # close sent what was queued
    assert peer.next_event() is None
    assert got.lost == []                              # no callback after close
    client_sock.close()


# ------------------------------------------------------------------------------------------------
# messages -> stream

@pytest.mark.parametrize("arrival", ["socket", "first"])
def test_switch_to_stream_mode_loses_nothing(reactor, listener, arrival):
    client_sock, server_sock = tcp_pair(listener)
    peer = RawPeer(server_sock, client=False)
    data = bytearray(random.Random(7).randbytes(3 << 20))
    data[70000] = ord("x")  # sent as a one-byte text message: valid UTF-8
    data = bytes(data)
    # idle pings, the target as text, then data as binary messages of all sizes, a text one among
    # them: everything in one write, so it lands behind the target in the same read
    pieces = [data[:1], data[1:70000], data[70000:70001], data[70001:1 << 20], data[1 << 20:]]
    target = "service.internal:5201"  # a target string carried as a message; no socket uses it
    blob = peer.wire(BytesMessage(data=b"\x02"), BytesMessage(data=b"\x02"), TextMessage(data=target),
                     *[BytesMessage(data=p) for p in pieces[:2]], TextMessage(data=pieces[2].decode()),
                     *[BytesMessage(data=p) for p in pieces[3:]])
    state: dict[str, Any] = {"targets": [], "pings": 0}
    got = Messages()

    def on_message(message: bytes | str) -> None:
        if message == b"\x02":
            state["pings"] += 1
            return
        state["targets"].append(message)
        stream = WebSocketStream(cws)  # right here: whatever follows is the stream's
        state["collector"] = Collector(stream)
        stream.listen(state["collector"])

    if arrival == "first":
        cws = ws_on(reactor, client_sock, client=True, first=blob)
        sender = None
    else:
        cws = ws_on(reactor, client_sock, client=True)
        # One write, from a thread: the kernel's buffers need not hold all of it before the
        # websocket reads (an idle one does not).
        sender = threading.Thread(target=server_sock.sendall, args=(blob,))
        sender.start()
    on_reactor(reactor, cws.messages, on_message, got.on_lost)
    if sender is not None:
        sender.join(10)
        assert not sender.is_alive()
    server_sock.shutdown(socket.SHUT_WR)                # TCP EOF: the stream's end of data
    wait_until(lambda: "collector" in state and state["collector"].ended.is_set(), "the stream to end")
    collector = state["collector"]
    assert collector.eof and collector.failed is None
    assert state["targets"] == [target] and state["pings"] == 2
    assert hashlib.sha256(collector.data).digest() == hashlib.sha256(data).digest()
    assert got.lost == []
    on_reactor(reactor, collector.stream.close)
    server_sock.close()


def test_stream_keeps_the_stream_contract(reactor, listener):
    client_sock, server_sock = tcp_pair(listener)
    a = on_reactor(reactor, lambda: WebSocketStream(WebSocket(reactor, client_sock, client=True, peer="b")))
    b = on_reactor(reactor, lambda: WebSocketStream(WebSocket(reactor, server_sock, client=False, peer="a")))
    assert isinstance(a, Stream)
    calls: list[tuple[str, ...]] = []

    class Recorder:
        def stream_readable(self) -> None:
            calls.append(("readable",))

        def stream_writable(self) -> None:
            calls.append(("writable",))

        def stream_failed(self, reason: str) -> None:
            calls.append(("failed", reason))

    assert isinstance(Recorder(), StreamListener)
    assert on_reactor(reactor, a.write, b"hello") == 5   # before anyone listens on the other end
    wait_until(lambda: on_reactor(reactor, lambda: b.buffered_in) == 5, "the bytes to arrive")
    on_reactor(reactor, b.listen, Recorder())
    on_reactor(reactor, lambda: None)
    assert calls == [("readable",)]
    assert on_reactor(reactor, b.read, 3) == b"hel"
    assert on_reactor(reactor, b.read, 100) == b"lo"
    assert on_reactor(reactor, b.read, 100) == b""
    with pytest.raises(RuntimeError):
        on_reactor(reactor, WebSocketStream, b.ws)       # one stream per websocket
    on_reactor(reactor, a.shutdown_write)
    wait_until(lambda: len(calls) == 2, "readable after the FIN")
    assert on_reactor(reactor, b.read, 100) is None
    with pytest.raises(BrokenPipeError):
        on_reactor(reactor, a.write, b"late")
    on_reactor(reactor, b.shutdown_write)                # the peer ended: no FIN_PING, the close says it
    on_reactor(reactor, b.close)                         # both directions ended: the clean end
    on_reactor(reactor, b.close)
    assert server_sock.fileno() == -1
    wait_until(lambda: on_reactor(reactor, a.read, 100) is None, "EOF at the other end")
    on_reactor(reactor, a.close)
    assert client_sock.fileno() == -1


@pytest.mark.parametrize(("length", "head"), [
    (0, b"\x82\x00"), (5, b"\x82\x05"), (125, b"\x82\x7d"), (126, b"\x82\x7e\x00\x7e"),
    (65535, b"\x82\x7e\xff\xff"), (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    (1 << 32, b"\x82\x7f\x00\x00\x00\x01\x00\x00\x00\x00")])
def test_server_frame_head_is_the_rfc_head_wsproto_writes(length, head):
    assert frame_head(length) == head
    if length <= 65536:
        payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
        frame = bytes(Connection(ConnectionType.SERVER).send(BytesMessage(data=payload)))
        assert frame == head + payload


def test_server_stream_frames_fill_whole_tls_records_and_keep_the_bytes_written(reactor, listener):
    """A server's stream data leaves as frames of FRAME_SIZE bytes (whole 16 KiB TLS records),
    payload unchanged; a writer's buffer changed after the write does not change what goes."""
    client_sock, server_sock = tcp_pair(listener)
    stream = on_reactor(reactor, lambda: WebSocketStream(WebSocket(reactor, server_sock, client=False, peer="c")))
    data = bytearray(os.urandom(3 * SERVER_MESSAGE + 1000))
    sent = bytes(data)
    assert on_reactor(reactor, stream.write, data) == len(data)
    data[:] = bytes(len(data))
    client_sock.settimeout(10)
    wire = bytearray()
    while len(wire) < 3 * FRAME_SIZE + 4 + 1000:
        wire += client_sock.recv(1 << 20)
    head = frame_head(SERVER_MESSAGE)
    assert len(head) + SERVER_MESSAGE == FRAME_SIZE and MESSAGE_SIZE + 8 == FRAME_SIZE
    for n in range(3):
        frame = wire[n * FRAME_SIZE:(n + 1) * FRAME_SIZE]
        assert frame[:4] == head and frame[4:] == sent[n * SERVER_MESSAGE:(n + 1) * SERVER_MESSAGE]
    assert wire[3 * FRAME_SIZE:] == frame_head(1000) + sent[3 * SERVER_MESSAGE:]
    on_reactor(reactor, stream.close)
    client_sock.close()


def test_close_before_the_end_resets_the_peer(reactor, listener):
    client_sock, server_sock = tcp_pair(listener)
    a = on_reactor(reactor, lambda: WebSocketStream(WebSocket(reactor, client_sock, client=True, peer="b")))
    b = on_reactor(reactor, lambda: WebSocketStream(WebSocket(reactor, server_sock, client=False, peer="a")))
    collector = Collector(b)
    on_reactor(reactor, b.listen, collector)
    on_reactor(reactor, a.write, b"unfinished")
    wait_until(lambda: collector.data == b"unfinished", "the bytes to arrive")
    on_reactor(reactor, a.close)                         # not the end: a reset
    assert collector.ended.wait(5)
    assert collector.failed and "reset" in collector.failed
    with pytest.raises(ConnectionResetError):
        on_reactor(reactor, b.read, 100)
    on_reactor(reactor, b.close)


def test_close_frame_in_stream_mode_ends_the_data_and_the_writes(reactor, listener):
    client_sock, server_sock = tcp_pair(listener)
    b = on_reactor(reactor, lambda: WebSocketStream(WebSocket(reactor, server_sock, client=False, peer="a")))
    collector = Collector(b)
    on_reactor(reactor, b.listen, collector)
    peer = RawPeer(client_sock, client=True)
    peer.send(BytesMessage(data=b"last words"), CloseConnection(code=1001))
    answer = peer.next_event()
    assert isinstance(answer, CloseConnection) and answer.code == 1001
    assert peer.next_event() is None
    assert collector.ended.wait(5)
    assert collector.eof and collector.data == b"last words"
    with pytest.raises(BrokenPipeError, match="closed the websocket"):
        on_reactor(reactor, b.write, b"too late")
    on_reactor(reactor, b.close)
    client_sock.close()


# ------------------------------------------------------------------------------------------------
# the relay conformance cases over a real WebSocket pair

class WsBench(conformance.Bench):
    """user <-> StreamRelay <-> WebSocketStream(client) <=> WebSocketStream(server) <-> StreamRelay <-> target."""

    def __init__(self, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None, socket_buffers: int = 0,
                 **options: Any) -> None:
        super().__init__("stream")
        self.tls = tls
        self.socket_buffers = socket_buffers   # SO_SNDBUF/SO_RCVBUF of every socket (0: the system's)
        self.options = options
        self.websockets: list[WebSocket] = []

    def link(self) -> conformance.Link:
        user, near = tcp_pair(self.listener)
        far, target = tcp_pair(self.listener)
        client_sock, server_sock = tcp_pair(self.listener)
        for sock in (user, near, far, target, client_sock, server_sock) if self.socket_buffers else ():
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.socket_buffers)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.socket_buffers)
        if self.tls is not None:
            client_sock, server_sock = tls_pair(self.tls, client_sock, server_sock)
        self.sockets += [user, target]
        link = conformance.Link(user, target)

        def build() -> None:
            cws = WebSocket(self.reactor, client_sock, client=True, peer="server", **self.options)
            sws = WebSocket(self.reactor, server_sock, client=False, peer="client", **self.options)
            self.websockets += [cws, sws]
            link.ws = (cws, sws)  # type: ignore[attr-defined]
            link.ends = (WebSocketStream(cws), WebSocketStream(sws))  # type: ignore[assignment]
            link.relays = [StreamRelay(self.reactor, near, link.ends[0], on_close=lambda r: self._on_close(link, r)),
                           StreamRelay(self.reactor, far, link.ends[1], on_close=lambda r: self._on_close(link, r))]
            self._start(link)

        self.on_reactor(build)
        self.links.append(link)
        user.settimeout(10)
        target.settimeout(10)
        return link

    def close(self) -> None:
        def abort_all() -> None:
            for relay in list(self.open):
                relay.abort()
            for ws in self.websockets:  # a clean end may still be sending its last bytes
                ws.abort()

        self.on_reactor(abort_all)
        super().close()


def tls_pair(contexts: tuple[ssl.SSLContext, ssl.SSLContext], client_sock: socket.socket,
             server_sock: socket.socket) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """Both TLS handshakes, blocking (the server's in a thread); non-blocking use comes after."""
    client_ctx, server_ctx = contexts
    box: dict[str, Any] = {}

    def serve() -> None:
        try:
            box["server"] = server_ctx.wrap_socket(server_sock, server_side=True)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    client = client_ctx.wrap_socket(client_sock, server_hostname="localhost")
    thread.join(10)
    if "error" in box:
        client.close()
        raise box["error"]
    return client, box["server"]


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    where = tmp_path_factory.mktemp("tls")
    key, cert = where / "key.pem", where / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True, timeout=60)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    return client_ctx, server_ctx


@pytest.fixture
def ws_bench() -> Iterator[WsBench]:
    b = WsBench()
    yield b
    b.close()


@pytest.fixture
def wss_bench(tls_contexts) -> Iterator[WsBench]:
    b = WsBench(tls=tls_contexts)
    yield b
    b.close()


CONFORMANCE = conformance.CASES
TLS_CASES = ("one_byte", "1MiB_both_ways", "half_close_user", "reset")


@pytest.mark.parametrize("case", [c for _, c in CONFORMANCE], ids=[n for n, _ in CONFORMANCE])
def test_relay_conformance_over_websocket(ws_bench, case):
    case(ws_bench)


@pytest.mark.parametrize("case", [c for n, c in CONFORMANCE if n in TLS_CASES], ids=list(TLS_CASES))
def test_relay_conformance_over_tls_websocket(wss_bench, case):
    case(wss_bench)
    link = wss_bench.links[0]
    assert all(isinstance(ws.sock, ssl.SSLSocket) for ws in link.ws)


def test_request_then_half_close_gets_the_full_answer(ws_bench):
    link = ws_bench.link()
    request = b"GET / HTTP/1.0\r\n\r\n"
    answer = random.Random(8).randbytes(4 << 20)
    link.user.sendall(request)
    link.user.shutdown(socket.SHUT_WR)
    assert read_all(link.target) == request            # the user's FIN reached the target
    sender = send_and_finish(link.target, answer)      # the answer, then the target's FIN
    got = read_all(link.user)
    sender.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(answer).digest()
    assert ws_bench.closed.acquire(timeout=5), "both relays close once both directions ended"
    ws_bench.on_reactor(lambda: None)
    assert all(ws.closed for ws in link.ws)


def slow_upload(bench: WsBench) -> None:
    """The user sends 4 MiB then its FIN, the target answers at once and ends its side, then reads
    the upload slowly: the user's side has both directions ended and closes with the tail queued."""
    try:
        link = bench.link()
        payload = random.Random(12).randbytes(4 << 20)
        link.target.sendall(b"answer")
        link.target.shutdown(socket.SHUT_WR)                # the target's direction ends at once
        sender = send_and_finish(link.user, payload)        # everything, then the user's FIN
        got = bytearray()
        while chunk := link.target.recv(16 * 1024):         # slowly: seconds in all, LINGER many times over
            got += chunk
            time.sleep(0.01)
        sender.join(10)
        assert len(got) == len(payload)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert read_all(link.user) == b"answer"
    finally:
        bench.close()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
def test_a_clean_close_waits_while_a_slow_peer_keeps_reading(monkeypatch, request, tls):
    """Catches: a clean close that gives up after a fixed time while the peer still takes bytes,
    which lost the tail of uploads on a busy machine: the side whose both directions ended closes
    first and holds the last queued bytes; a reader that keeps reading, however slowly, gets all."""
    # Twice the pause between the reader's bursts (one relay read of READ_CHUNK at its pace), and
    # a fraction of the time the tail takes to drain.
    monkeypatch.setattr(ws_module, "LINGER", 0.6)
    contexts = request.getfixturevalue("tls_contexts") if tls else None
    slow_upload(WsBench(tls=contexts, socket_buffers=64 * 1024))   # small kernel buffers: the queues hold the tail


def test_a_close_notify_that_meets_a_full_socket_waits_for_room(monkeypatch, tls_contexts):
    """Catches: a clean TLS close whose close_notify did not fit the socket and was dropped: the
    peer then reads a bare FIN, which is a broken link, and loses what it had not read yet."""
    real_unwrap = ssl.SSLSocket.unwrap
    refused: set[int] = set()

    def unwrap(sock: ssl.SSLSocket) -> socket.socket:
        if id(sock) not in refused:   # the first try of each socket meets a full socket
            refused.add(id(sock))
            raise ssl.SSLWantWriteError(ssl.SSL_ERROR_WANT_WRITE, "the socket is full")
        return real_unwrap(sock)

    monkeypatch.setattr(ssl.SSLSocket, "unwrap", unwrap)
    slow_upload(WsBench(tls=tls_contexts, socket_buffers=64 * 1024))
    assert refused, "no clean TLS close happened"


def go_peer_link(reactor, listener):
    """A socket relayed over our client websocket to a raw peer that plays the Go program."""
    near_peer, near = tcp_pair(listener)
    client_sock, server_sock = tcp_pair(listener)
    closed = threading.Event()

    def build() -> StreamRelay:
        stream = WebSocketStream(WebSocket(reactor, client_sock, client=True, peer="go"))
        relay = StreamRelay(reactor, near, stream, on_close=lambda _r: closed.set())
        relay.start()
        return relay

    on_reactor(reactor, build)
    return near_peer, RawPeer(server_sock, client=False), closed


def test_half_close_toward_a_go_peer_ends_after_what_it_sent_before_its_pong(reactor, listener):
    """Gorilla answers FIN_PING like any Ping and goes on: it carries no half-close, so its Pong
    ends the connection as Go ends one at its first EOF. Our user gets every byte the peer sent
    before the Pong, then EOF, and the peer reads EOF (nothing waits for a close that never comes)."""
    user, go, closed = go_peer_link(reactor, listener)
    request, answer = b"request", random.Random(9).randbytes(1 << 20)
    user.sendall(request)
    user.shutdown(socket.SHUT_WR)
    assert go.message_bytes(len(request)) == request
    ping = go.next_event()
    assert isinstance(ping, Ping) and ping.payload == FIN_PING
    go.send(*[BytesMessage(data=answer[i:i + 16384]) for i in range(0, len(answer), 16384)])
    go.send(ping.response())                                          # gorilla's default handler
    user.settimeout(10)
    got = read_all(user)
    assert hashlib.sha256(got).digest() == hashlib.sha256(answer).digest()
    assert go.next_event() is None, "the Go peer's websocket was left open"
    assert closed.wait(5)
    user.close()
    go.sock.close()


def test_a_target_that_closes_after_its_answer_ends_the_go_peer_s_connection(reactor, listener):
    """An HTTP/1.0 server answers and closes; the Go server's user waits for that close. We send
    the answer and FIN_PING; the Go peer pongs and keeps its user open, waiting for us: we must
    close the websocket (before, the user waited until it gave up)."""
    target, go, closed = go_peer_link(reactor, listener)
    request, answer = b"GET / HTTP/1.0\r\n\r\n", random.Random(10).randbytes(300_000)
    go.send(BytesMessage(data=request))
    target.settimeout(10)
    got = b""
    while len(got) < len(request):
        got += target.recv(100)
    assert got == request
    target.sendall(answer)
    target.close()                                                    # a full close, as nginx does
    assert hashlib.sha256(go.message_bytes(len(answer))).digest() == hashlib.sha256(answer).digest()
    ping = go.next_event()
    assert isinstance(ping, Ping) and ping.payload == FIN_PING
    go.send(ping.response())
    assert go.next_event() is None, "the websocket stayed open: the Go peer's user would wait for its end"
    assert closed.wait(5)
    go.sock.close()


def test_peer_vanishes_mid_transfer_both_sides_close(ws_bench):
    link = ws_bench.link()
    sender = send_until_broken(link.user, os.urandom(32 << 20))
    received = 0
    while received < 1 << 20:
        received += len(link.target.recv(1 << 20))
    ws_bench.on_reactor(link.ws[1].fail, "the server side vanished")  # its connection resets
    received += read_until_closed(link.target)
    assert received < 32 << 20
    assert ws_bench.closed.acquire(timeout=5)
    link.user.settimeout(5)
    read_until_closed(link.user)
    sender.join(10)
    assert not sender.is_alive()
    ws_bench.on_reactor(lambda: None)
    assert sorted(link.close_calls.values()) == [1, 1]
    assert all(relay.closed for relay in link.relays)
    assert all(ws.closed for ws in link.ws)


class Sampler:
    """Samples, on the reactor thread every millisecond, the bytes each stage of a link holds."""

    def __init__(self, bench: WsBench, link: conformance.Link) -> None:
        self.bench = bench
        self.link = link
        self.peaks = {"send_relay": 0, "client_out": 0, "server_in": 0, "recv_relay": 0, "total": 0}
        self.timer: Timer | None = None
        self.stopped = False
        bench.reactor.call_soon(self._tick)

    def now(self) -> dict[str, int]:
        cws, sws = self.link.ws  # type: ignore[attr-defined]
        held = {"send_relay": self.link.relays[0].buffered, "client_out": cws.buffered_out,
                "server_in": sws.buffered_in, "recv_relay": self.link.relays[1].buffered}
        held["total"] = sum(held.values())
        return held

    def _tick(self) -> None:
        if self.stopped:
            return
        for key, value in self.now().items():
            self.peaks[key] = max(self.peaks[key], value)
        self.timer = self.bench.reactor.call_later(0.001, self._tick)

    def stuck(self) -> bool:
        def check() -> bool:
            cws, sws = self.link.ws  # type: ignore[attr-defined]
            return (self.link.relays[1].down_buffered > 0 and not sws.reading
                    and cws.buffered_out > 0 and self.link.relays[0].up_buffered > 0)
        return self.bench.on_reactor(check)

    def stop(self) -> None:
        def stop() -> None:
            self.stopped = True
            if self.timer is not None:
                self.timer.cancel()
        self.bench.on_reactor(stop)


def test_slow_reader_memory_stays_bounded():
    out_limit, in_limit, read_size = 1 << 20, 1 << 20, 256 * 1024
    bench = WsBench(out_limit=out_limit, in_limit=in_limit, read_size=read_size)
    try:
        link = bench.link()
        data = random.Random(10).randbytes(64 << 20)
        sampler = Sampler(bench, link)
        sender = send_and_finish(link.user, data)
        wait_until(sampler.stuck, "every stage between the sockets to fill", timeout=20)
        # The kernel's buffers may still grow (TCP autotuning) and take a little more: wait until
        # nothing moves for a while, then nothing may move while the target does not read.
        taken = -1
        deadline = time.monotonic() + 20
        while (now := bench.on_reactor(lambda: link.relays[0].up_bytes)) != taken:
            assert time.monotonic() < deadline, "the relay keeps reading although nothing can go on"
            taken = now
            time.sleep(0.3)
        assert taken < 48 << 20 and sender.is_alive()
        assert sampler.stuck()
        got = read_all(link.target)
        sender.join(10)
        sampler.stop()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        frames = (out_limit // MESSAGE_SIZE + 1) * 14          # headers of the messages queued
        peaks = sampler.peaks
        assert peaks["send_relay"] <= READ_CHUNK and peaks["recv_relay"] <= READ_CHUNK
        assert peaks["client_out"] <= out_limit + frames
        assert peaks["server_in"] <= in_limit + read_size
        assert peaks["total"] <= 2 * READ_CHUNK + out_limit + frames + in_limit + read_size
    finally:
        bench.close()


def test_bad_frames_on_a_data_link_end_it_with_one_line(reactor, listener, monkeypatch, caplog):
    """Three data links (stream mode, relayed to their targets) get frames the protocol forbids:
    each link ends (its target is closed) and the log has one line naming the peer and what it
    broke, the others held back by the throttle and counted in the next line. Catches: a data
    link ending on bad input with nothing logged, or a line per frame in a flood."""
    monkeypatch.setattr(ws_module, "VIOLATIONS", Throttle(ws_module.log), raising=False)   # a second of its own
    links, closed = [], threading.Semaphore(0)
    for n in range(3):
        target, near = tcp_pair(listener)
        client_sock, server_sock = tcp_pair(listener)

        def build(near: socket.socket = near, server_sock: socket.socket = server_sock, n: int = n) -> None:
            stream = WebSocketStream(WebSocket(reactor, server_sock, client=False, peer=f"client {n}"))
            StreamRelay(reactor, near, stream, on_close=lambda _r: closed.release()).start()

        on_reactor(reactor, build)
        links.append((target, client_sock))
    try:
        with caplog.at_level(logging.WARNING, logger="backhaul.links.websocket"):
            for _target, client_sock in links:
                client_sock.sendall(b"\x82\x01\x00")               # unmasked frame from a client
            for target, _client_sock in links:
                assert closed.acquire(timeout=5), "a data link stayed up after a bad frame"
                target.settimeout(5)
                read_until_closed(target)
        lines = [r.getMessage() for r in caplog.records if r.name == "backhaul.links.websocket"]
        assert len(lines) == 1, lines
        assert lines[0].startswith("closed the websocket of client 0: it broke the websocket protocol: "), lines
        assert "unmasked" in lines[0], lines
    finally:
        for target, client_sock in links:
            target.close()
            client_sock.close()


def test_a_slow_reader_that_leaves_takes_the_bytes_it_left_unread_with_it(reactor, listener):
    """A download whose user never reads fills the server's websocket up to its input bound;
    then the user leaves. Once its relay is closed, no garbage cycle may keep what the websocket
    held: it must go at once, not at the collector's next full pass, which a quiet server may not
    run for hours (300 such users each round left the server 150 MB larger, round after round).
    Catches: a closed websocket and its stream kept alive by their cycle, with the bytes received."""
    user, near = tcp_pair(listener)
    client_sock, server_sock = tcp_pair(listener)
    closed = threading.Event()
    held: list[WebSocket] = []

    def build() -> None:
        ws = WebSocket(reactor, server_sock, client=False, peer="client", in_limit=1 << 20)
        StreamRelay(reactor, near, WebSocketStream(ws), on_close=lambda _r: closed.set()).start()
        held.append(ws)

    def send_until_broken() -> None:
        message = BytesMessage(data=bytes(MESSAGE_SIZE))
        with contextlib.suppress(OSError):
            for _ in range((16 << 20) // MESSAGE_SIZE):
                peer.send(message)

    peer = RawPeer(client_sock, client=True)
    sender = threading.Thread(target=send_until_broken)
    gc.collect()
    gc.disable()   # nothing is collected behind the test's back: what is garbage stays to be counted
    try:
        on_reactor(reactor, build)
        sender.start()
        wait_until(lambda: on_reactor(reactor, lambda: held[0].buffered_in) >= 1 << 19,
                   "the websocket to hold what the user does not read")
        held.clear()
        user.close()                       # unread bytes: a reset, the relay fails and closes
        assert closed.wait(10), "the relay did not close when its user left"
        on_reactor(reactor, lambda: None)  # what the close posted has run
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage, gc.garbage[:] = list(gc.garbage), []
    finally:
        gc.set_debug(0)
        gc.enable()
        client_sock.close()
        sender.join(10)
    kept = sum(len(ref) for obj in garbage for ref in gc.get_referents(obj) if isinstance(ref, bytes | bytearray))
    assert kept < 64 * 1024, f"{kept} bytes held by garbage cycles after the websocket closed"
