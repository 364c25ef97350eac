"""The link conformance cases: what every way of carrying a connection must do, whatever joins
its two sockets (a spliced or copying relay, stream relays over a memory stream, a WebSocket or
an smux stream). A test module makes a ``Bench`` (or a subclass whose ``link`` builds its own
kind) and runs every case of ``CASES`` on it.

user <-> [relay(s), and what carries the bytes between them] <-> target, on real loopback sockets.
"""

from __future__ import annotations

import functools
import hashlib
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from backhaul.reactor import Reactor
from backhaul.relay import splice as relay_module
from backhaul.relay.splice import Relay
from backhaul.relay.stream import StreamRelay
from tests.harness import on_reactor, thread_is_sleeping
from tests.memstream import MemoryStream, memory_stream_pair

CAPACITY = 64 * 1024  # memory stream buffer per direction


def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    outer = socket.create_connection(listener.getsockname()[:2], timeout=10)
    inner, _ = listener.accept()
    return outer, inner


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.002)


class Link:
    """One relayed connection: its relays (two back to back in stream mode) and stream ends."""

    def __init__(self, user: socket.socket, target: socket.socket) -> None:
        self.user = user
        self.target = target
        self.relays: list[Relay | StreamRelay] = []
        self.ends: tuple[MemoryStream, MemoryStream] | tuple[()] = ()
        self.close_calls: dict[int, int] = {}  # id(relay) -> on_close calls


