"""Transports: one module each, behind one small interface per side.

A server transport owns the tunnel port and supplies links that carry one user connection
each; a client transport opens a session (control channel plus links) to the server.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from backhaul.client import Client
    from backhaul.config import PortMapping
    from backhaul.server import Server

BUILT = ("tcp",)


class ServerTransport(Protocol):
    def open(self) -> None:
        """Bind the tunnel port (TransportError names it when that fails)."""

    def start(self) -> None:
        """Start accepting clients; reactor thread."""

    def user_arrived(self) -> None:
        """A user connection was accepted: ask the client for one more link."""

    def carry(self, user: socket.socket, mapping: PortMapping) -> bool:
        """Hand ``user`` to a ready link now and start relaying; False when none is ready."""

    def close(self) -> None:
        """Tell the client we are going and close every socket of the transport."""


class ClientSession(Protocol):
    def start(self) -> None:
        """Arm the control channel and open the first links; reactor thread."""

    def close(self, reason: str, *, notify: bool) -> None:
        """End the session (sending the closing signal when ``notify``); reactor thread."""


def unavailable(transport: str) -> str | None:
    """Why ``transport`` cannot run in this version, or None when it can."""
    if transport in BUILT:
        return None
    return f"transport {transport!r} is not available in this version yet (available: {', '.join(BUILT)})"


def server_transport(server: Server) -> ServerTransport:
    from backhaul.transport import tcp

    return tcp.TcpServer(server)


def client_connect(client: Client) -> ClientSession:
    """Dial the server and do the handshake (blocking; the client's own thread)."""
    from backhaul.transport import tcp

    return tcp.connect(client)
