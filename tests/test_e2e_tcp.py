"""End to end over the tcp transport: a server process and a client process, users and target
services in this process, data checked with sha256 in both relay modes (splice and copy)."""

from __future__ import annotations

import hashlib
import random
import re
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import harness
from tests.harness import (
    HOST,
    TRANSPORTS,
    Backhaul,
    Launcher,
    Listener,
    Service,
    Tunnel,
    client_toml,
    closed_by_peer,
    connect,
    echo_roundtrip,
    echo_works,
    free_port,
    ltv,
    recv_all,
    recv_exact,
    server_toml,
    thread_is_sleeping,
    wait_until,
)
from tests.streams import run_64_streams

pytestmark = pytest.mark.timeout(60)


MiB = 1024 * 1024
SG_CHAN, SG_CLOSED, SG_RTT = 0x01, 0x03, 0x06
SHUTDOWN_LIMIT = 2.0  # the contract: SIGTERM ends the process within 2 s


def control_up(tunnel: Tunnel) -> str:
    return f"connected to server {HOST}:{tunnel.bind_port}: control channel up"


def control_peer(server: Backhaul) -> str:
    """ip:port of the client's control channel, from the server's line about it."""
    match = re.search(r"client (\S+) connected: control channel up", server.wait_for_log("control channel up"))
    assert match, server.log()
    return match.group(1)


# ------------------------------------------------------------------------------------------------
# 64 concurrent streams, sha256-exact both ways

@pytest.mark.timeout(150)
def test_64_concurrent_streams_sha256_exact_both_ways(relay_launcher: Launcher) -> None:
    run_64_streams(lambda target: Tunnel(relay_launcher, [target]).up())


# ------------------------------------------------------------------------------------------------
# conformance cases of one tunneled connection (one more transport = one more TRANSPORTS entry)

class Conformance:
    """A tunnel with two mappings: one to an echo service, one to a listener the test drives."""

    def __init__(self, launcher: Launcher, transport: str, echo: Service, target: Listener) -> None:
        self.target = target
        self.tunnel = Tunnel(launcher, [str(echo.port), str(target.port)], transport=transport).up()
        self.echo_port, self.target_port = self.tunnel.public

    def pair(self) -> tuple[socket.socket, socket.socket]:
        """A user connection and the target's end of it (the caller closes the user socket)."""
        user = socket.create_connection((HOST, self.target_port), timeout=harness.IO_TIMEOUT)
        try:
            user.sendall(b"hello")  # the first bytes: they reach the target through the tunnel
            target = self.target.accept()
            assert recv_exact(target, 5) == b"hello"
        except BaseException:
            user.close()
            raise
        return user, target


