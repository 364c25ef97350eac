"""End to end, operations: readiness and status through a real notify socket, journald lines,
reloads (SIGHUP and a changed file) that never cut an untouched connection, the drain on SIGTERM,
and the status page, metrics and usage file checked against the traffic the test sent.

Each test asserts on something only the working feature produces; its docstring says which
removal (or breakage) of the program it catches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from backhaul import __version__
from tests import harness, png
from tests.exposition import parse_exposition, sample
from tests.harness import (
    HOST,
    REQUIRED,
    Launcher,
    Service,
    Tunnel,
    client_toml,
    closed_by_peer,
    connect,
    echo_works,
    free_port,
    http_get,
    recv_all,
    recv_exact,
    server_toml,
    wait_until,
)
from tests.notify import NotifySocket

pytestmark = pytest.mark.timeout(90)


MiB = 1024 * 1024


def double_handler(conn: socket.socket) -> None:
    """Read until the user's EOF, then answer with the bytes twice: up and down differ in size."""
    data = recv_all(conn)
    conn.sendall(data + data)


def tag_handler(conn: socket.socket) -> None:
    conn.sendall(b"service-b")


def refused(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


class Transfer:
    """A long echo transfer through ``port``: sends ``size`` seeded bytes in paced chunks over about
    ``seconds`` while a thread reads the echo; ``check`` compares sha256 both ways."""

    def __init__(self, port: int, size: int, seconds: float, seed: int) -> None:
        self.payload = random.Random(seed).randbytes(size)
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.received = bytearray()
        self.pace = seconds / (size // 65536)
        self.error: BaseException | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.reader.start()
        self.writer.start()

    def _write(self) -> None:
        try:
            for at in range(0, len(self.payload), 65536):
                self.sock.sendall(self.payload[at:at + 65536])
                time.sleep(self.pace)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = exc

    def _read(self) -> None:
        try:
            while data := self.sock.recv(1 << 20):
                self.received += data
        except OSError as exc:
            self.error = exc

    @property
    def halfway(self) -> bool:
        return len(self.received) > len(self.payload) // 4

    def check(self, timeout: float = 30) -> None:
        self.writer.join(timeout)
        self.reader.join(timeout)
        assert self.error is None, f"the transfer broke: {self.error!r}"
        assert len(self.received) == len(self.payload)
        assert hashlib.sha256(self.received).digest() == hashlib.sha256(self.payload).digest()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.writer.join(10)
        self.reader.join(10)
        self.sock.close()


@contextlib.contextmanager
def transfer(port: int, size: int = 24 * MiB, seconds: float = 3.0, seed: int = 1) -> Iterator[Transfer]:
    t = Transfer(port, size, seconds, seed)
    try:
        yield t
    finally:
        t.close()


# ------------------------------------------------------------------------------------------------
# systemd: readiness, status, reload, stopping; journald lines

def test_ready_only_when_listening_then_reloading_and_stopping(launcher: Launcher, echo_service: Service,
                                                                tmp_path: Path) -> None:
    """Catches: READY=1 before the client's control channel is up or before the server's ports listen, no
    RELOADING=1/READY=1 around a SIGHUP, no STOPPING=1 on SIGTERM, a wrong STATUS line."""
    sockets = {name: NotifySocket(str(tmp_path / f"{name}.sock")) for name in ("server", "client")}
    try:
        tunnel = Tunnel(launcher, [str(echo_service.port)], server_extra={"web_port": free_port()})
        tunnel.client = launcher.start("client", tunnel.client_text,
                                       env={"NOTIFY_SOCKET": str(tmp_path / "client.sock")})
        # no server yet: the client keeps retrying and must not say it is ready
        assert not [m for _, m in sockets["client"].messages(2.0) if "READY=1" in m]
        tunnel.server = launcher.start("server", tunnel.server_text,
                                       env={"NOTIFY_SOCKET": str(tmp_path / "server.sock")})
        ready = sockets["server"].wait_for("READY=1", 10)
        assert f"tcp tunnel port {HOST}:{tunnel.bind_port}, 1 public ports" in ready, ready
        with connect(tunnel.public[0], timeout=5), connect(tunnel.bind_port, timeout=5):
            pass   # both listen already
        ready = sockets["client"].wait_for("READY=1", 10)
        assert f"client: tcp to server {tunnel.remote_addr}, server {tunnel.remote_addr} connected" in ready, ready
        echo_works(tunnel.public[0], size=10000, seed=3)
        # the server's status line follows the client connecting
        status = sockets["server"].wait_for("STATUS=server: tcp tunnel port "
                                            f"{HOST}:{tunnel.bind_port}, 1 public ports, client "
                                            f"{HOST}:{control_port(tunnel)} connected, 0 connections open", 10)
        assert status

        tunnel.server.proc.send_signal(signal.SIGHUP)
        reloading = sockets["server"].wait_for("RELOADING=1", 5)
        assert re.search(r"^MONOTONIC_USEC=\d+$", reloading, re.M), reloading
        assert "READY=1" in sockets["server"].wait_for("READY=1", 5)

        code, _took = tunnel.server.terminate_and_time(signal.SIGTERM)
        assert code == 0
        assert any(m.startswith("STOPPING=1") for _, m in sockets["server"].messages(0.5))
    finally:
        for sock in sockets.values():
            sock.close()


def control_port(tunnel: Tunnel) -> int:
    assert tunnel.server is not None
    line = tunnel.server.wait_for_log("connected: control channel up")
    return int(re.search(r"client [\d.]+:(\d+) connected", line).group(1))  # type: ignore[union-attr]


def test_journal_stream_gets_priorities_without_timestamps(launcher: Launcher, tmp_path: Path) -> None:
    """Catches: timestamps or no <N> prefix when stderr is the journal; prefixes on a plain stderr."""
    text = client_toml(free_port())   # nothing listens there: a warning per attempt
    journal = launcher.start("journal", text, env={"JOURNAL_STREAM": ""})  # harness: stderr's dev:inode
    plain = launcher.start("plain", server_toml(free_port(), [f"{HOST}:{free_port()}=5201"]))
    journal.wait_for_log("cannot connect to server")
    plain.wait_for_log("tunnel listening")
    lines = journal.log().splitlines()
    assert lines[0].startswith("<6>INFO backhaul: backhaul "), lines[0]
    assert any(line.startswith("<4>WARNING backhaul.client: cannot connect to server") for line in lines), lines
    assert all(re.match(r"<[2-7]>[A-Z]+ backhaul", line) for line in lines), lines
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO backhaul: backhaul ", plain.log().splitlines()[0])


# ------------------------------------------------------------------------------------------------
# reload

def test_reload_applies_port_changes_and_never_cuts_an_untouched_connection(launcher: Launcher,
                                                                            echo_service: Service) -> None:
    """Catches: a reload that restarts the relays or the tunnel for a port change, removed ports still
    accepting (or their connections cut), added ports not listening, changed mappings not applied,
    an invalid file replacing the running config, a changed file not noticed without SIGHUP."""
    with Service(tag_handler, "service-b") as service_b:
        kept, removed, changed, added, later = (free_port() for _ in range(5))
        bind_port = free_port()
        echo = echo_service.port

        def config(ports: list[str], **extra: object) -> str:
            return server_toml(bind_port, ports, **extra) + client_toml(bind_port)

        both = launcher.start("both", config([f"{HOST}:{kept}={echo}", f"{HOST}:{removed}={echo}",
                                              f"{HOST}:{changed}={echo}"]))
        both.wait_for_log("connected: control channel up")
        both.wait_for_log("control channel up", count=2)
        with transfer(kept, seed=11) as flowing, connect(removed, timeout=10) as on_removed:
            on_removed.sendall(b"before")
            assert recv_exact(on_removed, 6) == b"before"
            wait_until(lambda: len(flowing.received) > MiB, 10, "bytes flowing through the kept port")

            both.config.write_text(config([f"{HOST}:{kept}={echo}", f"{HOST}:{changed}={service_b.port}",
                                           f"{HOST}:{added}={echo}"]))
            both.proc.send_signal(signal.SIGHUP)
            both.wait_for_log(f"reloaded {both.config}", timeout=5)
            assert flowing.error is None
            assert refused(removed), "a removed port still accepts"
            on_removed.sendall(b"after")   # its open connection finishes normally
            assert recv_exact(on_removed, 5) == b"after"
            with connect(changed, timeout=10) as user:
                assert recv_all(user) == b"service-b", "a changed mapping did not apply to a new connection"
            echo_works(added, size=50000, seed=12)
            line = both.wait_for_log("stopped listening on")
            assert line.endswith(f"stopped listening on {HOST}:{removed} (its open connections finish)"), line

            # an invalid file: one line naming the key, the running config stays
            good = both.config.read_text()
            both.config.write_text(good.replace("bind_addr", "bind_adr"))
            both.proc.send_signal(signal.SIGHUP)
            line = both.wait_for_log("reload refused", timeout=5)
            assert line.endswith(f"reload refused: {both.config}: server.bind_adr: unknown key; did you mean "
                                 "'bind_addr'?; the running config stays"), line
            echo_works(added, size=1000, seed=13)

            # a changed file is noticed without a signal (checked every 2 s)
            both.config.write_text(good.replace(f'"{HOST}:{added}={echo}"',
                                                f'"{HOST}:{added}={echo}", "{HOST}:{later}={echo}"'))
            both.wait_for_log("the config file changed: reloading", timeout=6)
            both.wait_for_log(f"reloaded {both.config}", timeout=5, count=2)
            echo_works(later, size=1000, seed=14)
            flowing.check()
        assert "Traceback" not in both.log()
        assert not both.lines("restarting the tunnel"), "a port change restarted the tunnel"


def test_token_change_restarts_the_tunnel_in_a_controlled_way(launcher: Launcher, echo_service: Service) -> None:
    """Catches: a token change not applied (the new client could not connect), or applied by cutting
    the relays that run on their own connections."""
    tunnel = Tunnel(launcher, [str(echo_service.port)], token="old-token").up()
    assert tunnel.server is not None and tunnel.client is not None
    with transfer(tunnel.public[0], seed=21) as flowing:
        wait_until(lambda: len(flowing.received) > MiB, 10, "bytes flowing")
        for proc in (tunnel.server, tunnel.client):
            proc.config.write_text(proc.config.read_text().replace('"old-token"', '"new-token"'))
            proc.proc.send_signal(signal.SIGHUP)
        tunnel.server.wait_for_log("restarting the tunnel: token changed", timeout=5)
        tunnel.client.wait_for_log("starting a new session with the server: token changed", timeout=5)
        tunnel.server.wait_for_log("connected: control channel up", timeout=10, count=2)
        echo_works(tunnel.public[0], size=100000, seed=22)
        flowing.check()
    for proc in (tunnel.server, tunnel.client):
        # Not "wrong token": the two processes reload at their own moments, and a client that
        # reconnects before its own reload may meet the new token once (a refused handshake).
        assert "Traceback" not in proc.log()


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_auth_change_restarts_the_tunnel_like_a_token_change(launcher: Launcher, echo_service: Service,
                                                             transport: str) -> None:
    """Catches: auth applied live to a running session (links proved in one mode, checked in the
    other), or not applied at all (the reloaded pair could not meet again); relays on their own
    connections run on."""
    tunnel = Tunnel(launcher, [str(echo_service.port)], token="auth-reload-token", transport=transport).up()
    assert tunnel.server is not None and tunnel.client is not None
    with transfer(tunnel.public[0], seed=23) as flowing:
        wait_until(lambda: len(flowing.received) > MiB, 10, "bytes flowing")
        for proc in (tunnel.server, tunnel.client):
            text = proc.config.read_text()
            proc.config.write_text(text.replace('token = "auth-reload-token"\n',
                                                'token = "auth-reload-token"\nauth = "challenge"\n'))
            assert proc.config.read_text() != text
            proc.proc.send_signal(signal.SIGHUP)
        tunnel.server.wait_for_log("restarting the tunnel: auth changed", timeout=5)
        tunnel.client.wait_for_log("starting a new session with the server: auth changed", timeout=5)
        tunnel.server.wait_for_log("connected: control channel up", timeout=10, count=2)
        echo_works(tunnel.public[0], size=100000, seed=24)
        flowing.check()
    for proc in (tunnel.server, tunnel.client):
        assert "Traceback" not in proc.log()


# ------------------------------------------------------------------------------------------------
# drain

def test_sigterm_drains_open_connections_then_exits_0(launcher: Launcher, echo_service: Service) -> None:
    """Catches: SIGTERM cutting open connections, new users still accepted while draining, waiting the
    whole drain_timeout when the connections ended sooner, an exit code other than 0."""
    tunnel = Tunnel(launcher, [str(echo_service.port)], server_extra={"drain_timeout": 30}).up()
    assert tunnel.server is not None
    with transfer(tunnel.public[0], size=16 * MiB, seconds=2.5, seed=31) as flowing:
        wait_until(lambda: len(flowing.received) > MiB, 10, "bytes flowing")
        tunnel.server.proc.send_signal(signal.SIGTERM)
        tunnel.server.wait_for_log("no longer accepting; waiting up to 30 s for 1 open connections", timeout=5)
        assert refused(tunnel.public[0]), "a draining server still accepts users"
        assert tunnel.server.alive()
        flowing.check()
    started = time.monotonic()
    assert tunnel.server.wait(5) == 0
    assert time.monotonic() - started < 2, "the drain went on after the last connection ended"
    assert tunnel.server.lines("every connection finished")
    assert "Traceback" not in tunnel.server.log()


def test_drain_timeout_closes_what_is_left_and_a_second_signal_stops_at_once(launcher: Launcher,
                                                                            echo_service: Service) -> None:
    """Catches: a drain without a limit, connections left open past it, a second signal ignored."""
    slow = Tunnel(launcher, [str(echo_service.port)], client_extra={"drain_timeout": 1}, label="slow").up()
    stuck = Tunnel(launcher, [str(echo_service.port)], client_extra={"drain_timeout": 60}, label="stuck").up()
    assert slow.client is not None and stuck.client is not None
    with connect(slow.public[0], timeout=10) as idle, connect(stuck.public[0], timeout=10) as other:
        for sock in (idle, other):
            sock.sendall(b"hi")
            assert recv_exact(sock, 2) == b"hi"
        code, took = slow.client.terminate_and_time(signal.SIGTERM)
        assert code == 0 and 0.9 < took < 3.5, (code, took)
        assert closed_by_peer(idle, timeout=5)
        assert slow.client.lines("drain_timeout reached: closing 1 connections")

        stuck.client.proc.send_signal(signal.SIGTERM)
        stuck.client.wait_for_log("no longer accepting", timeout=5)
        other.sendall(b"still")   # the client side keeps relaying while it drains
        assert recv_exact(other, 5) == b"still"
        code, took = stuck.client.terminate_and_time(signal.SIGINT)
        assert code == 0 and took < 2.5, (code, took)
        assert stuck.client.lines("received SIGINT again: stopping now")


# ------------------------------------------------------------------------------------------------
# status page, metrics, usage file


@pytest.fixture
def served(launcher: Launcher, tmp_path: Path) -> Iterator[tuple[Tunnel, Service, int, int, Path]]:
    """A tunnel to a doubling service with both status pages and the server's usage file."""
    with Service(double_handler, "double") as service:
        server_web, client_web = free_port(), free_port()
        usage = tmp_path / "usage" / "server.json"
        usage.parent.mkdir()
        tunnel = Tunnel(launcher, [str(service.port)],
                        server_extra={"web_port": server_web, "sniffer": True, "sniffer_log": str(usage)},
                        client_extra={"web_port": client_web}).up()
        yield tunnel, service, server_web, client_web, usage


SIZES = [100_000, 250_000, 1_000_001]   # three users; the service answers each with its bytes twice


def send_traffic(port: int) -> None:
    for index, size in enumerate(SIZES):
        payload = random.Random(40 + index).randbytes(size)
        with connect(port, timeout=20) as user:
            user.sendall(payload)
            user.shutdown(socket.SHUT_WR)
            assert recv_all(user) == payload + payload


def test_metrics_follow_the_exposition_format_and_count_the_traffic(served: tuple, launcher: Launcher) -> None:
    """Catches: a malformed /metrics line, bytes counted in the wrong direction or lost when a relay
    closes, connections not counted, handshake failures and refusals not counted, /healthz wrong."""
    tunnel, service, server_web, client_web, _usage = served
    public = str(tunnel.public[0])
    assert http_get(server_web, "/metrics")[0] == 200
    send_traffic(tunnel.public[0])
    with connect(tunnel.bind_port, timeout=5) as intruder:   # a wrong token
        intruder.sendall(harness.ltv(1, b"not-the-token"))
        assert closed_by_peer(intruder, timeout=5)

    def settled() -> dict | None:
        status, _type, body = http_get(server_web, "/metrics")
        samples = parse_exposition(body)
        done = sample(samples, "backhaul_connections_total", side="server", port=public) == len(SIZES)
        idle = sample(samples, "backhaul_connections_active", side="server", port=public) == 0
        return samples if status == 200 and done and idle else None

    samples = wait_until(settled, 10, "three finished connections in the server's metrics")
    assert http_get(server_web, "/metrics")[1] == "text/plain; version=0.0.4; charset=utf-8"
    assert sample(samples, "backhaul_bytes_total", side="server", port=public, direction="to_target") == sum(SIZES)
    assert sample(samples, "backhaul_bytes_total", side="server", port=public, direction="to_user") == 2 * sum(SIZES)
    assert sample(samples, "backhaul_handshake_failures_total", reason="token") == 1
    assert sample(samples, "backhaul_pool_idle_links", side="server") >= 1
    assert sample(samples, "backhaul_start_time_seconds") > 1e9
    # the build and the process, in the names every Prometheus client library uses
    build = [labels for name, labels in samples if name == "backhaul_build_info"]
    assert len(build) == 1 and dict(build[0])["version"] == __version__ and dict(build[0])["wire"] == "v0.7.2"
    assert time.time() - 120 < sample(samples, "process_start_time_seconds") <= time.time()
    assert sample(samples, "process_resident_memory_bytes") > 4 * MiB
    assert sample(samples, "process_cpu_seconds_total") > 0 and sample(samples, "process_open_fds") > 3
    assert sample(samples, "process_threads") >= 2
    # every counter from the start: the unlabelled ones, and the refusals by the reasons a server has
    for name in ("backhaul_pool_waits_total", "backhaul_udp_frames_malformed_total",
                 "backhaul_udp_flows_congested_total"):
        assert (name, ()) in samples, f"{name} has no sample before its first event"
    assert (("backhaul_connections_refused_total", (("side", "server"), ("reason", "channel_size")))
            in samples)
    assert ("backhaul_reconnects_total", (("side", "server"),)) in samples

    target = str(service.port)
    client = parse_exposition(http_get(client_web, "/metrics")[2])
    assert sample(client, "backhaul_connections_total", side="client", port=target) == len(SIZES)
    assert sample(client, "backhaul_bytes_total", side="client", port=target, direction="to_target") == sum(SIZES)
    assert sample(client, "backhaul_bytes_total", side="client", port=target, direction="to_user") == 2 * sum(SIZES)

    status, _, body = http_get(server_web, "/healthz")
    assert status == 200 and body.startswith("ok: tunnel up"), body
    assert http_get(client_web, "/healthz")[0] == 200
    assert http_get(server_web, "/nothing")[0] == 404
    assert http_get(server_web, "/", method="POST")[0] == 405
    status, _, body = http_get(server_web, "/status.json")
    data = json.loads(body)
    assert data["tunnel"] == "up" and data["ports"][0]["total"] == len(SIZES)

    # the client gone: health says so, and users that find no tunnel are counted as refused
    assert tunnel.client is not None
    tunnel.client.stop()
    wait_until(lambda: http_get(server_web, "/healthz")[0] == 503, 10, "/healthz to report the tunnel down")
    with connect(tunnel.public[0], timeout=10) as user:
        assert closed_by_peer(user, timeout=6)
    samples = parse_exposition(http_get(server_web, "/metrics")[2])
    assert sample(samples, "backhaul_connections_refused_total", side="server", reason="no_tunnel") == 1


def test_status_page_bounds_its_requests_and_costs_no_threads(served: tuple) -> None:
    """Catches: a thread per scraper, an unbounded request head, a silent connection held forever."""
    tunnel, _service, server_web, _client_web, _usage = served
    assert tunnel.server is not None
    threads = tunnel.server.threads()
    with contextlib.ExitStack() as stack:
        silent = [stack.enter_context(connect(server_web, timeout=10)) for _ in range(40)]
        assert http_get(server_web, "/healthz")[0] == 200   # silent ones make room (32 at most)
        assert tunnel.server.threads() == threads
        assert closed_by_peer(silent[0], timeout=2)
        assert closed_by_peer(silent[-1], timeout=7), "a silent connection outlived the 5 s deadline"
        with connect(server_web, timeout=10) as big:
            big.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000)
            assert recv_all(big).startswith(b"HTTP/1.1 431 ")


def test_usage_file_is_written_atomically_with_the_numbers(served: tuple) -> None:
    """Catches: no usage file with sniffer = true, numbers that differ from the traffic, a temporary
    file left behind, the last numbers not written at stop."""
    tunnel, _service, _server_web, _client_web, usage = served
    public = str(tunnel.public[0])
    send_traffic(tunnel.public[0])

    def written() -> dict | None:
        try:
            data = json.loads(usage.read_text())
        except (OSError, ValueError):
            return None
        ports = {row["port"]: row for row in data["ports"]}
        row = ports.get(public)
        return data if row and row["total"] == len(SIZES) and row["active"] == 0 else None

    data = wait_until(written, 12, "the usage file with three connections")
    row = data["ports"][0]
    assert (row["bytes_to_target"], row["bytes_to_user"]) == (sum(SIZES), 2 * sum(SIZES))
    assert data["side"] == "server" and data["tunnel"] == "up"
    assert os.listdir(usage.parent) == ["server.json"]
    assert tunnel.server is not None
    echo = random.Random(9).randbytes(1000)
    with connect(tunnel.public[0], timeout=10) as user:
        user.sendall(echo)
        user.shutdown(socket.SHUT_WR)
        recv_all(user)
    time.sleep(0.3)
    assert tunnel.server.terminate_and_time(signal.SIGTERM)[0] == 0
    final = json.loads(usage.read_text())
    assert final["ports"][0]["total"] == len(SIZES) + 1
    assert os.listdir(usage.parent) == ["server.json"]


# ------------------------------------------------------------------------------------------------
# the page in a real browser

def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if REQUIRED:
        pytest.fail("chromium is missing (.ci/run installs it from Debian)")
    pytest.skip("chromium is not installed")


class Cells(HTMLParser):
    """Text and data-value of the elements with an id or a class, per table row (data-port)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}
        self.rows: dict[str, dict[str, str]] = {}
        self.text: dict[str, str] = {}
        self._row = ""
        self._open: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-port" in a:
            self._row = a["data-port"]
            self.rows[self._row] = {}
        key = a.get("id") or (f"{self._row}/{a['class']}" if self._row and "class" in a else "")
        self._open.append((tag, key))
        if key and "data-value" in a:
            (self.rows[self._row] if "/" in key else self.ids)[key.split("/")[-1]] = a["data-value"]

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break
        if tag == "tr":
            self._row = ""

    def handle_data(self, data: str) -> None:
        for _, key in self._open:
            if key:
                self.text[key] = self.text.get(key, "") + data


def test_status_page_renders_the_traffic_in_headless_chromium(served: tuple) -> None:
    """Catches: a page that does not render, numbers on it that differ from the traffic sent, a wrong
    tunnel state, an external asset the page would need."""
    browser = chromium()
    tunnel, _service, server_web, _client_web, _usage = served
    public = str(tunnel.public[0])
    send_traffic(tunnel.public[0])
    wait_until(lambda: json.loads(http_get(server_web, "/status.json")[2])["connections_active"] == 0
               and json.loads(http_get(server_web, "/status.json")[2])["ports"][0]["total"] == len(SIZES),
               10, "the connections to finish")
    html = http_get(server_web, "/")[2]
    assert not re.search(r"(src|href)=\"https?:", html), "the page needs an external asset"
    profile = tempfile.mkdtemp(prefix="backhaul-chromium-")
    try:
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                               "--dump-dom", f"http://{HOST}:{server_web}/"],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0 and "<table" in done.stdout, done.stderr[-2000:]
    page = Cells()
    page.feed(done.stdout)
    assert page.text["state"].strip() == "tunnel up"
    assert page.text["peer"].startswith(f"{HOST}:")
    row = page.rows[public]
    assert row["total"] == str(len(SIZES)) and row["active"] == "0"
    assert row["bytes_to_target"] == str(sum(SIZES))
    assert row["bytes_to_user"] == str(2 * sum(SIZES))
    shown = page.text[f"{public}/bytes_to_user"]
    assert shown.startswith(f"{2 * sum(SIZES):,}") and "MiB" in shown, shown
    assert int(page.ids["uptime"]) >= 0 and page.ids["active"] == "0"


def screenshot(browser: str, url: str, path: Path) -> png.Image:
    """The page at ``url`` as headless Chromium draws it, 1280 x 900."""
    profile = tempfile.mkdtemp(prefix="backhaul-chromium-")
    try:
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                               "--window-size=1280,900", f"--user-data-dir={profile}", f"--screenshot={path}", url],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0 and path.exists(), done.stderr[-2000:]
    return png.read(path)


def row_of(page: str, port: int | str) -> str:
    match = re.search(rf'<tr data-port="{port}">(.*?)</tr>', page, re.S)
    assert match, f"no row for port {port}"
    return match.group(1)


# the colours of the page (backhaul/status.py, backhaul/graph.py)
RED, AMBER, TO_TARGET, TO_USER = "#b03030", "#b86e00", "#2463b0", "#d9731a"
LEGEND_PIXELS = 200   # the legend's two keys take fewer of each graph colour than this


def test_status_pages_show_traffic_graphs_and_target_health_in_headless_chromium(
        launcher: Launcher, echo_service: Service, tmp_path: Path) -> None:
    """Catches: no traffic graph (or one that stays flat under traffic), a port whose target
    refuses shown as healthy on the client (no error, no counts) or as fine on the server, the
    version or the process's numbers missing, the client's server "state" an empty pill."""
    browser = chromium()
    dead = free_port()    # nothing listens: the client's dial is refused
    server_web, client_web = free_port(), free_port()
    tunnel = Tunnel(launcher, [str(echo_service.port), str(dead)], server_extra={"web_port": server_web},
                    client_extra={"web_port": client_web}).up()
    live, refusing = tunnel.public
    for _ in range(3):
        with connect(refusing, timeout=10) as user:
            user.sendall(b"hello?")
            assert closed_by_peer(user, timeout=8)
    with transfer(live, size=16 * MiB, seconds=16.0, seed=5) as running:
        # a step of the history (10 s) completed with traffic, and the transfer still running
        wait_until(lambda: len(running.received) > 12 * MiB, 30, "12 MiB of the transfer")
        shots = {side: screenshot(browser, f"http://{HOST}:{port}/", tmp_path / f"{side}.png")
                 for side, port in (("server", server_web), ("client", client_web))}
        pages = {side: http_get(port, "/")[2] for side, port in (("server", server_web), ("client", client_web))}
        running.check()

    client, server = pages["client"], pages["server"]
    refused_row = row_of(client, dead)
    assert 'class="health" data-value="down"' in refused_row and ">refused</span>" in refused_row
    assert '<span class="refused" data-value="3">3</span>' in refused_row
    assert f"cannot connect to 127.0.0.1:{dead}: connection refused" in refused_row
    assert 'class="health" data-value="up"' in row_of(client, echo_service.port)
    assert 'class="health" data-value="warn"' in row_of(server, refusing)
    assert '<span class="no_reply" data-value="3">' in row_of(server, refusing)
    assert 'class="health" data-value="up"' in row_of(server, live)
    for side, page in pages.items():
        graphs = re.findall(r'<svg class="graph"[^>]* data-peak="(\d+)" data-points="(\d+)"', page)
        assert len(graphs) >= 3, f"{side}: the side's, each port's and the peer's graph"
        assert int(graphs[0][0]) > 100_000, f"{side}: the side's graph is flat under traffic"
        live_row = row_of(page, live if side == "server" else echo_service.port)
        assert int(re.search(r'data-peak="(\d+)"', live_row).group(1)) > 100_000   # type: ignore[union-attr]
        assert re.search(rf'id="version" data-value="{re.escape(__version__)}"', page)
        assert int(re.search(r'id="threads" data-value="(\d+)"', page).group(1)) >= 2  # type: ignore[union-attr]
        assert int(re.search(r'id="rss" data-value="(\d+)"', page).group(1)) > 4 * MiB  # type: ignore[union-attr]
        assert int(re.search(r'id="fds" data-value="(\d+)"', page).group(1)) > 3  # type: ignore[union-attr]
    assert '<td class="state"><span class="pill up">in use</span></td>' in client

    # what a browser drew: the graphs' blocks both ways, and the health pills in their colours
    for side, image in shots.items():
        assert image.count_near(TO_TARGET) > LEGEND_PIXELS, f"{side}: no traffic to the target drawn"
        assert image.count_near(TO_USER) > LEGEND_PIXELS, f"{side}: no traffic to the user drawn"
    assert shots["client"].count_near(RED, tolerance=8) > 150, "the client's refused pill is not drawn"
    assert shots["server"].count_near(AMBER, tolerance=8) > 150, "the server's no-reply pill is not drawn"
    assert shots["server"].count_near(RED, tolerance=8) == 0, "the server shows a port as down"
