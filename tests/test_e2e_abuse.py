"""End to end against hostile or broken peers: junk on the tunnel port, data connections from
a foreign address, ports in use, bad configs, a server that goes silent, and byte-exact interop
with peers that speak the captured wire format of the Go program (v0.7.2, tcp transport). On the
udp transport: token guessing with datagrams, links from a foreign address and floods of them."""

from __future__ import annotations

import contextlib
import random
import re
import selectors
import socket
import struct
import threading
import time

import pytest

from tests import harness
from tests.harness import (
    HOST,
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
    free_port,
    http_get,
    ltv,
    nofile_at_least,
    recv_all,
    recv_exact,
    server_toml,
    toml_section,
    user_socket,
    wait_until,
)
from tests.ws_peer import raw_connection, read_response, upgrade_head

pytestmark = pytest.mark.timeout(60)


SG_HB, SG_CHAN, SG_CLOSED, SG_TCP, SG_RTT = 0x00, 0x01, 0x03, 0x04, 0x06

# The captured tcp conversation of the Go program: token "musix", mapping 45801=35133.
GO_HELLO = bytes.fromhex("00 05 01 6d 75 73 69 78")
GO_SERVER_REPLY = bytes.fromhex("00 05 01 6d 75 73 69 78 06")
GO_TARGET_HEADER = bytes.fromhex("00 05 04 33 35 31 33 33")
GO_PAYLOAD = bytes.fromhex("68 65 6c 6c 6f 20 62 61 63 6b 68 61 75 6c")


def nothing_pending(sock: socket.socket, wait: float = 0.3) -> bool:
    """True when ``sock`` has no byte to read (and is not closed) after ``wait`` seconds."""
    time.sleep(wait)
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(harness.IO_TIMEOUT)
    return False


# ------------------------------------------------------------------------------------------------
# junk on the tunnel port

JUNK = 50
JUNK_SOURCE = "127.0.0.3"  # scanners: another address than the real client's


def test_silence_and_garbage_do_not_delay_a_real_client(launcher: Launcher, echo_service: Service) -> None:
    """The client is already running and retrying every second; the server starts, 50 silent and
    50 garbage connections arrive at once, and the client's next attempt (within ~1 s, while the
    silent ones still wait for their 2 s deadline) must get through without waiting for them."""
    tunnel = Tunnel(launcher, [str(echo_service.port)])
    client = tunnel.start_client()
    client.wait_for_log(f"cannot connect to server {HOST}:{tunnel.bind_port}: ", timeout=10)
    server = tunnel.start_server()
    rng = random.Random(50)
    junk: list[socket.socket] = []
    try:
        for i in range(2 * JUNK):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            junk.append(sock)
            sock.settimeout(10)
            sock.bind((JUNK_SOURCE, 0))
            sock.connect((HOST, tunnel.bind_port))
            if i >= JUNK:  # the garbage half
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if i % 2 else rng.randbytes(rng.randint(1, 600)))
        client_first = bool(server.lines("connected: control channel up"))

        tunnel.wait_connected(timeout=10)
        echo_works(tunnel.public[0], size=100_000, seed=11)
        # (client_first: the rare run where the client's retry came before the junk; then the
        # silent ones are rejected as foreign data connections instead)
        silent = (f"not the control channel's address {HOST}" if client_first else "no handshake within 2 s")
        silent_line = server.wait_for_log(silent, timeout=10)
        shape = (rf"rejected data connection from {JUNK_SOURCE}:\d+: not the control channel's address {HOST}"
                 if client_first else rf"rejected client {JUNK_SOURCE}:\d+: no handshake within 2 s")
        assert re.search(shape.replace(".", r"\.") + r"( \(\d+ more like it\))?$", silent_line), silent_line
        server.wait_for_log(f"rejected client {JUNK_SOURCE}: not a Backhaul handshake", timeout=10)
        lines = server.log().splitlines()
        up = next(i for i, line in enumerate(lines) if "connected: control channel up" in line)
        expired = next(i for i, line in enumerate(lines) if silent in line)
        assert up < expired, "the client got in only after the silent connections were dropped"
        for sock in junk:
            assert closed_by_peer(sock, timeout=5), "the server kept a junk connection open"
    finally:
        for sock in junk:
            sock.close()
    assert server.alive()
    echo_works(tunnel.public[0], size=100_000, seed=12)
    assert "Traceback" not in server.log()


