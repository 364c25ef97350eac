"""The client's TLS side (tunnel/upgrade.py ClientTls): one context per server, and the server's
last session resumed by the next connection, against a real TLS server on loopback."""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import threading

import pytest

from backhaul.config import ClientConfig
from backhaul.tunnel.upgrade import client_tls
from tests.harness import CERTS, HOST

pytestmark = pytest.mark.timeout(30)


def _serve(listener: socket.socket, context: ssl.SSLContext, count: int, reused: list[bool]) -> None:
    for _ in range(count):
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"hello")          # the server's first bytes carry its session tickets
            reused.append(tls.session_reused)
            tls.recv(1)


def test_the_next_connection_resumes_the_servers_last_session() -> None:
    """Catches: no resumption (a full handshake per link), the kept session copied again from
    every resumed link (a copy costs ~0.1 ms), or a kept session never renewed before it expires."""
    cert, key = CERTS.self_signed()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    reused: list[bool] = []
    with socket.create_server((HOST, 0)) as listener:
        port = listener.getsockname()[1]
        cfg = dataclasses.replace(ClientConfig(remote_addr=f"{HOST}:{port}"), remote_host=HOST, remote_port=port,
                                  transport="wss")
        server = threading.Thread(target=_serve, args=(listener, server_context, 5, reused))
        server.start()
        try:
            tls = client_tls(cfg)
            assert client_tls(cfg) is tls            # one per server, not one per connection
            seen, kept = [], []
            for n in range(5):
                with tls.wrap(socket.create_connection((HOST, port)), HOST) as sock:
                    assert sock.recv(5) == b"hello"
                    session = tls.session
                    # the fourth link comes when the kept session has lived more than half its life
                    tls.keep(sock, now=None if n != 3 else session.time + session.timeout / 2 + 1)
                    seen.append(sock.session_reused)
                    kept.append(tls.session)
                    sock.sendall(b"x")
        finally:
            server.join(10)
    assert seen == [False, True, True, True, True]
    assert reused == [False, True, True, True, True]
    assert kept[0] is kept[1] is kept[2], "a resumed link keeps the session it resumed"
    assert kept[3] is not kept[2] and kept[3] is kept[4], "an old session is renewed from the next link"


def test_a_changed_ca_file_makes_a_new_context(tmp_path) -> None:
    """An operator who replaces tls_ca and reloads gets the new file read: one context per server
    holds only while the file stays the same."""
    cert, _key = CERTS.self_signed()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert.read_bytes())
    cfg = dataclasses.replace(ClientConfig(remote_addr=f"{HOST}:1"), remote_host=HOST, remote_port=1,
                              transport="wss", tls_verify=True, tls_ca=str(ca))
    first = client_tls(cfg)
    assert client_tls(cfg) is first
    ca.write_bytes(cert.read_bytes())
    os.utime(ca, ns=(ca.stat().st_atime_ns, ca.stat().st_mtime_ns + 1_000_000))
    assert client_tls(cfg) is not first
