"""UDP end to end: accept_udp over the tcp transport, and the udp transport. Server and client are
real processes; users, the UDP echo target (and, for malformed frames, a fake peer) are here."""

from __future__ import annotations

import collections
import contextlib
import random
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.harness import (
    HOST,
    IO_TIMEOUT,
    Launcher,
    Tunnel,
    UdpEcho,
    client_toml,
    exchange,
    free_port,
    ltv,
    recv_exact,
    server_toml,
    user_socket,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


MODES = ["tcp", "udp"]           # accept_udp on the tcp transport; the udp transport
MAX_DATAGRAM = 16384
SG_CHAN, SG_UDP, SG_RTT = 0x01, 0x05, 0x06


def udp_tunnel(launcher: Launcher, mode: str, targets: list[str], label: str = "",
               server_extra: dict[str, object] | None = None, client_extra: dict[str, object] | None = None) -> Tunnel:
    """A tunnel whose public ports carry UDP: accept_udp on tcp, or the udp transport."""
    extra: dict[str, object] = {"accept_udp": True} if mode == "tcp" else {}
    extra.update(server_extra or {})
    return Tunnel(launcher, targets, transport=mode, server_extra=extra, label=label,
                  client_extra={"connection_pool": 4, **(client_extra or {})}).up()


# ------------------------------------------------------------------------------------------------
# 50 flows x 2,000 datagrams of 1 B to 16 KiB, content and order checked per flow

FLOWS = 50
PER_FLOW = 2000
WINDOW = 4                  # datagrams in flight per flow...
IN_FLIGHT = 256 * 1024      # ...and bytes in flight in all (each counted with 1 KiB of kernel overhead):
                            # every UDP queue on the way holds them, even at a 208 KiB rmem_max
SKB = 1024


def sizes(flow: int) -> list[int]:
    """1 B and 16 KiB exactly, the rest log-uniform in between (most small, the volume bounded)."""
    rng = random.Random(flow)
    out = [1, MAX_DATAGRAM] + [max(1, min(MAX_DATAGRAM, round(2 ** rng.uniform(0, 14)))) for _ in range(PER_FLOW - 2)]
    rng.shuffle(out)
    return out


def payload(flow: int, index: int, size: int) -> bytes:
    """Distinct content per (flow, index) where it fits: a head naming both, then seeded bytes."""
    body = random.Random(flow * 100_003 + index).randbytes(size)
    head = struct.pack(">II", flow, index)
    return head[:size] + body[len(head):] if size >= len(head) else body


class Flow:
    __slots__ = ("number", "sock", "plan", "sent", "outstanding", "received", "lost")

    def __init__(self, number: int, port: int) -> None:
        self.number = number
        self.sock = user_socket()
        self.sock.connect((HOST, port))
        self.sock.setblocking(False)
        self.plan = sizes(number)
        self.sent = 0
        self.outstanding: collections.deque[tuple[bytes, float]] = collections.deque()
        self.received = 0
        self.lost = 0

    @property
    def done(self) -> bool:
        return self.sent == PER_FLOW and not self.outstanding


def drive(port: int, lossless: bool, deadline: float) -> list[Flow]:
    """Run every flow to its end; with ``lossless`` a datagram missing or out of order fails the
    test, otherwise a datagram unanswered for 1 s counts as lost."""
    flows = [Flow(n, port) for n in range(FLOWS)]
    selector = selectors.DefaultSelector()
    for flow in flows:
        selector.register(flow.sock, selectors.EVENT_READ, flow)
    in_flight = 0
    try:
        while not all(f.done for f in flows):
            now = time.monotonic()
            assert now < deadline, f"not done in time: {[(f.number, f.sent, f.received) for f in flows if not f.done][:5]}"
            for flow in flows:
                while flow.sent < PER_FLOW and len(flow.outstanding) < WINDOW:
                    data = payload(flow.number, flow.sent, flow.plan[flow.sent])
                    if in_flight + len(data) + SKB > IN_FLIGHT and in_flight:
                        break
                    flow.sock.send(data)
                    flow.outstanding.append((data, now))
                    flow.sent += 1
                    in_flight += len(data) + SKB
                if flow.outstanding and now - flow.outstanding[0][1] > (10.0 if lossless else 1.0):
                    assert not lossless, f"flow {flow.number}: datagram {flow.received} unanswered for 10 s"
                    gone, _ = flow.outstanding.popleft()
                    in_flight -= len(gone) + SKB
                    flow.lost += 1
            for key, _ in selector.select(0.02):
                flow = key.data
                while True:
                    try:
                        reply = flow.sock.recv(65536)
                    except BlockingIOError:
                        break
                    waiting = [data for data, _ in flow.outstanding]
                    if lossless:
                        assert waiting and reply == waiting[0], (
                            f"flow {flow.number}: reply {flow.received} has wrong content or order "
                            f"({len(reply)} bytes, expected {len(waiting[0]) if waiting else 0})")
                        skip = 0
                    else:
                        assert reply in waiting, f"flow {flow.number}: a reply of {len(reply)} bytes was never sent"
                        skip = waiting.index(reply)
                    for _ in range(skip + 1):
                        data, _ = flow.outstanding.popleft()
                        in_flight -= len(data) + SKB
                    flow.lost += skip
                    flow.received += 1
        return flows
    finally:
        selector.close()
        for flow in flows:
            flow.sock.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", MODES)
def test_fifty_flows_keep_every_datagram_whole_and_in_order(launcher, udp_echo, mode):
    """Catches: datagrams merged, split, cut, reordered or lost (tcp carrier), flows mixed up, and
    a thread per flow: 50 concurrent flows x 2,000 datagrams of 1 B to 16 KiB, checked one by one."""
    tunnel = udp_tunnel(launcher, mode, [str(udp_echo.port)], server_extra={"log_level": "debug"})
    public = tunnel.public[0]
    assert exchange(user_socket(), public, b"warm-up", tries=3) is not None
    threads = {name: proc.threads() for name, proc in (("server", tunnel.server), ("client", tunnel.client))}
    flows = drive(public, lossless=mode == "tcp", deadline=time.monotonic() + 200)
    received = sum(f.received for f in flows)
    assert received + sum(f.lost for f in flows) == FLOWS * PER_FLOW
    if mode == "tcp":
        assert received == FLOWS * PER_FLOW
    else:
        assert received >= 0.99 * FLOWS * PER_FLOW, f"only {received} of {FLOWS * PER_FLOW} came back"
    for name, proc in (("server", tunnel.server), ("client", tunnel.client)):
        assert proc.threads() <= threads[name], f"{name} threads grew with flows: {proc.threads()} > {threads[name]}"
        assert not proc.lines("Traceback") and not proc.lines("ERROR"), proc.log()
    for proc in (tunnel.server, tunnel.client):
        assert not proc.lines("dropped a datagram"), proc.lines("dropped a datagram")


# ------------------------------------------------------------------------------------------------
# limits on datagrams

@pytest.mark.parametrize("mode", MODES)
def test_too_long_a_datagram_is_dropped_with_a_line(launcher, udp_echo, mode):
    """Catches: a datagram past 16 KiB cut short and delivered, or dropped without a word; the
    flow carrying on after it."""
    tunnel = udp_tunnel(launcher, mode, [str(udp_echo.port)])
    public = tunnel.public[0]
    with contextlib.closing(user_socket()) as user:
        assert exchange(user, public, b"x" * MAX_DATAGRAM, tries=3) == b"x" * MAX_DATAGRAM
        user.sendto(b"y" * (MAX_DATAGRAM + 1), (HOST, public))
        line = tunnel.server.wait_for_log("dropped a datagram of 16385 bytes")
        assert f"on UDP port {HOST}:{public}: longer than 16384" in line, line
        assert exchange(user, public, b"after") == b"after"
    assert b"y"[0] not in udp_echo.first_bytes, "a cut datagram reached the target"


# ------------------------------------------------------------------------------------------------
# idle flows end (after 60 s; 8 s here)

FLOW_IDLE = 8   # BACKHAUL_UDP_IDLE of these tunnels; the default (60 s) is checked in test_udp_flows.py


@pytest.mark.timeout(60)
def test_flows_end_after_their_idle_seconds(launcher, udp_echo):
    """Catches: flows never ending (fds and memory held forever) or ending early; both modes at
    once. An idle flow's next datagram starts a new flow (a new source at the target)."""
    launcher.env["BACKHAUL_UDP_IDLE"] = str(FLOW_IDLE)
    tunnels = {mode: udp_tunnel(launcher, mode, [str(udp_echo.port)], label=mode,
                                server_extra={"log_level": "debug"}) for mode in MODES}
    users = {mode: user_socket() for mode in MODES}
    try:
        started = time.monotonic()
        for mode, tunnel in tunnels.items():
            assert exchange(users[mode], tunnel.public[0], b"first", tries=3) == b"first"
        first_sources = set(udp_echo.sources)
        assert len(first_sources) == 2
        time.sleep(FLOW_IDLE - 2)
        for tunnel in tunnels.values():
            assert not tunnel.server.lines(f"idle for {FLOW_IDLE} s"), f"a flow ended before {FLOW_IDLE} s"
        for tunnel in tunnels.values():
            tunnel.server.wait_for_log(f"idle for {FLOW_IDLE} s", timeout=25)
        assert FLOW_IDLE - 1 <= time.monotonic() - started <= FLOW_IDLE + 15
        for mode, tunnel in tunnels.items():
            assert exchange(users[mode], tunnel.public[0], b"again", tries=3) == b"again"
        assert len(set(udp_echo.sources) - first_sources) == 2, "the next datagram did not start new flows"
    finally:
        for user in users.values():
            user.close()


# ------------------------------------------------------------------------------------------------
# a flood of source addresses

FLOOD = 10_000
CAP = 64


def flood(port: int, count: int) -> None:
    """One datagram from each of ``count`` addresses 127.1.x.y (loopback is all of 127/8)."""
    for n in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((f"127.1.{n >> 8 & 255}.{n & 255 or 1}" if n < 65536 else HOST, 0))
            sock.sendto(b"flood", (HOST, port))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_a_flood_of_sources_stays_within_the_cap(launcher, mode):
    """Catches: a flow per source without bound (fds, memory), and flows in use evicted by a
    flood of one-datagram sources: 10,000 sources against udp_max_flows = 64."""
    echo = UdpEcho(watch=b"user ")
    tunnel = udp_tunnel(launcher, mode, [str(echo.port)], server_extra={"udp_max_flows": CAP, "channel_size": 256,
                                                                         "log_level": "debug"},
                        client_extra={"log_level": "debug"})
    public = tunnel.public[0]
    users = [user_socket() for _ in range(4)]
    stop = threading.Event()
    flooding = threading.Event()
    answered: collections.Counter[int] = collections.Counter()

    def keep_talking(n: int, user: socket.socket) -> None:
        while not stop.is_set():
            if exchange(user, public, f"user {n}".encode(), timeout=2.0) is not None and flooding.is_set():
                answered[n] += 1
            time.sleep(0.01)

    talkers = [threading.Thread(target=keep_talking, args=(n, u)) for n, u in enumerate(users)]
    try:
        for n, user in enumerate(users):   # flows in use: more than one datagram each
            for _ in range(2):
                assert exchange(user, public, f"user {n}".encode(), tries=3) is not None
        server_fds, client_fds = tunnel.server.fds(), tunnel.client.fds()
        for thread in talkers:
            thread.start()
        flooding.set()
        flood(public, FLOOD)
        wait_until(lambda: min(answered[n] for n in range(len(users))) >= 1, 10, "every user answered during the flood")
        flooding.clear()
        fds_after, client_fds_after = tunnel.server.fds(), tunnel.client.fds()
        stop.set()
        for thread in talkers:
            thread.join(10)
        line = tunnel.server.wait_for_log("to make room")
        assert "udp_max_flows" in line and "one datagram" in line, line
        # each flow holds at most one tunnel connection (tcp); idle ones are bounded by channel_size
        assert fds_after <= server_fds + CAP + 256 + 16, (server_fds, fds_after)
        # the client keeps at most 4096 links (two sockets each while a flow uses one)
        assert client_fds_after <= client_fds + 2 * 4096 + 16, (client_fds, client_fds_after)
        for n, user in enumerate(users):
            assert exchange(user, public, f"user {n}".encode(), tries=3) is not None
        # no user lost its flow to the flood (a flow of the tcp carrier may split when its answers
        # come late: the server is busy; a new flow then takes over, so the target sees a new source)
        evicted = [line for line in tunnel.server.lines("to make room") if f"flow of {HOST}:" in line]
        assert not evicted, evicted
        if mode == "udp":
            sources = collections.defaultdict(set)
            for data, source in echo.seen:
                sources[data].add(source)
            assert {data: len(s) for data, s in sources.items()} == {f"user {n}".encode(): 1 for n in range(4)}
        assert tunnel.server.alive() and tunnel.client.alive()
        assert not tunnel.server.lines("Traceback") and not tunnel.client.lines("Traceback")
    finally:
        stop.set()
        for thread in talkers:
            if thread.is_alive():
                thread.join(10)
        for user in users:
            user.close()
        echo.close()


def test_links_the_server_forgot_are_closed_by_the_client(launcher, udp_echo):
    """Catches: a udp client holding links the server refused (its idle pool was full) forever,
    until its cap of links is spent and no flow can start; and pinged links closed too."""
    tunnel = udp_tunnel(launcher, "udp", [str(udp_echo.port)],
                        server_extra={"channel_size": 2, "connection_pool": 2, "heartbeat": 1},
                        client_extra={"connection_pool": 8})
    refused = tunnel.server.wait_for_log("idle already (channel_size)")
    assert "closed UDP link from" in refused, refused
    line = tunnel.client.wait_for_log("idle UDP links the server no longer pings", timeout=30)
    assert "closed 6 idle UDP links" in line, line
    # The silence limit is 5 s here (heartbeat 1 s, at least 5 s): links are looked at every
    # 2.5 s. The two links the server keeps are pinged every second: they stay through 3 looks.
    time.sleep(7.5)
    assert len(tunnel.client.lines("no longer pings")) == 1, tunnel.client.log()
    with contextlib.closing(user_socket()) as user:
        assert exchange(user, tunnel.public[0], b"still works", tries=3) == b"still works"


def test_a_restarted_client_carries_the_flow_of_a_user_who_keeps_its_port(launcher, udp_echo):
    """The udp transport in replace mode: the client is killed and started again while a user
    goes on sending from the same port; within seconds its datagrams are answered through the new
    client, and the server says that it ended the flow of the client that left. Catches: the flow
    kept on the dead client's link address, refreshed by the user's own datagrams, so the user
    gets nothing back for good and nothing is logged."""
    tunnel = udp_tunnel(launcher, "udp", [str(udp_echo.port)])
    public = tunnel.public[0]
    with contextlib.closing(user_socket()) as user:
        assert exchange(user, public, b"before", tries=3) == b"before"
        assert tunnel.client is not None and tunnel.server is not None
        tunnel.client.kill()
        tunnel.server.wait_for_log("waiting for the client to reconnect")
        tunnel.start_client()
        tunnel.wait_connected(server_count=2)
        assert exchange(user, public, b"after", timeout=1.0, tries=10) == b"after", "the flow stayed dead"
        line = tunnel.server.wait_for_log("UDP flows carried by the client that left")
        assert "ended 1 UDP flows" in line, line
        assert len(set(udp_echo.sources)) == 2, "the answer did not come through the new client"


# ------------------------------------------------------------------------------------------------
# malformed frames on the tcp carrier

@contextlib.contextmanager
def fake_client(bind_port: int, token: str, links: int = 1) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A client that speaks the handshake by hand: (control channel, silent data connections)."""
    control = socket.create_connection((HOST, bind_port), timeout=IO_TIMEOUT)
    data: list[socket.socket] = []
    try:
        control.sendall(ltv(SG_CHAN, token.encode()))
        assert recv_exact(control, 3 + len(token)) == ltv(SG_CHAN, token.encode())
        assert recv_exact(control, 1) == bytes((SG_RTT,))
        control.sendall(bytes((SG_RTT,)))
        for _ in range(links):
            data.append(socket.create_connection((HOST, bind_port), timeout=IO_TIMEOUT))
            time.sleep(0.05)   # the server pools them in the order they come
        yield control, data
    finally:
        control.close()
        for sock in data:
            sock.close()


def stamp(late_ms: int = 0) -> int:
    """A frame's timestamp as the Go client makes it (unix ms mod 10 min), ``late_ms`` ago."""
    return (time.time_ns() // 1_000_000 - late_ms) % 600_000


def test_late_answers_move_the_user_to_a_new_flow(launcher):
    """Catches: the congestion flag of PROTOCOL.md 4.1 missing (a flow whose answers come 3 RTTs
    late keeps taking datagrams), or raised by a clock that differs between the hosts; and the old
    flow dropped before its answers are in."""
    bind_port, public = free_port(), free_port()
    token = "e2e-token"
    server = launcher.start("server", server_toml(bind_port, [f"{HOST}:{public}=7777"], token, accept_udp=True))
    server.wait_for_log(f"tunnel listening on {HOST}:{bind_port}")
    head = ltv(SG_UDP, b"7777")
    with fake_client(bind_port, token, links=2) as (control, (first, second)), \
            contextlib.closing(user_socket()) as user:
        server.wait_for_log("connected: control channel up")
        user.sendto(b"a", (HOST, public))
        assert recv_exact(first, len(head) + 3) == head + b"\x00\x01a"
        skew = 200_000   # this client's clock is 200 s behind: no congestion by itself
        for late in (0, 40, 900):   # within 1 s of the fastest (3 x Go's 100 ms, but at least 1 s)
            first.sendall(struct.pack(">IH", stamp(skew + late), 2) + b"ok")
            assert user.recv(100) == b"ok"
        user.sendto(b"b", (HOST, public))
        assert recv_exact(first, 3) == b"\x00\x01b", "the flow moved without being late"
        first.sendall(struct.pack(">IH", stamp(skew + 1_500), 4) + b"late")   # 1.5 s late
        assert user.recv(100) == b"late"
        user.sendto(b"c", (HOST, public))
        assert recv_exact(second, len(head) + 3) == head + b"\x00\x01c", "no new flow after late answers"
        control.settimeout(5)
        assert SG_CHAN in control.recv(100)
        first.sendall(struct.pack(">IH", stamp(skew), 5) + b"after")   # the old flow still answers
        assert user.recv(100) == b"after"
        second.settimeout(0.5)
        user.sendto(b"d", (HOST, public))
        assert recv_exact(second, 3) == b"\x00\x01d"
        first.settimeout(0.5)
        with pytest.raises(TimeoutError):
            first.recv(100)


def test_a_lying_frame_from_the_client_ends_only_that_flow(launcher):
    """Catches: a frame length past 16384 trusted by the server, or punished beyond its flow (the
    control channel, the port); also checks the server's bytes of a flow end to end."""
    bind_port, public = free_port(), free_port()
    token = "e2e-token"
    server = launcher.start("server", server_toml(bind_port, [f"{HOST}:{public}=7777"], token, accept_udp=True))
    server.wait_for_log(f"tunnel listening on {HOST}:{bind_port}")
    with fake_client(bind_port, token) as (control, (data,)), contextlib.closing(user_socket()) as user:
        server.wait_for_log("connected: control channel up")
        user.sendto(b"ping", (HOST, public))
        assert recv_exact(data, 3 + 4 + 2 + 4) == ltv(SG_UDP, b"7777") + b"\x00\x04ping"
        data.sendall(struct.pack(">IH", 0, 4) + b"pong")
        assert user.recv(100) == b"pong"
        data.sendall(struct.pack(">IH", 0, 16385) + b"z" * 100)
        line = server.wait_for_log("ended the UDP flow")
        assert f"user {HOST}:{user.getsockname()[1]} on UDP port {public}" in line, line
        assert "frame says 16385 bytes" in line, line
        data.settimeout(5)
        assert data.recv(100) == b"", "the data connection of the flow stayed open"
        # nothing else: the control channel lives, and the user's next datagram is a new flow
        user.sendto(b"again", (HOST, public))
        control.settimeout(5)
        assert SG_CHAN in control.recv(100)
        assert not server.lines("waiting for the client to reconnect")


def test_a_lying_frame_from_the_server_ends_only_that_flow(launcher, udp_echo):
    """Catches: the client trusting a frame length past 16384, or dropping its session for it."""
    token = "e2e-token"
    tunnel_port = socket.create_server((HOST, 0))
    tunnel_port.settimeout(IO_TIMEOUT)
    conns: list[socket.socket] = []
    try:
        client = launcher.start("client", client_toml(tunnel_port.getsockname()[1], token, connection_pool=1))
        control, _ = tunnel_port.accept()
        conns.append(control)
        control.settimeout(IO_TIMEOUT)
        assert recv_exact(control, 3 + len(token)) == ltv(SG_CHAN, token.encode())
        control.sendall(ltv(SG_CHAN, token.encode()))
        data, _ = tunnel_port.accept()
        conns.append(data)
        data.settimeout(IO_TIMEOUT)
        data.sendall(ltv(SG_UDP, str(udp_echo.port).encode()) + b"\x00\x05hello")
        stamp, size = struct.unpack(">IH", recv_exact(data, 6))
        assert size == 5 and recv_exact(data, 5) == b"hello"
        assert abs((time.time_ns() // 1_000_000) % 600_000 - stamp) < 5_000
        data.sendall(b"\xff\xff" + b"q" * 10)
        line = client.wait_for_log("ended the UDP flow")
        assert f"UDP target {udp_echo.port}" in line and "frame says 65535 bytes" in line, line
        assert data.recv(100) == b""
        time.sleep(0.5)
        assert client.alive() and not client.lines("lost the server"), client.log()
    finally:
        for conn in conns:
            conn.close()
        tunnel_port.close()


# ------------------------------------------------------------------------------------------------
# reload

@pytest.mark.parametrize("mode", MODES)
def test_reload_adds_and_removes_udp_ports_and_keeps_the_flows_of_the_others(launcher, udp_echo, mode):
    """Catches: UDP ports not following a reload (an added one silent, a removed one still
    answering), or a reload cutting the flow of a port it did not touch."""
    tunnel = udp_tunnel(launcher, mode, [str(udp_echo.port), str(udp_echo.port)])
    assert tunnel.server is not None
    kept, removed = tunnel.public
    added = free_port()
    with user_socket() as user:
        assert exchange(user, kept, b"kept before", tries=3) == b"kept before"
        assert exchange(user, removed, b"removed before", tries=3) == b"removed before"
        sources = set(udp_echo.sources)
        tunnel.server.config.write_text(tunnel.server_text.replace(
            f'"{HOST}:{removed}={udp_echo.port}"', f'"{HOST}:{added}={udp_echo.port}"'))
        tunnel.server.proc.send_signal(signal.SIGHUP)
        tunnel.server.wait_for_log(f"reloaded {tunnel.server.config}", timeout=5)
        assert exchange(user, kept, b"kept after") == b"kept after"
        assert set(udp_echo.sources) == sources, "the kept port's flow was cut: a new flow reached the target"
        assert exchange(user, added, b"added", tries=3) == b"added"
        assert exchange(user, removed, b"removed after", timeout=1) is None, "a removed UDP port still answers"
    tunnel.server.wait_for_log(f"stopped listening on UDP {HOST}:{removed}")
    assert "Traceback" not in tunnel.server.log()
