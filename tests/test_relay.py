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
from collections.abc import Iterator

import pytest

from backhaul.pipes import SMALL, Pipe, PipePool
from backhaul.reactor import Timer
from backhaul.relay import splice as relay_module
from backhaul.relay.stream import READ_CHUNK, Stream, StreamListener, StreamRelay
from tests import conformance
from tests.conformance import (
    CAPACITY,
    Bench,
    Link,
    read_all,
    read_until_closed,
    send_and_finish,
    send_until_broken,
    wait_until,
)
from tests.memstream import memory_stream_pair

pytestmark = pytest.mark.timeout(60)
MODES = [*(["splice", "copy"] if relay_module.HAS_SPLICE else ["copy"]), "stream"]


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


# ------------------------------------------------------------------------------------------------
# conformance: every mode

@pytest.mark.parametrize("case", [case for _, case in conformance.CASES], ids=[name for name, _ in conformance.CASES])
def test_conformance(bench, case):
    case(bench)


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
