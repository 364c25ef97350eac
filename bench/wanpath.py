"""An emulated long path between two network namespaces: the WAN measurements' link.

    python wanpath.py forward --a NS_A --b NS_B [--delay-ms 50] [--rate-mbit 100] [--loss 0]
                              [--queue-ms 25] [--seed 1]

Without the kernel's netem qdisc (not every kernel has it) tc cannot delay or drop packets, so
the path is emulated in user space: two TUN devices, one in each namespace (198.18.0.1/24 in A,
198.18.0.2/24 in B, nothing else routed), and this forwarder between them. Each direction on
its own applies, in this order: loss (each packet dropped with the given probability), a rate
limit (the packet waits until the link has sent the ones before it, serialisation at the rate)
with a bounded drop-tail queue (a packet that would wait longer than --queue-ms is dropped),
then a one-way delay. The delay is the same for
every packet of a direction, so the packets leave in the order they came: no reordering, and a
plain FIFO per direction is the timer queue (its head is always the next due).

The forwarder is one thread: epoll on both TUN descriptors and stdin; each readiness reads up
to BATCH packets; deliveries are due times, checked after each wake-up (epoll's timeout is in
whole milliseconds, rounded up: a packet leaves at most about a millisecond late, never early).

It speaks the bench's line protocol: `READY {json}` once both devices are up, then on stdin
`set delay_ms=.. rate_mbit=.. loss=.. queue_ms=..` (both directions; `ab.` or `ba.` before a
name sets one) answered with `SET {json}`, and `stats` answered with `STATS {json}`: per
direction the packets in, lost (the configured loss), queue drops (the configured queue), and
the forwarder's own drops: the kernel's drops at the TUN devices (packets the forwarder did not
read in time, or that the namespace's stack did not take), write errors, the delay line's
overflow; and how late packets left (counts since the start; the latest since the last
`stats`). It exits when stdin closes.

Root only (TUN devices, namespaces); `unavailable()` says why not.
"""

import argparse
import collections
import fcntl
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from common import Helper, announce

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
ADDRESS_A = "198.18.0.1"   # RFC 2544 benchmarking range: never routed anywhere
ADDRESS_B = "198.18.0.2"
PREFIX = 24
MTU = 1500
TXQUEUELEN = 1000          # the kernel's queue in front of the forwarder, per device
BATCH = 256                # packets read per readiness before the other direction gets a turn
MAX_LINE = 200_000         # packets held per direction, whatever the settings (a bound, never reached at 1 Gbit/s)
LATE = 0.002               # a packet leaving this much after its due time counts as late
READY_TIMEOUT = 20.0
RT_PRIORITY = 5            # SCHED_FIFO priority of the forwarder: above every ordinary process
NICE = -10                 # where real-time scheduling is refused


def unavailable() -> str:
    """Why the emulated path cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root (TUN devices and network namespaces)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if not shutil.which("ip"):
        return "no `ip` command (apt-get install iproute2)"
    return ""


def ip(*args: str, netns: str = "") -> None:
    """One `ip` command (in namespace ``netns`` when given); RuntimeError with its message."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@contextmanager
def namespaces(tag: str = "") -> Iterator[tuple[str, str]]:
    """Two fresh network namespaces with their loopback up, deleted afterwards."""
    base = f"bhw{tag or os.getpid()}"
    names = (f"{base}a", f"{base}b")
    made: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            made.append(name)
            ip("link", "set", "lo", "up", netns=name)
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


class WanPath:
    """The forwarder process between namespaces ``ns_a`` and ``ns_b`` ("" = the forwarder's own)."""

    def __init__(self, ns_a: str, ns_b: str, *, delay_ms: float = 50, rate_mbit: float = 100,
                 loss: float = 0.0, queue_ms: float = 25, seed: int = 1) -> None:
        self.ns_a, self.ns_b = ns_a, ns_b
        self.helper = Helper.script("wanpath.py", "forward", "--a", ns_a, "--b", ns_b, "--delay-ms", delay_ms,
                                    "--rate-mbit", rate_mbit, "--loss", loss, "--queue-ms", queue_ms,
                                    "--seed", seed, stdin=True)
        try:
            self.ready = self.helper.expect_json("READY", READY_TIMEOUT)
        except BaseException:
            self.helper.stop()
            raise

    def set(self, **values: float) -> dict[str, Any]:
        """Change the emulation of both directions (``ab_loss=...``: one direction)."""
        self.helper.send("set " + " ".join(f"{k.replace('_', '.', 1) if k[:3] in ('ab_', 'ba_') else k}={v}"
                                          for k, v in values.items()))
        return self.helper.expect_json("SET", 10)

    def stats(self) -> dict[str, Any]:
        self.helper.send("stats")
        return self.helper.expect_json("STATS", 10)

    def close(self) -> None:
        self.helper.stop()

    def __enter__(self) -> "WanPath":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def own_drops(stats: dict[str, Any], direction: str = "") -> int:
    """Packets the path lost that the settings did not ask for: the forwarder's own drops (one
    direction, or both)."""
    return sum(stats[d]["kernel_dropped"] + stats[d]["write_errors"] + stats[d]["overflow"]
               for d in ([direction] if direction else ["ab", "ba"]))


