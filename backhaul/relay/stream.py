"""Stream links and the relay that joins a socket to one.

A *stream* is a two-way byte link that is not a file descriptor of its own: an smux stream inside
one TCP session (with per-stream flow control), a WebSocket carrying binary messages.
``StreamRelay`` moves one user connection's bytes between its socket and such a stream, with
bounded buffers and backpressure both ways, and half-close carried across.

Thread rule: every ``Stream`` method is called on the reactor thread, and a stream calls its
listener only on the reactor thread, never from inside one of its own methods (it posts the call
with ``reactor.call_soon``; events that arise on another thread are posted the same way).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from backhaul.buffers import scratch
from backhaul.net import reset_on_close
from backhaul.reactor import READ, WRITE, Reactor

log = logging.getLogger("backhaul.relay.stream")

READ_CHUNK = 512 * 1024  # one socket read (a fresh bytes object) and one stream read
ROUNDS = 4               # reads per event and direction before other connections get a turn
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH,
         errno.ENETUNREACH, errno.ECONNABORTED)
_EMPTY = memoryview(b"")


@runtime_checkable
class StreamListener(Protocol):
    """What a stream tells its user; reactor thread only, never re-entrant.

    Notifications are edge-triggered: ``stream_readable`` comes once after ``read`` returned
    ``b""`` (or before the first read) when data or EOF arrives, ``stream_writable`` once after
    ``write`` accepted less than it was given, when there is room. A listener that stops reading
    or writing before that point must come back on its own. Extra notifications are harmless.
    """

    def stream_readable(self) -> None:
        """Data or EOF can be read now."""

    def stream_writable(self) -> None:
        """``write`` would accept more now."""

    def stream_failed(self, reason: str) -> None:
        """The link is gone (reset, session lost): stop using it and ``close`` it. The last call."""


@runtime_checkable
class Stream(Protocol):
    """A two-way byte link that is not a socket (an smux stream, a WebSocket); never blocks.

    Once the link is gone, ``read``, ``write`` and ``shutdown_write`` may raise ``OSError``; that
    means the same as ``stream_failed``.
    """

    def listen(self, listener: StreamListener) -> None:
        """Set the listener, once; if data or EOF is already buffered, ``stream_readable`` follows."""

    def read(self, limit: int) -> bytes | None:
        """Up to ``limit`` bytes; ``b""``: nothing now; ``None``: EOF (the peer's FIN, all read)."""

    def eof_is_final(self) -> bool:
        """After EOF: True when the peer ended both directions (it reads nothing more: a Go
        peer closes a link at its first EOF), False when it only ended its data (a half-close,
        which only our own peers send, each link kind saying so its own way)."""

    def write(self, data: bytes | memoryview) -> int:
        """Bytes accepted now, copied (``data`` is only borrowed for the call). Fewer than
        ``len(data)``, maybe 0: full, ``stream_writable`` follows when there is room."""

    def shutdown_write(self) -> None:
        """Our FIN, after everything accepted; no ``write`` after it."""

    def close(self) -> None:
        """Release the stream; idempotent, no listener call after it. If both directions had ended
        (our FIN sent, the peer's read) this is the clean end; otherwise it aborts the link: what
        is unsent is dropped and the peer gets ``stream_failed`` (a reset)."""


class StreamRelay:
    """A socket joined to a stream until both directions end; reactor thread only.

    socket -> stream ("up"): reads go into a per-thread scratch buffer; what the stream does not
    accept is kept (at most one read) and the socket is not read until ``stream_writable``.
    stream -> socket ("down"): what the socket does not take is kept (at most one read) and the
    stream is not read until it is sent, so the stream's own buffer or window fills and its sender
    stops. A FIN either way becomes a FIN the other way once the bytes before it are delivered
    (a final EOF of the stream closes the socket once they are). An error of the socket resets
    the stream; a failed stream resets the socket: an end that lost bytes never looks clean.
    ``on_close`` runs once, after both are closed.
    """

    __slots__ = ("reactor", "sock", "stream", "on_close", "up_bytes", "down_bytes", "up_ended",
                 "down_ended", "_up", "_down", "_mask", "_closed", "_resume_posted")

    def __init__(self, reactor: Reactor, sock: socket.socket, stream: Stream,
                 on_close: Callable[[StreamRelay], None] | None = None) -> None:
        self.reactor = reactor
        self.sock = sock
        self.stream = stream
        self.on_close = on_close
        self.up_bytes = 0          # read from the socket
        self.down_bytes = 0        # written to the socket
        self.up_ended = False      # socket EOF seen and passed on as the stream's FIN
        self.down_ended = False    # stream EOF seen and passed on as shutdown(SHUT_WR)
        self._up: memoryview = _EMPTY    # read from the socket, not yet accepted by the stream
        self._down: memoryview = _EMPTY  # read from the stream, not yet sent
        self._mask = 0
        self._closed = False
        self._resume_posted = False

    @property
    def up_buffered(self) -> int:
        return len(self._up)

    @property
    def down_buffered(self) -> int:
        return len(self._down)

    @property
    def buffered(self) -> int:
        """Bytes this relay holds (at most one read each way)."""
        return len(self._up) + len(self._down)

    @property
    def closed(self) -> bool:
        return self._closed

    def counts(self) -> tuple[int, int]:
        """Bytes read from the socket so far, and written to it."""
        return self.up_bytes, self.down_bytes

    def start(self) -> None:
        """Arm the socket and listen to the stream; reactor thread only."""
        if self._closed:
            return
        if self.sock.gettimeout() != 0.0:  # usually non-blocking already: spare the system call
            self.sock.setblocking(False)
        self.stream.listen(self)
        self._update()

    def abort(self) -> None:
        """Tear the relay down from outside (shutdown of the program); reactor thread only. Both
        ends are reset unless both directions had ended."""
        self.close(reset=not (self.up_ended and self.down_ended))

    def close(self, *, reset: bool = False) -> None:
        """Close the socket (with a reset when ``reset``) and the stream now, then ``on_close``;
        idempotent. The stream resets its peer unless both directions had ended."""
        if self._closed:
            return
        self._closed = True
        if reset:
            reset_on_close(self.sock)
        self._mask = 0
        self.reactor.close_socket(self.sock)
        self._up = self._down = _EMPTY
        try:
            self.stream.close()
        except OSError as exc:
            log.debug("stream close: %s", exc)
        if self.on_close is not None:
            self.on_close(self)

    # --- the stream's listener ----------------------------------------------------------------
    def stream_readable(self) -> None:
        if self._closed or self._down or self.down_ended:
            return  # bytes still wait for the socket: its WRITE event reads on
        self._pump_down()
        self._update()

    def stream_writable(self) -> None:
        if self._closed or not self._up:
            return
        self._pump_up()
        self._update()

    def stream_failed(self, reason: str) -> None:
        if not self._closed:
            log.debug("stream failed: %s", reason)
            self.close(reset=True)

    # --- socket events ------------------------------------------------------------------------
    def _on_socket(self, mask: int) -> None:
        watched = self._mask
        if mask & WRITE and watched & WRITE:
            self._pump_down()
        if mask & READ and watched & READ and not self._closed:
            self._pump_up()
        self._update()

    def _pump_up(self) -> None:
        """Socket to stream for at most ROUNDS reads; stops when the socket is drained, the
        stream is full or the socket is at EOF."""
        if self.up_ended:
            return
        stream = self.stream
        try:
            if self._up:
                accepted = stream.write(self._up)
                if accepted < len(self._up):
                    self._up = self._up[accepted:]
                    return
                self._up = _EMPTY
            buf = scratch(READ_CHUNK)
            for _ in range(ROUNDS):
                # Read into this thread's buffer and hand the stream bytes of the size read: it
                # may keep them without another copy (smux frames are slices of them), and no
                # read allocates (and maps) a large buffer only to shrink it.
                try:
                    got = self.sock.recv_into(buf)
                except BlockingIOError:
                    return
                data = buf[:got].tobytes()
                if got == 0:
                    self.up_ended = True
                    stream.shutdown_write()
                    self._maybe_done()
                    return
                self.up_bytes += got
                accepted = stream.write(data)
                if accepted < got:
                    self._up = memoryview(data)[accepted:]
                    return
                if got < READ_CHUNK:
                    return  # drained: another recv would only raise EAGAIN
        except OSError as exc:
            self._error(exc)

    def _pump_down(self) -> None:
        """Stream to socket for at most ROUNDS reads; stops when the socket is full, the stream
        has nothing now or is at EOF. A run cut short by ROUNDS comes back by itself."""
        try:
            if self._down and not self._send_down():
                return
            for _ in range(ROUNDS):
                data = self.stream.read(READ_CHUNK)
                if data is None:
                    self._end_down()
                    return
                if not data:
                    return
                self._down = memoryview(data)
                if not self._send_down():
                    return
        except OSError as exc:
            self._error(exc)
            return
        if not self._resume_posted:
            self._resume_posted = True
            self.reactor.call_soon(self._resume_down)

    def _resume_down(self) -> None:
        self._resume_posted = False
        if not self._closed and not self._down and not self.down_ended:
            self._pump_down()
            self._update()

    def _send_down(self) -> bool:
        """Send what waits for the socket; True when it all went."""
        pending = self._down
        try:
            sent = self.sock.send(pending)
        except BlockingIOError:
            sent = 0
        self.down_bytes += sent
        self._down = pending[sent:] if sent < len(pending) else _EMPTY
        return not self._down

    def _end_down(self) -> None:
        self.down_ended = True
        if self.up_ended or self.stream.eof_is_final():
            # Both ways done, or the peer reads nothing more: what came before its EOF is
            # delivered, and the close sends our FIN (no shutdown call needed).
            self.close()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the socket is gone; its next read reports it

    def _maybe_done(self) -> None:
        if self.up_ended and self.down_ended:
            self.close()

    def _error(self, exc: OSError) -> None:
        """The socket broke, or the stream failed under a read or write: both ends are reset."""
        log.debug("stream relay error: %s", exc)
        self.close(reset=True)

    def _update(self) -> None:
        if self._closed:
            return
        mask = (READ if not self.up_ended and not self._up else 0) | (WRITE if self._down else 0)
        if mask != self._mask:
            self.reactor.watch(self.sock, mask, self._on_socket)
            self._mask = mask
