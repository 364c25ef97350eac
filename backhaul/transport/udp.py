"""The ``udp`` transport (PROTOCOL.md 4.2): the token-datagram handshake (tunnel/token_datagram.py:
the tcp family's control channel, and links that are UDP 5-tuples to the same port number over
UDP, each announced by one datagram) with the UDP flow link kind (backhaul/links/udp_flow.py).

While pooled the server pings a link (a 1-byte 0x02 datagram every heartbeat); a flow is given to
it as one datagram holding the target string, then datagrams are relayed one for one. The public
ports are UDP only.
"""

from __future__ import annotations

import heapq
import logging
import socket
import time
from collections.abc import Callable

from backhaul.links.udp_flow import UdpClientLink, UdpLink
from backhaul.net import reason
from backhaul.protocol.auth import LinkSigner
from backhaul.protocol.framing import SG_PING
from backhaul.reactor import READ, Timer
from backhaul.tunnel.carrier import SocketCarrier
from backhaul.tunnel.core import Arrival, ClientCore, ServerCore, ServerRow
from backhaul.tunnel.dialer import handshake
from backhaul.tunnel.links import IdleLinks
from backhaul.tunnel.session import TunnelSession
from backhaul.tunnel.token_datagram import UdpTunnelPort, open_link
from backhaul.udp.ports import EVICTED
from backhaul.udp.relay import PairRelay
from backhaul.udp.sockets import WARN, AddressPeer, drop, show

log = logging.getLogger("backhaul.transport.udp")

MAX_CLIENT_LINKS = 4096       # links on the client, idle or carrying a flow (two sockets each then)
EVICT_SHARE = 8               # at that cap, an eighth of the flows makes room at once
REAP_EVERY = 10.0             # seconds between looks for idle links the server no longer pings, or
#                               half its silence limit when that is shorter (a fast heartbeat)
LEARN_EVERY = 1.0             # ...and until its heartbeat's cadence is known (no link is judged then)
MAX_TARGET = 1024             # a datagram longer than this is no target string
PING = bytes((SG_PING,))


# ------------------------------------------------------------------------------------------------
# server side

class UdpLinks(IdleLinks[UdpLink]):
    """udp's links from one client: its addresses that sent the token (or a link proof) to the UDP
    tunnel port, pooled and pinged every heartbeat until a flow takes them. A TCP connection on
    this transport is only ever a handshake. Nothing closes a client's UDP link but the client, so
    the pool keeps ``connection_pool`` instead of following the users."""

    def __init__(self, core: ServerCore, ask: Callable[[int], None], talking: Callable[[socket.socket], None]) -> None:
        super().__init__(core, ask, log, "UDP link", close=UdpLink.close, watch=self._watch,
                         peer=lambda link: show(link.tunnel.addr), follow_demand=False,
                         ping=lambda link: link.tunnel.send(PING))
        self.talking = talking
        # The flows on this client's links. Nothing tells the server that a client's UDP
        # sockets are gone (a restarted client has new ones; a user who keeps sending would keep
        # a flow to the old ones alive for good), so they end with its last control channel, as
        # the client ends its own: the users' next datagrams open flows on a client that is there.
        self.carrying: set[PairRelay] = set()

    def stop(self) -> None:
        super().stop()
        if self.carrying:
            flows = list(self.carrying)
            log.info("ended %d UDP flows carried by the client that left", len(flows))
            for relay in flows:
                relay.close()

    def add(self, arrival: Arrival) -> None:
        self.talking(arrival.sock)   # a TCP connection here is a handshake (a client that restarted)

    def add_datagrams(self, peer: AddressPeer) -> None:
        """``peer``, an address on the UDP tunnel port, sent the token or a link proof: a new link."""
        self.keep(UdpLink(self.reactor, peer, self.carrying))

    def _watch(self, link: UdpLink) -> None:
        link.tunnel.listen(lambda batch: self._spoke(link, batch), lambda _why: self._gone(link))

    def _spoke(self, link: UdpLink, batch: list[bytes]) -> None:
        for _ in batch:
            drop("idle_link", "dropped a datagram from idle %s: nothing is sent on a link before its target",
                 link.tunnel.name)

    def _gone(self, link: UdpLink) -> None:
        if self.pool.remove(link):
            link.close()


def server(core: ServerCore) -> ServerRow:
    """The public ports are UDP only: the links carry flows, never a TCP user."""
    port: UdpTunnelPort[UdpLink, UdpLinks] = UdpTunnelPort(core, UdpLinks)
    return ServerRow(port, users=None, flows=port)


# ------------------------------------------------------------------------------------------------
# client side

def connect(core: ClientCore) -> UdpSession:
    """Dial the control channel and do the handshake; blocking, the client's own thread."""
    sock, addr, signer = handshake(core)
    return UdpSession(core, sock, addr, signer)


