"""The ``tcpmux`` transport (PROTOCOL.md 2): the tcp handshake and control channel (without the RTT
probe), then every further connection from the client is an smux session (tunnel/mux_sessions.py).
"""

from __future__ import annotations

import functools

from backhaul.links.smux_stream import StreamLink
from backhaul.tunnel.carrier import SocketCarrier
from backhaul.tunnel.core import ClientCore, ServerCore, ServerRow
from backhaul.tunnel.dialer import dial_link, handshake
from backhaul.tunnel.mux_sessions import MuxClientSession, SessionLinks
from backhaul.tunnel.port import TunnelPort


def server(core: ServerCore) -> ServerRow:
    port: TunnelPort[StreamLink, SessionLinks] = TunnelPort(core, "tcpmux", SessionLinks, rtt_probe=False)
    return ServerRow(port, users=port, flows=None)


def connect(core: ClientCore) -> MuxClientSession:
    """Dial the control channel and do the handshake; blocking, the client's own thread. Each
    session is a plain TCP connection to the same address (with a LINK proof under challenge)."""
    sock, addr, signer = handshake(core)
    return MuxClientSession(core, SocketCarrier(core.reactor, sock, "the server"),
                            functools.partial(dial_link, core, addr, signer))


SERVER = server
CONNECT = connect
