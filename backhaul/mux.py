"""smux sessions at run time: the protocol state machine (protocol/smux.py) on a TCP socket.

Each session has one demux thread that only reads its socket and hands the bytes to the reactor;
the reactor feeds the state machine, dispatches what happened to the streams and writes the
frames. Frames are written whole, in order, coalesced, by the reactor alone. The thread reads no
more while the reactor holds two unprocessed chunks or the session's receive buffer is full
(TCP backpressure, as smux does). Nothing here knows how the socket was made (tcpmux dials it;
wsmux upgrades it from HTTP first).
"""

from __future__ import annotations

import logging
import mmap
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

from backhaul.errors import ProtocolError
from backhaul.metrics import METRICS
from backhaul.net import reason
from backhaul.protocol.chunks import advance
from backhaul.protocol.smux import Session, StreamData, StreamEnded, StreamOpened, StreamWritable
from backhaul.reactor import WRITE, Reactor, Timer
from backhaul.relay.stream import StreamListener

log = logging.getLogger("backhaul.mux")

READ_SIZE = 1024 * 1024   # one read of the session socket by its demux thread
CHUNKS_IN_FLIGHT = 2      # read chunks the reactor has not processed yet
POLL_MS = 1000            # how often an idle demux thread looks whether its session closed
IOV_MAX = 1024            # buffers one sendmsg may take (Linux)
TLS_WRITE = 256 * 1024    # bytes joined into one TLS write

# Every open session of the process, for the metrics (side: the server opens the streams).
_OPEN: set[MuxConnection] = set()


def _by_side(count: Callable[[MuxConnection], int]) -> list[tuple[tuple[str, ...], float]]:
    totals = {"server": 0, "client": 0}
    for conn in list(_OPEN):
        totals["server" if conn.session_opener else "client"] += count(conn)
    return [((side,), number) for side, number in totals.items()]


METRICS.gauge("backhaul_mux_sessions", "smux sessions open.", ("side",)).watch(lambda: _by_side(lambda _c: 1))
METRICS.gauge("backhaul_mux_streams", "smux streams open.", ("side",)).watch(lambda: _by_side(len))


class MuxSettings:
    """The smux settings both peers must agree on (version) or may each choose."""

    __slots__ = ("version", "frame_size", "receive_buffer", "stream_buffer", "max_streams")

    def __init__(self, version: int, frame_size: int, receive_buffer: int, stream_buffer: int,
                 max_streams: int = 1024) -> None:
        self.version = version
        self.frame_size = frame_size
        self.receive_buffer = receive_buffer
        self.stream_buffer = stream_buffer
        self.max_streams = max_streams


