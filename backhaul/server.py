"""What every server transport shares: the public port listeners, the queue of user
connections waiting for the tunnel (3 s, bounded by channel_size) and the running relays.

A transport supplies links; ``Server`` decides which user connection gets one.
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
from backhaul.tunnel.core import Relaying
from backhaul.usage import Usage

log = logging.getLogger("backhaul.server")

USER_WAIT = 3.0     # a user connection not matched with a tunnel link by then is closed
# Keys a reload applies without touching the tunnel; a change of any other restarts it.
LIVE_KEYS = frozenset({"ports", "proxy_protocol", "log_level", "web_port", "web_addr", "sniffer", "sniffer_log",
                       "drain_timeout", "pprof", "skip_optz"})

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


class Waiting:
    """A user connection that has no tunnel link yet."""

    __slots__ = ("sock", "mapping", "timer")

    def __init__(self, sock: socket.socket, mapping: PortMapping) -> None:
        self.sock = sock
        self.mapping = mapping
        self.timer: Timer | None = None


class Server:
    """Public listeners plus the pairing of user connections with the transport's links."""

    name = "server"

    def __init__(self, config: ServerConfig, reactor: Reactor) -> None:
        self.config = config
        self.reactor = reactor
        self.transport = server_transport(config.transport, self)
        self.ports: dict[Address, PublicPort] = {}
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.relays: set[Relaying] = set()
        self.usage = Usage("server", user_side=True)
        self._warn = Throttles(log)
        self._unwatch = WAITING.watch(lambda: len(self.waiting))

    def open(self) -> None:
        """Bind the tunnel port and every public port; TransportError names the first that fails."""
        try:
            self.transport.open()
            for mapping in self.config.ports:
                self.ports[mapping.listen_addr] = self._listen(mapping, self.config)
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

    def tunnel_peer(self) -> str:
        """The client's address while a control channel is up, else ""."""
        return self.transport.peer()

    def describe(self) -> str:
        cfg = self.config
        return f"{cfg.transport} tunnel port {cfg.bind_host}:{cfg.bind_port}, {len(self.ports)} public ports"

    # --- reload -------------------------------------------------------------------------------
    def prepare(self, new: ServerConfig) -> Callable[[], None]:
        """Bind the public ports ``new`` adds (TransportError names the first that fails, and
        nothing changed); returns the step that applies ``new``, to run on the reactor thread."""
        added: dict[Address, PublicPort] = {}
        old = {mapping.listen_addr for mapping in self.config.ports}
        try:
            for mapping in new.ports:
                if mapping.listen_addr not in old:
                    added[mapping.listen_addr] = self._listen(mapping, new)
        except TransportError:
            for port in added.values():
                port.listener.close()
            raise
        return lambda: self._apply(new, added)

    def _apply(self, new: ServerConfig, added: dict[Address, PublicPort]) -> None:
        """Reactor thread: swap the mappings, stop removed ports (their relays run on), start
        added ones, and restart the tunnel when a key that defines it changed."""
        old, self.config = self.config, new
        wanted = {mapping.listen_addr: mapping for mapping in new.ports}
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
        self.transport = server_transport(self.config.transport, self)
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

    def _enqueue(self, user: socket.socket, mapping: PortMapping) -> None:
        if len(self.waiting) >= self.config.channel_size:
            self._warn.warning("overflow", "refused user connection %s on port %d: %d connections already "
                               "wait for the tunnel (channel_size)", peer_of(user), mapping.listen_port,
                               len(self.waiting))
            self.usage.refused("channel_size")
            user.close()
            return
        WAITS.inc()
        entry = Waiting(user, mapping)
        entry.timer = self.reactor.call_later(USER_WAIT, self._expire, entry)
        self.waiting.append(entry)

    def _expire(self, entry: Waiting) -> None:
        try:
            self.waiting.remove(entry)
        except ValueError:
            return
        self._warn.warning("expired", "closed user connection %s on port %d: no tunnel connection within "
                           "%g s", peer_of(entry.sock), entry.mapping.listen_port, USER_WAIT)
        self.usage.refused("no_tunnel")
        entry.sock.close()

    def link_available(self) -> None:
        """The transport has a new link: hand it to the oldest waiting user; reactor thread."""
        while self.waiting:
            entry = self.waiting[0]
            if not self._carry(entry.sock, entry.mapping):
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
                self.usage.refused("gone")
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
            relay = link.attach(user, self._relay_closed)
            if not relay.closed:
                self.relays.add(relay)
            self.usage.opened(str(mapping.listen_port), relay)
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
        while self.waiting:
            entry = self.waiting.popleft()
            if entry.timer is not None:
                entry.timer.cancel()
            self.usage.refused("stopping")
            entry.sock.close()

    def close(self) -> None:
        """Stop everything this server owns; reactor thread (or before start)."""
        self.stop_accepting()
        for relay in list(self.relays):
            relay.abort()
        self.transport.close()
        self.usage.close()
        self._unwatch()
