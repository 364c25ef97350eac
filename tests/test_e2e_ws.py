"""End to end over the WebSocket transports (ws, wss, wsmux, wssmux; PROTOCOL.md 3): a server
process and a client process, users and targets in this process; raw upgrade requests, a fake
client (the test, with wsproto masking its frames) and TLS checks of the client (tls_verify,
tls_ca, tls_pin). The conformance cases of one tunneled connection run for these transports in
tests/test_e2e_tcp.py (harness.TRANSPORTS)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import selectors
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, Message, Ping

from backhaul.protocol import http_upgrade as http
from tests import harness
from tests.harness import (
    CERTS,
    HOST,
    Backhaul,
    Launcher,
    Service,
    Tunnel,
    client_toml,
    closed_by_peer,
    echo_works,
    free_port,
)
from tests.streams import run_64_streams
from tests.ws_peer import KEY, raw_connection, read_response, refused, upgrade_head

pytestmark = pytest.mark.timeout(120)


WS_TRANSPORTS = ["ws", "wss", "wsmux", "wssmux"]
TLS = ("wss", "wssmux")
MUX = ("wsmux", "wssmux")
TOKEN = "Ws-Right-4c1d97e2"
WRONG = "Ws-Wrong-a83f0b56"
SG_HB, SG_CHAN, SG_PING = b"\x00", b"\x01", b"\x02"


def ws_tunnel(launcher: Launcher, transport: str, targets: list[str], **options: object) -> Tunnel:
    return Tunnel(launcher, targets, TOKEN, transport=transport, **options)  # type: ignore[arg-type]


def no_traceback(*procs: Backhaul | None) -> None:
    for proc in procs:
        if proc is not None:
            assert "Traceback" not in proc.log(), f"{proc.name}:\n{proc.log()}"


# ------------------------------------------------------------------------------------------------
# raw upgrades: the test speaks HTTP (and TLS for wss, wssmux) itself


class FakeClient:
    """One upgraded connection on the client's side, driven by the test: wsproto (as a client, so
    our frames are masked) encodes what we send and decodes what the server sends. With
    ``websocket`` false (a wsmux session: smux on the raw connection) bytes are handed up as
    they come."""

    def __init__(self, sock: socket.socket, path: str, port: int, websocket: bool = True) -> None:
        self.sock = sock
        self.websocket = websocket
        sock.sendall(upgrade_head(port, path, TOKEN))
        response = read_response(sock)
        assert response.status == 101, response
        http.check_accept(response, http.encode_key(KEY))
        self.rest = response.rest
        self.conn = Connection(ConnectionType.CLIENT, trailing_data=response.rest)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(self.conn.send(BytesMessage(data=payload)))

    def receive(self) -> list[bytes | str]:
        """Read what the socket has (it must be readable) and return the whole messages in it."""
        data = self.sock.recv(65536)
        while isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            data += self.sock.recv(65536)
        assert data, "the server closed the connection"
        if not self.websocket:
            return [data]
        self.conn.receive_data(data)
        messages: list[bytes | str] = []
        for event in self.conn.events():
            if isinstance(event, Message):
                assert event.message_finished, "the server fragmented a one-byte message"
                messages.append(event.data)
            elif isinstance(event, Ping):
                self.sock.sendall(self.conn.send(event.response()))
            else:
                raise AssertionError(f"unexpected websocket event from the server: {event!r}")
        return messages


# ------------------------------------------------------------------------------------------------
# 64 concurrent streams, sha256-exact both ways (the sizes and the helpers of test_e2e_tcp.py)

@pytest.mark.parametrize("transport", WS_TRANSPORTS)
def test_64_concurrent_streams_sha256_exact_both_ways(launcher: Launcher, transport: str) -> None:
    tunnel = run_64_streams(lambda target: ws_tunnel(launcher, transport, [target]).up(), timeout=100)
    no_traceback(tunnel.server, tunnel.client)


# ------------------------------------------------------------------------------------------------
# tokens

@pytest.mark.parametrize("transport", WS_TRANSPORTS)
def test_wrong_token_gets_401_and_the_client_retries(launcher: Launcher, echo_service: Service,
                                                     transport: str) -> None:
    tunnel = ws_tunnel(launcher, transport, [str(echo_service.port)])
    server = tunnel.start_server()
    with raw_connection(tunnel.bind_port, transport in TLS) as raw:
        raw.sendall(upgrade_head(tunnel.bind_port, http.CONTROL_PATH, WRONG))
        response = refused(raw, 401)
        assert response.rest.startswith(b"unauthorized\n"), response
        raw_port = raw.getsockname()[1]
    line = server.wait_for_log("wrong token", timeout=10)
    assert line.endswith(f"rejected client {HOST}:{raw_port}: wrong token"), line

    # a client process with the wrong token, and the right client next to it
    bad = launcher.start("bad-client", client_toml(tunnel.bind_port, WRONG, transport=transport))
    tunnel.start_client()
    tunnel.wait_connected()
    refusal = f"cannot connect to server {tunnel.remote_addr}: the server refused the token (401); retrying in 1 s"
    bad.wait_for_log(refusal, timeout=10, count=2)
    for failed in bad.lines("cannot connect to server"):
        assert refused_again(failed, refusal), failed
    echo_works(tunnel.public[0], size=100_000, seed=1)
    assert not bad.lines("control channel up")
    assert len(server.lines("connected: control channel up")) == 1
    for proc in (server, bad, tunnel.client):
        assert proc is not None and proc.alive()
        text = proc.log()
        assert TOKEN not in text and WRONG not in text, f"a token appears in the stderr of {proc.name}"
    no_traceback(server, bad, tunnel.client)


# ------------------------------------------------------------------------------------------------
# restarts

@pytest.mark.parametrize("transport", WS_TRANSPORTS)
def test_client_reconnects_after_the_server_restarts(launcher: Launcher, echo_service: Service,
                                                     transport: str) -> None:
    tunnel = ws_tunnel(launcher, transport, [str(echo_service.port)]).up()
    echo_works(tunnel.public[0], seed=2)
    assert tunnel.server is not None and tunnel.client is not None
    client = tunnel.client
    tunnel.server.kill()
    line = client.wait_for_log(f"lost the server {tunnel.remote_addr}: ", timeout=10)
    assert line.endswith("; reconnecting in 1 s"), line
    tunnel.start_server()  # the same config: the same tunnel port and public port
    client.wait_for_log(f"connected to server {tunnel.remote_addr}: control channel up", timeout=15, count=2)
    tunnel.server.wait_for_log("connected: control channel up", timeout=10)
    echo_works(tunnel.public[0], size=200_000, seed=3)
    assert client.alive() and tunnel.client is client
    no_traceback(tunnel.server, client)


@pytest.mark.parametrize("transport", WS_TRANSPORTS)
def test_second_control_channel_closes_both_and_the_client_reconnects(launcher: Launcher, echo_service: Service,
                                                                      transport: str) -> None:
    """PROTOCOL.md 3.1: a /channel while one is up makes the server close both; the client comes back."""
    tunnel = ws_tunnel(launcher, transport, [str(echo_service.port)]).up()
    assert tunnel.server is not None and tunnel.client is not None
    server, client = tunnel.server, tunnel.client
    echo_works(tunnel.public[0], seed=4)
    with raw_connection(tunnel.bind_port, transport in TLS) as raw:
        raw.sendall(upgrade_head(tunnel.bind_port, http.CONTROL_PATH, TOKEN))
        response = read_response(raw)
        assert response.status == 101, response  # upgraded, then closed at once
        assert closed_by_peer(raw, timeout=5), "the server kept the second control channel open"
        raw_port = raw.getsockname()[1]
    line = server.wait_for_log("opened a second control channel", timeout=5)
    assert f"client {HOST}:{raw_port} opened a second control channel: closing both" in line, line
    lost = client.wait_for_log(f"lost the server {tunnel.remote_addr}: ", timeout=10)
    assert lost.endswith("; reconnecting in 1 s"), lost
    client.wait_for_log(f"connected to server {tunnel.remote_addr}: control channel up", timeout=10, count=2)
    server.wait_for_log("connected: control channel up", timeout=10, count=2)
    echo_works(tunnel.public[0], size=200_000, seed=5)
    assert server.alive() and client.alive()
    no_traceback(server, client)


# ------------------------------------------------------------------------------------------------
# heartbeats and idle pings, seen by a fake client

@pytest.mark.parametrize("transport", WS_TRANSPORTS)
def test_idle_pings_and_heartbeats_reach_a_fake_client(launcher: Launcher, transport: str) -> None:
    """Server heartbeat = 1: the control channel gets 0x00 every second (the fake client echoes
    each); an idle ws/wss data websocket gets binary 0x02 every second. On wsmux/wssmux the data
    connection is an smux session on the raw upgraded connection (PROTOCOL.md 3.4): with no user
    nothing comes on it in these seconds (smux's keepalive NOP is every 20 s)."""
    bind_port = free_port()
    tls = transport in TLS
    extra: dict[str, object] = {"heartbeat": 1, "connection_pool": 1}
    if tls:
        cert, key = CERTS.self_signed()
        extra.update(tls_cert=str(cert), tls_key=str(key))
    server = launcher.start("server", harness.server_toml(bind_port, [f"{HOST}:{free_port()}=5201"], TOKEN,
                                                          transport=transport, **extra))
    server.wait_for_log(f"{transport} tunnel listening on {HOST}:{bind_port}")
    with raw_connection(bind_port, tls) as control_sock, raw_connection(bind_port, tls) as link_sock:
        control = FakeClient(control_sock, http.CONTROL_PATH, bind_port)
        server.wait_for_log(f"client {HOST}:{control_sock.getsockname()[1]} connected: control channel up")
        link = FakeClient(link_sock, http.data_path(4242), bind_port, websocket=transport not in MUX)
        seen: dict[str, list[tuple[float, bytes | str]]] = {"control": [], "link": []}
        with selectors.DefaultSelector() as sel:
            sel.register(control_sock, selectors.EVENT_READ, ("control", control))
            sel.register(link_sock, selectors.EVENT_READ, ("link", link))
            start = time.monotonic()
            deadline = start + 6.0

            def enough() -> bool:  # 3 heartbeats and, on ws/wss, 3 idle pings
                beats = sum(message == SG_HB for _, message in seen["control"])
                return beats >= 3 and (transport in MUX or len(seen["link"]) >= 3)

            while not enough() and (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(timeout=left):
                    name, fake = key.data
                    for message in fake.receive():
                        seen[name].append((time.monotonic() - start, message))
                        if name == "control" and message == SG_HB:
                            control.send(SG_HB)  # the client echoes every heartbeat
        beats = [at for at, message in seen["control"] if message == SG_HB]
        others = {message for _, message in seen["control"]} - {SG_HB, SG_CHAN}
        assert not others, f"unexpected control messages: {seen['control']}"
        assert len(beats) >= 3, f"heartbeats in 6 s: {seen['control']}"
        assert all(0.5 < b - a < 1.6 for a, b in itertools.pairwise(beats)), beats
        if transport in MUX:
            # An idle session carries our smux hello (docs/stream-ends.md) and nothing else; it
            # follows the 101 at once, so it may have come in the same read as the head.
            hello = struct.pack("<BBHI", 1, 3, 0, 0xFFFFFFFF)
            session_bytes = link.rest + b"".join(message for _, message in seen["link"])
            assert session_bytes in (b"", hello), f"bytes on an idle smux session: {session_bytes!r}"
        else:
            assert all(message == SG_PING for _, message in seen["link"]), seen["link"]
            pings = [at for at, _ in seen["link"]]
            assert len(pings) >= 3, f"idle pings in 6 s: {pings}"
            assert all(0.5 < b - a < 1.6 for a, b in itertools.pairwise(pings)), pings
        assert server.alive()
        assert not server.lines("waiting for the client to reconnect"), server.log()
        assert not server.lines("closed idle data connection"), server.log()
    no_traceback(server)


# ------------------------------------------------------------------------------------------------
# broken heads

HEAD_LIMIT = http.MAX_HEAD  # 16 KiB


def oversize_head(port: int) -> bytes:
    """A whole, valid upgrade head of 20 KiB (padding fields of 400 bytes): past the 16 KiB limit."""
    head = upgrade_head(port, http.CONTROL_PATH, TOKEN)
    padding = b"".join(b"X-Pad-%03d: %s\r\n" % (i, b"a" * 400) for i in range(60))
    head = head[:-2] + padding[:20 * 1024 - len(head)].rpartition(b"\r\n")[0] + b"\r\n\r\n"
    assert HEAD_LIMIT < len(head) <= 20 * 1024 and head.count(b"\r\n") < http.MAX_HEADERS
    return head


def head_at_the_limit(port: int) -> bytes:
    """The first 16 KiB of ``oversize_head``: the head has not ended at the limit. The server
    reads all of it before it answers, so its close is a FIN; a longer head leaves unread bytes
    and the close becomes a reset, which may destroy the answer (test_oversize_head_...)."""
    return oversize_head(port)[:HEAD_LIMIT]


def without_key(head: bytes) -> bytes:
    return re.sub(rb"Sec-WebSocket-Key: [^\r]*\r\n", b"", head)


@pytest.mark.parametrize("transport", WS_TRANSPORTS)
def test_broken_heads_get_their_status_and_a_good_client_keeps_working(launcher: Launcher, echo_service: Service,
                                                                       transport: str) -> None:
    tls = transport in TLS
    tunnel = ws_tunnel(launcher, transport, [str(echo_service.port)]).up()
    assert tunnel.server is not None and tunnel.client is not None
    server, port = tunnel.server, tunnel.bind_port
    good = upgrade_head(port, http.CONTROL_PATH, TOKEN)
    cases = [  # (status, head, the log line's end); the server logs one bad head a second (throttled)
        (431, head_at_the_limit(port), f"bad upgrade head (the request head is larger than {HEAD_LIMIT} bytes)"),
        (404, upgrade_head(port, "/nothing-here", TOKEN), "unknown path '/nothing-here'"),
        (405, good.replace(b"GET ", b"POST ", 1), "bad upgrade head (method POST is not GET)"),
        (400, without_key(good), "bad upgrade head (no Sec-WebSocket-Key field)"),
    ]
    with contextlib.ExitStack() as stack:
        stalled = None
        if transport == "ws":  # the 10 s head timeout: once, running while the other cases do
            stalled = stack.enter_context(raw_connection(port, tls, timeout=20))
            stalled.sendall(b"GET /channel HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            stalled_at = time.monotonic()
        last_bad_head = -10.0  # when we saw the last "bad upgrade head" line
        for status, head, log_end in cases:
            if "bad upgrade head" in log_end:  # the server lets one such line a second through
                time.sleep(max(0.0, last_bad_head + 1.05 - time.monotonic()))
            with raw_connection(port, tls) as raw:
                raw.sendall(head)
                refused(raw, status)
                line = server.wait_for_log(f"rejected client {HOST}:{raw.getsockname()[1]}: ", timeout=5)
            if "bad upgrade head" in log_end:
                last_bad_head = time.monotonic()
            assert line.endswith(log_end), (status, line)
            echo_works(tunnel.public[0], size=50_000, seed=status)
        if stalled is not None:
            refused(stalled, 408)
            took = time.monotonic() - stalled_at
            assert 9.0 < took < 15.0, f"408 after {took:.1f} s"
            line = server.wait_for_log(f"rejected client {HOST}:{stalled.getsockname()[1]}: ", timeout=5)
            assert line.endswith("no whole upgrade head within 10 s"), line
    echo_works(tunnel.public[0], size=200_000, seed=6)
    assert len(tunnel.client.lines("control channel up")) == 1, "the good client lost its tunnel"
    assert server.alive()
    no_traceback(server, tunnel.client)


OVERSIZE_TRIES = 40


@pytest.mark.parametrize("transport", [
    "ws", "wsmux",
    "wss",
])
def test_oversize_head_always_gets_its_431(launcher: Launcher, echo_service: Service, transport: str) -> None:
    """A whole head of 20 KiB, sent at once, OVERSIZE_TRIES times: the answer is 431 every time."""
    tunnel = ws_tunnel(launcher, transport, [str(echo_service.port)]).up()
    lost = 0
    for _ in range(OVERSIZE_TRIES):
        with raw_connection(tunnel.bind_port, transport in TLS, timeout=5) as raw:
            raw.sendall(oversize_head(tunnel.bind_port))
            try:
                answer = raw.recv(65536)
            except OSError:
                answer = b""
            lost += not answer.startswith(b"HTTP/1.1 431 ")
    assert lost == 0, f"{lost} of {OVERSIZE_TRIES} oversize heads got no 431 (the connection just ended)"
    echo_works(tunnel.public[0], size=50_000, seed=31)
    no_traceback(tunnel.server, tunnel.client)


# ------------------------------------------------------------------------------------------------
# TLS: what the client checks

def der_sha256(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def utc(offset_days: float) -> str:
    """An openssl ca date (YYYYMMDDHHMMSSZ) this many days from now."""
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + offset_days * 86400))


def localhost_options() -> dict[str, object]:
    """Client options for remote_addr localhost:<port> when localhost is not 127.0.0.1 here
    (the server listens there only): edge_ip takes the TCP connection there, SNI and the name
    check stay localhost."""
    first = socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)[0][4][0]
    return {} if first == HOST else {"edge_ip": HOST}


def side_by_side(tunnels: list[Tunnel]) -> None:
    """Start every server, then every client, without waiting for one before the next."""
    for tunnel in tunnels:
        tunnel.start_server(wait=False)
    for tunnel in tunnels:
        tunnel.wait_listening()
    for tunnel in tunnels:
        tunnel.start_client()


def first_outcome(tunnel: Tunnel, timeout: float = 10.0) -> str:
    """The client's first line that says it got the control channel, or why it did not."""
    assert tunnel.client is not None
    client = tunnel.client
    marks = (f"connected to server {tunnel.remote_addr}: control channel up",
             f"cannot connect to server {tunnel.remote_addr}: ")

    def first() -> str | None:
        return next((line for line in client.log().splitlines() if any(m in line for m in marks)), None)

    return str(harness.wait_until(first, timeout, f"{client.name} to connect or to give up"))


def refused_again(line: str, refusal: str) -> bool:
    """``line`` is ``refusal``, or a later one of its kind with the count of those held back."""
    return bool(re.search(re.escape(refusal) + r"( \((\d+ more like it|the last of \d+)[^)]*\))?$", line))


def assert_refused(tunnel: Tunnel, why: str, server_says: str) -> None:
    """The client gives up for ``why`` and tries again (twice seen), never getting a control
    channel; the server logs ``server_says`` about the attempt."""
    assert tunnel.server is not None and tunnel.client is not None
    refusal = f"cannot connect to server {tunnel.remote_addr}: {why}; retrying in 1 s"
    line = first_outcome(tunnel)
    assert line.endswith(refusal), line
    tunnel.client.wait_for_log("cannot connect to server", timeout=5, count=2)  # it tries again
    for failed in tunnel.client.lines("cannot connect to server"):
        assert refused_again(failed, refusal), failed
    server_line = tunnel.server.wait_for_log(server_says, timeout=5)
    assert f"rejected client {HOST}:" in server_line, server_line
    assert not tunnel.client.lines("control channel up")
    assert not tunnel.server.lines("control channel up")
    assert not tunnel.client.lines("certificate is not checked"), "a checking client warned that it does not check"
    no_traceback(tunnel.server, tunnel.client)


def assert_works(tunnel: Tunnel, seed: int) -> None:
    assert tunnel.client is not None
    line = first_outcome(tunnel)
    assert line.endswith(f"connected to server {tunnel.remote_addr}: control channel up"), line
    tunnel.wait_connected()
    echo_works(tunnel.public[0], size=200_000, seed=seed)
    assert not tunnel.client.lines("certificate is not checked"), "a checking client warned that it does not check"
    no_traceback(tunnel.server, tunnel.client)


@pytest.mark.parametrize("transport", TLS)
def test_tls_verify_with_tls_ca(launcher: Launcher, echo_service: Service, transport: str) -> None:
    """tls_verify = true, remote_addr localhost:<port> (SNI and the name check), side by side:
    the self-signed certificate as its own tls_ca, and a leaf of ca-one with tls_ca = ca-one,
    work; so does remote_addr tunnel.example:<port> (no such host) with edge_ip = 127.0.0.1 and a
    leaf for tunnel.example (the TCP connection goes to edge_ip, SNI and the check stay the
    name). With tls_ca = ca-one, a leaf of the unrelated ca-two, a leaf of ca-one that expired in
    2020 and a leaf of ca-one for another name are refused (the server hears the client's alert,
    which tells the three reasons apart)."""
    self_signed, _ = CERTS.self_signed()
    ca_one, _ = CERTS.ca("ca-one")
    valid = (utc(-1), utc(2))
    local = ("localhost", localhost_options())
    cases: dict[str, tuple[tuple[Path, Path], Path, tuple[str, dict[str, object]], str, str]] = {
        # label: ((server certificate, key), tls_ca, (remote host, client options), the TLS alert
        # the server logs ("" = it works), why the client refuses it)
        "self-signed": (CERTS.self_signed(), self_signed, local, "", ""),
        "ca-one": (CERTS.issued("leaf-ca-one", "ca-one", *valid), ca_one, local, "", ""),
        "edge-ip": (CERTS.issued("leaf-tunnel-example", "ca-one", *valid, host="tunnel.example"), ca_one,
                    ("tunnel.example", {"edge_ip": HOST}), "", ""),
        "unknown-ca": (CERTS.issued("leaf-ca-two", "ca-two", *valid), ca_one, local, "TLSV1_ALERT_UNKNOWN_CA",
                       "unable to get local issuer certificate"),
        "expired": (CERTS.issued("leaf-expired", "ca-one", "20200101000000Z", "20200102000000Z"), ca_one, local,
                    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "certificate has expired"),
        "other-name": (CERTS.issued("leaf-other-name", "ca-one", *valid, host="other.example"), ca_one, local,
                       "SSLV3_ALERT_BAD_CERTIFICATE", "Hostname mismatch, certificate is not valid for 'localhost'."),
    }
    tunnels = {label: ws_tunnel(launcher, transport, [str(echo_service.port)], label=label, remote_host=host,
                                server_extra={"tls_cert": str(cert), "tls_key": str(key)},
                                client_extra={"tls_verify": True, "tls_ca": str(ca), **options})
               for label, ((cert, key), ca, (host, options), _, _) in cases.items()}
    side_by_side(list(tunnels.values()))
    for seed, (label, (*_, alert, why)) in enumerate(cases.items()):
        tunnel = tunnels[label]
        if alert:
            assert_refused(tunnel, f"TLS handshake failed: the server's certificate is refused: {why}",
                           f"TLS handshake failed: {alert}")
        else:
            assert_works(tunnel, seed)


def test_tls_verify_checks_the_address_of_a_numeric_remote_addr(launcher: Launcher, echo_service: Service) -> None:
    """A certificate of the trusted CA for other.example only, remote_addr 127.0.0.1:<port>: a
    verifying client must refuse it, as it does for remote_addr localhost (above), and as Go's
    crypto/tls does for an IP (it checks the IP SANs)."""
    cert, key = CERTS.issued("leaf-other-name", "ca-one", utc(-1), utc(2), host="other.example")
    ca_one, _ = CERTS.ca("ca-one")
    tunnel = ws_tunnel(launcher, "wss", [str(echo_service.port)],
                       server_extra={"tls_cert": str(cert), "tls_key": str(key)},
                       client_extra={"tls_verify": True, "tls_ca": str(ca_one)})
    side_by_side([tunnel])
    line = first_outcome(tunnel)
    assert "TLS handshake failed: the server's certificate is refused: IP address mismatch" in line, line


@pytest.mark.parametrize("transport", TLS)
def test_tls_pin(launcher: Launcher, echo_service: Service, transport: str) -> None:
    """A wrong pin is refused, the right one (colons, upper case: as openssl prints it) works."""
    cert, _ = CERTS.self_signed()
    digest = der_sha256(cert).upper()
    pin = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    wrong = ws_tunnel(launcher, transport, [str(echo_service.port)], label="wrong", client_extra={"tls_pin": "00" * 32})
    right = ws_tunnel(launcher, transport, [str(echo_service.port)], label="right", client_extra={"tls_pin": pin})
    side_by_side([wrong, right])
    assert_refused(wrong, "the server's certificate does not match tls_pin",
                   "closed the connection before its upgrade head ended")
    assert_works(right, seed=8)


@pytest.mark.parametrize("transport", TLS)
def test_unchecked_certificate_is_warned_about_once(launcher: Launcher, echo_service: Service,
                                                    transport: str) -> None:
    tunnel = ws_tunnel(launcher, transport, [str(echo_service.port)]).up()  # tls_verify = false
    assert tunnel.client is not None
    for i in range(12):  # more users than the pool: new data connections, each with its TLS context
        echo_works(tunnel.public[0], size=10_000, seed=10 + i)
    warnings = tunnel.client.lines("certificate is not checked")
    assert len(warnings) == 1, tunnel.client.log()
    assert " WARNING " in warnings[0], warnings[0]
    lines = tunnel.client.log().splitlines()
    assert lines.index(warnings[0]) < lines.index(tunnel.client.lines("control channel up")[0]), (
        "the warning came after the tunnel was up, not at the start")
    no_traceback(tunnel.server, tunnel.client)
