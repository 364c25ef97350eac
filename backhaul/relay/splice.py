"""The relay: moves bytes between two connected sockets until both directions end.

Short work runs on the reactor thread (a couple of rounds); a direction that keeps having data
goes to the worker pool until its source would block, then back to the reactor. On Linux bytes
go through a pipe with ``os.splice`` (never into Python); elsewhere through ``recv_into`` on a
per-thread buffer. Idle connections own no buffer and no pipe.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable

from backhaul.buffers import scratch
from backhaul.net import reset_on_close
from backhaul.pipes import SMALL, Pipe, PipePool
from backhaul.reactor import READ, WRITE, Reactor

log = logging.getLogger("backhaul.relay.splice")

COPY_CHUNK = 256 * 1024  # recv_into buffer, one per thread
INLINE_ROUNDS = 2
WORKER_ROUNDS = 64
WORKER_SLICE = 0.05   # seconds a worker stays on one direction before others get a turn
HOLD_MS = 1           # how long a worker waits for more bytes before handing the socket back
HAS_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH,
         errno.ENETUNREACH, errno.ECONNABORTED)

# Outcomes of one pumping run.
WANT_READ, WANT_WRITE, MORE, EOF, FAILED = range(5)


def choose_mode() -> str:
    """``splice`` where the OS has it, unless BACKHAUL_RELAY=copy asks for the portable path."""
    wanted = os.environ.get("BACKHAUL_RELAY", "")
    if wanted == "copy" or not HAS_SPLICE:
        return "copy"
    return "splice"


MODE = choose_mode()


class Direction:
    """One way of a relay: bytes from ``src`` to ``dst``, and what is stuck between them."""

    __slots__ = ("src", "dst", "pipes", "splice", "pipe", "queued", "held", "stuck", "state", "moved")

    def __init__(self, src: socket.socket, dst: socket.socket, pipes: PipePool | None) -> None:
        self.src = src
        self.dst = dst
        self.pipes = pipes
        self.splice = pipes is not None
        self.pipe: Pipe | None = None
        self.queued = 0          # bytes in the pipe (splice mode)
        self.held = 0            # of which counted as pinned while the receiver does not read
        self.stuck = b""         # bytes not yet written, outside any pipe
        self.state = WANT_READ
        self.moved = 0           # bytes read from src: one addition per read, read by the status page

    def pump(self, rounds: int, inline: bool = False) -> int:
        """Move bytes for at most ``rounds`` reads; returns why it stopped.

        ``inline`` runs (on the reactor, the first bytes of a connection) copy through a buffer
        even where splice is used: for the few bytes of a request or an answer, two plain calls
        cost less than two splices and a pipe. What keeps coming goes to a worker, which splices.
        """
        try:
            if self.splice and not (inline and not self.queued):
                return self._pump_splice(rounds)
            return self._pump_copy(rounds)
        except OSError as exc:
            if exc.errno not in _GONE:
                log.debug("relay error: %s", exc)
            return FAILED

    def _pump_splice(self, rounds: int) -> int:
        pipes = self.pipes
        assert pipes is not None
        if self.held:
            pipes.pin(-self.held)
            self.held = 0
        if self.stuck and not self._send_stuck():
            return WANT_WRITE
        src, dst = self.src.fileno(), self.dst.fileno()
        if self.pipe is None:
            self.pipe = pipes.get()
        pipe = self.pipe
        got = bite = 0
        for _ in range(rounds):
            if self.queued and not self._drain_pipe(pipe.r, dst):
                return WANT_WRITE
            # The pipe is empty here, so a short read means the socket is drained, whatever size
            # the kernel gave the pipe: asking again would only raise EAGAIN.
            bite = pipes.bite(pipe, self.dst)
            try:
                got = os.splice(src, pipe.w, bite, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return WANT_READ
            if got == 0:
                return EOF
            self.queued = got
            self.moved += got
            if got < bite:
                break
        if self.queued and not self._drain_pipe(pipe.r, dst):
            return WANT_WRITE
        return MORE if got == bite else WANT_READ

    def _send_stuck(self) -> bool:
        """Write the bytes kept outside a pipe; False when ``dst`` would block first."""
        try:
            while self.stuck:
                sent = self.dst.send(self.stuck)
                self.stuck = self.stuck[sent:]
        except BlockingIOError:
            return False
        return True

    def park(self) -> None:
        """End of a run: an empty pipe goes back to the pool. A pipe whose receiver stopped
        reading gives its few bytes to a buffer and goes back too; a fuller one stays with its
        bytes, counted as pinned."""
        pipe = self.pipe
        if pipe is None:
            return
        assert self.pipes is not None
        if self.queued and self.queued <= SMALL:
            self.stuck += os.read(pipe.r, self.queued)
            self.queued = 0
        if not self.queued:
            self.pipes.put(pipe)
            self.pipe = None
        else:
            self.held = self.queued
            self.pipes.pin(self.held)

    def _drain_pipe(self, pipe_r: int, dst: int) -> bool:
        """Write what sits in the pipe; False when ``dst`` would block first."""
        try:
            while self.queued:
                sent = os.splice(pipe_r, dst, self.queued, flags=_SPLICE_FLAGS)
                self.queued -= sent
        except BlockingIOError:
            return False
        return True

    def _pump_copy(self, rounds: int) -> int:
        src, dst = self.src, self.dst
        buf = scratch(COPY_CHUNK)
        pending: memoryview | bytes = self.stuck
        self.stuck = b""
        try:
            for _ in range(rounds):
                while pending:
                    sent = dst.send(pending)
                    pending = pending[sent:]
                got = src.recv_into(buf)
                if got == 0:
                    return EOF
                self.moved += got
                pending = buf[:got]
                if got < len(buf):  # drained: asking again would only raise EAGAIN
                    break
            while pending:
                sent = dst.send(pending)
                pending = pending[sent:]
            return MORE if got == len(buf) else WANT_READ
        except BlockingIOError:
            if pending:
                self.stuck = bytes(pending)  # the buffer belongs to this thread, not to us
                return WANT_WRITE
            return WANT_READ

    def release(self) -> None:
        if self.held:
            assert self.pipes is not None
            self.pipes.pin(-self.held)
            self.held = 0
        if self.pipe is not None:
            self.pipes.discard(self.pipe)
            self.pipe = None
        self.stuck = b""
        self.queued = 0


class Relay:
    """Both directions between two sockets, driven by the reactor and the worker pool.

    A peer's FIN becomes ``shutdown(SHUT_WR)`` on the other socket, so half-close crosses the
    tunnel; an error in either direction (or an abort) resets both sockets: a side cut short
    reads a reset, never a clean end. ``on_close`` runs once, on the reactor thread, after both
    sockets are closed.
    """

    __slots__ = ("reactor", "a", "b", "ab", "ba", "_masks", "_closed", "_failed", "on_close")

    def __init__(self, reactor: Reactor, a: socket.socket, b: socket.socket,
                 on_close: Callable[[Relay], None] | None = None, mode: str = "") -> None:
        pipes = reactor.pipes if (mode or MODE) == "splice" else None
        self.reactor = reactor
        self.a = a
        self.b = b
        self.ab = Direction(a, b, pipes)
        self.ba = Direction(b, a, pipes)
        self._masks = [0, 0]
        self._closed = False
        self._failed = False
        self.on_close = on_close

    def start(self, first: socket.socket | None = None, early: bytes = b"") -> None:
        """Arm both sockets; reactor thread only. ``first``, when given, is the socket whose
        bytes are likely waiting already (a user's request, sent with its connection): they
        are moved now instead of after another turn of the reactor. ``early``: bytes read from
        ``first`` before the relay existed, written to the other side ahead of the rest."""
        for sock in (self.a, self.b):
            if sock.gettimeout() != 0.0:  # usually non-blocking already: spare the system call
                sock.setblocking(False)
        if first is not None:
            direction = self.ab if first is self.a else self.ba
            direction.stuck = early
            direction.moved += len(early)
            self._run_inline(direction)
            if self._closed:
                return
        self._update()

    # --- reactor side -------------------------------------------------------------------------
    def _on_a(self, mask: int) -> None:
        self._events(mask, self.ab, self.ba)

    def _on_b(self, mask: int) -> None:
        self._events(mask, self.ba, self.ab)

    def _events(self, mask: int, reading: Direction, writing: Direction) -> None:
        if mask & READ and reading.state == WANT_READ:
            self._run_inline(reading)
        if mask & WRITE and writing.state == WANT_WRITE and not self._closed:
            self._run_inline(writing)
        if not self._closed:
            self._update()

    def _run_inline(self, direction: Direction) -> None:
        outcome = direction.pump(INLINE_ROUNDS, inline=True)
        direction.park()
        if outcome == MORE:
            direction.state = MORE
            self._to_worker(direction)
        else:
            self._settle(direction, outcome)

    def _to_worker(self, direction: Direction) -> None:
        """Hand a busy direction to the pool; a pool that is shut down ends the relay here."""
        if not self.reactor.submit(self._run_in_worker, direction):
            direction.state = FAILED
            self._fail()
            self._maybe_close()

    def _run_in_worker(self, direction: Direction) -> None:
        """Pump while bytes keep coming: a short wait on the socket here is far cheaper than a
        round trip through the reactor, and a quiet direction goes back to it after HOLD."""
        deadline = time.monotonic() + WORKER_SLICE
        readable = select.poll()
        readable.register(direction.src, select.POLLIN)
        writable = select.poll()
        writable.register(direction.dst, select.POLLOUT)
        while True:
            outcome = direction.pump(WORKER_ROUNDS) if not self._failed else FAILED
            if outcome == WANT_READ:
                ready = readable.poll(HOLD_MS)
            elif outcome == WANT_WRITE:
                ready = writable.poll(HOLD_MS)
            else:
                break
            if not ready or self._failed or time.monotonic() > deadline:
                break
        direction.park()
        self.reactor.call_soon(self._back_from_worker, direction, outcome)

    def _back_from_worker(self, direction: Direction, outcome: int) -> None:
        if self._failed:
            outcome = FAILED
        if outcome == MORE:
            self._to_worker(direction)  # to the back of the queue: fair
            return
        self._settle(direction, outcome)
        if not self._closed:
            self._update()

    def _settle(self, direction: Direction, outcome: int) -> None:
        direction.state = outcome
        other = self.ba if direction is self.ab else self.ab
        if outcome == EOF and other.state not in (EOF, FAILED):  # else both close right away
            try:
                direction.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        elif outcome == FAILED:
            self._fail()
        self._maybe_close()

    def _fail(self) -> None:
        """Make a worker busy on this relay stop soon, then close once it is back; the close
        resets both sockets. Only the read side is shut now (a worker's reads end at once): a
        FIN sent here would reach the peer as a clean end ahead of the reset."""
        self._failed = True
        for sock in (self.a, self.b):
            reset_on_close(sock)
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        for direction in (self.ab, self.ba):
            if direction.state in (WANT_READ, WANT_WRITE):
                direction.state = FAILED

    def _maybe_close(self) -> None:
        states = (self.ab.state, self.ba.state)
        if MORE in states:
            return  # a worker still uses the sockets
        done = all(s in (EOF, FAILED) for s in states)
        if done or self._failed:
            self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def counts(self) -> tuple[int, int]:
        """Bytes read so far from ``a`` (towards ``b``) and from ``b``; any thread."""
        return self.ab.moved, self.ba.moved

    def close(self) -> None:
        """Close both sockets now; reactor thread only, never while a worker pumps."""
        if self._closed:
            return
        self._closed = True
        for sock in (self.a, self.b):
            self.reactor.close_socket(sock)
        self.ab.release()
        self.ba.release()
        if self.on_close is not None:
            self.on_close(self)

    def abort(self) -> None:
        """Tear the relay down from outside (shutdown of the program); reactor thread only."""
        if self._closed:
            return
        self._fail()
        self._maybe_close()

    def _update(self) -> None:
        for index, sock, reading, writing, callback in (
            (0, self.a, self.ab, self.ba, self._on_a),
            (1, self.b, self.ba, self.ab, self._on_b),
        ):
            mask = (READ if reading.state == WANT_READ else 0) | (WRITE if writing.state == WANT_WRITE else 0)
            if mask != self._masks[index]:
                self.reactor.watch(sock, mask, callback)
                self._masks[index] = mask
