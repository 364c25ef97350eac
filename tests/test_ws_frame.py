"""The WebSocket frame codec (protocol/ws_frame.py) on exact bytes, no sockets: what we send is
RFC 6455's bytes, what we read is what wsproto's frame engine reads from the same bytes, split
anywhere, and every violation is refused with wsproto's words."""

from __future__ import annotations

import random

import pytest
from wsproto.frame_protocol import FrameProtocol, ParseFailed

from backhaul.protocol.ws_frame import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    FrameError,
    FrameReader,
    close_frame,
    frame,
    mask,
)

pytestmark = pytest.mark.timeout(30)

KEY = bytes.fromhex("37fa213d")


def read_all(reader: FrameReader) -> list[tuple[int, object, bool]]:
    frames = []
    while (got := reader.next_frame()) is not None:
        frames.append(got)
    return frames


def test_frames_we_send_are_the_rfc_bytes() -> None:
    """Catches: a wrong head (FIN, opcode, length forms), a mask bit on a server's frame or none
    on a client's, a masked payload that does not unmask to the original (RFC 6455 5.7)."""
    assert frame(b"Hello") == bytes.fromhex("820548656c6c6f")
    assert frame("Hello") == bytes.fromhex("810548656c6c6f")                  # RFC 6455 5.7: a text frame
    assert frame(b"x" * 126)[:4] == bytes.fromhex("827e007e")
    assert frame(b"x" * 65536)[:10] == bytes.fromhex("827f0000000000010000")
    assert frame(b"", CLOSE) == b"\x88\x00"
    masked = frame("Hello", masked=True)
    assert masked[:2] == b"\x81\x85" and len(masked) == 2 + 4 + 5
    assert mask(masked[6:], masked[2:6]) == b"Hello"
    # RFC 6455 5.7's masked "Hello" with its key
    assert mask(b"Hello", KEY) == bytes.fromhex("7f9f4d5158")
    assert mask(b"llo", KEY, 2) == bytes.fromhex("4d5158")                    # the key goes on where it was
    with pytest.raises(ValueError, match="control frame"):
        frame(b"x" * 126, PING)


def test_close_answers_carry_the_code_and_a_reason_that_fits() -> None:
    """Catches: a code sent back for a Close without one (1005 must never be on the wire), a
    reason past a control frame's 125 bytes, a character cut in half."""
    assert close_frame(1005, "") == b"\x88\x00"
    assert close_frame(1000, "bye") == b"\x88\x05\x03\xe8bye"
    long = close_frame(1001, "é" * 100)
    assert len(long) == 2 + 125 - 1 and long[4:].decode() == "é" * 61


@pytest.mark.parametrize("client", [True, False])
def test_the_reader_reads_what_wsproto_reads_split_anywhere(client: bool) -> None:
    """Catches: a payload cut, joined or reordered across pieces, a mask applied from the wrong
    key byte after a split, a continuation's opcode not its message's, text decoded per piece
    (a character split between reads), a control frame handed out before it is whole."""
    rng = random.Random(7)
    sender = FrameProtocol(not client, [])
    wire = bytearray()
    for _ in range(60):
        kind = rng.choice(("binary", "text", "fragments", "ping", "pong"))
        if kind == "binary":
            wire += sender.send_data(rng.randbytes(rng.choice((0, 1, 125, 126, 4000, 70000))), True)
        elif kind == "text":
            wire += sender.send_data("zé€😀" * rng.randrange(0, 40), True)
        elif kind == "fragments":
            wire += sender.send_data("a€", False) + sender.ping(b"in between") + sender.send_data("b", True)
        else:
            wire += (sender.ping if kind == "ping" else sender.pong)(rng.randbytes(rng.randrange(0, 126)))
    wire += sender.close(1000, "done") + sender.send_data(b"after the close", True)

    def pieces(split: int) -> list[bytes]:
        cut = random.Random(split)
        out, at = [], 0
        while at < len(wire):
            step = cut.choice((1, 2, 3, 7, 100, 5000))
            out.append(bytes(wire[at:at + step]))
            at += step
        return out

    def squash(frames: list[tuple[int, object, bool]]) -> list[tuple[int, object]]:
        """Pieces of a message joined: how a piece boundary falls is the reads', not the data's."""
        out: list[tuple[int, object]] = []
        parts: list[bytes | str] = []
        for opcode, payload, finished in frames:
            if opcode in (BINARY, TEXT):
                parts.append(payload)
                if finished:
                    out.append((opcode, ("" if opcode == TEXT else b"").join(parts)))  # type: ignore[arg-type]
                    parts = []
            else:
                out.append((opcode, payload))
        return out

    oracle = FrameProtocol(client, [])
    expected = []
    for piece in pieces(1):
        oracle.receive_bytes(piece)
        expected += [(int(f.opcode), f.payload if not isinstance(f.payload, tuple) else
                      (int(f.payload[0]), f.payload[1]), f.message_finished) for f in oracle.received_frames()]
    for split in (1, 2, 3):
        reader = FrameReader(client)
        got = []
        for piece in pieces(split):
            reader.feed(piece)
            got += read_all(reader)
        assert squash(got) == squash(expected), split
    assert got[-1] == (CLOSE, (1000, "done"), True)      # nothing read after the Close


