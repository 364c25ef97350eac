"""A thousand reconnect cycles leave no thread, descriptor or memory behind.

Server and client run in this process, on one reactor, the client dialing through a fault proxy;
each cycle resets every tunnel connection and waits until both sides have a new session (the
client's retry_interval is 0 here, which a config cannot say, so cycles take milliseconds, not
seconds). After a warm-up, the counts of threads, open descriptors, Python objects and the RSS
are taken; after the rest of the cycles they must be back where they were (within a small slack
for the allocator). The long form is bench/soak.py.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest

from backhaul.client import Client
from backhaul.config import parse
from backhaul.reactor import Reactor
from backhaul.server import Server
from tests.faultproxy import FaultProxy
from tests.harness import CERTS, HOST, TLS_TRANSPORTS, TRANSPORTS, Service, echo_works, free_port, wait_until

pytestmark = pytest.mark.timeout(180)


CYCLES = {"tcp": 1000}     # the cheapest transport does the full thousand in CI; the others fewer
OTHER_CYCLES = 150
WARM_UP = 50
# smux: a user may ask for one more session than the pool keeps (one thread and one socket on
# each side), so there are 2 or 3 depending on when one looks; a leak would be one per cycle.
SESSION_SLACK = 2
RSS_SLACK = 4 << 20        # bytes the RSS may move (allocator arenas, caches) without a leak
OBJECT_SLACK = 0.02        # share of Python objects likewise


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def snapshot() -> dict[str, int]:
    gc.collect()
    demux = sum(1 for thread in threading.enumerate() if thread.name == "backhaul-demux")
    return {"threads": threading.active_count() - demux, "demux": demux, "fds": fds(), "objects": len(gc.get_objects()),
            "rss": rss()}


class InProcessTunnel:
    """A Server and a Client of ``transport`` on one reactor, the client through ``proxy``."""

    def __init__(self, transport: str, target: int) -> None:
        bind, public = free_port(), free_port()
        self.public = public
        tls = ""
        if transport in TLS_TRANSPORTS:
            cert, key = CERTS.self_signed()
            tls = f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
        self.proxy = FaultProxy(bind, history=0)  # keeps no closed connection: its memory stays flat
        config = parse(f'[server]\nbind_addr = "{HOST}:{bind}"\ntransport = "{transport}"\ntoken = "cycles-token"\n'
                       f'ports = ["{HOST}:{public}={target}"]\nconnection_pool = 2\n{tls}'
                       f'[client]\nremote_addr = "{HOST}:{self.proxy.port}"\ntransport = "{transport}"\n'
                       f'token = "cycles-token"\nconnection_pool = 2\n')
        assert config.server is not None and config.client is not None
        self.reactor = Reactor(workers=4)
        self.server = Server(config.server, self.reactor)
        self.client = Client(dataclasses.replace(config.client, retry_interval=0), self.reactor)

    def start(self) -> None:
        self.server.open()
        self.reactor.start()
        self.reactor.call_soon(self.server.start)
        self.client.start()

    def up(self) -> object:
        """The client's session once both sides have one (the object identifies the cycle)."""
        session = self.client.session
        return session if session is not None and self.server.transport.clients else None  # type: ignore[attr-defined]

    def cycle(self, timeout: float = 10.0) -> None:
        before = wait_until(self.up, timeout, "a session on both sides")
        self.proxy.cut(rst=True)
        self.proxy.heal()
        wait_until(lambda: (s := self.up()) is not None and s is not before, timeout, "a new session",
                   interval=0.002)

    def stop(self) -> None:
        self.client.stop()
        done = threading.Event()
        self.reactor.call_soon(lambda: (self.server.close(), done.set()))
        done.wait(5)
        self.reactor.stop()
        self.reactor.close()
        self.proxy.close()


@pytest.fixture
def quiet() -> Iterator[None]:
    """A thousand cycles are a thousand warnings: keep them out of the test's output."""
    logger = logging.getLogger("backhaul")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def echo_after_cycle(port: int, seed: int, size: int = 10_000) -> None:
    """An echo right after a cycle. A link the dying session dialed while the proxy healed can
    still wait in the server's pool (a tcp or ws link names no session); a user handed it is reset
    when that session closes it, as with the Go program. One reset is that; a second is a fault."""
    try:
        echo_works(port, size=size, seed=seed)
    except ConnectionResetError:
        echo_works(port, size=size, seed=seed)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reconnect_cycles_leave_nothing_behind(echo_service: Service, quiet: None, transport: str) -> None:
    cycles = CYCLES.get(transport, OTHER_CYCLES)
    tunnel = InProcessTunnel(transport, echo_service.port)
    tunnel.start()
    try:
        for _ in range(WARM_UP):
            tunnel.cycle()
        echo_after_cycle(tunnel.public, seed=1, size=50_000)
        time.sleep(0.3)  # the worker pool and the link pool settle to their working size
        warm = snapshot()
        start = time.monotonic()
        for i in range(cycles - WARM_UP):
            tunnel.cycle()
            if i % 100 == 99:
                echo_after_cycle(tunnel.public, seed=i)
        took = time.monotonic() - start
        echo_after_cycle(tunnel.public, seed=2, size=50_000)
        deadline = time.monotonic() + 5
        while True:  # links of the last cycle may still be closing
            after = snapshot()
            if (after["threads"] <= warm["threads"] and after["demux"] <= warm["demux"] + SESSION_SLACK
                    and after["fds"] <= warm["fds"] + 4 + 2 * SESSION_SLACK) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        tunnel.stop()
    print(f"\n{transport}: {cycles} cycles ({took / (cycles - WARM_UP) * 1000:.1f} ms each); after the warm-up "
          f"{warm}; at the end {after}")
    assert after["threads"] <= warm["threads"], (warm, after)
    assert after["demux"] <= warm["demux"] + SESSION_SLACK, (warm, after)
    assert after["fds"] <= warm["fds"] + 4 + 2 * SESSION_SLACK, (warm, after)   # a leak of one per cycle would be hundreds
    assert after["rss"] - warm["rss"] <= RSS_SLACK, (warm, after)
    assert after["objects"] <= warm["objects"] * (1 + OBJECT_SLACK), (warm, after)
