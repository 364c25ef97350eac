"""The ``ws`` and ``wss`` transports (PROTOCOL.md 3): the HTTP-upgrade handshake (± TLS,
tunnel/upgrade.py), then every ``/tunnel/<N>`` is one pooled WebSocket that carries one user
connection: the target as a text message, then the user's bytes (backhaul/links/websocket.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from backhaul.links.websocket import WebSocket, WebSocketCarrier, WebSocketLink, WebSocketStream
from backhaul.protocol.framing import SG_PING
from backhaul.tunnel.core import Arrival, ClientCore, ServerCore, ServerRow
from backhaul.tunnel.links import IdleLinks
from backhaul.tunnel.session import TunnelSession
from backhaul.tunnel.upgrade import Upgraded, UpgradeDial, UpgradePort, connect_control

log = logging.getLogger("backhaul.transport.ws")

MAX_CLIENT_LINKS = 4096
PING = bytes((SG_PING,))


# ------------------------------------------------------------------------------------------------
# server side

class WebSocketLinks(IdleLinks[WebSocketLink]):
    """ws's links: idle WebSockets in a pool, pinged (0x02) every heartbeat while they wait."""

    def __init__(self, core: ServerCore, ask: Callable[[int], None], _talking: Callable[[socket.socket], None]) -> None:
        super().__init__(core, ask, log, "data connection", close=WebSocketLink.close, watch=self._watch,
                         peer=lambda link: link.ws.peer, follow_demand=True,
                         ping=lambda link: link.ws.send_binary(PING), stale=lambda link: link.ws.closed)

    def add(self, arrival: Arrival) -> None:
        # Still watched: the websocket takes the registration over (no system call).
        ws = WebSocket(self.reactor, arrival.sock, client=False, peer=f"client {arrival.peer}", first=arrival.first)
        self.keep(WebSocketLink(self.reactor, ws))

    def _watch(self, link: WebSocketLink) -> None:
        link.ws.messages(lambda _m: self._spoke(link), lambda _why: self.pool.remove(link))

    def _spoke(self, link: WebSocketLink) -> None:
        """An idle link sent a message: the client has nothing to say on one before its target."""
        if self.pool.remove(link):
            self._warn.warning("spoke", "closed idle data connection from %s: it sent a message before "
                               "being used", link.ws.peer)
            link.close()


def server(core: ServerCore) -> ServerRow:
    port: UpgradePort[WebSocketLink, WebSocketLinks] = UpgradePort(core, WebSocketLinks)
    return ServerRow(port, users=port, flows=None)


# ------------------------------------------------------------------------------------------------
# client side

def connect(core: ClientCore) -> WebSocketSession:
    """Dial, TLS, upgrade to /channel; blocking, on the client's own thread."""
    return WebSocketSession(core, connect_control(core))


class WebSocketSession(TunnelSession):
    """The client's end of a ws/wss control channel and the WebSockets it opened."""

    def __init__(self, core: ClientCore, control: Upgraded) -> None:
        ws = WebSocket(core.reactor, control.sock, client=True, peer="the server", first=control.first)
        super().__init__(core, WebSocketCarrier(ws), what="data connection", most=MAX_CLIENT_LINKS,
                         rtt_echo=False, heartbeat_echo=True)
        self.control = control
        self.links: set[WebSocket] = set()

    def dial_link(self) -> None:
        UpgradeDial(self.core, self.control.server_addr, self.control.signer, self._dialed)

    def idle_links(self) -> int:
        return len(self.links)

    def open_links(self) -> int:
        return len(self.links)

    def close_links(self) -> None:
        for ws in list(self.links):
            ws.close()
        self.links.clear()

    def _dialed(self, sock: socket.socket | None, error: str, first: bytes) -> None:
        self.pool.opened(error)
        if sock is None:
            return
        if self.closed:
            self.reactor.close_socket(sock)
            return
        ws = WebSocket(self.reactor, sock, client=True, peer="the server", first=first)
        self.links.add(ws)
        ws.messages(lambda message: self._message(ws, message), lambda _why: self.links.discard(ws))

    def _message(self, ws: WebSocket, message: bytes | str) -> None:
        """An idle link's first message that is not a ping names its target (PROTOCOL.md 3.3)."""
        if message == bytes((SG_PING,)):
            return
        self.links.discard(ws)
        target = message if isinstance(message, str) else message.decode("utf-8", "replace")
        # From now on the websocket is a stream: the data behind the target is the user's.
        self.core.carry(WebSocketLink(self.reactor, ws, WebSocketStream(ws)), target)


SERVER = server
CONNECT = connect
