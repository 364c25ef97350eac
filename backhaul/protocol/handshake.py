"""The control-channel token handshake of the tcp family (PROTOCOL.md 1.2).

Both directions carry one LTV frame of type SG_CHAN holding a token; the server checks the
type and compares in constant time, the client ignores the type and compares the token.
"""

from __future__ import annotations

import hmac

from backhaul.errors import ProtocolError
from backhaul.protocol.framing import SG_CHAN, FrameReader, encode_ltv

HANDSHAKE_TIMEOUT = 2.0


def hello(token: str) -> bytes:
    """The frame either side sends: its own token, type SG_CHAN."""
    return encode_ltv(SG_CHAN, token.encode())


def hello_reader() -> FrameReader:
    return FrameReader(typed=True)


def server_accepts(frame: FrameReader, token: str) -> bool:
    """Server side: True when the client's frame is SG_CHAN with our token.

    A frame of another type is a protocol error (the peer is not a Backhaul client).
    """
    if frame.kind != SG_CHAN:
        raise ProtocolError(f"handshake frame has type 0x{frame.kind:02x}, expected 0x01")
    return hmac.compare_digest(frame.payload or b"", token.encode())


def client_accepts(frame: FrameReader, token: str) -> bool:
    """Client side: the type byte is ignored, as the Go client does."""
    return hmac.compare_digest(frame.payload or b"", token.encode())
