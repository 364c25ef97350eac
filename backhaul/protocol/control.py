"""Single-byte control messages on an established control channel (PROTOCOL.md 1.3).

The client must act on every byte and treats an unknown one as a protocol error; the server
acts only on SG_CLOSED and SG_RTT and ignores the rest, as the Go server does.
"""

from __future__ import annotations

from backhaul.errors import ProtocolError
from backhaul.protocol.framing import SG_CHAN, SG_CLOSED, SG_HB, SG_RTT

CLIENT_KNOWN = frozenset((SG_HB, SG_CHAN, SG_CLOSED, SG_RTT))
SERVER_KNOWN = frozenset((SG_CLOSED, SG_RTT))


def client_signals(data: bytes) -> list[int]:
    """Signals a client received, in order; ProtocolError on the first unknown byte."""
    for byte in data:
        if byte not in CLIENT_KNOWN:
            raise ProtocolError(f"unexpected control byte 0x{byte:02x} from the server")
    return list(data)


def server_signals(data: bytes) -> list[int]:
    """Signals a server acts on, in order; everything else is ignored."""
    return [byte for byte in data if byte in SERVER_KNOWN]