def test_data_connection_from_a_foreign_address_is_rejected(launcher: Launcher, echo_service: Service) -> None:
    tunnel = Tunnel(launcher, [str(echo_service.port)]).up()
    assert tunnel.server is not None
    with connect(tunnel.bind_port, timeout=10, source="127.0.0.2") as foreign:
        # While it waits, users keep being served: more users than the pool holds, so a foreign
        # connection wrongly queued as a link would be handed to one of them.
        for i in range(12):
            echo_works(tunnel.public[0], size=1000, seed=100 + i)
        line = tunnel.server.wait_for_log("rejected data connection from", timeout=10)
        assert line.endswith(f"rejected data connection from 127.0.0.2:{foreign.getsockname()[1]}: "
                             f"not the control channel's address {HOST}"), line
        assert closed_by_peer(foreign, timeout=5)
    echo_works(tunnel.public[0], size=100_000, seed=13)
    assert tunnel.server.alive()


GUESSER = "127.0.0.2"   # an address that guesses tokens; the real client is on 127.0.0.1


def guess(port: int, token: str, source: str = GUESSER) -> str:
    """One handshake with ``token``: how the server ended it ("closed" unanswered, "reset" when
    it closed without reading, "answered" when it replied)."""
    with connect(port, timeout=10, source=source) as sock:
        try:
            sock.sendall(ltv(SG_CHAN, token.encode()))
            return "answered" if recv_all(sock) else "closed"
        except ConnectionResetError:
            return "reset"


def test_token_guessing_is_rate_limited_per_address_and_logged_once(launcher: Launcher, echo_service: Service) -> None:
    """25 wrong tokens in a row from one address: the first 20 are judged (their lines throttled
    to one a second), the 20th puts the address on hold with one line, the rest are closed unread;
    the real client from another address gets in at once all the while."""
    token, wrong = "Guess-Right-91c2", "Guess-Wrong-5d7e"
    tunnel = Tunnel(launcher, [str(echo_service.port)], token)
    server = tunnel.start_server()
    outcomes = [guess(tunnel.bind_port, wrong) for _ in range(25)]
    assert outcomes[:20] == ["closed"] * 20, outcomes
    assert set(outcomes[20:]) <= {"reset", "closed"}, outcomes
    line = server.wait_for_log("refusing connections from", timeout=5)
    assert re.search(rf"refusing connections from {GUESSER} for \d+(\.\d+)? s: 20 failed handshakes within 10 s$",
                     line), line
    assert len(server.lines("wrong token")) <= 3, server.log()   # one a second, with a count
    assert server.lines("wrong token")[0].endswith(f"rejected client {GUESSER}: wrong token"), server.log()
    assert len(server.lines("refusing connections")) == 1
    assert guess(tunnel.bind_port, token) in ("reset", "closed"), "the right token from a held address got in"
    tunnel.start_client()
    tunnel.wait_connected(timeout=5)
    echo_works(tunnel.public[0], size=100_000, seed=14)
    assert len(server.lines("refusing connections")) == 1
    assert token not in server.log() and wrong not in server.log()


