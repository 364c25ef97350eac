"""End-to-end harness: real ``python -m backhaul`` processes, target services in this process,
and small socket helpers. Everything here cleans up after itself, also when a test fails.

Only loopback addresses are used. A tunnel config needs explicit ports, so ``free_port`` hands
out one nothing listens on right before the config is written: below the kernel's range for
outgoing connections, from a slice of its own for each pytest-xdist worker.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backhaul.config import toml_value
from backhaul.protocol.framing import SG_CHAN, SG_RTT
from tests import contention

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
IO_TIMEOUT = 30.0        # no socket operation of a test blocks longer than this
RELAY_MODES = ["splice", "copy"] if hasattr(os, "splice") else ["copy"]
TRANSPORTS = ["tcp", "tcpmux", "ws", "wss", "wsmux", "wssmux"]  # a later transport is one more entry here
TLS_TRANSPORTS = ("wss", "wssmux")  # the Tunnel gives their server the session's certificate
REQUIRED = os.environ.get("BACKHAUL_REQUIRE_TOOLS") == "1"   # CI installs the tools: never skip there


# ------------------------------------------------------------------------------------------------
# waiting

def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def thread_is_sleeping(thread: threading.Thread) -> bool:
    """True when ``thread`` sleeps in the kernel (blocked in a call), per /proc."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "S"
    except OSError:
        return True  # no /proc: nothing better to wait for


# ------------------------------------------------------------------------------------------------
# ports and configs

def _below_ephemeral() -> range:
    """Port numbers under the kernel's range for outgoing connections: a port handed to a server
    that binds it a moment later must not be taken meanwhile as the local port of a connection
    (of a tunnel already running), which bind(0) ports can be. Empty when the range starts low."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            low = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(10_000, low) if low > 11_000 else range(0)


def _this_worker(ports: range) -> range:
    """This process's share of ``ports`` when pytest-xdist runs the tests in several: a slice of
    its own, so two workers never hand out the same number (each remembers only its own)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")   # "gw0", "gw1", ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count <= 1:
        return ports
    share = len(ports) // count
    start = ports.start + int(worker[2:]) * share
    return range(start, start + share)


