"""The fault suite: a server process and a client process whose tunnel connections cross a fault
proxy (tests/faultproxy.py), on every transport.

One test per fault and transport, each on a new tunnel (so parallel workers spread them, and
start no more processes at once than one test needs): jittered chunk timing under concurrent
transfers and across a reconnection, a throttled path, a black hole shorter than the silence limit under a
transfer, cuts with FIN and with RST, a black hole long enough to be noticed, kill -9 of the
client and of the server, each during a transfer. After every
fault the tunnel must carry a new user within ``retry_interval`` + 1 s of the fault's end; a
black-holed control channel must be noticed within the documented bound; every transfer that did
not start during a fault is sha256-exact, and one that a fault cut short received only right bytes.

UDP has faults of its own, on the udp transport (its links are datagrams through the proxy's
UDP side) and on accept_udp over tcp: cuts with FIN and with RST, a black hole
long enough to be noticed, kill -9 of the client and of the server, each while a flow is
exchanging datagrams. After each, a new UDP user gets its datagrams back within the same bound,
and every datagram that comes back is one that was sent, whole.

The long form (more rounds, longer soak) is bench/soak.py.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests import harness
from tests.faultproxy import FaultProxy
from tests.harness import HOST, TRANSPORTS, Launcher, Service, Tunnel, UdpEcho, client_toml, echo_works

pytestmark = pytest.mark.timeout(150)

RETRY = 1                    # the client's retry_interval (seconds)
HEARTBEAT = 1                # the server's heartbeat: the client's silence limit is then its floor
SILENCE_LIMIT = 5.0          # README: 3 heartbeat periods, at least 5 s
RECOVERY = RETRY + 1.0       # the bound on the tunnel's return after a fault ends
SLACK = 1.0                  # scheduling slack on a 2-core machine running a dozen processes
TOKEN = "faults-token-7d2e"
MiB = 1 << 20


# ------------------------------------------------------------------------------------------------
# transfers

class Transfer(threading.Thread):
    """One user through the tunnel to the echo service: sends ``size`` seeded bytes and reads the
    echo, comparing every byte with what was sent. ``outcome``: complete, cut (the connection
    ended early, every byte so far right), corrupt or failed (no connection)."""

    def __init__(self, port: int, size: int, seed: int, pace: float = 0.0) -> None:
        super().__init__(name=f"transfer-{seed}", daemon=True)
        self.port, self.size, self.seed, self.pace = port, size, seed, pace
        self.payload = random.Random(seed).randbytes(size)
        self.outcome = "running"
        self.got = 0
        self.start()

    def run(self) -> None:
        try:
            sock = socket.create_connection((HOST, self.port), timeout=20)
        except OSError:
            self.outcome = "failed"
            return
        with sock:
            sender = threading.Thread(target=self._send, args=(sock,), daemon=True)
            sender.start()
            digest = hashlib.sha256()
            try:
                while self.got < self.size:
                    data = sock.recv(256 * 1024)
                    if not data:
                        break
                    if data != self.payload[self.got:self.got + len(data)]:
                        self.outcome = "corrupt"
                        return
                    digest.update(data)
                    self.got += len(data)
            except OSError:
                pass
            finally:
                sock.close() if self.got < self.size else None
                sender.join(20)
            if self.got == self.size:
                assert digest.digest() == hashlib.sha256(self.payload).digest()
                self.outcome = "complete"
            else:
                self.outcome = "cut"

    def _send(self, sock: socket.socket) -> None:
        step = 64 * 1024
        try:
            for offset in range(0, self.size, step):
                sock.sendall(self.payload[offset:offset + step])
                if self.pace:
                    time.sleep(self.pace)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def result(self, timeout: float = 30.0) -> str:
        self.join(timeout)
        return self.outcome if not self.is_alive() else "hung"


# ------------------------------------------------------------------------------------------------
# one transport's tunnel through a proxy

def works(port: int, seed: int) -> bool:
    try:
        echo_works(port, size=2000, seed=seed, timeout=0.5)
    except (AssertionError, OSError):
        return False
    return True


@dataclass
class Run:
    """What a fault's run saw on one transport: timings and the failures it found."""

    transport: str
    timings: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


