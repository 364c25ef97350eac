"""The small interfaces between the tunnel core (server.py, client.py) and the transports.

A *link* carries one user connection through the tunnel: a TCP socket (tcp), an smux stream
(tcpmux, wsmux), a WebSocket (ws) or a UDP flow. The server core asks its transport for a link,
sends the target through it and attaches the user socket; the client core gets a link with its
target from the transport, dials the target and attaches that socket. A link that carries a
user's TCP connection is ``attach``ed (``ServerLink``, ``ClientLink``), one that carries a UDP
flow ``attach_flow``ed (``ServerFlowLink``, ``ClientFlowLink``); tcp's socket link is both.
Everything here runs on the reactor thread unless it says otherwise.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from backhaul.config import ClientConfig, ServerConfig
    from backhaul.reactor import Reactor
    from backhaul.resolver import Resolver
    from backhaul.udp.ports import Flow
    from backhaul.udp.sockets import Peer


class Relaying(Protocol):
    """A running relay (splice or stream): ``abort`` tears it down from outside."""

    @property
    def closed(self) -> bool: ...

    def counts(self) -> tuple[int, int]:
        """Bytes read from the user's (or target's) socket so far, and written to it."""

    def abort(self) -> None: ...


OnRelayClosed = Callable[[Relaying], None]
LinkT_co = TypeVar("LinkT_co", covariant=True)


@dataclass(frozen=True, slots=True)
class Arrival:
    """A link connection from a client, past its handshake, for the transport's links on the
    server: the socket (non-blocking; still watched by the reactor after an HTTP upgrade, where a
    WebSocket takes the registration over: links that read it otherwise forget it first), the
    peer as the handshake named it ("ip:port"), and ``first``, the bytes read from it behind its
    handshake (the rest of an upgrade head)."""

    sock: socket.socket
    peer: str
    first: bytes = b""


class ServerLink(Protocol):
    """The server's end of one link that carries a user's TCP connection, fresh from the
    transport's pool (every row but udp)."""

    def peer(self) -> tuple[str, int]:
        """The client's address of the tunnel connection under it (OSError when it is gone)."""

    def send_header(self, target: str, proxy: bytes) -> bool:
        """Send the target header (and a PROXY v2 header when ``proxy``); False: the link is dead."""

    def attach(self, user: socket.socket, on_close: OnRelayClosed) -> Relaying:
        """Relay between ``user`` and this link until both directions end."""

    def close(self) -> None: ...


class ServerFlowLink(Protocol):
    """The server's end of one link that carries a UDP flow (udp, and tcp with accept_udp)."""

    def attach_flow(self, flow: Flow, on_close: OnRelayClosed, rtt_ms: int) -> Relaying | None:
        """Announce a UDP flow to ``flow.mapping.target`` and relay its datagrams until it ends;
        None: the link is dead. ``rtt_ms`` is the control channel's RTT (0 when unknown)."""

    def close(self) -> None: ...


class ClientLink(Protocol):
    """The client's end of one link whose target header has arrived, for a TCP target."""

    def attach(self, target: socket.socket, on_close: OnRelayClosed) -> Relaying:
        """Relay between this link and the ``target`` socket until both directions end."""

    def close(self) -> None: ...


class ClientFlowLink(Protocol):
    """The client's end of one link whose target header has arrived, for a UDP flow."""

    def attach_flow(self, target: Peer, on_close: OnRelayClosed) -> Relaying:
        """Relay datagrams between this link and the ``target`` UDP peer."""

    def close(self) -> None: ...


class ServerCore(Protocol):
    """What a server transport may ask of the core."""

    config: ServerConfig
    reactor: Reactor

    def link_available(self) -> None:
        """A link is ready: give it to the oldest waiting user."""


class ClientCore(Protocol):
    """What a client transport may ask of the core."""

    config: ClientConfig
    reactor: Reactor
    resolver: Resolver

    def carry(self, link: ClientLink, target: str) -> None:
        """Dial the target a link was assigned to and relay between them."""

    def carry_flow(self, link: ClientFlowLink, target: str) -> None:
        """Open a UDP socket to the target of a UDP flow and relay datagrams between them."""

    def session_ended(self, session: ClientSession, reason: str) -> None:
        """The session closed (``reason`` empty when we closed it on purpose)."""


class ServerTransport(Protocol):
    """The tunnel port of one transport: handshakes, the control channel and the link pool."""

    def open(self) -> None:
        """Bind the tunnel port (TransportError names it when that fails); main thread."""

    def start(self) -> None:
        """Start accepting clients."""

    @property
    def rtt_ms(self) -> int:
        """The round trip in whole ms, as Go measures it, of the control channel of the client
        whose link ``take_link`` handed out last (0: unknown)."""

    @property
    def client(self) -> str:
        """The address of the client whose link ``take_link`` handed out last ("" before any)."""

    def user_arrived(self) -> None:
        """A user connection was accepted (or a UDP flow began): ask for what the pool policy wants."""

    def peer(self) -> str:
        """The clients' addresses while their control channels are up (comma-separated), else ""."""

    def describe_clients(self) -> list[dict[str, object]]:
        """Each client address with a control channel: ``client``, ``channels`` (their peers),
        ``idle_links`` and ``rtt_ms``."""

    def close(self) -> None:
        """Tell the client we are going and close every socket of the transport."""


class LinkSource(Protocol[LinkT_co]):
    """Where the server takes its links of one kind: the transport's tunnel port."""

    def take_link(self) -> LinkT_co | None:
        """A ready link, taken out of the pool, or None. It may still be watched for reading:
        attach or close it before control returns to the reactor."""


@dataclass(frozen=True, slots=True)
class ServerRow:
    """What a transport's ``SERVER`` makes: its tunnel port, and the same port seen as the source
    of the links it has, for TCP users (None on udp, whose public ports are UDP only) and for
    UDP flows (None on a row that carries none: only tcp and udp do)."""

    transport: ServerTransport
    users: LinkSource[ServerLink] | None
    flows: LinkSource[ServerFlowLink] | None


class ClientSession(Protocol):
    """One control channel with the server and the links it opened."""

    def start(self) -> None:
        """Listen on the control channel and open the first links."""

    def close(self, reason: str, *, notify: bool) -> None:
        """End the session (sending the closing signal when ``notify``)."""


ClientConnect = Callable[[ClientCore], ClientSession]