def describe(stats: dict[str, Any]) -> str:
    """One line: what each direction carried and dropped, and whether the forwarder kept up."""
    parts = []
    for direction, arrow in (("ab", "A->B"), ("ba", "B->A")):
        d = stats[direction]
        parts.append(f"{arrow} {d['packets']:,} pkts {d['bytes'] / 1e6:,.1f} MB, lost {d['lost']:,} (loss), "
                     f"{d['queue_drops']:,} (queue), own drops {own_drops(stats, direction):,} "
                     f"(kernel {d['kernel_dropped']}, write {d['write_errors']}, overflow {d['overflow']}), "
                     f"late >{LATE * 1e3:g} ms {d['late']:,}, latest {d['latest_ms']:.1f} ms")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ the forwarder


class Direction:
    """One way of the path: loss, then the rate limit and its drop-tail queue, then the delay."""

    def __init__(self, name: str, source: int, sink: int, rng: random.Random) -> None:
        self.name, self.source, self.sink, self.rng = name, source, sink, rng
        self.delay = 0.0
        self.rate = 0.0          # bytes per second; 0: unlimited
        self.loss = 0.0
        self.queue = 0.0         # seconds a packet may wait for the link
        self.free_at = 0.0       # when the link has sent every packet taken so far
        self.last_due = 0.0
        self.line: collections.deque[tuple[float, bytes]] = collections.deque()
        self.counts = dict.fromkeys(("packets", "bytes", "lost", "queue_drops", "overflow", "delivered",
                                     "write_errors", "late"), 0)
        self.latest = 0.0

    def settings(self) -> dict[str, float]:
        return {"delay_ms": self.delay * 1e3, "rate_mbit": self.rate * 8 / 1e6, "loss": self.loss,
                "queue_ms": self.queue * 1e3}

    def configure(self, name: str, value: float) -> None:
        if name == "delay_ms":
            self.delay = value / 1e3
        elif name == "rate_mbit":
            self.rate = value * 1e6 / 8
        elif name == "loss":
            if not 0 <= value < 1:
                raise ValueError("loss is a share: 0 <= loss < 1")
            self.loss = value
        elif name == "queue_ms":
            self.queue = value / 1e3
        else:
            raise ValueError(f"unknown setting {name!r}")

    def take(self, now: float) -> None:
        """Read what the source has (BATCH at most) and put it on the line."""
        counts, line = self.counts, self.line
        for _ in range(BATCH):
            try:
                packet = os.read(self.source, 65536)
            except BlockingIOError:
                return
            counts["packets"] += 1
            counts["bytes"] += len(packet)
            if self.loss and self.rng.random() < self.loss:
                counts["lost"] += 1
                continue
            if self.rate:
                start = max(now, self.free_at)
                if start - now > self.queue:
                    counts["queue_drops"] += 1
                    continue
                self.free_at = start + len(packet) / self.rate
                due = self.free_at + self.delay
            else:
                due = now + self.delay
            # A delay made shorter meanwhile must not let a packet pass the ones before it.
            due = max(due, self.last_due)
            if len(line) >= MAX_LINE:
                counts["overflow"] += 1
                continue
            self.last_due = due
            line.append((due, packet))

    def deliver(self, now: float) -> None:
        counts, line = self.counts, self.line
        while line and line[0][0] <= now:
            due, packet = line.popleft()
            late = now - due
            if late > LATE:
                counts["late"] += 1
            if late > self.latest:
                self.latest = late
            try:
                os.write(self.sink, packet)
                counts["delivered"] += 1
            except OSError:
                counts["write_errors"] += 1

    def next_due(self) -> float | None:
        return self.line[0][0] if self.line else None


