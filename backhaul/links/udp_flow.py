"""The UDP flow link kind (udp, PROTOCOL.md 4.2): a link that is a UDP 5-tuple between the
client and the server's UDP tunnel port. A flow is given to it as one datagram holding the
target string, then its datagrams are relayed one for one (udp/relay.py ``PairRelay``).

Each side keeps the set of flows its links carry (``carrying``), so that they can all be ended
with the client's session: nothing on the wire says that a UDP link is gone.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from backhaul.reactor import Reactor
from backhaul.tunnel.core import OnRelayClosed
from backhaul.udp.relay import PairRelay
from backhaul.udp.sockets import AddressPeer, ConnectedPeer, Peer

if TYPE_CHECKING:
    from backhaul.udp.ports import Flow


class UdpLink:
    """The server's end of one link: the client's address on the UDP tunnel port. It carries
    UDP flows only (the public ports of this transport are UDP); ``carrying`` is the set of
    flows on the links of its client."""

    __slots__ = ("reactor", "tunnel", "carrying")

    def __init__(self, reactor: Reactor, tunnel: AddressPeer, carrying: set[PairRelay]) -> None:
        self.reactor = reactor
        self.tunnel = tunnel
        self.carrying = carrying

    def attach_flow(self, flow: Flow, on_close: OnRelayClosed, _rtt_ms: int) -> PairRelay | None:
        if self.tunnel.closed:
            return None
        self.tunnel.send(flow.mapping.target.encode())
        return _relay(self.reactor, flow, self.tunnel, self.carrying, on_close)

    def close(self) -> None:
        self.tunnel.close()


class UdpClientLink:
    """The client's end of a link whose target arrived: its connected UDP socket to the server;
    ``carrying`` is the set of flows on the links of its session."""

    __slots__ = ("reactor", "sock", "carrying")

    def __init__(self, reactor: Reactor, sock: socket.socket, carrying: set[PairRelay]) -> None:
        self.reactor = reactor
        self.sock = sock
        self.carrying = carrying

    def attach_flow(self, target: Peer, on_close: OnRelayClosed) -> PairRelay:
        tunnel = ConnectedPeer(self.reactor, self.sock, "the server's UDP tunnel port")
        return _relay(self.reactor, target, tunnel, self.carrying, on_close)

    def close(self) -> None:
        self.reactor.close_socket(self.sock)


def _relay(reactor: Reactor, near: Peer, tunnel: Peer, carrying: set[PairRelay], on_close: OnRelayClosed) -> PairRelay:
    """Relay ``near`` (the user's flow, or the target) through ``tunnel``, counted in ``carrying``
    while it runs."""

    def closed(relay: PairRelay) -> None:
        carrying.discard(relay)
        on_close(relay)

    relay = PairRelay(reactor, near, tunnel, closed)
    carrying.add(relay)
    relay.start()
    return relay
