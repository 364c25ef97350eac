"""auth = "challenge" end to end (docs/auth.md): users carried on every transport with the token
never on the wire; a wrong key, the other auth mode on either side, a fake server; recorded
handshakes and link proofs replayed and reflected; links from the client's address without a
proof. The codec's own cases (exact bytes, reflection, replay windows) are in tests/test_auth.py."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, Message, Ping

from backhaul.protocol import auth
from backhaul.protocol import http_upgrade as http
from backhaul.protocol.framing import FrameReader, encode_ltv
from backhaul.tunnel.ws_challenge import challenge
from tests.faultproxy import FaultProxy
from tests.harness import (
    HOST,
    TRANSPORTS,
    Launcher,
    Listener,
    Service,
    Tunnel,
    UdpEcho,
    client_toml,
    closed_by_peer,
    connect,
    echo_works,
    exchange,
    recv_all,
    recv_exact,
    user_socket,
    wait_until,
)
from tests.ws_peer import KEY, raw_connection, read_response, refused

pytestmark = pytest.mark.timeout(60)


TOKEN = "Challenge-Right-6f0e2a91"
WRONG = "Challenge-Wrong-0b77c3d4"
CHALLENGE = {"auth": "challenge"}
TLS = ("wss", "wssmux")
RECORD = 1 << 16


def challenge_tunnel(launcher: Launcher, transport: str, target: int, token: str = TOKEN,
                     server: dict[str, object] | None = None, client: dict[str, object] | None = None) -> Tunnel:
    return Tunnel(launcher, [str(target)], token, transport=transport,
                  server_extra=CHALLENGE if server is None else server,
                  client_extra=CHALLENGE if client is None else client)


@contextlib.contextmanager
def through_proxy(tunnel: Tunnel, **client: object) -> Iterator[FaultProxy]:
    """Start the tunnel with its client dialing through a recording proxy (UDP too for udp)."""
    tunnel.start_server()
    with FaultProxy(tunnel.bind_port, record=RECORD, udp=tunnel.transport == "udp") as proxy:
        tunnel.remote_addr = f"{HOST}:{proxy.port}"
        tunnel.client_text = client_toml(proxy.port, tunnel.token, transport=tunnel.transport,
                                         **({"auth": "challenge"} | client))
        tunnel.start_client()
        tunnel.wait_connected()
        yield proxy


def echoes(port: int, count: int, size: int, seed: int) -> None:
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            echo_works(port, size=size, seed=seed + i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors


def frames(data: bytes) -> list[tuple[int | None, bytes]]:
    """The LTV frames at the start of ``data`` until something else starts."""
    found = []
    while len(data) >= 3:
        reader = FrameReader(typed=True)
        rest = reader.feed(data)
        if not reader.done:
            break
        found.append((reader.kind, reader.payload or b""))
        data = rest
    return found


# ------------------------------------------------------------------------------------------------
# users carried, the token never sent

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_challenge_carries_users_and_never_sends_the_token(launcher: Launcher, echo_service: Service,
                                                           transport: str) -> None:
    tunnel = challenge_tunnel(launcher, transport, echo_service.port)
    with through_proxy(tunnel, connection_pool=4) as proxy:
        echoes(tunnel.public[0], count=8, size=200_000, seed=10)
        pairs = list(proxy.pairs)
    assert tunnel.server is not None and tunnel.client is not None
    for proc in (tunnel.server, tunnel.client):
        assert "Traceback" not in proc.log() and not proc.lines("rejected"), proc.log()
    if transport in TLS:
        return  # encrypted: nothing to read on the wire
    wire = b"".join(bytes(d.seen) for pair in pairs for d in pair.directions())
    assert TOKEN.encode() not in wire, "the token crossed the wire"
    control, links = pairs[0], pairs[1:]
    assert len(links) >= 4
    up, down = bytes(control.to_up.seen), bytes(control.to_down.seen)  # type: ignore[union-attr]
    if transport in ("tcp", "tcpmux"):
        assert [kind for kind, _ in frames(up)[:2]] == [auth.HELLO, auth.PROOF], up[:80].hex()
        assert [kind for kind, _ in frames(down)[:2]] == [auth.CHALLENGE, auth.WELCOME], down[:80].hex()
        for link in links:
            first = bytes(link.to_up.seen[:auth.LINK_FRAME_SIZE])
            assert first[:3] == bytes.fromhex("002845"), first.hex()
    else:
        assert up.startswith(b"GET /channel HTTP/1.1\r\n") and b"\r\nAuthorization:" not in up.split(b"\r\n\r\n")[0]
        for link in links:
            head = bytes(link.to_up.seen).split(b"\r\n\r\n")[0]
            assert head.startswith(b"GET /tunnel/") and b"\r\nAuthorization: Backhaul-Link " in head, head


# ------------------------------------------------------------------------------------------------
# a wrong key, and the other mode on either side

@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_wrong_key_is_refused_and_neither_token_is_logged(launcher: Launcher, echo_service: Service,
                                                          transport: str) -> None:
    tunnel = challenge_tunnel(launcher, transport, echo_service.port)
    tunnel.client_text = client_toml(tunnel.bind_port, WRONG, transport=transport, auth="challenge")
    server = tunnel.start_server()
    client = tunnel.start_client()
    line = server.wait_for_log("wrong token", timeout=10)
    assert "rejected client 127.0.0.1" in line, line
    said = client.wait_for_log("cannot connect to server", timeout=10)
    assert "a wrong token" in said, said
    assert not server.lines("control channel up")
    for proc in (server, client):
        assert TOKEN not in proc.log() and WRONG not in proc.log()


@pytest.mark.parametrize(("transport", "server_says", "client_says"), [
    ("tcp", 'the client uses auth = "challenge"; set it on this server too',
     'a server without auth = "challenge"'),
    ("ws", 'no token on /channel (a client with auth = "challenge" sends none)',
     'it may not have auth = "challenge"'),
])
def test_a_challenge_client_and_a_token_server_say_what_is_wrong(launcher: Launcher, echo_service: Service,
                                                                 transport: str, server_says: str,
                                                                 client_says: str) -> None:
    tunnel = challenge_tunnel(launcher, transport, echo_service.port, server={})
    server = tunnel.start_server()
    client = tunnel.start_client()
    assert server.wait_for_log("rejected client", timeout=10).endswith(server_says)
    assert client_says in client.wait_for_log("cannot connect to server", timeout=10)


@pytest.mark.parametrize(("transport", "client_says"), [
    ("tcp", "the server closed the connection during the handshake"),
    ("ws", "the server refused the token (401)"),
])
def test_a_token_client_and_a_challenge_server_say_what_is_wrong(launcher: Launcher, echo_service: Service,
                                                                 transport: str, client_says: str) -> None:
    tunnel = challenge_tunnel(launcher, transport, echo_service.port, client={})
    server = tunnel.start_server()
    client = tunnel.start_client()
    line = server.wait_for_log("rejected client", timeout=10)
    assert line.endswith('the client sent the token handshake of v0.7.2 (auth = "token"); this server has '
                         'auth = "challenge"'), line
    assert client_says in client.wait_for_log("cannot connect to server", timeout=10)
    assert TOKEN not in server.log() + client.log()


# ------------------------------------------------------------------------------------------------
# a fake server

def test_client_refuses_a_server_that_cannot_prove_the_token(launcher: Launcher, listener: Listener) -> None:
    """The test plays a server without the token: it answers the HELLO and welcomes the proof with
    what it can (its own key's proof, then the client's proof reflected). The client refuses both,
    says why, and never opens a data connection: every connection it makes starts with HELLO."""
    client = launcher.start("client", client_toml(listener.port, TOKEN, auth="challenge", connection_pool=2))
    rng = random.Random(7)
    for attempt in range(2):
        control = listener.accept()
        hello = frames(recv_exact(control, 35))
        assert [kind for kind, _ in hello] == [auth.HELLO]
        nonce = rng.randbytes(32)
        control.sendall(encode_ltv(auth.CHALLENGE, nonce))
        (kind, proof), = frames(recv_exact(control, 35))
        assert kind == auth.PROOF
        forged = auth.mac(WRONG.encode(), auth.LABEL_SERVER, hello[0][1], nonce) if attempt == 0 else proof
        control.sendall(encode_ltv(auth.WELCOME, forged))
        assert closed_by_peer(control, timeout=5)
        line = client.wait_for_log("cannot connect to server", timeout=5, count=attempt + 1)
        assert line.endswith("the server could not prove the token; retrying in 1 s"), line
    assert not client.lines("control channel up")
    third = listener.accept()  # the next attempt: a HELLO again, never a LINK
    assert recv_exact(third, 3) == bytes.fromhex("002041")


# ------------------------------------------------------------------------------------------------
# replay and reflection on the server, from what crossed the wire (tcp: the frames are in clear)

def test_recorded_handshakes_and_link_proofs_are_refused(launcher: Launcher, echo_service: Service) -> None:
    tunnel = challenge_tunnel(launcher, "tcp", echo_service.port)
    with through_proxy(tunnel, connection_pool=2) as proxy:
        wait_until(lambda: len(proxy.pairs) >= 3, 10, "the control channel and two links")
        echo_works(tunnel.public[0], size=10_000, seed=1)
        control, link = proxy.pairs[0], proxy.pairs[1]
        assert control.to_down is not None
        hello, proof = frames(bytes(control.to_up.seen))[:2]
        _challenge, welcome = frames(bytes(control.to_down.seen))[:2]
        link_frame = bytes(link.to_up.seen[:auth.LINK_FRAME_SIZE])
        server = tunnel.server
        assert server is not None and tunnel.client is not None
        port = tunnel.bind_port

        def replay(*sends: bytes) -> bytes:
            """Send each part after reading what the server says to the one before; all it said."""
            said = b""
            with connect(port, timeout=5) as sock:
                for part in sends:
                    sock.sendall(part)
                    if part[2] == auth.HELLO:
                        said += recv_exact(sock, 35)
                said += recv_all(sock)
            return said

        # the whole conversation again: the server draws a new nonce, the old proof fails
        said = replay(encode_ltv(*hello), encode_ltv(*proof))  # type: ignore[arg-type]
        assert [kind for kind, _ in frames(said)] == [auth.CHALLENGE], said.hex()
        server.wait_for_log("wrong token", timeout=5)
        time.sleep(1.05)  # the next "wrong token" line passes the throttle
        # the server's own proof reflected as the client's
        said = replay(encode_ltv(*hello), encode_ltv(auth.PROOF, welcome[1]))  # type: ignore[arg-type]
        assert [kind for kind, _ in frames(said)] == [auth.CHALLENGE]
        server.wait_for_log("wrong token", timeout=5, count=2)
        # a link proof copied off the wire, from the client's own address
        assert replay(link_frame) == b""
        line = server.wait_for_log("rejected data connection", timeout=5)
        assert "link number" in line and "was used already" in line, line
        time.sleep(1.05)
        # a forged one
        forged = link_frame[:11] + bytes(32)
        assert replay(forged) == b""
        line = server.wait_for_log("rejected data connection", timeout=5, count=2)
        assert line.endswith("a link proof that does not verify in this session"), line
        # a silent connection from the client's address is no link without its proof
        with connect(port, timeout=5) as silent:
            silent_port = silent.getsockname()[1]
            echoes(tunnel.public[0], count=12, size=5000, seed=20)  # more users than the pool holds
            assert closed_by_peer(silent, timeout=4)
        line = server.wait_for_log("no handshake or link proof within 2 s", timeout=5)
        assert f"rejected client {HOST}:{silent_port}: " in line, line
        echo_works(tunnel.public[0], size=100_000, seed=2)
        assert not tunnel.client.lines("lost the server"), "the session was disturbed"
        assert TOKEN not in server.log() + tunnel.client.log()


# ------------------------------------------------------------------------------------------------
# the udp transport: LINK datagrams

def pinged(port: int, data: bytes, wait: float = 2.5) -> bool:
    """Send ``data`` from a fresh UDP socket of the client's address to the UDP tunnel port:
    whether the server then pings it (heartbeat 1 s), which it does to the links it took."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.sendto(data, (HOST, port))
        sock.settimeout(wait)
        try:
            return sock.recv(100) == b"\x02"
        except (TimeoutError, ConnectionRefusedError):
            return False


