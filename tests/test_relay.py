"""The relay on its own, in this process: every path it has must pass the same conformance cases
on real loopback TCP sockets. ``splice`` and ``copy`` join two sockets; ``stream`` runs the same
cases through two stream relays back to back over an in-memory stream pair:
user <-> StreamRelay <-> memory stream A ... B <-> StreamRelay <-> target."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from backhaul.pipes import SMALL, Pipe, PipePool
from backhaul.reactor import Reactor, Timer
from backhaul.relay import splice as relay_module
from backhaul.relay.splice import Relay
from backhaul.relay.stream import READ_CHUNK, Stream, StreamListener, StreamRelay
from tests.harness import thread_is_sleeping
from tests.memstream import MemoryStream, memory_stream_pair

pytestmark = pytest.mark.timeout(60)
MODES = [*(["splice", "copy"] if relay_module.HAS_SPLICE else ["copy"]), "stream"]
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
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(fn(*args))
            except BaseException as exc:  # handed to the caller, who raises it
                box.append(exc)
            finally:
                done.set()

        self.reactor.call_soon(run)
        assert done.wait(10), "the reactor did not run a call"
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

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


@pytest.fixture(params=MODES)
def bench(request) -> Iterator[Bench]:
    b = Bench(request.param)
    yield b
    b.close()


@pytest.fixture
def stream_bench(request) -> Iterator[Bench]:
    b = Bench("stream", capacity=getattr(request, "param", CAPACITY))
    yield b
    b.close()


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
# conformance: every mode

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
    link = bench.link()
    data = random.Random(3).randbytes(8 << 20)
    sender = send_and_finish(link.user, data)
    # the target reads nothing: buffers fill, the relay must wait for it
    wait_until(lambda: bench.toward_target_is_stuck_or_done(link), "the relay to wait for the target")
    assert hashlib.sha256(read_all(link.target)).digest() == hashlib.sha256(data).digest()
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



# ------------------------------------------------------------------------------------------------
# the pinned budget: stalled directions pay for it, not the ones whose receiver reads

class RecordingPipes(PipePool):
    """The pipe pool, noting every bite it grants (from any thread)."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget=budget)
        self.bites: list[int] = []

    def bite(self, pipe: Pipe, *dst: socket.socket) -> int:
        size = super().bite(pipe, *dst)
        self.bites.append(size)
        return size


@pytest.mark.skipif(not relay_module.HAS_SPLICE, reason="the budget is of pipes")
def test_stalled_readers_holding_the_budget_leave_full_bites_to_a_reader_that_reads():
    """Twelve downloads whose users never read pin the pipe budget; a thirteenth, whose user
    reads, still splices most of its bytes a pipe's worth at a time (and gets them all, intact).
    Catches: a spent budget shrinking every direction to 64 KiB bites, stalled or not, so a crowd
    of slow readers slows every healthy download down."""
    bench = Bench("splice")
    budget = 2 << 20
    pipes = RecordingPipes(budget)
    bench.reactor.pipes.close()
    bench.reactor.pipes = pipes
    senders = []
    try:
        probe = pipes.get()
        full = probe.size
        pipes.put(probe)
        if full <= SMALL:
            pytest.skip("the kernel gives no pipe larger than a small bite")
        endless = bytes(24 << 20)
        stalled = [bench.link() for _ in range(12)]
        for link in stalled:   # downloads that nobody reads
            senders.append(send_until_broken(link.target, endless))

        def settled() -> bool:
            return all(bench.on_reactor(lambda r=link.relays[0]: r.ba.state == relay_module.WANT_WRITE)
                       for link in stalled)

        wait_until(lambda: settled() and pipes.pinned >= budget, "the stalled downloads to pin the budget", 30)
        pipes.bites.clear()
        healthy = bench.link()
        data = random.Random(5).randbytes(48 << 20)
        senders.append(send_and_finish(healthy.target, data))
        assert hashlib.sha256(read_all(healthy.user)).digest() == hashlib.sha256(data).digest()
        assert pipes.pinned >= budget, "the stalled downloads no longer hold the budget"
        spliced = sum(pipes.bites)
        in_full_bites = sum(size for size in pipes.bites if size == full)
        assert in_full_bites >= spliced / 2, (
            f"{in_full_bites} of {spliced} bytes in {full}-byte bites; bites: {sorted(set(pipes.bites))}")
    finally:
        bench.close()
        for sender in senders:
            sender.join(10)

