"""The test as a WebSocket client by hand: TLS as the Go client does it, upgrade heads as it
writes them, and the server's answers read and checked."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator

from backhaul.protocol import http_upgrade as http
from tests.harness import HOST, IO_TIMEOUT, closed_by_peer

KEY = bytes(range(16))  # Sec-WebSocket-Key of the test's own requests: any 16 bytes do


def tls_context() -> ssl.SSLContext:
    """A client context that checks nothing (as the Go client) and offers only http/1.1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


@contextlib.contextmanager
def raw_connection(port: int, tls: bool, timeout: float = IO_TIMEOUT) -> Iterator[socket.socket]:
    """A connection to the tunnel port, past the TLS handshake for wss and wssmux."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        if tls:
            sock = tls_context().wrap_socket(sock, server_hostname="localhost")
        yield sock
    finally:
        sock.close()


def upgrade_head(port: int, path: str, token: str) -> bytes:
    """An upgrade head as the Go client writes it (backhaul.protocol.http_upgrade.client_request)."""
    return http.client_request(f"{HOST}:{port}", path, token, http.USER_AGENTS[0], 4242, KEY)


def read_response(sock: socket.socket) -> http.Response:
    reader = http.ResponseReader()
    while True:
        data = sock.recv(16384)
        if not data:
            raise AssertionError("the server closed the connection before its answer's head ended")
        response = reader.feed(data)
        if response is not None:
            return response


def refused(sock: socket.socket, status: int) -> http.Response:
    """The server's answer is ``status`` with Connection: close, and it closes the connection."""
    response = read_response(sock)
    assert response.status == status, response
    assert response.headers.get("connection") == "close", response
    assert closed_by_peer(sock, timeout=5), "the server kept a refused connection open"
    return response
