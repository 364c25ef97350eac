"""WebSocket frames (RFC 6455 5), without extensions: the frames a link sends, and a reader of
the frames it receives.

A server's data frame is a head (``frame_head``) and the payload unchanged, so the payload can go
to the socket as it is (a gathered write) instead of being copied into one new buffer per frame;
``frame`` builds a whole frame, masked with a fresh key when a client sends it.

``FrameReader`` checks what it reads as wsproto's frame engine does (its messages, word for
word, so a peer that breaks the protocol is named the same way), and hands out the payload of a
data frame as it arrives, without waiting for the rest of the frame. It is ours because a link's
first frames are most of what a short connection costs us in Python, and wsproto's generator
and per-frame objects cost several times what this does.
"""

from __future__ import annotations

import codecs
import struct

from backhaul.entropy import RANDOM

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FIN = 0x80
MASKED = 0x80
NO_STATUS = 1005                   # a Close frame without a code (RFC 6455 7.4.1)
MAX_CONTROL = 125                  # payload of a control frame
_OPCODES = frozenset((CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG))
_LOCAL_ONLY = frozenset((1005, 1006, 1015))   # codes a Close frame must not carry
_KNOWN_CODES = frozenset((1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1015))
_NAMES = {TEXT: "TEXT", BINARY: "BINARY", CLOSE: "CLOSE", PING: "PING", PONG: "PONG"}
_SHORT = struct.Struct("!BB")      # fin/opcode, length up to 125
_MEDIUM = struct.Struct("!BBH")    # fin/opcode, 126, length up to 65535
_LONG = struct.Struct("!BBQ")      # fin/opcode, 127, length up to 2**63 - 1
_XOR = [bytes(byte ^ key for byte in range(256)) for key in range(256)]   # byte -> byte XOR key, per key

Payload = bytes | str | tuple[int, str]
Frame = tuple[int, Payload, bool]   # opcode (a data frame's: its message's), payload, message finished


class FrameError(ValueError):
    """The peer broke the framing protocol; the text says how."""


def frame_head(length: int, opcode: int = BINARY, fin: bool = True) -> bytes:
    """The 2, 4 or 10 bytes before ``length`` payload bytes of an unmasked frame."""
    first = (FIN if fin else 0) | opcode
    if length <= 125:
        return _SHORT.pack(first, length)
    if length <= 0xFFFF:
        return _MEDIUM.pack(first, 126, length)
    if length < 1 << 63:
        return _LONG.pack(first, 127, length)
    raise ValueError(f"a frame of {length} bytes is past the 63-bit limit")


def mask(data: bytes | bytearray | memoryview, key: bytes, offset: int = 0) -> bytes:
    """``data`` XORed with the 4-byte ``key``, starting at byte ``offset`` of the key (the
    payload's position in its frame): masking and unmasking are the same. Every fourth byte
    is mapped through one table in C: a few times faster than Python integers on a frame."""
    out = bytearray(data)
    if offset & 3:
        key = key[offset & 3:] + key[:offset & 3]
    for lane in range(4):
        out[lane::4] = out[lane::4].translate(_XOR[key[lane]])
    return bytes(out)


def frame(payload: bytes | bytearray | memoryview | str, opcode: int = BINARY, *, masked: bool = False) -> bytes:
    """One whole frame: a str is a text message's (UTF-8), anything else goes as ``opcode``
    (binary unless said). A client's (``masked``) gets a fresh random key (RFC 6455 5.3)."""
    if isinstance(payload, str):
        payload = payload.encode()
        opcode = TEXT
    if opcode & 8 and len(payload) > MAX_CONTROL:
        raise ValueError("payload too long for control frame")
    head = frame_head(len(payload), opcode)
    if not masked:
        return head + payload
    key = RANDOM.randbytes(4)
    return b"".join((bytes((head[0], head[1] | MASKED)), head[2:], key, mask(payload, key)))


def close_frame(code: int, reason: str, *, masked: bool = False) -> bytes:
    """The Close frame that answers one with ``code`` and ``reason``: no code for NO_STATUS (the
    peer's had none), the reason cut to fit a control frame on a character's boundary."""
    if code == NO_STATUS:
        return frame(b"", CLOSE, masked=masked)
    data = reason.encode()
    if len(data) > MAX_CONTROL - 2:
        data = data[:MAX_CONTROL - 2].decode(errors="ignore").encode()
    return frame(struct.pack("!H", code) + data, CLOSE, masked=masked)


