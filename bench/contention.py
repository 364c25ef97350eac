"""The long form of contention mode: stream integrity over many runs on a machine kept busy.

    python bench/contention.py                  # 200 runs on every path
    python bench/contention.py --runs 50 --paths tcpmux,wsmux-v2

For each path (transport, smux version, relay mode) one tunnel runs under contention mode
(tests/contention.py: a busy loop on each core, 32 KiB socket buffers on every tunnel socket and
user); each run then sends, all at once, the users the stream-end suite has
(tests/test_e2e_stream_ends.py), with fresh random sizes:

- two echo users that send, half-close and read the answer back (sha256 against what they sent);
- a download the target sends and closes, read by a user that starts late (every byte);
- an upload the user cuts with a reset (its target must read a reset, not a clean end);
- a user that reads part of an endless download and leaves (its target must be closed).

The udp path sends datagrams through one flow per run and checks each answer.

Counted per path: mismatches (an answer of the right length with other bytes), truncated streams
(a short answer that ended cleanly), hangs (a user that got no end within HANG seconds),
leftovers (a target still open LEFTOVER seconds after its user left), cut_read_clean (a target
that read a clean end of an upload its user cut), for UDP datagrams lost and corrupted. The
process ends with 1 if any is not 0.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["BACKHAUL_CONTENTION"] = "1"   # before tests.contention is imported

from tests import contention
from tests.harness import HOST, Launcher, Service, Tunnel, UdpEcho, echo_handler

HANG = 60.0       # seconds a user may take before it counts as hung
LEFTOVER = 5.0    # seconds a target may stay open after its user left
MiB = 1024 * 1024

# name -> (transport, mux_version, relay mode)
PATHS = {
    "tcp-splice": ("tcp", 0, "splice"), "tcp-copy": ("tcp", 0, "copy"), "tcpmux": ("tcpmux", 1, ""),
    "tcpmux-v2": ("tcpmux", 2, ""), "ws": ("ws", 0, ""), "wss": ("wss", 0, ""), "wsmux": ("wsmux", 1, ""),
    "wsmux-v2": ("wsmux", 2, ""), "wssmux": ("wssmux", 1, ""), "udp": ("udp", 0, ""),
}


class Targets:
    """The services of one path: echo, download (size told by the user's first 4 bytes),
    sink (how each connection ended) and endless (when each connection ended)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sink_ends: Counter[str] = Counter()
        self.endless_open = 0
        self.echo = Service(echo_handler, "echo")
        self.download = Service(self._download, "download")
        self.sink = Service(self._sink, "sink")
        self.endless = Service(self._endless, "endless")

    def ports(self) -> list[str]:
        return [str(s.port) for s in (self.echo, self.download, self.sink, self.endless)]

    @staticmethod
    def _download(conn: socket.socket) -> None:
        head = conn.recv(8)
        size, seed = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:8], "big")
        conn.sendall(random.Random(seed).randbytes(size))
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    def _sink(self, conn: socket.socket) -> None:
        how = "eof"
        try:
            while conn.recv(1 << 20):
                pass
        except ConnectionResetError:
            how = "reset"
        with self.lock:
            self.sink_ends[how] += 1

    def _endless(self, conn: socket.socket) -> None:
        with self.lock:
            self.endless_open += 1
        chunk = os.urandom(64 * 1024)
        try:
            while True:
                conn.sendall(chunk)
        except OSError:
            pass
        finally:
            with self.lock:
                self.endless_open -= 1

    def close(self) -> None:
        for service in (self.echo, self.download, self.sink, self.endless):
            service.close()


