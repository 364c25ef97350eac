"""One established WebSocket on a non-blocking socket, driven by the reactor, its frames read
and written by protocol/ws_frame.py (PROTOCOL.md 3.2-3.3). Our own HTTP upgrade code does the
handshake; what it read past the head is handed in as ``first``.

A ``WebSocket`` runs in one of two modes, chosen by its user:

* **messages**: ``messages(on_message, on_lost)`` hands up each whole message (``bytes`` for a
  binary one, ``str`` for a text one), at most ``max_message`` bytes; ``send_binary`` and
  ``send_text`` send whole messages. The control channel (``WebSocketCarrier``, 1-byte binary
  messages) and the idle and assignment phase of a data websocket use it.
* **stream**: ``WebSocketStream(ws)`` is the ``Stream`` of backhaul/relay/stream.py: message
  payloads, binary or text, are one byte stream (message boundaries mean nothing), and what is
  written leaves as binary messages of at most 64 KiB. A websocket can go from messages to stream
  mode at any time, also from inside ``on_message``: what is buffered behind the message at hand
  (the data behind the target text message) becomes the start of the stream, nothing is lost.

``WebSocketLink`` is the link kind of ws and wss over it: the target as a text message, then the
websocket as a stream relayed to the user's (or the target's) socket.

Both ways are bounded: at most ``out_limit`` bytes wait for the socket (a stream write accepts
less, ``stream_writable`` follows when the socket drained; a message sender past it loses the
websocket), and a stream stops reading its socket while ``in_limit`` received bytes wait to be
read (TCP backpressure).

Ping frames are answered with Pong, a Close frame with a Close, then the socket is closed; we
never start a close handshake ourselves (neither does Backhaul in Go). An error or a protocol
violation simply closes the socket.

Half-close. WebSocket has none, and a Close frame ends both directions (our reader reads nothing after
it; gorilla's reader returns an error and Backhaul closes both sockets). Go's Backhaul closes
everything at the first EOF either way, which loses the answer to a request whose sender
half-closed. We do better without leaving the protocol: ``shutdown_write`` sends a Ping frame
carrying ``FIN_PING`` and sends no data after it, keeping the websocket open:

* a Python peer takes that Ping (and only in stream mode) as the end of our data: its stream
  reads EOF, its relay shuts the target's write side, the answer flows back, and when both
  directions ended the last one closes the TCP connection, which the other side reads as EOF.
  It does not answer this one Ping, so nothing ever arrives after our FIN and closing never
  meets unread bytes (which would turn the close into a reset and drop our last data);
* a Go peer answers it with a Pong like any Ping and goes on relaying. That Pong tells us the
  peer carries no half-close: we end the connection as it would have at our EOF (what it sent
  before the Pong is delivered, then both close, one round trip later than Go alone). Waiting
  instead for its side to end would hang every connection whose far end waits for the close:
  a user reading an answer to its end (HTTP/1.0, ``Connection: close``) after the target
  closed, or a target (ssh, a database) whose user has gone.

The alternatives lose: a Close frame, or a TCP half-close of the websocket's socket, makes a Go
peer close both its sockets at once (the answer is lost); keeping the websocket open without
telling the peer deadlocks two Python peers whose both ends half-closed (neither closes).

In stream mode the peer's end of data is that Ping, its Close frame, or TCP EOF (a Go peer closes
its socket at its first EOF): ``read`` then returns None once the buffered bytes are read. A
clean ``close`` (our FIN sent and the peer's read) sends what is still queued (as long as the
peer takes some of it every ``LINGER`` seconds) and closes (TLS: after our close_notify); any
other ``close`` resets the TCP connection (SO_LINGER 0), so the peer's stream fails.

TLS (wss): ``sock`` may be an ``ssl.SSLSocket`` past its handshake. SSL_read and SSL_write
wants are handled (a blocked write is retried with the very same buffer), and bytes already
decrypted inside the SSL object (``pending()``, which epoll cannot see) are read without waiting
for an event. Python's SSL read returns b"" for a TCP reset as for any EOF without close_notify
when ragged EOFs are suppressed, so we turn that off: only the peer's close_notify (Go's
``tls.Conn.Close`` sends one) reads as the end of its data, a bare FIN or a reset is a broken
link; at a clean end we send our close_notify before closing.

Reactor thread only, for every method of every class here. A stream's listener is never called
from inside a stream method: what a socket event brings is told when the event's handling is
done, anything else through ``reactor.call_soon``.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Callable

from backhaul.buffers import scratch
from backhaul.log import Throttle
from backhaul.net import reason, reset_on_close
from backhaul.protocol.chunks import ChunkQueue, advance
from backhaul.protocol.ws_frame import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    FrameError,
    FrameReader,
    close_frame,
    frame,
    frame_head,
)
from backhaul.reactor import READ, WRITE, Reactor, Timer
from backhaul.relay.stream import StreamListener, StreamRelay
from backhaul.tunnel.carrier import CONTROL_BACKLOG, OnData, OnLost
from backhaul.tunnel.core import OnRelayClosed

log = logging.getLogger("backhaul.links.websocket")
VIOLATIONS = Throttle(log)      # peers that break the protocol: a line a second however many do

# A stream's binary messages are one frame each of FRAME_SIZE bytes, head included: three whole
# 16 KiB TLS records, no extra one for the last few bytes. Below the loopback MSS (65483) on
# purpose: a Go peer writes each message to its target in one write, and on loopback a write of
# a full MSS toward a receiver whose window is just under it waits for the persist timer, message
# after message (64 KiB messages from us moved 2 MB/s through a Go client; the Go program itself
# sends 16 KiB).
FRAME_SIZE = 48 * 1024
MESSAGE_SIZE = FRAME_SIZE - 8   # a client's payload: 4-byte head and 4-byte mask key
SERVER_MESSAGE = FRAME_SIZE - 4 # a server's payload: 4-byte head, no mask
FIN_PING = b"backhaul:eof"      # Ping payload: no more data from this side (see the module text)
ROUNDS = 4                      # socket reads per event before other connections get a turn
IOV_MAX = 1024                  # buffers one sendmsg may take (Linux)
LINGER = 30.0                   # seconds a clean close waits for the socket to take more of the rest
PONG_SLACK = 64 * 1024          # pongs may queue this far past out_limit (a full stream's)
TLS_READ = 64 * 1024            # one TLS recv (it returns at most one 16 KiB record anyway)

OnMessage = Callable[[bytes | str], None]

_IDLE, _MESSAGES, _STREAM = 0, 1, 2


class WebSocket:
    """One open WebSocket (no HTTP handshake here); reactor thread only.

    ``client``: we are the client (we mask what we send, the peer must not). ``peer`` names the
    other end in reasons. ``first``: bytes read after the HTTP head, fed before anything else.
    ``read_size``: one socket read. Attributes for measurement: ``buffered_in`` (stream bytes
    received and not read), ``buffered_out`` (bytes waiting for the socket).
    """

    __slots__ = ("reactor", "sock", "client", "peer", "max_message", "read_size", "out_limit", "in_limit",
                 "_tls", "_reader", "_mode", "_mask", "_unparsed", "_out", "_out_size", "_parts", "_part_size",
                 "_inbox",
                 "_eof", "_eof_final", "_paused", "_closed", "_failure", "_ended_why",
                 "_on_message", "_on_lost", "_read_wants_write", "_write_wants_read",
                 "_resume_posted", "_lingering", "_linger_timer", "_linger_left", "_goodbye_waits",
                 "_dispatching", "_due", "_listener", "_want_read", "_want_write", "_shut", "_saw_eof",
                 "_stream_closed", "_told_failure")

    def __init__(self, reactor: Reactor, sock: socket.socket, *, client: bool, peer: str, first: bytes = b"",
                 max_message: int = 1 << 20, read_size: int = 256 * 1024, out_limit: int = 1 << 20,
                 in_limit: int = 1 << 20) -> None:
        self.reactor = reactor
        self.sock = sock
        self.client = client
        self.peer = peer
        self.max_message = max_message
        self.read_size = read_size
        self.out_limit = out_limit
        self.in_limit = in_limit
        self._tls = isinstance(sock, ssl.SSLSocket)
        # Frames only: no connection state machine, which the states of this class make
        # redundant (we never start a close; a Close frame received ends the websocket at once).
        self._reader = FrameReader(client)
        self._reader.feed(first)              # only buffered: parsed once a mode is chosen
        self._unparsed = bool(first)          # the reader holds bytes not parsed yet
        self._mode = _IDLE
        # A socket still watched (from its upgrade) is taken over as it is: _update changes the
        # events only if they must change, and an idle websocket's first event drops them.
        self._mask = reactor.watched(sock)
        if self._mask:
            reactor.watch(sock, self._mask, self._event)
        self._out: list[bytes | bytearray | memoryview] = []  # frames for the socket, in order
        self._out_size = 0
        self._parts: list[bytes | str] = []   # pieces of the message being received (messages mode)
        self._part_size = 0
        self._inbox = ChunkQueue()            # stream bytes received, not read yet
        self._eof = False                     # the peer sends no more data (stream mode)
        self._eof_final = False               # ... and reads none either (TCP EOF, Close frame)
        self._paused = False                  # not reading the socket: the inbox is full
        self._closed = False                  # the socket is closed
        self._failure = ""                    # why the link broke; set: every call raises
        self._ended_why = ""                  # why we can no longer send (the peer closed)
        self._on_message: OnMessage | None = None
        self._on_lost: Callable[[str], None] | None = None
        # Stream mode (the Stream contract, through WebSocketStream):
        self._listener: StreamListener | None = None
        self._want_read = True                # the listener waits to hear of data or EOF
        self._want_write = False              # ... of room, after a write was refused bytes
        self._shut = False                    # our FIN_PING is sent (or the peer had ended)
        self._saw_eof = False                 # the reader was handed the peer's EOF
        self._stream_closed = False           # the stream's user closed it
        self._told_failure = False
        self._read_wants_write = False        # TLS: a read needs the socket writable first
        self._write_wants_read = False        # TLS: a write needs the socket readable first
        self._resume_posted = False
        self._lingering = False               # a clean close waits for the socket to take the rest
        self._linger_timer: Timer | None = None
        self._linger_left = 0                 # bytes queued at the last look of a lingering close
        self._goodbye_waits = False           # TLS: our close_notify waits for room in the socket
        self._dispatching = False             # in our own socket event or resume
        self._due = 0                         # READ / WRITE: the stream's listener hears it after that
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
        if self._tls:
            # Python's SSL read reports a reset, like any TCP EOF without close_notify, as b""
            # when ragged EOFs are suppressed (its SSL_read_ex error mapping): only a peer's
            # close_notify may read as the end of its data, anything else is a broken link.
            sock.suppress_ragged_eofs = False  # type: ignore[attr-defined]

    # --- public -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered_out(self) -> int:
        return self._out_size

    @property
    def buffered_in(self) -> int:
        return self._inbox.size

    @property
    def reading(self) -> bool:
        """The socket is being read (False while the inbox is full, after EOF, when closed)."""
        return bool(self._mask & READ)

    def messages(self, on_message: OnMessage, on_lost: Callable[[str], None]) -> None:
        """Deliver whole messages to ``on_message`` from now on; ``on_lost(reason)`` once when the
        websocket is gone (EOF, error, Close frame, a message past ``max_message``). Both run
        from socket events, ``on_lost`` also from inside ``send_*`` (as SocketCarrier does)."""
        self._on_message = on_message
        self._on_lost = on_lost
        self._mode = _MESSAGES
        if self._closed:
            if self._failure:
                self.reactor.call_soon(self._tell_lost)
            return
        if self._unparsed or (self._tls and self.sock.pending()):
            self._post_resume()  # ``first`` may hold whole messages already
        self._update()

    def send_binary(self, *payloads: bytes | bytearray | memoryview) -> None:
        """Send each payload as one binary message; ignored once closed. A peer that leaves more
        than ``out_limit`` bytes unread loses the websocket."""
        if self._closed:
            return
        for payload in payloads:
            self._queue(frame(payload, masked=self.client))
        self._flush_checked()

    def send_text(self, text: str) -> None:
        """Send one text message (the target, on a data websocket); ignored once closed."""
        if self._closed:
            return
        self._queue(frame(text, masked=self.client))
        self._flush_checked()

    def fail(self, why: str) -> None:
        """Drop the connection now (a reset) and report it as lost: ``on_lost`` or
        ``stream_failed`` follows, as if the connection broke."""
        if self._closed:
            return
        self._set_reset()
        self._fail(why)

    def close(self) -> None:
        """Send what is queued if the socket takes it at once, then close; no callback after it.
        Idempotent; the socket never stays in the reactor."""
        if self._closed:
            return
        try:
            self._write_out()
        except OSError:
            pass
        self._close_socket()
        self._inbox.clear()   # its user is done: nobody reads what the peer sent

    def abort(self) -> None:
        """Close with a reset (SO_LINGER 0): nothing queued is sent; idempotent, no callback."""
        if self._closed:
            return
        self._set_reset()
        self._close_socket()
        self._inbox.clear()

    # --- sending --------------------------------------------------------------------------------
    def _queue(self, frame: bytes | bytearray) -> None:
        self._out.append(frame)
        self._out_size += len(frame)

    def _write_out(self) -> None:
        """Send what is queued until the socket is full; OSError when the connection broke.

        A TLS write that could not finish is retried with the very same buffer, as OpenSSL
        requires (Python's SSL sockets never write part of a buffer)."""
        out = self._out
        sock = self.sock
        self._write_wants_read = False
        try:
            if self._tls:
                while out:
                    buf = out[0]
                    sent = sock.send(buf)
                    self._out_size -= sent
                    if sent < len(buf):
                        out[0] = memoryview(buf)[sent:]
                    else:
                        del out[0]
            else:
                while out:
                    sent = sock.sendmsg(out[:IOV_MAX])
                    self._out_size -= sent
                    advance(out, sent)
        except (BlockingIOError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLWantReadError:
            self._write_wants_read = True

    def _flush(self) -> None:
        """Write what is queued; an error loses the websocket. Then: a lingering close ends when
        everything went, a stream that was refused bytes hears it has room."""
        if self._out:
            try:
                self._write_out()
            except OSError as exc:
                self._fail(f"websocket to {self.peer} failed: {reason(exc)}")
                return
        if self._lingering:
            if not self._out:
                self._goodbye()
                return
        elif self._want_write and self._out_size <= self.out_limit // 2:
            self._notify_writable()
        self._update()

    def _flush_checked(self) -> None:
        """Flush whole messages; a backlog past ``out_limit`` loses the websocket."""
        self._flush()
        if not self._closed and self._out_size > self.out_limit:
            self._fail(f"{self.peer} does not read its websocket ({self._out_size} bytes waiting)")

    def _send_stream(self, data: bytes | memoryview, count: int) -> None:
        """``data[:count]`` as binary messages of one frame each. A client's are copied, masked.
        A server's frame is a head and the payload unchanged:
        on TCP both go to the gathered write as they are, on TLS joined into one write (a head
        alone would be a record of its own)."""
        view = memoryview(data)
        if self.client:
            for offset in range(0, count, MESSAGE_SIZE):
                self._queue(frame(view[offset:min(count, offset + MESSAGE_SIZE)], masked=True))
            return
        if not (view.readonly and isinstance(view.obj, bytes)):
            view = memoryview(view[:count].tobytes())  # kept until sent: it must not change
        out = self._out
        for offset in range(0, count, SERVER_MESSAGE):
            chunk = view[offset:min(count, offset + SERVER_MESSAGE)]
            head = frame_head(len(chunk))
            if self._tls:
                out.append(b"".join((head, chunk)))
            else:
                out.append(head)
                out.append(chunk)
            self._out_size += len(head) + len(chunk)

    # --- receiving ------------------------------------------------------------------------------
    def _reading_wanted(self) -> bool:
        return (self._mode != _IDLE and not self._closed and not self._eof and not self._paused
                and not self._lingering)

    def _event(self, mask: int) -> None:
        self._dispatching = True
        self._handle(mask)
        self._dispatching = False
        if self._due:
            self._deliver_due()

    def _handle(self, mask: int) -> None:
        if mask & WRITE or (mask & READ and self._write_wants_read):
            self._flush()
            if self._closed:
                return
        if (mask & READ or (mask & WRITE and self._read_wants_write)) and self._reading_wanted():
            self._read()
            if self._closed:
                return
        self._update()

    def _deliver_due(self) -> None:
        """Tell the stream's listener what a socket event brought, now that this websocket is
        done with it (not from inside a stream method: the reactor called us)."""
        due, self._due = self._due, 0
        if due & READ:
            self._deliver_readable()
        if due & WRITE:
            self._deliver_writable()

    def _read(self) -> None:
        """Read up to ROUNDS batches of ``read_size`` bytes, each fed to the reader and handled."""
        for _ in range(ROUNDS):
            if self._mode == _STREAM and self._inbox.size >= self.in_limit:
                self._paused = True
                return
            got, status = self._recv_batch()
            if got or status == "eof":
                self._process()  # at EOF too: ``first`` may still be waiting in the reader
                if self._closed:
                    return
            if status == "eof":
                self._peer_eof()
                return
            if status == "drained" or not self._reading_wanted():
                return
        # Cut short by ROUNDS: the kernel's bytes bring another event, the SSL object's do not.
        if self._tls and self.sock.pending():
            self._post_resume()

    def _recv_batch(self) -> tuple[int, str]:
        """Feed the frame reader up to ``read_size`` bytes: one recv (TCP), or records until that many
        (TLS: each recv returns at most one record). Status: "more", "drained", "eof" or "error"
        (the websocket is lost then). Reads go into the thread's scratch buffer, which the reader
        copies from at once."""
        sock, reader, size = self.sock, self._reader, self.read_size
        view = scratch(min(size, TLS_READ) if self._tls else size)
        got = 0
        self._read_wants_write = False
        while got < size:
            try:
                count = sock.recv_into(view)
            except (BlockingIOError, ssl.SSLWantReadError):
                return got, "drained"
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                return got, "drained"
            except OSError as exc:
                self._process()  # what arrived before the error still counts
                self._fail(f"websocket to {self.peer} failed: {reason(exc)}")
                return 0, "error"
            if not count:
                return got, "eof"
            reader.feed(view[:count])  # copied into its buffer
            got += count
            if not self._tls:
                return got, ("drained" if count < len(view) else "more")
        return got, "more"

    def _process(self) -> None:
        """Handle the frames read so far. The mode is looked up per frame: ``on_message`` may
        switch to stream mode, and the rest of this batch then belongs to the stream. A data
        frame's opcode is its message's (the reader tracks continuations), its payload ``bytes``
        for a binary message and ``str`` for a text one; a frame may be part of one."""
        next_frame = self._reader.next_frame
        self._unparsed = False
        try:
            while (got := next_frame()) is not None:
                opcode, payload, finished = got
                if opcode == BINARY and self._mode == _STREAM:  # the bulk of the traffic
                    if payload:
                        self._inbox.append(payload)  # type: ignore[arg-type]
                        self._notify_readable()
                    continue
                if opcode == BINARY or opcode == TEXT:
                    self._data(payload, finished)  # type: ignore[arg-type]
                elif opcode == PING:
                    if payload == FIN_PING and self._mode == _STREAM:
                        self._peer_eof(final=False)
                    else:
                        self._queue(frame(payload, PONG, masked=self.client))  # type: ignore[arg-type]
                elif opcode == PONG:
                    if payload == FIN_PING and self._shut and self._mode == _STREAM:
                        # Only a peer that is not this program answers our end of data (ours
                        # never does): it carries no half-close and would wait for its own side
                        # to end, which may be waiting for us. End as it does at its first EOF.
                        self._peer_eof(final=True)
                elif opcode == CLOSE:
                    self._close_frame(*payload)  # type: ignore[misc]
                    return
                if self._closed:
                    return
        except FrameError as exc:
            self._violated(f"broke the websocket protocol: {exc}")
            return
        if self._out:
            self._flush()  # pongs
            if not self._closed and self._out_size > self.out_limit + PONG_SLACK:
                self._fail(f"{self.peer} pings but does not read its websocket ({self._out_size} bytes waiting)")

    def _data(self, data: bytes | str, finished: bool) -> None:
        if self._mode == _STREAM:
            if isinstance(data, str):
                data = data.encode()
            if data:
                self._inbox.append(data)
                self._notify_readable()
            return
        if data:
            self._parts.append(data)
            self._part_size += len(data) if isinstance(data, bytes) else len(data.encode())
            if self._part_size > self.max_message:
                self._violated(f"sent a websocket message of more than {self.max_message} bytes "
                               f"({self._part_size} so far)")
                return
        if finished:
            parts = self._parts
            message = ("" if isinstance(data, str) else b"").join(parts)  # type: ignore[arg-type]
            self._parts = []
            self._part_size = 0
            assert self._on_message is not None
            self._on_message(message)

    def _close_frame(self, code: int, why: str) -> None:
        """The peer's Close frame: answered with the same code and reason, as RFC 6455 asks."""
        try:
            self._queue(close_frame(code, why, masked=self.client))
            self._write_out()
        except OSError:
            pass
        why = f"{self.peer} closed the websocket (code {int(code)}{': ' + why if why else ''})"
        if self._mode == _STREAM:
            self._ended_why = why
            self._eof = self._eof_final = True
            self._close_socket()
            self._notify_readable()  # what is buffered is read, then EOF
        else:
            self._fail(why)

    def _peer_eof(self, *, final: bool = True) -> None:
        """The peer ends its data: TCP EOF (``final``: it reads nothing more either), or FIN_PING
        on a stream (a half-close)."""
        if self._mode != _STREAM:
            self._fail(f"{self.peer} closed the websocket connection")
            return
        self._eof = True
        self._eof_final = final
        self._notify_readable()

    def _take(self, limit: int) -> bytes | memoryview:
        """Up to ``limit`` bytes of the inbox; reading resumes when it has room again."""
        data = self._inbox.take(limit)
        if self._paused and self._inbox.size < self.in_limit:
            self._paused = False
            self._post_resume()
        return data

    def _post_resume(self) -> None:
        if not self._resume_posted:
            self._resume_posted = True
            self.reactor.call_soon(self._resume)

    def _resume(self) -> None:
        """Handle what the reader holds already, then read on (bytes inside an SSL object or the
        kernel's, after the inbox had been full)."""
        self._resume_posted = False
        if self._closed or self._mode == _IDLE:
            return
        self._dispatching = True
        self._process()
        if self._reading_wanted():
            self._read()
        if not self._closed:
            self._update()
        self._dispatching = False
        if self._due:
            self._deliver_due()

    # --- the end --------------------------------------------------------------------------------
    def _violated(self, why: str) -> None:
        """The peer sent what the protocol forbids: a line says so (its owner may tell nobody,
        as a data link's relay does), then the websocket is lost."""
        VIOLATIONS.warning("closed the websocket of %s: it %s", self.peer, why)
        self._fail(f"{self.peer} {why}")

    def _fail(self, why: str) -> None:
        """The websocket is lost: close the socket, then tell the user (once)."""
        if self._closed:
            return
        log.debug("websocket %s lost: %s", self.peer, why)
        self._failure = why
        self._close_socket()
        if self._mode == _MESSAGES:
            self._tell_lost()
        elif self._mode == _STREAM:
            self._notify_failed()

    def _tell_lost(self) -> None:
        on_lost = self._on_lost
        self._on_message = self._on_lost = None
        if on_lost is not None:
            on_lost(self._failure)

    def _set_reset(self) -> None:
        reset_on_close(self.sock)

    def _close_after_flush(self) -> None:
        """The clean end of a stream: what is queued goes first, while the peer keeps taking it.
        A busy machine may drain a full queue slowly; only a peer that takes nothing for LINGER
        seconds loses the rest (a reset)."""
        if self._closed:
            return
        try:
            self._write_out()
        except OSError:
            self._close_socket()
            return
        if not self._out:
            self._goodbye()
            return
        self._lingering = True
        self._linger_left = self._out_size
        self._linger_timer = self.reactor.call_later(LINGER, self._linger_check)
        self._update()

    def _linger_check(self) -> None:
        if self._closed:
            return
        if self._out_size < self._linger_left:
            self._linger_left = self._out_size
            self._linger_timer = self.reactor.call_later(LINGER, self._linger_check)
        else:
            self.abort()

    def _goodbye(self) -> None:
        """Close at the clean end. On TLS our close_notify goes first: the peer reads it as the end
        of our data, where a bare TCP FIN would read as a broken link (see __init__). We do not
        wait for the peer's."""
        if self._tls:
            try:
                self.sock.unwrap()  # type: ignore[attr-defined]
            except ssl.SSLWantWriteError:
                # The socket is full: closing now would drop our close_notify, and the peer would
                # read a bare FIN (a broken link) and lose what it has not read yet. It goes when
                # there is room, within the linger's bound.
                self._goodbye_waits = True
                if not self._lingering:
                    self._lingering = True
                    self._linger_left = 0
                    self._linger_timer = self.reactor.call_later(LINGER, self._linger_check)
                self._update()
                return
            except (OSError, ValueError):
                pass  # SSLWantReadError: ours is sent, the peer's is not here yet
        self._close_socket()

    def _close_socket(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._mask = 0
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self.reactor.close_socket(self.sock)
        self._out = []
        self._out_size = 0
        self._parts = []
        if self._failure:
            self._inbox.clear()

    def _update(self) -> None:
        if self._closed:
            return
        mask = ((READ if self._reading_wanted() or self._write_wants_read else 0)
                | (WRITE if self._out or self._read_wants_write or self._goodbye_waits else 0))
        if mask != self._mask:
            self.reactor.watch(self.sock, mask, self._event)
            self._mask = mask

    # --- stream mode: the Stream contract, called through WebSocketStream ------------------------
    def start_stream(self) -> None:
        """Go to stream mode at once: a message being received and everything behind it become
        stream bytes, which wait in the inbox until ``stream_listen`` (a full inbox stops the
        socket's reading). Once per websocket."""
        if self._mode == _STREAM:
            raise RuntimeError("this websocket is a stream already")
        self._on_message = self._on_lost = None
        self._mode = _STREAM
        for part in self._parts:  # a message half received: its bytes so far start the stream
            data = part.encode() if isinstance(part, str) else part
            if data:
                self._inbox.append(data)
        self._parts = []
        self._part_size = 0
        if not self._closed:
            # Only a websocket fresh from its upgrade holds bytes nobody parsed: in messages
            # mode every read is parsed at once, and what follows the message at hand in the
            # same read is parsed by the loop that runs this (the stream's now).
            if self._unparsed or (self._tls and self.sock.pending()):
                self._post_resume()
            self._update()

    @property
    def stream_closed(self) -> bool:
        return self._stream_closed

    def stream_listen(self, listener: StreamListener) -> None:
        self._listener = listener
        self._want_read = True
        if self._failure:
            self.reactor.call_soon(self._deliver_failed)
        elif self._inbox or self._eof or self._closed:
            self.reactor.call_soon(self._deliver_readable)
        # Otherwise the first data or EOF to arrive notifies (``_want_read`` is set).

    def stream_read(self, limit: int) -> bytes | None:
        if self._failure:
            raise ConnectionResetError(errno.ECONNRESET, self._failure)
        if self._inbox:
            return self._take(limit)
        if self._eof:
            self._saw_eof = True
            return None
        self._want_read = True
        return b""

    @property
    def eof_final(self) -> bool:
        """The peer's end of data was TCP EOF or a Close frame (it reads nothing more either)."""
        return self._eof_final

    def stream_write(self, data: bytes | memoryview) -> int:
        if self._failure:
            raise ConnectionResetError(errno.ECONNRESET, self._failure)
        if self._shut:
            raise BrokenPipeError(errno.EPIPE, "write after shutdown_write")
        if self._closed:
            raise BrokenPipeError(errno.EPIPE, self._ended_why or "the websocket is closed")
        size = len(data)
        count = min(size, max(0, self.out_limit - self._out_size))
        if count:
            self._send_stream(data, count)
        if count < size:
            self._want_write = True
        self._flush()
        return count

    def stream_shutdown_write(self) -> None:
        if self._failure:
            raise ConnectionResetError(errno.ECONNRESET, self._failure)
        if self._shut:
            return
        self._shut = True
        if self._closed or self._eof:
            return  # the peer has ended: our close is all it needs (the relay's is next)
        self._queue(frame(FIN_PING, PING, masked=self.client))
        self._flush()

    def stream_close(self) -> None:
        if self._stream_closed:
            return
        self._stream_closed = True
        # The listener (a relay) holds the stream, which holds this websocket: a cycle, which
        # only the garbage collector's full pass frees, and a quiet server may not run one for
        # hours. Broken here, they go with their last reference, and whatever a closed websocket
        # still holds goes with them.
        self._listener = None
        if self._shut and self._saw_eof and not self._failure and not self._inbox:
            self._close_after_flush()
        else:
            self.abort()

    # Inside the websocket's own socket event (or resume) a notification is delivered when that
    # is done with (``_deliver_due``); from anywhere else, such as a write, it is posted.
    def _notify_readable(self) -> None:
        if self._want_read and self._listener is not None:
            self._want_read = False
            if self._dispatching:
                self._due |= READ
            else:
                self.reactor.call_soon(self._deliver_readable)

    def _notify_writable(self) -> None:
        if self._listener is not None:
            self._want_write = False
            if self._dispatching:
                self._due |= WRITE
            else:
                self.reactor.call_soon(self._deliver_writable)

    def _notify_failed(self) -> None:
        if self._listener is not None:
            self.reactor.call_soon(self._deliver_failed)

    def _deliver_readable(self) -> None:
        if self._listener is not None and not self._told_failure:
            self._listener.stream_readable()

    def _deliver_writable(self) -> None:
        if self._listener is not None and not self._told_failure:
            self._listener.stream_writable()

    def _deliver_failed(self) -> None:
        listener = self._listener
        if listener is None or self._told_failure:
            return
        self._told_failure = True
        self._listener = None
        listener.stream_failed(self._failure)


class WebSocketStream:
    """A websocket in stream mode: the ``Stream`` of backhaul/relay/stream.py, named apart from
    the websocket's own ``close`` (which ends a websocket in messages mode).

    Made from a websocket in messages mode (or fresh), it takes over at once (``start_stream``).
    ``shutdown_write`` sends FIN_PING (see the module text); ``close`` after both directions
    ended sends what is queued and closes, any other ``close`` resets the connection.
    """

    __slots__ = ("ws",)

    def __init__(self, ws: WebSocket) -> None:
        ws.start_stream()
        self.ws = ws

    @property
    def closed(self) -> bool:
        return self.ws.stream_closed

    @property
    def buffered_in(self) -> int:
        return self.ws.buffered_in

    @property
    def buffered_out(self) -> int:
        return self.ws.buffered_out

    def listen(self, listener: StreamListener) -> None:
        self.ws.stream_listen(listener)

    def read(self, limit: int) -> bytes | None:
        return self.ws.stream_read(limit)

    def eof_is_final(self) -> bool:
        return self.ws.eof_final

    def write(self, data: bytes | memoryview) -> int:
        return self.ws.stream_write(data)

    def shutdown_write(self) -> None:
        self.ws.stream_shutdown_write()

    def close(self) -> None:
        self.ws.stream_close()


class WebSocketCarrier:
    """The control channel on a websocket (PROTOCOL.md 3.2): every message is one byte.

    Each message's payload goes to ``on_data``; an empty or a text message is a protocol error
    (the Go peer would panic on the former) and loses the carrier. ``send`` sends each byte as its
    own binary message, as the Go peer reads ``payload[0]`` of each. More than ``backlog`` bytes
    of frames waiting for a peer that does not read lose the carrier, as with SocketCarrier.
    """

    __slots__ = ("ws", "peer", "backlog", "_on_data", "_on_lost")

    def __init__(self, ws: WebSocket, backlog: int = CONTROL_BACKLOG) -> None:
        self.ws = ws
        self.peer = ws.peer
        self.backlog = backlog
        self._on_data: OnData | None = None
        self._on_lost: OnLost | None = None

    def start(self, on_data: OnData, on_lost: OnLost) -> None:
        self._on_data = on_data
        self._on_lost = on_lost
        self.ws.messages(self._message, self._lost)

    def send(self, data: bytes) -> None:
        ws = self.ws
        if ws.closed or not data:
            return
        ws.send_binary(*(data[i:i + 1] for i in range(len(data))))
        if not ws.closed and ws.buffered_out > self.backlog:
            self._lose(f"{self.peer} does not read its control channel ({ws.buffered_out} bytes waiting)")

    def close(self) -> None:
        self._on_data = self._on_lost = None
        self.ws.close()

    def _message(self, message: bytes | str) -> None:
        if isinstance(message, str):
            self._lose(f"{self.peer} sent a text control message")
        elif not message:
            self._lose(f"{self.peer} sent an empty control message")
        elif self._on_data is not None:
            self._on_data(message)

    def _lost(self, why: str) -> None:
        on_lost = self._on_lost
        self._on_data = self._on_lost = None
        if on_lost is not None:
            on_lost(why)

    def _lose(self, why: str) -> None:
        on_lost = self._on_lost
        self.close()
        if on_lost is not None:
            on_lost(why)


class WebSocketLink:
    """A link that is one WebSocket (ws, wss): the target goes as a text message, then the
    WebSocket is a stream relayed to the user's (or target's) socket."""

    __slots__ = ("reactor", "ws", "stream")

    def __init__(self, reactor: Reactor, ws: WebSocket, stream: WebSocketStream | None = None) -> None:
        self.reactor = reactor
        self.ws = ws
        self.stream = stream   # the client's: made when the target arrives, so no data is taken for a message

    def peer(self) -> tuple[str, int]:
        return self.ws.sock.getpeername()[:2]

    def send_header(self, target: str, proxy: bytes) -> bool:
        # No PROXY header on ws/wss (PROTOCOL.md 6.3): the Go client would take it for data.
        self.ws.send_text(target)
        return not self.ws.closed

    def attach(self, other: socket.socket, on_close: OnRelayClosed) -> StreamRelay:
        stream = self.stream or WebSocketStream(self.ws)
        relay = StreamRelay(self.reactor, other, stream, on_close=on_close)
        relay.start()
        return relay

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.ws.close()
