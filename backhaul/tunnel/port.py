"""The tunnel port of the tcp family (tcp, tcpmux, udp): the listener, the token handshake and the
control channels, shared; what a link connection becomes is the transport's ``Links``.

Every connection from a control channel's address that sends nothing first is handed to the
links of that address: a pooled socket for tcp, an smux session for tcpmux.

``clients = "replace"`` (the Go behaviour) keeps one client: a new one takes the tunnel over.
``clients = "balance"`` keeps every client that completes the handshake, each address with its
own links; the protocol tells a link's client only by its source address, so clients behind one
address share one entry (its links, its counts) while each keeps its own control channel.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from backhaul.listener import Listener
from backhaul.log import Throttles
from backhaul.metrics import METRICS
from backhaul.net import listen, peer_of, tune
from backhaul.protocol.auth import LinkChecker
from backhaul.tunnel.acceptor import HandshakeAcceptor
from backhaul.tunnel.carrier import Carrier, SocketCarrier
from backhaul.tunnel.control import ServerChannel
from backhaul.tunnel.core import Arrival, LinkT_co, ServerCore

log = logging.getLogger("backhaul.tunnel.port")

RECONNECTS = METRICS.counter("backhaul_reconnects_total", "Control channels established after the first one.",
                             ("side",))
MAX_ADDRESSES = 1024          # balance: client addresses kept at once; past it a newcomer is refused
MAX_CHANNELS_PER_ADDRESS = 32  # balance: control channels of one address; past it the oldest goes

CHANNELS = METRICS.gauge("backhaul_control_channels", "Control channels up on the server (one per client; "
                         "several only with clients = \"balance\").")
CLIENT_IDLE = METRICS.gauge("backhaul_client_idle_links", "Tunnel links ready for a user, by client address "
                            "(smux: streams its sessions may still open).", ("client",))


class Links(Protocol[LinkT_co]):
    """A transport's policy for the connections one client opens after its control channel, which
    become its links of one kind."""

    def add(self, arrival: Arrival) -> None:
        """A new link connection from the client."""

    def take(self) -> LinkT_co | None:
        """A link for one user, or None (then ask for more)."""

    def idle(self) -> int:
        """How many users the links ready now could take without asking the client."""

    def enough(self) -> int:
        """Idle links past which a client counts as wholly ready: the pool the server keeps."""

    def user_arrived(self) -> None:
        """A user is about to want a link."""

    def start(self) -> None:
        """The client's first control channel is up."""

    def stop(self) -> None:
        """The client went away: close everything it opened."""


# A port is generic over the kind of link its links hand out (so its take_link is typed) and over
# its links' type (so a port that needs more of its links, as udp's does, calls them typed).
LinkT = TypeVar("LinkT")
LinksT = TypeVar("LinksT", bound=Links[Any])
# Links are made with: the core, a way to ask the client for more (count), and a way to read a
# handshake from a link connection that starts talking (a client restarted from the same address).
LinksFactory = Callable[[ServerCore, Callable[[int], None], Callable[[socket.socket], None]], LinksT]


class ClientEntry(Generic[LinksT]):
    """One client address: its control channels (more than one only in balance mode, when
    clients share an address) and the links that come from it."""

    __slots__ = ("ip", "channels", "links", "checkers")

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.channels: list[ServerChannel] = []
        self.links: LinksT
        self.checkers: dict[ServerChannel, LinkChecker] = {}   # auth = "challenge": each session's

    def ask(self, count: int) -> None:
        """Ask for ``count`` more links on the newest channel: a client that restarted from this
        address while its old channel lingers is the one that answers."""
        if self.channels:
            self.channels[-1].request_links(count)

    @property
    def rtt_ms(self) -> int:
        return self.channels[-1].rtt_ms if self.channels else 0

    def peers(self) -> list[str]:
        return [channel.peer.removeprefix("client ") for channel in self.channels]


