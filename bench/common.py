"""Helpers shared by the benchmark driver and its helper processes.

Process control, readings from /proc, free ports and the line protocol the
helpers use to talk to the driver (one line per message on stdout).
"""

import json
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"
# Where services listen: the loopback address unless a run across the emulated long path
# (wan.py) has them listen on every address of their namespace, for the direct path to reach.
LISTEN_HOST = os.environ.get("BENCH_LISTEN", HOST)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Every process the driver starts, so that one call at exit can end them all.
_LIVE: list[subprocess.Popen[Any]] = []


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the new soft limit.

    Children inherit the limit, so raising it in the driver covers the tunnel
    processes too; each helper calls this again to stand on its own.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def free_port() -> int:
    """Return a port that was free a moment ago over TCP and UDP (for configs that need explicit
    ports; the UDP tunnels bind both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind((HOST, port))
            except OSError:
                continue
        return port


def listen(port: int = 0, backlog: int = 4096) -> socket.socket:
    """Open a listening socket on the loopback address (LISTEN_HOST)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LISTEN_HOST, port))
    sock.listen(backlog)
    return sock


def announce(kind: str, payload: object = "") -> None:
    """Write one protocol line to stdout for the driver (helper side)."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    sys.stdout.write(f"{kind} {text}\n".rstrip() + "\n")
    sys.stdout.flush()


class LineReader:
    """Reads a pipe line by line on a daemon thread, so reads can time out."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        self._queue.put(None)

    def get(self, timeout: float) -> str:
        """Return the next line; TimeoutError if none in time, EOFError at end of stream."""
        try:
            line = self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise TimeoutError("no line from helper in time") from None
        if line is None:
            self._queue.put(None)  # keep reporting EOF to later callers
            raise EOFError("helper closed its output")
        return line


class Helper:
    """A helper process of the benchmark (service, relay or client) speaking the line protocol."""

    def __init__(self, argv: list[str], name: str, stdin: bool = False, env: dict[str, str] | None = None) -> None:
        self.name = name
        # A new session gives the helper its own process group, so forked
        # workers are ended together with it.
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
        _LIVE.append(self.proc)
        assert self.proc.stdout is not None
        self.lines = LineReader(self.proc.stdout)

    @classmethod
    def script(cls, script: str, *args: object, stdin: bool = False, netns: str = "",
               env: dict[str, str] | None = None) -> "Helper":
        """Start one of the bench scripts with the running interpreter (inside network namespace
        ``netns`` when given: `ip netns exec` execs it, so the pid is the script's)."""
        argv = in_netns(netns, [sys.executable, str(BENCH_DIR / script), *map(str, args)])
        return cls(argv, name=f"{script} {args[0] if args else ''}".strip(), stdin=stdin, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, kind: str, timeout: float) -> str:
        """Wait for a line starting with `kind` and return the rest of it."""
        return self.expect_any((kind,), timeout)[1]

    def expect_any(self, kinds: tuple[str, ...], timeout: float) -> tuple[str, str]:
        """Wait for a line starting with one of `kinds`; return (kind, rest of line)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(deadline - time.monotonic())
            except TimeoutError:
                raise TimeoutError(f"{self.name}: no {'/'.join(kinds)} line within {timeout:.0f} s") from None
            except EOFError:
                raise RuntimeError(
                    f"{self.name}: exited (code {self.proc.poll()}) before sending {'/'.join(kinds)}"
                ) from None
            head, _, rest = line.partition(" ")
            if head in kinds:
                return head, rest

    def expect_json(self, kind: str, timeout: float) -> Any:
        return json.loads(self.expect(kind, timeout))

    def send(self, line: str) -> None:
        """Write one command line to the helper's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> "Helper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def in_netns(netns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside network namespace ``netns`` ("" : here)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def track(proc: subprocess.Popen[Any]) -> None:
    """Register a process started elsewhere so that stop_all() ends it too."""
    _LIVE.append(proc)


def stop_process(proc: subprocess.Popen[Any], grace: float = 2.0) -> bool:
    """End a process (and its group, when it leads one); return True if SIGTERM sufficed."""
    if proc in _LIVE:
        _LIVE.remove(proc)
    graceful = True
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            graceful = False
    # SIGKILL the group as well: forked workers may outlive their leader.
    _signal(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    return graceful


def _signal(proc: subprocess.Popen[Any], sig: int) -> None:
    """Signal the process group the process leads, else the process alone."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
            return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass


def stop_all() -> None:
    """End every process still registered (used in the driver's finally)."""
    for proc in list(_LIVE):
        stop_process(proc, grace=1.0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The command name may contain spaces; fields resume after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def proc_status(pid: int) -> dict[str, str]:
    """Fields of /proc/<pid>/status as strings."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def threads_and_rss(pid: int) -> tuple[int, float]:
    """Thread count and resident memory in MiB of a process."""
    status = proc_status(pid)
    rss_kib = int(status.get("VmRSS", "0 kB").split()[0])
    return int(status["Threads"]), rss_kib / 1024


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def is_listening(port: int, pid: int | None = None) -> bool:
    """Whether a TCP socket listens on ``port`` (any address; ports are the bench's own), from the
    kernel's socket table of this network namespace, or of process ``pid``'s."""
    wanted = f":{port:04X}"
    with open(f"/proc/{pid}/net/tcp" if pid else "/proc/net/tcp") as f:
        return any(line.split()[1].endswith(wanted) and line.split()[3] == "0A" for line in f.readlines()[1:])


TLS_TRANSPORTS = ("wss", "wssmux")


def certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key for the TLS transports' servers (system openssl)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True, timeout=60)
    return cert, key


def tls_settings(transport: str, server_extra: tuple[str, ...], directory: Path) -> tuple[str, ...]:
    """The server's settings with a certificate made for this run when the transport needs one
    and none was given (ours and the Go program read the same two keys)."""
    if transport not in TLS_TRANSPORTS or any(line.split("=")[0].strip() == "tls_cert" for line in server_extra):
        return server_extra
    cert, key = certificate(directory)
    return (*server_extra, f'tls_cert = "{cert}"', f'tls_key = "{key}"')

