"""An in-memory ``Stream`` pair for tests: two connected ends, each direction a bounded buffer.

Semantics (those of ``backhaul.relay.stream.Stream``):
- ``write`` accepts what fits in ``capacity`` and copies it; a short write arms ``stream_writable``,
  posted once when the reader frees room.
- ``read`` returning ``b""`` arms ``stream_readable``, posted once when data or EOF arrives.
- ``shutdown_write`` passes EOF across after the bytes before it.
- ``close`` after both directions ended (our FIN sent, the peer's read) is the clean end: the peer
  still reads what is buffered for it. Any other ``close`` is a reset: the peer's buffers are
  dropped and its listener gets ``stream_failed("peer closed")``; its calls then raise
  ``ConnectionResetError``.
- ``fail(reason)`` makes this end fail as a lost session would (``stream_failed(reason)``).
- ``eof_is_final()`` is ``final_eof``, False unless a test sets it (a Go-like peer).

Every listener call goes through ``reactor.call_soon``, and every method checks that it runs on
the reactor thread (once that thread is running), so a relay breaking the thread rule fails loudly.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

from backhaul.reactor import Reactor
from backhaul.relay.stream import StreamListener


class Channel:
    """One direction: bytes written at one end wait here for the other end to read them."""

    __slots__ = ("buf", "capacity", "eof", "peak", "reader_waiting", "writer_waiting")

    def __init__(self, capacity: int) -> None:
        self.buf = bytearray()
        self.capacity = capacity
        self.eof = False
        self.peak = 0               # most bytes ever buffered
        self.reader_waiting = True  # the reader is owed stream_readable when data or EOF arrives
        self.writer_waiting = False  # the writer is owed stream_writable when room frees up

    @property
    def buffered(self) -> int:
        return len(self.buf)


class MemoryStream:
    """One end of a memory stream pair."""

    def __init__(self, reactor: Reactor, inbound: Channel, outbound: Channel, name: str) -> None:
        self.reactor = reactor
        self.name = name
        self.inbound = inbound
        self.outbound = outbound
        self.peer: MemoryStream | None = None
        self.listener: StreamListener | None = None
        self.closed = False
        self.failure: str | None = None
        self.told_failure = False
        self.shut = False       # our FIN is sent
        self.saw_eof = False    # read returned None
        self.final_eof = False  # the peer's EOF ends both ways (as a Go peer's does): set by tests

    def __repr__(self) -> str:
        return f"<MemoryStream {self.name} in={self.inbound.buffered} out={self.outbound.buffered}>"

    # --- the Stream contract ------------------------------------------------------------------
    def listen(self, listener: StreamListener) -> None:
        self._on_reactor_thread()
        if self.listener is not None:
            raise RuntimeError("listen() is called once")
        self.listener = listener
        if self.failure is not None:
            self._post("stream_failed", self.failure)
        elif self.inbound.buf or self.inbound.eof:
            self.inbound.reader_waiting = False
            self._post("stream_readable")

    def read(self, limit: int) -> bytes | None:
        self._check()
        channel = self.inbound
        if channel.buf:
            data = bytes(channel.buf[:limit])
            del channel.buf[:limit]
            if channel.writer_waiting:
                channel.writer_waiting = False
                assert self.peer is not None
                self.peer._post("stream_writable")
            return data
        if channel.eof:
            self.saw_eof = True
            return None
        channel.reader_waiting = True
        return b""

    def eof_is_final(self) -> bool:
        return self.final_eof

    def write(self, data: bytes | memoryview) -> int:
        self._check()
        if self.shut:
            raise BrokenPipeError(errno.EPIPE, "write after shutdown_write")
        channel = self.outbound
        accepted = min(len(data), channel.capacity - len(channel.buf))
        if accepted:
            channel.buf += data[:accepted]
            channel.peak = max(channel.peak, len(channel.buf))
            self._wake_peer_reader()
        if accepted < len(data):
            channel.writer_waiting = True
        return accepted

    def shutdown_write(self) -> None:
        self._check()
        if not self.shut:
            self.shut = True
            self.outbound.eof = True
            self._wake_peer_reader()

    def close(self) -> None:
        self._on_reactor_thread()
        if self.closed:
            return
        clean = self.shut and self.saw_eof and self.failure is None
        self.closed = True
        self.listener = None
        self.inbound.buf.clear()
        if not clean and self.peer is not None:
            self.peer._fail("peer closed")

    # --- for tests ------------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """The link is gone at this end (reset, session lost); reactor thread only."""
        self._on_reactor_thread()
        self._fail(reason)

    # --- inside ---------------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        if self.closed or self.failure is not None:
            return
        self.failure = reason
        self.inbound.buf.clear()
        self.outbound.buf.clear()
        self._post("stream_failed", reason)

    def _wake_peer_reader(self) -> None:
        peer = self.peer
        if self.outbound.reader_waiting and peer is not None and peer.listener is not None:
            self.outbound.reader_waiting = False
            peer._post("stream_readable")

    def _post(self, method: str, *args: Any) -> None:
        if self.listener is not None:
            self.reactor.call_soon(self._deliver, method, args)

    def _deliver(self, method: str, args: tuple[Any, ...]) -> None:
        listener = self.listener
        if listener is None or self.closed or self.told_failure:
            return
        if self.failure is not None:
            if method != "stream_failed":
                return
            self.told_failure = True
        getattr(listener, method)(*args)

    def _check(self) -> None:
        self._on_reactor_thread()
        if self.closed:
            raise OSError(errno.EBADF, f"{self.name} is closed")
        if self.failure is not None:
            raise ConnectionResetError(errno.ECONNRESET, self.failure)

    def _on_reactor_thread(self) -> None:
        thread = getattr(self.reactor, "_thread", None)
        if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
            raise AssertionError(f"{self.name} used off the reactor thread")


def memory_stream_pair(reactor: Reactor, capacity: int = 64 * 1024) -> tuple[MemoryStream, MemoryStream]:
    """Two connected ends; each direction buffers at most ``capacity`` bytes."""
    a_to_b, b_to_a = Channel(capacity), Channel(capacity)
    a = MemoryStream(reactor, inbound=b_to_a, outbound=a_to_b, name="A")
    b = MemoryStream(reactor, inbound=a_to_b, outbound=b_to_a, name="B")
    a.peer, b.peer = b, a
    return a, b
