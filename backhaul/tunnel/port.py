"""The tunnel port of the tcp family (tcp, tcpmux, udp): the listener, the token handshake and the
control channel, shared; what a link connection becomes is the transport's ``Links``.

Every connection from the control channel's address that sends nothing first is handed to the
transport's links: a pooled socket for tcp, an smux session for tcpmux.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Protocol

from backhaul.listener import Listener
from backhaul.metrics import METRICS
from backhaul.net import listen, peer_of, tune
from backhaul.protocol.auth import LinkChecker
from backhaul.tunnel.acceptor import HandshakeAcceptor
from backhaul.tunnel.carrier import Carrier, SocketCarrier
from backhaul.tunnel.control import ServerChannel
from backhaul.tunnel.core import ServerCore, ServerLink

log = logging.getLogger("backhaul.server")

RECONNECTS = METRICS.counter("backhaul_reconnects_total", "Control channels established after the first one.",
                             ("side",))


class Links(Protocol):
    """A transport's policy for the connections its client opens after the control channel."""

    def add(self, sock: socket.socket) -> None:
        """A new link connection from the client's address."""

    def take(self) -> ServerLink | None:
        """A link for one user, or None (then ask for more)."""

    def user_arrived(self) -> None:
        """A user is about to want a link."""

    def start(self) -> None:
        """The control channel is up."""

    def stop(self) -> None:
        """The client went away: close everything it opened."""


# Links are made with: the core, a way to ask the client for more (count), and a way to read a
# handshake from a link connection that starts talking (a client restarted from the same address).
LinksFactory = Callable[[ServerCore, Callable[[int], None], Callable[[socket.socket], None]], Links]


class Port:
    """What every tunnel port shares: the listener, the life of the control channel, and the
    transport's links. A subclass says how a connection is read (``_arrived``), whom it trusts
    for links (``_trust``) and what else it closes (``_close_pending``)."""

    def __init__(self, core: ServerCore, name: str) -> None:
        self.core = core
        self.name = name
        self.config = core.config
        self.reactor = core.reactor
        self.listener: Listener | None = None
        self.channel: ServerChannel | None = None
        self.links: Links
        self._had_channel = False

    def open(self) -> None:
        cfg = self.config
        sock = listen(cfg.bind_host, cfg.bind_port, mss=cfg.mss, rcvbuf=cfg.so_rcvbuf)
        # Accepted connections inherit these (Linux): links need no system call of their own.
        tune(sock, nodelay=cfg.nodelay, keepalive=cfg.keepalive_period, mss=cfg.mss,
             rcvbuf=cfg.so_rcvbuf, sndbuf=cfg.so_sndbuf)
        self.listener = Listener(self.reactor, sock, f"the tunnel port {cfg.bind_host}:{cfg.bind_port}",
                                 self._arrived)

    def start(self) -> None:
        assert self.listener is not None
        self.listener.start()
        log.info("%s tunnel listening on %s:%d", self.name, self.config.bind_host, self.config.bind_port)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close(notify=True)
            self._drop()
        self._close_pending()
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    @property
    def rtt_ms(self) -> int:
        return self.channel.rtt_ms if self.channel is not None else 0

    def user_arrived(self) -> None:
        if self.channel is not None:
            self.links.user_arrived()

    def take_link(self) -> ServerLink | None:
        return self.links.take()

    def peer(self) -> str:
        return self.channel.peer.removeprefix("client ") if self.channel is not None else ""

    # --- for the subclasses -------------------------------------------------------------------
    def _arrived(self, sock: socket.socket, addr: tuple) -> None:
        raise NotImplementedError

    def _trust(self, ip: str) -> None:
        """Links come from ``ip`` from now on ("" when the client left)."""
        raise NotImplementedError

    def _close_pending(self) -> None:
        raise NotImplementedError

    def _install(self, carrier: Carrier, peer: str, ip: str, *, rtt_probe: bool, first: bytes = b"") -> None:
        """The client is in: its control channel runs on ``carrier``; ``first`` leaves first."""
        cfg = self.config
        channel = self.channel = ServerChannel(self.reactor, carrier, cfg.heartbeat, rtt_probe=rtt_probe,
                                               on_lost=self._lost)
        self._trust(ip)
        # Installed before the reply leaves, so the links that follow it find it.
        channel.start(first)
        if self.channel is not channel:
            return
        self.links.start()
        if self._had_channel:
            RECONNECTS.inc(1, "server")
        self._had_channel = True
        log.info("client %s connected: control channel up", peer)
        if cfg.token_is_default:
            log.warning("the default token is in use; set token on both sides")

    def _lost(self, reason: str, goodbye: bool) -> None:
        log.log(logging.INFO if goodbye else logging.WARNING, "%s; waiting for the client to reconnect", reason)
        self._drop()

    def _drop(self) -> None:
        """The client went away: its links go with it."""
        self.channel = None
        self._trust("")
        self.links.stop()

    def _ask(self, count: int) -> None:
        if self.channel is not None:
            self.channel.request_links(count)


class TunnelPort(Port):
    """The tcp family's port: token handshakes, then links told apart by the client's address."""

    def __init__(self, core: ServerCore, name: str, make_links: LinksFactory, *, rtt_probe: bool) -> None:
        super().__init__(core, name)
        self.rtt_probe = rtt_probe
        self.acceptor = HandshakeAcceptor(self.reactor, self.config.token, self._control_up, self.links_add,
                                          challenge=self.config.auth == "challenge")
        self.links = make_links(core, self._ask, self._talking)

    def _arrived(self, sock: socket.socket, addr: tuple) -> None:
        self.acceptor.arrived(sock, addr)

    def _trust(self, ip: str) -> None:
        self.acceptor.control_ip = ip
        if not ip:
            self.acceptor.links = None   # the session's link proofs end with it

    def _close_pending(self) -> None:
        self.acceptor.close()

    def _control_up(self, sock: socket.socket, peer: str, ip: str, reply: bytes, links: LinkChecker | None) -> None:
        if self.channel is not None:
            log.info("client %s opened a new control channel; dropping the one from %s", peer,
                     self.channel.peer.removeprefix("client "))
            self.channel.close(notify=False)
            self._drop()
        self.acceptor.links = links
        tune(sock, nodelay=True)  # keepalive comes with the listener's options
        self._install(SocketCarrier(self.reactor, sock, f"client {peer}"), peer, ip, rtt_probe=self.rtt_probe,
                      first=reply)

    def links_add(self, sock: socket.socket) -> None:
        self.links.add(sock)

    def _talking(self, sock: socket.socket) -> None:
        self.acceptor.begin(sock, peer_of(sock), self.acceptor.control_ip)
