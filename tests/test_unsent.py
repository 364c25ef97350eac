"""The unsent queue of an smux session's socket (backhaul/mux/unsent.py): its size from the pacing
rate, bbr's startup read from TCP_CC_INFO bytes, and the limit on real loopback sockets."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from backhaul.mux import unsent
from backhaul.mux.unsent import LONG_PATH_ENV, MAX_UNSENT, MIN_UNSENT, UnsentLimit, bbr_in_startup, unsent_limit


def bbr_info(pacing_gain: int) -> bytes:
    """struct tcp_bbr_info: bw_lo, bw_hi, min_rtt (us), pacing_gain, cwnd_gain (1/256 units)."""
    return struct.pack("=5I", 12_500_000, 0, 100_000, pacing_gain, 512)


@pytest.mark.parametrize("gain, startup", [(739, True), (709, True), (320, False), (256, False), (192, False),
                                           (88, False)])
def test_bbr_startup_is_told_by_its_pacing_gain(gain: int, startup: bool) -> None:
    """Catches: drain (88), probing (320, 192) or cruising (256) taken for startup (v1's 2.89
    is 739, later versions' 2.77 is 709), which would leave a session's queue large for good."""
    assert bbr_in_startup(bbr_info(gain)) is startup


@pytest.mark.parametrize("info", [b"", b"\x00" * 16])
def test_what_is_not_bbr_is_never_in_startup(info: bytes) -> None:
    """cubic answers TCP_CC_INFO with nothing, vegas and dctcp with 16 bytes: none of them waits."""
    assert bbr_in_startup(info) is False


@pytest.mark.parametrize("rate, limit", [
    (12_500_000, 50_000),          # 100 Mbit/s: 4 ms of sending
    (1_250_000, MIN_UNSENT),       # 10 Mbit/s: 5 kB would leave a late reactor's path idle
    (1_250_000_000, MAX_UNSENT),   # 10 Gbit/s: bounded
    (0, MIN_UNSENT),
])
def test_the_limit_is_a_few_milliseconds_of_the_pacing_rate(rate: int, limit: int) -> None:
    assert unsent_limit(rate) == limit


@pytest.fixture
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def fill(sock: socket.socket) -> None:
    """Write until the socket takes no more (the peer does not read)."""
    sock.setblocking(False)
    chunk = b"\0" * 65536
    try:
        while True:
            sock.send(chunk)
    except BlockingIOError:
        return


def lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)


def available(name: str) -> bool:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as file:
            return name in file.read().split()
    except OSError:
        return False


def long_path_limit(monkeypatch: pytest.MonkeyPatch, sock: socket.socket, congestion: str) -> tuple[int, UnsentLimit]:
    """``sock`` with ``congestion``, taken for a long path (the threshold moved below loopback's):
    its unsent limit, started, and the TCP_NOTSENT_LOWAT it had before."""
    if not available(congestion):
        pytest.skip(f"the kernel has no {congestion}")
    monkeypatch.setattr(unsent, "LOWAT_RTT_US", 0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
    before = lowat(sock)
    limit = UnsentLimit(sock)
    limit.start()
    return before, limit


def test_a_short_path_keeps_the_hosts_queue(loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    """Loopback's round trip is microseconds: below LOWAT_RTT_US nothing is ever set."""
    client, _ = loopback_pair
    before = lowat(client)
    limit = UnsentLimit(client)
    limit.start()
    assert not limit.long_path
    fill(client)
    assert limit.full() == 0
    assert lowat(client) == before


def test_the_environment_may_make_loopback_a_long_path(monkeypatch: pytest.MonkeyPatch,
                                                      loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    """LONG_PATH_ENV (for tests of whole processes) moves the threshold; a value that is not a
    number of microseconds is ignored."""
    client, _ = loopback_pair
    monkeypatch.setenv(LONG_PATH_ENV, "0")
    limit = UnsentLimit(client)
    limit.start()
    assert limit.long_path
    monkeypatch.setenv(LONG_PATH_ENV, "-5")
    limit = UnsentLimit(client)
    limit.start()
    assert not limit.long_path


def test_a_long_path_gets_a_limit_from_its_pacing_rate_once_full(monkeypatch: pytest.MonkeyPatch,
                                                                 loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    """Catches: no limit on a long path, a limit set before the socket was ever full, or one
    outside its bounds."""
    client, _ = loopback_pair
    before, limit = long_path_limit(monkeypatch, client, "cubic")
    assert lowat(client) == before      # nothing before the first full socket
    fill(client)
    got = limit.full()
    assert MIN_UNSENT <= got <= MAX_UNSENT
    assert lowat(client) == got == limit.limit
    assert limit.full() == got          # looked at again only after LOOK_EVERY


def test_bbr_in_startup_keeps_the_hosts_queue(monkeypatch: pytest.MonkeyPatch,
                                              loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    """A fresh bbr socket is in startup: a small queue there would mark it application-limited
    and keep it in startup (pacing at 2.9 times the path's rate)."""
    client, server = loopback_pair
    before, limit = long_path_limit(monkeypatch, client, "bbr")
    fill(client)
    server.recv(65536)   # an ACK or two: bbr's first samples, still in startup
    fill(client)
    info = client.getsockopt(socket.IPPROTO_TCP, unsent.TCP_CC_INFO, 20)
    if not bbr_in_startup(info):
        pytest.skip("bbr left startup on loopback already")
    assert limit.full() == 0
    assert lowat(client) == before
