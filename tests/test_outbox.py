"""The smux outbox's turns (protocol/outbox.py), through Session and on its own, on exact frames:
no stream waits behind another's backlog, and each stream's SYN, PSH and FIN stay in order."""

from __future__ import annotations

from backhaul.protocol.outbox import QUANTUM, ROUND_BYTES, Outbox
from backhaul.protocol.smux import FIN, NOP, PSH, SYN, UPD, FrameDecoder, Session, encode_frame

KiB = 1024


def frames(buffers: list) -> list[tuple[int, int, int]]:
    """(cmd, sid, payload length) of each frame in one round's buffers."""
    return [(f.cmd, f.sid, len(f.payload)) for f in FrameDecoder(1).feed(b"".join(buffers))]


def test_a_frame_queued_behind_a_backlog_leaves_in_the_next_round():
    server = Session(1, True, 32 * KiB, 4 << 20, 64 * KiB, outbox_cap=2 << 20)
    bulk, interactive = server.open_stream(), server.open_stream()
    assert server.write(bulk, b"b" * (1 << 20)) == 1 << 20
    first = frames(server.outgoing_buffers())
    assert (SYN, interactive, 0) in first  # its SYN was queued before the megabyte's second frame
    assert sum(n for cmd, sid, n in first if sid == bulk) < 1 << 20
    server.write(interactive, b"ping")
    second = frames(server.outgoing_buffers())
    assert (PSH, interactive, 4) in second
    assert sum(n for _cmd, sid, n in second if sid == bulk) <= ROUND_BYTES
    # The backlog still leaves whole and in order, round after round.
    rest = []
    while server.has_outgoing:
        rest += frames(server.outgoing_buffers())
    pushed = sum(n for cmd, sid, n in first + second + rest if sid == bulk and cmd == PSH)
    assert pushed == 1 << 20


def test_streams_take_turns_and_keep_their_own_order():
    server = Session(1, True, 16 * KiB, 4 << 20, 64 * KiB)
    a, b = server.open_stream(), server.open_stream()
    server.write(a, b"a" * (64 * KiB))
    server.shutdown_stream(a)
    server.write(b, b"b" * (64 * KiB))
    server.shutdown_stream(b)
    order = []
    while server.has_outgoing:
        order += frames(server.outgoing_buffers(1))  # one pass per round
    for sid in (a, b):
        mine = [cmd for cmd, s, _n in order if s == sid]
        assert mine == [SYN, PSH, PSH, PSH, PSH, FIN]  # the FIN after the last PSH
    # Turns: the two streams' data frames alternate (each turn is one 16 KiB frame).
    data = [s for cmd, s, _n in order if cmd == PSH]
    assert data == [a, b] * 4


def test_control_frames_go_first():
    client = Session(2, False, 32 * KiB, 4 << 20, 64 * KiB, hello=False)
    client.receive(encode_frame(2, SYN, 3) + encode_frame(2, PSH, 3, b"x" * 100), 0.0)
    client.write(3, b"y" * (200 * KiB))
    client.read(3, 100)  # the first read: a UPD
    client.tick(25.0)    # the keepalive: a NOP
    first = [(f.cmd, f.sid) for f in FrameDecoder(2).feed(b"".join(client.outgoing_buffers()))]
    assert first[:2] == [(UPD, 3), (NOP, 0)]
    assert first[2] == (PSH, 3)


def test_a_stream_with_nothing_queued_gets_a_frame_past_the_cap():
    server = Session(1, True, 16 * KiB, 4 << 20, 64 * KiB, outbox_cap=100 * KiB)
    bulk, other, third = server.open_stream(), server.open_stream(), server.open_stream()
    server.outgoing()
    assert server.write(bulk, b"b" * (1 << 20)) == 100 * KiB
    assert server.write(bulk, b"b") == 0
    assert server.write(other, b"o" * (64 * KiB)) == 16 * KiB  # one frame, past the cap
    assert server.write(other, b"o") == 0  # but only one: it holds a frame now
    assert server.write(third, b"t" * (64 * KiB)) == 16 * KiB
    assert server._outbox.bytes <= 2 * 100 * KiB + 3 * 8


def test_outbox_quantum_takes_small_frames_of_a_stream_together():
    outbox = Outbox()
    outbox.push(3, b"\x01" * (QUANTUM + 1))
    outbox.push(3, b"\x02" * 10)
    for _ in range(5):
        outbox.push(5, b"s" * 8)
    out = outbox.take(1)  # one pass: stream 3's big frame, then all of stream 5's small ones
    assert [len(x) for x in out] == [QUANTUM + 1] + [8] * 5
    assert outbox.take(1) == [b"\x02" * 10]
    assert not outbox and outbox.bytes == 0

