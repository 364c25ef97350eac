"""The tunnel under test: a server and a client process of `python -m backhaul`,
or of the Go program (the binary named by BACKHAUL_GO) for comparison.

Each TunnelPair gets fresh ports, its own pair of config files and its own
log files (stdout and stderr of both processes), so every measurement starts
from a clean tunnel.
"""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import HOST, REPO_ROOT, free_port, in_netns, is_listening, stop_process, track

TOKEN = "bench-token"
READY_TIMEOUT = 10.0
PROBE = b"ping"
POOL = 64  # connection_pool of both implementations
SOURCES = ("127.0.0.2", "127.0.0.3")  # local_addr of each client of a pair with two clients
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the Go program colours its log levels

SERVER_TOML = """\
[server]
bind_addr = "{tunnel_host}:{tunnel_port}"
transport = "{transport}"
token = "{token}"
nodelay = true
connection_pool = {pool}
channel_size = 4096
log_level = "warn"
ports = [{ports}]
"""

CLIENT_TOML = """\
[client]
remote_addr = "{tunnel_host}:{tunnel_port}"
transport = "{transport}"
token = "{token}"
nodelay = true
connection_pool = {pool}
retry_interval = 1
log_level = "warn"
"""

# The Go program: skip_optz keeps it from tuning the machine's sysctls.
GO_SERVER_TOML = """\
[server]
bind_addr = "{tunnel_host}:{tunnel_port}"
transport = "{transport}"
token = "{token}"
nodelay = true
skip_optz = true
heartbeat = 40
channel_size = 2048
log_level = "warn"
ports = [{ports}]
"""

GO_CLIENT_TOML = """\
[client]
remote_addr = "{tunnel_host}:{tunnel_port}"
transport = "{transport}"
token = "{token}"
connection_pool = {pool}
nodelay = true
skip_optz = true
retry_interval = 1
log_level = "warn"
"""


def _lines(settings: tuple[str, ...]) -> str:
    """KEY=VALUE settings from the command line as TOML lines (values are TOML already)."""
    return "".join(f"{key.strip()} = {value.strip()}\n" for key, _, value in (s.partition("=") for s in settings))


def _with(table: str, settings: tuple[str, ...]) -> str:
    """A config table with ``settings`` added, each in place of the table's own line of its key
    (TOML allows a key once)."""
    keys = {key.strip() for key, _, _ in (s.partition("=") for s in settings)}
    kept = [line for line in table.splitlines(keepends=True) if line.partition("=")[0].strip() not in keys]
    return "".join(kept) + _lines(settings)


class TunnelError(RuntimeError):
    """The tunnel could not be started or did not become ready."""


def tunnel_argv(config: Path, go_binary: str | None = None) -> list[str]:
    """Command line of one tunnel process (ours, or the Go program's when go_binary is given)."""
    if go_binary:
        return [go_binary, "-c", str(config)]
    return [sys.executable, "-m", "backhaul", "-c", str(config)]


