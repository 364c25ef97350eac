"""The smux stream link kind (tcpmux, wsmux, PROTOCOL.md 2): a link that is one stream of an smux
session (backhaul/mux/session.py), on either side, carrying one user connection after an LV
target header (and PROXY v2 when asked), relayed to its socket by the stream relay.
"""

from __future__ import annotations

import socket

from backhaul.mux.session import MuxStream
from backhaul.protocol.framing import encode_lv
from backhaul.reactor import Reactor
from backhaul.relay.stream import StreamRelay
from backhaul.tunnel.core import OnRelayClosed


class StreamLink:
    """A link that is an smux stream, on either side: relayed to its socket by the stream relay."""

    __slots__ = ("reactor", "stream")

    def __init__(self, reactor: Reactor, stream: MuxStream) -> None:
        self.reactor = reactor
        self.stream = stream

    def peer(self) -> tuple[str, int]:
        return self.stream.peer()

    def send_header(self, target: str, proxy: bytes) -> bool:
        try:
            self.stream.write_whole(encode_lv(target.encode()) + proxy)
        except OSError:
            return False
        return True

    def attach(self, other: socket.socket, on_close: OnRelayClosed) -> StreamRelay:
        relay = StreamRelay(self.reactor, other, self.stream, on_close=on_close)
        relay.start()
        return relay

    def close(self) -> None:
        self.stream.close()
