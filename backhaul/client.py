"""What every client transport shares: the reconnect loop and the dialing of targets.

One thread per client waits on the server (dial, handshake, retry_interval pauses) so the
reactor never blocks; everything after the handshake runs on the reactor and the pool.
"""

from __future__ import annotations

import logging
import socket
import threading

from backhaul.config import ClientConfig
from backhaul.errors import BackhaulError, ProtocolError
from backhaul.log import Throttle
from backhaul.net import dial, tune
from backhaul.protocol.target import resolve_target
from backhaul.reactor import Reactor
from backhaul.resolver import Resolver
from backhaul.transport import client_connect
from backhaul.tunnel.core import ClientLink, ClientSession, Relaying
from backhaul.udp import FLOWS, ConnectedPeer, open_udp

log = logging.getLogger("backhaul.client")


class Client:
    """Keeps one session with the server up, forever, and carries the links it is handed."""

    def __init__(self, config: ClientConfig, reactor: Reactor) -> None:
        self.config = config
        self.reactor = reactor
        self.resolver = Resolver(reactor)
        self.connect = client_connect(config.transport)
        self.relays: set[Relaying] = set()
        self.flows: set[Relaying] = set()
        self._unwatch = FLOWS.watch(lambda: [(("client",), len(self.flows))])
        self.session: ClientSession | None = None
        self._stopping = threading.Event()
        self._ended = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._target_errors = Throttle(log)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="backhaul-client", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        cfg = self.config
        while not self._stopping.is_set():
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
            self.reactor.call_soon(self._begin, session)
            log.info("connected to server %s: control channel up", cfg.remote_addr)
            if cfg.token_is_default:
                log.warning("the default token is in use; set token on both sides")
            while not self._ended.wait(cfg.heartbeat):
                pass
            if not self._stopping.is_set():
                self._stopping.wait(cfg.retry_interval)

    def _begin(self, session: ClientSession) -> None:
        if self._stopping.is_set():
            session.close("", notify=True)
            return
        self.session = session
        session.start()

    def session_ended(self, session: ClientSession, reason: str) -> None:
        """Called by the session once it closed; reactor thread."""
        if self.session is session:
            self.session = None
        if reason and not self._stopping.is_set():
            log.warning("lost the server %s: %s; reconnecting in %d s", self.config.remote_addr, reason,
                        self.config.retry_interval)
        self._ended.set()

    def carry(self, link: ClientLink, target: str) -> None:
        """Dial the target a link was assigned to and relay between them; reactor thread."""
        cfg = self.config
        wanted = cfg.forward_target(target)
        try:
            host, port = resolve_target(wanted)
        except ProtocolError as exc:
            self._target_failed(str(exc))
            link.close()
            return

        def dialed(sock: socket.socket | None, error: str) -> None:
            if sock is None:
                self._target_failed(f"target {wanted} unreachable: {error}")
                link.close()
                return
            tune(sock, nodelay=True, keepalive=cfg.keepalive_period)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tunnel link -> target %s (%s:%d)", target, host, port)
            self.relays.add(link.attach(sock, self.relays.discard))

        dial(self.reactor, self.resolver, host, port, cfg.dial_timeout, dialed)

    def carry_flow(self, link: ClientLink, target: str) -> None:
        """Open a UDP socket to the target of a UDP flow and relay datagrams; reactor thread."""
        cfg = self.config
        wanted = cfg.forward_target(target)
        try:
            host, port = resolve_target(wanted)
        except ProtocolError as exc:
            self._target_failed(str(exc))
            link.close()
            return

        def opened(sock: socket.socket | None, error: str) -> None:
            if sock is None:
                self._target_failed(f"UDP target {wanted} unusable: {error}")
                link.close()
                return
            peer = ConnectedPeer(self.reactor, sock, f"UDP target {wanted}")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tunnel UDP flow -> target %s (%s:%d)", target, host, port)
            self.flows.add(link.attach_flow(peer, self.flows.discard))

        open_udp(self.reactor, self.resolver, host, port, cfg.dial_timeout, opened)

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
        self._unwatch()
        self._closed.set()
