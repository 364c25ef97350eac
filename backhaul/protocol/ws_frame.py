"""The head of an unmasked WebSocket frame (RFC 6455 5.2), for a server's binary data.

A server's data frame is this head and the payload unchanged, so the payload can go to the
socket as it is (a gathered write) instead of being copied into one new buffer per frame.
Masked frames (a client's) and everything received stay with wsproto.
"""

from __future__ import annotations

import struct

BINARY = 0x2
FIN = 0x80
_SHORT = struct.Struct("!BB")      # fin/opcode, length up to 125
_MEDIUM = struct.Struct("!BBH")    # fin/opcode, 126, length up to 65535
_LONG = struct.Struct("!BBQ")      # fin/opcode, 127, length up to 2**63 - 1


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

