"""What every client transport shares: the reconnect loop and the dialing of targets.

One thread per client waits on the server (dial, handshake, retry_interval pauses) so the
reactor never blocks; everything after the handshake runs on the reactor and the pool.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from backhaul.config import ClientConfig, changed_keys
from backhaul.errors import BackhaulError, ProtocolError
from backhaul.log import RetryLog, Throttle
from backhaul.net import dial, tune
from backhaul.protocol.target import resolve_target
from backhaul.reactor import Reactor
from backhaul.resolver import Resolver
from backhaul.transport import client_connect
from backhaul.tunnel.core import ClientFlowLink, ClientLink, ClientSession, Relaying
from backhaul.tunnel.port import RECONNECTS
from backhaul.udp.sockets import FLOWS, ConnectedPeer, open_udp
from backhaul.usage import Usage

log = logging.getLogger("backhaul.client")

# Keys a reload applies without a new session (read for each connection or each attempt); a
# change of any other ends the session (0x03 to the server) and connects again at once.
LIVE_KEYS = frozenset({"forwarder", "dial_timeout", "retry_interval", "log_level", "web_port", "web_addr",
                       "sniffer", "sniffer_log", "drain_timeout", "pprof", "skip_optz", "failback_idle"})


class Attempt:
    """The client as a session with one of its servers sees it: that server's config (the
    address every link of the session dials), and the client's reactor, resolver and carrying."""

    __slots__ = ("client", "config", "reactor", "resolver")

    def __init__(self, client: Client, config: ClientConfig) -> None:
        self.client = client
        self.config = config
        self.reactor = client.reactor
        self.resolver = client.resolver

    def carry(self, link: ClientLink, target: str) -> None:
        self.client.carry(link, target)

    def carry_flow(self, link: ClientFlowLink, target: str) -> None:
        self.client.carry_flow(link, target)

    def session_ended(self, session: ClientSession, reason: str) -> None:
        self.client.session_ended(session, reason)


