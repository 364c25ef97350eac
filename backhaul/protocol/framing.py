"""Signal bytes and the length-prefixed strings (LV, LTV) of the Backhaul v0.7 wire protocol.

Lengths are u16 big-endian; an LTV frame carries one type byte after the length that the
length does not count. The reader is sans-IO so it can be fed by any transport.
"""

from __future__ import annotations

import struct

from backhaul.errors import ProtocolError

SG_HB = 0x00
SG_CHAN = 0x01
SG_PING = 0x02
SG_CLOSED = 0x03
SG_TCP = 0x04
SG_UDP = 0x05
SG_RTT = 0x06

MAX_STRING = 0xFFFF
_U16 = struct.Struct(">H")


def encode_lv(payload: bytes) -> bytes:
    """BinaryString: ``u16 BE length | payload``."""
    _check_length(payload)
    return _U16.pack(len(payload)) + payload


def encode_ltv(kind: int, payload: bytes) -> bytes:
    """BinaryTransportString: ``u16 BE length | u8 type | payload`` (length excludes the type)."""
    _check_length(payload)
    return _U16.pack(len(payload)) + bytes((kind,)) + payload


def _check_length(payload: bytes) -> None:
    if len(payload) > MAX_STRING:
        raise ProtocolError(f"string of {len(payload)} bytes does not fit a u16 length", remote=False)


class FrameReader:
    """Incremental reader of one LV or LTV frame.

    Call ``needed()`` to learn how many more bytes complete the frame, so a socket reader can ask
    for exactly that many and never consume bytes that belong to whatever follows the frame.
    """

    __slots__ = ("_typed", "_buf", "_length", "_max", "kind", "payload")

    def __init__(self, typed: bool, max_length: int = MAX_STRING) -> None:
        self._typed = typed
        self._buf = bytearray()
        self._length: int | None = None
        self.kind: int | None = None
        self.payload: bytes | None = None
        self._max = max_length

    @property
    def done(self) -> bool:
        return self.payload is not None

    def needed(self) -> int:
        """Bytes still missing; 0 once the frame is complete."""
        if self.payload is not None:
            return 0
        head = 3 if self._typed else 2
        if self._length is None:
            return head - len(self._buf)
        return head + self._length - len(self._buf)

    def feed(self, data: bytes) -> bytes:
        """Take bytes; return those beyond the end of the frame (usually none)."""
        if self.payload is not None:
            return bytes(data)
        head = 3 if self._typed else 2
        take = self.needed()
        self._buf += data[:take]
        rest = bytes(data[take:])
        if self._length is None and len(self._buf) >= head:
            (self._length,) = _U16.unpack_from(self._buf)
            if self._typed:
                self.kind = self._buf[2]
            if self._length > self._max:
                raise ProtocolError(f"frame length {self._length} exceeds the limit of {self._max}")
            if rest:
                return self.feed(rest)
        if self._length is not None and len(self._buf) == head + self._length:
            self.payload = bytes(self._buf[head:])
        return rest