def check_available() -> tuple[bool, str]:
    """Whether `python -m backhaul` runs here; the version line, or why not."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "backhaul", "--version"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return False, "`python -m backhaul --version` did not finish within 10 s"
    text = (done.stdout + done.stderr).strip()
    last = text.splitlines()[-1] if text else f"exit code {done.returncode}"
    return done.returncode == 0, last


def check_go(binary: str) -> tuple[bool, str]:
    """Whether the Go binary runs here; its version line, or why not."""
    try:
        done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`{binary} -v` failed: {exc}"
    text = (done.stdout + done.stderr).strip()
    last = text.splitlines()[-1] if text else f"exit code {done.returncode}"
    return done.returncode == 0, last


class TunnelPair:
    """Server and client processes forwarding public ports to targets on the client's side.

    `probe_port` is an echo service: an extra mapping to it proves the pair is
    connected end to end even when the measured target (e.g. a sink) never answers.
    With `go_binary` the pair runs the Go program instead of `python -m backhaul`.
    """

    def __init__(
        self,
        workdir: Path,
        label: str,
        target_port: int,
        probe_port: int,
        transport: str = "tcp",
        go_binary: str | None = None,
        server_extra: tuple[str, ...] = (),
        client_extra: tuple[str, ...] = (),
        clients: int = 1,
        client_netns: str = "",
        tunnel_host: str = HOST,
        go_roles: tuple[str, ...] = ("server", "client"),
    ) -> None:
        # With go_binary, the roles in go_roles run the Go program and the others ours: a mixed
        # pair shows our side against the Go program's (e.g. our smux receiver, its sender).
        go_roles = go_roles if go_binary else ()
        mixed = "" if set(go_roles) >= {"server", "client"} else f" go-{'-'.join(go_roles)}"
        name = (f"{label}{mixed or ' go'}" if go_binary
                else label if clients == 1 else f"{label} {clients} clients")
        self.dir = workdir / name.replace(" ", "-").replace("=", "")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.label = label
        self.transport = transport
        self.go_binary = go_binary
        self.go_roles = go_roles
        self.server_extra = server_extra
        self.client_extra = client_extra
        self.kind = "go" if go_roles else "tunnel"
        self.tunnel_port = free_port()
        self.public_port = free_port()
        self.probe_public_port = free_port()
        self.target_port = target_port
        self.probe_port = probe_port
        # Two clients (ours only): a server with clients = "balance" and a client from each of
        # SOURCES; its status page says when both control channels are up.
        self.clients = clients
        # Across the emulated long path (wan.py): the clients run in the other network namespace
        # and reach the server at tunnel_host; the public ports stay on this side's loopback.
        self.client_netns = client_netns
        self.tunnel_host = tunnel_host
        self.web_port = free_port() if clients > 1 else 0
        self.server: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None
        self.others: list[subprocess.Popen[bytes]] = []   # the clients after the first
        self.notes: list[str] = []
        # Log lines written before stop(); later ones came from the shutdown we asked for.
        self.lines_before_stop: dict[str, int] | None = None

    @property
    def roles(self) -> list[str]:
        if self.clients == 1:
            return ["server", "client"]
        return ["server"] + [f"client {n + 1}" for n in range(self.clients)]

    def procs(self) -> list[tuple[str, subprocess.Popen[bytes] | None]]:
        return list(zip(self.roles, [self.server, self.client, *self.others], strict=False))

    @property
    def pids(self) -> dict[str, int]:
        assert self.server is not None and self.client is not None
        return {role: proc.pid for role, proc in self.procs() if proc is not None}

    def write_configs(self) -> tuple[Path, Path]:
        ports = ", ".join(
            f'"{HOST}:{public}={target}"'
            for public, target in ((self.public_port, self.target_port), (self.probe_public_port, self.probe_port))
        )
        server = self.dir / "server.toml"
        client = self.dir / "client.toml"
        common = {
            "tunnel_host": self.tunnel_host,
            "tunnel_port": self.tunnel_port,
            "token": TOKEN,
            "transport": self.transport,
            "pool": POOL,
        }
        server_toml = GO_SERVER_TOML if "server" in self.go_roles else SERVER_TOML
        client_toml = GO_CLIENT_TOML if "client" in self.go_roles else CLIENT_TOML
        several = f'clients = "balance"\nweb_port = {self.web_port}\n' if self.clients > 1 else ""
        server.write_text(_with(server_toml.format(ports=ports, **common) + several, self.server_extra))
        client.write_text(_with(client_toml.format(**common) + self._source(0), self.client_extra))
        for n in range(1, self.clients):
            (self.dir / f"client-{n + 1}.toml").write_text(_with(client_toml.format(**common) + self._source(n),
                                                                 self.client_extra))
        return server, client

    def _source(self, n: int) -> str:
        return f'local_addr = "{SOURCES[n]}"\n' if self.clients > 1 else ""

    def start(self) -> None:
        server_cfg, client_cfg = self.write_configs()
        self.server = self._spawn(server_cfg, "server")
        # Starting the client only once the server listens spares it a refused dial and a retry_interval.
        deadline = time.monotonic() + READY_TIMEOUT
        while not is_listening(self.tunnel_port):
            self.check_alive()
            if time.monotonic() > deadline:
                raise TunnelError(f"server not listening on its tunnel port within {READY_TIMEOUT:.0f} s")
            time.sleep(0.02)
        self.client = self._spawn(client_cfg, self.roles[1])
        for n in range(1, self.clients):
            self.others.append(self._spawn(self.dir / f"client-{n + 1}.toml", self.roles[n + 1]))
        self._wait_ready(deadline)

    def _spawn(self, config: Path, role: str) -> subprocess.Popen[bytes]:
        netns = self.client_netns if role != "server" else ""
        with open(self.dir / f"{role.replace(' ', '-')}.log", "wb") as log:
            proc = subprocess.Popen(
                in_netns(netns, tunnel_argv(config, self._binary(role))),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        track(proc)
        return proc

    def _binary(self, role: str) -> str | None:
        """The Go program for a role that runs it, None for ours."""
        return self.go_binary if role.split()[0] in self.go_roles else None

    def _wait_ready(self, deadline: float) -> None:
        # The udp transport's public ports are UDP only: its echo goes as a datagram.
        check = probe_udp if self.transport == "udp" else probe
        while time.monotonic() < deadline:
            self.check_alive()
            if check(self.probe_public_port, timeout=min(1.0, max(0.1, deadline - time.monotonic()))) \
                    and self._all_clients_up():
                return
            time.sleep(0.05)
        raise TunnelError(f"not ready within {READY_TIMEOUT:.0f} s (no echo through the tunnel)" + self._log_hint())

    def _all_clients_up(self) -> bool:
        """Every client's control channel is up (one client: the echo said so already)."""
        if self.clients == 1:
            return True
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.web_port}/status.json", timeout=2) as answer:
                peers = json.load(answer)["peers"]
        except (OSError, ValueError, KeyError):
            return False
        return sum(1 for peer in peers if peer["channels"]) == self.clients

    def check_alive(self) -> None:
        """Raise if a process has exited."""
        for role, proc in self.procs():
            if proc is not None and proc.poll() is not None:
                raise TunnelError(f"{self.kind} {role} exited with code {proc.returncode}" + self._log_hint())

    def _log_hint(self) -> str:
        tail = [f"{role}: {line}" for role, lines in self.logs().items() for line in lines[-3:]]
        return ("; last log lines: " + " | ".join(tail)) if tail else ""

    def logs(self) -> dict[str, list[str]]:
        """Output lines of both processes so far; those written during shutdown are marked."""
        out: dict[str, list[str]] = {}
        for role in self.roles:
            path = self.dir / f"{role.replace(' ', '-')}.log"
            text = ANSI_ESCAPE.sub("", path.read_text(errors="replace")) if path.exists() else ""
            lines = [line for line in text.splitlines() if line.strip()]
            if self.lines_before_stop is not None:
                cut = self.lines_before_stop[role]
                lines = lines[:cut] + [f"(during shutdown) {line}" for line in lines[cut:]]
            out[role] = lines
        return out

    def stop(self) -> None:
        """SIGTERM each (clients first, as an operator would), SIGKILL if they linger."""
        if self.lines_before_stop is None:
            self.lines_before_stop = {role: len(lines) for role, lines in self.logs().items()}
        for role, proc in reversed(self.procs()):
            if proc is None:
                continue
            if proc.poll() is not None:
                self.notes.append(f"{role} had already exited with code {proc.returncode}")
                stop_process(proc)
                continue
            t0 = time.monotonic()
            if not stop_process(proc, grace=2.0):
                self.notes.append(f"{role} did not exit within 2 s of SIGTERM; killed")
            elif proc.returncode not in (0, -15):
                self.notes.append(
                    f"{role} exited with code {proc.returncode} after SIGTERM ({time.monotonic() - t0:.1f} s)"
                )

    def __enter__(self) -> "TunnelPair":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def probe(port: int, timeout: float) -> bool:
    """One echo round trip through `port`."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(PROBE)
            got = b""
            while len(got) < len(PROBE):
                chunk = sock.recv(64)
                if not chunk:
                    return False
                got += chunk
            return got == PROBE
    except OSError:
        return False


def probe_udp(port: int, timeout: float) -> bool:
    """One datagram echoed through `port`."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(PROBE, (HOST, port))
            return sock.recv(64) == PROBE
    except OSError:
        return False
