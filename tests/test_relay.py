"""The relay on its own, in this process: every path it has (splice and copy) must pass the same
conformance cases on real loopback TCP sockets."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from backhaul.relay import splice as relay_module
from backhaul.reactor import Reactor
from backhaul.relay.splice import Relay

pytestmark = pytest.mark.timeout(60)
MODES = ["splice", "copy"] if relay_module.HAS_SPLICE else ["copy"]


def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    outer = socket.create_connection(listener.getsockname()[:2], timeout=10)
    inner, _ = listener.accept()
    return outer, inner


class Bench:
    """A reactor plus a factory of relayed connections: user <-> [relay] <-> target."""

    def __init__(self, mode: str, workers: int = 4) -> None:
        self.mode = mode
        self.reactor = Reactor(workers)
        self.reactor.start()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = []
        self.closed = threading.Semaphore(0)

    def connection(self) -> tuple[socket.socket, socket.socket]:
        user, near = tcp_pair(self.listener)
        far, target = tcp_pair(self.listener)
        self.sockets += [user, target]
        relay = Relay(self.reactor, near, far, on_close=lambda _r: self.closed.release(), mode=self.mode)
        self.reactor.call_soon(relay.start)
        user.settimeout(10)
        target.settimeout(10)
        return user, target

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.listener.close()
        self.reactor.stop()
        self.reactor.close()


@pytest.fixture(params=MODES)
def bench(request) -> Iterator[Bench]:
    b = Bench(request.param)
    yield b
    b.close()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def send_and_finish(sock: socket.socket, data: bytes) -> threading.Thread:
    def run() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_one_byte_each_way(bench):
    user, target = bench.connection()
    user.sendall(b"x")
    assert target.recv(10) == b"x"
    target.sendall(b"y")
    assert user.recv(10) == b"y"


@pytest.mark.parametrize("size", [1 << 20, 32 << 20])
def test_bulk_both_ways_at_once_is_exact(bench, size):
    user, target = bench.connection()
    up = random.Random(1).randbytes(size)
    down = random.Random(2).randbytes(size // 3)
    senders = [send_and_finish(user, up), send_and_finish(target, down)]
    got = {}
    readers = [threading.Thread(target=lambda: got.__setitem__("up", read_all(target))),
               threading.Thread(target=lambda: got.__setitem__("down", read_all(user)))]
    for t in readers:
        t.start()
    for t in senders + readers:
        t.join(30)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
    assert bench.closed.acquire(timeout=5), "relay did not close after both directions ended"


def test_half_close_carries_fin_and_keeps_the_other_way_open(bench):
    user, target = bench.connection()
    user.sendall(b"request")
    user.shutdown(socket.SHUT_WR)
    assert read_all(target) == b"request"  # EOF reached the target
    target.sendall(b"late answer")       # the other way still works
    assert user.recv(100) == b"late answer"
    target.shutdown(socket.SHUT_WR)
    assert user.recv(100) == b""
    assert bench.closed.acquire(timeout=5)


def test_half_close_from_the_target_side(bench):
    user, target = bench.connection()
    target.sendall(b"banner")
    target.shutdown(socket.SHUT_WR)
    assert read_all(user) == b"banner"
    user.sendall(b"still talking")
    assert target.recv(100) == b"still talking"


def test_close_wakes_a_blocked_reader(bench):
    user, target = bench.connection()
    woke = threading.Event()

    def blocked() -> None:
        assert target.recv(10) == b""
        woke.set()

    thread = threading.Thread(target=blocked)
    thread.start()
    time.sleep(0.05)  # let it block in recv
    user.close()
    thread.join(5)
    assert woke.is_set()


def test_reset_closes_the_other_side(bench):
    user, target = bench.connection()
    user.sendall(b"x")
    assert target.recv(1) == b"x"
    user.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    user.close()
    try:
        assert target.recv(10) == b""
    except ConnectionResetError:
        pass
    assert bench.closed.acquire(timeout=5)


def test_slow_reader_gets_everything_once_it_reads(bench):
    user, target = bench.connection()
    data = random.Random(3).randbytes(8 << 20)
    sender = send_and_finish(user, data)
    time.sleep(0.5)  # the target reads nothing: buffers fill, the relay must wait for it
    assert hashlib.sha256(read_all(target)).digest() == hashlib.sha256(data).digest()
    sender.join(10)


def test_threads_do_not_grow_with_connections(bench):
    before = threading.active_count()
    pairs = [bench.connection() for _ in range(200)]
    for user, _ in pairs:
        user.sendall(b"ping")
    for _, target in pairs:
        assert target.recv(4) == b"ping"
    # one reactor thread and at most the pool's four workers, whatever the number of connections
    assert threading.active_count() <= before + 4