class MuxConnection:
    """One smux session on a connected socket; reactor thread except where noted."""

    def __init__(self, reactor: Reactor, sock: socket.socket, peer: str, settings: MuxSettings, *, opener: bool,
                 on_stream: Callable[[MuxStream], None] | None, on_lost: Callable[[MuxConnection, str], None]) -> None:
        self.reactor = reactor
        self.sock = sock
        self.peer = peer
        self.session = Session(settings.version, opener, settings.frame_size, settings.receive_buffer,
                               settings.stream_buffer, max_streams=settings.max_streams, now=time.monotonic())
        self.streams: dict[int, MuxStream] = {}
        self.on_stream = on_stream
        self.on_lost = on_lost
        self.on_stream_closed: Callable[[MuxConnection], None] | None = None
        self.session_opener = opener
        self.closed = False
        try:
            self.address: tuple[str, int] = sock.getpeername()[:2]
        except OSError:
            self.address = ("0.0.0.0", 0)  # gone already: the demux thread will say so
        self._pending: list[bytes | memoryview] = []  # frames taken from the session, not yet sent
        self._writing = False                  # watching the socket for room
        self._blocked: set[MuxStream] = set()  # streams whose write met a full outbox
        # Chunks read and chunks processed, each counted by one thread only; the reader waits
        # (and is woken) only when it is that far ahead or the receive buffer is full, so the
        # common case costs no wake-up at all.
        self._posted = 0                       # demux thread
        self._done = 0                         # reactor
        self._full = False                     # reactor: the unread bytes fill the receive buffer
        self._waiting = False                  # demux thread: asleep on _wake
        self._wake = threading.Event()
        self._timer: Timer | None = None
        self._tls_lock = threading.Lock() if isinstance(sock, ssl.SSLSocket) else None
        self._thread = threading.Thread(target=self._demux, name="backhaul-demux", daemon=True)

    def start(self, first: bytes = b"") -> None:
        """Begin; ``first`` holds session bytes read before (behind an HTTP 101 on wsmux)."""
        self.sock.setblocking(False)
        _OPEN.add(self)
        if first:
            self._posted += 1  # processed like any chunk the demux thread reads (not started yet)
            self.reactor.call_soon(self._received, first)
        self._thread.start()
        self._schedule()

    # --- the demux thread ----------------------------------------------------------------------
    def _demux(self) -> None:
        """Read the socket and hand the bytes to the reactor; never touches the session."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        # One buffer for this thread's reads; what is handed on is a bytes object of the size
        # read (no read allocates and maps a large buffer only to shrink it). An anonymous
        # mapping, so an idle session's buffer costs no memory until bytes arrive in it.
        scratch = memoryview(mmap.mmap(-1, READ_SIZE))
        why = ""
        while not self.closed:
            if self._must_wait():
                self._wake.clear()
                self._waiting = True
                if self._must_wait():  # checked again: the reactor may have moved meanwhile
                    self._wake.wait(POLL_MS / 1000)
                self._waiting = False
                continue
            try:
                # Bytes TLS decrypted already are invisible to poll: read them first.
                while not self.closed and not self._tls_pending() and not poller.poll(POLL_MS):
                    pass
                if self.closed:
                    break
                got = self.sock.recv_into(scratch) if self._tls_lock is None else self._recv_tls(scratch)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except OSError as exc:
                why = f"connection failed: {reason(exc)}"
                break
            if not got:
                why = "the peer closed the connection"
                break
            self._posted += 1
            self.reactor.call_soon(self._received, scratch[:got].tobytes())
        if why:
            self.reactor.call_soon(self.fail, why)

    def _recv_tls(self, scratch: memoryview) -> int:
        """A TLS read returns one 16 KiB record: gather what is there into one chunk, so the
        reactor gets one hand-off per read of the socket, not one per record."""
        got = 0
        with self._tls_lock:  # type: ignore[union-attr]  # one SSL object, two threads: never at once
            while got < len(scratch):
                try:
                    n = self.sock.recv_into(scratch[got:])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    if got:
                        break
                    raise
                if not n:
                    break  # EOF: reported by the next read if bytes came before it
                got += n
        return got

    def _tls_pending(self) -> int:
        if self._tls_lock is None:
            return 0
        with self._tls_lock:
            return self.sock.pending()  # type: ignore[attr-defined]

    # --- input ---------------------------------------------------------------------------------
    def _received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.session.receive(data, time.monotonic())
        except ProtocolError as exc:
            self.fail(str(exc))
            return
        streams = self.streams
        for event in events:
            if isinstance(event, StreamOpened):
                stream = streams[event.sid] = MuxStream(self, event.sid)
                if self.on_stream is not None:
                    self.on_stream(stream)
                continue
            stream = streams.get(event.sid)
            if stream is None:
                continue
            if isinstance(event, StreamData | StreamEnded):
                stream.readable()
            elif isinstance(event, StreamWritable):
                stream.writable()
            if self.closed:
                return
        self.flush()
        self._give_credit()

    def _must_wait(self) -> bool:
        """Demux thread: the reactor is CHUNKS_IN_FLIGHT behind, or has no room for more."""
        return self._full or self._posted - self._done >= CHUNKS_IN_FLIGHT

    def _give_credit(self) -> None:
        """One chunk processed: let the demux thread read on, unless the unread bytes fill the
        receive buffer (TCP backpressure, as smux does)."""
        self._done += 1
        self._full = not self.session.wants_input
        if self._waiting and not self._full:
            self._wake.set()

    def consumed(self) -> None:
        """A stream read bytes: send the window updates, and read on if we had stopped."""
        if self._full and self.session.wants_input:
            self._full = False
            if self._waiting:
                self._wake.set()
        if self.session.has_outgoing:
            self.flush()

    def stream_closed(self, stream: MuxStream) -> None:
        if self.on_stream_closed is not None:
            self.on_stream_closed(self)

    # --- output --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what the session has queued; what the socket does not take waits for room."""
        if self.closed:
            return
        pending = self._pending
        try:
            while True:
                if not pending:
                    if not self.session.has_outgoing:
                        break
                    pending = self._pending = self.session.outgoing_buffers()
                if self._tls_lock is None:
                    sent = self.sock.sendmsg(pending[:IOV_MAX])
                else:
                    sent = self._send_tls(pending)
                advance(pending, sent)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            if not self._writing:
                self._writing = True
                self.reactor.watch(self.sock, WRITE, self._room)
            return
        except OSError as exc:
            self.fail(f"connection failed: {reason(exc)}")
            return
        if self._writing:
            self._writing = False
            self.reactor.watch(self.sock, 0)
        if self._blocked:
            blocked, self._blocked = self._blocked, set()
            for stream in blocked:
                self.reactor.call_soon(stream.writable)

    def _send_tls(self, pending: list[bytes | memoryview]) -> int:
        """TLS has no gathered write: send the first frames joined (a blocked write is retried
        with the same bytes, as OpenSSL wants)."""
        take, size = 0, 0
        while take < len(pending) and size < TLS_WRITE:
            size += len(pending[take])
            take += 1
        if take > 1:
            pending[:take] = [b"".join(pending[:take])]
        with self._tls_lock:  # type: ignore[union-attr]
            return self.sock.send(pending[0])

    def _room(self, _mask: int) -> None:
        self.flush()

    # --- streams -------------------------------------------------------------------------------
    def open_stream(self) -> MuxStream:
        """A new stream (opener only); ProtocolError when the session can open no more."""
        sid = self.session.open_stream()
        stream = self.streams[sid] = MuxStream(self, sid)
        return stream

    @property
    def congested(self) -> bool:
        """The socket is not taking our frames: a new stream here would only wait."""
        return bool(self._pending) and self._writing

    def __len__(self) -> int:
        return len(self.streams)

    # --- time ----------------------------------------------------------------------------------
    def _schedule(self) -> None:
        delay = max(0.0, self.session.next_deadline() - time.monotonic())
        self._timer = self.reactor.call_later(delay, self._tick)

    def _tick(self) -> None:
        try:
            self.session.tick(time.monotonic())
        except ProtocolError as exc:
            self.fail(str(exc))
            return
        self.flush()
        if not self.closed:
            self._schedule()

    # --- the end -------------------------------------------------------------------------------
    def fail(self, why: str) -> None:
        """End the session: every stream fails with ``why``; the owner hears it once."""
        if self.closed:
            return
        self.close()
        self.on_lost(self, why)

    def close(self) -> None:
        """Close the socket and fail every stream; no callback to the owner."""
        if self.closed:
            return
        self.closed = True
        _OPEN.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.failed("the smux session ended")
        try:
            # The TCP socket's own shutdown (an SSLSocket's would drop its SSL object under the
            # demux thread): wakes that thread at once.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(POLL_MS / 1000 + 1)
        self.reactor.close_socket(self.sock)
        self._pending = []
        self._blocked.clear()