def test_udp_links_prove_the_session_and_replays_open_nothing(launcher: Launcher, udp_echo: UdpEcho) -> None:
    """Catches: the udp transport's links announced by the raw token under auth = "challenge", a
    LINK datagram copied off the wire or forged that opens a link, the token still taken."""
    tunnel = Tunnel(launcher, [str(udp_echo.port)], TOKEN, transport="udp",
                    server_extra={"auth": "challenge", "heartbeat": 1}, client_extra=CHALLENGE)
    with through_proxy(tunnel, connection_pool=3) as proxy:
        wait_until(lambda: len(proxy.udp_seen) >= 3, 10, "three links")
        with contextlib.closing(user_socket()) as user:
            for k in range(5):
                payload = f"challenged flow {k}".encode()
                assert exchange(user, tunnel.public[0], payload, tries=3) == payload
        tcp = b"".join(bytes(d.seen) for pair in proxy.pairs for d in pair.directions())
        datagrams = list(proxy.udp_seen)
        server = tunnel.server
        assert server is not None and tunnel.client is not None
        assert TOKEN.encode() not in tcp and not any(TOKEN.encode() in d for d in datagrams), "the token crossed"
        links = [d for d in datagrams if d[:3] == bytes.fromhex("002845")]
        assert len(links) >= 3 and all(len(d) == auth.LINK_FRAME_SIZE for d in links), [d[:8].hex() for d in links]
        port = tunnel.bind_port
        assert not pinged(port, links[0]), "a LINK datagram copied off the wire opened a link"
        line = server.wait_for_log("on the UDP tunnel port: link number", timeout=5)
        assert "was used already" in line, line
        assert not pinged(port, links[0][:11] + bytes(32)), "a forged LINK datagram opened a link"
        line = server.wait_for_log("a link proof that does not verify in this session", timeout=5)
        assert "on the UDP tunnel port" in line, line
        assert not pinged(port, TOKEN.encode()), "the raw token opened a link under challenge"
        server.wait_for_log("not from a link, and no link proof", timeout=5)
        with contextlib.closing(user_socket()) as user:
            assert exchange(user, tunnel.public[0], b"after the replays", tries=3) == b"after the replays"
        assert not tunnel.client.lines("lost the server"), "the session was disturbed"


