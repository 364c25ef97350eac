"""What every server transport shares: the public port listeners, the queue of user
connections waiting for the tunnel (3 s, bounded by channel_size) and the running relays.

A transport supplies tunnel links; ``Server`` decides which user connection gets one.
"""

from __future__ import annotations

import collections
import logging
import socket

from backhaul.config import PortMapping, ServerConfig
from backhaul.errors import TransportError
from backhaul.log import Throttle
from backhaul.net import listen, peer_of, tune
from backhaul.reactor import READ, Reactor, Timer
from backhaul.relay.splice import Relay
from backhaul.transport import ServerTransport, server_transport

log = logging.getLogger("backhaul.server")

USER_WAIT = 3.0     # a user connection not matched with a tunnel link by then is closed
ACCEPT_BATCH = 64   # accepts per readiness event, so one busy port cannot starve the others


class Waiting:
    """A user connection that has no tunnel link yet."""

    __slots__ = ("sock", "mapping", "timer")

    def __init__(self, sock: socket.socket, mapping: PortMapping, timer: Timer) -> None:
        self.sock = sock
        self.mapping = mapping
        self.timer = timer


class Server:
    """Public listeners plus the pairing of user connections with the transport's links."""

    def __init__(self, config: ServerConfig, reactor: Reactor) -> None:
        self.config = config
        self.reactor = reactor
        self.transport: ServerTransport = server_transport(self)
        self.listeners: list[tuple[socket.socket, PortMapping]] = []
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.relays: set[Relay] = set()
        self._overflow = Throttle(log)
        self._expired = Throttle(log)

    def open(self) -> None:
        """Bind the tunnel port and every public port; TransportError names the first that fails."""
        cfg = self.config
        try:
            self.transport.open()
            for mapping in cfg.ports:
                sock = listen(*mapping.listen_addr, mss=cfg.mss, rcvbuf=cfg.so_rcvbuf)
                self.listeners.append((sock, mapping))
        except TransportError:
            self.close()
            raise

    def start(self) -> None:
        """Start accepting; reactor thread only."""
        self.transport.start()
        for sock, mapping in self.listeners:
            self.reactor.watch(sock, READ, lambda _m, s=sock, p=mapping: self._accept(s, p))
        for _, mapping in self.listeners:
            log.info("forwarding %s:%d -> client target %s", *mapping.listen_addr, mapping.target)

    def _accept(self, listener: socket.socket, mapping: PortMapping) -> None:
        cfg = self.config
        for _ in range(ACCEPT_BATCH):
            try:
                user, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: say so, keep the other ports running
                log.error("accept on %s:%d failed: %s", *mapping.listen_addr, exc.strerror or exc)
                return
            user.setblocking(False)
            tune(user, nodelay=cfg.nodelay)
            self.transport.user_arrived()
            if self.waiting or not self.transport.carry(user, mapping):
                self._enqueue(user, mapping)

    def _enqueue(self, user: socket.socket, mapping: PortMapping) -> None:
        if len(self.waiting) >= self.config.channel_size:
            self._overflow.warning("refused user connection %s on port %d: %d connections already "
                                   "wait for the tunnel (channel_size)", peer_of(user),
                                   mapping.listen_port, len(self.waiting))
            user.close()
            return
        entry = Waiting(user, mapping, None)  # type: ignore[arg-type]
        entry.timer = self.reactor.call_later(USER_WAIT, self._expire, entry)
        self.waiting.append(entry)

    def _expire(self, entry: Waiting) -> None:
        try:
            self.waiting.remove(entry)
        except ValueError:
            return
        self._expired.warning("closed user connection %s on port %d: no tunnel connection within %g s",
                              peer_of(entry.sock), entry.mapping.listen_port, USER_WAIT)
        entry.sock.close()

    def link_available(self) -> None:
        """The transport has a new link: hand it to the oldest waiting user; reactor thread."""
        while self.waiting:
            entry = self.waiting[0]
            if not self.transport.carry(entry.sock, entry.mapping):
                return
            self.waiting.popleft()
            entry.timer.cancel()

    def relay(self, user: socket.socket, link: socket.socket) -> None:
        """Start relaying a paired user connection; reactor thread only."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("user %s -> tunnel link %s", peer_of(user), peer_of(link))
        relay = Relay(self.reactor, user, link, on_close=self.relays.discard)
        self.relays.add(relay)
        relay.start()

    def close(self) -> None:
        """Stop everything this server owns; reactor thread (or before start)."""
        for sock, _ in self.listeners:
            self.reactor.forget(sock)
            sock.close()
        self.listeners.clear()
        while self.waiting:
            entry = self.waiting.popleft()
            entry.timer.cancel()
            entry.sock.close()
        for relay in list(self.relays):
            relay.abort()
        self.transport.close()
