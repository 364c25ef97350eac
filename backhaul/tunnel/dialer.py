"""The client's side of the tcp family's handshake (PROTOCOL.md 1.2): dial the tunnel port, send
the token frame, check the server's answer. Blocking, on the client's own supervising thread.
"""

from __future__ import annotations

import socket

from backhaul.config import ClientConfig
from backhaul.errors import ProtocolError, TransportError
from backhaul.net import bind_source, reason, tune
from backhaul.protocol.handshake import HANDSHAKE_TIMEOUT, client_accepts, hello, hello_reader
from backhaul.resolver import resolve
from backhaul.tunnel.core import ClientCore


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
    tune(sock, nodelay=True, keepalive=cfg.keepalive_period, mss=cfg.mss)
    return sock, addr


def handshake(core: ClientCore) -> tuple[socket.socket, tuple[str, int]]:
    """The control channel, non-blocking and past the handshake, and the server's address."""
    cfg = core.config
    sock, addr = control_connection(cfg, cfg.remote_host, cfg.remote_port)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        reader = hello_reader()
        try:
            sock.sendall(hello(cfg.token))
            while not reader.done:
                data = sock.recv(reader.needed())
                if not data:
                    raise ProtocolError("the server closed the connection during the handshake: a wrong "
                                        "token, or the server is busy with too many pending handshakes")
                reader.feed(data)
        except TimeoutError:
            raise ProtocolError(f"no handshake reply from the server within {HANDSHAKE_TIMEOUT:g} s") from None
        except OSError as exc:
            raise TransportError(f"handshake failed: {reason(exc)}") from None
        if not client_accepts(reader, cfg.token):
            raise ProtocolError("the server answered the handshake with a different token")
        sock.setblocking(False)
        return sock, addr
    except BaseException:
        sock.close()
        raise