# ------------------------------------------------------------------------------------------------
# the ws family: /channel without the challenge, link headers replayed

def upgrade(sock: socket.socket, port: int, path: str, authorization: str | None) -> http.Response:
    sock.sendall(http.upgrade_request(f"{HOST}:{port}", path, authorization, http.USER_AGENTS[0], 7, KEY))
    return read_response(sock)


@pytest.mark.parametrize("transport", ["ws", "wss"])
def test_ws_channel_and_link_refusals_leave_the_session_alone(launcher: Launcher, echo_service: Service,
                                                              transport: str) -> None:
    tls = transport in TLS
    tunnel = challenge_tunnel(launcher, transport, echo_service.port)
    with through_proxy(tunnel, connection_pool=2) as proxy:
        wait_until(lambda: len(proxy.pairs) >= 3, 10, "the control channel and two links")
        server, client, port = tunnel.server, tunnel.client, tunnel.bind_port
        assert server is not None and client is not None
        count = 0
        kinds: set[str] = set()

        def refusal(ending: str, kind: str) -> None:
            nonlocal count
            count += 1
            line = server.wait_for_log("rejected client", timeout=5, count=count)
            assert line.endswith(ending), line
            kinds.add(kind)

        def next_of(kind: str) -> None:
            if kind in kinds:
                time.sleep(1.05)  # one line a second per kind: each refusal here gets its own

        # a v0.7.2 client: the bearer token on /channel
        with raw_connection(port, tls, timeout=5) as raw:
            assert upgrade(raw, port, "/channel", f"Bearer {TOKEN}").status == 401
        refusal('this server has auth = "challenge"', "auth")
        # /channel upgraded for anyone, but a silent one is closed at the challenge's deadline...
        with raw_connection(port, tls, timeout=5) as raw:
            assert upgrade(raw, port, "/channel", None).status == 101
            started = time.monotonic()
            assert closed_by_peer(raw, timeout=5)
            assert time.monotonic() - started < 3.5
        refusal("no answer to the challenge within 2 s", "timeout")
        # ...and one that cannot prove the token never resets the real session
        with raw_connection(port, tls, timeout=5) as raw:
            response = upgrade(raw, port, "/channel", None)
            assert response.status == 101
            fake = Connection(ConnectionType.CLIENT, trailing_data=response.rest)
            raw.sendall(fake.send(BytesMessage(data=encode_ltv(auth.HELLO, bytes(32)))))
            raw.recv(1024)  # the challenge
            raw.sendall(fake.send(BytesMessage(data=encode_ltv(auth.PROOF, bytes(32)))))
            assert closed_by_peer(raw, timeout=5)
        refusal("wrong token", "token")
        # data connections: no proof, the token, a proof copied off the wire (ws: in clear)
        for value, ending in ((None, "data connection: no link proof"),
                              (f"Bearer {TOKEN}", "data connection: no link proof")):
            next_of("link")
            with raw_connection(port, tls, timeout=5) as raw:
                raw.sendall(http.upgrade_request(f"{HOST}:{port}", "/tunnel/9", value, http.USER_AGENTS[0], 9, KEY))
                refused(raw, 401)
            refusal(ending, "link")
        if not tls:
            head = bytes(proxy.pairs[1].to_up.seen).split(b"\r\n\r\n")[0].decode()
            copied = next(line.split(": ", 1)[1] for line in head.split("\r\n") if line.startswith("Authorization"))
            with raw_connection(port, tls, timeout=5) as raw:
                raw.sendall(http.upgrade_request(f"{HOST}:{port}", "/tunnel/9", copied, http.USER_AGENTS[0], 9, KEY))
                refused(raw, 401)
            line = server.wait_for_log("was used already", timeout=5)
            assert "data connection: link number" in line, line
        echoes(tunnel.public[0], count=6, size=50_000, seed=40)
        assert not client.lines("lost the server"), client.log()
        assert len(server.lines("control channel up")) == 1, server.log()
        assert TOKEN not in server.log() + client.log()


