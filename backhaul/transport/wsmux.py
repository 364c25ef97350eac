"""The ``wsmux`` and ``wssmux`` transports (PROTOCOL.md 3.4): the HTTP-upgrade handshake (± TLS,
tunnel/upgrade.py), then every upgraded ``/tunnel/<N>`` carries one smux session on its raw socket
(tunnel/mux_sessions.py), as tcpmux's connections do.
"""

from __future__ import annotations

import functools

from backhaul.links.smux_stream import StreamLink
from backhaul.links.websocket import WebSocket, WebSocketCarrier
from backhaul.tunnel.core import ClientCore, ServerCore, ServerRow
from backhaul.tunnel.mux_sessions import MuxClientSession, SessionLinks
from backhaul.tunnel.upgrade import UpgradeDial, UpgradePort, connect_control


def server(core: ServerCore) -> ServerRow:
    port: UpgradePort[StreamLink, SessionLinks] = UpgradePort(core, SessionLinks)
    return ServerRow(port, users=port, flows=None)


def connect(core: ClientCore) -> MuxClientSession:
    """The control channel as ws (blocking, on the client's own thread); each session an upgraded
    connection, dialed on the reactor."""
    control = connect_control(core)
    ws = WebSocket(core.reactor, control.sock, client=True, peer="the server", first=control.first)
    return MuxClientSession(core, WebSocketCarrier(ws),
                            functools.partial(UpgradeDial, core, control.server_addr, control.signer),
                            heartbeat_echo=True)


SERVER = server
CONNECT = connect