class Port(Generic[LinkT, LinksT]):
    """What every tunnel port shares: the listener, the life of the control channels, and the
    links of each client. A subclass says how a connection is read (``_arrived``), whom it
    trusts for links (``_trust``) and what else it closes (``_close_pending``)."""

    def __init__(self, core: ServerCore, name: str, make_links: LinksFactory[LinksT]) -> None:
        self.core = core
        self.name = name
        self.config = core.config
        self.reactor = core.reactor
        self.balance = core.config.clients == "balance"
        self.make_links = make_links
        self.listener: Listener | None = None
        self.clients: dict[str, ClientEntry[LinksT]] = {}   # by address; at most one unless balance
        self.taken: ClientEntry[LinksT] | None = None       # whose link take_link handed out last
        self._turn = 0                              # round robin among clients with as many idle links
        self._ask_turn = 0
        self._had_channel = False
        self._unwatch: list[Callable[[], None]] = []
        self._warn = Throttles(log)

    def open(self) -> None:
        cfg = self.config
        sock = listen(cfg.bind_host, cfg.bind_port, mss=cfg.mss, rcvbuf=cfg.so_rcvbuf)
        # Accepted connections inherit these (Linux): links need no system call of their own.
        tune(sock, nodelay=cfg.nodelay, keepalive=cfg.keepalive_period, mss=cfg.mss,
             rcvbuf=cfg.so_rcvbuf, sndbuf=cfg.so_sndbuf, congestion=cfg.congestion)
        self.listener = Listener(self.reactor, sock, f"the tunnel port {cfg.bind_host}:{cfg.bind_port}",
                                 self._arrived)

    def start(self) -> None:
        assert self.listener is not None
        self.listener.start()
        self._unwatch = [
            CHANNELS.watch(lambda: sum(len(entry.channels) for entry in list(self.clients.values()))),
            CLIENT_IDLE.watch(lambda: [((entry.ip,), entry.links.idle()) for entry in list(self.clients.values())]),
        ]
        log.info("%s tunnel listening on %s:%d%s", self.name, self.config.bind_host, self.config.bind_port,
                 " (clients: balance)" if self.balance else "")

    def close(self) -> None:
        for unwatch in self._unwatch:
            unwatch()
        self._unwatch = []
        self._drop_all(notify=True)
        self._close_pending()
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # --- which client serves the next user ----------------------------------------------------
    @property
    def rtt_ms(self) -> int:
        return self.taken.rtt_ms if self.taken is not None else 0

    @property
    def client(self) -> str:
        return self.taken.ip if self.taken is not None else ""

    def _ranked(self, turn: int, *, most: bool = True) -> list[ClientEntry[LinksT]]:
        """The clients, most idle links first (fewest first unless ``most``); among equals,
        round robin from ``turn``. Idle links count up to the pool the server keeps ready: past
        it a client is as ready as another, however far its own pool grew under load (smux
        sessions are never given back), so light traffic goes round robin."""
        entries = list(self.clients.values())
        turn %= len(entries)
        entries = entries[turn:] + entries[:turn]
        sign = -1 if most else 1
        # stable: the rotation breaks ties
        entries.sort(key=lambda entry: sign * min(entry.links.idle(), entry.links.enough()))
        return entries

    def _next_turn(self, entry: ClientEntry[LinksT]) -> int:
        return list(self.clients.values()).index(entry) + 1

    def user_arrived(self) -> None:
        """Ask for the link this user takes. With several clients the one with the fewest idle
        links is asked: asking the one that serves it (the most idle) would keep it the most
        idle, and it would take every user while the others wait with their pools."""
        if len(self.clients) == 1:
            next(iter(self.clients.values())).links.user_arrived()
        elif self.clients:
            entry = self._ranked(self._ask_turn, most=False)[0]
            self._ask_turn = self._next_turn(entry)
            entry.links.user_arrived()

    def take_link(self) -> LinkT | None:
        link: LinkT | None
        if len(self.clients) == 1:
            entry = next(iter(self.clients.values()))
            link = entry.links.take()
            if link is not None:
                self.taken = entry
            return link
        if not self.clients:
            return None
        for entry in self._ranked(self._turn):
            link = entry.links.take()
            if link is not None:
                self.taken = entry
                self._turn = self._next_turn(entry)
                return link
        return None

    def peer(self) -> str:
        return ", ".join(peer for entry in list(self.clients.values()) for peer in entry.peers())

    def describe_clients(self) -> list[dict[str, object]]:
        """Each client address: its control channels, links ready and round trip, for the page."""
        return [{"client": entry.ip, "channels": entry.peers(), "idle_links": entry.links.idle(),
                 "rtt_ms": entry.rtt_ms} for entry in list(self.clients.values())]

    # --- for the subclasses -------------------------------------------------------------------
    def _arrived(self, sock: socket.socket, addr: tuple) -> None:
        raise NotImplementedError

    def _trust(self, ips: frozenset[str]) -> None:
        """Links come from ``ips`` from now on (the addresses with a control channel)."""
        raise NotImplementedError

    def _close_pending(self) -> None:
        raise NotImplementedError

    def _talking(self, sock: socket.socket) -> None:
        """A link of a client started talking: what it says is read as a new handshake."""
        sock.close()

    def checkers_of(self, ip: str) -> list[LinkChecker]:
        """The link checkers of the sessions of the clients at ``ip`` (auth = "challenge")."""
        entry = self.clients.get(ip)
        return list(entry.checkers.values()) if entry is not None else []

    def entry_of(self, ip: str) -> ClientEntry[LinksT] | None:
        """The client that owns a link from ``ip``: the one client in replace mode, where the
        transport checks the address (or, on the WebSocket and UDP transports, does not)."""
        if self.balance:
            return self.clients.get(ip)
        return next(iter(self.clients.values()), None)

    def _drop_all(self, *, notify: bool) -> None:
        """Every client goes, with its links (hearing the closing signal when ``notify``)."""
        for entry in list(self.clients.values()):
            for channel in list(entry.channels):
                channel.close(notify=notify)
                self._remove(entry, channel)

    def _install(self, carrier: Carrier, peer: str, ip: str, *, rtt_probe: bool, first: bytes = b"",
                 links: LinkChecker | None = None) -> None:
        """A client is in: its control channel runs on ``carrier``; ``first`` leaves first; ``links``
        checks the proofs of its session's links (auth = "challenge")."""
        cfg = self.config
        entry = self.clients.get(ip)
        fresh = entry is None
        if entry is None and len(self.clients) >= MAX_ADDRESSES:
            self._warn.warning("addresses", "refused client %s: %d client addresses have a control channel, the "
                               "most balance mode keeps", peer, MAX_ADDRESSES)
            carrier.close()
            return
        if entry is not None and len(entry.channels) >= MAX_CHANNELS_PER_ADDRESS:
            oldest = entry.channels[0]
            self._warn.warning("channels", "closed the oldest control channel from %s (%s): %d from one address "
                               "are the most balance mode keeps", ip, oldest.peer, MAX_CHANNELS_PER_ADDRESS)
            oldest.close(notify=True)
            entry.channels.remove(oldest)
            entry.checkers.pop(oldest, None)
        if entry is None:
            entry = self.clients[ip] = ClientEntry(ip)
            entry.links = self.make_links(self.core, entry.ask, self._talking)
        channel = ServerChannel(self.reactor, carrier, cfg.heartbeat, rtt_probe=rtt_probe,
                                on_lost=lambda reason, goodbye: self._lost(entry, channel, reason, goodbye))
        entry.channels.append(channel)
        if links is not None:
            entry.checkers[channel] = links
        self._trust(frozenset(self.clients))
        # Installed before the reply leaves, so the links that follow it find it.
        channel.start(first)
        if channel.closed:
            return
        if fresh:
            entry.links.start()
        if self._had_channel:
            RECONNECTS.inc(1, "server")
        self._had_channel = True
        if self.balance:
            log.info("client %s connected: control channel up (%d clients)", peer, len(self.clients))
        else:
            log.info("client %s connected: control channel up", peer)
        if cfg.token_is_default:
            log.warning("the default token is in use; set token on both sides")

    def _lost(self, entry: ClientEntry[LinksT], channel: ServerChannel, reason: str, goodbye: bool) -> None:
        self._remove(entry, channel)
        level = logging.INFO if goodbye else logging.WARNING
        if not self.balance:
            log.log(level, "%s; waiting for the client to reconnect", reason)
        elif entry.channels:
            log.log(level, "%s; its address %s keeps %d control channel(s) and its links", reason, entry.ip,
                    len(entry.channels))
        else:
            log.log(level, "%s; its links are closed; %d clients remain", reason, len(self.clients))

    def _remove(self, entry: ClientEntry[LinksT], channel: ServerChannel) -> None:
        """``channel`` ended; the last channel of an address takes that address's links with it."""
        if channel in entry.channels:
            entry.channels.remove(channel)
        entry.checkers.pop(channel, None)
        if entry.channels or self.clients.get(entry.ip) is not entry:
            return
        del self.clients[entry.ip]
        if self.taken is entry:
            self.taken = None
        self._trust(frozenset(self.clients))
        entry.links.stop()