def user(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=HANG)
    contention.small_buffers(sock)
    return sock


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the end, and how it ended: "eof", "reset" or "hang"."""
    got = bytearray()
    try:
        while data := sock.recv(1 << 20):
            got += data
    except ConnectionResetError:
        return bytes(got), "reset"
    except TimeoutError:
        return bytes(got), "hang"
    return bytes(got), "eof"


def judge(counts: Counter[str], expected: bytes, got: bytes, how: str) -> None:
    counts["streams"] += 1
    if how != "eof" or got != expected:
        print(f"  {time.strftime('%H:%M:%S')} a stream ended {how} after {len(got)} of {len(expected)} bytes",
              file=sys.stderr)
    if how == "hang":
        counts["hangs"] += 1
    elif len(got) < len(expected):
        counts["truncated" if how == "eof" else "reset"] += 1
    elif got != expected:
        counts["mismatches"] += 1


def one_run(public: list[int], targets: Targets, rng: random.Random, counts: Counter[str]) -> None:
    echo, download, sink, endless = public
    errors: list[str] = []

    def echo_user(size: int) -> None:
        payload = rng.randbytes(size)
        with user(echo) as sock:
            sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
            sender.start()
            got, how = read_to_end(sock)
            sender.join(HANG)
        judge(counts, payload, got, how)

    def download_user(size: int, seed: int) -> None:
        with user(download) as sock:
            sock.sendall(size.to_bytes(4, "big") + seed.to_bytes(4, "big"))
            time.sleep(0.2)   # late: the tunnel holds the tail meanwhile
            got, how = read_to_end(sock)
        judge(counts, random.Random(seed).randbytes(size), got, how)

    def reset_user(size: int) -> None:
        sock = user(sink)
        sock.sendall(rng.randbytes(size))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()

    def leaving_user() -> None:
        with user(endless) as sock:
            got = 0
            while got < 256 * 1024:
                data = sock.recv(1 << 20)
                if not data:
                    break
                got += len(data)

    def guarded(fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except OSError as exc:
            errors.append(f"{fn.__name__}: {exc}")

    with targets.lock:
        before = targets.sink.accepted - sum(targets.sink_ends.values())   # sink connections still open
    jobs = [(echo_user, rng.randint(1, 2 * MiB)), (echo_user, rng.randint(1, 64 * 1024)),
            (download_user, rng.randint(1, 4 * MiB), rng.randrange(1 << 31)),
            (reset_user, rng.randint(64 * 1024, MiB)), (leaving_user,)]
    threads = [threading.Thread(target=guarded, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG * 2)
    counts["hangs"] += sum(thread.is_alive() for thread in threads)
    for error in errors:
        counts["errors"] += 1
        print(f"  error: {error}", file=sys.stderr)
    # A target whose user left (or cut its upload) must be closed soon; a user the server saw
    # only after its reset may never have reached a target at all, which leaves nothing open.
    deadline = time.monotonic() + LEFTOVER
    while True:
        with targets.lock:
            open_now = targets.endless_open + targets.sink.accepted - sum(targets.sink_ends.values())
        if open_now <= before or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if open_now > before:
        print(f"  {time.strftime('%H:%M:%S')} {open_now - before} target(s) still open {LEFTOVER:g} s after "
              "their users left", file=sys.stderr)
        counts["leftovers"] += open_now - before
    with targets.lock:
        if targets.sink_ends["eof"]:
            print(f"  {time.strftime('%H:%M:%S')} a target read a clean end of an upload its user cut",
                  file=sys.stderr)
        counts["cut_read_clean"] += targets.sink_ends["eof"]
        targets.sink_ends["eof"] = 0


def udp_run(port: int, rng: random.Random, counts: Counter[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((HOST, port))
        sock.settimeout(2.0)
        for _ in range(50):
            payload = rng.randbytes(rng.randint(1, 1400))
            sock.send(payload)
            counts["datagrams"] += 1
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                counts["lost"] += 1
                continue
            if answer != payload:
                counts["corrupted"] += 1


def run_path(name: str, runs: int, directory: Path, seed: int) -> Counter[str]:
    transport, version, mode = PATHS[name]
    mux: dict[str, object] = {"mux_version": version} if version else {}
    if os.environ.get("BACKHAUL_CONTENTION_DEBUG"):
        mux["log_level"] = "debug"   # every stream's end in the logs of a bad path
    counts: Counter[str] = Counter()
    launcher = Launcher(directory / name, mode)
    (directory / name).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    try:
        if transport == "udp":
            echo = UdpEcho()
            try:
                tunnel = Tunnel(launcher, [str(echo.port)], transport="udp", server_extra=mux,
                                client_extra=mux).up()
                time.sleep(0.5)
                for run in range(runs):
                    udp_run(tunnel.public[0], rng, counts)
                    progress(name, run + 1, runs, counts)
            finally:
                echo.close()
        else:
            targets = Targets()
            try:
                tunnel = Tunnel(launcher, targets.ports(), transport=transport, server_extra=mux,
                                client_extra=mux).up()
                for run in range(runs):
                    one_run(tunnel.public, targets, rng, counts)
                    progress(name, run + 1, runs, counts)
            finally:
                targets.close()
        for proc in (tunnel.server, tunnel.client):
            if proc is not None and "Traceback" in proc.log():
                counts["tracebacks"] += 1
    finally:
        launcher.stop_all()
    if any(counts[c] for c in FAILURES):
        # What the tunnel said is what explains a bad count: its warnings go to the report.
        for log in sorted((directory / name).glob("*.stderr")):
            lines = [line for line in log.read_text(errors="replace").splitlines()
                     if " WARNING " in line or " ERROR " in line or "Traceback" in line
                     or "stream failed" in line or "relay error" in line or "lost:" in line]
            for line in lines[-20:]:
                print(f"  {name} {log.stem}: {line}", file=sys.stderr)
    counts["runs"] = runs
    return counts


def progress(name: str, done: int, runs: int, counts: Counter[str]) -> None:
    if done % 20 == 0 or done == runs:
        bad = {k: v for k, v in counts.items() if k not in ("streams", "datagrams") and v}
        print(f"{name}: {done}/{runs} runs {dict(bad) or 'clean'}", file=sys.stderr, flush=True)


FAILURES = ("mismatches", "truncated", "reset", "hangs", "leftovers", "cut_read_clean", "errors", "corrupted",
            "tracebacks")
COLUMNS = ("runs", "streams", "mismatches", "truncated", "reset", "hangs", "leftovers", "cut_read_clean", "errors",
           "datagrams", "lost", "corrupted", "tracebacks")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated: " + ", ".join(PATHS))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    names = [name for name in args.paths.split(",") if name]
    unknown = [name for name in names if name not in PATHS]
    if unknown:
        parser.error(f"unknown path(s): {', '.join(unknown)}")
    results: dict[str, Counter[str]] = {}
    with tempfile.TemporaryDirectory() as tmp, contention.BusyLoops():
        for name in names:
            results[name] = run_path(name, args.runs, Path(tmp), args.seed)
    print("| path | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, counts in results.items():
        print(f"| {name} | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |")
    print("\n(reset: a stream that ended with a reset although nothing cut it; cut_read_clean: a target that "
          "read a clean end of an upload its user cut with a reset; lost: UDP datagrams with no answer within 2 s)")
    failed = any(counts[c] for counts in results.values() for c in FAILURES)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
