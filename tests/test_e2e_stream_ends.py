"""Every way a tunneled stream ends, on every transport, with real processes (docs/stream-ends.md):
every byte sent before a clean end arrives, an end that cut bytes reaches the other side as a
reset (never a short clean EOF), and nothing outlives its user for long: the target of a user that
left is closed, also while the receiving side was slow to read."""

from __future__ import annotations

import contextlib
import hashlib
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests import harness
from tests.harness import IO_TIMEOUT, Launcher, Service, Tunnel, connect, ends_with_reset, recv_all, wait_until

pytestmark = pytest.mark.timeout(120)


# name -> (transport, mux_version)
PATHS = {
    "tcp": ("tcp", 0), "tcpmux": ("tcpmux", 1), "tcpmux-v2": ("tcpmux", 2), "ws": ("ws", 0),
    "wss": ("wss", 0), "wsmux": ("wsmux", 1), "wsmux-v2": ("wsmux", 2), "wssmux": ("wssmux", 1),
}
MiB = 1024 * 1024


@pytest.fixture(params=list(PATHS))
def path(request: pytest.FixtureRequest) -> tuple[str, int]:
    transport, version = PATHS[request.param]
    if transport.startswith("ws"):
        pytest.importorskip("wsproto")
    return transport, version


def tunnel_for(launcher: Launcher, path: tuple[str, int], target: int, **client: object) -> Tunnel:
    transport, version = path
    mux = {"mux_version": version} if version else {}
    return Tunnel(launcher, [str(target)], transport=transport, server_extra={**mux, "drain_timeout": 30},
                  client_extra={**mux, **client}).up()


class Watched(Service):
    """A target service that records how each of its connections ended: ``"eof"`` (a clean end
    of what the tunnel sent), ``"reset"`` (an error), after ``handler`` ran."""

    def __init__(self, handler) -> None:  # type: ignore[no-untyped-def]
        self.ends: list[str] = []
        self.received: list[bytes] = []
        self.ended = threading.Semaphore(0)
        super().__init__(lambda conn: self._run(handler, conn), "watched")

    def _run(self, handler, conn: socket.socket) -> None:  # type: ignore[no-untyped-def]
        try:
            how = handler(conn, self)
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
        except OSError as exc:
            how = f"error {exc}"
        self.ends.append(how)
        self.ended.release()


def endless(conn: socket.socket, _service: Watched) -> str:
    """Sends until the tunnel closes or resets the connection."""
    chunk = random.Random(5).randbytes(256 * 1024)
    conn.settimeout(IO_TIMEOUT)
    while True:
        conn.sendall(chunk)


def download(size: int, seed: int):  # type: ignore[no-untyped-def]
    def run(conn: socket.socket, _service: Watched) -> str:
        conn.sendall(random.Random(seed).randbytes(size))
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(IO_TIMEOUT)
        return "eof" if conn.recv(1) == b"" else "data"
    return run


def sink(conn: socket.socket, service: Watched) -> str:
    """Reads until the end; what it got is kept."""
    got = bytearray()
    try:
        while data := conn.recv(1 << 20):
            got += data
    finally:
        service.received.append(bytes(got))
    return "eof"


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


@contextlib.contextmanager
def watched(handler) -> Iterator[Watched]:  # type: ignore[no-untyped-def]
    service = Watched(handler)
    try:
        yield service
    finally:
        service.close()


def test_a_user_who_leaves_an_endless_download_leaves_no_target_behind(launcher: Launcher, path) -> None:
    """Catches (issue: tcpmux/wsmux): the client kept the target open and pushed its bytes into
    a stream the server had dropped, for as long as the target sent. Nothing else of the users
    stays behind either: the processes' descriptors come back to where they were."""
    with watched(endless) as target:
        tunnel = tunnel_for(launcher, path, target.port)
        assert tunnel.server is not None and tunnel.client is not None
        with connect(tunnel.public[0]) as user:   # a first user: pools and scratch buffers exist
            user.recv(1)
        assert target.ended.acquire(timeout=10)
        fds = tunnel.server.fds(), tunnel.client.fds()
        for _ in range(3):
            with connect(tunnel.public[0]) as user:
                got = 0
                while got < MiB:
                    got += len(user.recv(1 << 20))
        for _ in range(3):
            assert target.ended.acquire(timeout=10), f"a target still open 10 s after its user left: {target.ends}"
        assert target.ends == ["reset"] * 4
        if "mux" in path[0]:
            # On tcp and ws the server may hold more idle links for a while after users came
            # (its pool follows demand); smux sessions do not grow for three users one by one.
            wait_until(lambda: tunnel.server.fds() <= fds[0] and tunnel.client.fds() <= fds[1], 10,
                       f"the descriptors of the users to be closed (before {fds})")


def test_a_client_that_dies_mid_download_ends_the_users_connection(launcher: Launcher, path) -> None:
    """The session (or link) is lost with bytes in flight: the user's connection ends, with a
    reset on smux (a session's end without the stream's FINs is never clean); on tcp and ws a
    dying process's FIN reads like the target's own end (as with the Go program)."""
    with watched(endless) as target:
        tunnel = tunnel_for(launcher, path, target.port)
        assert tunnel.client is not None
        with connect(tunnel.public[0]) as user:
            assert user.recv(1 << 16)
            tunnel.client.kill()
            reset_seen = ends_with_reset(user)
        if "mux" in path[0]:
            assert reset_seen, "a lost smux session ended a download like a complete one"
        assert target.ended.acquire(timeout=10)