def test_wrong_tokens_from_the_clients_own_address_are_judged_and_the_log_says_so(launcher: Launcher,
                                                                                   echo_service: Service) -> None:
    """40 wrong tokens from the address of the running client: that address is exempt from the
    limit (its own links fail in numbers when a control channel drops), so every one is judged
    and answered by a close, and the line at the limit says that it is not refused. Catches: a
    line claiming `refusing connections from` the client's address while nothing is refused."""
    token, wrong = "Own-Address-Right-2f61", "Own-Address-Wrong-8a3c"
    tunnel = Tunnel(launcher, [str(echo_service.port)], token).up()
    server = tunnel.server
    assert server is not None
    outcomes = [guess(tunnel.bind_port, wrong, source=HOST) for _ in range(40)]
    assert outcomes == ["closed"] * 40, outcomes
    line = server.wait_for_log("failed handshakes within 10 s from", timeout=5)
    assert line.endswith(f"20 failed handshakes within 10 s from {HOST}, the address of a client of this tunnel: "
                         "not refused, each is judged"), line
    assert not server.lines("refusing connections"), server.lines("refusing connections")
    echo_works(tunnel.public[0], size=100_000, seed=15)
    assert token not in server.log() and wrong not in server.log()


def datagram_from(source: str, port: int, data: bytes, listen: float = 0.0) -> list[bytes]:
    """Send ``data`` from a fresh UDP socket on ``source`` to the tunnel port; what came back to
    that socket within ``listen`` seconds (an accepted link is pinged every heartbeat)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.sendto(data, (HOST, port))
        got: list[bytes] = []
        deadline = time.monotonic() + listen
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                got.append(sock.recv(65536))
            except (TimeoutError, ConnectionRefusedError):
                pass
        return got


def udp_transport(launcher: Launcher, echo: UdpEcho, token: str = "e2e-token", **extra: object) -> Tunnel:
    return Tunnel(launcher, [str(echo.port)], token, transport="udp", server_extra={"heartbeat": 1, **extra},
                  client_extra={"connection_pool": 2, **extra}).up()


def test_udp_token_guessing_is_rate_limited_per_address_like_handshakes(launcher: Launcher,
                                                                        udp_echo: UdpEcho) -> None:
    """25 wrong tokens as datagrams from one address: the 20th puts the address on hold with one
    line, for its datagrams and its TCP handshakes alike; the right token from it is then dropped
    unread; the real client's flows go on."""
    token, wrong = "Udp-Guess-Right-47a1", "Udp-Guess-Wrong-c93e"
    tunnel = udp_transport(launcher, udp_echo, token)
    server = tunnel.server
    assert server is not None
    for _ in range(25):
        datagram_from(GUESSER, tunnel.bind_port, wrong.encode())
    line = server.wait_for_log("refusing connections from", timeout=5)
    assert re.search(rf"refusing connections from {GUESSER} for \d+(\.\d+)? s: 20 failed handshakes within 10 s$",
                     line), line
    refusals = server.lines("not from a link, and not the token")
    assert 1 <= len(refusals) <= 3, server.log()   # one a second, with a count
    assert refusals[0].split(": ", 1)[1].startswith(f"dropped a datagram from {GUESSER}:"), refusals[0]
    assert datagram_from(GUESSER, tunnel.bind_port, token.encode(), listen=2.5) == [], \
        "the right token from a held address opened a link"
    assert guess(tunnel.bind_port, token) in ("reset", "closed"), "a TCP handshake from a held address got in"
    with contextlib.closing(user_socket()) as user:
        assert exchange(user, tunnel.public[0], b"still carried", tries=3) == b"still carried"
    assert len(server.lines("refusing connections")) == 1
    assert "Traceback" not in server.log()


