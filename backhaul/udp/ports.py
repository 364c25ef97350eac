"""The server's public UDP ports: one flow per user address, within ``udp_max_flows``.

A flow starts with the first datagram from a new address and is handed to the server core like a
user connection. Flows are capped in all and per port; at a cap a flow of the port that holds the
most makes room: the oldest that has sent one datagram only, else the one idle longest. So a
flood of new source addresses costs other such one-datagram flows, never descriptors or memory
past the cap, and flows in use keep working.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from backhaul.config import PortMapping, ServerConfig
from backhaul.errors import TransportError
from backhaul.metrics import METRICS
from backhaul.reactor import Reactor
from backhaul.udp.sockets import FLOWS, WARN, AddressPeer, DatagramSocket, Peer, bind_udp, show

log = logging.getLogger("backhaul.udp.ports")

EVICTED = METRICS.counter("backhaul_udp_flows_evicted_total",
                          "UDP flows closed to make room for a new one, by the limit reached", ("limit",))


class Flow(AddressPeer):
    """One user address on a public UDP port."""

    __slots__ = ("port", "on_closed", "retired")

    def __init__(self, port: UdpPort, addr: tuple) -> None:
        super().__init__(port.socket, addr, f"user {show(addr)} on UDP port {port.mapping.listen_port}")
        self.port = port
        self.on_closed: Callable[[Flow], None] | None = None   # the core's, while the flow waits
        self.retired = False

    @property
    def mapping(self) -> PortMapping:
        return self.port.mapping

    def deliver(self, batch: list[bytes]) -> None:
        port = self.port
        if self in port.fresh:              # a second datagram: a flow in use, not a passing probe
            del port.fresh[self]
            port.flows[self] = None
        else:
            port.flows.move_to_end(self)    # most recently heard: the last to make room
        super().deliver(batch)

    def retire(self) -> None:
        """The user's next datagram starts a new flow; this one lives on until it is closed. The
        new one is a flow in use from its first datagram, not a passing one."""
        if not self.retired:
            self.retired = True
            self.forget()
            self.port.retired[self.addr] += 1

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.port.removed(self)
        if self.retired:
            self.port.retired[self.addr] -= 1
            if not self.port.retired[self.addr]:
                del self.port.retired[self.addr]
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed(self)


class UdpPort:
    """One public UDP port: its socket and its flows, those with one datagram so far (oldest
    first) apart from the others (the one heard from longest ago first)."""

    def __init__(self, owner: UdpPorts, mapping: PortMapping) -> None:
        self.owner = owner
        self.mapping = mapping
        host, port = mapping.listen_addr
        name = f"UDP port {host}:{port}"
        self.socket = DatagramSocket(owner.reactor, bind_udp(host, port), name, self._new)
        self.fresh: collections.OrderedDict[Flow, None] = collections.OrderedDict()
        self.flows: collections.OrderedDict[Flow, None] = collections.OrderedDict()
        self.retired: collections.Counter[tuple] = collections.Counter()   # retired flows that live on, by address

    def __len__(self) -> int:
        return len(self.fresh) + len(self.flows)

    def _new(self, addr: tuple, data: bytes) -> None:
        self.owner.make_room(self)
        flow = Flow(self, addr)
        (self.flows if addr in self.retired else self.fresh)[flow] = None
        self.owner.total += 1
        Peer.deliver(flow, [data])
        self.owner.on_flow(flow)

    def removed(self, flow: Flow) -> None:
        for table in (self.fresh, self.flows):
            if flow in table:
                del table[flow]
                self.owner.total -= 1
                return

    def evict(self, limit: str, why: str) -> None:
        fresh = bool(self.fresh)
        flow = next(iter(self.fresh or self.flows))
        EVICTED.inc(1, limit)
        WARN.warning(f"evict-{limit}", "closed the UDP flow of %s (%s) to make room: %s", show(flow.addr),
                     "the oldest with one datagram" if fresh else "idle longest", why)
        log.debug("closed the UDP flow of %s to make room", show(flow.addr))
        flow.lose(f"closed to make room ({why})")
        if not flow.closed:   # its relay keeps it no longer than this
            flow.close()


class UdpPorts:
    """Every public UDP port of the server, and the caps on their flows; reactor thread only."""

    def __init__(self, reactor: Reactor, config: ServerConfig, on_flow: Callable[[Flow], None]) -> None:
        self.reactor = reactor
        self.max_flows = config.udp_max_flows
        self.on_flow = on_flow
        self.ports: list[UdpPort] = []
        self.total = 0
        self.per_port = self.max_flows
        self._unwatch: Callable[[], None] | None = None

    def open(self, mappings: tuple[PortMapping, ...]) -> None:
        """Bind every port (TransportError names the first that fails; those bound stay for close)."""
        for mapping in mappings:
            self.ports.append(UdpPort(self, mapping))
        self._share()
        self._unwatch = FLOWS.watch(lambda: [(("server",), self.total)])

    def _share(self) -> None:
        # One port may hold every flow; with more, one port at most half, so a flood on one
        # port leaves room for the others.
        self.per_port = self.max_flows if len(self.ports) < 2 else max(1, self.max_flows // 2)

    def start(self) -> None:
        for port in self.ports:
            self._start(port)

    @staticmethod
    def _start(port: UdpPort) -> None:
        port.socket.start()
        log.info("forwarding UDP %s:%d -> client target %s", *port.mapping.listen_addr, port.mapping.target)

    def addresses(self) -> list[tuple[str, int]]:
        return [port.mapping.listen_addr for port in self.ports]

    def merge(self, config: ServerConfig, added: UdpPorts) -> None:
        """On reload, reactor thread: take over ``added``'s ports (bound already) and start them,
        close the ports ``config`` no longer has (their flows end with them: the user's address
        can be answered from that port only), and give the others their new mapping (the next
        flow uses it)."""
        wanted = {mapping.listen_addr: mapping for mapping in config.ports}
        for port in list(self.ports):
            mapping = wanted.get(port.mapping.listen_addr)
            if mapping is None:
                self.ports.remove(port)
                self._close_port(port, "its UDP port was removed from the config")
                log.info("stopped listening on UDP %s:%d", *port.mapping.listen_addr)
            else:
                port.mapping = mapping
        taken, added.ports = added.ports, []
        added.close()
        for port in taken:
            port.owner = self
            self.ports.append(port)
            self._start(port)
        self.max_flows = config.udp_max_flows
        self._share()

    @staticmethod
    def _close_port(port: UdpPort, why: str) -> None:
        port.socket.close()
        for flow in [*port.fresh, *port.flows]:   # retired ones too: they are no peers of the socket
            flow.lose(why)

    def make_room(self, port: UdpPort) -> None:
        if len(port) >= self.per_port:
            port.evict("port", f"UDP port {port.mapping.listen_port} holds {len(port)} flows, its share "
                       f"of udp_max_flows ({self.max_flows})")
        elif self.total >= self.max_flows:
            fullest = max(self.ports, key=len)
            fullest.evict("total", f"{self.total} flows open (udp_max_flows); the most are on UDP port "
                          f"{fullest.mapping.listen_port}")

    def close(self) -> None:
        for port in self.ports:
            self._close_port(port, "the server is closing")
        self.ports.clear()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None


def open_ports(reactor: Reactor, config: ServerConfig, on_flow: Callable[[Flow], None]) -> UdpPorts:
    """Bind the public UDP ports of ``config``; TransportError names the one that fails."""
    ports = UdpPorts(reactor, config, on_flow)
    try:
        ports.open(config.ports)
    except TransportError:
        ports.close()
        raise
    return ports
