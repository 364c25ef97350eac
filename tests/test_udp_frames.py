"""accept_udp frames (PROTOCOL.md 4.1) on the captured Go conversation and exact bytes; no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from backhaul.errors import ProtocolError
from backhaul.protocol.framing import SG_UDP, FrameReader, encode_ltv
from backhaul.protocol.udp_frames import (
    MAX_DATAGRAM,
    TS_WINDOW,
    CongestionWatch,
    FrameDecoder,
    encode_down,
    encode_up,
    frame_age,
)

pytestmark = pytest.mark.timeout(10)

VECTORS = Path(__file__).parent / "vectors"
DATAGRAMS = [b"hello backhaul", b"second datagram"]
STAMP = 0x00042B5B   # the Go client's timestamp in the capture (unix ms mod 10 min)


def load(name: str, conn: str) -> list[tuple[str, bytes]]:
    """The reads of one connection of a capture, in order, as (direction, bytes)."""
    reads = []
    for line in (VECTORS / name).read_text().splitlines():
        parts = line.split()
        if len(parts) < 5 or line.startswith("#") or not parts[3].endswith("B"):
            continue
        data = bytes.fromhex(" ".join(parts[4:]))
        assert len(data) == int(parts[3][:-1])
        if parts[1] == conn:
            reads.append((parts[2], data))
    return reads


def stream(way: str) -> bytes:
    return b"".join(data for w, data in load("tcp-accept-udp.txt", "conn2") if w == way)


def splits(whole: bytes) -> dict[str, list[bytes]]:
    return {
        "whole": [whole],
        "bytewise": [whole[i:i + 1] for i in range(len(whole))],
        "by-5": [whole[i:i + 5] for i in range(0, len(whole), 5)],
        "by-7": [whole[i:i + 7] for i in range(0, len(whole), 7)],
    }


SPLITS = ["whole", "bytewise", "by-5", "by-7"]


def test_server_to_client_bytes_are_the_go_servers():
    """Catches: a wrong header type, or frames the Go server would not have sent."""
    wire = encode_ltv(SG_UDP, b"32945") + b"".join(encode_down(d) for d in DATAGRAMS)
    assert wire == stream("S>C")


def test_client_to_server_bytes_are_the_go_clients():
    """Catches: a wrong timestamp (window, width, byte order) or length placement."""
    now_ms = 1_700_000_000_000 - (1_700_000_000_000 % TS_WINDOW) + STAMP   # a unix time with that stamp
    assert b"".join(encode_up(d, now_ms) for d in DATAGRAMS) == stream("C>S")


@pytest.mark.parametrize("split", SPLITS)
def test_client_decodes_the_go_server(split):
    """Catches: a decoder that loses or merges datagrams across reads, or reads the header as data."""
    header = FrameReader(typed=True)
    decoder = FrameDecoder(timestamped=False)
    got = []
    for piece in splits(stream("S>C"))[split]:
        rest = piece if header.done else header.feed(piece)
        if rest:
            got += decoder.feed(rest)
    assert header.kind == SG_UDP and header.payload == b"32945"
    assert got == DATAGRAMS
    assert decoder.pending == 0


@pytest.mark.parametrize("split", SPLITS)
def test_server_decodes_the_go_client(split):
    """Catches: timestamps not split off, or not reported per datagram."""
    decoder = FrameDecoder(timestamped=True)
    got, stamps = [], []
    for piece in splits(stream("C>S"))[split]:
        got += decoder.feed(piece)
        stamps += decoder.timestamps
    assert got == DATAGRAMS
    assert stamps == [STAMP, STAMP]


def test_empty_and_largest_datagrams():
    """Catches: an empty datagram dropped, or the largest one refused."""
    decoder = FrameDecoder(timestamped=False)
    big = bytes(range(256)) * (MAX_DATAGRAM // 256)
    assert decoder.feed(encode_down(b"") + encode_down(big)) == [b"", big]
    assert encode_up(b"", 5) == bytes.fromhex("00 00 00 05 00 00")


@pytest.mark.parametrize("timestamped", [False, True])
def test_a_length_past_the_limit_is_refused(timestamped):
    """Catches: a frame whose length lies being trusted (the Go receivers close at > 16384)."""
    decoder = FrameDecoder(timestamped=timestamped)
    head = bytes(4) if timestamped else b""
    good = head + b"\x00\x01x"
    with pytest.raises(ProtocolError, match="16385 bytes"):
        decoder.feed(good + head + b"\x40\x01" + b"y" * 10)


def test_the_sender_refuses_a_datagram_longer_than_a_peer_takes():
    with pytest.raises(ProtocolError, match="16385 bytes") as err:
        encode_down(b"x" * (MAX_DATAGRAM + 1))
    assert not err.value.remote
    with pytest.raises(ProtocolError):
        encode_up(b"x" * (MAX_DATAGRAM + 1), 0)


def test_frame_age_across_the_ten_minute_wrap():
    assert frame_age(599_990, 1_200_000 + 10) == 20
    assert frame_age(100, 600_000 + 50) == -50
    assert frame_age(0, 1_000) == 1_000


def test_congestion_is_queueing_past_three_rtts():
    """Catches: the limit off by one, or a LAN's RTT of 1 ms (or 0, Go's 100 ms) splitting flows
    after a few ms of queueing."""
    watch = CongestionWatch(400)
    assert watch.limit == 1200
    now = 10_000_000
    assert not watch.congested((now - 20) % TS_WINDOW, now)
    assert not watch.congested((now - 1220) % TS_WINDOW, now)          # 1200 ms above the fastest
    assert watch.congested((now - 1221) % TS_WINDOW, now)
    assert CongestionWatch(0).limit == CongestionWatch(1).limit == CongestionWatch(333).limit == 1000


@pytest.mark.parametrize("skew", [-5_000, 0, 5_000])
def test_congestion_ignores_clock_skew(skew):
    """Catches: ages taken from two clocks as they are, which flags every flow (or none) when
    the hosts' clocks differ by more than 3 RTTs."""
    watch = CongestionWatch(500)
    now = 50_000_000
    for delay in (40, 60, 50, 1540):          # all within 1500 ms of the fastest
        assert not watch.congested((now - delay + skew) % TS_WINDOW, now)
    assert watch.congested((now - 1541 + skew) % TS_WINDOW, now)
