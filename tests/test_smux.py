"""smux codec and session state machine (PROTOCOL.md 2.3, 2.4 and the captured Go conversations); no sockets."""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import pytest

from backhaul.errors import ProtocolError
from backhaul.protocol.framing import encode_lv
from backhaul.protocol.smux import (
    FIN,
    HEADER_SIZE,
    INITIAL_PEER_WINDOW,
    MAX_STREAM_ID,
    NOP,
    PSH,
    SYN,
    UPD,
    Frame,
    FrameDecoder,
    Session,
    StreamData,
    StreamEnded,
    StreamOpened,
    StreamWritable,
    encode_frame,
)

pytestmark = pytest.mark.timeout(30)

VECTORS = Path(__file__).parent / "vectors"
BACKHAUL = {"frame_size": 32768, "receive_buffer": 4194304, "stream_buffer": 65536}  # Backhaul's defaults


def session(version: int, opener: bool, **kwargs) -> Session:
    """A session that speaks as the Go program does (no hello) unless ``hello=True``: the
    captured conversations are Go's bytes."""
    return Session(version, opener, **{**BACKHAUL, "hello": False, **kwargs})


def upd(version: int, sid: int, consumed: int, window: int) -> bytes:
    return encode_frame(version, UPD, sid, struct.pack("<II", consumed, window))


def collapse(events: list) -> list:
    """Events with consecutive repeats merged: how many receive() calls report them depends on the split."""
    out: list = []
    for event in events:
        if not out or out[-1] != event:
            out.append(event)
    return out


# ---------------------------------------------------------------------- PROTOCOL.md 2.4


@pytest.mark.parametrize("version", [1, 2])
def test_protocol_example_frames(version):
    v = f"{version:02x}"
    vectors = [
        (Frame(SYN, 3, b""), f"{v} 00 00 00 03 00 00 00"),
        (Frame(PSH, 3, b"\x00\x048443"), f"{v} 02 06 00 03 00 00 00 00 04 38 34 34 33"),
        (Frame(PSH, 3, b"GET /"), f"{v} 02 05 00 03 00 00 00 47 45 54 20 2f"),
        (Frame(NOP, 0, b""), f"{v} 03 00 00 00 00 00 00"),
        (Frame(FIN, 3, b""), f"{v} 01 00 00 03 00 00 00"),
        (Frame(PSH, 3, encode_lv(b"1.1.1.1:5201")), f"{v} 02 0e 00 03 00 00 00 00 0c 31 2e 31 2e 31 2e 31 3a 35 32 30 31"),
    ]
    if version == 2:
        vectors.append((Frame(UPD, 3, bytes.fromhex("02000000 00000100")), "02 04 08 00 03 00 00 00 02 00 00 00 00 00 01 00"))
    for frame, text in vectors:
        wire = bytes.fromhex(text)
        assert encode_frame(version, *frame) == wire
        assert FrameDecoder(version).feed(wire) == [frame]
    assert FrameDecoder(version).feed(b"".join(bytes.fromhex(t) for _, t in vectors)) == [f for f, _ in vectors]


def test_protocol_example_session_bytes_v2():
    # The server side of 2.4 produces the example's frames; the client answers the first read with the UPD.
    server = session(2, True)
    client = session(2, False)
    sid = server.open_stream()
    assert server.write(sid, encode_lv(b"8443")) == 6
    wire = server.outgoing()
    assert wire == bytes.fromhex("02 00 00 00 03 00 00 00 02 02 06 00 03 00 00 00 00 04 38 34 34 33")
    assert client.receive(wire, 0.0) == [StreamOpened(3), StreamData(3)]
    assert client.read(3, 2) == b"\x00\x04"
    assert client.outgoing() == bytes.fromhex("02 04 08 00 03 00 00 00 02 00 00 00 00 00 01 00")
    assert client.read(3, 4) == b"8443"
    assert not client.has_outgoing


def test_encode_refuses_a_payload_longer_than_u16():
    with pytest.raises(ProtocolError, match="65536 bytes") as info:
        encode_frame(1, PSH, 3, b"x" * 65536)
    assert not info.value.remote


# ---------------------------------------------------------------------- decoder splits


