"""smux sessions at run time: the protocol state machine (protocol/smux.py) on a TCP socket.

Each session has one demux thread for bulk reads. Small traffic (requests, replies, opens and
closes of streams) is read by the reactor itself, inline, as the splice relay does its first
rounds: a hand-off between threads costs more than such a read (and under the GIL, two busy
threads take turns at every system call). When an inline read fills its buffer the session is
moving bulk data: the demux thread takes the socket over, reads it in parallel with the reactor's
work and gives it back once it has been quiet for QUIET_MS. Either way the reactor feeds the state
machine, dispatches what happened to the streams and writes the frames, whole, once per turn of
its loop, in the session's rounds (the streams in turn, each stream's frames in order): a round
leaves in one gathered write, and the next is taken once it is sent. The thread's
reads wait in an inbox until the reactor takes them all at once; it reads no more while the inbox
holds IN_FLIGHT bytes or the session's receive buffer is full (TCP backpressure, as smux does). Nothing here knows how
the socket was made (tcpmux dials it; wsmux upgrades it from HTTP first).
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

from backhaul.buffers import scratch as thread_scratch
from backhaul.errors import ProtocolError
from backhaul.metrics import METRICS
from backhaul.mux.bulk import BulkGauge
from backhaul.mux.unsent import UnsentLimit
from backhaul.net import reason
from backhaul.protocol.chunks import advance
from backhaul.protocol.smux import Session, StreamData, StreamEnded, StreamOpened, StreamReset, StreamWritable
from backhaul.reactor import READ, WRITE, Reactor, Timer
from backhaul.relay.stream import StreamListener

log = logging.getLogger("backhaul.mux.session")

READ_SIZE = 1024 * 1024   # one read of the session socket by its demux thread
# One read by the reactor; a full one hands the socket to the thread. Larger than a v2 window
# turn (64 KiB of data plus frame heads by default): at 64 KiB every turn filled the read, so each
# one woke the thread and took the socket back 1 ms later (v2, 8 streams: 327 -> 560 MB/s).
INLINE_READ = 256 * 1024
QUIET_MS = 1              # the thread gives the socket back after this long without bytes
IN_FLIGHT = 1024 * 1024   # bytes read that the reactor has not taken yet
POLL_MS = 1000            # how often an idle demux thread looks whether its session closed
IOV_MAX = 1024            # buffers one sendmsg may take (Linux)
TLS_WRITE = 256 * 1024    # bytes joined into one TLS write
# What one take of the session's outbox aims at (protocol/outbox.py: the streams in turns of
# 16 KiB within it), one gathered write.
ROUND = 1024 * 1024

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
        self.on_busy: Callable[[MuxConnection], None] | None = None   # told when bulk begins (long path)
        self.session_opener = opener
        self.closed = False
        try:
            self.address: tuple[str, int] = sock.getpeername()[:2]
        except OSError:
            self.address = ("0.0.0.0", 0)  # gone already: the demux thread will say so
        self._pending: list[bytes | memoryview] = []  # frames taken from the session, not yet sent
        self._round = ROUND                    # bytes one take of the outbox aims at
        self._unsent = UnsentLimit(sock)       # the kernel's share of the queue (mux/unsent.py)
        self._writing = False                  # watching the socket for room
        self._inline = True                    # the reactor reads the socket (else the thread does)
        self._bulk: BulkGauge | None = None    # on a long path: whether bulk crosses it, from its bytes
        self._mask = 0                         # what the reactor watches the socket for
        self._flush_posted = False             # a flush is due at the end of this reactor turn
        self._blocked: set[MuxStream] = set()  # streams whose write met a full outbox
        # Reads wait here until the reactor takes them, all at once: one hand-off serves every
        # read the thread made meanwhile. The reader waits (and is woken) only when IN_FLIGHT bytes
        # wait or the receive buffer is full, so the common case costs no wake-up at all.
        self._inbox: list[bytes] = []
        self._inbox_bytes = 0
        self._inbox_posted = False
        self._inbox_lock = threading.Lock()
        self._full = False                     # reactor: the unread bytes fill the receive buffer
        self._waiting = False                  # demux thread: asleep on _wake
        self._wake = threading.Event()
        self._turn = threading.Event()         # set while the thread owns the reads
        self._timer: Timer | None = None
        self._tls_lock = threading.Lock() if isinstance(sock, ssl.SSLSocket) else None
        self._thread = threading.Thread(target=self._demux, name="backhaul-demux", daemon=True)
        self._finish_timer: Timer | None = None  # set once the session is ending on purpose
        self._fin_sent = False                   # our TCP FIN went: nothing more is written

    def start(self, first: bytes = b"") -> None:
        """Begin; ``first`` holds session bytes read before (behind an HTTP 101 on wsmux)."""
        self.sock.setblocking(False)
        self._unsent.start()
        # Only on a long path (elsewhere a new stream waits microseconds behind bulk), and only
        # for an owner that places streams (the server).
        if self._unsent.long_path and self.on_busy is not None:
            self._bulk = BulkGauge()
        _OPEN.add(self)
        if first:
            self.reactor.call_soon(self._take_chunk, first)
        self._thread.start()
        self._update()
        self._schedule()
        self.flush()  # our hello (protocol/smux.py) leaves first

    # --- the demux thread ----------------------------------------------------------------------
    def _demux(self) -> None:
        """While it owns the reads: read the socket and hand the bytes to the reactor; never
        touches the session. Gives the socket back to the reactor when it goes quiet."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        # One buffer for this thread's reads; what is handed on is a bytes object of the size
        # read (no read allocates and maps a large buffer only to shrink it). An anonymous
        # mapping, so an idle session's buffer costs no memory until bytes arrive in it.
        scratch = memoryview(mmap.mmap(-1, READ_SIZE))
        why = ""
        while not self.closed:
            if not self._turn.is_set():
                self._turn.wait()
                continue
            if self._must_wait():
                self._wake.clear()
                self._waiting = True
                if self._must_wait():  # checked again: the reactor may have moved meanwhile
                    self._wake.wait(POLL_MS / 1000)
                self._waiting = False
                continue
            try:
                # Bytes TLS decrypted already are invisible to poll: read them first.
                if not self._tls_pending() and not poller.poll(QUIET_MS):
                    self._turn.clear()
                    self.reactor.call_soon(self._read_inline_again)
                    continue
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
            self._post(scratch[:got].tobytes())
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

    def _read_inline_again(self) -> None:
        """The thread gave the socket back (after what it read, which comes first)."""
        self._inline = True
        self._update()

    def _post(self, chunk: bytes) -> None:
        """Demux thread: queue a read for the reactor, waking it only if nothing waits yet."""
        with self._inbox_lock:
            self._inbox.append(chunk)
            self._inbox_bytes += len(chunk)
            if self._inbox_posted:
                return
            self._inbox_posted = True
        self.reactor.call_soon(self._take_inbox)

    # --- input ---------------------------------------------------------------------------------
    def _on_socket(self, mask: int) -> None:
        if mask & WRITE:
            self._flush_now()
        if mask & READ and self._inline and not self.closed:
            self._read_now()

    def _read_now(self) -> None:
        """One inline read; a full buffer means bulk: the demux thread reads on from here."""
        scratch = thread_scratch(INLINE_READ)
        try:
            got = self.sock.recv_into(scratch) if self._tls_lock is None else self._recv_tls(scratch)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            self.fail(f"connection failed: {reason(exc)}")
            return
        if not got:
            self.fail("the peer closed the connection")
            return
        if got == len(scratch):
            self._inline = False
            self._update()
            self._turn.set()
        self._take_chunk(scratch[:got].tobytes())

    def _take_chunk(self, data: bytes) -> None:
        self._received(data)
        self._give_credit()

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            chunks, self._inbox = self._inbox, []
            self._inbox_posted = False
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._received(data)
        with self._inbox_lock:
            self._inbox_bytes -= len(data)
        self._give_credit()

    def _received(self, data: bytes) -> None:
        if self.closed:
            return
        self._moved(len(data))
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
            elif isinstance(event, StreamReset):
                stream.failed("reset by the peer")
            if self.closed:
                return
        self.flush()

    def _must_wait(self) -> bool:
        """Demux thread: IN_FLIGHT bytes wait for the reactor, or it has no room for more."""
        return self._full or self._inbox_bytes >= IN_FLIGHT

    def _give_credit(self) -> None:
        """Reads were processed: let the demux thread read on, unless the unread bytes fill the
        receive buffer (TCP backpressure, as smux does)."""
        if self.closed:
            return
        full = not self.session.wants_input
        if full != self._full:
            self._full = full
            self._update()
        if self._waiting and not full:
            self._wake.set()

    def consumed(self) -> None:
        """A stream read bytes: send the window updates, and read on if we had stopped."""
        if self._full and self.session.wants_input:
            self._full = False
            self._update()
            if self._waiting:
                self._wake.set()
        if self.session.has_outgoing:
            self.flush()

    def _update(self) -> None:
        """Watch the socket for what the reactor wants of it now."""
        if self.closed:
            return
        mask = (READ if self._inline and not self._full else 0) | (WRITE if self._writing else 0)
        if mask != self._mask:
            self._mask = mask
            self.reactor.watch(self.sock, mask, self._on_socket)

    def stream_closed(self, stream: MuxStream) -> None:
        if self.on_stream_closed is not None:
            self.on_stream_closed(self)
        if self._finish_timer is not None:
            self._finish_if_done()

    # --- output --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what the session has queued at the end of this reactor turn, together with
        what other streams queue until then: one gathered write instead of one per frame."""
        if not self._flush_posted and not self.closed:
            self._flush_posted = True
            self.reactor.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        """Write what the session has queued; what the socket does not take waits for room."""
        self._flush_posted = False
        if self.closed:
            return
        if self._fin_sent:
            while self.session.has_outgoing:  # keepalives after our FIN: the peer is going
                self.session.outgoing_buffers()
            return
        pending = self._pending
        try:
            while True:
                if not pending:
                    if not self.session.has_outgoing:
                        break
                    pending = self._pending = self.session.outgoing_buffers(self._round)
                if self._tls_lock is None:
                    sent = self.sock.sendmsg(pending[:IOV_MAX])
                else:
                    sent = self._send_tls(pending)
                advance(pending, sent)
                self._moved(sent)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            limit = self._unsent.full()
            if limit:
                # Takes half the unsent limit: a write does not refill the queue it waited for.
                self._round = limit // 2
            if not self._writing:
                self._writing = True
                self._update()
            return
        except OSError as exc:
            self.fail(f"connection failed: {reason(exc)}")
            return
        if self._writing:
            self._writing = False
            self._update()
        if self._blocked:
            blocked, self._blocked = self._blocked, set()
            for stream in blocked:
                self.reactor.call_soon(stream.writable)
        if self._finish_timer is not None:
            self._finish_if_done()

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

    # --- streams -------------------------------------------------------------------------------
    def open_stream(self) -> MuxStream:
        """A new stream (opener only); ProtocolError when the session can open no more."""
        sid = self.session.open_stream()
        stream = self.streams[sid] = MuxStream(self, sid)
        return stream

    @property
    def finishing(self) -> bool:
        """The session ends on purpose (``finish``): no new stream belongs here."""
        return self._finish_timer is not None or self._fin_sent

    @property
    def congested(self) -> bool:
        """The socket is not taking our frames: a new stream here would only wait."""
        return bool(self._pending) and self._writing

    def busy_at(self, now: float) -> bool:
        """Bulk crosses this session at ``now``: it moves bytes at a bulk rate (mux/bulk.py), its demux
        thread reads on (reads fill the buffer), or the socket is not taking our frames. A new
        stream's frames would queue behind it."""
        bulk = self._bulk
        return not self._inline or self.congested or (bulk is not None and bulk.busy(now))

    def _moved(self, count: int) -> None:
        bulk = self._bulk
        if bulk is not None and bulk.moved(count, time.monotonic()) and self.on_busy is not None:
            self.on_busy(self)

    def __len__(self) -> int:
        return len(self.streams)

    # --- time ----------------------------------------------------------------------------------
    def _schedule(self) -> None:
        delay = max(0.0, self.session.next_deadline() - time.monotonic())
        self._timer = self.reactor.call_later(delay, self._tick)

    def _tick_sooner(self) -> None:
        """The session's next deadline moved earlier (a stream waits for the peer's hello)."""
        if self._timer is not None and self.session.next_deadline() < self._timer.when:
            self._timer.cancel()
            self._schedule()

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
    def finish(self, timeout: float) -> None:
        """End the session on purpose, losing nothing: the streams that run go on to their end
        (the owner opens none here any more); then, once every queued frame is written, our FIN
        goes (TCP) and the session closes at the peer's EOF. What still runs after ``timeout``
        seconds is reset. The owner hears nothing more of this session."""
        if self.closed or self._finish_timer is not None:
            return
        self._finish_timer = self.reactor.call_later(timeout, self._finish_expired)
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        if self.closed or self._fin_sent or self.streams or self._pending or self.session.has_outgoing:
            return
        self._fin_sent = True
        try:
            # The TCP socket's own shutdown, also under TLS: the peer's session reads it as the
            # end whichever way, and its streams that ended cleanly keep their bytes.
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            self.close()

    def _finish_expired(self) -> None:
        self._finish_timer = None
        if self.closed:
            return
        if self.streams:
            log.info("smux session with %s closed with %d stream(s) still open after the wait for them",
                     self.peer, len(self.streams))
        else:
            log.debug("smux session with %s closed: the peer did not end it after ours", self.peer)
        self.close()

    def fail(self, why: str) -> None:
        """End the session: every stream fails with ``why``; the owner hears it once (not when
        it let go of the session already: ``finish``)."""
        if self.closed:
            return
        finishing = self._finish_timer is not None
        self.close()
        if finishing:
            log.debug("smux session with %s ended: %s", self.peer, why)
        else:
            self.on_lost(self, why)

    def close(self) -> None:
        """Close the socket now; no callback to the owner. A stream whose both directions ended
        with a FIN keeps what it has not read yet and ends cleanly after it (every byte of it
        arrived); every other stream fails (its relay resets its socket)."""
        if self.closed:
            return
        self.closed = True
        _OPEN.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._finish_timer is not None:
            self._finish_timer.cancel()
            self._finish_timer = None
        streams, self.streams = self.streams, {}
        session = self.session
        for stream in streams.values():
            # Not in the session any more: it ended cleanly and was read to its end (a reset
            # failed it already).
            if stream.sid in session and not session.ended_cleanly(stream.sid):
                stream.failed("the smux session ended")
        try:
            # The TCP socket's own shutdown (an SSLSocket's would drop its SSL object under the
            # demux thread): wakes that thread at once.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass
        self._wake.set()
        self._turn.set()
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
        data = self.conn.session.read(self.sid, limit, time.monotonic())
        if data:
            self.conn.consumed()
        elif data == b"":
            self._want_read = True
        return data

    def eof_is_final(self) -> bool:
        return not self.conn.session.peer_half_closes

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
            conn.session.close_stream(self.sid)
            conn._tick_sooner()
            # What it had not read is dropped: the session reads on if that filled its buffer.
            conn.consumed()
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