# ------------------------------------------------------------------------------------------------
# the stream relay and the memory stream

class Sampler:
    """Samples, on the reactor thread every millisecond, how many bytes a stream link holds."""

    def __init__(self, bench: Bench, link: Link, sender: int) -> None:
        self.bench = bench
        self.send_relay = link.relays[sender]          # reads the sending socket
        self.recv_relay = link.relays[1 - sender]      # writes to the socket that does not read
        self.channel = link.ends[sender].outbound
        self.peak_send = self.peak_recv = self.peak_total = 0
        self.timer: Timer | None = None
        self.stopped = False
        bench.reactor.call_soon(self._tick)

    def _tick(self) -> None:
        if self.stopped:
            return
        held_send = self.send_relay.buffered
        held_recv = self.recv_relay.buffered
        self.peak_send = max(self.peak_send, held_send)
        self.peak_recv = max(self.peak_recv, held_recv)
        self.peak_total = max(self.peak_total, held_send + self.channel.buffered + held_recv)
        self.timer = self.bench.reactor.call_later(0.001, self._tick)

    def stuck(self) -> bool:
        """Every stage full: the receiving relay holds bytes, the stream is at capacity and the
        sending relay holds what the stream refused (so it no longer reads its socket)."""
        return self.bench.on_reactor(lambda: self.recv_relay.down_buffered > 0
                                     and self.channel.buffered == self.channel.capacity
                                     and self.send_relay.up_buffered > 0)

    def stop(self) -> None:
        def stop() -> None:
            self.stopped = True
            if self.timer is not None:
                self.timer.cancel()

        self.bench.on_reactor(stop)