class Bench:
    """A reactor plus a factory of relayed connections: user <-> [relay(s)] <-> target."""

    def __init__(self, mode: str, workers: int = 4, capacity: int = CAPACITY) -> None:
        self.mode = mode
        self.capacity = capacity
        self.reactor = Reactor(workers)
        self.reactor.start()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.sockets: list[socket.socket] = []
        self.links: list[Link] = []
        self.open: set[Relay | StreamRelay] = set()  # reactor thread only
        self.closed = threading.Semaphore(0)         # one release per link whose relays all closed

    def link(self) -> Link:
        user, near = tcp_pair(self.listener)
        far, target = tcp_pair(self.listener)
        self.sockets += [user, target]
        link = Link(user, target)
        if self.mode == "stream":
            end_a, end_b = memory_stream_pair(self.reactor, self.capacity)
            link.ends = (end_a, end_b)
            link.relays = [StreamRelay(self.reactor, near, end_a, on_close=lambda r: self._on_close(link, r)),
                           StreamRelay(self.reactor, far, end_b, on_close=lambda r: self._on_close(link, r))]
        else:
            link.relays = [Relay(self.reactor, near, far, on_close=lambda r: self._on_close(link, r), mode=self.mode)]
        self.links.append(link)
        self.reactor.call_soon(self._start, link)
        user.settimeout(10)
        target.settimeout(10)
        return link

    def connection(self) -> tuple[socket.socket, socket.socket]:
        link = self.link()
        return link.user, link.target

    def _start(self, link: Link) -> None:
        for relay in link.relays:
            self.open.add(relay)
            relay.start()

    def _on_close(self, link: Link, relay: Relay | StreamRelay) -> None:
        self.open.discard(relay)
        link.close_calls[id(relay)] = link.close_calls.get(id(relay), 0) + 1
        if link.close_calls[id(relay)] == 1 and len(link.close_calls) == len(link.relays):
            self.closed.release()

    def on_reactor(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the reactor thread and return its result."""
        return on_reactor(self.reactor, fn, *args)

    def all_closed(self, link: Link) -> bool:
        return self.on_reactor(lambda: len(link.close_calls) == len(link.relays))

    def toward_target_is_stuck_or_done(self, link: Link) -> bool:
        """Nothing more can move toward the target until it reads (or everything went)."""
        if self.mode == "stream":
            relay = link.relays[1]
            return self.on_reactor(lambda: relay.down_buffered > 0 or relay.down_ended or relay.closed)
        relay = link.relays[0]
        return self.on_reactor(lambda: relay.ab.state in (relay_module.WANT_WRITE, relay_module.EOF))

    def close(self) -> None:
        def abort_all() -> None:
            for relay in list(self.open):
                relay.abort()

        self.on_reactor(abort_all)
        # a splice relay whose direction sits in a worker closes once the worker hands it back
        wait_until(lambda: self.on_reactor(lambda: not self.open), "every relay to close")
        for sock in self.sockets:
            sock.close()
        self.listener.close()
        self.reactor.stop()
        self.reactor.close()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_until_closed(sock: socket.socket) -> int:
    """Bytes read until EOF or a reset."""
    total = 0
    try:
        while data := sock.recv(1 << 20):
            total += len(data)
    except ConnectionResetError:
        pass
    return total


def send_and_finish(sock: socket.socket, data: bytes) -> threading.Thread:
    def run() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def send_until_broken(sock: socket.socket, data: bytes) -> threading.Thread:
    def run() -> None:
        try:
            sock.sendall(data)
        except OSError:  # the relay closed the other side under us: expected
            pass

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# ------------------------------------------------------------------------------------------------
# the cases

def one_byte_each_way(bench: Bench) -> None:
    user, target = bench.connection()
    user.sendall(b"x")
    assert target.recv(10) == b"x"
    target.sendall(b"y")
    assert user.recv(10) == b"y"


def bulk_both_ways_at_once_is_exact(bench: Bench, size: int) -> None:
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


def half_close_carries_fin_and_keeps_the_other_way_open(bench: Bench) -> None:
    user, target = bench.connection()
    user.sendall(b"request")
    user.shutdown(socket.SHUT_WR)
    assert read_all(target) == b"request"  # EOF reached the target
    target.sendall(b"late answer")       # the other way still works
    assert user.recv(100) == b"late answer"
    target.shutdown(socket.SHUT_WR)
    assert user.recv(100) == b""
    assert bench.closed.acquire(timeout=5)


def half_close_from_the_target_side(bench: Bench) -> None:
    user, target = bench.connection()
    target.sendall(b"banner")
    target.shutdown(socket.SHUT_WR)
    assert read_all(user) == b"banner"
    user.sendall(b"still talking")
    assert target.recv(100) == b"still talking"


def close_wakes_a_blocked_reader(bench: Bench) -> None:
    user, target = bench.connection()
    woke = threading.Event()
    reading = threading.Event()

    def blocked() -> None:
        reading.set()
        assert target.recv(10) == b""
        woke.set()

    thread = threading.Thread(target=blocked)
    thread.start()
    assert reading.wait(5)
    wait_until(lambda: thread_is_sleeping(thread), "the reader to block in recv")
    user.close()
    thread.join(5)
    assert woke.is_set()


def reset_closes_the_other_side(bench: Bench) -> None:
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


def slow_reader_gets_everything_once_it_reads(bench: Bench) -> None:
    link = bench.link()
    data = random.Random(3).randbytes(8 << 20)
    sender = send_and_finish(link.user, data)
    # the target reads nothing: buffers fill, the relay must wait for it
    wait_until(lambda: bench.toward_target_is_stuck_or_done(link), "the relay to wait for the target")
    assert hashlib.sha256(read_all(link.target)).digest() == hashlib.sha256(data).digest()
    sender.join(10)


def threads_do_not_grow_with_connections(bench: Bench) -> None:
    before = threading.active_count()
    pairs = [bench.connection() for _ in range(200)]
    for user, _ in pairs:
        user.sendall(b"ping")
    for _, target in pairs:
        assert target.recv(4) == b"ping"
    # one reactor thread and at most the pool's four workers, whatever the number of connections
    assert threading.active_count() <= before + 4


CASES: list[tuple[str, Callable[[Any], None]]] = [
    ("one_byte", one_byte_each_way),
    ("1MiB_both_ways", functools.partial(bulk_both_ways_at_once_is_exact, size=1 << 20)),
    ("32MiB_both_ways", functools.partial(bulk_both_ways_at_once_is_exact, size=32 << 20)),
    ("half_close_user", half_close_carries_fin_and_keeps_the_other_way_open),
    ("half_close_target", half_close_from_the_target_side),
    ("close_wakes_reader", close_wakes_a_blocked_reader),
    ("reset", reset_closes_the_other_side),
    ("slow_reader", slow_reader_gets_everything_once_it_reads),
    ("threads", threads_do_not_grow_with_connections),
]
