"""The v2 window tuner (protocol/window.py) on synthetic timelines, without sockets: a sender
(our own smux Session, which keeps to the windows as a Go sender does) and a receiving Session
joined by a simulated path with a one-way delay and a rate, time in steps of one millisecond."""

from __future__ import annotations

import hashlib
from collections import deque

import pytest

from backhaul.errors import ProtocolError
from backhaul.protocol.smux import INITIAL_PEER_WINDOW, PSH, SYN, UPD, FrameDecoder, Session, encode_frame
from backhaul.protocol.window import WindowTuner

KiB = 1024
MiB = 1024 * KiB
STEP = 0.001


class Path:
    """One direction of a link: bytes leave at ``rate`` bytes/s and arrive ``delay`` s later."""

    def __init__(self, delay: float, rate: float) -> None:
        self.delay = delay
        self.rate = rate
        self.queue = bytearray()  # waiting to be sent
        self.flying: deque[tuple[float, bytes]] = deque()

    def step(self, now: float) -> bytes:
        """Send this step's share; return what arrives by ``now``."""
        n = min(len(self.queue), int(self.rate * STEP))
        if n:
            self.flying.append((now + self.delay, bytes(self.queue[:n])))
            del self.queue[:n]
        out = bytearray()
        while self.flying and self.flying[0][0] <= now:
            out += self.flying.popleft()[1]
        return bytes(out)


class Transfer:
    """A bulk sender and a receiver with one stream each over a simulated path."""

    def __init__(self, rtt: float, rate: float, *, streams: int = 1, receive_buffer: int = 4 * MiB,
                 stream_buffer: int = 64 * KiB) -> None:
        self.sender = Session(2, True, 32 * KiB, 4 * MiB, 64 * KiB, now=0.0)
        self.receiver = Session(2, False, 32 * KiB, receive_buffer, stream_buffer, now=0.0)
        self.forward = Path(rtt / 2, rate)
        self.back = Path(rtt / 2, 1e12)
        self.sids = [self.sender.open_stream() for _ in range(streams)]
        self.payload = bytes(range(256)) * (4 * KiB)  # 1 MiB, sent over and over
        self.sent = dict.fromkeys(self.sids, 0)
        self.got = {sid: hashlib.sha256() for sid in self.sids}
        self.read_total = dict.fromkeys(self.sids, 0)
        self.now = 0.0
        self.max_unread = 0

    def window(self, sid: int) -> int:
        return self.receiver._streams[sid].window.size

    def run(self, seconds: float, read_per_step: int | None) -> None:
        """``read_per_step``: bytes each stream's reader takes per step (None: all there is)."""
        for _ in range(round(seconds / STEP)):
            self.now += STEP
            for sid in self.sids:
                # The sender's socket holds a few milliseconds of the path: a larger queue would
                # be part of every round trip the receiver measures (as on a real bloated path).
                while len(self.forward.queue) < max(16 * KiB, self.forward.rate * 0.005):
                    pos = self.sent[sid] % len(self.payload)
                    n = self.sender.write(sid, self.payload[pos:])
                    if not n:
                        break
                    self.sent[sid] += n
            self.forward.queue += self.sender.outgoing()
            self.receiver.receive(self.forward.step(self.now), self.now)
            for sid in self.sids:
                if sid not in self.receiver:
                    continue  # its SYN is still on the way
                self.max_unread = max(self.max_unread, self.receiver._streams[sid].inbox.size)
                budget = read_per_step if read_per_step is not None else 1 << 30
                while budget > 0 and (data := self.receiver.read(sid, min(budget, 256 * KiB), self.now)):
                    self.got[sid].update(data)
                    self.read_total[sid] += len(data)
                    budget -= len(data)
            self.back.queue += self.receiver.outgoing()
            self.sender.receive(self.back.step(self.now), self.now)

    def check_bytes(self) -> None:
        """What was read is what was sent, in order (the sender's hash over the same length)."""
        for sid in self.sids:
            want = hashlib.sha256()
            whole, rest = divmod(self.read_total[sid], len(self.payload))
            for _ in range(whole):
                want.update(self.payload)
            want.update(self.payload[:rest])
            assert self.got[sid].digest() == want.digest()


