"""Per-port usage of one side: connections open and made, bytes each way, the current rate.

The relays count their own bytes (one addition per read, no lock); this module reads them only
when someone looks (a scrape, the status page, the sniffer file, the rate sampler) and adds a
relay's last numbers to its port's totals when it closes. So the bulk path pays nothing for it.
Reactor thread for every change; reads from other threads see a consistent-enough snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from backhaul.metrics import METRICS
from backhaul.tunnel.core import Relaying

ACTIVE = METRICS.gauge("backhaul_connections_active", "User connections being relayed now.", ("side", "port"))
TOTAL = METRICS.sourced_counter("backhaul_connections_total", "User connections relayed since start.",
                                ("side", "port"))
BYTES = METRICS.sourced_counter("backhaul_bytes_total", "Bytes relayed, by port and direction (to_target: "
                                "from the user towards the service; to_user: back).", ("side", "port", "direction"))
REFUSED = METRICS.counter("backhaul_connections_refused_total", "User connections closed without being relayed, "
                          "by reason.", ("side", "reason"))

RATE_WINDOW = 1.0   # seconds between samples of the rate


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


class Usage:
    """The usage of one side. ``user_side``: the relays' socket is the user's (server), so the
    bytes read from it go to the target; on the client it is the target's socket."""

    def __init__(self, side: str, *, user_side: bool) -> None:
        self.side = side
        self.user_side = user_side
        self.ports: dict[str, PortUsage] = {}
        self.live: dict[Relaying, PortUsage] = {}
        self.started = time.monotonic()
        self._unwatch: list[Callable[[], None]] = [
            ACTIVE.watch(lambda: [((self.side, u.port), u.active) for u in list(self.ports.values())]),
            TOTAL.watch(lambda: [((self.side, u.port), u.total) for u in list(self.ports.values())]),
            BYTES.watch(self._byte_samples),
        ]

    def port(self, name: str) -> PortUsage:
        usage = self.ports.get(name)
        if usage is None:
            usage = self.ports[name] = PortUsage(name)
        return usage

    def opened(self, name: str, relay: Relaying) -> None:
        """A relay started for ``name``; it may have ended already (then it only counts)."""
        usage = self.port(name)
        usage.total += 1
        if relay.closed:
            self._add_closed(usage, relay)
        else:
            self.live[relay] = usage
            usage.active += 1

    def closed(self, relay: Relaying) -> None:
        """A relay ended; a relay never ``opened`` (it ended inside its own start) is ignored."""
        usage = self.live.pop(relay, None)
        if usage is not None:
            usage.active -= 1
            self._add_closed(usage, relay)

    def refused(self, reason: str) -> None:
        REFUSED.inc(1, self.side, reason)

    def _add_closed(self, usage: PortUsage, relay: Relaying) -> None:
        to_target, to_user = self._split(relay)
        usage.closed_to_target += to_target
        usage.closed_to_user += to_user

    def _split(self, relay: Relaying) -> tuple[int, int]:
        from_socket, to_socket = relay.counts()
        return (from_socket, to_socket) if self.user_side else (to_socket, from_socket)

    def bytes(self) -> dict[str, tuple[int, int]]:
        """Port -> (bytes to the target, bytes to the user), closed and running relays together."""
        totals = {name: [u.closed_to_target, u.closed_to_user] for name, u in list(self.ports.items())}
        for relay, usage in list(self.live.items()):
            to_target, to_user = self._split(relay)
            pair = totals.setdefault(usage.port, [0, 0])
            pair[0] += to_target
            pair[1] += to_user
        return {name: (pair[0], pair[1]) for name, pair in totals.items()}

    def _byte_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for name, (to_target, to_user) in self.bytes().items():
            yield (self.side, name, "to_target"), to_target
            yield (self.side, name, "to_user"), to_user

    def sample(self) -> None:
        """Update every port's rate from the bytes moved since the last sample."""
        now = time.monotonic()
        for name, (to_target, to_user) in self.bytes().items():
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
                         "rate_to_user": round(usage.rate_to_user, 1)})
        return rows

    def close(self) -> None:
        """Stop feeding the process's metrics (the side is gone)."""
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch.clear()


def _port_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 17, name)