def test_a_data_frame_is_handed_out_as_it_arrives() -> None:
    """Catches: a reader that holds a large frame until its last byte (memory and delay per
    link), or hands out a control frame before it is whole."""
    whole = frame(b"abcdefgh" * 1000, masked=True)
    reader = FrameReader(client=False)
    reader.feed(whole[:2000])
    opcode, first, finished = reader.next_frame()  # type: ignore[misc]
    assert (opcode, finished) == (BINARY, False) and first == (b"abcdefgh" * 1000)[:2000 - 8]
    reader.feed(whole[2000:])
    opcode, rest, finished = reader.next_frame()  # type: ignore[misc]
    assert finished and first + rest == b"abcdefgh" * 1000
    ping = frame(b"0123456789", PING)
    client = FrameReader(client=True)
    client.feed(ping[:5])
    assert client.next_frame() is None
    client.feed(ping[5:])
    assert client.next_frame() == (PING, b"0123456789", True)


@pytest.mark.parametrize(("client", "wire", "words"), [
    (False, b"\x82\x01x", "server received unexpected unmasked frame"),
    (True, b"\x82\x81" + KEY + b"x", "client received unexpected masked frame"),
    (True, b"\x83\x00", "Invalid opcode 0x3"),
    (True, b"\xc2\x00", "Reserved bit set unexpectedly"),
    (True, b"\x09\x00", "Invalid attempt to fragment control frame"),
    (True, b"\x89\x7e\x00\x7e", "Control frame with payload len > 125"),
    (True, b"\x82\x7e\x00\x05hello", "Payload length used 2 bytes when 1 would have sufficed"),
    (True, b"\x82\x7f" + (5).to_bytes(8, "big"), "Payload length used 8 bytes when 2 would have sufficed"),
    (True, b"\x82\x7f" + (1 << 63).to_bytes(8, "big"), "8-byte payload length with non-zero MSB"),
    (True, b"\x80\x01x", "unexpected CONTINUATION"),
    (True, b"\x02\x01x\x82\x01y", "expected CONTINUATION, got <Opcode.BINARY: 2>"),
    (True, b"\x81\x02\xc3\x28", "invalid continuation byte"),
    (True, b"\x81\x01\xc3", "unexpected end of data"),
    (True, b"\x88\x01\x03", "CLOSE with 1 byte payload"),
    (True, b"\x88\x02\x03\x00", "CLOSE with invalid code"),
    (True, b"\x88\x02\x03\xed", "remote CLOSE with local-only reason"),
    (True, b"\x88\x02\x07\xd0", "CLOSE with unknown reserved code"),
    (True, b"\x88\x03\x03\xe8\xff", "Error decoding CLOSE reason"),
])
def test_violations_are_refused_in_wsproto_words(client: bool, wire: bytes, words: str) -> None:
    """Catches: a frame the protocol forbids taken as data, or refused with other words than
    the ones operators read in the log before (wsproto's)."""
    reader = FrameReader(client)
    reader.feed(wire)
    with pytest.raises(FrameError) as ours:
        read_all(reader)
    oracle = FrameProtocol(client, [])
    oracle.receive_bytes(wire)
    with pytest.raises(ParseFailed) as theirs:
        list(oracle.received_frames())
    assert str(ours.value) == str(theirs.value)
    assert words in str(ours.value)


def test_continuations_take_their_message_s_opcode_and_pongs_come_through() -> None:
    """Catches: a continuation handed out as opcode 0 (its bytes lost by the link), a pong
    mistaken for data."""
    reader = FrameReader(client=True)
    reader.feed(b"\x01\x02ab" + b"\x8a\x01p" + b"\x80\x01c")
    assert read_all(reader) == [(TEXT, "ab", False), (PONG, b"p", True), (TEXT, "c", True)]
