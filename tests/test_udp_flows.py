"""The server's public UDP ports in this process: flows per address, the caps per port and in all,
and the metrics each limit counts. Real sockets on loopback, a real reactor."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from backhaul.config import parse
from backhaul.reactor import Reactor
from backhaul.udp.ports import EVICTED, Flow, UdpPorts
from backhaul.udp.relay import idle_seconds
from backhaul.udp.sockets import DROPPED, FLOWS
from tests.harness import HOST, free_port, wait_until

pytestmark = pytest.mark.timeout(20)


@contextlib.contextmanager
def public_ports(count: int, max_flows: int) -> Iterator[tuple[UdpPorts, list[int], list[Flow]]]:
    """``count`` public UDP ports with udp_max_flows = ``max_flows``, on a running reactor; the
    flows the core was handed."""
    ports = [free_port() for _ in range(count)]
    entries = ", ".join(f'"{HOST}:{p}=9"' for p in ports)
    config = parse(f'[server]\nbind_addr = "{HOST}:{free_port()}"\nudp_max_flows = {max_flows}\n'
                   f"ports = [{entries}]\n").server
    assert config is not None
    reactor = Reactor(workers=1)
    flows: list[Flow] = []
    udp = UdpPorts(reactor, config, flows.append)
    udp.open(config.ports)
    reactor.start()
    try:
        on_reactor(reactor, udp.start)
        yield udp, ports, flows
    finally:
        on_reactor(reactor, udp.close)
        reactor.stop()
        reactor.close()


def on_reactor(reactor: Reactor, fn: Callable[[], None]) -> None:
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        finally:
            done.set()

    reactor.call_soon(run)
    assert done.wait(5)


def send_from(source: str, port: int, payload: bytes = b"x") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.sendto(payload, (HOST, port))


def flows_gauge() -> float:
    return dict(FLOWS.samples()).get(("server",), 0)


def test_caps_per_port_and_in_all_are_counted():
    """Catches: a cap not enforced, the wrong flow making room, or a limit without its metric."""
    by_port, in_all = EVICTED.value("port"), EVICTED.value("total")
    with public_ports(3, max_flows=4) as (udp, (a, b, c), flows):
        assert udp.per_port == 2
        for n in range(3):                      # three sources on port a: one makes room
            send_from(f"127.3.0.{n + 1}", a)
        wait_until(lambda: len(flows) == 3, 5, "three flows on port a")
        assert EVICTED.value("port") == by_port + 1
        assert flows[0].closed and not flows[1].closed and not flows[2].closed   # the oldest went
        for n in range(2):
            send_from(f"127.3.1.{n + 1}", b)
        wait_until(lambda: len(flows) == 5, 5, "two flows on port b")
        assert udp.total == 4 and flows_gauge() >= 4
        send_from("127.3.2.1", c)               # 4 open in all: the fullest port makes room
        wait_until(lambda: len(flows) == 6, 5, "a flow on port c")
        assert EVICTED.value("total") == in_all + 1
        assert udp.total == 4
        assert len(udp.ports[2]) == 1 and len(udp.ports[0]) + len(udp.ports[1]) == 3


def test_a_flow_in_use_outlives_passing_ones():
    """Catches: eviction by age alone, which lets a flood of one-datagram sources push out the
    flows that carry traffic."""
    with public_ports(1, max_flows=3) as (udp, (port,), flows):
        send_from("127.4.0.1", port)
        wait_until(lambda: len(flows) == 1, 5, "the first flow")
        user = flows[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:   # a second datagram: in use
            sock.bind(("127.4.0.1", user.addr[1]))
            sock.sendto(b"again", (HOST, port))
        wait_until(lambda: user in udp.ports[0].flows, 5, "the flow to count as in use")
        for n in range(20):
            send_from(f"127.4.1.{n + 1}", port)
        wait_until(lambda: len(flows) == 21, 5, "twenty passing flows")
        assert not user.closed
        assert udp.total == 3


def test_a_datagram_past_16384_bytes_is_dropped_and_counted():
    before = DROPPED.value("too_large")
    with public_ports(1, max_flows=8) as (_udp, (port,), flows):
        send_from("127.5.0.1", port, bytes(16385))
        send_from("127.5.0.2", port, bytes(16384))
        wait_until(lambda: flows, 5, "the flow of the datagram that fits")
        assert DROPPED.value("too_large") == before + 1
        assert [f.addr[0] for f in flows] == ["127.5.0.2"]


@pytest.mark.parametrize(("value", "idle"), [(None, 60.0), ("", 60.0), ("8", 8.0), ("0.5", 0.5), ("86400", 86400.0),
                                             ("0", None), ("-3", None), ("86401", None), ("nan", None),
                                             ("inf", None), ("eight", None)])
def test_flows_end_after_60_idle_seconds_unless_the_environment_says(caplog, value, idle):
    """Catches: a default other than PROTOCOL.md's 60 s (the end-to-end test runs with a shorter
    BACKHAUL_UDP_IDLE), or a bad value used, or refused without a line naming it."""
    environ = {} if value is None else {"BACKHAUL_UDP_IDLE": value}
    with caplog.at_level(logging.WARNING, logger="backhaul.udp.relay"):
        assert idle_seconds(environ) == (60.0 if idle is None else idle)
    said = [record.getMessage() for record in caplog.records]
    if idle is None:
        assert said == [f"BACKHAUL_UDP_IDLE={value!r} is no number of seconds in (0, 86400]: UDP flows end "
                        "after 60 s idle"]
    else:
        assert not said
