"""What a control channel's bytes travel on: raw TCP now, one-byte WebSocket messages later.

A carrier hands up what it reads and buffers what it cannot write yet, up to a bound: a peer that
stops reading its control channel is dropped instead of growing our memory byte by byte.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol

from backhaul.net import reason
from backhaul.reactor import READ, WRITE, Reactor

CONTROL_BACKLOG = 64 * 1024   # bytes we keep for a control channel whose peer does not read
READ_SIZE = 4096

OnData = Callable[[bytes], None]
OnLost = Callable[[str], None]


class Carrier(Protocol):
    """The transport under a control channel; reactor thread only."""

    peer: str

    def start(self, on_data: OnData, on_lost: OnLost) -> None:
        """Begin reading: ``on_data`` per chunk or message, ``on_lost(reason)`` once at the end."""

    def send(self, data: bytes) -> None:
        """Queue ``data``; a backlog past the bound loses the carrier."""

    def close(self) -> None:
        """Close without another callback."""


class SocketCarrier:
    """A control channel on a plain non-blocking TCP socket (tcp, tcpmux and udp transports)."""

    __slots__ = ("reactor", "sock", "peer", "backlog", "_out", "_on_data", "_on_lost", "_closed", "_mask")

    def __init__(self, reactor: Reactor, sock: socket.socket, peer: str, backlog: int = CONTROL_BACKLOG) -> None:
        self.reactor = reactor
        self.sock = sock
        self.peer = peer
        self.backlog = backlog
        self._out = bytearray()
        self._on_data: OnData | None = None
        self._on_lost: OnLost | None = None
        self._closed = False
        self._mask = 0

    def start(self, on_data: OnData, on_lost: OnLost) -> None:
        self._on_data = on_data
        self._on_lost = on_lost
        self._watch()

    def send(self, data: bytes) -> None:
        if self._closed or not data:
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        try:
            while self._out:
                sent = self.sock.send(self._out)
                del self._out[:sent]
        except BlockingIOError:
            if len(self._out) > self.backlog:
                self._lose(f"{self.peer} does not read its control channel ({len(self._out)} bytes waiting)")
                return
        except OSError as exc:
            self._lose(f"control channel to {self.peer} failed: {reason(exc)}")
            return
        self._watch()

    def _event(self, mask: int) -> None:
        if mask & WRITE:
            self._flush()
        if self._closed or not mask & READ:
            return
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(f"control channel from {self.peer} failed: {reason(exc)}")
            return
        if not data:
            self._lose(f"{self.peer} closed the control channel")
            return
        assert self._on_data is not None
        self._on_data(data)

    def _watch(self) -> None:
        if self._closed or self._on_data is None:
            return
        mask = READ | (WRITE if self._out else 0)
        if mask != self._mask:
            self.reactor.watch(self.sock, mask, self._event)
            self._mask = mask

    def _lose(self, reason: str) -> None:
        on_lost = self._on_lost
        self.close()
        if on_lost is not None:
            on_lost(reason)

    def close(self) -> None:
        """Send what is queued if the socket takes it at once, then close."""
        if self._closed:
            return
        self._closed = True
        if self._out:
            try:
                self.sock.send(self._out)
            except OSError:
                pass
            self._out = bytearray()
        self.reactor.close_socket(self.sock)
        self._on_data = self._on_lost = None
