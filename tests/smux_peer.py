"""The test as one side of an smux session by hand: blocking frame I/O on a plain socket."""

from __future__ import annotations

import socket
import struct

from backhaul.protocol.smux import NOP, PSH, UPD, encode_frame
from tests.harness import recv_exact

FRAME = struct.Struct("<BBHI")  # ver, cmd, length, sid: smux's little-endian header


class Frames:
    """Blocking smux frame I/O on a raw socket, for a test that plays one side by hand."""

    def __init__(self, sock: socket.socket, version: int) -> None:
        self.sock = sock
        self.version = version

    def send(self, cmd: int, sid: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode_frame(self.version, cmd, sid, payload))

    def next(self) -> tuple[int, int, bytes]:
        """(cmd, sid, payload) of the next frame other than NOP and UPD."""
        while True:
            ver, cmd, length, sid = FRAME.unpack(recv_exact(self.sock, FRAME.size))
            assert ver == self.version, f"a version {ver} frame on a version {self.version} session"
            payload = recv_exact(self.sock, length) if length else b""
            if cmd not in (NOP, UPD):
                return cmd, sid, payload

    def expect(self, cmd: int, sid: int) -> bytes:
        got = self.next()
        assert got[:2] == (cmd, sid), f"expected cmd {cmd} on stream {sid}, got {got[:2]} ({got[2][:32]!r})"
        return got[2]

    def read(self, sid: int, size: int) -> list[bytes]:
        """The PSH payloads of stream ``sid`` that make ``size`` bytes."""
        pieces: list[bytes] = []
        total = 0
        while total < size:
            payload = self.expect(PSH, sid)
            pieces.append(payload)
            total += len(payload)
        assert total == size, f"{total} bytes on stream {sid}, expected {size}"
        return pieces


def lv(payload: bytes) -> bytes:
    return struct.pack(">H", len(payload)) + payload
