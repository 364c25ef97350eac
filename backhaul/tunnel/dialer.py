"""The client's side of the tcp family's handshake (PROTOCOL.md 1.2, or docs/auth.md with
``auth = "challenge"``): dial the tunnel port, prove the token, check the server's answer.
Blocking, on the client's own supervising thread. And the tcp family's link connections, dialed
on the reactor (with a LINK proof first under ``auth = "challenge"``).
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable

from backhaul.config import ClientConfig
from backhaul.errors import ProtocolError, TransportError
from backhaul.net import bind_source, dial, reason, tune
from backhaul.protocol import auth
from backhaul.protocol.auth import ClientHandshake, LinkSigner
from backhaul.protocol.framing import FrameReader
from backhaul.protocol.handshake import HANDSHAKE_TIMEOUT, client_accepts, hello, hello_reader
from backhaul.resolver import resolve
from backhaul.tunnel.core import ClientCore

CLOSED = {
    "token": "the server closed the connection during the handshake: a wrong token, or the server is busy "
             "with too many pending handshakes",
    "challenge": "the server closed the connection during the handshake: a wrong token, a server without "
                 'auth = "challenge", or a server busy with too many pending handshakes',
}

# done(sock, error, first): a link connection is dialed (and still watched by the reactor: the
# callee watches it anew, forgets it or closes it with ``reactor.close_socket``), or ``error``
# says why not; ``first``: bytes read from it past what the dial needed (an upgrade's answer)
LinkDialed = Callable[[socket.socket | None, str, bytes], None]


def control_connection(cfg: ClientConfig, host: str, port: int) -> tuple[socket.socket, tuple[str, int]]:
    """A blocking TCP connection for a control channel (within dial_timeout), and its address;
    TransportError says why not."""
    family, addr = resolve(host, port)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportError(reason(exc)) from None
    try:
        bind_source(sock, cfg.local_addr)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot connect from local_addr {cfg.local_addr}: {reason(exc)}") from None
    try:
        sock.settimeout(cfg.dial_timeout)
        sock.connect(addr)
    except OSError as exc:
        sock.close()
        raise TransportError(reason(exc)) from None
    tune(sock, nodelay=True, keepalive=cfg.keepalive_period, mss=cfg.mss, congestion=cfg.congestion)
    return sock, addr


def read_frame(sock: socket.socket, deadline: float, closed: str) -> FrameReader:
    """One LTV frame, reading no byte past it, before ``deadline`` (TimeoutError after)."""
    reader = hello_reader()
    while not reader.done:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        data = sock.recv(reader.needed())
        if not data:
            raise ProtocolError(closed)
        reader.feed(data)
    return reader


def handshake(core: ClientCore) -> tuple[socket.socket, tuple[str, int], LinkSigner | None]:
    """The control channel, non-blocking and past the handshake, the server's address, and the
    signer of the session's links (``auth = "challenge"``; None with the token handshake)."""
    cfg = core.config
    sock, addr = control_connection(cfg, cfg.remote_host, cfg.remote_port)
    try:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        signer: LinkSigner | None = None
        closed = CLOSED[cfg.auth]
        try:
            if cfg.auth == "challenge":
                client = ClientHandshake(cfg.token, secrets.token_bytes(auth.NONCE_SIZE))
                sock.sendall(client.hello())
                challenge = read_frame(sock, deadline, closed)
                sock.sendall(client.answer(challenge.kind, challenge.payload))
                welcome = read_frame(sock, deadline, closed)
                signer = client.welcome(welcome.kind, welcome.payload)
            else:
                sock.sendall(hello(cfg.token))
                reply = read_frame(sock, deadline, closed)
                if not client_accepts(reply, cfg.token):
                    raise ProtocolError("the server answered the handshake with a different token")
        except TimeoutError:
            raise ProtocolError(f"no handshake reply from the server within {HANDSHAKE_TIMEOUT:g} s") from None
        except OSError as exc:
            raise TransportError(f"handshake failed: {reason(exc)}") from None
        sock.setblocking(False)
        return sock, addr, signer
    except BaseException:
        sock.close()
        raise


def send_link_proof(sock: socket.socket, signer: LinkSigner) -> bool:
    """A new data connection's LINK frame (auth = "challenge"); False when it is gone already.
    43 bytes into a fresh socket: they go whole."""
    frame = signer.frame()
    try:
        return sock.send(frame) == len(frame)
    except OSError:
        return False


def dial_link(core: ClientCore, server_addr: tuple[str, int], signer: LinkSigner | None, done: LinkDialed) -> None:
    """Dial one link connection of the tcp family on the reactor; with ``signer`` its LINK proof
    goes first. ``done`` is called once."""

    def dialed(sock: socket.socket | None, error: str) -> None:
        if sock is not None and signer is not None and not send_link_proof(sock, signer):
            core.reactor.close_socket(sock)
            sock, error = None, "the connection closed before its link proof went"
        done(sock, error, b"")

    cfg = core.config
    dial(core.reactor, core.resolver, server_addr[0], server_addr[1], cfg.dial_timeout, dialed, cfg.local_addr)
