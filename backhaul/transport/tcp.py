"""The ``tcp`` transport (PROTOCOL.md 1): a control channel plus a pool of plain TCP links, each
carrying one user connection after an LTV target header (type 0x04), or one UDP flow of
accept_udp as frames (type 0x05, PROTOCOL.md 4.1).

Only what is tcp's own lives here: how its links are pooled, dialed and read first. The link
itself is backhaul/links/socket.py; the handshake judging, the control channel and the pool
policy are shared (backhaul/tunnel/).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from backhaul.errors import ProtocolError
from backhaul.links.socket import FlowSocketLink, SocketLink
from backhaul.net import peer_of, tune
from backhaul.protocol.auth import LinkSigner
from backhaul.protocol.framing import SG_TCP, SG_UDP, FrameReader
from backhaul.reactor import READ
from backhaul.tunnel.acceptor import has_bytes
from backhaul.tunnel.carrier import SocketCarrier
from backhaul.tunnel.core import Arrival, ClientCore, ServerCore, ServerRow
from backhaul.tunnel.dialer import dial_link, handshake
from backhaul.tunnel.links import IdleLinks
from backhaul.tunnel.port import TunnelPort
from backhaul.tunnel.session import TunnelSession

log = logging.getLogger("backhaul.transport.tcp")

MAX_CLIENT_LINKS = 4096        # idle plus dialing links on the client
LINK_READ = 16384              # the first read of a link: its header and what follows it


# ------------------------------------------------------------------------------------------------
# server side

class SocketLinks(IdleLinks[SocketLink]):
    """tcp's links: idle sockets in a pool, one per user, topped up to connection_pool."""

    def __init__(self, core: ServerCore, ask: Callable[[int], None], talking: Callable[[socket.socket], None]) -> None:
        super().__init__(core, ask, log, "data connection", close=SocketLink.close, watch=self._watch,
                         peer=lambda link: peer_of(link.sock), follow_demand=True)
        self.talking = talking

    def add(self, arrival: Arrival) -> None:
        self.keep(SocketLink(self.reactor, arrival.sock))

    def _watch(self, link: SocketLink) -> None:
        # The link stays registered for reading when taken: the relay that takes it over on the
        # same call of the reactor only swaps the callback, which costs no system call.
        self.reactor.watch(link.sock, READ, lambda _m: self._idle_event(link))

    def _idle_event(self, link: SocketLink) -> None:
        """An idle link spoke before being used: it closed, or a restarted client handshakes."""
        if not self.pool.remove(link):
            return
        self.reactor.watch(link.sock, 0)
        if has_bytes(link.sock):
            self.talking(link.sock)
        else:
            link.close()


def server(core: ServerCore) -> ServerRow:
    """TCP users and, with accept_udp, UDP flows both take the same socket links."""
    port: TunnelPort[SocketLink, SocketLinks] = TunnelPort(core, "tcp", SocketLinks, rtt_probe=True)
    return ServerRow(port, users=port, flows=port)


# ------------------------------------------------------------------------------------------------
# client side

def connect(core: ClientCore) -> TcpSession:
    """Dial the control channel and do the handshake; blocking, the client's own thread."""
    sock, addr, signer = handshake(core)
    return TcpSession(core, sock, addr, signer)


class TcpSession(TunnelSession):
    """The client's end of one control channel and the links it opened. With ``signer``
    (auth = "challenge") every link says first which session it belongs to."""

    def __init__(self, core: ClientCore, sock: socket.socket, server_addr: tuple[str, int],
                 signer: LinkSigner | None = None) -> None:
        super().__init__(core, SocketCarrier(core.reactor, sock, "the server"), what="data connection",
                         most=MAX_CLIENT_LINKS, rtt_echo=True)
        self.signer = signer
        self.server_addr = server_addr
        self.links: dict[socket.socket, FrameReader] = {}

    def dial_link(self) -> None:
        dial_link(self.core, self.server_addr, self.signer, self._link_dialed)

    def idle_links(self) -> int:
        return len(self.links)

    def open_links(self) -> int:
        return len(self.links)

    def close_links(self) -> None:
        for sock in self.links:
            self.reactor.close_socket(sock)
        self.links.clear()

    def _link_dialed(self, sock: socket.socket | None, error: str, _first: bytes) -> None:
        self.pool.opened(error)
        if sock is None:
            return
        if self.closed:
            self.reactor.close_socket(sock)
            return
        cfg = self.config
        tune(sock, nodelay=cfg.nodelay, keepalive=cfg.keepalive_period, mss=cfg.mss,
             rcvbuf=cfg.so_rcvbuf, sndbuf=cfg.so_sndbuf, congestion=cfg.congestion)
        self.links[sock] = FrameReader(typed=True)
        self.reactor.watch(sock, READ, lambda _m: self._link_event(sock))

    def _link_event(self, sock: socket.socket) -> None:
        reader = self.links.get(sock)
        if reader is None:
            return
        early = b""
        try:
            # One read takes the header and, usually, the user's first bytes behind it: they
            # go to the target ahead of the relay, which saves a read per connection.
            data = sock.recv(LINK_READ)
            if data:
                early = reader.feed(data)
                if not reader.done:
                    return  # the rest of the header follows
        except BlockingIOError:
            return
        except (OSError, ProtocolError) as exc:
            log.debug("data connection dropped: %s", exc)
            data = b""
        del self.links[sock]
        self.reactor.watch(sock, 0)
        if not data:
            sock.close()  # the server closed an idle link
            return
        target = (reader.payload or b"").decode("utf-8", "replace")
        if reader.kind == SG_TCP:
            self.core.carry(SocketLink(self.reactor, sock, link_first=True, early=early), target)
        elif reader.kind == SG_UDP:
            self.core.carry_flow(FlowSocketLink(self.reactor, sock, early), target)
        else:
            log.warning("dropped a data connection: unknown header type 0x%02x", reader.kind or 0)
            sock.close()


SERVER = server
CONNECT = connect
