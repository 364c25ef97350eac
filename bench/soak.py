"""Soak: mixed load with connection churn through the tunnel, for a long time, on each transport.

    python bench/soak.py                              # 30 minutes on each transport
    python bench/soak.py --minutes 5 --transport tcp --transport wss

On each transport a server and a client (`python -m backhaul`, as bench/tunnel.py starts them),
the client dialing the server through the fault proxy of the tests (tests/faultproxy.py), an echo
service behind the client, and in this process:

- churn: short connections, one after another on several threads, 1-32 KiB each way;
- bulk: transfers of 8 MiB each way, a few at a time;
- idle: 100 connections held open, each pinging one byte now and then and replaced after a while;
- tunnel churn: every --cut-every seconds every tunnel connection is reset (the client reconnects).

On the udp transport the users are UDP flows (the proxy forwards the links' datagrams too, and a
cut drops them for its half second): churn flows of a few datagrams of 1 B to 16 KiB, bulk
flows of 2,000 datagrams paced a little, and 100 idle flows pinging now and then. A flow that
lost a datagram is cut (UDP may lose some; far from a reset it is counted a stray); one that
received a datagram it never sent is corrupted.

Every byte that comes back is compared with what was sent: a stream with one wrong byte is
corrupted (there must be none); one that ends early is cut, expected only around a tunnel reset.
RSS, threads and open files of both processes are sampled every 5 s; the RSS at the end (median of
the last minute) must be within 10 % of the RSS after the warm-up (median of the minute after the
first tenth of the run, at least 3 minutes: on tcpmux and wsmux the number of smux sessions, each
with a reading thread, takes that long to settle). Prints one table; exit code 1 when a stream was
corrupted, a process died, or an RSS grew past the bound.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import HOST, Helper, fd_count, raise_nofile_limit, stop_all, threads_and_rss, tls_settings
from tunnel import TunnelPair

from tests.faultproxy import FaultProxy

TRANSPORTS = ["tcp", "tcpmux", "ws", "wss", "wsmux", "wssmux", "udp"]   # a new transport is one more entry
RSS_BOUND = 0.10
SAMPLE_EVERY = 5.0
WARM_UP = 180.0        # seconds at least: the mux transports' sessions take minutes to reach their number
WINDOW = 60.0          # the RSS after the warm-up and at the end: medians over this long
RECOVERY = 10.0        # an exchange that began this soon after a reset may still meet its effects
IDLE = 100
CHURN_THREADS = 6
BULK_THREADS = 2
BULK_SIZE = 8 << 20


@dataclass
class Counts:
    """What the load saw; updated from many threads under one lock."""

    ok: int = 0
    cut: int = 0            # ended early near a tunnel reset: every byte so far right
    stray: int = 0          # ended early far from any reset (the kinds in ``strays``)
    corrupt: int = 0
    bytes: int = 0
    resets: list[float] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def near_reset(self, start: float, end: float) -> bool:
        """A reset happened while the exchange ran, or shortly before it began (the tunnel comes
        back within a few seconds, and a user who finds no link within 3 s is closed)."""
        return any(start - RECOVERY <= t <= end + 1 for t in self.resets)

    def add(self, outcome: str, moved: int, start: float, kind: str) -> None:
        with self.lock:
            if outcome == "cut" and not self.near_reset(start, time.monotonic()):
                outcome = "stray"
                self.strays.append(f"{kind} after {moved} bytes, {time.monotonic() - start:.1f} s")
            setattr(self, outcome, getattr(self, outcome) + 1)
            self.bytes += moved


def exchange(port: int, payload: bytes, timeout: float = 30.0) -> tuple[str, int]:
    """Send ``payload`` through the echo and check what comes back: (outcome, bytes back)."""
    got = 0
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sender = threading.Thread(target=_send, args=(sock, payload), daemon=True)
            sender.start()
            while got < len(payload):
                data = sock.recv(1 << 18)
                if not data:
                    break
                if data != payload[got:got + len(data)]:
                    return "corrupt", got
                got += len(data)
            sender.join(timeout)
    except OSError:
        pass
    return ("ok" if got == len(payload) else "cut"), got


def _send(sock: socket.socket, payload: bytes) -> None:
    try:
        view = memoryview(payload)
        for offset in range(0, len(payload), 1 << 16):
            sock.sendall(view[offset:offset + (1 << 16)])
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class Load:
    """The mix of users; runs until ``stop``."""

    def __init__(self, port: int, counts: Counts, seed: int) -> None:
        self.port, self.counts, self.seed = port, counts, seed
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._churn, args=(i,), daemon=True) for i in range(CHURN_THREADS)]
        self.threads += [threading.Thread(target=self._bulk, args=(i,), daemon=True) for i in range(BULK_THREADS)]
        self.threads.append(threading.Thread(target=self._idle, daemon=True))
        for thread in self.threads:
            thread.start()

    def _churn(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        while not self.halt.is_set():
            start = time.monotonic()
            outcome, moved = exchange(self.port, rng.randbytes(rng.randint(1024, 32 * 1024)))
            self.counts.add(outcome, moved, start, "churn")

    def _bulk(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while not self.halt.is_set():
            start = time.monotonic()
            outcome, moved = exchange(self.port, rng.randbytes(BULK_SIZE), timeout=120)
            self.counts.add(outcome, moved, start, "bulk")

    def _idle(self) -> None:
        """IDLE held connections; every second a tenth of them ping, one in fifty is replaced."""
        rng = random.Random(self.seed)
        held: list[tuple[socket.socket, float]] = []
        try:
            while not self.halt.wait(1.0):
                while len(held) < IDLE:
                    try:
                        held.append((socket.create_connection((HOST, self.port), timeout=10), time.monotonic()))
                    except OSError:
                        break
                for i in rng.sample(range(len(held)), len(held) // 10):
                    sock, opened = held[i]
                    byte = bytes((rng.randrange(256),))
                    try:
                        sock.sendall(byte)
                        echoed = sock.recv(1)
                        outcome = "ok" if echoed == byte else ("cut" if not echoed else "corrupt")
                    except OSError:
                        outcome = "cut"
                    self.counts.add(outcome, 1, opened, "idle")
                    if outcome != "ok" or rng.random() < 0.02:
                        sock.close()
                        held[i] = (socket.create_connection((HOST, self.port), timeout=10), time.monotonic())
        except OSError:
            pass
        finally:
            for sock, _ in held:
                sock.close()

    def stop(self) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(150)


UDP_BULK = 2000         # datagrams of a bulk flow


def flow(port: int, payloads: list[bytes], pace: float = 0.0, timeout: float = 5.0) -> tuple[str, int]:
    """One UDP user sends each payload and waits for its echo: ("ok", bytes) when all came back,
    "cut" when one did not within ``timeout``, "corrupt" when a datagram it never sent came."""
    sent: set[bytes] = set()
    moved = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for payload in payloads:
            sent.add(payload)
            try:
                sock.sendto(payload, (HOST, port))
                while True:
                    data = sock.recv(1 << 16)
                    if data not in sent:
                        return "corrupt", moved
                    if data == payload:
                        break
            except OSError:   # no echo in time (a lost datagram), or refused
                return "cut", moved
            moved += len(payload)
            if pace:
                time.sleep(pace)
    return "ok", moved


def datagrams(rng: random.Random, count: int) -> list[bytes]:
    """Distinct payloads (a counter first), 1 B to 16 KiB, most of them small."""
    out = []
    for i in range(count):
        size = max(4, min(16384, round(2 ** rng.uniform(2, 14))))
        out.append(i.to_bytes(4, "big") + rng.randbytes(size - 4))
    return out


class UdpLoad(Load):
    """The mix of users as UDP flows (the udp transport's public ports are UDP only)."""

    def _churn(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        while not self.halt.is_set():
            start = time.monotonic()
            outcome, moved = flow(self.port, datagrams(rng, rng.randint(1, 8)))
            self.counts.add(outcome, moved, start, "churn")

    def _bulk(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while not self.halt.is_set():
            start = time.monotonic()
            outcome, moved = flow(self.port, datagrams(rng, UDP_BULK), pace=0.001)
            self.counts.add(outcome, moved, start, "bulk")

    def _idle(self) -> None:
        """IDLE flows held; every second a tenth of them ping, one in fifty is replaced."""
        rng = random.Random(self.seed)
        held: list[tuple[socket.socket, float]] = []

        def new() -> tuple[socket.socket, float]:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(2.0)
            return sock, time.monotonic()

        try:
            while not self.halt.wait(1.0):
                while len(held) < IDLE:
                    held.append(new())
                for i in rng.sample(range(len(held)), len(held) // 10):
                    sock, opened = held[i]
                    ping = rng.randbytes(8)
                    try:
                        sock.sendto(ping, (HOST, self.port))
                        echoed = sock.recv(64)
                        outcome = "ok" if echoed == ping else "corrupt"
                    except OSError:
                        outcome = "cut"
                    self.counts.add(outcome, len(ping), opened, "idle")
                    if outcome != "ok" or rng.random() < 0.02:
                        sock.close()
                        held[i] = new()
        finally:
            for sock, _ in held:
                sock.close()


class ProxiedPair(TunnelPair):
    """A TunnelPair whose client dials the server through a fault proxy (UDP too for udp)."""

    proxy: FaultProxy | None = None

    def write_configs(self) -> tuple[Path, Path]:
        server, client = super().write_configs()
        self.proxy = FaultProxy(self.tunnel_port, history=0, udp=self.transport == "udp")
        text = client.read_text().replace(f"{HOST}:{self.tunnel_port}", f"{HOST}:{self.proxy.port}")
        client.write_text(text)
        return server, client


Sample = dict[str, tuple[int, float, int]]   # role -> (threads, RSS MiB, open files)


def median(samples: list[Sample]) -> Sample:
    """Per role and figure, the median of the samples (a reset makes the RSS swing for a while)."""
    return {role: tuple(statistics.median(s[role][i] for s in samples) for i in range(3))  # type: ignore[misc]
            for role in samples[0]}


def soak(transport: str, minutes: float, cut_every: float, workdir: Path, seed: int) -> dict[str, object]:
    duration = minutes * 60
    warm_up = max(WARM_UP, duration / 10)
    with Helper.script("services.py", "echo") as echo:
        target = int(echo.expect("PORT", 10))
        extra = tls_settings(transport, (), workdir)
        pair = ProxiedPair(workdir, f"soak-{transport}", target, target, transport, server_extra=extra)
        counts = Counts()
        samples: list[tuple[float, Sample]] = []
        with pair:
            assert pair.proxy is not None
            load = (UdpLoad if transport == "udp" else Load)(pair.public_port, counts, seed)
            start = time.monotonic()
            next_cut = start + cut_every
            try:
                while time.monotonic() - start < duration:
                    now = time.monotonic()
                    pair.check_alive()
                    samples.append((now - start, {role: (*threads_and_rss(pid), fd_count(pid))
                                                  for role, pid in pair.pids.items()}))
                    if cut_every and now >= next_cut:
                        with counts.lock:
                            counts.resets.append(now)
                        pair.proxy.cut(rst=True)
                        time.sleep(0.5)
                        pair.proxy.heal()
                        next_cut += cut_every
                    time.sleep(SAMPLE_EVERY)
            finally:
                load.stop()
                pair.proxy.close()
        alive = not pair.notes
        warm = median([s for t, s in samples if warm_up <= t < warm_up + WINDOW] or [samples[0][1]])
        end = median([s for t, s in samples if t >= samples[-1][0] - WINDOW])
        growth = {role: (end[role][1] - warm[role][1]) / warm[role][1] for role in end}
        return {"transport": transport, "minutes": minutes, "counts": counts, "warm": warm, "end": end,
                "growth": growth, "alive": alive, "notes": pair.notes, "logs": pair.logs(), "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Soak: mixed load and churn through the tunnel.")
    parser.add_argument("--minutes", type=float, default=30.0, help="per transport (default 30)")
    parser.add_argument("--transport", action="append", choices=TRANSPORTS, help="repeatable; default all")
    parser.add_argument("--cut-every", type=float, default=120.0, help="seconds between tunnel resets (0: none)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeline", action="store_true", help="also print the RSS of both processes each minute")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    failed = False
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-soak-"))
    print(f"{'transport':9} {'min':>4} {'ok':>8} {'cut':>5} {'stray':>5} {'corrupt':>7} {'GB':>6} "
          f"{'server RSS MiB warm->end':>26} {'client RSS MiB warm->end':>26} {'fds s/c end':>12}", flush=True)
    try:
        for transport in args.transport or TRANSPORTS:
            result = soak(transport, args.minutes, args.cut_every, workdir, args.seed)
            counts: Counts = result["counts"]  # type: ignore[assignment]
            warm, end, growth = result["warm"], result["end"], result["growth"]
            bad = counts.corrupt or not result["alive"] or any(g > RSS_BOUND for g in growth.values())  # type: ignore[union-attr]
            failed |= bool(bad)
            rss = {role: f"{warm[role][1]:.1f}->{end[role][1]:.1f} ({growth[role]:+.1%})" for role in end}  # type: ignore[index]
            print(f"{transport:9} {args.minutes:4g} {counts.ok:8} {counts.cut:5} {counts.stray:5} {counts.corrupt:7} "
                  f"{counts.bytes / 1e9:6.1f} {rss['server']:>26} {rss['client']:>26} "
                  f"{end['server'][2]:>5.0f}/{end['client'][2]:<5.0f}{'  FAILED' if bad else ''}", flush=True)  # type: ignore[index]
            if args.timeline:
                for at, sample in result["samples"]:  # type: ignore[attr-defined]
                    if int(at) % 60 < SAMPLE_EVERY:
                        print(f"    {at / 60:5.1f} min: server {sample['server'][1]:.1f} MiB, client "
                              f"{sample['client'][1]:.1f} MiB, threads {sample['server'][0]}/{sample['client'][0]}")
            for note in result["notes"] + counts.strays:  # type: ignore[operator]
                print(f"    {note}")
            if bad:
                for role, lines in result["logs"].items():  # type: ignore[attr-defined]
                    print(f"    {role}: " + "\n    ".join(lines[-10:]))
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