def test_udp_links_from_a_foreign_address_are_refused_and_a_flood_is_bounded(launcher: Launcher,
                                                                            udp_echo: UdpEcho) -> None:
    """The right token from another address than the control channel's opens no link (it would
    be pinged); 3,000 of them from 8 addresses cost a few lines, no descriptor and no thread,
    and the real client's flows go on meanwhile."""
    token = "Udp-Foreign-Token-5b0d"
    tunnel = udp_transport(launcher, udp_echo, token)
    server = tunnel.server
    assert server is not None
    assert datagram_from(GUESSER, tunnel.bind_port, token.encode(), listen=2.5) == [], "a foreign link was pinged"
    line = server.wait_for_log("from another address than the control channel's", timeout=5)
    assert f"dropped a datagram from {GUESSER}:" in line and line.endswith(f"control channel's {HOST}"), line
    fds, threads = server.fds(), server.threads()
    lines = len(server.log().splitlines())
    with contextlib.ExitStack() as stack:
        senders = []
        for i in range(8):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind((f"127.0.0.{i + 2}", 0))
            senders.append(sock)
        with contextlib.closing(user_socket()) as user:
            for k in range(3000):
                senders[k % 8].sendto(token.encode(), (HOST, tunnel.bind_port))
                if k % 300 == 299:
                    payload = f"flow during the flood {k}".encode()
                    assert exchange(user, tunnel.public[0], payload, tries=3) == payload
    time.sleep(0.5)
    assert server.fds() == fds and server.threads() == threads
    written = len(server.log().splitlines()) - lines
    assert written <= 30, f"{written} lines for a flood of foreign links"
    assert len(server.lines("refusing connections from")) <= 8
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("auth", ["token", "challenge"])
def test_the_token_is_in_no_page_metric_or_usage_file_after_abuse(launcher: Launcher, udp_echo: UdpEcho,
                                                                  tmp_path, auth: str) -> None:
    """udp transport, both sides with their status page and usage file: after flows, wrong tokens,
    the token with garbage after it and the token from a foreign address, no page, metric or
    usage file of either side holds the token (the launcher checks every process's output)."""
    token = f"Never-Shown-{auth}-2f8e61"
    usage = {side: tmp_path / f"{side}-usage.json" for side in ("server", "client")}
    web = {side: free_port() for side in ("server", "client")}
    sides = {side: {"auth": auth, "web_port": web[side], "sniffer": True, "sniffer_log": str(usage[side])}
             for side in ("server", "client")}
    tunnel = Tunnel(launcher, [str(udp_echo.port)], token, transport="udp", server_extra=sides["server"],
                    client_extra=sides["client"]).up()
    with contextlib.closing(user_socket()) as user:
        assert exchange(user, tunnel.public[0], b"a flow first", tries=3) == b"a flow first"
    for data in (b"wrong", token.encode() + b"garbage", token[:-1].encode()):
        datagram_from(GUESSER, tunnel.bind_port, data)
    datagram_from("127.0.0.3", tunnel.bind_port, token.encode())
    guess(tunnel.bind_port, token[::-1])
    assert tunnel.server is not None
    tunnel.server.wait_for_log("on the UDP tunnel port", timeout=5)
    wait_until(lambda: all(path.exists() for path in usage.values()), 15, "both usage files")
    for side in ("server", "client"):
        for path in ("/", "/metrics", "/healthz", "/status.json"):
            status, _type, body = http_get(web[side], path)
            assert status in (200, 503), (side, path, status)
            assert token not in body and token[:-1] not in body, f"the token is on the {side}'s {path}"
        assert token not in usage[side].read_text(), f"the token is in the {side}'s usage file"
    assert "Traceback" not in tunnel.server.log()


def test_user_with_no_tunnel_is_closed_after_3_s(launcher: Launcher) -> None:
    bind_port, public = free_port(), free_port()
    server = launcher.start("server", server_toml(bind_port, [f"{HOST}:{public}=5201"]))
    server.wait_for_log(f"tcp tunnel listening on {HOST}:{bind_port}")
    with connect(public, timeout=10) as user:
        assert closed_by_peer(user, timeout=8), "a user with no tunnel was kept open"
        line = server.wait_for_log("closed user connection", timeout=5)
        assert line.endswith(f"closed user connection {HOST}:{user.getsockname()[1]} on port {public}: "
                             "no tunnel connection within 3 s"), line
    assert server.alive()


# ------------------------------------------------------------------------------------------------
# refusing to start