def test_decoder_keeps_trailing_partial_bytes():
    decoder = FrameDecoder(1)
    first = encode_frame(1, PSH, 3, b"abc")
    second = encode_frame(1, FIN, 3)
    assert decoder.feed(first + second[:3]) == [Frame(PSH, 3, b"abc")]
    assert decoder.pending == 3
    assert decoder.feed(second[3:5]) == []
    assert decoder.feed(second[5:]) == [Frame(FIN, 3, b"")]
    assert decoder.pending == 0


def test_decoder_large_frame_byte_by_byte():
    payload = bytes(range(256)) * 256
    payload = payload[:65535]
    wire = encode_frame(2, PSH, 7, payload) + encode_frame(2, NOP, 0)
    decoder = FrameDecoder(2)
    frames = []
    for i in range(len(wire)):
        frames += decoder.feed(wire[i : i + 1])
    assert frames == [Frame(PSH, 7, payload), Frame(NOP, 0, b"")]


def test_decoder_accepts_memoryview_and_bytearray():
    wire = encode_frame(1, PSH, 3, b"hello") * 2
    assert FrameDecoder(1).feed(memoryview(wire)) == [Frame(PSH, 3, b"hello")] * 2
    decoder = FrameDecoder(1)
    buf = bytearray(wire[:10])
    assert decoder.feed(buf) == []
    buf[:] = b"\xff" * 10  # the caller reuses its buffer: what the decoder kept must be a copy
    assert decoder.feed(wire[10:]) == [Frame(PSH, 3, b"hello")] * 2


# ---------------------------------------------------------------------- captured Go conversations


def load_capture(name: str) -> list[tuple[str, bytes]]:
    """The reads of the smux session (conn2) of a capture, in order, as (direction, bytes)."""
    reads = []
    for line in (VECTORS / name).read_text().splitlines():
        parts = line.split()
        if len(parts) < 5 or line.startswith("#") or not parts[3].endswith("B"):
            continue
        data = bytes.fromhex(" ".join(parts[4:]))
        assert len(data) == int(parts[3][:-1])
        if parts[1] == "conn2":
            reads.append((parts[2], data))
    return reads


def direction(reads: list[tuple[str, bytes]], way: str) -> list[bytes]:
    return [data for w, data in reads if w == way]


def splits(reads: list[bytes]) -> dict[str, list[bytes]]:
    whole = b"".join(reads)
    return {
        "as-read": reads,
        "whole": [whole],
        "bytewise": [whole[i : i + 1] for i in range(len(whole))],
        "by-5": [whole[i : i + 5] for i in range(0, len(whole), 5)],
        "by-11": [whole[i : i + 11] for i in range(0, len(whole), 11)],
    }


CAPTURES = [(1, "tcpmux-v1.txt", "40335"), (2, "tcpmux-v2.txt", "46265")]
SPLITS = ["as-read", "whole", "bytewise", "by-5", "by-11"]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("version", "name", "target"), CAPTURES)
def test_capture_acceptor_replays_the_go_client(version, name, target, split):
    reads = load_capture(name)
    # What the server sent before the client's first answer, and after it.
    first_answer = next(i for i, (way, _) in enumerate(reads) if way == "C>S")
    before = direction(reads[:first_answer], "S>C")
    after = direction(reads[first_answer:], "S>C")
    client = session(version, False)
    events = []
    for piece in splits(before)[split]:
        events += client.receive(piece, 1.0)
    assert collapse(events) == [StreamOpened(3), StreamData(3)]
    # Backhaul's client reads the LV length, then the target, then relays with a 16 KiB buffer.
    assert client.read(3, 2) == b"\x00\x05"
    answer = client.outgoing()
    if version == 2:
        assert answer == reads[first_answer][1]  # UPD after the first read: consumed=2 window=65536
    else:
        assert answer == b""
    assert client.read(3, 5) == target.encode()
    assert client.read(3, 16384) == b"hello backhaul"
    assert client.read(3, 16384) == b""
    assert client.write(3, b"hello backhaul") == 14
    answer += client.outgoing()
    events = []
    for piece in splits(after)[split]:
        events += client.receive(piece, 2.0)
    assert events == [StreamEnded(3)]
    assert client.read(3, 16384) is None
    client.close_stream(3)
    assert answer + client.outgoing() == b"".join(direction(reads, "C>S"))
    assert len(client) == 0 and client.buffered == 0


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("version", "name", "target"), CAPTURES)
def test_capture_opener_replays_the_go_server(version, name, target, split):
    reads = load_capture(name)
    server = session(version, True)
    sid = server.open_stream()
    assert sid == 3
    server.write(sid, encode_lv(target.encode()))
    server.write(sid, b"hello backhaul")
    sent = server.outgoing()
    events = []
    for piece in splits(direction(reads, "C>S"))[split]:
        events += server.receive(piece, 1.0)
    assert collapse(events) == [StreamData(3), StreamEnded(3)]
    assert server.read(3, 16384) == b"hello backhaul"
    assert server.read(3, 16384) is None
    server.close_stream(3)
    assert sent + server.outgoing() == b"".join(direction(reads, "S>C"))
    assert len(server) == 0


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("version", "name", "target"), CAPTURES)
def test_capture_decodes_client_frames(version, name, target, split):
    reads = load_capture(name)
    decoder = FrameDecoder(version)
    frames = []
    for piece in splits(direction(reads, "C>S"))[split]:
        frames += decoder.feed(piece)
    expected = [Frame(PSH, 3, b"hello backhaul"), Frame(FIN, 3, b"")]
    if version == 2:
        expected.insert(0, Frame(UPD, 3, struct.pack("<II", 2, 65536)))
    assert frames == expected
    assert decoder.pending == 0