class UdpSession(TunnelSession):
    """The client's end of one control channel and the UDP links it opened. With ``signer``
    (auth = "challenge") each link opens with its LINK frame, never the token."""

    def __init__(self, core: ClientCore, sock: socket.socket, server_addr: tuple[str, int],
                 signer: LinkSigner | None = None) -> None:
        super().__init__(core, SocketCarrier(core.reactor, sock, "the server"), what="UDP link",
                         most=MAX_CLIENT_LINKS, rtt_echo=True)
        self.server_addr = server_addr
        self.signer = signer
        self.family = sock.family
        self.links: dict[socket.socket, float] = {}    # idle links: when the server was last heard on each
        # Flows carried on this session's links. The server never says that it dropped one (it
        # may have, to make room), so they end when idle (a cap keeps them bounded) or with the
        # control channel, which ends them on the server too (and in the Go client).
        self.flows: set[PairRelay] = set()
        self._timer: Timer | None = None

    def start(self) -> None:
        super().start()
        if not self.closed:
            self._timer = self.reactor.call_later(LEARN_EVERY, self._reap)

    def idle_links(self) -> int:
        return len(self.links)

    def open_links(self) -> int:
        return len(self.links)

    def dial_link(self) -> None:
        """A new UDP socket to the server's port, announced by the token or the LINK frame (no
        answer comes). Out of descriptors, flows that carried one datagram make room as at the
        cap: a flood of new sources must not keep the links out until its flows idle out."""
        if (len(self.links) + len(self.flows) >= MAX_CLIENT_LINKS
                and not self._make_room(f"{MAX_CLIENT_LINKS} links open, the most a client keeps")):
            self.pool.opened(f"{MAX_CLIENT_LINKS} UDP links open (idle or carrying a flow), the most a client keeps")
            return
        try:
            sock = open_link(self.config, self.family, self.server_addr, self.signer, self._make_room)
        except OSError as exc:
            self.pool.opened(f"cannot open a UDP link to {show(self.server_addr)}: {reason(exc)}")
            return
        self.pool.opened()
        self.links[sock] = time.monotonic()
        self.reactor.watch(sock, READ, lambda _m: self._link_event(sock))

    def _link_event(self, sock: socket.socket) -> None:
        if sock not in self.links:
            return
        while True:
            try:
                data = sock.recv(MAX_TARGET + 1)
            except BlockingIOError:
                return
            except OSError as exc:  # refused: the server's UDP port is gone
                log.debug("UDP link dropped: %s", reason(exc))
                self._drop(sock)
                return
            if data != PING:
                break
            self.links[sock] = time.monotonic()
        del self.links[sock]
        self.reactor.watch(sock, 0)
        target = data.decode("utf-8", "replace")
        if len(data) > MAX_TARGET:
            log.warning("dropped a UDP link: the server sent a datagram of %d bytes where a target belongs",
                        len(data))
            sock.close()
            return
        self.core.carry_flow(UdpClientLink(self.reactor, sock, self.flows), target)

    def _make_room(self, why: str) -> bool:
        """Close a share of the flows that carried one datagram from the server only, the oldest
        first (a flood of new sources asks again and again); False when there is none such. A
        flow in use is never closed to make room: it ends when idle."""
        passing = [relay for relay in self.flows if relay.down <= 1]   # far (the server) -> near (the target)
        victims = heapq.nsmallest(max(1, len(self.flows) // EVICT_SHARE), passing, key=lambda r: r.idle.last)
        if not victims:
            return False
        EVICTED.inc(len(victims), "client")
        WARN.warning("evict-client", "closed %d UDP flows that carried one datagram to make room: %s",
                     len(victims), why)
        for relay in victims:
            relay.close()
        return True

    def _reap(self) -> None:
        """Close idle links the server stopped pinging: it forgets a link it has no room for, and
        says nothing. Their silence is judged by the server's heartbeat, learnt on the control
        channel (pings come as often); before it is known, no link is judged."""
        limit = self.channel.machine.silence_limit
        if limit is not None:
            now = time.monotonic()
            silent = [sock for sock, heard in self.links.items() if now - heard > limit]
            if silent:
                log.info("closed %d idle UDP links the server no longer pings (silent for %.0f s)", len(silent),
                         limit)
            for sock in silent:
                self._drop(sock)
        self._timer = self.reactor.call_later(LEARN_EVERY if limit is None else min(REAP_EVERY, limit / 2), self._reap)

    def _drop(self, sock: socket.socket) -> None:
        del self.links[sock]
        self.reactor.close_socket(sock)

    def close_links(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sock in self.links:
            self.reactor.close_socket(sock)
        self.links.clear()
        if self.flows:
            log.info("ended %d UDP flows with the control channel", len(self.flows))
            for relay in list(self.flows):
                relay.close()


SERVER = server
CONNECT = connect
