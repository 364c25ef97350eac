"""End to end at the limits: a flood of silent connections while the client restarts, users gone
before their PROXY header, running out of file descriptors on either side (UDP flows too), an
unprivileged service whose pipes the kernel will not enlarge."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests import harness
from tests.harness import (
    HOST,
    Launcher,
    Service,
    Tunnel,
    UdpEcho,
    echo_works,
    recv_exact,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


RST = struct.pack("ii", 1, 0)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------
# a flood of silent connections

class SilentFlood:
    """Opens silent connections to ``port`` from ``source`` at ``rate`` a second, each held for
    ``hold`` seconds, until stopped; bounded in time by ``limit``."""

    def __init__(self, port: int, source: str, rate: int = 300, hold: float = 2.5, limit: float = 30.0) -> None:
        self.port, self.source, self.rate, self.hold, self.limit = port, source, rate, hold, limit
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-flood")
        self._thread.start()

    def _run(self) -> None:
        held: list[tuple[float, socket.socket]] = []
        start = time.monotonic()
        try:
            while not self._stop.is_set() and time.monotonic() - start < self.limit:
                now = time.monotonic()
                while held and now - held[0][0] > self.hold:
                    held.pop(0)[1].close()
                for _ in range(self.rate // 20):
                    sock = socket.socket()
                    sock.setblocking(False)
                    sock.bind((self.source, 0))
                    sock.connect_ex((HOST, self.port))
                    held.append((now, sock))
                    self.opened += 1
                self._stop.wait(0.05)
        finally:
            for _, sock in held:
                sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_silent_flood_from_another_address_does_not_keep_a_restarted_client_out(launcher: Launcher,
                                                                                 echo_service: Service) -> None:
    """~300 silent connections a second from 127.0.0.2 fill any fixed cap within a second; the
    restarted client on 127.0.0.1 must still get its control channel back within 2 s."""
    tunnel = Tunnel(launcher, [str(echo_service.port)]).up()
    assert tunnel.client is not None and tunnel.server is not None
    tunnel.client.kill()
    tunnel.server.wait_for_log("; waiting for the client to reconnect", timeout=10)
    flood = SilentFlood(tunnel.bind_port, "127.0.0.2")
    try:
        wait_until(lambda: tunnel.server.lines("to make room"), 10, "the flood to fill the pending handshakes")
        wait_until(lambda: flood.opened > 600, 10, "two seconds of flood at full pending")
        tunnel.start_client()
        tunnel.wait_connected(server_count=2, timeout=2.5)
        echo_works(tunnel.public[0], size=100_000, seed=70)
    finally:
        flood.stop()


# ------------------------------------------------------------------------------------------------
# a user gone before its PROXY header

def test_user_gone_before_its_proxy_header_is_closed_and_never_relayed(launcher: Launcher) -> None:
    """Users wait for a tunnel (no client yet) and reset; when the client comes, each is closed
    with a log line: none reaches the target without its header (an empty header used to pass)."""
    with Service(lambda conn: conn.sendall(conn.recv(4096)), "proxy-target") as target:
        tunnel = Tunnel(launcher, [str(target.port)], server_extra={"proxy_protocol": True})
        tunnel.start_server()
        for _ in range(5):
            user = socket.create_connection((HOST, tunnel.public[0]), timeout=10)
            user.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            user.close()
        assert tunnel.server is not None
        tunnel.start_client()
        tunnel.wait_connected()
        tunnel.server.wait_for_log("no PROXY header can be made, it is gone", timeout=5)
        with socket.create_connection((HOST, tunnel.public[0]), timeout=10) as user:
            user.sendall(b"hello")
            header = recv_exact(user, 16)  # the echo of what the target received first
            assert header[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
        assert target.accepted == 1, "a user without a PROXY header reached the target"


# ------------------------------------------------------------------------------------------------
# out of file descriptors

def hold_users(port: int, count: int) -> list[socket.socket]:
    users = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((HOST, port))
        users.append(sock)
    return users


@pytest.mark.parametrize("transport", harness.TRANSPORTS)
def test_server_out_of_fds_pauses_accepting_and_recovers(launcher: Launcher, echo_service: Service,
                                                          transport: str) -> None:
    """With 64 descriptors the server runs out while 120 users hold connections: it must not spin
    (it used to burn a core and log ~38,000 lines a second), and serves again once they go."""
    tunnel = Tunnel(launcher, [str(echo_service.port)], transport=transport)
    tunnel.server = launcher.start("server", tunnel.server_text, wrap=("prlimit", "--nofile=64:64"))
    tunnel.server.wait_for_log(f"tunnel listening on {HOST}:{tunnel.bind_port}")
    tunnel.start_client()
    tunnel.wait_connected()
    server = tunnel.server
    users = hold_users(tunnel.public[0], 120)
    try:
        server.wait_for_log("paused: too many open files", timeout=10)
        before = cpu_seconds(server.pid)
        lines_before = len(server.log().splitlines())
        time.sleep(2)  # a window to measure the idle cost of being out of descriptors
        spent = cpu_seconds(server.pid) - before
        written = len(server.log().splitlines()) - lines_before
        assert spent < 1.0, f"the server spun while out of descriptors: {spent:.2f} CPU-s in 2 s"
        assert written <= 12, f"{written} log lines in 2 s while out of descriptors"
    finally:
        for user in users:
            user.close()
    wait_until(lambda: not _echo_fails(tunnel.public[0]), 15, "the server to serve again")
    assert "Traceback" not in server.log()


def _echo_fails(port: int) -> bool:
    try:
        echo_works(port, size=10_000, seed=71, timeout=3)
    except (AssertionError, OSError):
        return True
    return False


@pytest.mark.parametrize("transport", harness.TRANSPORTS)
def test_client_out_of_fds_closes_what_it_holds_and_recovers(launcher: Launcher, echo_service: Service,
                                                              transport: str) -> None:
    """The client runs out while dialing targets: every path closes what it holds, one line a
    second at most, no traceback, and it serves again when descriptors free up."""
    tunnel = Tunnel(launcher, [str(echo_service.port)], transport=transport, client_extra={"connection_pool": 4})
    tunnel.start_server()
    tunnel.client = launcher.start("client", tunnel.client_text, wrap=("prlimit", "--nofile=48:48"))
    tunnel.wait_connected()
    client = tunnel.client
    users = hold_users(tunnel.public[0], 80)
    try:
        client.wait_for_log("too many open files", timeout=15)
    finally:
        for user in users:
            user.close()
    wait_until(lambda: not _echo_fails(tunnel.public[0]), 20, "the client to serve again")
    log = client.log()
    assert "Traceback" not in log, log
    assert len([line for line in log.splitlines() if "too many open files" in line]) <= 30


def _udp_carried(port: int, seed: int) -> bool:
    """A new UDP user (a flow of its own) gets its datagram back."""
    payload = random.Random(seed).randbytes(100)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
        user.bind((HOST, 0))
        user.settimeout(1.0)
        user.sendto(payload, (HOST, port))
        try:
            return user.recv(65536) == payload
        except (TimeoutError, ConnectionRefusedError):
            return False


def test_udp_client_out_of_fds_makes_room_and_recovers(launcher: Launcher, udp_echo: UdpEcho) -> None:
    """udp transport: 80 users of one datagram each take every descriptor of a client limited to
    40 (a link and a target socket per flow), and hold their flows (60 s idle). The client says
    so, no traceback, and new users are carried again within seconds: flows that carried one
    datagram make room for new links, as at the cap of links."""
    tunnel = Tunnel(launcher, [str(udp_echo.port)], transport="udp", client_extra={"connection_pool": 4})
    tunnel.start_server()
    tunnel.client = launcher.start("client", tunnel.client_text, wrap=("prlimit", "--nofile=40:40"))
    tunnel.wait_connected()
    client = tunnel.client
    with contextlib.ExitStack() as stack:
        for i in range(80):
            user = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            user.bind((HOST, 0))
            user.sendto(b"flood %d" % i, (HOST, tunnel.public[0]))
            time.sleep(0.01)
        client.wait_for_log("too many open files", timeout=15)
        seeds = iter(range(1000))
        wait_until(lambda: _udp_carried(tunnel.public[0], next(seeds)), 20,
                   "a new UDP user carried while the flood's flows are held")
    log = client.log()
    assert "Traceback" not in log, log
    assert len([line for line in log.splitlines() if "too many open files" in line]) <= 30


# ------------------------------------------------------------------------------------------------
# an unprivileged service whose pipes stay small

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def _nobody_can_run_python() -> bool:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import backhaul"], cwd=harness.REPO,
                           capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def small_reader(port: int) -> socket.socket:
    """A user with a tiny receive buffer, so what it does not read stalls in the tunnel."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((HOST, port))
    return sock