# ---------------------------------------------------------------------- bad input


BAD_FRAMES = [
    (1, "02 00 00 00 03 00 00 00", "smux version 2 frame on a version 1 session"),
    (2, "01 03 00 00 00 00 00 00", "smux version 1 frame on a version 2 session"),
    (1, "48 54 54 50 2f 31 2e 31", "not an smux frame: version byte 0x48, expected 1"),
    (1, "01 05 00 00 03 00 00 00", "unknown smux command 5 on stream 3"),
    (2, "02 ff 00 00 09 00 00 00", "unknown smux command 255 on stream 9"),
    (2, "02 04 04 00 03 00 00 00", "smux UPD frame on stream 3 with 4 payload bytes, not 8"),
    (1, "01 04 08 00 03 00 00 00", "smux UPD frame on stream 3 on a version 1 session"),
    (1, "01 00 02 00 03 00 00 00", "smux SYN frame on stream 3 carries 2 payload bytes, must be empty"),
    (2, "02 01 01 00 05 00 00 00", "smux FIN frame on stream 5 carries 1 payload bytes, must be empty"),
    (1, "01 03 08 00 00 00 00 00", "smux NOP frame on stream 0 carries 8 payload bytes, must be empty"),
]


@pytest.mark.parametrize(("version", "text", "message"), BAD_FRAMES)
def test_decoder_names_the_bad_header(version, text, message):
    # Refused as soon as the header is in, before any payload arrives; also when fed byte by byte.
    wire = bytes.fromhex(text)
    with pytest.raises(ProtocolError, match=message) as info:
        FrameDecoder(version).feed(wire)
    assert info.value.remote
    decoder = FrameDecoder(version)
    with pytest.raises(ProtocolError, match=message):
        for i in range(len(wire)):
            decoder.feed(wire[i : i + 1])


def test_decoder_payload_beyond_limit():
    with pytest.raises(ProtocolError, match="smux PSH frame of 17 bytes on stream 3 exceeds the limit of 16"):
        FrameDecoder(1, max_payload=16).feed(encode_frame(1, PSH, 3, b"x" * 17)[:8])
    assert FrameDecoder(1, max_payload=16).feed(encode_frame(1, PSH, 3, b"x" * 16)) == [Frame(PSH, 3, b"x" * 16)]


def test_session_takes_frames_larger_than_its_own_frame_size():
    # A Go receiver accepts any u16 length, so peers with different mux_framesize interoperate.
    client = session(1, False, frame_size=1024)
    client.receive(encode_frame(1, SYN, 3) + encode_frame(1, PSH, 3, b"x" * 65535), 0.0)
    assert client.read(3, 70000) == b"x" * 65535


