"""The fault proxy of the fault suites, on its own: what each fault does to real connections."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import time
from collections.abc import Iterator

import pytest

from tests import harness
from tests.faultproxy import FaultProxy
from tests.harness import HOST, Service, closed_by_peer, echo_works, recv_all, recv_exact, wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def proxy(echo_service: Service) -> Iterator[FaultProxy]:
    with FaultProxy(echo_service.port) as fp:
        yield fp


def test_jitter_keeps_each_connection_exact_and_in_order(proxy: FaultProxy) -> None:
    proxy.delay(0.0, jitter=0.02)
    for seed in range(3):
        echo_works(proxy.port, size=300_000, seed=seed)
    assert proxy.accepted == 3


def test_delay_holds_every_chunk(proxy: FaultProxy) -> None:
    proxy.delay(0.3)
    with socket.create_connection((HOST, proxy.port), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exact(sock, 4) == b"ping"
        took = time.monotonic() - start
    assert 0.55 < took < 2.0, took  # there and back: two delays


def test_throttle_bounds_the_rate(proxy: FaultProxy) -> None:
    proxy.throttle(100_000)
    start = time.monotonic()
    echo_works(proxy.port, size=100_000, seed=4)
    took = time.monotonic() - start
    assert took > 0.8, took


def test_blackhole_holds_bytes_and_heal_delivers_them(proxy: FaultProxy) -> None:
    with socket.create_connection((HOST, proxy.port), timeout=5) as old:
        assert echo_roundtrip_once(old, b"before")
        proxy.blackhole()
        old.sendall(b"during")
        with socket.create_connection((HOST, proxy.port), timeout=5) as new:  # accepted, held
            new.sendall(b"new one")
            gave_up = socket.create_connection((HOST, proxy.port), timeout=5)
            gave_up.sendall(b"gone")
            gave_up.close()
            old.settimeout(0.5)
            with pytest.raises(TimeoutError):
                old.recv(100)
            proxy.heal()
            old.settimeout(5)
            new.settimeout(5)
            assert recv_exact(old, 6) == b"during"
            assert recv_exact(new, 7) == b"new one"
    wait_until(lambda: not proxy.live(), 5, "the proxy to close both connections")
    assert len(proxy.pairs) == 3 and proxy.pairs[2].up is None, "a connection given up reached the server"


def echo_roundtrip_once(sock: socket.socket, data: bytes) -> bool:
    sock.sendall(data)
    return recv_exact(sock, len(data)) == data


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_cut_closes_every_connection_and_refuses_new_ones_until_heal(proxy: FaultProxy, rst: bool) -> None:
    with socket.create_connection((HOST, proxy.port), timeout=5) as sock:
        assert echo_roundtrip_once(sock, b"x")
        proxy.cut(rst=rst)
        if rst:
            with pytest.raises(ConnectionResetError):
                recv_all(sock)
        else:
            assert recv_all(sock) == b""
    try:
        with socket.create_connection((HOST, proxy.port), timeout=5) as refused:
            assert closed_by_peer(refused, timeout=5)
    except ConnectionResetError:
        assert rst, "a FIN cut reset a new connection"  # the reset may come before connect() returns
    proxy.heal()
    payload = random.Random(5).randbytes(50_000)
    with socket.create_connection((HOST, proxy.port), timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert hashlib.sha256(recv_all(sock)).digest() == hashlib.sha256(payload).digest()


def test_cut_of_one_connection_leaves_the_others(proxy: FaultProxy) -> None:
    with socket.create_connection((HOST, proxy.port), timeout=5) as first, \
            socket.create_connection((HOST, proxy.port), timeout=5) as second:
        assert echo_roundtrip_once(first, b"1") and echo_roundtrip_once(second, b"2")
        proxy.cut(index=0)
        assert closed_by_peer(first, timeout=5)
        assert echo_roundtrip_once(second, b"still")


def test_udp_side_forwards_both_ways_per_client_and_a_fault_drops_datagrams() -> None:
    """With ``udp`` the proxy forwards datagrams on its port number to the UDP echo of the same
    number behind it, one upstream socket per client; a cut or a black hole drops them until heal."""
    echo = harness.UdpEcho()
    with contextlib.closing(echo), FaultProxy(echo.port, udp=True, record=1) as fp:
        users = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        try:
            for i, user in enumerate(users):
                user.settimeout(2)
                user.sendto(b"hello %d" % i, (HOST, fp.port))
                assert user.recv(100) == b"hello %d" % i
            assert len(echo.sources) == 2, "one upstream socket per client address"
            for fault in (lambda: fp.cut(), fp.blackhole):
                fault()
                users[0].settimeout(0.5)
                users[0].sendto(b"lost", (HOST, fp.port))
                with pytest.raises(TimeoutError):
                    users[0].recv(100)
                fp.heal()
                users[0].settimeout(2)
                users[0].sendto(b"back", (HOST, fp.port))
                assert users[0].recv(100) == b"back"
            assert fp.udp_dropped == 2 and fp.udp_seen[:2] == [b"hello 0", b"hello 1"]
        finally:
            for user in users:
                user.close()