def test_a_slow_user_gets_all_of_a_download_whose_target_closed(launcher: Launcher, path) -> None:
    """The target sends 16 MiB and closes at once; the user reads only after the tunnel holds it
    all in its buffers and windows: every byte, then a clean EOF."""
    size = 16 * MiB
    with watched(download(size, 7)) as target:
        tunnel = tunnel_for(launcher, path, target.port)
        with connect(tunnel.public[0]) as user:
            user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            time.sleep(1.0)   # the tunnel fills up while the user does not read
            got = recv_all(user)
            assert len(got) == size and hashlib.sha256(got).digest() == \
                hashlib.sha256(random.Random(7).randbytes(size)).digest()
        assert target.ended.acquire(timeout=10)
        assert target.ends == ["eof"]


def test_an_upload_cut_by_a_reset_reaches_the_target_as_a_reset(launcher: Launcher, path) -> None:
    """Catches: a user's reset that the target reads as a clean end of a truncated upload."""
    with watched(sink) as target:
        tunnel = tunnel_for(launcher, path, target.port)
        with connect(tunnel.public[0]) as user:
            user.sendall(random.Random(9).randbytes(4 * MiB))
            wait_until(lambda: target.accepted, 10, "the target's connection")
            reset(user)
        assert target.ended.acquire(timeout=20)
        assert target.ends == ["reset"], "the target read a clean EOF of an upload that was cut"


def test_a_download_cut_by_the_targets_reset_reaches_the_user_as_a_reset(launcher: Launcher, path) -> None:
    def cut(conn: socket.socket, _service: Watched) -> str:
        conn.sendall(random.Random(11).randbytes(2 * MiB))
        reset(conn)
        return "cut"

    with watched(cut) as target:
        tunnel = tunnel_for(launcher, path, target.port)
        with connect(tunnel.public[0]) as user:
            assert ends_with_reset(user), "the user read a clean EOF of a download that was cut"


def test_a_client_reload_does_not_cut_a_downloads_tail(launcher: Launcher, path) -> None:
    """Catches (issue: the fail-back test's lost tail): a session ended on purpose (a reload, a
    fail-back) while the last bytes of a download still waited in the tunnel; they were dropped
    and the user read a short clean EOF. Relays on their own connections (tcp, ws) went on before."""
    size = 24 * MiB
    with watched(download(size, 13)) as target:
        tunnel = tunnel_for(launcher, path, target.port, keepalive_period=75)
        assert tunnel.client is not None
        with connect(tunnel.public[0]) as user:
            user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            user.recv(1)
            config = tunnel.client.config
            config.write_text(config.read_text().replace("keepalive_period = 75", "keepalive_period = 60"))
            tunnel.client.proc.send_signal(signal.SIGHUP)
            tunnel.client.wait_for_log("starting a new session with the server: keepalive_period changed")
            tunnel.client.wait_for_log(f"connected to server {tunnel.remote_addr}: control channel up", count=2)
            got = recv_all(user)
            assert 1 + len(got) == size, f"{1 + len(got)} of {size} bytes"
            assert hashlib.sha256(random.Random(13).randbytes(size)[1:]).digest() == hashlib.sha256(got).digest()
        assert target.ended.acquire(timeout=10)
    assert "Traceback" not in tunnel.client.log()


def test_an_echo_with_half_close_to_a_slow_reader_is_exact(launcher: Launcher, path) -> None:
    """User EOF first, the target's after: the answer comes back whole and ends cleanly, also
    when the user reads it only after the target closed."""
    def echo_then_close(conn: socket.socket, _service: Watched) -> str:
        harness.echo_handler(conn)
        return "eof"

    payload = random.Random(17).randbytes(6 * MiB)
    with watched(echo_then_close) as target:
        tunnel = tunnel_for(launcher, path, target.port)
        with connect(tunnel.public[0]) as user:
            got = bytearray()
            sender = threading.Thread(target=lambda: (user.sendall(payload), user.shutdown(socket.SHUT_WR)))
            sender.start()
            while data := user.recv(1 << 20):
                got += data
                if len(got) < MiB:
                    time.sleep(0.01)  # slow at first: the tunnel's buffers fill
            sender.join(10)
            assert len(got) == len(payload) and bytes(got) == payload
        assert target.ended.acquire(timeout=10)
        assert target.ends == ["eof"]


def test_the_servers_stop_resets_what_it_could_not_finish(launcher: Launcher, path) -> None:
    """A drain that runs out (drain_timeout) ends a user that is still downloading with a reset,
    never a clean end of a short download; its target is closed too."""
    with watched(endless) as target:
        transport, version = path
        mux = {"mux_version": version} if version else {}
        tunnel = Tunnel(launcher, [str(target.port)], transport=transport,
                        server_extra={**mux, "drain_timeout": 1}, client_extra=mux).up()
        assert tunnel.server is not None
        with connect(tunnel.public[0]) as user:
            assert user.recv(1 << 16)
            tunnel.server.proc.send_signal(signal.SIGTERM)
            assert ends_with_reset(user), "a cut download ended like a complete one"
        assert target.ended.acquire(timeout=15)
        assert target.ends == ["reset"]