def test_session_reports_the_version_mismatch():
    with pytest.raises(ProtocolError, match="smux version 2 frame on a version 1 session"):
        session(1, False).receive(bytes.fromhex("02 00 00 00 03 00 00 00"), 0.0)


@pytest.mark.parametrize("cmd", [PSH, FIN])
def test_acceptor_refuses_data_for_a_stream_never_opened(cmd):
    client = session(2, False)
    payload = b"x" if cmd == PSH else b""
    name = "PSH" if cmd == PSH else "FIN"
    with pytest.raises(ProtocolError, match=f"smux {name} for stream 5, which was never opened"):
        client.receive(encode_frame(2, cmd, 5, payload), 0.0)
    client = session(2, False)
    client.receive(encode_frame(2, SYN, 3), 0.0)
    with pytest.raises(ProtocolError, match=f"smux {name} for stream 7, which was never opened"):
        client.receive(encode_frame(2, cmd, 7, payload), 0.0)


def test_acceptor_discards_frames_for_a_closed_stream():
    client = session(2, False)
    client.receive(encode_frame(2, SYN, 3) + encode_frame(2, SYN, 5), 0.0)
    client.close_stream(3)
    late = encode_frame(2, PSH, 3, b"late") + upd(2, 3, 0, 65536) + encode_frame(2, FIN, 3)
    assert client.receive(late, 0.0) == []
    assert client.buffered == 0 and len(client) == 1


def test_acceptor_ignores_a_duplicate_syn():
    client = session(1, False)
    assert client.receive(encode_frame(1, SYN, 3), 0.0) == [StreamOpened(3)]
    assert client.receive(encode_frame(1, SYN, 3), 0.0) == []
    client.close_stream(3)
    assert client.receive(encode_frame(1, SYN, 3), 0.0) == []  # ids are never reused
    assert len(client) == 0


def test_opener_refuses_data_for_a_stream_it_never_opened():
    server = session(1, True)
    server.open_stream()
    for sid in (5, 4, 1, 0):
        with pytest.raises(ProtocolError, match=f"smux PSH for stream {sid}, which was never opened"):
            server.receive(encode_frame(1, PSH, sid, b"x"), 0.0)
    with pytest.raises(ProtocolError, match="smux FIN for stream 5, which was never opened"):
        session(1, True).receive(encode_frame(1, FIN, 5), 0.0)
    with pytest.raises(ProtocolError, match="smux UPD for stream 3, which was never opened"):
        session(2, True).receive(upd(2, 3, 0, 65536), 0.0)


def test_opener_discards_frames_for_a_closed_stream():
    server = session(2, True)
    sid = server.open_stream()
    server.close_stream(sid)
    late = encode_frame(2, PSH, sid, b"late") + upd(2, sid, 0, 65536) + encode_frame(2, FIN, sid)
    assert server.receive(late, 0.0) == []
    assert len(server) == 0


def test_syn_flood():
    client = session(1, False, max_streams=2)
    client.receive(encode_frame(1, SYN, 3) + encode_frame(1, SYN, 5), 0.0)
    with pytest.raises(ProtocolError, match="SYN for stream 7 with 2 streams open, the limit is 2: SYN flood"):
        client.receive(encode_frame(1, SYN, 7), 0.0)


def test_opener_refuses_a_syn():
    with pytest.raises(ProtocolError, match="smux SYN for stream 2 from the accepting side") as info:
        session(1, True).receive(encode_frame(1, SYN, 2), 0.0)
    assert info.value.remote


def test_data_after_fin_is_refused():
    client = session(1, False)
    client.receive(encode_frame(1, SYN, 3) + encode_frame(1, FIN, 3), 0.0)
    with pytest.raises(ProtocolError, match="smux PSH on stream 3 after the peer's FIN"):
        client.receive(encode_frame(1, PSH, 3, b"x"), 0.0)