@pytest.mark.parametrize("which", ["tunnel", "public"])
def test_listen_port_in_use_exits_1_naming_the_address(launcher: Launcher, which: str) -> None:
    with socket.create_server((HOST, 0)) as busy:
        port = busy.getsockname()[1]
        bind_port = port if which == "tunnel" else free_port()
        public = port if which == "public" else free_port()
        code, err = launcher.run("server", server_toml(bind_port, [f"{HOST}:{public}=5201"]))
    assert code == 1, err
    assert f"cannot listen on {HOST}:{port}: address already in use" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("section", "wrong", "right"), [("server", "bind_adr", "bind_addr"),
                                                         ("client", "remote_adr", "remote_addr")])
def test_misspelt_key_exits_78_with_one_line(launcher: Launcher, section: str, wrong: str, right: str) -> None:
    values: dict[str, object] = {wrong: f"{HOST}:{free_port()}", "token": "x"}
    if section == "server":
        values["ports"] = ["5000=5201"]
    config = launcher.write_config("bad", toml_section(section, values))
    bh = launcher.start_file("bad", config)
    code = bh.wait(15)
    err = bh.log()
    assert code == 78, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"backhaul: {config}: {section}.{wrong}"), lines[0]
    assert f"did you mean '{right}'" in lines[0], lines[0]
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# a silent server

def fake_server_handshake(listener: Listener, token: str) -> socket.socket:
    """Play a Go server's side of the handshake; returns the control channel."""
    control = listener.accept()
    assert recv_exact(control, 3 + len(token)) == ltv(SG_CHAN, token.encode())
    control.sendall(ltv(SG_CHAN, token.encode()) + bytes((SG_RTT,)))
    assert recv_exact(control, 1) == bytes((SG_RTT,))
    return control


def test_client_restarts_when_the_server_goes_silent(launcher: Launcher, listener: Listener) -> None:
    """A fake server beats every second three times, then goes silent; the client, having learnt
    that cadence, gives up after MIN_SILENCE (5 s, the floor over 3 beats), says goodbye and dials
    a new control channel."""
    token = "silent-server-tk"
    client = launcher.start("client", client_toml(listener.port, token, connection_pool=1))
    control = fake_server_handshake(listener, token)
    link = listener.accept()
    for _ in range(3):
        time.sleep(1)  # the server's own cadence, not a synchronisation
        control.sendall(bytes((SG_HB,)))
    line = client.wait_for_log(f"lost the server {HOST}:{listener.port}: ", timeout=9)
    assert "silent" in line and "1 s heartbeats" in line, line
    control.settimeout(5)
    assert recv_all(control) == bytes((SG_CLOSED,))
    link.settimeout(5)
    assert recv_all(link) == b""
    again = listener.accept(timeout=5)  # a new control channel, with a new handshake
    assert recv_exact(again, 3 + len(token)) == ltv(SG_CHAN, token.encode())


def test_client_keeps_a_session_whose_server_beats_slower_than_its_own_heartbeat(launcher: Launcher,
                                                                                  listener: Listener) -> None:
    """Client heartbeat = 1, server beating every 3.5 s (as a Go server with a long heartbeat):
    more than 3 of the client's own periods pass between beats, yet the session lives, because
    the limit follows what the server does."""
    token = "slow-beat-tk"
    client = launcher.start("client", client_toml(listener.port, token, heartbeat=1, connection_pool=1))
    control = fake_server_handshake(listener, token)
    link = listener.accept()
    for _ in range(3):
        time.sleep(3.5)  # the server's own cadence, not a synchronisation
        control.sendall(bytes((SG_HB,)))
    assert nothing_pending(control, wait=0.5), "the client said goodbye to a live server"
    assert nothing_pending(link, wait=0)
    assert not client.lines("lost the server"), client.log()


# ------------------------------------------------------------------------------------------------
# interop with the Go wire format, byte for byte