def test_prompt_reader_on_a_long_path_grows_to_twice_the_bdp():
    rtt, rate = 0.1, 12.5e6  # 100 ms, 100 Mbit/s: 1.25 MB in flight fill the path
    transfer = Transfer(rtt, rate)
    sid = transfer.sids[0]
    transfer.run(0.5, None)
    early = transfer.read_total[sid]
    assert transfer.window(sid) > 64 * KiB
    transfer.run(4.0, None)
    window = transfer.window(sid)
    assert 1.6 * rtt * rate <= window <= 3 * MiB  # about twice the BDP (2.5 MB), well under the stream cap
    rtt_seen = transfer.receiver._streams[sid].window.rtt
    assert rtt <= rtt_seen < rtt + 0.01
    # The last second moved at least 80 % of the path's rate; 64 KiB windows would move 5 %.
    before = transfer.read_total[sid]
    transfer.run(1.0, None)
    assert transfer.read_total[sid] - before >= 0.8 * rate
    assert early < 0.8 * rate * 0.5
    transfer.check_bytes()


def test_short_path_keeps_a_small_window():
    transfer = Transfer(0.002, 1.25e6)  # 2 ms, 10 Mbit/s: 2.5 kB fill it
    transfer.run(2.0, None)
    # The first sample is slow: the sender's 256 KiB initial window queued ahead of the bytes it
    # times. The window stays a few times the start, far below the 2 MiB a long path gets.
    assert 64 * KiB <= transfer.window(transfer.sids[0]) <= 256 * KiB
    transfer.check_bytes()


def test_stalled_reader_shrinks_the_window_and_pins_at_most_its_grant():
    rtt, rate = 0.1, 12.5e6
    transfer = Transfer(rtt, rate)
    sid = transfer.sids[0]
    transfer.run(3.0, None)
    grown = transfer.window(sid)
    window = transfer.receiver._streams[sid].window
    granted_edge = window.edge
    assert grown > 1 * MiB
    transfer.max_unread = 0
    transfer.run(1.0, 0)  # the reader stops: the sender fills what it was granted, no more
    assert window.received == granted_edge
    assert transfer.max_unread <= granted_edge - window.read
    transfer.run(4.0, 1 * KiB)  # a slow reader: 1 MB/s of the path's 12.5, past the old grant
    assert transfer.window(sid) < grown // 2
    assert transfer.window(sid) >= 64 * KiB
    assert transfer.sender._streams[sid].peer_window < grown // 2  # the UPDs said so on the wire
    # Stalled again: what it pins is now at most the smaller grant (plus what was in flight).
    transfer.run(1.0, 0)
    assert window.received <= window.edge
    assert window.edge - window.read <= max(transfer.window(sid), 64 * KiB) + 32 * KiB
    transfer.check_bytes()


def test_shrink_never_refuses_what_was_sent_under_the_larger_grant():
    tuner = WindowTuner(64 * KiB, 4 * MiB, INITIAL_PEER_WINDOW)
    w = tuner.open(0.0)
    w.size = 1 * MiB
    w.rtt = 0.1
    w.read = 0
    tuner.granted(w, 0.0)
    assert w.edge == 1 * MiB
    assert tuner.received(w, 1 * MiB, 0.2)  # the sender used all of it; the reader is away
    tuner.read(w, 16 * KiB, 2.0, lambda: w.size)  # reads again, far behind: the grant shrinks
    tuner.read(w, 16 * KiB, 2.2, lambda: w.size)
    assert w.size == 64 * KiB
    tuner.granted(w, 2.2)
    # A Go sender may pair this UPD's consumed with the previous window for a moment: accepted.
    assert w.advertised == 64 * KiB and w.edge == 32 * KiB + 1 * MiB
    tuner.read(w, 64 * KiB, 2.3, lambda: w.size)
    tuner.granted(w, 2.3)
    assert w.edge == 32 * KiB + 1 * MiB  # the edge never moves back: nothing in flight is refused
    assert tuner.received(w, 32 * KiB, 2.4)
    assert not tuner.received(w, 1, 2.5)  # one byte beyond every grant is


def test_receiver_refuses_a_sender_beyond_the_grown_grant():
    client = Session(2, False, 32 * KiB, 4 * MiB, 64 * KiB, hello=False)
    client.receive(encode_frame(2, SYN, 3), 0.0)
    client.receive(encode_frame(2, PSH, 3, b"x" * 32 * KiB), 0.0)
    window = client._streams[3].window
    window.rtt = 0.05
    window.size = 512 * KiB
    client.read(3, 32 * KiB, 0.0)
    frames = FrameDecoder(2).feed(client.outgoing())
    assert [(f.cmd, f.sid, bytes(f.payload)) for f in frames] == [
        (UPD, 3, (32 * KiB).to_bytes(4, "little") + (512 * KiB).to_bytes(4, "little"))
    ]
    # Granted: 32 KiB read + 512 KiB. 544 KiB in all may come; one byte more may not.
    client.receive(encode_frame(2, PSH, 3, b"y" * 32 * KiB) * 15, 0.01)
    with pytest.raises(ProtocolError, match="peer ignored the window: 524289 unread bytes on stream 3, "
                                            "more than the 524288 granted"):
        client.receive(encode_frame(2, PSH, 3, b"y" * (32 * KiB + 1)), 0.02)


