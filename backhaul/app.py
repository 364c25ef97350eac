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
from backhaul.config import Config
from backhaul.reactor import Reactor
from backhaul.relay.splice import MODE as RELAY_MODE
from backhaul.server import Server
from backhaul.transport import unavailable

log = logging.getLogger("backhaul")

# Pumps mostly wait on the kernel; past two per core they only contend for the GIL.
WORKERS = min(16, max(4, 2 * (os.cpu_count() or 1)))


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
        if side.sniffer or side.web_port:
            problems.append(f"{config.source}: {name}.sniffer/web_port: the status page is not "
                            "available in this version yet")
    if config.server is not None and config.server.accept_udp:
        problems.append(f"{config.source}: server.accept_udp: UDP over the tunnel is not available "
                        "in this version yet")
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
    """Starts and stops everything a config describes."""

    def __init__(self, config: Config, workers: int = WORKERS) -> None:
        self.config = config
        self.reactor = Reactor(workers)
        self.server = Server(config.server, self.reactor) if config.server else None
        self.client = Client(config.client, self.reactor) if config.client else None

    def start(self) -> None:
        """Bind every port (TransportError names the one that fails), then run."""
        for side in (self.config.server, self.config.client):
            if side is not None and side.pprof:
                log.info("pprof is accepted for compatibility and has no effect")
        if self.server is not None:
            try:
                self.server.open()
            except BaseException:
                self.reactor.stop()
                self.reactor.close()
                raise
        log.info("moving bytes with %s", "splice" if RELAY_MODE == "splice" else
                 "recv_into and send (BACKHAUL_RELAY=copy or no splice on this system)")
        memory.start(self.reactor)
        self.reactor.start()
        if self.server is not None:
            self.reactor.call_soon(self.server.start)
        if self.client is not None:
            self.client.start()

    def stop(self, timeout: float = 1.2) -> None:
        """Send the closing signals, close every socket and pipe, stop the threads; within
        ``timeout`` seconds however busy the relays are."""
        deadline = time.monotonic() + timeout
        if self.client is not None:
            self.client.stop(timeout / 3)
        if self.server is not None:
            done = threading.Event()

            def close_server() -> None:
                assert self.server is not None
                self.server.close()
                done.set()

            self.reactor.call_soon(close_server)
            done.wait(max(0.0, deadline - time.monotonic() - timeout / 3))
        # Workers finish their current run before the pipes they splice through are closed.
        self.reactor.stop(max(0.1, deadline - time.monotonic()))
        self.reactor.close()