def blocked_read(sock: socket.socket, timeout: float) -> tuple[threading.Thread, dict[str, object]]:
    """Start a thread blocked in recv on ``sock``; the dict gets what it returned or raised."""
    outcome: dict[str, object] = {}

    def run() -> None:
        sock.settimeout(timeout)
        start = time.monotonic()
        try:
            outcome["data"] = sock.recv(65536)
        except OSError as exc:
            outcome["error"] = exc
        outcome["after"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("transport", TRANSPORTS)
class TestTunneledConnection:
    @pytest.fixture
    def conf(self, transport: str, relay_launcher: Launcher, echo_service: Service,
             listener: Listener) -> Conformance:
        return Conformance(relay_launcher, transport, echo_service, listener)

    def test_one_byte_echo(self, conf: Conformance) -> None:
        with connect(conf.echo_port) as user:
            user.sendall(b"\xa5")
            assert recv_exact(user, 1) == b"\xa5"
            user.shutdown(socket.SHUT_WR)
            assert recv_all(user) == b""

    def test_one_mib_echo(self, conf: Conformance) -> None:
        payload = random.Random(7).randbytes(MiB)
        got = echo_roundtrip(conf.echo_port, payload)
        assert len(got) == MiB
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

    def test_half_close_from_the_user(self, conf: Conformance) -> None:
        user, target = conf.pair()
        with user:
            user.sendall(b"question")
            user.shutdown(socket.SHUT_WR)
            assert recv_all(target) == b"question"  # EOF reached the target
            answer = random.Random(8).randbytes(300_000)
            target.sendall(answer)  # the target can still send after the user's EOF
            target.shutdown(socket.SHUT_WR)
            got = recv_all(user)
            assert hashlib.sha256(got).digest() == hashlib.sha256(answer).digest()

    def test_half_close_from_the_target(self, conf: Conformance) -> None:
        user, target = conf.pair()
        with user:
            target.sendall(b"banner")
            target.shutdown(socket.SHUT_WR)
            assert recv_all(user) == b"banner"  # EOF reached the user
            request = random.Random(9).randbytes(300_000)
            user.sendall(request)  # the user can still send after the target's EOF
            user.shutdown(socket.SHUT_WR)
            got = recv_all(target)
            assert hashlib.sha256(got).digest() == hashlib.sha256(request).digest()

    def test_user_close_wakes_a_blocked_target_reader(self, conf: Conformance) -> None:
        user, target = conf.pair()
        thread, outcome = blocked_read(target, timeout=10)
        try:
            wait_until(lambda: thread_is_sleeping(thread), 5, "the target's read to block")
            assert thread.is_alive(), f"the target's read returned early: {outcome}"
            user.close()
        finally:
            user.close()
            thread.join(15)
        assert not isinstance(outcome.get("error"), TimeoutError), "the target never saw the user go"
        assert outcome.get("data", b"") == b"" and outcome["after"] < 10

    def test_user_reset_ends_the_target_connection(self, conf: Conformance) -> None:
        user, target = conf.pair()
        user.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        user.close()  # RST instead of FIN
        assert closed_by_peer(target, timeout=8), "the target connection outlived the user's reset"

    def test_target_close_wakes_a_blocked_user_reader(self, conf: Conformance) -> None:
        user, target = conf.pair()
        with user:
            thread, outcome = blocked_read(user, timeout=10)
            try:
                wait_until(lambda: thread_is_sleeping(thread), 5, "the user's read to block")
                assert thread.is_alive(), f"the user's read returned early: {outcome}"
                target.close()
            finally:
                target.close()
                thread.join(15)
        assert not isinstance(outcome.get("error"), TimeoutError), "the user never saw the target go"
        assert outcome.get("data", b"") == b"" and outcome["after"] < 10


# ------------------------------------------------------------------------------------------------
# tokens

def test_wrong_token_is_rejected_without_leaking_it(launcher: Launcher, echo_service: Service) -> None:
    right, wrong = "Right-7f3a9c1e", "Wrong-2b8e51d4"
    tunnel = Tunnel(launcher, [str(echo_service.port)], token=right)
    server = tunnel.start_server()
    bad = launcher.start("bad-client", client_toml(tunnel.bind_port, wrong, retry_interval=1))
    rejected = server.wait_for_log(f"rejected client {HOST}: wrong token", timeout=10)
    assert re.search(rf"rejected client {re.escape(HOST)}: wrong token( \(\d+ more like it\))?$", rejected), rejected
    retry = f"cannot connect to server {HOST}:{tunnel.bind_port}: the server closed the connection during the handshake"
    bad.wait_for_log(retry, timeout=10, count=2)
    for line in bad.lines("cannot connect to server"):
        held_back = r"( \((\d+ more like it|the last of \d+)[^)]*\))?$"   # the count of the lines thinned out
        assert retry in line and re.search(r"; retrying in 1 s" + held_back, line), line
    assert not bad.lines("control channel up")
    assert not server.lines("control channel up")

    good = tunnel.start_client()  # the bad client keeps hammering meanwhile
    tunnel.wait_connected()
    echo_works(tunnel.public[0], size=100_000, seed=1)
    bad.wait_for_log(retry, timeout=10, count=4)
    assert server.alive() and bad.alive() and good.alive()
    for proc in (server, bad, good):
        text = proc.log()
        assert right not in text and wrong not in text, f"a token appears in the stderr of {proc.name}"
    assert "Traceback" not in server.log() + bad.log() + good.log()


# ------------------------------------------------------------------------------------------------
# restarts

def test_client_restart_after_sigkill(launcher: Launcher, echo_service: Service) -> None:
    tunnel = Tunnel(launcher, [str(echo_service.port)]).up()
    echo_works(tunnel.public[0], seed=2)
    assert tunnel.client is not None and tunnel.server is not None
    server = tunnel.server
    peer = control_peer(server)
    tunnel.client.kill()
    line = server.wait_for_log("; waiting for the client to reconnect", timeout=10)
    assert f"client {peer} " in line, line
    tunnel.start_client()
    tunnel.wait_connected(server_count=2)
    echo_works(tunnel.public[0], size=200_000, seed=3)
    assert server.alive() and tunnel.server is server


def test_new_client_takes_over_while_the_old_one_hangs(launcher: Launcher, echo_service: Service) -> None:
    """The old client freezes (SIGSTOP) with its control channel and links still open, as when a
    host hangs; a new client from the same address takes over and none of the old links is used."""
    tunnel = Tunnel(launcher, [str(echo_service.port)]).up()
    echo_works(tunnel.public[0], seed=20)
    assert tunnel.client is not None and tunnel.server is not None
    old = tunnel.client
    old.proc.send_signal(signal.SIGSTOP)
    try:
        tunnel.start_client()
        tunnel.wait_connected(server_count=2)
        assert tunnel.server.lines("opened a new control channel; dropping the one from")
        for i in range(20):  # more users than the old pool had links
            echo_works(tunnel.public[0], size=10_000, seed=21 + i)
    finally:
        old.kill()  # a stopped process would ignore SIGTERM until it is continued


def test_server_restart_client_reconnects_by_itself(launcher: Launcher, echo_service: Service) -> None:
    tunnel = Tunnel(launcher, [str(echo_service.port)]).up()
    echo_works(tunnel.public[0], seed=4)
    assert tunnel.client is not None and tunnel.server is not None
    client = tunnel.client
    tunnel.server.kill()
    line = client.wait_for_log(f"lost the server {HOST}:{tunnel.bind_port}: ", timeout=10)
    assert line.endswith("; reconnecting in 1 s"), line
    tunnel.start_server()  # same config: same tunnel port, same public port
    client.wait_for_log(control_up(tunnel), timeout=15, count=2)
    assert tunnel.server is not None
    tunnel.server.wait_for_log("connected: control channel up", timeout=10)
    echo_works(tunnel.public[0], size=200_000, seed=5)
    assert client.alive() and tunnel.client is client


# ------------------------------------------------------------------------------------------------
# target down

def test_unreachable_target_closes_the_user_and_the_tunnel_lives_on(launcher: Launcher,
                                                                    echo_service: Service) -> None:
    dead = free_port()
    tunnel = Tunnel(launcher, [str(dead), str(echo_service.port)]).up()
    assert tunnel.client is not None
    with connect(tunnel.public[0], timeout=10) as user:
        try:
            user.sendall(b"anyone there?")
        except OSError:
            pass  # already reset: fine
        assert closed_by_peer(user, timeout=8), "the user connection stayed open"
    tunnel.client.wait_for_log(f"target {dead} unreachable: ", timeout=10)
    echo_works(tunnel.public[1], size=100_000, seed=6)


# ------------------------------------------------------------------------------------------------
# no leaks in the tunnel processes

SHORT_CONNECTIONS = 1000
CONCURRENCY = 20
WORKERS = 8        # the fixed size of each process's worker pool
# Slack for fds. The server keeps connection_pool idle data connections ready and asks for one
# more per arriving user, so right after a burst a few more idle links may be open (one fd on
# each side per link) until they are used; the splice relay also keeps a few empty pipes for
# reuse (two fds each). 16 covers both; a leak of one fd per connection would leave ~1000.
FD_SLACK = 16


def short_echo(port: int, i: int) -> None:
    message = b"ping %06d" % i
    with connect(port, timeout=15) as sock:
        sock.sendall(message)
        assert recv_exact(sock, len(message)) == message


def burst(port: int, count: int) -> None:
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        for future in [pool.submit(short_echo, port, i) for i in range(count)]:
            future.result(timeout=60)


def settled(proc: Backhaul) -> tuple[int, int]:
    """(threads, fds) once the fd count stopped moving for half a second (bounded wait)."""
    deadline = time.monotonic() + 5
    last = proc.fds()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = proc.fds()
        if now == last:
            break
        last = now
    return proc.threads(), proc.fds()


@pytest.mark.timeout(120)
def test_thousand_short_connections_leak_no_threads_or_fds(relay_launcher: Launcher,
                                                            echo_service: Service) -> None:
    tunnel = Tunnel(relay_launcher, [str(echo_service.port)]).up()
    assert tunnel.server is not None and tunnel.client is not None
    port = tunnel.public[0]
    procs = {"server": tunnel.server, "client": tunnel.client}
    idle = {name: proc.threads() for name, proc in procs.items()}
    burst(port, 50)  # warm-up: the worker pools and the link pool grow to their working size
    warm = {name: settled(proc) for name, proc in procs.items()}

    burst(port, SHORT_CONNECTIONS)

    for name, proc in procs.items():
        warm_threads, warm_fds = warm[name]
        deadline = time.monotonic() + 8
        while proc.fds() > warm_fds + FD_SLACK and time.monotonic() < deadline:
            time.sleep(0.1)
        fds = proc.fds()
        assert fds <= warm_fds + FD_SLACK, (
            f"{name}: {fds} open fds 8 s after {SHORT_CONNECTIONS} connections, {warm_fds} after the warm-up")
        # Threads: never more than after the warm-up, except that the worker pool may have
        # grown up to its fixed maximum since; a thread per connection would be far above.
        threads = proc.threads()
        assert threads <= max(warm_threads, idle[name] + WORKERS), (
            f"{name}: {threads} threads after {SHORT_CONNECTIONS} connections, {warm_threads} after "
            f"the warm-up, {idle[name]} idle")
    echo_works(port, seed=10)
    assert echo_service.accepted == 50 + SHORT_CONNECTIONS + 1


# ------------------------------------------------------------------------------------------------
# one process, both sides

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_one_file_with_both_sides(relay_launcher: Launcher, echo_service: Service, sig: int) -> None:
    bind_port, public = free_port(), free_port()
    both = relay_launcher.start("both", server_toml(bind_port, [f"{HOST}:{public}={echo_service.port}"])
                                + client_toml(bind_port))
    both.wait_for_log(f"connected to server {HOST}:{bind_port}: control channel up")
    both.wait_for_log("connected: control channel up")
    echo_works(public, size=2 * MiB, seed=30)
    code, took = both.terminate_and_time(sig)
    assert code == 0 and took < SHUTDOWN_LIMIT, (code, took, both.log())
    assert "Traceback" not in both.log()


# ------------------------------------------------------------------------------------------------
# stopping

class Flood:
    """A user connection kept busy through an echo: one thread sends without end, one reads.
    Both stop when the connection breaks; ``broke`` tells whether it broke (not a timeout)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.received = 0
        self.endings: list[BaseException | None] = []
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        chunk = random.Random(40).randbytes(65536)
        try:
            while True:
                self.sock.sendall(chunk)
        except OSError as exc:
            self.endings.append(exc)

    def _recv(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self.received += len(data)
            self.endings.append(None)
        except OSError as exc:
            self.endings.append(exc)

    def broke(self, timeout: float) -> bool:
        for thread in self.threads:
            thread.join(timeout)
        return len(self.endings) == 2 and not any(isinstance(e, TimeoutError) for e in self.endings)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for thread in self.threads:
            thread.join(15)
        self.sock.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_both_processes_with_exit_0(launcher: Launcher, echo_service: Service, sig: int) -> None:
    """With drain_timeout = 0, a signal stops at once however busy the relays are (the drain with
    a timeout is tested in test_e2e_ops.py)."""
    tunnel = Tunnel(launcher, [str(echo_service.port)], server_extra={"drain_timeout": 0},
                    client_extra={"drain_timeout": 0}).up()
    assert tunnel.server is not None and tunnel.client is not None
    with connect(tunnel.public[0], timeout=10) as idle:
        idle.sendall(b"x" * 1000)
        assert recv_exact(idle, 1000) == b"x" * 1000
        flood = Flood(tunnel.public[0])  # and a relay in the middle of moving bytes
        try:
            wait_until(lambda: flood.received > 1_000_000, timeout=10, what="bytes flowing through the tunnel")
            code, took = tunnel.client.terminate_and_time(sig)
            assert code == 0, tunnel.client.log()
            assert took < SHUTDOWN_LIMIT, f"the client took {took:.1f} s to stop"
            assert flood.broke(timeout=8), f"the busy user connection outlived the client: {flood.endings}"
        finally:
            flood.close()
        assert closed_by_peer(idle, timeout=5), "the idle user connection outlived the client"
    # the client said goodbye on the control channel (0x03), so the server knows why
    peer = control_peer(tunnel.server)
    tunnel.server.wait_for_log(f"client {peer} is shutting down or restarting; waiting for the client to reconnect",
                               timeout=5)
    with connect(tunnel.public[0], timeout=10) as waiting:  # a user waiting for a tunnel (or in the backlog)
        code, took = tunnel.server.terminate_and_time(sig)
        assert code == 0, tunnel.server.log()
        assert took < SHUTDOWN_LIMIT, f"the server took {took:.1f} s to stop"
        assert closed_by_peer(waiting, timeout=1)
    for proc in (tunnel.server, tunnel.client):
        assert "Traceback" not in proc.log()


def test_client_sends_closed_signal_on_sigterm(launcher: Launcher, listener: Listener) -> None:
    """A fake server (the test) does the server side of the handshake; SIGTERM the client."""
    token = "fake-server-tk"
    client = launcher.start("client", client_toml(listener.port, token, connection_pool=2))
    control = listener.accept()
    assert recv_exact(control, 3 + len(token)) == ltv(SG_CHAN, token.encode())
    control.sendall(ltv(SG_CHAN, token.encode()) + bytes((SG_RTT,)))
    assert recv_exact(control, 1) == bytes((SG_RTT,))
    links = [listener.accept(), listener.accept()]
    client.wait_for_log(f"connected to server {HOST}:{listener.port}: control channel up")
    code, took = client.terminate_and_time(signal.SIGTERM)
    assert code == 0 and took < SHUTDOWN_LIMIT, (code, took)
    control.settimeout(5)
    assert recv_all(control) == bytes((SG_CLOSED,))
    for link in links:  # the idle links closed too, without a byte
        link.settimeout(5)
        assert recv_all(link) == b""


def test_server_sends_closed_signal_on_sigterm(launcher: Launcher, echo_service: Service) -> None:
    """A fake client (the test) does the client side of the handshake; SIGTERM the server."""
    token = "fake-client-tk"
    bind_port = free_port()
    # connection_pool = 0: the server asks for no links, so the control channel stays quiet
    server = launcher.start("server", server_toml(bind_port, [f"{HOST}:{free_port()}={echo_service.port}"],
                                                  token, connection_pool=0))
    server.wait_for_log(f"tcp tunnel listening on {HOST}:{bind_port}")
    with connect(bind_port, timeout=10) as control:
        control.sendall(ltv(SG_CHAN, token.encode()))
        assert recv_exact(control, 4 + len(token)) == ltv(SG_CHAN, token.encode()) + bytes((SG_RTT,))
        control.sendall(bytes((SG_RTT,)))
        server.wait_for_log(f"client {HOST}:{control.getsockname()[1]} connected: control channel up")
        code, took = server.terminate_and_time(signal.SIGTERM)
        assert code == 0 and took < SHUTDOWN_LIMIT, (code, took)
        control.settimeout(5)
        assert recv_all(control) == bytes((SG_CLOSED,))


# ------------------------------------------------------------------------------------------------
# proxy_protocol

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def test_proxy_protocol_header_reaches_the_target_before_the_user_bytes(launcher: Launcher) -> None:
    received: list[bytes] = []

    def header_then_echo(conn: socket.socket) -> None:
        head = recv_exact(conn, 28)  # IPv4 form: 16-byte fixed part + 12 bytes of addresses
        received.append(head)
        harness.echo_handler(conn)

    with Service(header_then_echo, "proxy-target") as target:
        tunnel = Tunnel(launcher, [str(target.port)], server_extra={"proxy_protocol": True}).up()
        with connect(tunnel.public[0], timeout=10, source="127.0.0.5") as user:
            user.sendall(b"after the header")
            assert recv_exact(user, 16) == b"after the header"
            user_port = user.getsockname()[1]
        head = received[0]
        assert head[:12] == PROXY_V2_SIGNATURE
        assert head[12:16] == bytes.fromhex("21 11 00 0c")       # v2 PROXY, TCP over IPv4, 12 bytes
        assert socket.inet_ntoa(head[16:20]) == "127.0.0.5"       # the end user's address
        assert socket.inet_ntoa(head[20:24]) == "127.0.0.1"       # the tunnel peer (the client)
        assert struct.unpack(">H", head[24:26])[0] == user_port