@pytest.mark.parametrize("stream_bench", [CAPACITY, 1 << 20], indirect=True, ids=["64k", "1m"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_stream_backpressure_is_bounded(stream_bench, direction):
    capacity = stream_bench.capacity
    link = stream_bench.link()
    src, dst, sender = (link.user, link.target, 0) if direction == "up" else (link.target, link.user, 1)
    data = random.Random(4).randbytes(64 << 20)
    sampler = Sampler(stream_bench, link, sender)
    thread = send_and_finish(src, data)

    wait_until(sampler.stuck, "every stage between the sockets to fill")
    taken = stream_bench.on_reactor(lambda: sampler.send_relay.up_bytes)
    assert taken < 32 << 20, "the relay kept reading although nothing could go on"
    time.sleep(0.2)  # not a synchronisation: nothing may move while the receiver does not read
    assert thread.is_alive(), "sendall finished although the receiver reads nothing"
    assert stream_bench.on_reactor(lambda: sampler.send_relay.up_bytes) == taken

    got = read_all(dst)
    thread.join(10)
    sampler.stop()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # each relay holds at most one read, the stream at most its capacity
    assert sampler.peak_send <= READ_CHUNK
    assert sampler.peak_recv <= READ_CHUNK
    assert sampler.channel.peak <= capacity
    assert sampler.peak_send + sampler.channel.peak <= capacity + READ_CHUNK
    assert sampler.peak_total <= capacity + 2 * READ_CHUNK


def test_stream_deeper_than_a_relay_run_is_exact():
    """A stream that buffers more than one relay run reads (ROUNDS x READ_CHUNK): the relay must
    come back for the rest by itself, the stream owes it no second stream_readable."""
    bench = Bench("stream", capacity=4 << 20)
    try:
        user, target = bench.connection()
        up = random.Random(5).randbytes(16 << 20)
        down = random.Random(6).randbytes(16 << 20)
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
        assert bench.closed.acquire(timeout=5)
    finally:
        bench.close()


def test_stream_failed_mid_transfer_closes_the_sockets_and_calls_on_close_once(stream_bench):
    link = stream_bench.link()
    sender = send_until_broken(link.user, os.urandom(32 << 20))
    received = 0
    while received < 1 << 20:
        received += len(link.target.recv(1 << 20))
    stream_bench.on_reactor(link.ends[1].fail, "session lost")  # the target side's link breaks
    received += read_until_closed(link.target)                  # its socket is closed
    assert received < 32 << 20
    assert stream_bench.closed.acquire(timeout=5)
    link.user.settimeout(5)
    assert read_until_closed(link.user) == 0                    # the user side is closed too
    sender.join(10)
    assert not sender.is_alive()
    stream_bench.on_reactor(lambda: None)  # anything still queued on the reactor has run
    assert sorted(link.close_calls.values()) == [1, 1]
    assert all(relay.closed for relay in link.relays)
    assert all(end.closed for end in link.ends)


@pytest.mark.parametrize("which", [0, 1, "both"])
def test_stream_abort_closes_everything(stream_bench, which):
    link = stream_bench.link()
    link.user.sendall(b"hello")
    assert link.target.recv(10) == b"hello"
    relays = link.relays if which == "both" else [link.relays[which]]
    stream_bench.on_reactor(lambda: [relay.abort() for relay in relays])
    assert stream_bench.closed.acquire(timeout=5)
    assert read_until_closed(link.user) == 0
    assert read_until_closed(link.target) == 0
    stream_bench.on_reactor(lambda: [relay.abort() for relay in link.relays])  # idempotent
    assert sorted(link.close_calls.values()) == [1, 1]
    assert all(end.closed for end in link.ends)


def test_stream_abort_before_start_closes_the_socket(stream_bench):
    near, far = socket.socketpair()
    end_a, end_b = memory_stream_pair(stream_bench.reactor)
    calls = []
    relay = StreamRelay(stream_bench.reactor, near, end_a, on_close=calls.append)
    stream_bench.on_reactor(relay.abort)
    stream_bench.on_reactor(relay.start)  # too late: nothing happens
    stream_bench.on_reactor(relay.abort)
    assert calls == [relay]
    assert near.fileno() == -1
    assert far.recv(10) == b""
    far.close()
    assert stream_bench.on_reactor(lambda: end_b.failure) == "peer closed"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def stream_readable(self) -> None:
        self.calls.append(("readable",))

    def stream_writable(self) -> None:
        self.calls.append(("writable",))

    def stream_failed(self, reason: str) -> None:
        self.calls.append(("failed", reason))


def test_memory_stream_keeps_the_stream_contract(stream_bench):
    on = stream_bench.on_reactor
    a, b = memory_stream_pair(stream_bench.reactor, capacity=10)
    ra, rb = Recorder(), Recorder()
    assert isinstance(a, Stream) and isinstance(ra, StreamListener)
    with socket.socket() as sock:
        assert isinstance(StreamRelay(stream_bench.reactor, sock, a), StreamListener)

    assert on(a.write, b"hello") == 5           # buffered before anyone listens
    on(a.listen, ra)
    on(b.listen, rb)                            # already buffered: readable follows
    on(lambda: None)
    assert rb.calls == [("readable",)] and ra.calls == []
    assert on(a.write, memoryview(b"0123456789")) == 5   # full: a short write ...
    assert on(a.write, b"x") == 0
    assert on(b.read, 3) == b"hel"
    on(lambda: None)
    assert ra.calls == [("writable",)]         # ... and writable once room frees up
    assert on(b.read, 100) == b"lo01234"
    assert on(b.read, 100) == b""
    on(a.shutdown_write)
    on(lambda: None)
    assert rb.calls == [("readable",), ("readable",)]
    assert on(b.read, 100) is None              # EOF
    with pytest.raises(BrokenPipeError):
        on(a.write, b"late")
    on(b.shutdown_write)
    assert on(a.read, 100) is None
    on(a.close)                                 # both directions ended: a clean end
    on(lambda: None)
    assert b.failure is None and rb.calls[-1] == ("readable",)

    c, d = memory_stream_pair(stream_bench.reactor)
    rc, rd = Recorder(), Recorder()
    on(c.listen, rc)
    on(d.listen, rd)
    on(c.write, b"unread")
    on(c.close)                                 # before the end: a reset
    on(lambda: None)
    assert rd.calls[-1] == ("failed", "peer closed") and rc.calls == []
    with pytest.raises(ConnectionResetError):
        on(d.read, 100)
    on(d.close)
    on(c.close)                                 # idempotent
    with pytest.raises(AssertionError):
        d.read(1)                               # off the reactor thread