class MuxStream:
    """One smux stream as a link: the ``Stream`` of backhaul/relay/stream.py."""

    __slots__ = ("conn", "sid", "listener", "_want_read", "_want_write", "_failed", "_closed")

    def __init__(self, conn: MuxConnection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.listener: StreamListener | None = None
        self._want_read = True     # notify on the next data: nothing was read yet
        self._want_write = False
        self._failed = ""
        self._closed = False

    def peer(self) -> tuple[str, int]:
        return self.conn.address

    # --- the Stream contract -------------------------------------------------------------------
    def listen(self, listener: StreamListener) -> None:
        self.listener = listener
        self._want_read = True
        # Data or EOF may be waiting already: a notification too many is harmless, one too few
        # would stall the stream.
        self.conn.reactor.call_soon(self._tell_failed if self._failed else self.readable)

    def read(self, limit: int) -> bytes | None:
        if self._failed:
            raise ConnectionResetError(self._failed)
        data = self.conn.session.read(self.sid, limit)
        if data:
            self.conn.consumed()
        elif data == b"":
            self._want_read = True
        return data

    def write(self, data: bytes | memoryview) -> int:
        if self._failed:
            raise ConnectionResetError(self._failed)
        try:
            n = self.conn.session.write(self.sid, data)
        except ProtocolError as exc:
            raise ConnectionResetError(str(exc)) from None
        conn = self.conn
        conn.flush()
        if n < len(data):
            self._want_write = True
            if conn.session.window_blocked(self.sid):
                pass  # the peer's window is full: its UPD brings StreamWritable
            elif conn.congested:
                conn._blocked.add(self)  # the socket drains, then it is told
            else:
                conn.reactor.call_soon(self.writable)  # the outbox was full and is sent now
        return n

    def write_whole(self, data: bytes) -> None:
        """Queue all of ``data`` now, past the outbox bound (a target header on a new stream,
        whose window is still the initial one); OSError when the stream cannot take it."""
        if self._failed:
            raise ConnectionResetError(self._failed)
        try:
            self.conn.session.write(self.sid, data, whole=True)
        except ProtocolError as exc:
            raise ConnectionResetError(str(exc)) from None
        self.conn.flush()

    def shutdown_write(self) -> None:
        if self._failed:
            raise ConnectionResetError(self._failed)
        if self.sid in self.conn.session:
            self.conn.session.shutdown_stream(self.sid)
            self.conn.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.listener = None
        conn = self.conn
        if conn.streams.pop(self.sid, None) is not None and not conn.closed:
            if self.sid in conn.session:
                conn.session.close_stream(self.sid)
            conn.flush()
            conn.stream_closed(self)

    # --- from the session ----------------------------------------------------------------------
    def readable(self) -> None:
        if self.listener is not None and self._want_read:
            self._want_read = False
            self.listener.stream_readable()

    def writable(self) -> None:
        if self.listener is not None and self._want_write:
            self._want_write = False
            self.listener.stream_writable()

    def failed(self, why: str) -> None:
        self._failed = why
        if self.listener is not None:
            self.conn.reactor.call_soon(self._tell_failed)

    def _tell_failed(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None and not self._closed:
            listener.stream_failed(self._failed)