class FrameReader:
    """The frames in the bytes ``feed`` is given, one per ``next_frame`` (None: more bytes are
    needed). ``client``: frames come from a server (unmasked), else from a client (masked).

    A data frame's payload comes in pieces as its bytes arrive (``message_finished`` only with
    the last one of a message); a text message's as str, decoded across pieces. A control frame
    comes whole; a Close frame's payload is (code, reason) and nothing is read after it.
    FrameError on anything the protocol forbids; the reader is of no further use then.
    """

    __slots__ = ("client", "_buffer", "_left", "_opcode", "_fin", "_control", "_key", "_done", "_message",
                 "_decoder", "_closed")

    def __init__(self, client: bool) -> None:
        self.client = client
        self._buffer = bytearray()
        self._left = -1          # payload bytes of the frame at hand still to come; -1: a head comes next
        self._opcode = 0         # the frame at hand's
        self._fin = False
        self._control = False
        self._key = b""          # its masking key (a client's frame)
        self._done = 0           # its payload bytes handed out so far
        self._message = 0        # the opcode of the message being received, 0: none
        self._decoder: codecs.IncrementalDecoder | None = None   # its UTF-8, for a text message
        self._closed = False     # a Close frame was read

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        if self._closed:
            return None
        if self._left < 0 and not self._head():
            return None
        buffer = self._buffer
        left = self._left
        if self._control:
            if len(buffer) < left:
                return None
            count = left
        else:
            count = min(left, len(buffer))
            if not count and left:
                return None
        if count == len(buffer):
            piece = buffer             # all of it: handed over, not copied
            self._buffer = bytearray()
        else:
            piece = buffer[:count]
            del buffer[:count]
        payload = mask(piece, self._key, self._done) if self._key else bytes(piece)
        self._done += count
        self._left = left = left - count
        if self._control:
            self._left = -1
            if self._opcode == CLOSE:
                self._closed = True
                return CLOSE, _close_payload(payload), True
            return self._opcode, payload, True
        return self._data(payload, left == 0)

    def _head(self) -> bool:
        """Read a frame's head if it is all here; the checks in wsproto's order."""
        buffer = self._buffer
        size = len(buffer)
        if size < 2:
            return False
        first, second = buffer[0], buffer[1]
        opcode = first & 0x0F
        if opcode not in _OPCODES:
            raise FrameError(f"Invalid opcode {opcode:#x}")
        fin = bool(first & FIN)
        control = bool(opcode & 8)
        if control and not fin:
            raise FrameError("Invalid attempt to fragment control frame")
        length = second & 0x7F
        if control and length > MAX_CONTROL:
            raise FrameError("Control frame with payload len > 125")
        at = 2
        if length == 126:
            if size < 4:
                return False
            length = (buffer[2] << 8) | buffer[3]
            if length <= MAX_CONTROL:
                raise FrameError("Payload length used 2 bytes when 1 would have sufficed")
            at = 4
        elif length == 127:
            if size < 10:
                return False
            length = int.from_bytes(buffer[2:10], "big")
            if length <= 0xFFFF:
                raise FrameError("Payload length used 8 bytes when 2 would have sufficed")
            if length >> 63:
                raise FrameError("8-byte payload length with non-zero MSB")
            at = 10
        if first & 0x70:
            raise FrameError("Reserved bit set unexpectedly")
        masked = bool(second & MASKED)
        if masked and self.client:
            raise FrameError("client received unexpected masked frame")
        if not masked and not self.client:
            raise FrameError("server received unexpected unmasked frame")
        if masked:
            if size < at + 4:
                return False
            self._key = bytes(buffer[at:at + 4])
            at += 4
        else:
            self._key = b""
        del buffer[:at]
        self._opcode, self._fin, self._control = opcode, fin, control
        self._left, self._done = length, 0
        return True

    def _data(self, payload: bytes, frame_finished: bool) -> Frame:
        """A piece of a data frame, as a piece of its message."""
        first_piece = self._done == len(payload)   # this frame's first piece: its opcode counts
        if first_piece:
            opcode = self._opcode
            if self._message == 0:
                if opcode == CONTINUATION:
                    raise FrameError("unexpected CONTINUATION")
                self._message = opcode
            elif opcode != CONTINUATION:
                raise FrameError(f"expected CONTINUATION, got <Opcode.{_NAMES[opcode]}: {opcode}>")
            if opcode == TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
        message = self._message
        finished = frame_finished and self._fin
        data: bytes | str = payload
        if self._decoder is not None:
            try:
                data = self._decoder.decode(payload, finished)
            except UnicodeDecodeError as exc:
                raise FrameError(str(exc)) from None
        if finished:
            self._message = 0
            self._decoder = None
        if frame_finished:
            self._left = -1
        return message, data, finished


def _close_payload(data: bytes) -> tuple[int, str]:
    """A Close frame's code and reason, checked as wsproto checks them."""
    if not data:
        return NO_STATUS, ""
    if len(data) == 1:
        raise FrameError("CLOSE with 1 byte payload")
    code = (data[0] << 8) | data[1]
    if not 1000 <= code <= 4999:
        raise FrameError("CLOSE with invalid code")
    if code in _LOCAL_ONLY:
        raise FrameError("remote CLOSE with local-only reason")
    if code not in _KNOWN_CODES and code <= 2999:
        raise FrameError("CLOSE with unknown reserved code")
    try:
        reason = data[2:].decode()
    except UnicodeDecodeError as exc:
        raise FrameError("Error decoding CLOSE reason: " + str(exc)) from None
    return code, reason