def raise_priority() -> str:
    """Run the forwarder before ordinary processes: the link must not slow down when the machine
    is busy (the endpoints on either side compete for the CPU as on real hosts; the path should
    not). At nice -10 on a loaded 2-core machine packets still left up to 50 ms late; real-time,
    under 2 ms. It blocks in epoll between packets (about a fifth of a core at 100 Mbit/s), and
    the kernel's real-time throttling keeps a share of each second for everything else."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
        return f"SCHED_FIFO {RT_PRIORITY}"
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
        return f"nice {NICE}"
    except OSError:
        return "ordinary"


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def bring_up(name: str, netns: str, address: str) -> None:
    if netns:
        ip("link", "set", name, "netns", netns)
    ip("addr", "add", f"{address}/{PREFIX}", "dev", name, netns=netns)
    ip("link", "set", name, "mtu", str(MTU), "txqueuelen", str(TXQUEUELEN), "up", netns=netns)


def kernel_drops(name: str, netns: str) -> int:
    """Packets the kernel dropped at a TUN device: its queue to us was full (tx), or the
    namespace's stack did not take what we wrote (rx)."""
    argv = ["ip", *(["-n", netns] if netns else []), "-s", "-j", "link", "show", "dev", name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if done.returncode:
        return 0
    stats = json.loads(done.stdout)[0]["stats64"]
    return int(stats["tx"]["dropped"]) + int(stats["rx"]["dropped"])


def forward(args: argparse.Namespace) -> None:
    priority = raise_priority()
    tag = os.getpid()
    names = (f"bhw{tag}x", f"bhw{tag}y")
    fds = [open_tun(name) for name in names]
    bring_up(names[0], args.a, ADDRESS_A)
    bring_up(names[1], args.b, ADDRESS_B)
    rng = random.Random(args.seed)
    ab = Direction("ab", fds[0], fds[1], rng)
    ba = Direction("ba", fds[1], fds[0], rng)
    directions = {"ab": ab, "ba": ba}
    for d in directions.values():
        for key in ("delay_ms", "rate_mbit", "loss", "queue_ms"):
            d.configure(key, getattr(args, key))
    poller = select.epoll()
    poller.register(fds[0], select.EPOLLIN)
    poller.register(fds[1], select.EPOLLIN)
    stdin = sys.stdin.fileno()
    poller.register(stdin, select.EPOLLIN)
    by_fd = {fds[0]: ab, fds[1]: ba}
    announce("READY", {"a": {"netns": args.a, "device": names[0], "address": ADDRESS_A},
                       "b": {"netns": args.b, "device": names[1], "address": ADDRESS_B},
                       "settings": ab.settings(), "priority": priority})
    pending = b""
    while True:
        dues = [due for due in (ab.next_due(), ba.next_due()) if due is not None]
        timeout = max(0.0, min(dues) - time.monotonic()) if dues else -1
        for fd, _event in poller.poll(timeout):
            if fd == stdin:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    command(line.decode().strip(), directions, names, args)
            else:
                by_fd[fd].take(time.monotonic())
        now = time.monotonic()
        ab.deliver(now)
        ba.deliver(now)


def command(line: str, directions: dict[str, Direction], names: tuple[str, str], args: argparse.Namespace) -> None:
    word, _, rest = line.partition(" ")
    if word == "stats":
        counts = {name: {**d.counts, "latest_ms": d.latest * 1e3, "queued": len(d.line), **d.settings()}
                  for name, d in directions.items()}
        for d in directions.values():
            d.latest = 0.0   # the latest since the last question: the driver asks before and after each run
        # The kernel's counters take two `ip` commands: on their own thread, so that packets keep
        # flowing meanwhile (the driver waits for this answer before it asks anything else).
        threading.Thread(target=answer_stats, args=(counts, names, args), daemon=True).start()
    elif word == "set":
        try:
            for item in rest.split():
                key, _, value = item.partition("=")
                which, _, setting = key.rpartition(".")
                for name, d in directions.items():
                    if which in ("", name):
                        d.configure(setting, float(value))
        except ValueError as exc:
            announce("SET", {"error": str(exc)})
            return
        announce("SET", {name: d.settings() for name, d in directions.items()})
    elif word:
        announce("ERROR", {"error": f"unknown command {word!r}"})


def answer_stats(counts: dict[str, dict[str, Any]], names: tuple[str, str], args: argparse.Namespace) -> None:
    counts["ab"]["kernel_dropped"] = kernel_drops(names[0], args.a)
    counts["ba"]["kernel_dropped"] = kernel_drops(names[1], args.b)
    announce("STATS", counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    fwd = sub.add_parser("forward")
    fwd.add_argument("--a", default="", help="network namespace of 198.18.0.1 (empty: this one)")
    fwd.add_argument("--b", default="", help="network namespace of 198.18.0.2 (empty: this one)")
    fwd.add_argument("--delay-ms", dest="delay_ms", type=float, default=50.0, help="one-way delay, each way")
    fwd.add_argument("--rate-mbit", dest="rate_mbit", type=float, default=100.0, help="each way; 0: unlimited")
    fwd.add_argument("--loss", type=float, default=0.0, help="share of packets dropped, each way")
    fwd.add_argument("--queue-ms", dest="queue_ms", type=float, default=25.0,
                     help="longest wait for the link before a packet is dropped (drop-tail)")
    fwd.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    why = unavailable()
    if why:
        sys.exit(f"wanpath: {why}")
    forward(args)


if __name__ == "__main__":
    main()
