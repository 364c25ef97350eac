"""The client's side of docs/auth.md on the ws family: the challenge inside the upgraded /channel.

Blocking, on the client's supervising thread, like the rest of its handshake. It reads one
WebSocket frame at a time (header first, then exactly the frame) so that no byte behind WELCOME
leaves the socket: those belong to the control channel, whose websocket starts after this.
"""

from __future__ import annotations

import secrets
import socket
import time

from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping

from backhaul.errors import ProtocolError
from backhaul.protocol import auth
from backhaul.protocol.auth import ClientHandshake, LinkSigner
from backhaul.protocol.framing import FrameReader
from backhaul.protocol.handshake import HANDSHAKE_TIMEOUT


class _ExactReader:
    """Blocking reads of exactly what is asked for, after the bytes already read; by a deadline."""

    def __init__(self, sock: socket.socket, buffered: bytes, deadline: float) -> None:
        self.sock = sock
        self.buffered = bytearray(buffered)
        self.deadline = deadline

    def take(self, size: int) -> bytes:
        while len(self.buffered) < size:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            data = self.sock.recv(size - len(self.buffered))
            if not data:
                raise ProtocolError("the server closed the connection during the challenge: a wrong token, or a "
                                    'server without auth = "challenge"')
            self.buffered += data
        taken = bytes(self.buffered[:size])
        del self.buffered[:size]
        return taken


CHALLENGE_FRAME_LIMIT = 1024   # the server's challenge frames are 37 bytes on the wire


def _read_message(sock: socket.socket, conn: Connection, reader: _ExactReader) -> bytes:
    """The next binary message, read one WebSocket frame at a time so that no byte behind it
    leaves the socket (it belongs to the control channel); pings are answered."""
    parts: list[bytes] = []
    while True:
        head = reader.take(2)
        size = head[1] & 0x7F
        extra = {126: 2, 127: 8}.get(size, 0)
        more = reader.take(extra) if extra else b""
        if extra:
            size = int.from_bytes(more, "big")
        mask = reader.take(4) if head[1] & 0x80 else b""
        if size > CHALLENGE_FRAME_LIMIT:
            raise ProtocolError(f"a websocket frame of {size} bytes during the challenge")
        conn.receive_data(head + more + mask + reader.take(size))
        for event in conn.events():
            if isinstance(event, Ping):
                sock.sendall(conn.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise ProtocolError(f"the server closed the websocket during the challenge ({event.reason})")
            elif isinstance(event, Message):
                if not isinstance(event.data, bytes):
                    raise ProtocolError("a text message during the challenge")
                parts.append(event.data)
                if sum(map(len, parts)) > CHALLENGE_FRAME_LIMIT:
                    raise ProtocolError("a challenge message longer than any the challenge has")
                if event.message_finished:
                    return b"".join(parts)


def _frame(message: bytes) -> tuple[int | None, bytes | None]:
    reader = FrameReader(typed=True)
    if reader.feed(message) or not reader.done:
        raise ProtocolError("a challenge message that is not one whole frame")
    return reader.kind, reader.payload


def challenge(sock: socket.socket, token: str, buffered: bytes) -> tuple[LinkSigner, bytes]:
    """docs/auth.md inside the upgraded /channel (blocking): HELLO, CHALLENGE, PROOF, WELCOME as
    one binary message each. The signer of the session's links, and the bytes read past WELCOME."""
    conn = Connection(ConnectionType.CLIENT)
    reader = _ExactReader(sock, buffered, time.monotonic() + HANDSHAKE_TIMEOUT)
    client = ClientHandshake(token, secrets.token_bytes(auth.NONCE_SIZE))
    try:
        sock.sendall(conn.send(BytesMessage(data=client.hello())))
        proof = client.answer(*_frame(_read_message(sock, conn, reader)))
        sock.sendall(conn.send(BytesMessage(data=proof)))
        signer = client.welcome(*_frame(_read_message(sock, conn, reader)))
    except TimeoutError:
        raise ProtocolError(f"no answer to the challenge within {HANDSHAKE_TIMEOUT:g} s") from None
    return signer, bytes(reader.buffered)