# ------------------------------------------------------------------------------------------------
# the ws client's challenge, in this process against a server played with wsproto

def play_server(sock: socket.socket, welcome: bytes | None, after: bytes = b"") -> None:
    """Answer the client's HELLO with a CHALLENGE (a ping first), its PROOF with ``welcome`` (the
    right one when None) and ``after`` in the same write."""
    conn = Connection(ConnectionType.SERVER)
    server = auth.ServerHandshake(TOKEN, bytes(range(32)))
    messages: list[bytes] = []

    def message() -> bytes:
        while not messages:
            conn.receive_data(sock.recv(4096))
            messages.extend(e.data for e in conn.events() if isinstance(e, Message))
        return messages.pop(0)

    hello = FrameReader(typed=True)
    hello.feed(message())
    sock.sendall(conn.send(Ping(payload=b"p"))
                 + conn.send(BytesMessage(data=server.challenge(hello.kind, hello.payload))))
    proof = FrameReader(typed=True)
    proof.feed(message())
    if welcome is None:
        server.check(proof.kind, proof.payload)
        welcome = server.welcome()
    sock.sendall(conn.send(BytesMessage(data=welcome)) + after)


def test_ws_client_challenge_reads_nothing_past_the_welcome() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        after = b"\x82\x01\x00"  # a heartbeat message right behind the welcome
        player = threading.Thread(target=play_server, args=(theirs, None, after))
        player.start()
        signer, rest = challenge(ours, TOKEN, b"")
        player.join(5)
        assert rest == b"" and ours.recv(16) == after
        assert signer.frame()[:3] == bytes.fromhex("002845")


def test_ws_client_challenge_refuses_a_server_without_the_token() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        forged = encode_ltv(auth.WELCOME, bytes(32))
        player = threading.Thread(target=play_server, args=(theirs, forged))
        player.start()
        with pytest.raises(auth.AuthError, match="the server could not prove the token"):
            challenge(ours, TOKEN, b"")
        player.join(5)