def test_our_server_with_a_go_client_byte_exact(launcher: Launcher) -> None:
    bind_port, public = free_port(), free_port()
    server = launcher.start("server", server_toml(bind_port, [f"{HOST}:{public}=35133"], "musix",
                                                  connection_pool=2))
    server.wait_for_log(f"tcp tunnel listening on {HOST}:{bind_port}")
    with connect(bind_port, 10) as conn1:
        conn1.sendall(GO_HELLO)
        assert recv_exact(conn1, len(GO_SERVER_REPLY)) == GO_SERVER_REPLY
        conn1.sendall(bytes((SG_RTT,)))
        with connect(bind_port, 10) as conn2, connect(bind_port, 10) as conn3:
            server.wait_for_log(f"client {HOST}:{conn1.getsockname()[1]} connected: control channel up")
            assert nothing_pending(conn1), "the server sent more than the handshake and the RTT probe"
            with connect(public, 10) as user:
                user.sendall(GO_PAYLOAD)
                with selectors.DefaultSelector() as sel:
                    sel.register(conn2, selectors.EVENT_READ)
                    sel.register(conn3, selectors.EVENT_READ)
                    ready = [key.fileobj for key, _ in sel.select(timeout=10)]
                assert len(ready) == 1, f"{len(ready)} data connections were used for one user"
                data = ready[0]
                assert isinstance(data, socket.socket)
                assert recv_exact(data, len(GO_TARGET_HEADER)) == GO_TARGET_HEADER
                assert recv_exact(conn1, 1) == bytes((SG_CHAN,))
                assert recv_exact(data, len(GO_PAYLOAD)) == GO_PAYLOAD
                data.sendall(GO_PAYLOAD)
                assert recv_exact(user, len(GO_PAYLOAD)) == GO_PAYLOAD
                other = conn3 if data is conn2 else conn2
                assert nothing_pending(other)
            # the Go client shutting down sends 0x03 on the control channel
            conn1.sendall(bytes((SG_CLOSED,)))
            server.wait_for_log(f"client {HOST}:{conn1.getsockname()[1]} is shutting down or restarting; "
                                "waiting for the client to reconnect", timeout=5)
    assert server.alive()
    assert "Traceback" not in server.log()


def test_server_keeps_connection_pool_links_ready(launcher: Launcher) -> None:
    """A client that opens no links: the server asks for connection_pool of them (one 0x01 each),
    stops asking once they are there, and asks for one more per user."""
    bind_port, public = free_port(), free_port()
    server = launcher.start("server", server_toml(bind_port, [f"{HOST}:{public}=35133"], "musix",
                                                  connection_pool=3))
    server.wait_for_log(f"tcp tunnel listening on {HOST}:{bind_port}")
    with connect(bind_port, 10) as control, contextlib.ExitStack() as stack:
        control.sendall(GO_HELLO)
        assert recv_exact(control, len(GO_SERVER_REPLY)) == GO_SERVER_REPLY
        control.sendall(bytes((SG_RTT,)))
        control.settimeout(5)
        assert recv_exact(control, 3) == bytes((SG_CHAN,)) * 3
        links = [stack.enter_context(connect(bind_port, 10)) for _ in range(3)]
        assert nothing_pending(control, wait=1.5), "the server asked for more links than connection_pool"
        with connect(public, 10):
            assert recv_exact(control, 1) == bytes((SG_CHAN,))
            with selectors.DefaultSelector() as sel:
                for link in links:
                    sel.register(link, selectors.EVENT_READ)
                ready = [key.fileobj for key, _ in sel.select(timeout=10)]
            assert len(ready) == 1
            assert isinstance(ready[0], socket.socket)
            assert recv_exact(ready[0], len(GO_TARGET_HEADER)) == GO_TARGET_HEADER