def test_one_stream_on_a_path_longer_than_its_buffer_takes_seven_eighths_of_it():
    """Catches: a cap that leaves one stream short of a 100 ms / 100 Mbit/s path with the default
    4 MiB (3/4 moved 0.78x in some runs), or none at all (one stream could fill the session's
    buffer and stop every other stream's reads)."""
    transfer = Transfer(0.25, 12.5e6)   # twice the BDP is 6.25 MB: more than the buffer
    sid = transfer.sids[0]
    for _ in range(6):
        transfer.run(0.5, None)
        assert transfer.window(sid) <= 4 * MiB * 7 // 8
    assert transfer.window(sid) == 4 * MiB * 7 // 8
    transfer.check_bytes()


def test_session_total_stays_within_the_receive_buffer():
    rtt, rate = 0.1, 12.5e6
    transfer = Transfer(rtt, rate, streams=4, receive_buffer=1 * MiB)
    for _ in range(8):
        transfer.run(0.5, None)
        sizes = [transfer.window(sid) for sid in transfer.sids]
        assert sum(sizes) <= 1 * MiB
        assert max(sizes) <= 512 * KiB
    assert max(sizes) > 64 * KiB  # they did grow, within the bound
    transfer.check_bytes()


def test_rtt_sample_waits_for_a_byte_beyond_the_old_edge():
    tuner = WindowTuner(64 * KiB, 4 * MiB, INITIAL_PEER_WINDOW)
    w = tuner.open(0.0)
    assert tuner.received(w, 200 * KiB, 0.0)
    w.read = 200 * KiB
    tuner.granted(w, 1.0)  # 200 KiB read + 64 KiB: beyond the initial 256 KiB
    # Accepted: up to 200 KiB + the initial window (a Go sender may pair the two for a moment).
    assert w.edge == 456 * KiB and w.probe_at == 1.0
    assert tuner.received(w, 56 * KiB, 1.02)  # up to the old edge: sent before our UPD arrived
    assert w.rtt == 0.0
    assert tuner.received(w, 1, 1.08)
    assert w.rtt == pytest.approx(0.08)


def test_a_reader_that_keeps_up_but_is_never_empty_is_not_behind():
    """Bytes arrive every millisecond and each read leaves the newest 8 KiB: the buffer is never
    empty, yet no byte waits long. The grant must grow as for a reader that empties it."""
    tuner = WindowTuner(64 * KiB, 4 * MiB, INITIAL_PEER_WINDOW)
    w = tuner.open(0.0)
    w.rtt = 0.1
    grew = False
    now = 0.0
    for _ in range(1000):   # one second at 32 KiB a millisecond, read 2 ms later
        now += 0.001
        tuner.received(w, 32 * KiB, now)
        if w.unread > 64 * KiB:
            grew |= tuner.read(w, w.unread - 8 * KiB, now, lambda: w.size)
    assert not w.lagged
    assert grew and w.size > 1 * MiB


def test_a_reader_whose_bytes_wait_longer_than_a_round_trip_is_behind():
    tuner = WindowTuner(64 * KiB, 4 * MiB, INITIAL_PEER_WINDOW)
    w = tuner.open(0.0)
    w.rtt = 0.1
    w.size = 1 * MiB
    tuner.received(w, 512 * KiB, 0.0)
    tuner.read(w, 16 * KiB, 0.05, lambda: w.size)
    assert not w.lagged          # 50 ms: within a round trip
    tuner.read(w, 16 * KiB, 0.3, lambda: w.size)   # these bytes arrived 300 ms ago
    assert w.lagged or w.size < 1 * MiB


def test_a_window_limited_stream_grows_fourfold_per_step():
    """A grant's effect shows a round trip after its UPD, so each step of the tuner spans two
    round trips: while the sender uses most of its grant, the grant grows fourfold, and at 100 ms
    / 100 Mbit/s the stream has its ~2 x BDP grant (2.5 MB) by 0.7 s, not by 0.8 s (simulated time)."""
    transfer = Transfer(0.1, 12.5e6)
    sid = transfer.sids[0]
    transfer.run(0.7, None)
    assert transfer.window(sid) >= 2 * MiB
    transfer.run(1.3, None)
    assert transfer.window(sid) <= 3 * MiB    # it settles near twice the BDP, under the stream cap
    transfer.check_bytes()