class Faulted:
    """A tunnel whose client dials the server through a FaultProxy."""

    def __init__(self, launcher: Launcher, transport: str, target: int) -> None:
        self.tunnel = Tunnel(launcher, [str(target)], TOKEN, transport=transport, label=transport,
                             server_extra={"heartbeat": HEARTBEAT})
        self.proxy: FaultProxy | None = None
        self.transport = transport
        self.seed = 0

    def start(self) -> None:
        tunnel = self.tunnel
        tunnel.start_server()
        self.proxy = FaultProxy(tunnel.bind_port)
        tunnel.remote_addr = f"{HOST}:{self.proxy.port}"
        tunnel.client_text = client_toml(self.proxy.port, TOKEN, transport=self.transport, retry_interval=RETRY,
                                         connection_pool=2)
        tunnel.start_client()
        tunnel.wait_connected(timeout=20)

    @property
    def port(self) -> int:
        return self.tunnel.public[0]

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def back_within(self, since: float, limit: float) -> float:
        """Seconds from ``since`` until a new user gets through (inf past ``limit`` + 5 s)."""
        while time.monotonic() - since < limit + 5:
            if works(self.port, self.next_seed()):
                return time.monotonic() - since
            time.sleep(0.02)
        return float("inf")

    def wait_line(self, proc: harness.Backhaul, text: str, count: int, limit: float) -> float:
        """When ``proc`` logged ``text`` for the ``count``-th time (monotonic), or inf."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if len(proc.lines(text)) >= count:
                return time.monotonic()
            time.sleep(0.02)
        return float("inf")


# ------------------------------------------------------------------------------------------------
# the faults

def jitter_phase(f: Faulted, run: Run) -> None:
    """Chunks of every tunnel connection held 0-30 ms at random (order kept per connection):
    links and the control channel overtake each other; 8 concurrent transfers stay exact."""
    assert f.proxy is not None
    f.proxy.delay(0.0, jitter=0.03)
    transfers = [Transfer(f.port, 256 * 1024, seed=1000 + i) for i in range(8)]
    outcomes = [t.result() for t in transfers]
    f.proxy.delay(0.0)
    run.check(outcomes.count("complete") == 8, f"jitter: transfers {outcomes}")


def jitter_reconnect(f: Faulted, run: Run) -> None:
    """A reset cut while every chunk takes 20-120 ms: the new control channel, its reply and the
    links it opens arrive in any order relative to each other; the tunnel comes back (the delays
    added to the bound) and carries concurrent transfers exact."""
    assert f.proxy is not None
    f.proxy.delay(0.02, jitter=0.1)
    f.proxy.cut(rst=True)
    time.sleep(0.5)
    f.proxy.heal()
    healed = time.monotonic()
    back = run.timings["jitter-reconnect"] = f.back_within(healed, RECOVERY + 1.0)
    run.check(back <= RECOVERY + 1.0 + SLACK, f"jitter-reconnect: back after {back:.2f} s")
    transfers = [Transfer(f.port, 256 * 1024, seed=1100 + i) for i in range(8)]
    outcomes = [t.result() for t in transfers]
    f.proxy.delay(0.0)
    run.check(outcomes.count("complete") == 8, f"jitter-reconnect: transfers {outcomes}")


def throttled(f: Faulted, run: Run) -> None:
    """Every tunnel connection held to 256 KiB/s each way: a transfer through it takes seconds
    and stays exact, and the session lives through it."""
    assert f.proxy is not None and f.tunnel.client is not None
    lost_before = len(f.tunnel.client.lines("lost the server"))
    f.proxy.throttle(256 * 1024)
    transfer = Transfer(f.port, 512 * 1024, seed=1200)
    outcome = transfer.result()
    f.proxy.throttle(0)
    run.check(outcome == "complete", f"throttled: transfer {outcome} at {transfer.got}")
    run.check(len(f.tunnel.client.lines("lost the server")) == lost_before, "throttled: the session ended")


def short_blackhole(f: Faulted, run: Run) -> None:
    """1.5 s of black hole, shorter than the silence limit: a running transfer resumes and
    completes exact, and the session survives."""
    assert f.proxy is not None and f.tunnel.client is not None
    lost_before = len(f.tunnel.client.lines("lost the server"))
    transfer = Transfer(f.port, 2 * MiB, seed=2000, pace=0.005)
    time.sleep(0.2)
    f.proxy.blackhole()
    time.sleep(1.5)
    f.proxy.heal()
    run.check(transfer.result() == "complete", f"short black hole: transfer {transfer.outcome} at {transfer.got}")
    run.check(len(f.tunnel.client.lines("lost the server")) == lost_before, "short black hole: the session ended")


def cut(f: Faulted, run: Run, rst: bool) -> None:
    """The network is cut (every connection closed with FIN or RST, new ones refused) for 1 s."""
    assert f.proxy is not None
    name = "cut-rst" if rst else "cut-fin"
    transfer = Transfer(f.port, 8 * MiB, seed=3000 + rst, pace=0.002)
    time.sleep(0.2)
    f.proxy.cut(rst=rst)
    time.sleep(1.0)
    f.proxy.heal()
    healed = time.monotonic()
    back = run.timings[name] = f.back_within(healed, RECOVERY)
    run.check(back <= RECOVERY + SLACK, f"{name}: back after {back:.2f} s")
    outcome = transfer.result()
    run.check(outcome in ("complete", "cut"), f"{name}: transfer across the cut {outcome}")
    after = Transfer(f.port, MiB, seed=3100 + rst)
    run.check(after.result() == "complete", f"{name}: transfer after the cut {after.outcome}")


def long_blackhole(f: Faulted, run: Run) -> None:
    """A black hole until the client notices the silence, then 1 s more: noticed within the
    bound, and the tunnel is back within the recovery bound once the path is. The session is
    first let run two heartbeats: until one arrives the client knows no cadence and leaves a
    silent server to TCP keepalive (README)."""
    assert f.proxy is not None and f.tunnel.client is not None
    client = f.tunnel.client
    lost = len(client.lines("lost the server"))
    time.sleep(2.5 * HEARTBEAT)
    f.proxy.blackhole()
    start = time.monotonic()
    noticed = f.wait_line(client, "lost the server", lost + 1, SILENCE_LIMIT + 10)
    detect = run.timings["blackhole-detect"] = noticed - start
    run.check(detect <= SILENCE_LIMIT + SLACK, f"black hole noticed after {detect:.2f} s")
    line = client.lines("lost the server")[-1] if detect < float("inf") else ""
    run.check("silent" in line, f"black hole: the client's line does not say silence: {line!r}")
    time.sleep(1.0)
    f.proxy.heal()
    healed = time.monotonic()
    back = run.timings["blackhole"] = f.back_within(healed, RECOVERY)
    run.check(back <= RECOVERY + SLACK, f"black hole: back after {back:.2f} s")


def kill_client(f: Faulted, run: Run) -> None:
    tunnel = f.tunnel
    assert tunnel.client is not None
    transfer = Transfer(f.port, 8 * MiB, seed=4000, pace=0.002)
    time.sleep(0.2)
    tunnel.client.kill()
    outcome = transfer.result()
    run.check(outcome == "cut", f"kill -9 client: transfer {outcome}")
    client = tunnel.start_client()
    started = f.wait_line(client, "starting;", 1, 15)
    back = run.timings["kill-client"] = f.back_within(started, RECOVERY)
    run.check(back <= RECOVERY + SLACK, f"kill -9 client: back after {back:.2f} s")


def kill_server(f: Faulted, run: Run) -> None:
    tunnel = f.tunnel
    assert tunnel.server is not None
    transfer = Transfer(f.port, 8 * MiB, seed=5000, pace=0.002)
    time.sleep(0.2)
    tunnel.server.kill()
    outcome = transfer.result()
    run.check(outcome in ("cut", "failed"), f"kill -9 server: transfer {outcome}")
    server = tunnel.start_server(wait=False)
    listening = f.wait_line(server, "tunnel listening on", 1, 15)
    back = run.timings["kill-server"] = f.back_within(listening, RECOVERY)
    run.check(back <= RECOVERY + SLACK, f"kill -9 server: back after {back:.2f} s")
    after = Transfer(f.port, MiB, seed=5100)
    run.check(after.result() == "complete", f"kill -9 server: transfer after {after.outcome}")


FAULTS: dict[str, Callable[[Faulted, Run], None]] = {
    "jitter": jitter_phase,
    "jitter-reconnect": jitter_reconnect,
    "throttled": throttled,
    "short-blackhole": short_blackhole,
    "cut-fin": functools.partial(cut, rst=False),
    "cut-rst": functools.partial(cut, rst=True),
    "blackhole": long_blackhole,
    "kill-client": kill_client,
    "kill-server": kill_server,
}


def run_fault(f: Faulted, run: Run, fault: Callable[[Any, Run], None]) -> None:
    """``fault`` on one faulted tunnel, then both processes alive and without a traceback; a
    failed wait is recorded (the timings measured so far are still reported); the proxy closed
    at the end."""
    try:
        f.start()
        fault(f, run)
        for proc in (f.tunnel.server, f.tunnel.client):
            assert proc is not None
            run.check(proc.alive(), f"{proc.name} died")
            run.check("Traceback" not in proc.log(), f"{proc.name} logged a traceback")
    except BaseException as exc:  # a failed wait: reported with the rest
        run.failures.append(f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        if f.proxy is not None:
            f.proxy.close()


def report(runs: list[Run], title: str, labels: dict[str, str]) -> None:
    """Print the recovery times the fault measured per transport; fail with every failure of every run."""
    names = list(dict.fromkeys(name for run in runs for name in run.timings))
    width = max([8, *(len(label) for label in labels.values())])
    if names:
        print(f"\n{title}")
        print(" " * width + "".join(f"{n:>17}" for n in names))
    for run in runs:
        label = labels.get(run.transport, run.transport)
        if names:
            print(f"{label:>{width}}" + "".join(f"{run.timings.get(n, float('nan')):>16.2f}s" for n in names))
    failures = [f"{run.transport}: {failure}" for run in runs for failure in run.failures]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault(launcher: Launcher, echo_service: Service, fault: str, transport: str) -> None:
    run = Run(transport)
    run_fault(Faulted(launcher, transport, echo_service.port), run, FAULTS[fault])
    report([run], f"{fault}: seconds until a new user got through (blackhole-detect: until the client noticed)", {})


# ------------------------------------------------------------------------------------------------
# UDP: the udp transport and accept_udp over tcp

def udp_works(port: int, seed: int, timeout: float = 0.5) -> bool:
    """A new UDP user (a flow of its own) gets a datagram back whole."""
    payload = random.Random(seed).randbytes(1 + seed % 1200)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
        user.bind((HOST, 0))
        user.settimeout(timeout)
        user.sendto(payload, (HOST, port))
        try:
            return user.recv(65536) == payload
        except (TimeoutError, ConnectionRefusedError):
            return False


class Datagrams(threading.Thread):
    """One UDP user exchanging numbered datagrams through the tunnel until stopped, one at a
    time; ``wrong`` counts answers that are no datagram it sent (must stay 0)."""

    def __init__(self, port: int, seed: int) -> None:
        super().__init__(name=f"datagrams-{seed}", daemon=True)
        self.port, self.seed = port, seed
        self.sent = self.back = self.wrong = 0
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        rng = random.Random(self.seed)
        sent: set[bytes] = set()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
            user.bind((HOST, 0))
            user.settimeout(0.2)
            while not self._halt.is_set():
                payload = self.sent.to_bytes(4, "big") + rng.randbytes(rng.randint(0, 2000))
                sent.add(payload)
                self.sent += 1
                with contextlib.suppress(OSError):
                    user.sendto(payload, (HOST, self.port))
                try:
                    while True:
                        data = user.recv(65536)
                        if data in sent:
                            self.back += 1
                        else:
                            self.wrong += 1
                        if data == payload:
                            break
                except (TimeoutError, ConnectionRefusedError):
                    pass

    def stop(self) -> tuple[int, int, int]:
        self._halt.set()
        self.join(10)
        return self.sent, self.back, self.wrong


class UdpFaulted(Faulted):
    """A tunnel carrying UDP users whose client dials the server through a FaultProxy that
    forwards UDP too: ``mode`` "udp" is the udp transport, "tcp" accept_udp over tcp."""

    def __init__(self, launcher: Launcher, mode: str, target: int) -> None:
        extra: dict[str, object] = {"heartbeat": HEARTBEAT}
        if mode == "tcp":
            extra["accept_udp"] = True
        self.tunnel = Tunnel(launcher, [str(target)], TOKEN, transport=mode, label=f"udp-{mode}",
                             server_extra=extra)
        self.proxy = None
        self.transport = mode
        self.seed = 0

    def start(self) -> None:
        tunnel = self.tunnel
        tunnel.start_server()
        self.proxy = FaultProxy(tunnel.bind_port, udp=True)
        tunnel.remote_addr = f"{HOST}:{self.proxy.port}"
        tunnel.client_text = client_toml(self.proxy.port, TOKEN, transport=self.transport, retry_interval=RETRY,
                                         connection_pool=2)
        tunnel.start_client()
        tunnel.wait_connected(timeout=20)

    def back_within(self, since: float, limit: float) -> float:
        while time.monotonic() - since < limit + 5:
            if udp_works(self.port, self.next_seed()):
                return time.monotonic() - since
            time.sleep(0.02)
        return float("inf")


def udp_across(f: UdpFaulted, run: Run, name: str, fault: Callable[[], float]) -> None:
    """A flow exchanging datagrams while ``fault`` runs (it returns when the fault ended); a new
    user is carried within the bound after it; no datagram comes back that was not sent."""
    flow = Datagrams(f.port, seed=f.next_seed())
    time.sleep(0.3)
    ended = fault()
    back = run.timings[name] = f.back_within(ended, RECOVERY)
    run.check(back <= RECOVERY + SLACK, f"{name}: back after {back:.2f} s")
    sent, came, wrong = flow.stop()
    run.check(wrong == 0 and came > 0, f"{name}: {wrong} wrong datagrams, {came} of {sent} back")
    after = Datagrams(f.port, seed=f.next_seed())
    time.sleep(1.0)
    sent, came, wrong = after.stop()
    run.check(wrong == 0 and came >= sent - 1 > 0, f"{name}: after it {came} of {sent} back, {wrong} wrong")


def udp_cut(f: UdpFaulted, run: Run, rst: bool) -> None:
    assert f.proxy is not None
    proxy = f.proxy

    def fault() -> float:
        proxy.cut(rst=rst)
        time.sleep(1.0)
        proxy.heal()
        return time.monotonic()

    udp_across(f, run, "cut-rst" if rst else "cut-fin", fault)


def udp_blackhole(f: UdpFaulted, run: Run) -> None:
    assert f.proxy is not None and f.tunnel.client is not None
    proxy, client = f.proxy, f.tunnel.client

    def fault() -> float:
        lost = len(client.lines("lost the server"))
        proxy.blackhole()
        start = time.monotonic()
        noticed = f.wait_line(client, "lost the server", lost + 1, SILENCE_LIMIT + 10)
        detect = run.timings["blackhole-detect"] = noticed - start
        run.check(detect <= SILENCE_LIMIT + SLACK, f"black hole noticed after {detect:.2f} s")
        time.sleep(1.0)
        proxy.heal()
        return time.monotonic()

    time.sleep(2.5 * HEARTBEAT)   # the client learns the server's cadence first
    udp_across(f, run, "blackhole", fault)


def udp_kill(f: UdpFaulted, run: Run, which: str) -> None:
    tunnel = f.tunnel

    def fault() -> float:
        proc = tunnel.client if which == "client" else tunnel.server
        assert proc is not None
        proc.kill()
        if which == "client":
            return f.wait_line(tunnel.start_client(), "starting;", 1, 15)
        return f.wait_line(tunnel.start_server(wait=False), "tunnel listening on", 1, 15)

    udp_across(f, run, f"kill-{which}", fault)


UDP_FAULTS: dict[str, Callable[[UdpFaulted, Run], None]] = {
    "cut-fin": functools.partial(udp_cut, rst=False),
    "cut-rst": functools.partial(udp_cut, rst=True),
    "blackhole": udp_blackhole,
    "kill-client": functools.partial(udp_kill, which="client"),
    "kill-server": functools.partial(udp_kill, which="server"),
}


@pytest.mark.parametrize("mode", ["udp", "tcp"])   # the udp transport; accept_udp over tcp
@pytest.mark.parametrize("fault", UDP_FAULTS)
def test_fault_on_udp(launcher: Launcher, udp_echo: UdpEcho, fault: str, mode: str) -> None:
    run = Run(mode)
    run_fault(UdpFaulted(launcher, mode, udp_echo.port), run, UDP_FAULTS[fault])
    report([run], f"{fault}: seconds until a new UDP user got through (blackhole-detect: until noticed)",
           {"udp": "udp", "tcp": "tcp+accept"})
