"""Connections whose first words are being read (a token handshake, an HTTP upgrade head).

Capped in all and per source address, each with a deadline. When the cap is reached the oldest
silent connection makes room: a real client speaks at once, so a flood of silent connections
must not keep it out. The addresses of the tunnel's own clients have a cap of their own: the
server asks for their links by the hundred under load (each pending for a round trip or two on a
long path, a TLS handshake on wss), and neither those links nor a stranger's flood may push the
other out.
"""

from __future__ import annotations

import collections
import socket
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from backhaul.reactor import Reactor, Timer

MAX_PENDING = 256        # connections being read at once
PENDING_PER_SOURCE = 64  # of which one address may hold this many
MAX_PENDING_TRUSTED = 1024  # and beside them, the links of the tunnel's own clients: 200 users at
                            # once make a pool ask for ~500 (one each, ~1.5 each ahead)



class Gate(Protocol):
    """Where an eviction is accounted: the port's gate (tunnel/gate.py)."""

    def failed(self, ip: str, kind: str, fmt: str, *args: object) -> None: ...


class Pending:
    """One connection being read: who it is, whether it spoke, and its deadline."""

    __slots__ = ("sock", "peer", "ip", "timer", "heard", "state")

    def __init__(self, sock: socket.socket, peer: str, ip: str, state: object = None) -> None:
        self.sock = sock
        self.peer = peer
        self.ip = ip
        self.timer: Timer | None = None
        self.heard = False       # any byte arrived: not a silent connection
        self.state = state       # what the reader of this kind keeps (a frame reader, a TLS step...)

    def discard(self, reactor: Reactor) -> None:
        """Close what the entry holds (a subclass may hold more than its socket, a WebSocket)."""
        reactor.close_socket(self.sock)


P = TypeVar("P", bound=Pending)


class PendingSet(Generic[P]):
    """The pending connections of one port, in arrival order; reactor thread only."""

    def __init__(self, reactor: Reactor, what: str, timeout: float, on_expired: Callable[[P], None],
                 max_pending: int = MAX_PENDING, per_source: int = PENDING_PER_SOURCE, *, gate: Gate,
                 max_trusted: int = MAX_PENDING_TRUSTED) -> None:
        self.reactor = reactor
        self.what = what                  # "handshakes", "upgrade heads": for log lines
        self.timeout = timeout
        self.on_expired = on_expired      # called before the entry is ended and closed
        self.max_pending = max_pending
        self.per_source = per_source
        self.max_trusted = max_trusted
        self.trusted: frozenset[str] = frozenset()   # the control channels' addresses: a cap of their own
        self.entries: dict[socket.socket, P] = {}   # insertion order = age
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.evicted = 0                  # metric-ready count of connections that made room
        self.gate = gate                  # an eviction counts as a failed handshake of its address

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: P) -> None:
        """Track ``entry``, making room first; the deadline starts now."""
        self._make_room(entry.ip)
        entry.timer = self.reactor.call_later(self.timeout, self._expired, entry)
        self.entries[entry.sock] = entry
        self.per_ip[entry.ip] += 1

    def _make_room(self, ip: str) -> None:
        trusted = sum(self.per_ip[t] for t in self.trusted)
        if ip in self.trusted:
            if trusted >= self.max_trusted:
                victim = next(e for e in self.entries.values() if e.ip in self.trusted)
                self._evict(victim, f"{self.max_trusted} {self.what} from this tunnel's clients already pending")
        elif self.per_ip[ip] >= self.per_source:
            victim = next(e for e in self.entries.values() if e.ip == ip)
            self._evict(victim, f"{self.per_source} {self.what} from {ip} already pending")
        elif len(self.entries) - trusted >= self.max_pending:
            self._evict(self._oldest_stranger(), f"{self.max_pending} {self.what} already pending")

    def _oldest_stranger(self) -> P:
        """The oldest silent entry not from a client of the tunnel, else the oldest such entry
        (one pass: this runs on every arrival while a flood holds the cap)."""
        oldest = None
        for entry in self.entries.values():
            if entry.ip in self.trusted:
                continue
            if not entry.heard:
                return entry
            oldest = oldest or entry
        assert oldest is not None   # called only with max_pending strangers pending
        return oldest

    def _evict(self, entry: P, why: str) -> None:
        self.evicted += 1
        self.gate.failed(entry.ip, "evicted", "closed the oldest pending connection %s to make room: %s",
                         entry.peer, why)
        self.end(entry)

    def _expired(self, entry: P) -> None:
        if entry.sock in self.entries:
            self.on_expired(entry)
            self.end(entry)

    def end(self, entry: P, close: bool = True) -> bool:
        """Stop tracking ``entry``, closing its socket; False if it was not tracked. With
        ``close=False`` the caller takes the socket over still watched by the reactor: it must
        watch it with a callback of its own (no system call when the events stay), forget it
        or close it before the next event."""
        if self.entries.pop(entry.sock, None) is None:
            return False
        self.per_ip[entry.ip] -= 1
        if not self.per_ip[entry.ip]:
            del self.per_ip[entry.ip]
        if entry.timer is not None:
            entry.timer.cancel()
        if close:
            entry.discard(self.reactor)
        return True

    def close(self) -> None:
        for entry in list(self.entries.values()):
            self.end(entry)
