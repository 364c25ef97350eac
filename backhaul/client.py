"""What every client transport shares: the reconnect loop and the dialing of targets.

One thread per client waits on the server (dial, handshake, retry_interval pauses) so the
reactor never blocks; everything after the handshake runs on the reactor and the pool.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from backhaul.config import ClientConfig, changed_keys
from backhaul.errors import BackhaulError, ProtocolError
from backhaul.log import Throttle
from backhaul.net import dial, tune
from backhaul.protocol.target import resolve_target
from backhaul.reactor import Reactor
from backhaul.resolver import Resolver
from backhaul.transport import client_connect
from backhaul.tunnel.core import ClientLink, ClientSession, Relaying
from backhaul.tunnel.port import RECONNECTS
from backhaul.udp import FLOWS, ConnectedPeer, open_udp
from backhaul.usage import Usage

log = logging.getLogger("backhaul.client")

# Keys a reload applies without a new session (read for each connection or each attempt); a
# change of any other ends the session (0x03 to the server) and connects again at once.
LIVE_KEYS = frozenset({"forwarder", "dial_timeout", "retry_interval", "log_level", "web_port", "web_addr",
                       "sniffer", "sniffer_log", "drain_timeout", "pprof", "skip_optz"})


class Client:
    """Keeps one session with the server up, forever, and carries the links it is handed."""

    name = "client"

    def __init__(self, config: ClientConfig, reactor: Reactor,
                 on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.resolver = Resolver(reactor)
        self.connect = client_connect(config.transport)
        self.relays: set[Relaying] = set()
        self.flows: set[Relaying] = set()
        self._unwatch = FLOWS.watch(lambda: [(("client",), len(self.flows))])
        self.session: ClientSession | None = None
        self.usage = Usage("client", user_side=False)
        self.on_change = on_change   # the session came up or ended; reactor thread
        self.draining = False
        self._generation = 0         # bumped by a reload that needs a new session
        self._stopping = threading.Event()
        self._ended = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._target_errors = Throttle(log)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="backhaul-client", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        connected = 0
        while not self._stopping.is_set():
            cfg, generation = self.config, self._generation
            try:
                session = self.connect(self)
            except BackhaulError as exc:
                log.warning("cannot connect to server %s: %s; retrying in %d s", cfg.remote_addr, exc,
                            cfg.retry_interval)
                self._stopping.wait(cfg.retry_interval)
                continue
            except Exception:  # a bug must not end the reconnect loop of a service
                log.exception("unexpected error while connecting to %s; retrying in %d s",
                              cfg.remote_addr, cfg.retry_interval)
                self._stopping.wait(cfg.retry_interval)
                continue
            self._ended.clear()
            self.reactor.call_soon(self._begin, session, generation)
            log.info("connected to server %s: control channel up", cfg.remote_addr)
            connected += 1
            if connected > 1:
                RECONNECTS.inc(1, "client")
            if cfg.token_is_default:
                log.warning("the default token is in use; set token on both sides")
            while not self._ended.wait(cfg.heartbeat):
                pass
            if not self._stopping.is_set() and generation == self._generation:
                self._stopping.wait(self.config.retry_interval)

    def _begin(self, session: ClientSession, generation: int) -> None:
        if self._stopping.is_set() or generation != self._generation:
            # stopped, or reloaded while this one was dialed with the old settings
            session.close("", notify=True)
            return
        self.session = session
        session.start()
        if self.on_change is not None:
            self.on_change()

    def session_ended(self, session: ClientSession, reason: str) -> None:
        """Called by the session once it closed; reactor thread."""
        if self.session is session:
            self.session = None
            if self.on_change is not None:
                self.on_change()
        if reason and not self._stopping.is_set():
            log.warning("lost the server %s: %s; reconnecting in %d s", self.config.remote_addr, reason,
                        self.config.retry_interval)
        self._ended.set()

    def tunnel_peer(self) -> str:
        """The server's address while the control channel is up, else ""."""
        return self.config.remote_addr if self.session is not None else ""

    def describe(self) -> str:
        return f"{self.config.transport} to server {self.config.remote_addr}"

    def reload(self, new: ClientConfig) -> None:
        """Apply a new config: live keys at once; any other change ends the session (0x03 to the
        server) and connects again with the new settings. Relays keep running. Any thread."""
        changed = [key for key in changed_keys(self.config, new) if key not in LIVE_KEYS]
        if changed:
            self.connect = client_connect(new.transport)
            self._generation += 1
        self.config = new
        if changed:
            log.info("starting a new session with the server: %s changed", ", ".join(changed))
            self.reactor.call_soon(self._end_session)

    def _end_session(self) -> None:
        if self.session is not None:
            self.session.close("", notify=True)

    def carry(self, link: ClientLink, target: str) -> None:
        """Dial the target a link was assigned to and relay between them; reactor thread."""
        if self.draining:
            self.usage.refused("stopping")
            link.close()
            return
        cfg = self.config
        wanted = cfg.forward_target(target)
        try:
            host, port = resolve_target(wanted)
        except ProtocolError as exc:
            self._target_failed(str(exc))
            self.usage.refused("bad_target")
            link.close()
            return

        def dialed(sock: socket.socket | None, error: str) -> None:
            if sock is None:
                self._target_failed(f"target {wanted} unreachable: {error}")
                self.usage.refused("target_unreachable")
                link.close()
                return
            tune(sock, nodelay=True, keepalive=cfg.keepalive_period)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tunnel link -> target %s (%s:%d)", target, host, port)
            relay = link.attach(sock, self._relay_closed)
            if not relay.closed:
                self.relays.add(relay)
            self.usage.opened(str(port), relay)

        dial(self.reactor, self.resolver, host, port, cfg.dial_timeout, dialed)

    def _relay_closed(self, relay: Relaying) -> None:
        self.relays.discard(relay)
        self.usage.closed(relay)

    def carry_flow(self, link: ClientLink, target: str) -> None:
        """Open a UDP socket to the target of a UDP flow and relay datagrams; reactor thread."""
        if self.draining:
            self.usage.refused("stopping")
            link.close()
            return
        cfg = self.config
        wanted = cfg.forward_target(target)
        try:
            host, port = resolve_target(wanted)
        except ProtocolError as exc:
            self._target_failed(str(exc))
            self.usage.refused("bad_target")
            link.close()
            return

        def opened(sock: socket.socket | None, error: str) -> None:
            if sock is None:
                self._target_failed(f"UDP target {wanted} unusable: {error}")
                self.usage.refused("target_unreachable")
                link.close()
                return
            peer = ConnectedPeer(self.reactor, sock, f"UDP target {wanted}")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tunnel UDP flow -> target %s (%s:%d)", target, host, port)
            relay = link.attach_flow(peer, self._flow_closed)
            if not relay.closed:
                self.flows.add(relay)
            self.usage.opened(str(port), relay)

        open_udp(self.reactor, self.resolver, host, port, cfg.dial_timeout, opened)

    def _flow_closed(self, relay: Relaying) -> None:
        self.flows.discard(relay)
        self.usage.closed(relay)

    def _target_failed(self, message: str) -> None:
        self._target_errors.warning("%s", message)

    def stop(self, timeout: float = 1.5) -> None:
        """Send the closing signal, close every socket and end the reconnect loop."""
        self._stopping.set()
        self._ended.set()
        self.reactor.call_soon(self._close_all)
        self._closed.wait(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        self.resolver.close()

    def _close_all(self) -> None:
        if self.session is not None:
            self.session.close("", notify=True)
        for relay in [*self.relays, *self.flows]:
            relay.abort()
        self.usage.close()
        self._unwatch()
        self._closed.set()
