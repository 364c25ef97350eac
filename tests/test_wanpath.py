"""The bench's emulated long path (bench/wanpath.py) does what it says: bytes cross it intact, a
configured loss drops about that share, and nothing crosses faster than the configured delay.
Behaviour only, never a speed; skipped without root, TUN devices or `ip`."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import wanpath  # noqa: E402  (a bench module: the bench directory is its package root)
from common import in_netns, stop_all  # noqa: E402

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(bool(wanpath.unavailable()), reason=f"emulated path: {wanpath.unavailable()}")]

DELAY_MS = 15
PORT = 9000  # inside fresh namespaces of this test: nothing else there can hold it
PEER_TIMEOUT = 30

# Inline peers, each run inside one namespace; each ends by itself (timeouts), prints one JSON line.
TCP_SINK = """
import hashlib, json, socket, sys
listener = socket.create_server(("198.18.0.2", int(sys.argv[1])))
listener.settimeout(30)
print("READY", flush=True)
conn, _ = listener.accept()
conn.settimeout(30)
digest, size = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    digest.update(chunk)
    size += len(chunk)
print(json.dumps({"sha256": digest.hexdigest(), "size": size}), flush=True)
"""

TCP_SENDER = """
import json, random, socket, sys, time
data = random.Random(int(sys.argv[2])).randbytes(int(sys.argv[3]))
started = time.monotonic()
sock = socket.create_connection(("198.18.0.2", int(sys.argv[1])), timeout=30)
connected = time.monotonic() - started
sock.sendall(data)
sock.close()
print(json.dumps({"connect_ms": connected * 1e3}), flush=True)
"""

UDP_COUNTER = """
import json, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
sock.bind(("198.18.0.2", int(sys.argv[1])))
print("READY", flush=True)
sock.settimeout(30)          # for the first datagram; then a second of silence ends the count
order = []
try:
    while True:
        order.append(int(sock.recv(2048).split(b" ")[0]))
        sock.settimeout(1.0)
except TimeoutError:
    pass
print(json.dumps({"received": len(set(order)), "in_order": order == sorted(set(order))}), flush=True)
"""

UDP_SENDER = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
addr = ("198.18.0.2", int(sys.argv[1]))
pad = b" " * int(sys.argv[3])
pause = float(sys.argv[4])
for n in range(int(sys.argv[2])):
    sock.sendto(str(n).encode() + pad, addr)
    if n % 20 == 19:
        time.sleep(pause)
"""


PEERS: list[subprocess.Popen[str]] = []


@pytest.fixture
def path() -> Iterator[wanpath.WanPath]:
    with wanpath.namespaces(f"t{PORT}") as (ns_a, ns_b):
        try:
            with wanpath.WanPath(ns_a, ns_b, delay_ms=DELAY_MS, rate_mbit=50, loss=0.0, queue_ms=50) as emulated:
                yield emulated
        finally:
            while PEERS:   # a failed test's peers too
                proc = PEERS.pop()
                proc.kill()
                proc.communicate(timeout=10)
            stop_all()


def peer(path: wanpath.WanPath, side: str, script: str, *args: object) -> subprocess.Popen[str]:
    netns = path.ns_a if side == "a" else path.ns_b
    argv = in_netns(netns, [sys.executable, "-c", script, *map(str, args)])
    PEERS.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True))
    return PEERS[-1]


def result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=PEER_TIMEOUT + 10)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def started(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc


def test_bytes_cross_intact_and_no_sooner_than_the_delay(path: wanpath.WanPath) -> None:
    """Catches: a forwarder that corrupts, truncates or loses a packet for good (TCP would hang or
    the hash differ), or one that lets a packet through before its delay (a connect is a round
    trip: SYN one way, SYN-ACK back)."""
    size, seed = 4 << 20, 7
    sink = started(peer(path, "b", TCP_SINK, PORT))
    sender = peer(path, "a", TCP_SENDER, PORT, seed, size)
    sent = result(sender)
    got = result(sink)
    assert got == {"sha256": hashlib.sha256(random.Random(seed).randbytes(size)).hexdigest(), "size": size}
    assert sent["connect_ms"] >= 2 * DELAY_MS, sent
    stats = path.stats()
    assert stats["ab"]["delivered"] > size // 1500 and stats["ba"]["delivered"] > 0, stats
    assert stats["ab"]["lost"] == stats["ba"]["lost"] == 0, stats


def test_a_configured_loss_drops_about_that_share(path: wanpath.WanPath) -> None:
    """Catches: loss not applied, applied to the wrong direction, or miscounted in the stats the
    bench prints each run."""
    count, share = 3000, 0.2
    path.set(ab_loss=share)
    counter = started(peer(path, "b", UDP_COUNTER, PORT))
    sender = peer(path, "a", UDP_SENDER, PORT, count, 0, 0.002)   # well under the rate: only the loss drops
    assert sender.wait(PEER_TIMEOUT) == 0
    got = result(counter)
    received = int(got["received"])
    stats = path.stats()
    assert got["in_order"], got
    # 3000 draws at p = 0.2: the standard deviation is about 22, so 0.15-0.25 is over 6 of them.
    assert 0.15 < 1 - received / count < 0.25, (received, stats)
    assert stats["ab"]["lost"] >= count - received - stats["ab"]["queue_drops"], stats
    assert stats["ba"]["lost"] == 0 and stats["ab"]["loss"] == share and stats["ba"]["loss"] == 0, stats
    assert wanpath.own_drops(stats) == 0, wanpath.describe(stats)


def test_past_its_rate_the_path_drops_at_the_tail_and_never_reorders(path: wanpath.WanPath) -> None:
    """Catches: a rate limit that queues without bound (no drops: the delay would grow with the
    offered load), one that lets a packet pass another that came before it, or a packet left
    waiting in the delay line."""
    count, size = 2000, 1000
    path.set(rate_mbit=2, queue_ms=20)    # 2 Mbit/s: 250 datagrams of 1 kB a second; 20 ms: 5 of them queued
    counter = started(peer(path, "b", UDP_COUNTER, PORT))
    sender = peer(path, "a", UDP_SENDER, PORT, count, size, 0.0)    # as fast as the sender goes
    assert sender.wait(PEER_TIMEOUT) == 0
    got = result(counter)
    stats = path.stats()
    assert got["in_order"], got
    assert stats["ab"]["queue_drops"] > 0 and stats["ab"]["lost"] == 0, wanpath.describe(stats)
    assert int(got["received"]) + stats["ab"]["queue_drops"] <= count, (got, wanpath.describe(stats))
    assert stats["ab"]["queued"] == 0, stats   # everything taken was delivered: nothing stuck in the line