class TunnelPort(Port[LinkT, LinksT]):
    """The tcp family's port: token handshakes, then links told apart by the clients' addresses."""

    def __init__(self, core: ServerCore, name: str, make_links: LinksFactory[LinksT], *, rtt_probe: bool) -> None:
        super().__init__(core, name, make_links)
        self.rtt_probe = rtt_probe
        self.acceptor = HandshakeAcceptor(self.reactor, self.config.token, self._control_up, self.links_add,
                                          challenge=self.config.auth == "challenge", checkers_of=self.checkers_of)

    def _arrived(self, sock: socket.socket, addr: tuple) -> None:
        self.acceptor.arrived(sock, addr)

    def _trust(self, ips: frozenset[str]) -> None:
        self.acceptor.control_ips = self.acceptor.pending.trusted = ips

    def _close_pending(self) -> None:
        self.acceptor.close()

    def _control_up(self, sock: socket.socket, peer: str, ip: str, reply: bytes, links: LinkChecker | None) -> None:
        if self.clients and not self.balance:
            log.info("client %s opened a new control channel; dropping the one from %s", peer, self.peer())
            self._drop_all(notify=False)   # the old session's link proofs end with it
        tune(sock, nodelay=True)  # keepalive comes with the listener's options
        self._install(SocketCarrier(self.reactor, sock, f"client {peer}"), peer, ip, rtt_probe=self.rtt_probe,
                      first=reply, links=links)

    def links_add(self, sock: socket.socket, peer: str, ip: str) -> None:
        entry = self.entry_of(ip)
        if entry is None:
            sock.close()
            return
        entry.links.add(Arrival(sock, peer))

    def _talking(self, sock: socket.socket) -> None:
        try:
            ip = sock.getpeername()[0]
        except OSError:
            sock.close()
            return
        self.acceptor.begin(sock, peer_of(sock), ip)
