"""The udp transport's handshake family (PROTOCOL.md 4.2), both sides: the tcp family's control
channel, and links announced by one datagram each.

A link announces itself with one datagram holding the raw token (with ``auth = "challenge"``: the
LINK frame of docs/auth.md instead) from a new UDP socket to the tunnel port; no answer comes.

Server: ``UdpTunnelPort`` takes a link only from an address with a control channel (as the tcp
family takes its links), and a datagram that opens none counts against the tunnel port's
per-address limit of failed handshakes (tunnel/gate.py): token guessing over UDP is held back like
over TCP, and an address past the limit has its datagrams dropped unread. Client: ``open_link``.
"""

from __future__ import annotations

import errno
import hmac
import socket
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from backhaul.config import ClientConfig
from backhaul.errors import ProtocolError, TransportError
from backhaul.net import reason
from backhaul.protocol.auth import AuthError, LinkSigner, check_any
from backhaul.protocol.handshake import hello_reader
from backhaul.tunnel.core import LinkT_co, ServerCore
from backhaul.tunnel.port import Links, LinksFactory, LinkT, TunnelPort
from backhaul.udp.sockets import DROPPED, AddressPeer, DatagramSocket, bind_udp, connected_udp, drop, show

# Refusals of a datagram that would open a link which count as a failed handshake of its address
# (no_control does not: a real client's link racing the end of its session).
_FAILURES = frozenset({"not_a_link", "foreign", "link", "replay", "early"})
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


# ------------------------------------------------------------------------------------------------
# server side

class DatagramLinks(Links[LinkT_co], Protocol[LinkT_co]):
    """A transport's links that also come as addresses on the UDP tunnel port."""

    def add_datagrams(self, peer: AddressPeer) -> None:
        """``peer``, an address on the UDP tunnel port, sent the token or a link proof: a new link."""


DatagramLinksT = TypeVar("DatagramLinksT", bound=DatagramLinks[Any])


class UdpTunnelPort(TunnelPort[LinkT, DatagramLinksT]):
    """The tcp family's port, with the UDP socket of the same address beside it: datagrams from
    an address that is no link yet must be the token, and make a link of the client there."""

    def __init__(self, core: ServerCore, make_links: LinksFactory[DatagramLinksT]) -> None:
        super().__init__(core, "udp", make_links, rtt_probe=True)
        self.socket: DatagramSocket | None = None

    def open(self) -> None:
        super().open()
        cfg = self.config
        try:
            sock = bind_udp(cfg.bind_host, cfg.bind_port)
        except TransportError:
            self.close()
            raise
        self.socket = DatagramSocket(self.reactor, sock, f"the UDP tunnel port {cfg.bind_host}:{cfg.bind_port}",
                                     self._unknown)

    def start(self) -> None:
        super().start()
        assert self.socket is not None
        self.socket.start()

    def close(self) -> None:
        super().close()
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def _unknown(self, addr: tuple, data: bytes) -> None:
        """A datagram from an address that is no link: it must open one, and goes to the client
        of its address (one client in replace mode)."""
        ip, acceptor = addr[0], self.acceptor
        if not acceptor.gate.admits(ip):
            DROPPED.inc(1, "limited")   # the limiter said so once for the window
            return
        refusal = self._refusal(ip, data)
        owner = self.entry_of(ip) if refusal is None else None
        if owner is None:
            kind, why = refusal or ("no_control", "a link while no control channel is up")
            line = "dropped a datagram from %s on the UDP tunnel port: %s"
            if kind in _FAILURES:
                acceptor.gate.failed(ip, kind, line, show(addr), why, account=drop)
            else:
                drop(kind, line, show(addr), why)
            return
        assert self.socket is not None
        owner.links.add_datagrams(AddressPeer(self.socket, addr, f"client link {show(addr)}"))

    def _refusal(self, ip: str, data: bytes) -> tuple[str, str] | None:
        """Why ``data`` from ``ip`` opens no link (kind, why), or None: the token (v0.7.2), or
        with auth = "challenge" a LINK frame of a session of its address, from a control
        channel's address (the Go server takes a link from any address)."""
        acceptor = self.acceptor
        if acceptor.challenge:
            reader = hello_reader()
            try:
                if reader.feed(data) or not reader.done:
                    return "not_a_link", "not from a link, and no link proof"
            except ProtocolError:
                return "not_a_link", "not from a link, and no link proof"
        elif not hmac.compare_digest(data, self.config.token.encode()):
            return "not_a_link", "not from a link, and not the token"
        if not self.clients:
            return "no_control", "a link while no control channel is up"
        if ip not in acceptor.control_ips:
            ips = acceptor.control_ips
            whom = f"the control channel's {next(iter(ips))}" if len(ips) == 1 else f"those of {len(ips)} clients"
            return "foreign", f"a link from another address than {whom}"
        if acceptor.challenge:
            try:
                check_any(self.checkers_of(ip), lambda links: links.check_frame(reader.kind, reader.payload))
            except AuthError as exc:
                return exc.kind, str(exc)
        return None


# ------------------------------------------------------------------------------------------------
# client side

def open_link(cfg: ClientConfig, family: int, server_addr: tuple[str, int], signer: LinkSigner | None,
              make_room: Callable[[str], bool]) -> socket.socket:
    """A new UDP socket connected to the server's tunnel port, announced by the token or, with
    ``signer`` (auth = "challenge"), the LINK frame. Out of descriptors, ``make_room(why)`` may
    free some for one more try (False when it could not). OSError says why there is none."""
    try:
        sock = connected_udp(family, server_addr, cfg.local_addr)
    except OSError as exc:
        if exc.errno not in _EXHAUSTED or not make_room(reason(exc)):
            raise
        sock = connected_udp(family, server_addr, cfg.local_addr)
    try:
        sock.send(signer.frame() if signer is not None else cfg.token.encode())
    except OSError:
        sock.close()
        raise
    return sock
