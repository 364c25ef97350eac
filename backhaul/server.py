"""What every server transport shares: the public port listeners, the queue of user
connections waiting for the tunnel (3 s, bounded by channel_size) and the running relays.

A transport supplies links; ``Server`` decides which user connection gets one. A UDP flow
(accept_udp on tcp, every port on udp) waits in the same queue and takes a link the same way.
"""

from __future__ import annotations

import collections
import logging
import socket

from backhaul.config import PortMapping, ServerConfig
from backhaul.errors import TransportError
from backhaul.flows import Flow, UdpPorts, open_ports
from backhaul.listener import Listener
from backhaul.log import Throttles
from backhaul.net import listen, peer_of, tune
from backhaul.protocol.proxy_v2 import encode_proxy_v2
from backhaul.reactor import Reactor, Timer
from backhaul.transport import server_transport
from backhaul.tunnel.core import Relaying

log = logging.getLogger("backhaul.server")

USER_WAIT = 3.0     # a user connection not matched with a tunnel link by then is closed


class Waiting:
    """A user connection, or a UDP flow, that has no tunnel link yet."""

    __slots__ = ("sock", "flow", "mapping", "timer")

    def __init__(self, sock: socket.socket | None, mapping: PortMapping, flow: Flow | None = None) -> None:
        self.sock = sock
        self.flow = flow
        self.mapping = mapping
        self.timer: Timer | None = None

    @property
    def user(self) -> str:
        if self.flow is not None:
            return self.flow.name
        assert self.sock is not None
        return f"user connection {peer_of(self.sock)} on port {self.mapping.listen_port}"

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.flow is not None:
            self.flow.on_closed = None
            self.flow.close()
        else:
            assert self.sock is not None
            self.sock.close()


class Server:
    """Public listeners plus the pairing of user connections with the transport's links."""

    def __init__(self, config: ServerConfig, reactor: Reactor) -> None:
        self.config = config
        self.reactor = reactor
        self.transport = server_transport(config.transport, self)
        self.listeners: list[tuple[Listener, PortMapping]] = []
        self.udp: UdpPorts | None = None
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.relays: set[Relaying] = set()
        self._warn = Throttles(log)

    def open(self) -> None:
        """Bind the tunnel port and every public port; TransportError names the first that fails."""
        cfg = self.config
        try:
            self.transport.open()
            if cfg.transport == "udp" or (cfg.accept_udp and cfg.transport == "tcp"):
                self.udp = open_ports(self.reactor, cfg, self._flow)
            elif cfg.accept_udp:
                log.warning("accept_udp has no effect with transport %s (only tcp carries it)", cfg.transport)
            for mapping in cfg.ports if cfg.transport != "udp" else ():
                sock = listen(*mapping.listen_addr, mss=cfg.mss, rcvbuf=cfg.so_rcvbuf)
                tune(sock, nodelay=cfg.nodelay)  # users inherit it
                name = "port {}:{}".format(*mapping.listen_addr)
                listener = Listener(self.reactor, sock, name, lambda s, _a, m=mapping: self._accepted(s, m))
                self.listeners.append((listener, mapping))
        except TransportError:
            self.close()
            raise

    def start(self) -> None:
        """Start accepting; reactor thread only."""
        self.transport.start()
        for listener, mapping in self.listeners:
            listener.start()
            log.info("forwarding %s:%d -> client target %s", *mapping.listen_addr, mapping.target)
        if self.udp is not None:
            self.udp.start()

    def _accepted(self, user: socket.socket, mapping: PortMapping) -> None:
        user.setblocking(False)
        self.transport.user_arrived()
        if self.waiting or not self._carry(user, mapping):
            self._enqueue(user, mapping)

    def _flow(self, flow: Flow) -> None:
        """A datagram from a new address on a public UDP port."""
        self.transport.user_arrived()
        if self.waiting or not self._carry_flow(flow):
            self._enqueue(None, flow.mapping, flow)

    def _enqueue(self, user: socket.socket | None, mapping: PortMapping, flow: Flow | None = None) -> None:
        entry = Waiting(user, mapping, flow)
        if len(self.waiting) >= self.config.channel_size:
            self._warn.warning("overflow", "refused %s: %d connections already wait for the tunnel (channel_size)",
                               entry.user, len(self.waiting))
            entry.close()
            return
        entry.timer = self.reactor.call_later(USER_WAIT, self._expire, entry)
        if flow is not None:  # a flow closed while it waits (made room for another) leaves the queue
            flow.on_closed = lambda _f: self._leave(entry)
        self.waiting.append(entry)

    def _leave(self, entry: Waiting) -> None:
        try:
            self.waiting.remove(entry)
        except ValueError:
            return
        if entry.timer is not None:
            entry.timer.cancel()

    def _expire(self, entry: Waiting) -> None:
        try:
            self.waiting.remove(entry)
        except ValueError:
            return
        self._warn.warning("expired", "closed %s: no tunnel connection within %g s", entry.user, USER_WAIT)
        entry.close()

    def link_available(self) -> None:
        """The transport has a new link: hand it to the oldest waiting user; reactor thread."""
        while self.waiting:
            entry = self.waiting[0]
            if entry.flow is not None:
                entry.flow.on_closed = None
                carried = self._carry_flow(entry.flow)
                if not carried:
                    entry.flow.on_closed = lambda _f, e=entry: self._leave(e)
            else:
                assert entry.sock is not None
                carried = self._carry(entry.sock, entry.mapping)
            if not carried:
                return
            self.waiting.popleft()
            assert entry.timer is not None
            entry.timer.cancel()

    def _carry(self, user: socket.socket, mapping: PortMapping) -> bool:
        """Send ``user`` through a ready link; False when there is none. A user that cannot be
        carried (gone before its PROXY header could be made) is closed here and counts as done."""
        user_addr: tuple[str, int] | None = None
        if self.config.proxy_protocol:
            try:
                user_addr = user.getpeername()[:2]
            except OSError as exc:
                self._warn.warning("proxy", "closed user connection on port %d: no PROXY header can be "
                                   "made, it is gone (%s)", mapping.listen_port, exc.strerror or exc)
                user.close()
                return True
        while True:
            link = self.transport.take_link()
            if link is None:
                return False
            try:
                proxy = encode_proxy_v2(user_addr, link.peer()) if user_addr else b""
            except OSError:
                link.close()  # the link died while it waited: try the next one
                continue
            if not link.send_header(mapping.target, proxy):
                link.close()
                continue
            if log.isEnabledFor(logging.DEBUG):
                log.debug("user %s on port %d -> tunnel, target %s", peer_of(user), mapping.listen_port,
                          mapping.target)
            self.relays.add(link.attach(user, self.relays.discard))
            return True

    def _carry_flow(self, flow: Flow) -> bool:
        """Send a UDP flow through a ready link; False when there is none."""
        while True:
            link = self.transport.take_link()
            if link is None:
                return False
            relay = link.attach_flow(flow, self.relays.discard, self.transport.rtt_ms)
            if relay is None:
                link.close()
                continue
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> tunnel, target %s", flow.name, flow.mapping.target)
            self.relays.add(relay)
            return True

    def close(self) -> None:
        """Stop everything this server owns; reactor thread (or before start)."""
        for listener, _ in self.listeners:
            listener.close()
        self.listeners.clear()
        while self.waiting:
            self.waiting.popleft().close()
        for relay in list(self.relays):
            relay.abort()
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        self.transport.close()
