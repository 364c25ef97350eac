"""What every server transport shares: the public port listeners, the queue of user
connections waiting for the tunnel (3 s, bounded by channel_size) and the running relays.

A transport supplies links; ``Server`` decides which user connection gets one. A UDP flow
(accept_udp on tcp, every port on udp) waits in the same queue and takes a link the same way.
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Callable

from backhaul.config import PortMapping, ServerConfig, changed_keys
from backhaul.errors import TransportError
from backhaul.listener import Listener
from backhaul.log import Throttles
from backhaul.metrics import METRICS
from backhaul.net import listen, peer_of, tune
from backhaul.protocol.proxy_v2 import encode_proxy_v2
from backhaul.reactor import Reactor, Timer
from backhaul.transport import server_transport
from backhaul.tunnel.core import Relaying, ServerRow
from backhaul.udp.ports import Flow, UdpPorts, open_ports
from backhaul.usage import Usage

log = logging.getLogger("backhaul.server")

USER_WAIT = 3.0     # a user connection not matched with a tunnel link by then is closed
# Keys a reload applies without touching the tunnel; a change of any other restarts it.
LIVE_KEYS = frozenset({"ports", "proxy_protocol", "log_level", "web_port", "web_addr", "sniffer", "sniffer_log",
                       "drain_timeout", "pprof", "skip_optz", "accept_udp", "udp_max_flows"})

WAITS = METRICS.counter("backhaul_pool_waits_total", "User connections that found no ready tunnel link and "
                        "waited for one.")
WAITING = METRICS.gauge("backhaul_pool_waiting", "User connections waiting for a tunnel link now.")

Address = tuple[str, int]


class PublicPort:
    """One public listener and the mapping it serves now (a reload may change the target)."""

    __slots__ = ("listener", "mapping")

    def __init__(self, listener: Listener, mapping: PortMapping) -> None:
        self.listener = listener
        self.mapping = mapping


def uses_udp(cfg: ServerConfig) -> bool:
    """The public ports carry UDP: every one on udp, each beside its TCP one with accept_udp."""
    return cfg.transport == "udp" or (cfg.accept_udp and cfg.transport == "tcp")


def tcp_mappings(cfg: ServerConfig) -> tuple[PortMapping, ...]:
    return cfg.ports if cfg.transport != "udp" else ()


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

    name = "server"

    def __init__(self, config: ServerConfig, reactor: Reactor) -> None:
        self.config = config
        self.reactor = reactor
        self._use(server_transport(config.transport, self))
        self.ports: dict[Address, PublicPort] = {}
        self.udp: UdpPorts | None = None
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.relays: set[Relaying] = set()
        self.usage = Usage("server", user_side=True)
        self._warn = Throttles(log)
        self._unwatch = WAITING.watch(lambda: len(self.waiting))

    def _use(self, row: ServerRow) -> None:
        """The transport's tunnel port, and where the users and the flows take their links."""
        self.transport = row.transport
        self.user_links = row.users
        self.flow_links = row.flows

    def open(self) -> None:
        """Bind the tunnel port and every public port; TransportError names the first that fails."""
        cfg = self.config
        try:
            self.transport.open()
            if uses_udp(cfg):
                self.udp = open_ports(self.reactor, cfg, self._flow)
            elif cfg.accept_udp:
                log.warning("accept_udp has no effect with transport %s (only tcp carries it)", cfg.transport)
            for mapping in tcp_mappings(cfg):
                self.ports[mapping.listen_addr] = self._listen(mapping, cfg)
        except TransportError:
            self.close()
            raise

    def _listen(self, mapping: PortMapping, cfg: ServerConfig) -> PublicPort:
        sock = listen(*mapping.listen_addr, mss=cfg.mss, rcvbuf=cfg.so_rcvbuf)
        tune(sock, nodelay=cfg.nodelay)  # users inherit it
        name = "port {}:{}".format(*mapping.listen_addr)
        # The mapping is read when a user arrives: a reload that changes it applies to the next one.
        listener = Listener(self.reactor, sock, name, lambda s, _a: self._accepted(s, port.mapping))
        port = PublicPort(listener, mapping)
        return port

    def start(self) -> None:
        """Start accepting; reactor thread only."""
        self.transport.start()
        for port in self.ports.values():
            port.listener.start()
            log.info("forwarding %s:%d -> client target %s", *port.mapping.listen_addr, port.mapping.target)
        if self.udp is not None:
            self.udp.start()

    def tunnel_peer(self) -> str:
        """The client's address while a control channel is up, else ""."""
        return self.transport.peer()

    def describe(self) -> str:
        cfg = self.config
        return f"{cfg.transport} tunnel port {cfg.bind_host}:{cfg.bind_port}, {len(self.ports)} public ports"

    def peers(self) -> list[dict[str, object]]:
        """Each client address: its control channels and links ready (none once it left), and
        the connections and bytes its links carried; for the status page."""
        counted = self.usage.client_snapshot()
        rows = []
        for row in self.transport.describe_clients():
            row.update(counted.pop(str(row["client"]), {"active": 0, "total": 0, "bytes_to_target": 0,
                                                         "bytes_to_user": 0}))
            rows.append(row)
        for address, numbers in counted.items():   # left; their connections may still run
            rows.append({"client": address, "channels": [], "idle_links": 0, "rtt_ms": 0, **numbers})
        return rows

    # --- reload -------------------------------------------------------------------------------
    def prepare(self, new: ServerConfig) -> Callable[[], None]:
        """Bind the public ports ``new`` adds, TCP and UDP (TransportError names the first that
        fails, and nothing changed); returns the step that applies ``new``, on the reactor thread."""
        added: dict[Address, PublicPort] = {}
        udp_added: UdpPorts | None = None
        try:
            for mapping in tcp_mappings(new):
                if mapping.listen_addr not in self.ports:
                    added[mapping.listen_addr] = self._listen(mapping, new)
            if uses_udp(new):
                udp_added = UdpPorts(self.reactor, new, self._flow)
                have = set(self.udp.addresses()) if self.udp is not None else set()
                udp_added.open(tuple(m for m in new.ports if m.listen_addr not in have))
        except TransportError:
            for port in added.values():
                port.listener.close()
            if udp_added is not None:
                udp_added.close()
            raise
        return lambda: self._apply(new, added, udp_added)

    def _apply(self, new: ServerConfig, added: dict[Address, PublicPort], udp_added: UdpPorts | None) -> None:
        """Reactor thread: swap the mappings, stop removed ports (their relays run on; a removed
        UDP port's flows end with it), start added ones, and restart the tunnel when a key that
        defines it changed."""
        old, self.config = self.config, new
        if udp_added is None:
            if self.udp is not None:
                self.udp.close()
                self.udp = None
        elif self.udp is None:
            self.udp = udp_added
            self.udp.start()
        else:
            self.udp.merge(new, udp_added)
        wanted = {mapping.listen_addr: mapping for mapping in tcp_mappings(new)}
        for addr in [addr for addr in self.ports if addr not in wanted]:
            self.ports.pop(addr).listener.close()
            log.info("stopped listening on %s:%d (its open connections finish)", *addr)
        for addr, mapping in wanted.items():
            port = self.ports.get(addr)
            if port is None:
                port = self.ports[addr] = added[addr]
                port.listener.start()
                log.info("forwarding %s:%d -> client target %s", *addr, mapping.target)
            else:
                if port.mapping.target != mapping.target:
                    log.info("forwarding %s:%d -> client target %s (new connections)", *addr, mapping.target)
                port.mapping = mapping
        tunnel = [key for key in changed_keys(old, new) if key not in LIVE_KEYS]
        if tunnel:
            self._restart_tunnel(tunnel)

    def _restart_tunnel(self, keys: list[str]) -> None:
        """The client hears 0x03 and reconnects to the new tunnel; public ports stay open, users
        arriving meanwhile wait for it as during any reconnect, and relays on their own
        connections run on."""
        log.info("restarting the tunnel: %s changed", ", ".join(keys))
        self.transport.close()
        self._use(server_transport(self.config.transport, self))
        try:
            self.transport.open()
        except TransportError as exc:
            log.error("%s; the tunnel is down until the config is fixed and reloaded", exc)
            return
        self.transport.start()

    # --- users ----------------------------------------------------------------------------------
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
            self.usage.refused("channel_size")
            entry.close()
            return
        WAITS.inc()
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
        self.usage.refused("no_tunnel")
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
        if self.user_links is None:
            return False   # no row without users has public TCP ports (tcp_mappings)
        user_addr: tuple[str, int] | None = None
        if self.config.proxy_protocol:
            try:
                user_addr = user.getpeername()[:2]
            except OSError as exc:
                self._warn.warning("proxy", "closed user connection on port %d: no PROXY header can be "
                                   "made, it is gone (%s)", mapping.listen_port, exc.strerror or exc)
                self.usage.refused("gone")
                user.close()
                return True
        while True:
            link = self.user_links.take_link()
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
            relay = link.attach(user, self._relay_closed)
            if not relay.closed:
                self.relays.add(relay)
            self.usage.opened(str(mapping.listen_port), relay, self.transport.client)
            return True

    def _carry_flow(self, flow: Flow) -> bool:
        """Send a UDP flow through a ready link; False when there is none."""
        if self.flow_links is None:
            return False   # no row without flows has public UDP ports (uses_udp)
        while True:
            link = self.flow_links.take_link()
            if link is None:
                return False
            relay = link.attach_flow(flow, self._relay_closed, self.transport.rtt_ms)
            if relay is None:
                link.close()
                continue
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> tunnel, target %s", flow.name, flow.mapping.target)
            self.relays.add(relay)
            self.usage.opened(str(flow.mapping.listen_port), relay, self.transport.client)
            return True

    def _relay_closed(self, relay: Relaying) -> None:
        self.relays.discard(relay)
        self.usage.closed(relay)

    # --- stopping -----------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        """The drain: close the public ports and the users still waiting; relays and the tunnel
        run on. Reactor thread."""
        for port in self.ports.values():
            port.listener.close()
        self.ports.clear()
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        while self.waiting:
            self.usage.refused("stopping")
            self.waiting.popleft().close()

    def close(self) -> None:
        """Stop everything this server owns; reactor thread (or before start)."""
        self.stop_accepting()
        for relay in list(self.relays):
            relay.abort()
        self.transport.close()
        self.usage.close()
        self._unwatch()
