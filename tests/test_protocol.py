"""Codecs on exact byte vectors (PROTOCOL.md 1.5 and the captured Go conversations); no sockets."""

from __future__ import annotations

import pytest

from backhaul.errors import ProtocolError
from backhaul.protocol.chunks import LARGE, ChunkQueue
from backhaul.protocol.framing import (
    SG_CHAN,
    SG_RTT,
    SG_TCP,
    SG_UDP,
    FrameReader,
    encode_ltv,
    encode_lv,
)
from backhaul.protocol.handshake import client_accepts, hello, hello_reader, server_accepts
from backhaul.protocol.proxy_v2 import encode_proxy_v2
from backhaul.protocol.target import DEFAULT_HOST, resolve_target

pytestmark = pytest.mark.timeout(10)


def test_hello_is_the_go_handshake_frame():
    assert hello("musix") == bytes.fromhex("00 05 01 6d 75 73 69 78")


def test_target_header_of_protocol_example():
    assert encode_ltv(SG_TCP, b"8443") == bytes.fromhex("00 04 04 38 34 34 33")


def test_target_headers_of_captured_conversations():
    assert encode_ltv(SG_TCP, b"35133") == bytes.fromhex("00 05 04 33 35 31 33 33")
    assert encode_ltv(SG_UDP, b"32945") == bytes.fromhex("00 05 05 33 32 39 34 35")


def test_lv_has_no_type_byte():
    assert encode_lv(b"1.1.1.1:5201") == bytes.fromhex("00 0c 31 2e 31 2e 31 2e 31 3a 35 32 30 31")


def test_encode_refuses_a_string_longer_than_u16():
    with pytest.raises(ProtocolError, match="does not fit a u16 length"):
        encode_ltv(SG_TCP, b"x" * 65536)


def test_reader_parses_server_reply_followed_by_rtt_probe():
    # The Go server's reply and its RTT probe arrive in one read (vectors/tcp.txt).
    reader = hello_reader()
    rest = reader.feed(bytes.fromhex("00 05 01 6d 75 73 69 78 06"))
    assert reader.done and reader.kind == SG_CHAN and reader.payload == b"musix"
    assert rest == bytes((SG_RTT,))
    assert client_accepts(reader, "musix")


@pytest.mark.parametrize("split", range(1, 8))
def test_reader_accepts_any_split(split):
    frame = bytes.fromhex("00 05 04 33 35 31 33 33")
    reader = FrameReader(typed=True)
    assert reader.needed() == 3
    assert reader.feed(frame[:split]) == b""
    assert reader.needed() == (3 - split if split < 3 else len(frame) - split)
    assert reader.feed(frame[split:]) == b""
    assert (reader.kind, reader.payload, reader.needed()) == (SG_TCP, b"35133", 0)


def test_reader_one_byte_at_a_time_never_asks_past_the_frame():
    frame = encode_ltv(SG_TCP, b"8443") + b"user bytes"
    reader = FrameReader(typed=True)
    taken = 0
    while not reader.done:
        step = reader.needed()
        assert step > 0
        reader.feed(frame[taken:taken + 1])
        taken += 1
    assert taken == 7 and reader.payload == b"8443"


def test_reader_of_empty_string():
    reader = FrameReader(typed=True)
    reader.feed(b"\x00\x00\x01")
    assert reader.done and reader.payload == b""


def test_reader_enforces_its_length_limit():
    reader = FrameReader(typed=True, max_length=16)
    with pytest.raises(ProtocolError, match="frame length 18245 exceeds the limit of 16"):
        reader.feed(b"GET / HTTP/1.1\r\n")


def test_untyped_reader():
    reader = FrameReader(typed=False)
    assert reader.feed(bytes.fromhex("00 04 38 34 34 33 ff")) == b"\xff"
    assert reader.kind is None and reader.payload == b"8443"


def test_server_checks_type_then_token():
    good = hello_reader()
    good.feed(hello("musix"))
    assert server_accepts(good, "musix")
    assert not server_accepts(good, "other")
    wrong_type = hello_reader()
    wrong_type.feed(encode_ltv(SG_TCP, b"musix"))
    with pytest.raises(ProtocolError, match="handshake frame has type 0x04, expected 0x01"):
        server_accepts(wrong_type, "musix")


def test_client_ignores_the_type_byte_of_the_reply():
    reply = hello_reader()
    reply.feed(encode_ltv(0x7F, b"musix"))
    assert client_accepts(reply, "musix")
    assert not client_accepts(reply, "musix2")


@pytest.mark.parametrize(("target", "address"), [
    ("8443", (DEFAULT_HOST, 8443)),
    ("1.1.1.1:5201", ("1.1.1.1", 5201)),
    ("db.local:5432", ("db.local", 5432)),
])
def test_resolve_target(target, address):
    assert resolve_target(target) == address


@pytest.mark.parametrize(("target", "message"), [
    ("[::1]:80", "invalid target '[::1]:80': expected port or host:port"),
    ("web", "invalid target 'web': 'web' is not a port number"),
    ("host:http", "invalid target 'host:http': 'http' is not a port number"),
    ("70000", "invalid target '70000': '70000' is not a port number"),
    (":80", "invalid target ':80': expected port or host:port"),
])
def test_resolve_target_refuses(target, message):
    with pytest.raises(ProtocolError) as info:
        resolve_target(target)
    assert str(info.value) == message


def test_proxy_v2_ipv4():
    header = encode_proxy_v2(("192.0.2.1", 51000), ("198.51.100.2", 3080))
    assert header == bytes.fromhex(
        "0d0a0d0a000d0a515549540a" "21" "11" "000c" "c0000201" "c6336402" "c738" "0c08")


def test_proxy_v2_mixed_families_use_mapped_ipv6():
    header = encode_proxy_v2(("192.0.2.1", 1), ("2001:db8::1", 2))
    assert header[12:16] == bytes.fromhex("21 21 00 24")
    assert header[16:32] == bytes.fromhex("00000000000000000000ffffc0000201")
    assert header[32:48] == bytes.fromhex("20010db8000000000000000000000001")
    assert header[48:] == bytes.fromhex("0001 0002")
    assert len(header) == 16 + 36


def test_chunk_queue_joins_small_chunks_and_hands_large_ones_out_alone():
    queue = ChunkQueue()
    small = [bytes([i]) * 1000 for i in range(5)]
    large = b"L" * LARGE
    for chunk in [*small[:3], large, *small[3:]]:
        queue.append(chunk)
    assert queue.size == 5000 + LARGE
    assert queue.take(2500) == small[0] + small[1] + small[2][:500]  # joined, cut inside a chunk
    assert queue.take(1 << 20) == small[2][500:]  # the large chunk is not joined to it ...
    got = queue.take(1 << 20)
    assert got is large  # ... it comes alone, not copied
    assert queue.take(100) == small[3][:100]
    assert queue.take(1 << 20) == small[3][100:] + small[4]
    assert queue.size == 0 and not queue
    queue.append(large)
    assert queue.take(10) == b"L" * 10 and queue.take(LARGE) == b"L" * (LARGE - 10) and queue.size == 0
