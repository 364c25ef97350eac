"""One running program: a reactor and its pool, plus a server and/or a client on top.

A config with both ``[server]`` and ``[client]`` runs both sides in one process (the demo).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time

from backhaul import memory
from backhaul.client import Client
from backhaul.config import ClientConfig, Config, ServerConfig
from backhaul.errors import TransportError
from backhaul.metrics import METRICS
from backhaul.reactor import Reactor, Timer
from backhaul.relay.splice import MODE as RELAY_MODE
from backhaul.server import Server
from backhaul.status import SideStatus
from backhaul.systemd import Notifier
from backhaul.transport import unavailable
from backhaul.web import WebServer

log = logging.getLogger("backhaul")

# Pumps mostly wait on the kernel; past two per core they only contend for the GIL.
WORKERS = min(16, max(4, 2 * (os.cpu_count() or 1)))
STATUS_EVERY = 5.0     # seconds between checks whether systemd's status line changed
DRAIN_POLL = 0.05      # seconds between looks at the open connections while draining
STOP_ACCEPTING_WAIT = 2.0   # seconds a drain waits for the reactor to close the listeners

METRICS.gauge("backhaul_start_time_seconds", "When the process started, in seconds since the epoch.").watch(
    lambda: _STARTED)
_STARTED = time.time()


def refusals(config: Config) -> list[str]:
    """Settings this version cannot honour: each refused at start with one line."""
    problems = []
    for side in (config.server, config.client):
        if side is None:
            continue
        name = "server" if side is config.server else "client"
        why = unavailable(side.transport)
        if why:
            problems.append(f"{config.source}: {name}.transport: {why}")
    return problems


def raise_open_files_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard one: the server needs two per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class App:
    """Starts, reloads, drains and stops everything a config describes."""

    def __init__(self, config: Config, workers: int = WORKERS, notifier: Notifier | None = None) -> None:
        self.config = config
        self.reactor = Reactor(workers)
        self.notifier = notifier if notifier is not None else Notifier()
        self.server = Server(config.server, self.reactor) if config.server else None
        self.client = Client(config.client, self.reactor, on_change=self._changed) if config.client else None
        self.views = [SideStatus(side, self.reactor) for side in self._sides()]
        self._serving = False      # the public ports accept (server), set on the reactor
        self._ready = False        # READY=1 sent
        self._status = ""
        self._timers: list[Timer] = []

    def _sides(self) -> list[Server | Client]:
        return [side for side in (self.server, self.client) if side is not None]

    def start(self) -> None:
        """Bind every port (TransportError names the one that fails), then run."""
        for side in (self.config.server, self.config.client):
            if side is not None and side.pprof:
                log.info("pprof is accepted for compatibility and has no effect")
        pages: list[WebServer | None] = []
        try:
            if self.server is not None:
                self.server.open()
            for view in self.views:
                cfg = view.side.config
                pages.append(view.open_page(cfg.web_addr, cfg.web_port) if cfg.web_port else None)
        except BaseException:
            for page in pages:
                if page is not None:
                    page.close()
            if self.server is not None:
                self.server.close()
            self.reactor.stop()
            self.reactor.close()
            raise
        log.info("moving bytes with %s", "splice" if RELAY_MODE == "splice" else
                 "recv_into and send (BACKHAUL_RELAY=copy or no splice on this system)")
        memory.start(self.reactor)
        self.reactor.start()
        self.reactor.call_soon(self._begin, pages)
        if self.client is not None:
            self.client.start()

    def _begin(self, pages: list[WebServer | None]) -> None:
        """Reactor thread: accept, serve the pages, and tell systemd once everything is up."""
        if self.server is not None:
            self.server.start()
        self._serving = True
        for view, page in zip(self.views, pages, strict=True):
            view.use(page, _sniffer_log(view.side.config))
        interval = self.notifier.watchdog_interval
        if interval:
            self._watchdog(interval / 2)
        if self.notifier.enabled:
            self._timers.append(self.reactor.call_later(STATUS_EVERY, self._status_tick))
        self._changed()

    # --- systemd ------------------------------------------------------------------------------
    def _watchdog(self, every: float) -> None:
        """Ping from a reactor timer: a wedged reactor runs no timer, so systemd stops hearing us."""
        self.notifier.watchdog()
        self._timers.append(self.reactor.call_later(every, self._watchdog, every))
        del self._timers[:-2]

    def _status_tick(self) -> None:
        self._changed()
        self._timers.append(self.reactor.call_later(STATUS_EVERY, self._status_tick))
        del self._timers[:-2]

    def _changed(self) -> None:
        """A tunnel came up or went down (or time passed): READY=1 once every listener is open
        and the client's control channel is up; STATUS= whenever the summary changes."""
        text = self.summary()
        if not self._ready:
            if self._serving and (self.client is None or self.client.session is not None):
                self._ready = True
                self.notifier.ready(text)
        elif text != self._status:
            self.notifier.status(text)
        self._status = text

    def summary(self) -> str:
        """One line for systemd's status: each side's tunnel and its open connections."""
        parts = []
        for side in self._sides():
            peer = side.tunnel_peer()
            who = "client" if side is self.server else "server"
            state = f"{who} {peer} connected" if peer else f"no {who}"
            parts.append(f"{side.name}: {side.describe()}, {state}, {len(side.relays)} connections open")
        return "; ".join(parts)

    # --- reload -------------------------------------------------------------------------------
    def reload(self, new: Config) -> bool:
        """Apply ``new`` without cutting a connection it does not touch; main thread. False (and
        one line saying why) when it cannot be applied: the running config stays."""
        problems = refusals(new)
        if (new.server is None) != (self.server is None) or (new.client is None) != (self.client is None):
            problems.append(f"{new.source}: a reload cannot add or remove a [server] or [client] section; "
                            "restart the service for that")
        if problems:
            for problem in problems:
                log.error("reload refused: %s; the running config stays", problem)
            return False
        self.notifier.reloading()
        sides: list[ServerConfig | ClientConfig] = [cfg for cfg in (new.server, new.client) if cfg is not None]
        pages: list[WebServer | None] = []
        try:
            apply_server = self.server.prepare(new.server) if self.server is not None and new.server else None
            for view, cfg in zip(self.views, sides, strict=True):
                old = view.side.config
                moved = (cfg.web_addr, cfg.web_port) != (old.web_addr, old.web_port)
                pages.append(view.open_page(cfg.web_addr, cfg.web_port) if cfg.web_port and moved
                             else view.page if cfg.web_port else None)
        except TransportError as exc:
            for page, view in zip(pages, self.views, strict=False):
                if page is not None and page is not view.page:
                    page.close()
            log.error("reload refused: %s; the running config stays", exc)
            self.notifier.ready(self._status)
            return False
        done = threading.Event()

        def apply() -> None:
            try:
                if apply_server is not None:
                    apply_server()
                for view, page, cfg in zip(self.views, pages, sides, strict=True):
                    view.use(page, _sniffer_log(cfg))
            finally:
                done.set()

        self.reactor.call_soon(apply)
        done.wait(5.0)
        if self.client is not None and new.client is not None:
            self.client.reload(new.client)
        self.config = new
        log.info("reloaded %s", new.source)
        self.notifier.ready(self.summary())
        return True

    # --- stopping -----------------------------------------------------------------------------
    def open_connections(self) -> int:
        """User connections being relayed now (any thread)."""
        return sum(len(side.relays) for side in self._sides())

    def drain(self, timeout: float, now: threading.Event) -> None:
        """Stop taking users and let the open connections finish, for up to ``timeout`` seconds
        or until ``now`` is set; main thread. The tunnel stays up meanwhile: the closing signal
        (0x03) goes out in ``stop``, because a peer that hears it ends every relay it carries."""
        self.notifier.stopping(f"draining {self.open_connections()} connections")

        stopped = threading.Event()

        def stop_accepting() -> None:
            if self.server is not None:
                self.server.stop_accepting()
            if self.client is not None:
                self.client.draining = True
            stopped.set()

        self.reactor.call_soon(stop_accepting)
        # The reactor takes it in its next turn: once the line below is out, no user gets in.
        stopped.wait(STOP_ACCEPTING_WAIT)
        open_now = self.open_connections()
        if not open_now or timeout <= 0:
            return
        log.info("no longer accepting; waiting up to %g s for %d open connections to finish (signal again "
                 "to stop now)", timeout, open_now)
        deadline = time.monotonic() + timeout
        while self.open_connections() and not now.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("drain_timeout reached: closing %d connections", self.open_connections())
                return
            now.wait(min(DRAIN_POLL, left))
        if not now.is_set():
            log.info("every connection finished")

    def stop(self, timeout: float = 1.2) -> None:
        """Send the closing signals, close every socket and pipe, stop the threads; within
        ``timeout`` seconds however busy the relays are."""
        deadline = time.monotonic() + timeout
        self.notifier.stopping("stopping")
        if self.client is not None:
            self.client.stop(timeout / 3)
        done = threading.Event()

        def close_server() -> None:
            for timer in self._timers:
                timer.cancel()
            for view in self.views:
                view.close()
            if self.server is not None:
                self.server.close()
            done.set()

        self.reactor.call_soon(close_server)
        done.wait(max(0.0, deadline - time.monotonic() - timeout / 3))
        # Workers finish their current run before the pipes they splice through are closed.
        self.reactor.stop(max(0.1, deadline - time.monotonic()))
        self.reactor.close()
        self.notifier.close()


def _sniffer_log(cfg: ServerConfig | ClientConfig) -> str:
    return cfg.sniffer_log if cfg.sniffer else ""
