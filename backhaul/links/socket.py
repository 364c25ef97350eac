"""The spliced socket link kind (tcp, PROTOCOL.md 1): a link that is a plain TCP socket, on
either side, carrying one user connection after an LTV target header (type 0x04) relayed fd to
fd with splice, or one UDP flow of accept_udp as frames (type 0x05, PROTOCOL.md 4.1).
"""

from __future__ import annotations

import functools
import socket
from typing import TYPE_CHECKING

from backhaul.protocol.framing import SG_TCP, SG_UDP, encode_ltv
from backhaul.reactor import Reactor
from backhaul.relay.splice import Relay
from backhaul.tunnel.core import OnRelayClosed
from backhaul.udp.relay import FramedRelay

if TYPE_CHECKING:
    from backhaul.udp.ports import Flow
    from backhaul.udp.sockets import Peer


@functools.lru_cache(maxsize=1024)
def target_header(target: str, kind: int = SG_TCP) -> bytes:
    return encode_ltv(kind, target.encode())


class SocketLink:
    """A link that is a plain TCP socket, on either side: relayed fd to fd with splice.

    ``link_first``: the link's bytes come first (the client side, where the user's request
    follows the header); on the server the user's do. Those are moved as soon as the relay starts.
    """

    __slots__ = ("reactor", "sock", "link_first", "early")

    def __init__(self, reactor: Reactor, sock: socket.socket, link_first: bool = False, early: bytes = b"") -> None:
        self.reactor = reactor
        self.sock = sock
        self.link_first = link_first
        self.early = early   # bytes read from the link behind its header, for the other side

    def peer(self) -> tuple[str, int]:
        return self.sock.getpeername()[:2]

    def send_header(self, target: str, proxy: bytes) -> bool:
        header = target_header(target) + proxy
        try:
            return self.sock.send(header) == len(header)
        except OSError:
            return False  # a stale link: its client end is gone

    def attach(self, other: socket.socket, on_close: OnRelayClosed) -> Relay:
        relay = Relay(self.reactor, other, self.sock, on_close=on_close)
        relay.start(first=self.sock if self.link_first else other, early=self.early)
        return relay

    def attach_flow(self, flow: Flow, on_close: OnRelayClosed, rtt_ms: int) -> FramedRelay | None:
        """Server side: announce the UDP flow (SG_UDP header, never a PROXY header) and relay it."""
        header = target_header(flow.mapping.target, SG_UDP)
        try:
            if self.sock.send(header) != len(header):
                return None
        except OSError:
            return None  # a stale link: its client end is gone
        relay = FramedRelay(self.reactor, flow, self.sock, server=True, on_close=on_close, rtt_ms=rtt_ms,
                            on_congested=flow.retire)
        relay.start()
        return relay

    def close(self) -> None:
        self.reactor.close_socket(self.sock)


class FlowSocketLink:
    """The client's end of a tcp link that carries a UDP flow (accept_udp); ``early``: frames
    read together with the header."""

    __slots__ = ("reactor", "sock", "early")

    def __init__(self, reactor: Reactor, sock: socket.socket, early: bytes) -> None:
        self.reactor = reactor
        self.sock = sock
        self.early = early

    def attach_flow(self, target: Peer, on_close: OnRelayClosed) -> FramedRelay:
        relay = FramedRelay(self.reactor, target, self.sock, server=False, on_close=on_close)
        relay.start(self.early)
        return relay

    def close(self) -> None:
        self.reactor.close_socket(self.sock)