def test_our_client_with_a_go_server_byte_exact(launcher: Launcher, listener: Listener,
                                                echo_service: Service) -> None:
    target = str(echo_service.port)
    client = launcher.start("client", client_toml(listener.port, "musix", connection_pool=2))
    conn1 = listener.accept()
    assert recv_exact(conn1, len(GO_HELLO)) == GO_HELLO
    conn1.sendall(GO_SERVER_REPLY)  # reply and RTT probe in one write, as the Go server does
    assert recv_exact(conn1, 1) == bytes((SG_RTT,))
    conn2, conn3 = listener.accept(), listener.accept()
    client.wait_for_log(f"connected to server {HOST}:{listener.port}: control channel up")
    assert nothing_pending(conn2) and nothing_pending(conn3), "a data connection sent something"
    assert nothing_pending(conn1), "the client sent more than the RTT echo"

    header = ltv(SG_TCP, target.encode())  # 00 05 04 <5 digits> for an ephemeral port
    conn1.sendall(bytes((SG_CHAN,)))  # one user: ask for one more data connection
    conn2.sendall(header)
    conn4 = listener.accept(timeout=5)
    conn2.sendall(GO_PAYLOAD)
    assert recv_exact(conn2, len(GO_PAYLOAD)) == GO_PAYLOAD
    conn2.shutdown(socket.SHUT_WR)
    conn2.settimeout(5)
    assert recv_all(conn2) == b""
    assert nothing_pending(conn4), "a new data connection sent something"
    assert echo_service.accepted == 1
    assert client.alive()
    assert "Traceback" not in client.log()


# ------------------------------------------------------------------------------------------------
# slowloris: a thousand connections that say nothing, or one byte a second

SLOW = 1000                  # connections in all, half to the tunnel port, half to the public port
SLOW_SOURCES = 10            # tunnel-port connections come from this many addresses (127.0.0.2 ...)
SLOW_HOLD = 2.0              # seconds the flood is held before and while the real handshake is timed
HANDSHAKE_BOUND = 1.0


class Slowloris(threading.Thread):
    """Opens ``SLOW`` connections (half to ``tunnel``, from many addresses; half to ``public``) and
    every second sends one more byte of ``drip`` on every other one; until stopped."""

    def __init__(self, tunnel: int, public: int, drip: bytes) -> None:
        super().__init__(name="slowloris", daemon=True)
        self.tunnel, self.public, self.drip = tunnel, public, drip
        self.socks: list[socket.socket] = []
        self.opened = threading.Event()
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            for i in range(SLOW):
                sock = socket.socket()
                sock.setblocking(False)
                if i % 2 == 0:
                    sock.bind((f"127.0.0.{2 + (i // 2) % SLOW_SOURCES}", 0))
                sock.connect_ex((HOST, self.tunnel if i % 2 == 0 else self.public))
                self.socks.append(sock)
            self.opened.set()
            step = 0
            while not self._halt.wait(1.0):
                byte = self.drip[step % len(self.drip):step % len(self.drip) + 1]
                for sock in self.socks[1::2] + self.socks[::4]:
                    with contextlib.suppress(OSError):
                        sock.send(byte)
                step += 1
        finally:
            for sock in self.socks:
                sock.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(20)


def timed_handshake(transport: str, port: int, token: str) -> float:
    """Seconds a client's handshake takes: the token frame answered (tcp family) or the 101 of
    /channel received (ws family), from the connect on. The tcp family's comes from an address of
    its own: from the control channel's, v0.7.2 tells a new handshake from a link only by its
    first bytes, and the server may see the connection before them (then tcpmux takes it for a
    session and the client tries again; auth = "challenge" has no such doubt)."""
    start = time.monotonic()
    if transport.startswith("tcp"):
        with connect(port, timeout=5, source="127.0.0.99") as sock:
            sock.sendall(ltv(SG_CHAN, token.encode()))
            recv_exact(sock, 3 + len(token))
            took = time.monotonic() - start
    else:
        with raw_connection(port, transport in ("wss", "wssmux"), timeout=5) as sock:
            sock.sendall(upgrade_head(port, "/channel", token))
            assert read_response(sock).status == 101
            took = time.monotonic() - start
    return took