_PORTS = _this_worker(_below_ephemeral())
_handed: set[int] = set()          # never the same number twice in one test run
_pick = random.Random()


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now, over TCP and over UDP (the UDP transports bind the
    same number for both): a random one below the outgoing range when there is one, else one
    the kernel picks (bind port 0); never one handed out before in this run."""
    while True:
        if _PORTS and len(_handed) < len(_PORTS) // 2:
            port = _pick.choice(_PORTS)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        if port in _handed or not _bindable(host, port):
            continue
        _handed.add(port)
        return port


def _bindable(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind((host, port))
            udp.bind((host, port))
    except OSError:
        return False
    return True


def toml_section(name: str, values: dict[str, object]) -> str:
    lines = [f"[{name}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def server_toml(bind_port: int, ports: list[str], token: str = "e2e-token", **extra: object) -> str:
    values: dict[str, object] = {
        "bind_addr": f"{HOST}:{bind_port}",
        "transport": "tcp",
        "token": token,
        "log_level": "info",
        "ports": ports,
        **contention.tunnel_options(),
    }
    values.update(extra)
    return toml_section("server", values)


def client_toml(remote_port: int, token: str = "e2e-token", **extra: object) -> str:
    values: dict[str, object] = {
        "remote_addr": f"{HOST}:{remote_port}",
        "transport": "tcp",
        "token": token,
        "retry_interval": 1,
        "log_level": "info",
        **contention.tunnel_options(),
    }
    values.update(extra)
    return toml_section("client", values)


# ------------------------------------------------------------------------------------------------
# processes

class Backhaul:
    """One running ``python -m backhaul -c FILE``; stderr goes to a file we poll."""

    def __init__(self, name: str, config: Path, log_path: Path, proc: subprocess.Popen) -> None:
        self.name = name
        self.config = config
        self.log_path = log_path
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, substring: str) -> list[str]:
        return [line for line in self.log().splitlines() if substring in line]

    def wait_for_log(self, substring: str, timeout: float = 10.0, count: int = 1) -> str:
        """The ``count``-th stderr line containing ``substring``; fails the test on timeout or
        when the process exits first."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.lines(substring)
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None:
                found = self.lines(substring)
                if len(found) >= count:
                    return found[count - 1]
                pytest.fail(f"{self.name} exited with {self.proc.returncode} before logging "
                            f"{substring!r}; its stderr:\n{self.log()}")
            if time.monotonic() >= deadline:
                pytest.fail(f"{self.name} did not log {substring!r} (x{count}) within {timeout:g} s; "
                            f"its stderr:\n{self.log()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def terminate_and_time(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        """Send ``sig``; return (exit code, seconds until the process exited)."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - start

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, signalled: bool = False) -> None:
        """SIGTERM (unless ``signalled``: sent already), then SIGKILL if it is still there after a
        few seconds."""
        if self.proc.poll() is None:
            if not signalled:
                self.proc.terminate()
            try:
                self.proc.wait(4)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def threads(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        raise AssertionError("no Threads line in /proc status")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def tokens(self) -> list[str]:
        """The tokens of its config (those of 4 characters and more: shorter ones occur by chance)."""
        try:
            document = tomllib.loads(self.config.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return []
        sections = [document.get(name) for name in ("server", "client")]
        return [s["token"] for s in sections if isinstance(s, dict) and isinstance(s.get("token"), str)
                and len(s["token"]) >= 4]

    def leaked_tokens(self) -> list[str]:
        """The tokens of its config that appear in anything it wrote (stderr, stdout)."""
        out = self.log() + self.log_path.with_suffix(".stdout").read_text(errors="replace")
        return [token for token in self.tokens() if token in out]


class Launcher:
    """Starts backhaul processes for one test; ``stop_all`` at teardown stops every one."""

    def __init__(self, directory: Path, relay_mode: str = "") -> None:
        self.directory = directory
        self.relay_mode = relay_mode
        self.procs: list[Backhaul] = []
        self.env: dict[str, str] = {}   # added to the environment of every process it starts
        self._serial = 0

    def write_config(self, name: str, text: str) -> Path:
        path = self.directory / f"{name}.toml"
        path.write_text(text)
        return path

    def start(self, name: str, config_text: str, wrap: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> Backhaul:
        return self.start_file(name, self.write_config(name, config_text), wrap, env)

    def start_file(self, name: str, config: Path, wrap: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> Backhaul:
        """Start ``python -m backhaul -c config``; ``wrap`` is a command that runs it (prlimit, setpriv),
        ``env`` adds to its environment."""
        self._serial += 1
        log_path = self.directory / f"{name}.{self._serial}.stderr"
        out_path = self.directory / f"{name}.{self._serial}.stdout"
        environ = dict(os.environ)
        for name_ in ("JOURNAL_STREAM", "BACKHAUL_RELAY", "BACKHAUL_UDP_IDLE", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                      "WATCHDOG_PID"):
            environ.pop(name_, None)
        if self.relay_mode == "copy":
            environ["BACKHAUL_RELAY"] = "copy"
        environ.update(self.env)
        environ.update(env or {})
        with open(log_path, "wb") as err, open(out_path, "wb") as out:
            if "JOURNAL_STREAM" in environ and environ["JOURNAL_STREAM"] == "":  # stderr is "the journal"
                st = os.fstat(err.fileno())
                environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            proc = subprocess.Popen([*wrap, sys.executable, "-m", "backhaul", "-c", str(config)], cwd=REPO,
                                    env=environ, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        bh = Backhaul(name, config, log_path, proc)
        self.procs.append(bh)
        return bh

    def run(self, name: str, config_text: str, timeout: float = 15.0) -> tuple[int, str]:
        """Run to completion (for configs that must be refused): (exit code, stderr)."""
        bh = self.start(name, config_text)
        try:
            code = bh.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still runs after {timeout:g} s; its stderr:\n{bh.log()}")
        return code, bh.log()

    def stop_all(self) -> None:
        """Stop every process, even when stopping one of them fails; then check that none wrote
        its token anywhere (every test that runs a process checks this)."""
        failures = []
        for bh in self.procs:   # all signalled first: they drain and exit side by side, not in turn
            if bh.alive():
                bh.proc.terminate()
        for bh in self.procs:
            try:
                bh.stop(signalled=True)
            except Exception as exc:
                failures.append(f"{bh.name}: {exc!r}")
        assert not failures, f"could not stop: {failures}"
        leaks = [f"{bh.name} ({bh.config.name})" for bh in self.procs if bh.leaked_tokens()]
        assert not leaks, f"a token appears in the output of {', '.join(leaks)}"


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    la = Launcher(tmp_path)
    try:
        yield la
    finally:
        la.stop_all()


@pytest.fixture(params=RELAY_MODES)
def relay_launcher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launcher]:
    """A launcher whose processes use the relay mode of the parameter (splice or copy)."""
    la = Launcher(tmp_path, request.param)
    try:
        yield la
    finally:
        la.stop_all()


# ------------------------------------------------------------------------------------------------
# target services in this process

class Service:
    """A TCP service on 127.0.0.1:<ephemeral>: ``handler(conn)`` runs in a thread per connection.

    ``close`` stops accepting, shuts down the connections still open (so blocked handlers wake)
    and joins every thread; the handler owns its socket but the service closes it afterwards.
    """

    def __init__(self, handler: Callable[[socket.socket], None], name: str = "service") -> None:
        self.handler = handler
        self.name = name
        self.listener = socket.create_server((HOST, 0), backlog=1024)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(IO_TIMEOUT)
            thread = threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-conn", daemon=True)
            with self._lock:
                self.accepted += 1
                self._conns[thread] = conn
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass  # the peer went away: the test checks what it cares about on its own side
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            conn.close()
            with self._lock:
                self._conns.pop(threading.current_thread(), None)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.listener.close()
        with self._lock:
            live = list(self._conns.items())
        for _thread, conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread, _conn in live:
            thread.join(10)
        assert not self.errors, f"{self.name} handler failed: {self.errors!r}"

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def echo_handler(conn: socket.socket) -> None:
    """Echo until EOF, then close."""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


@pytest.fixture
def echo_service() -> Iterator[Service]:
    service = Service(echo_handler, "echo")
    try:
        yield service
    finally:
        service.close()


class UdpEcho:
    """A UDP echo service on 127.0.0.1:<ephemeral>, one thread; ``sources`` counts the datagrams
    per source address (a tunnel client's flow shows as one source), ``first_bytes`` the first
    byte of each datagram seen, ``seen`` the (datagram, source) pairs of datagrams that start with
    ``watch``."""

    def __init__(self, watch: bytes = b"\xff" * 8) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.sources: collections.Counter[tuple[str, int]] = collections.Counter()
        self.first_bytes: set[int] = set()
        self.watch = watch
        self.seen: set[tuple[bytes, tuple[str, int]]] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="udp-echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                continue
            self.sources[addr] += 1
            if data:
                self.first_bytes.add(data[0])
                if data.startswith(self.watch):
                    self.seen.add((data, addr))
            try:
                self.sock.sendto(data, addr)
            except OSError:
                pass

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    echo = UdpEcho()
    try:
        yield echo
    finally:
        echo.close()


class Listener:
    """A plain listening socket in the test: the test accepts and drives each connection itself."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []

    def accept(self, timeout: float = 10.0) -> socket.socket:
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            pytest.fail(f"no connection arrived on port {self.port} within {timeout:g} s")
        conn.settimeout(IO_TIMEOUT)
        self.accepted.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    li = Listener()
    try:
        yield li
    finally:
        li.close()


# ------------------------------------------------------------------------------------------------
# socket helpers

@contextlib.contextmanager
def connect(port: int, timeout: float = IO_TIMEOUT, source: str = "") -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        contention.small_buffers(sock)
        if source:
            sock.bind((source, 0))
        sock.connect((HOST, port))
        yield sock
    finally:
        sock.close()


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes; AssertionError when the peer closes before."""
    chunks = bytearray()
    while len(chunks) < size:
        data = sock.recv(size - len(chunks))
        if not data:
            raise AssertionError(f"EOF after {len(chunks)} of {size} bytes: {bytes(chunks)!r}")
        chunks += data
    return bytes(chunks)


def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF."""
    chunks = bytearray()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return bytes(chunks)
        chunks += data


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the peer ends the connection (EOF or reset) within ``timeout``; data is skipped."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def ends_with_reset(sock: socket.socket, timeout: float = 20.0) -> bool:
    """Reads until the peer ends the connection: True for a reset, False for a clean EOF."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    return False


def on_reactor(reactor: object, fn: Callable[..., object], *args: object) -> object:
    """Run ``fn(*args)`` on ``reactor``'s thread and return its result (or raise its exception)."""
    done = threading.Event()
    box: list[object] = []

    def run() -> None:
        try:
            box.append(fn(*args))
        except BaseException as exc:  # handed to the caller, who raises it
            box.append(exc)
        finally:
            done.set()

    reactor.call_soon(run)  # type: ignore[attr-defined]
    assert done.wait(10), "the reactor did not run a call"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def echo_roundtrip(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send ``payload`` to ``port``, half-close, and return everything read back until EOF."""
    with connect(port, timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def echo_works(port: int, size: int = 4096, seed: int = 0, timeout: float = 10.0) -> None:
    """Assert a sha256-exact echo of ``size`` seeded random bytes through ``port``."""
    payload = random.Random(seed).randbytes(size)
    got = echo_roundtrip(port, payload, timeout)
    assert len(got) == len(payload)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()


def ltv(kind: int, payload: bytes) -> bytes:
    """u16 BE length | type | payload (the length does not count the type byte)."""
    return struct.pack(">H", len(payload)) + bytes((kind,)) + payload


# ------------------------------------------------------------------------------------------------
# certificates (wss, wssmux)

class Certificates:
    """Certificates made with the system ``openssl`` on first use and kept for the whole test
    session in one temporary directory, removed when the session's process exits.

    Leaves are for ``localhost`` and ``127.0.0.1`` (CN and subjectAltName) unless told otherwise.
    ``self_signed`` makes one that is its own CA (the server certificate of the TLS ``Tunnel``);
    ``ca`` a CA; ``issued`` a leaf signed by such a CA, valid from ``start`` to ``end``
    (``YYYYMMDDHHMMSSZ``, through ``openssl ca``, which takes past dates on every openssl version,
    where ``req -not_after`` needs 3.4 or later). Each is made once, by its name.
    """

    SAN = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
    CA_CONFIG = """\
[ca]
default_ca = test_ca
[test_ca]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any_cn
copy_extensions = copy
unique_subject = no
[any_cn]
commonName = supplied
"""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._made: dict[str, tuple[Path, Path]] = {}
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="backhaul-tls-"))
            atexit.register(shutil.rmtree, self._dir, ignore_errors=True)
        return self._dir

    def _openssl(self, *args: str) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("the system openssl is needed to make certificates")
        done = subprocess.run([openssl, *args], cwd=self.directory, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"openssl {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")

    def _cached(self, name: str, make: Callable[[Path, Path], None]) -> tuple[Path, Path]:
        with self._lock:
            if name not in self._made:
                cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
                make(cert, key)
                self._made[name] = (cert, key)
            return self._made[name]

    def self_signed(self, name: str = "server") -> tuple[Path, Path]:
        """(certificate, key) of a self-signed certificate for localhost, valid 2 days."""
        return self._cached(name, lambda cert, key: self._openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost", "-addext", self.SAN))

    def ca(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of a CA of its own, valid 2 days (P-256: quicker to make than RSA)."""
        return self._cached(name, lambda cert, key: self._openssl(
            "req", "-x509", *self.EC, "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN=Backhaul test CA {name}"))

    def issued(self, name: str, ca: str, start: str, end: str, host: str = "localhost") -> tuple[Path, Path]:
        """(certificate, key) of a leaf signed by the CA ``ca``, valid from ``start`` to ``end``; for
        localhost and 127.0.0.1, or for ``host`` alone (a DNS name) when another is given."""
        ca_cert, ca_key = self.ca(ca)
        san = self.SAN if host == "localhost" else f"subjectAltName=DNS:{host}"

        def make(cert: Path, key: Path) -> None:
            request = self.directory / f"{name}.csr"
            self._openssl("req", "-new", *self.EC, "-nodes", "-keyout", str(key), "-out", str(request),
                          "-subj", f"/CN={host}", "-addext", san)
            config = self.directory / "ca.cnf"
            if not config.exists():
                config.write_text(self.CA_CONFIG)
                (self.directory / "index.txt").write_text("")
                (self.directory / "serial").write_text("1000\n")
            self._openssl("ca", "-batch", "-config", str(config), "-cert", str(ca_cert), "-keyfile", str(ca_key),
                          "-in", str(request), "-out", str(cert), "-startdate", start, "-enddate", end, "-notext")

        return self._cached(name, make)


CERTS = Certificates()


# ------------------------------------------------------------------------------------------------
# one server and one client, started and connected

class Tunnel:
    """A server process and a client process, with the public ports of the mappings."""

    def __init__(self, launcher: Launcher, targets: list[str], token: str = "e2e-token", transport: str = "tcp",
                 server_extra: dict[str, object] | None = None,
                 client_extra: dict[str, object] | None = None, remote_host: str = HOST, label: str = "") -> None:
        self.launcher = launcher
        self.label = label  # names the processes (server-<label>): tunnels of one test side by side
        self.token = token
        self.targets = targets
        self.transport = transport
        self.bind_port = free_port()
        self.public = [free_port() for _ in targets]
        ports = [f"{HOST}:{p}={t}" for p, t in zip(self.public, targets, strict=True)]
        server_values: dict[str, object] = {}
        if transport in TLS_TRANSPORTS:  # wss, wssmux: the session's certificate unless the test brings one
            cert, key = CERTS.self_signed()
            server_values = {"tls_cert": str(cert), "tls_key": str(key)}
        server_values.update(server_extra or {})
        # remote_host: the host part of the client's remote_addr (localhost: a TLS name check)
        self.remote_addr = f"{remote_host}:{self.bind_port}"
        self.server_text = server_toml(self.bind_port, ports, token, transport=transport, **server_values)
        self.client_text = client_toml(self.bind_port, token, transport=transport, remote_addr=self.remote_addr,
                                       **(client_extra or {}))
        self.server: Backhaul | None = None
        self.client: Backhaul | None = None

    def start_server(self, wait: bool = True) -> Backhaul:
        """Start the server; with ``wait``, return once it listens on the tunnel port."""
        self.server = self.launcher.start(f"server-{self.label}" if self.label else "server", self.server_text)
        if wait:
            self.wait_listening()
        return self.server

    def wait_listening(self, timeout: float = 10.0) -> None:
        assert self.server is not None
        self.server.wait_for_log(f"tunnel listening on {HOST}:{self.bind_port}", timeout)

    def start_client(self) -> Backhaul:
        self.client = self.launcher.start(f"client-{self.label}" if self.label else "client", self.client_text)
        return self.client

    def up(self) -> Tunnel:
        """Start both and wait until the control channel is up on both sides."""
        self.start_server()
        self.start_client()
        self.wait_connected()
        return self

    def wait_connected(self, server_count: int = 1, timeout: float = 10.0) -> None:
        assert self.server is not None and self.client is not None
        self.client.wait_for_log(f"connected to server {self.remote_addr}: control channel up", timeout)
        self.server.wait_for_log("connected: control channel up", timeout, count=server_count)


# ------------------------------------------------------------------------------------------------
# users and peers that several modules play

def user_socket(source: str = HOST) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
    sock.bind((source, 0))
    sock.settimeout(IO_TIMEOUT)
    return sock


def exchange(sock: socket.socket, port: int, payload: bytes, timeout: float = 5.0, tries: int = 1) -> bytes | None:
    """Send ``payload`` to the public port and return the echo (None when none came)."""
    sock.settimeout(timeout)
    for _ in range(tries):
        sock.sendto(payload, (HOST, port))
        try:
            while True:
                data = sock.recv(65536)
                if data == payload:
                    return data
        except TimeoutError:
            continue
    return None


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one request to the status page."""
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def handshake(port: int, token: str, source: str = "", timeout: float = 5.0) -> socket.socket:
    """Play a client's side of the token handshake against our server: the control channel."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((HOST, port))
        sock.sendall(ltv(SG_CHAN, token.encode()))
        reply = ltv(SG_CHAN, token.encode()) + bytes((SG_RTT,))
        assert recv_exact(sock, len(reply)) == reply
        sock.sendall(bytes((SG_RTT,)))
        sock.settimeout(IO_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def nofile_at_least(wanted: int) -> Iterator[None]:
    """Raise this process's RLIMIT_NOFILE soft limit (up to the hard one) for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