class Client:
    """Keeps one session with a server up, forever, and carries the links it is handed. With
    several servers (remote_addr a list) it uses the first that answers, goes on with the next
    when a session ends, and returns to an earlier one that answers again once no user has
    been carried for failback_idle seconds."""

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
        self.server = ""             # the address of the session's server
        self.usage = Usage("client", user_side=False)
        self.on_change = on_change   # the session came up or ended; reactor thread
        self.draining = False
        self._generation = 0         # bumped by a reload that needs a new session
        self._watched: ClientSession | None = None   # the session the supervising thread waits on
        self._end_reason = ""
        self._carrying = 0           # targets being dialed for links
        self._quiet_since = time.monotonic()   # the last time a user came or went
        self._stopping = threading.Event()
        self._ended = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._target_errors = Throttle(log)
        self._retries = RetryLog(log)   # "cannot connect to server": the first, the last, a few between

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="backhaul-client", daemon=True)
        self._thread.start()

    # --- the supervising thread ---------------------------------------------------------------
    def _supervise(self) -> None:
        connected = 0
        last = ""         # the server of the last session, and why it was left
        left = ""
        first = 0         # where the next round of attempts begins
        rested: tuple[int, float] | None = None   # a server whose session just ended, and when
        while not self._stopping.is_set():
            cfg, generation = self.config, self._generation
            found = self._round(cfg, generation, first, rested)
            rested = None
            if found is None:
                if not self._stopping.is_set() and generation == self._generation:
                    self._stopping.wait(cfg.retry_interval)
                first = 0
                continue
            index, session = found
            addr = cfg.servers[index].addr
            self._retries.settle()
            if last and addr != last:
                log.warning("switched from server %s to server %s: %s", last, addr, left)
            self._watch(session, generation, addr)
            log.info("connected to server %s: control channel up", addr)
            connected += 1
            if connected > 1:
                RECONNECTS.inc(1, "client")
            if cfg.token_is_default:
                log.warning("the default token is in use; set token on both sides")
            while True:   # a fail-back hands over to a session that is up already
                back = self._hold(generation, index)
                if back is None:
                    break
                index, waited = back
                log.warning("switched from server %s to server %s: %s answers again and no user was carried "
                            "for %d s (failback_idle)", addr, cfg.servers[index].addr, cfg.servers[index].addr,
                            waited)
                addr = cfg.servers[index].addr
                log.info("connected to server %s: control channel up", addr)
                connected += 1
                RECONNECTS.inc(1, "client")
            reloaded = generation != self._generation
            why = self._end_reason or ("a reload changed the settings" if reloaded else "closed")
            last, left = addr, f"the session with {addr} ended ({why})"
            if self._stopping.is_set() or reloaded:
                first = 0
            else:   # the next one at once; this one again only after retry_interval
                first = (index + 1) % len(cfg.servers)
                rested = (index, time.monotonic() + self.config.retry_interval)
        self._retries.settle()

    def _round(self, cfg: ClientConfig, generation: int, first: int,
               rested: tuple[int, float] | None) -> tuple[int, ClientSession] | None:
        """Try each server once, in order from ``first``: the first session made, or None. The
        server of ``rested`` is tried no sooner than its time (its session just ended)."""
        count = len(cfg.servers)
        for step in range(count):
            index = (first + step) % count
            if rested is not None and rested[0] == index:
                self._stopping.wait(max(0.0, rested[1] - time.monotonic()))
                cfg = self.config   # live keys changed meanwhile apply to this attempt
            if self._stopping.is_set() or generation != self._generation:
                return None
            addr = cfg.servers[index].addr
            then = f"trying server {cfg.servers[(index + 1) % count].addr}" if step + 1 < count \
                else f"retrying in {cfg.retry_interval} s"
            try:
                return index, self.connect(Attempt(self, cfg.for_server(index)))
            except BackhaulError as exc:
                self._retries.warning(addr, "cannot connect to server %s: %s; %s", addr, exc, then)
            except Exception:  # a bug must not end the reconnect loop of a service
                log.exception("unexpected error while connecting to %s; %s", addr, then)
        return None

    def _watch(self, session: ClientSession, generation: int, addr: str) -> None:
        """Wait on ``session`` from now on and start it on the reactor."""
        self._watched = session
        self._ended.clear()
        self.reactor.call_soon(self._begin, session, generation, addr)

    def _hold(self, generation: int, index: int) -> tuple[int, int] | None:
        """Wait while the session with ``servers[index]`` runs. Meanwhile, once no user has been
        carried for failback_idle seconds, try the servers before it: the index of the one it
        failed back to (its session running already) and the failback_idle it waited, or None
        when the session ended. Read anew each time: a reload changes failback_idle at once."""
        while True:
            cfg = self.config
            fail_back = index > 0 and cfg.failback_idle > 0
            if self._ended.wait(min(cfg.retry_interval, cfg.failback_idle) if fail_back else cfg.heartbeat):
                return None
            if not fail_back or generation != self._generation or self.quiet_for() < cfg.failback_idle:
                continue
            for better in range(index):
                try:
                    session = self.connect(Attempt(self, cfg.for_server(better)))
                except BackhaulError as exc:
                    log.debug("server %s does not answer yet: %s", cfg.servers[better].addr, exc)
                    continue
                except Exception:
                    log.exception("unexpected error while connecting to %s", cfg.servers[better].addr)
                    continue
                if self._hand_over(session, generation, cfg.servers[better].addr, cfg.failback_idle):
                    return better, cfg.failback_idle
                break   # a user came meanwhile: stay, and try again once it is quiet

    def _hand_over(self, session: ClientSession, generation: int, addr: str, quiet: int) -> bool:
        """Move to ``session`` if the client is still quiet, judged on the reactor thread where
        users arrive; else close it. True when moved."""
        moved: list[bool] = []
        done = threading.Event()

        def swap() -> None:
            try:
                if self._stopping.is_set() or generation != self._generation or self.session is None \
                        or self.quiet_for() < quiet:
                    session.close("", notify=True)
                    moved.append(False)
                    return
                old = self.session
                self._watched = session   # the old one's end is no end of the watch
                old.close("", notify=True)
                self._begin(session, generation, addr)
                moved.append(True)
            finally:
                done.set()

        self.reactor.call_soon(swap)
        while not done.wait(0.5):
            if self._stopping.is_set():
                return False
        return moved[0]

    # --- the reactor thread -------------------------------------------------------------------
    def _begin(self, session: ClientSession, generation: int, addr: str) -> None:
        if self._stopping.is_set() or generation != self._generation:
            # stopped, or reloaded while this one was dialed with the old settings
            session.close("", notify=True)
            return
        self.session = session
        self.server = addr
        session.start()
        if self.on_change is not None:
            self.on_change()

    def session_ended(self, session: ClientSession, reason: str) -> None:
        """Called by the session once it closed; reactor thread."""
        current = self.session is session
        if current:
            self.session = None
            if self.on_change is not None:
                self.on_change()
        if session is not self._watched:
            return   # left on purpose for another (fail-back)
        self._end_reason = reason
        if reason and current and not self._stopping.is_set():
            then = f"reconnecting in {self.config.retry_interval} s" if len(self.config.servers) == 1 \
                else "trying the next server"
            log.warning("lost the server %s: %s; %s", self.server, reason, then)
        self._ended.set()

    def quiet_for(self) -> float:
        """Seconds since the last user came or went, 0 while one is carried (any thread)."""
        if self.relays or self.flows or self._carrying:
            return 0.0
        return time.monotonic() - self._quiet_since

    def tunnel_peer(self) -> str:
        """The server's address while the control channel is up, else ""."""
        return self.server if self.session is not None else ""

    def describe(self) -> str:
        cfg = self.config
        addr = self.server or cfg.remote_addr
        if len(cfg.servers) == 1:
            return f"{cfg.transport} to server {addr}"
        return f"{cfg.transport} to server {addr} (failover: {', '.join(r.addr for r in cfg.servers)})"

    def peers(self) -> list[dict[str, object]]:
        """Each server of remote_addr in order, whether the session is with it, and the
        connections and bytes it carried."""
        current = self.tunnel_peer()
        counted = self.usage.client_snapshot()
        none = {"active": 0, "total": 0, "bytes_to_target": 0, "bytes_to_user": 0}
        return [{"server": remote.addr, "state": "in use" if remote.addr == current else "standby",
                 **counted.get(remote.addr, none)} for remote in self.config.servers]

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
        self._user_came()

        def dialed(sock: socket.socket | None, error: str) -> None:
            self._user_went()
            if sock is None:
                self._target_failed(f"target {wanted} unreachable: {error}")
                self.usage.target_failed(str(port), error)
                self.usage.refused("target_unreachable")
                link.close()
                return
            tune(sock, nodelay=True, keepalive=cfg.keepalive_period)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tunnel link -> target %s (%s:%d)", target, host, port)
            relay = link.attach(sock, self._relay_closed)
            if not relay.closed:
                self.relays.add(relay)
            self.usage.opened(str(port), relay, self.server)

        dial(self.reactor, self.resolver, host, port, cfg.dial_timeout, dialed)

    def _user_came(self) -> None:
        """A link brought a user: its target is being dialed."""
        self._carrying += 1
        self._quiet_since = time.monotonic()

    def _user_went(self) -> None:
        """The dial of a target ended: a relay runs now, or the user was turned away."""
        self._carrying -= 1
        self._quiet_since = time.monotonic()

    def _relay_closed(self, relay: Relaying) -> None:
        self.relays.discard(relay)
        self.usage.closed(relay)
        self._quiet_since = time.monotonic()

    def carry_flow(self, link: ClientFlowLink, target: str) -> None:
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
        self._user_came()

        def opened(sock: socket.socket | None, error: str) -> None:
            self._user_went()
            if sock is None:
                self._target_failed(f"UDP target {wanted} unusable: {error}")
                self.usage.target_failed(str(port), error)
                self.usage.refused("target_unreachable")
                link.close()
                return
            peer = ConnectedPeer(self.reactor, sock, f"UDP target {wanted}")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tunnel UDP flow -> target %s (%s:%d)", target, host, port)
            relay = link.attach_flow(peer, self._flow_closed)
            if not relay.closed:
                self.flows.add(relay)
            self.usage.opened(str(port), relay, self.server)

        open_udp(self.reactor, self.resolver, host, port, cfg.dial_timeout, opened)

    def _flow_closed(self, relay: Relaying) -> None:
        self.flows.discard(relay)
        self.usage.closed(relay)
        self._quiet_since = time.monotonic()

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