def settled(proc: harness.Backhaul, limit: float = 10.0) -> None:
    """Wait (bounded) until the process's count of open files stops moving for half a second."""
    deadline = time.monotonic() + limit
    last = proc.fds()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = proc.fds()
        if now == last:
            return
        last = now


@pytest.mark.parametrize("transport", harness.TRANSPORTS)
def test_slowloris_does_not_delay_a_real_handshake(launcher: Launcher, echo_service: Service, transport: str) -> None:
    """500 connections to the tunnel port from 10 addresses and 500 to a public port, half silent,
    half sending a byte a second: a client's handshake still takes under a second, the pending
    ones stay capped (the oldest make room, busy addresses are held back), the real client gets
    back in and carries users, and nothing is left open once the flood ends."""
    token = "Slow-Loris-Token-55"
    hold = socket.create_server((HOST, 0), backlog=2048)   # a target that never accepts: users sit
    tunnel = Tunnel(launcher, [str(hold.getsockname()[1]), str(echo_service.port)], token, transport=transport,
                    label=transport)
    drip = (b"GET /channel HTTP/1.1\r\nHost: x\r\n" if transport.startswith("ws") else ltv(SG_CHAN, token.encode()))
    with hold, nofile_at_least(4 * SLOW):
        tunnel.up()
        server, client = tunnel.server, tunnel.client
        assert server is not None and client is not None
        idle_fds = server.fds()
        flood = Slowloris(tunnel.bind_port, tunnel.public[0], drip)
        try:
            assert flood.opened.wait(20)
            time.sleep(SLOW_HOLD)
            settled(server)  # the flood's users have their links: from now on it only holds and drips
            took = timed_handshake(transport, tunnel.bind_port, token)
            assert took < HANDSHAKE_BOUND, f"a handshake took {took:.2f} s under the flood"
            # our handshake took the control channel (ws: reset it): the real client comes back
            wait_until(lambda: len(client.lines("control channel up")) >= 2, 10, "the client to reconnect")
            echo_works(tunnel.public[1], size=100_000, seed=90)
            busy = server.fds()
        finally:
            flood.stop()
            # Users that closed wait, half-closed, for a target that never answers nor closes (as
            # they would without the tunnel): its end ends them.
            hold.close()
        assert server.wait_for_log("to make room", timeout=5), "the pending cap was never reached"
        assert server.lines("refusing connections from 127.0.0."), "no address of the flood was held back"
        if transport.startswith("tcp"):  # silent ones from other addresses than the client's: no links
            assert server.lines("rejected data connection from 127.0.0."), server.log()[-3000:]
        wait_until(lambda: server.fds() <= idle_fds + 64, 15, "the server to close the flood's connections")
        print(f"\n{transport}: handshake {took * 1000:.0f} ms under the flood; server fds {idle_fds} idle, "
              f"{busy} during, {server.fds()} after")
        echo_works(tunnel.public[1], size=100_000, seed=91)
        assert server.alive() and client.alive()
        assert "Traceback" not in server.log() + client.log()


@pytest.mark.parametrize("transport", ["wss", "wssmux"])
def test_connections_reset_before_their_tls_starts_do_not_stop_the_port(launcher: Launcher, echo_service: Service,
                                                                       transport: str) -> None:
    """A connection reset with bytes unread before the server wraps it in TLS made wrap_socket raise
    inside the listener, and the reactor stopped watching the tunnel port for good (found by the
    reconnect cycles). 300 of them, then a new client must still get in."""
    tunnel = Tunnel(launcher, [str(echo_service.port)], transport=transport).up()
    assert tunnel.server is not None and tunnel.client is not None
    for _ in range(300):
        with connect(tunnel.bind_port, timeout=5, source="127.0.0.5") as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tunnel.client.kill()
    tunnel.start_client()
    tunnel.wait_connected(server_count=2, timeout=10)
    echo_works(tunnel.public[0], size=50_000, seed=95)
    assert "Traceback" not in tunnel.server.log(), tunnel.server.log()
