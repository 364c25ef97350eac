"""Per-port usage of one side: connections open and made, bytes each way, the current rate, the
last hour (backhaul/history.py) and how the port's target fares; also per peer (on the server
the client address whose link carried each connection, on the client the server's).

The relays count their own bytes (one addition per read, no lock); this module reads them only
when someone looks (a scrape, the status page, the sniffer file, the rate sampler) and adds a
relay's last numbers to its port's totals when it closes. So the bulk path pays nothing for it.
Reactor thread for every change; reads from other threads see a consistent-enough snapshot.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from backhaul.history import History
from backhaul.metrics import METRICS
from backhaul.tunnel.core import Relaying
from backhaul.tunnel.port import RECONNECTS
from backhaul.udp.relay import FramedRelay, PairRelay

ACTIVE = METRICS.gauge("backhaul_connections_active", "User connections being relayed now.", ("side", "port"))
TOTAL = METRICS.sourced_counter("backhaul_connections_total", "User connections relayed since start.",
                                ("side", "port"))
BYTES = METRICS.sourced_counter("backhaul_bytes_total", "Bytes relayed, by port and direction (to_target: "
                                "from the user towards the service; to_user: back).", ("side", "port", "direction"))
CLIENT_ACTIVE = METRICS.gauge("backhaul_client_connections_active", "User connections being relayed now, by the "
                              "address of the client carrying them (server).", ("client",))
CLIENT_TOTAL = METRICS.sourced_counter("backhaul_client_connections_total", "User connections relayed since start, "
                                       "by client address (server).", ("client",))
CLIENT_BYTES = METRICS.sourced_counter("backhaul_client_bytes_total", "Bytes relayed, by client address and "
                                       "direction (server).", ("client", "direction"))
REFUSED = METRICS.counter("backhaul_connections_refused_total", "User connections closed without being relayed, "
                          "by reason.", ("side", "reason"))

TARGET_FAILURES = METRICS.sourced_counter("backhaul_target_dial_failures_total", "Targets the client could not "
                                          "reach for a user, by port and reason (refused, unreachable).",
                                          ("side", "port", "reason"))
# Reasons each side counts in REFUSED, shown as 0 from the start so that rate() sees the first one.
REFUSAL_REASONS = {"server": ("channel_size", "no_tunnel", "gone", "stopping"),
                   "client": ("bad_target", "target_unreachable", "stopping")}
REFUSED_TEXT = os.strerror(errno.ECONNREFUSED).lower()   # as backhaul.net words a refused dial

RATE_WINDOW = 1.0   # seconds between samples of the rate
MAX_CLIENTS = 256   # client addresses counted; past it the oldest with nothing open is forgotten


@dataclass
class PortUsage:
    """One port's numbers (``port``: the listen port on the server, the target's on the client)."""

    port: str
    active: int = 0
    total: int = 0
    closed_to_target: int = 0     # bytes of relays that ended
    closed_to_user: int = 0
    rate_to_target: float = 0.0   # bytes per second over the last sample
    rate_to_user: float = 0.0
    _sampled: tuple[float, int, int] = (0.0, 0, 0)
    # the target's health. Client: its dials (a refused or unreachable one, with the error and the
    # time; the last one that connected). Server: it cannot see the dials, only that a connection
    # ended without one byte from the target, as every one does while the client's dial fails.
    refused: int = 0
    unreachable: int = 0
    last_error: str = ""
    failed_at: float = 0.0        # wall-clock seconds; 0: never
    connected_at: float = 0.0
    no_reply: int = 0             # stream connections in a row that ended with nothing back
    replied_at: float = 0.0       # the last that got something back ended then


class Usage:
    """The usage of one side. ``user_side``: the relays' socket is the user's (server), so the
    bytes read from it go to the target; on the client it is the target's socket."""

    def __init__(self, side: str, *, user_side: bool) -> None:
        self.side = side
        self.user_side = user_side
        self.ports: dict[str, PortUsage] = {}
        self.live: dict[Relaying, PortUsage] = {}
        self.clients: dict[str, PortUsage] = {}        # by client address (``port`` holds it)
        self.live_clients: dict[Relaying, PortUsage] = {}
        self.started = time.monotonic()
        self.history = History()           # per port
        self.peer_history = History()      # per peer (``clients``)
        self.total_history = History()     # the side, all ports together
        for reason in REFUSAL_REASONS[side]:
            REFUSED.inc(0, side, reason)
        RECONNECTS.inc(0, side)
        self._unwatch: list[Callable[[], None]] = [
            ACTIVE.watch(lambda: [((self.side, u.port), u.active) for u in list(self.ports.values())]),
            TOTAL.watch(lambda: [((self.side, u.port), u.total) for u in list(self.ports.values())]),
            BYTES.watch(self._byte_samples),
            TARGET_FAILURES.watch(self._failure_samples),
        ]
        if user_side:   # the metrics by client address are the server's; the client's peers are shown only
            self._unwatch += [
                CLIENT_ACTIVE.watch(lambda: [((u.port,), u.active) for u in list(self.clients.values())]),
                CLIENT_TOTAL.watch(lambda: [((u.port,), u.total) for u in list(self.clients.values())]),
                CLIENT_BYTES.watch(self._client_byte_samples),
            ]

    def port(self, name: str) -> PortUsage:
        usage = self.ports.get(name)
        if usage is None:
            usage = self.ports[name] = PortUsage(name)
        return usage

    def client(self, address: str) -> PortUsage:
        usage = self.clients.get(address)
        if usage is None:
            if len(self.clients) >= MAX_CLIENTS:
                idle = next((u for u in self.clients.values() if not u.active), None)
                if idle is not None:
                    del self.clients[idle.port]
            usage = self.clients[address] = PortUsage(address)
        return usage

    def opened(self, name: str, relay: Relaying, client: str = "") -> None:
        """A relay started for ``name`` (carried by the link of ``client``, an address: the
        client's on the server, the server's on the client); it may have ended already (then it
        only counts). On the client it follows a dial of the target that connected."""
        usage = self.port(name)
        if not self.user_side:
            usage.connected_at = time.time()
        self._open(usage, self.live, relay)
        if client:
            self._open(self.client(client), self.live_clients, relay)

    def _open(self, usage: PortUsage, live: dict[Relaying, PortUsage], relay: Relaying) -> None:
        usage.total += 1
        if relay.closed:
            self._add_closed(usage, relay)
        else:
            live[relay] = usage
            usage.active += 1

    def closed(self, relay: Relaying) -> None:
        """A relay ended; a relay never ``opened`` (it ended inside its own start) is ignored."""
        for live in (self.live, self.live_clients):
            usage = live.pop(relay, None)
            if usage is not None:
                usage.active -= 1
                self._add_closed(usage, relay)

    def refused(self, reason: str) -> None:
        REFUSED.inc(1, self.side, reason)

    def target_failed(self, name: str, error: str) -> None:
        """The client's dial of the target of port ``name`` failed with ``error`` (a line of
        backhaul.net's: a refusal, else it counts as unreachable: timeout, no route, no name)."""
        usage = self.port(name)
        if REFUSED_TEXT in error:
            usage.refused += 1
        else:
            usage.unreachable += 1
        usage.last_error = error
        usage.failed_at = time.time()

    def _add_closed(self, usage: PortUsage, relay: Relaying) -> None:
        to_target, to_user = self._split(relay)
        usage.closed_to_target += to_target
        usage.closed_to_user += to_user
        if isinstance(relay, FramedRelay | PairRelay):
            return   # a UDP target may rightly never answer
        if to_user:
            usage.no_reply = 0
            usage.replied_at = time.time()
        else:
            usage.no_reply += 1

    def _split(self, relay: Relaying) -> tuple[int, int]:
        from_socket, to_socket = relay.counts()
        return (from_socket, to_socket) if self.user_side else (to_socket, from_socket)

    def bytes(self) -> dict[str, tuple[int, int]]:
        """Port -> (bytes to the target, bytes to the user), closed and running relays together."""
        return self._bytes(self.ports, self.live)

    def client_bytes(self) -> dict[str, tuple[int, int]]:
        """Client address -> (bytes to the target, bytes to the user), as ``bytes``."""
        return self._bytes(self.clients, self.live_clients)

    def _bytes(self, groups: dict[str, PortUsage], live: dict[Relaying, PortUsage]) -> dict[str, tuple[int, int]]:
        totals = {name: [u.closed_to_target, u.closed_to_user] for name, u in list(groups.items())}
        for relay, usage in list(live.items()):
            to_target, to_user = self._split(relay)
            pair = totals.setdefault(usage.port, [0, 0])
            pair[0] += to_target
            pair[1] += to_user
        return {name: (pair[0], pair[1]) for name, pair in totals.items()}

    def _byte_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for name, (to_target, to_user) in self.bytes().items():
            yield (self.side, name, "to_target"), to_target
            yield (self.side, name, "to_user"), to_user

    def _failure_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for usage in list(self.ports.values()):
            if usage.refused or usage.unreachable:
                yield (self.side, usage.port, "refused"), usage.refused
                yield (self.side, usage.port, "unreachable"), usage.unreachable

    def _client_byte_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for name, (to_target, to_user) in self.client_bytes().items():
            yield (name, "to_target"), to_target
            yield (name, "to_user"), to_user

    def sample(self) -> None:
        """Update every port's rate from the bytes moved since the last sample, and the last
        hour of every port, every peer and the side."""
        now = time.monotonic()
        moved = self.bytes()
        self.history.update(now, moved)
        self.peer_history.update(now, self.client_bytes())
        self.total_history.update(now, {"": _sum(moved)})
        for name, (to_target, to_user) in moved.items():
            usage = self.port(name)
            then, before_target, before_user = usage._sampled
            if then:
                elapsed = max(now - then, 1e-3)
                usage.rate_to_target = (to_target - before_target) / elapsed
                usage.rate_to_user = (to_user - before_user) / elapsed
            usage._sampled = (now, to_target, to_user)

    def snapshot(self) -> list[dict[str, object]]:
        """Every port's numbers, sorted by port, for the page and the sniffer file."""
        moved = self.bytes()
        rows = []
        for name in sorted(self.ports, key=_port_order):
            usage = self.ports[name]
            to_target, to_user = moved.get(name, (0, 0))
            rows.append({"port": name, "active": usage.active, "total": usage.total,
                         "bytes_to_target": to_target, "bytes_to_user": to_user,
                         "rate_to_target": round(usage.rate_to_target, 1),
                         "rate_to_user": round(usage.rate_to_user, 1),
                         "target": self._target(usage)})
        return rows

    def _target(self, usage: PortUsage) -> dict[str, object]:
        """How the port's target fares, as this side can tell (see PortUsage)."""
        if not self.user_side:
            return {"refused": usage.refused, "unreachable": usage.unreachable, "last_error": usage.last_error,
                    "failed_at": usage.failed_at, "connected_at": usage.connected_at}
        return {"no_reply": usage.no_reply, "replied_at": usage.replied_at}

    def graphs(self) -> dict[str, object]:
        """The last hour of the side, of each port and of each peer, as ``History.rates`` gives
        them (seconds ago, bytes/s each way), and the seconds their graphs span (the side's
        history: less than an hour in the process's first hour); a name with no graph is left out."""
        now = time.monotonic()
        moved, by_peer = self.bytes(), self.client_bytes()
        ports = {name: self.history.rates(name, now, moved) for name in moved}
        peers = {name: self.peer_history.rates(name, now, by_peer) for name in by_peer}
        return {"span": self.total_history.span(now), "side": self.total_history.rates("", now, {"": _sum(moved)}),
                "ports": {name: points for name, points in ports.items() if points is not None},
                "peers": {name: points for name, points in peers.items() if points is not None}}

    def client_snapshot(self) -> dict[str, dict[str, int]]:
        """Peer address (the client's on the server, the server's on the client) -> its
        connections open and made and its bytes each way."""
        moved = self.client_bytes()
        return {name: {"active": usage.active, "total": usage.total, "bytes_to_target": moved.get(name, (0, 0))[0],
                       "bytes_to_user": moved.get(name, (0, 0))[1]} for name, usage in list(self.clients.items())}

    def close(self) -> None:
        """Stop feeding the process's metrics (the side is gone)."""
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch.clear()


def _sum(totals: dict[str, tuple[int, int]]) -> tuple[int, int]:
    return sum(pair[0] for pair in totals.values()), sum(pair[1] for pair in totals.values())


def _port_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 17, name)