def test_v2_peer_ignoring_the_window_is_refused():
    client = session(2, False)
    frames = encode_frame(2, SYN, 3) + encode_frame(2, PSH, 3, b"x" * (65536 // 2)) * 8
    client.receive(frames, 0.0)
    assert client.buffered == INITIAL_PEER_WINDOW  # exactly the initial window: still fine
    with pytest.raises(ProtocolError, match="peer ignored the window: 262145 unread bytes on stream 3"):
        client.receive(encode_frame(2, PSH, 3, b"x"), 0.0)


def test_v1_has_no_window_on_receive():
    client = session(1, False)
    client.receive(encode_frame(1, SYN, 3) + encode_frame(1, PSH, 3, b"x" * 65535) * 8, 0.0)
    assert client.buffered == 8 * 65535


def test_v2_upd_acknowledging_more_than_was_sent():
    server = session(2, True)
    sid = server.open_stream()
    server.write(sid, b"x" * 10)
    with pytest.raises(ProtocolError, match="UPD on stream 3 acknowledges 11 bytes, only 10 were sent"):
        server.receive(upd(2, sid, 11, 65536), 0.0)


def test_local_misuse_is_a_local_error():
    client = session(1, False)
    with pytest.raises(ProtocolError, match="cannot open streams") as info:
        client.open_stream()
    assert not info.value.remote
    server = session(1, True)
    sid = server.open_stream()
    for call in (lambda: server.write(9, b"x"), lambda: server.read(9, 1), lambda: server.close_stream(9)):
        with pytest.raises(ProtocolError, match="stream 9 was never opened") as info:
            call()
        assert not info.value.remote
    server.shutdown_stream(sid)
    with pytest.raises(ProtocolError, match="write on smux stream 3 after it was shut down") as info:
        server.write(sid, b"x")
    assert not info.value.remote
    server.close_stream(sid)
    with pytest.raises(ProtocolError, match="after it was shut down or closed"):
        server.write(sid, b"x")
    assert server.read(sid, 10) is None  # a forgotten stream reads as ended


def test_stream_ids_run_out():
    server = session(1, True)
    assert [server.open_stream() for _ in range(3)] == [3, 5, 7]
    server._last_opened = MAX_STREAM_ID - 2  # skip four billion opens
    assert server.open_stream() == MAX_STREAM_ID
    with pytest.raises(ProtocolError, match="stream ids of this session are used up") as info:
        server.open_stream()
    assert not info.value.remote


def test_constructor_refuses_settings_smux_refuses():
    for kwargs in ({"frame_size": 0}, {"frame_size": 65536}, {"stream_buffer": 8 << 20}, {"keepalive_timeout": 10.0}):
        with pytest.raises(ValueError):
            session(1, True, **kwargs)
    with pytest.raises(ValueError):
        session(3, True)


# ---------------------------------------------------------------------- sending: windows and outbox


def test_v2_writer_stops_at_the_initial_window_and_resumes_on_upd():
    server = session(2, True, frame_size=16384)
    sid = server.open_stream()
    assert server.write(sid, b"x" * 300000) == INITIAL_PEER_WINDOW
    assert server.write(sid, b"y") == 0
    wire = server.outgoing()
    frames = FrameDecoder(2).feed(wire)
    assert frames[0] == Frame(SYN, sid, b"")
    assert all(f.cmd == PSH and len(f.payload) == 16384 for f in frames[1:]) and len(frames) == 1 + 16
    # The peer read 100000 bytes and keeps a 65536 window: 100000 + 65536 - 262144 < 0, still closed.
    assert server.receive(upd(2, sid, 100000, 65536), 0.0) == []
    assert server.write(sid, b"y") == 0
    # Now it read everything: the window opens and the stream is reported writable, once.
    assert server.receive(upd(2, sid, 262144, 65536) + upd(2, sid, 262144, 65536), 0.0) == [StreamWritable(sid)]
    assert server.write(sid, b"z" * 100000) == 65536
    assert server.write(sid, b"z") == 0


def test_v2_upd_without_blocked_writer_reports_nothing():
    server = session(2, True)
    sid = server.open_stream()
    server.write(sid, b"x" * 100)
    assert server.receive(upd(2, sid, 100, 65536), 0.0) == []


def test_v2_window_counters_wrap_at_u32():
    server = session(2, True)
    sid = server.open_stream()
    start = 0xFFFFFFFF - 1000
    stream = server._streams[sid]
    stream.num_written = stream.peer_consumed = start  # as after four GiB on this stream
    assert server.write(sid, b"x" * 300000) == INITIAL_PEER_WINDOW
    wrapped = (start + INITIAL_PEER_WINDOW) & 0xFFFFFFFF
    assert wrapped < start
    assert server.receive(upd(2, sid, (start + 1000) & 0xFFFFFFFF, INITIAL_PEER_WINDOW), 0.0) == [StreamWritable(sid)]
    assert server.write(sid, b"x" * 300000) == 1000
    assert server.receive(upd(2, sid, wrapped, 65536), 0.0) == [StreamWritable(sid)]
    assert server.write(sid, b"x" * 300000) == 65536 - 1000  # 1000 still in flight


def test_v2_receiver_consumed_wraps_at_u32():
    client = session(2, False)
    client.receive(encode_frame(2, SYN, 3) + encode_frame(2, PSH, 3, b"x" * 40000), 0.0)
    client._streams[3].num_read = 0xFFFFFFFF - 10  # as after four GiB read
    client._streams[3].since_update = 32767
    assert client.read(3, 20) == b"x" * 20
    assert client.outgoing() == upd(2, 3, 9, 65536)


def test_v2_update_rule_first_read_then_half_the_stream_buffer():
    client = session(2, False)
    client.receive(encode_frame(2, SYN, 3) + encode_frame(2, PSH, 3, b"x" * 40000) * 3, 0.0)
    assert client.read(3, 0) == b"" and not client.has_outgoing
    client.read(3, 2)
    assert client.outgoing() == upd(2, 3, 2, 65536)
    client.read(3, 32766)
    client.read(3, 1)
    assert not client.has_outgoing  # 32767 read since the last UPD
    client.read(3, 1)
    assert client.outgoing() == upd(2, 3, 32770, 65536)
    client.read(3, 100000)  # one read across frames: one UPD
    assert client.outgoing() == upd(2, 3, 120000, 65536)


def test_v1_never_sends_upd():
    client = session(1, False)
    client.receive(encode_frame(1, SYN, 3) + encode_frame(1, PSH, 3, b"x" * 65535) * 4, 0.0)
    while client.read(3, 1000):
        assert not client.has_outgoing


def test_v1_accepts_everything_within_the_outbox_cap():
    server = session(1, True, outbox_cap=100000)
    sid = server.open_stream()
    assert server.write(sid, b"x" * 300000) == 100000 - HEADER_SIZE  # the SYN already sits in the outbox
    assert server.write(sid, b"x") == 0
    server.outgoing()
    total = 100000 - HEADER_SIZE
    while total < 1 << 20:
        n = server.write(sid, b"x" * 65536)
        assert n > 0
        total += n
        if n < 65536:
            assert server.write(sid, b"x") == 0
            server.outgoing()
    assert total >= 1 << 20  # far beyond any v2 window


def test_v2_stalled_stream_does_not_block_the_others():
    server = session(2, True)
    stalled, other = server.open_stream(), server.open_stream()
    assert server.write(stalled, b"x" * 300000) == INITIAL_PEER_WINDOW
    assert server.write(stalled, b"x") == 0
    assert server.write(other, b"y" * 1000) == 1000
    # Receiving side: a stream nobody reads keeps its bytes; the next stream's bytes still get through.
    client = session(2, False)
    client.receive(server.outgoing(), 0.0)
    assert client.buffered == INITIAL_PEER_WINDOW + 1000
    assert client.read(other, 5000) == b"y" * 1000


def test_write_copies_the_callers_buffer():
    server = session(1, True)
    sid = server.open_stream()
    buf = bytearray(b"abc")
    server.write(sid, buf)
    buf[:] = b"xyz"
    assert server.outgoing().endswith(b"abc")


# ---------------------------------------------------------------------- receive buffer


@pytest.mark.parametrize("version", [1, 2])
def test_receive_buffer_backpressure(version):
    client = session(version, False, receive_buffer=65536, stream_buffer=32768)
    client.receive(encode_frame(version, SYN, 3) + encode_frame(version, SYN, 5), 0.0)
    client.receive(encode_frame(version, PSH, 3, b"a" * 40000) + encode_frame(version, PSH, 5, b"b" * 25535), 0.0)
    assert client.buffered == 65535 and client.wants_input
    client.receive(encode_frame(version, PSH, 5, b"b"), 0.0)
    assert client.buffered == 65536 and not client.wants_input
    assert client.read(3, 1) == b"a"
    assert client.wants_input
    client.close_stream(5)  # dropping unread bytes frees the buffer too
    assert client.buffered == 39999


def test_many_small_reads_of_a_large_buffer():
    client = session(1, False)
    chunks = [bytes([i]) * 65535 for i in range(64)]
    client.receive(encode_frame(1, SYN, 3) + b"".join(encode_frame(1, PSH, 3, c) for c in chunks), 0.0)
    pieces = []
    while piece := client.read(3, 4096):
        pieces.append(piece)
    assert b"".join(pieces) == b"".join(chunks)
    assert client.buffered == 0


# ---------------------------------------------------------------------- keepalive


NOP_V1 = bytes.fromhex("01 03 00 00 00 00 00 00")


def test_keepalive_sends_nop_every_interval():
    server = session(1, True, now=100.0)
    assert server.next_deadline() == 120.0
    server.tick(119.9)
    assert not server.has_outgoing
    sent = []
    now = 100.0
    while now < 200.0:
        now += 1.0
        if now % 10 == 0:
            server.receive(NOP_V1, now)  # the peer keeps talking
        server.tick(now)
        if server.has_outgoing:
            sent.append((now, server.outgoing()))
    assert sent == [(t, NOP_V1) for t in (120.0, 140.0, 160.0, 180.0, 200.0)]
    assert server.next_deadline() == 220.0


def test_keepalive_nop_keeps_the_session_version():
    server = session(2, False)
    server.tick(20.0)
    assert server.outgoing() == bytes.fromhex("02 03 00 00 00 00 00 00")


def test_keepalive_timeout_after_silence():
    client = session(1, False)
    client.tick(39.9)
    with pytest.raises(ProtocolError, match="no smux frame from the peer for 40 s") as info:
        client.tick(40.0)
    assert info.value.remote


def test_keepalive_checks_since_the_previous_check():
    client = session(1, False)
    client.receive(NOP_V1, 30.0)
    client.tick(40.0)  # a frame since the start
    client.tick(79.0)
    with pytest.raises(ProtocolError, match="keepalive timeout"):
        client.tick(80.0)  # none since the check at 40


def test_keepalive_partial_frame_counts_as_life():
    client = session(1, False)
    client.receive(encode_frame(1, SYN, 3), 1.0)
    client.receive(encode_frame(1, PSH, 3, b"x" * 1000)[:500], 39.0)
    client.tick(40.0)


def test_no_death_while_frames_arrive():
    client = session(2, False)
    for second in range(1, 1000):
        if second % 30 == 0:
            client.receive(bytes.fromhex("02 03 00 00 00 00 00 00"), float(second))
        client.tick(float(second))
        client.outgoing()


def test_no_death_while_we_are_not_reading():
    # A full receive buffer means the I/O layer stopped reading: silence is then ours, not the peer's.
    client = session(1, False, receive_buffer=1000, stream_buffer=1000)
    client.receive(encode_frame(1, SYN, 3) + encode_frame(1, PSH, 3, b"x" * 1000), 1.0)
    assert not client.wants_input
    client.tick(40.0)
    client.tick(80.0)
    client.read(3, 10)
    with pytest.raises(ProtocolError):
        client.tick(120.0)


def test_late_tick_catches_up_once():
    server = session(1, True)
    server.receive(NOP_V1, 1.0)
    server.tick(1000.0)  # one NOP, one check (a frame came since the start), phases kept
    assert server.outgoing() == NOP_V1
    assert server.next_deadline() == 1020.0
    with pytest.raises(ProtocolError):
        server.tick(1040.0)


# ---------------------------------------------------------------------- stream lifetime


def test_half_close_forgets_the_stream_when_both_sides_are_done():
    client = session(2, False)
    client.receive(encode_frame(2, SYN, 3) + encode_frame(2, PSH, 3, b"data"), 0.0)
    client.shutdown_stream(3)
    assert 3 in client
    assert client.receive(encode_frame(2, FIN, 3), 0.0) == [StreamEnded(3)]
    assert 3 in client  # unread bytes keep it
    assert client.read(3, 100) == b"data"
    assert 3 not in client and len(client) == 0
    assert client.read(3, 100) is None


def test_ten_thousand_streams_leave_nothing_behind():
    server = session(2, True)
    client = session(2, False)
    for i in range(10000):
        sid = server.open_stream()
        assert server.write(sid, b"hi") == 2
        assert client.receive(server.outgoing(), 0.0) == [StreamOpened(sid), StreamData(sid)]
        assert client.read(sid, 10) == b"hi"
        if i % 2:
            client.close_stream(sid)
            assert server.receive(client.outgoing(), 0.0) == [StreamEnded(sid)]
            server.close_stream(sid)
            assert client.receive(server.outgoing(), 0.0) == []
        else:
            client.write(sid, b"ok")
            client.shutdown_stream(sid)
            server.shutdown_stream(sid)
            client.receive(server.outgoing(), 0.0)
            server.receive(client.outgoing(), 0.0)
            assert server.read(sid, 10) == b"ok"
            assert server.read(sid, 10) is None
    for side in (server, client):
        assert len(side) == 0 and side._streams == {}
        assert side.buffered == 0 and not side.has_outgoing and side._decoder.pending == 0


# ---------------------------------------------------------------------- round trip


class Wire:
    """One direction of an in-memory connection, delivering in random pieces when the receiver wants input."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.pending = bytearray()

    def deliver(self, receiver: Session, now: float) -> list:
        events = []
        while self.pending and receiver.wants_input:
            n = self.rng.randint(1, 40000)
            piece = bytes(self.pending[:n])
            del self.pending[:n]
            events += receiver.receive(piece, now)
        return events


@pytest.mark.parametrize("version", [1, 2])
def test_round_trip_one_mib_each_way_with_half_close(version):
    rng = random.Random(version)
    kwargs = {"frame_size": 16384, "receive_buffer": 100000, "stream_buffer": 65536, "outbox_cap": 300000}
    server = Session(version, True, **kwargs)
    client = Session(version, False, **kwargs)
    sids = [server.open_stream() for _ in range(4)]
    size = (1 << 20) // len(sids)
    outbound = {sid: rng.randbytes(size) for sid in sids}  # server -> client
    inbound = {sid: rng.randbytes(size + sid) for sid in sids}  # client -> server
    sent = {(side, sid): 0 for side in ("server", "client") for sid in sids}
    got = {(side, sid): [] for side in ("server", "client") for sid in sids}
    ended = set()
    opened = []
    stalled = {"server": 0, "client": 0}  # rounds a side had stopped reading its socket
    to_client, to_server = Wire(rng), Wire(rng)
    for _ in range(10000):
        for name, sess, payloads, live in (("server", server, outbound, sids), ("client", client, inbound, opened)):
            for sid in live:
                pos = sent[name, sid]
                while pos < len(payloads[sid]) and (n := sess.write(sid, payloads[sid][pos : pos + rng.randint(1, 50000)])):
                    pos += n
                    if pos == len(payloads[sid]):
                        sess.shutdown_stream(sid)
                sent[name, sid] = pos
        to_client.pending += server.outgoing()
        to_server.pending += client.outgoing()
        for name, sess, wire in (("client", client, to_client), ("server", server, to_server)):
            for event in wire.deliver(sess, 0.0):
                if isinstance(event, StreamOpened):
                    opened.append(event.sid)
                elif isinstance(event, StreamEnded):
                    ended.add((name, event.sid))
            for sid in sids:  # one read per stream and round: the receive buffers fill up
                if piece := sess.read(sid, rng.choice([7, 1000, 16384, 100000])):
                    got[name, sid].append(piece)
            stalled[name] += not sess.wants_input
        if len(server) == 0 and len(client) == 0 and not to_client.pending and not to_server.pending:
            break
    else:
        pytest.fail("the transfer did not finish")
    assert opened == sids
    assert stalled["server"] and stalled["client"]
    assert ended == {(side, sid) for side in ("server", "client") for sid in sids}
    for sid in sids:
        assert hashlib.sha256(b"".join(got["client", sid])).digest() == hashlib.sha256(outbound[sid]).digest()
        assert hashlib.sha256(b"".join(got["server", sid])).digest() == hashlib.sha256(inbound[sid]).digest()
    assert server.buffered == client.buffered == 0