def _pipe_pages_soft() -> int:
    try:
        return int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    except (OSError, ValueError):
        return 0


# Run as the unprivileged user: enlarges pipes until the kernel refuses, so that user is past its
# pipe pages (fs.pipe-user-pages-soft) whatever the tunnel's own pipes would have come to; holds
# them until its stdin closes.
_PIPE_HOG = """
import fcntl, os, sys
held = []
refused = 0
while len(held) < 400 and not refused:
    r, w = os.pipe()
    held.append((r, w))
    try:
        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except PermissionError:
        refused = 1
print(refused, flush=True)
sys.stdin.read()
"""


# 640 MiB through pipes of two pages: seconds of CPU alone, many times that beside parallel workers
@pytest.mark.timeout(240)
@pytest.mark.skipif(not _nobody_can_run_python(), reason="needs root to drop to an unprivileged user")
@pytest.mark.skipif(_pipe_pages_soft() == 0, reason="no fs.pipe-user-pages-soft: the kernel refuses no pipe size")
def test_unprivileged_pipes_refused_logged_once_and_downloads_exact(tmp_path: Path) -> None:
    """As an unprivileged user past its pipe pages (fs.pipe-user-pages-soft, 64 MiB by default;
    another process of that user holds them), the kernel refuses 1 MiB pipes: one log line, and 80
    downloads whose users do not read still arrive sha256-exact once they do, through the small
    pipes the kernel gives."""
    size = 8 << 20
    payload = random.Random(72).randbytes(size)
    hog = subprocess.Popen([*NOBODY, sys.executable, "-c", _PIPE_HOG], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None
        assert hog.stdout.readline().strip() == "1", "400 pipes of 1 MiB and still no refusal"
        with Service(lambda conn: conn.sendall(payload), "download") as service:
            shared = Path(tempfile.mkdtemp(prefix="backhaul-nobody-"))
            shared.chmod(0o755)
            la = Launcher(shared)
            try:
                tunnel = Tunnel(la, [str(service.port)])
                for name, text in (("server", tunnel.server_text), ("client", tunnel.client_text)):
                    path = la.write_config(name, text)
                    path.chmod(0o644)
                    proc = la.start_file(name, path, wrap=NOBODY)
                    setattr(tunnel, name, proc)
                tunnel.wait_connected()
                with contextlib.ExitStack() as stack:
                    users = [stack.enter_context(small_reader(tunnel.public[0])) for _ in range(80)]
                    assert tunnel.server is not None and tunnel.client is not None
                    wait_until(lambda: tunnel.client.lines("refused a 1024 KiB pipe")
                               or tunnel.server.lines("refused a 1024 KiB pipe"), 20,
                               "a refused pipe size to be logged")
                    for user in users:
                        digest, got = hashlib.sha256(), 0
                        while got < size:
                            chunk = user.recv(1 << 20)
                            assert chunk, f"EOF after {got} bytes"
                            digest.update(chunk)
                            got += len(chunk)
                        assert digest.digest() == hashlib.sha256(payload).digest()
                for proc in (tunnel.server, tunnel.client):
                    assert proc is not None
                    assert len(proc.lines("refused a 1024 KiB pipe")) <= 1, proc.log()
                    assert "Traceback" not in proc.log()
            finally:
                la.stop_all()
                shutil.rmtree(shared, ignore_errors=True)
    finally:
        try:
            hog.communicate(timeout=10)  # stdin closes: it exits and its pipes go
        except subprocess.TimeoutExpired:
            hog.kill()  # never left behind holding the user's pipe pages
            hog.communicate()


def test_raise_limit_helper_does_not_touch_the_test_process() -> None:
    """The descriptor limits above apply to the tunnel processes only."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft > 64
