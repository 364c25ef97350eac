"""The server's link pool follows its users over a slow path (tcp, ws, wss): real processes, the
client dialing the server through a fault proxy that holds every chunk ``DELAY`` seconds, so a
link asked for arrives that much later. A burst of users makes the pool grow past
``connection_pool``; after it the server closes the idle links it no longer needs until both sides
are back at ``connection_pool``, and the client, which only forgets a link the server closed,
dials none back. The pool's time constants run at a quarter of their length (hidden setting).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import random
import threading
import time

import pytest

from backhaul.tunnel.pool import TIMESCALE_ENV
from tests.exposition import parse_exposition, sample
from tests.faultproxy import FaultProxy
from tests.harness import (
    HOST,
    Launcher,
    Service,
    Tunnel,
    client_toml,
    connect,
    echo_works,
    free_port,
    http_get,
    recv_exact,
)

POOL = 4            # connection_pool on both sides
DELAY = 0.15        # s each way between the client and the server
USERS = 40          # users at once during the burst
BURST = 4.0         # s
PAYLOAD = 2048


def idle_links(web: int, side: str) -> int:
    return int(sample(parse_exposition(http_get(web, "/metrics")[2]), "backhaul_pool_idle_links", side=side))


def user_loop(port: int, seed: int, until: float) -> int:
    """Short connections one after another until ``until``, each an exact echo; how many."""
    rng = random.Random(seed)
    done = 0
    while time.monotonic() < until:
        payload = rng.randbytes(PAYLOAD)
        with connect(port, timeout=15) as sock:
            sock.sendall(payload)
            got = recv_exact(sock, len(payload))
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), f"user {seed}: echo differs"
        done += 1
    return done


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["tcp", "ws", "wss"])
def test_the_pool_grows_under_a_burst_and_shrinks_back_after_it(launcher: Launcher, echo_service: Service,
                                                                  transport: str) -> None:
    server_web, client_web = free_port(), free_port()
    tunnel = Tunnel(launcher, [str(echo_service.port)], transport=transport,
                    server_extra={"web_port": server_web, "connection_pool": POOL})
    tunnel.server = launcher.start("server", tunnel.server_text, env={TIMESCALE_ENV: "0.25"})
    tunnel.wait_listening()
    with FaultProxy(tunnel.bind_port) as proxy:
        proxy.delay(DELAY)
        tunnel.remote_addr = f"{HOST}:{proxy.port}"
        tunnel.client_text = client_toml(proxy.port, tunnel.token, transport=transport, connection_pool=POOL,
                                         web_port=client_web)
        tunnel.start_client()
        tunnel.wait_connected(timeout=20)
        server, client = tunnel.server, tunnel.client
        assert client is not None

        # the burst, watched from the server's status page
        peak = 0
        burst_over = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not burst_over.wait(0.1):
                peak = max(peak, idle_links(server_web, "server"))

        watcher = threading.Thread(target=watch, name="pool-watch")
        watcher.start()
        try:
            until = time.monotonic() + BURST
            with concurrent.futures.ThreadPoolExecutor(max_workers=USERS) as users:
                futures = [users.submit(user_loop, tunnel.public[0], seed, until) for seed in range(USERS)]
                served = sum(future.result(timeout=60) for future in futures)
        finally:
            burst_over.set()
            watcher.join(10)
        assert served >= USERS
        # One link asked for per user (Go's policy) keeps at most connection_pool idle; asking
        # ahead of users that come faster than links arrive holds more.
        assert peak >= 2 * POOL, f"{transport}: at most {peak} idle links during the burst"

        # after it: back to connection_pool on both sides, the client dialing none back
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            sides = (idle_links(server_web, "server"), idle_links(client_web, "client"))
            if sides == (POOL, POOL):
                break
            time.sleep(0.2)
        assert sides == (POOL, POOL), f"{transport}: idle links (server, client) {sides}, 40 s after the burst"
        time.sleep(1.0)
        assert idle_links(client_web, "client") <= POOL + 1, "the client dialed back the links the server closed"

        proxy.delay(0.0)
        echo_works(tunnel.public[0], size=200_000, seed=99)
        # (checked before the proxy goes, which ends the control channel)
        for proc in (server, client):
            assert "Traceback" not in proc.log(), proc.log()
        assert not client.lines("lost the server"), client.log()
        assert not server.lines("idle already (channel_size)"), server.log()
