"""UDP sockets on loopback: runs of datagrams sent in one call keep every boundary."""

from __future__ import annotations

import contextlib
import random
import socket

import pytest

from backhaul.udp.sockets import GSO_BYTES, GSO_SEGMENTS, Sender, runs

pytestmark = pytest.mark.timeout(10)


def test_runs_group_equal_sizes_then_one_shorter():
    sizes = [1400] * 3 + [700, 700, 1400, 0, 0, 5]
    datagrams = [bytes(n) for n in sizes]
    assert list(runs(datagrams)) == [(0, 4, 1400), (4, 5, 700), (5, 6, 1400), (6, 7, 0), (7, 8, 0), (8, 9, 5)]


def test_runs_stay_within_the_kernels_bounds():
    small = [b"x"] * (GSO_SEGMENTS + 5)
    assert [(a, b) for a, b, _ in runs(small)] == [(0, GSO_SEGMENTS), (GSO_SEGMENTS, GSO_SEGMENTS + 5)]
    big = [bytes(16384)] * 5
    per_call = GSO_BYTES // 16384
    assert [b - a for a, b, _ in runs(big)] == [per_call, 5 - per_call]


@pytest.mark.parametrize("connected", [True, False])
def test_many_keeps_each_datagram_whole_and_in_order(connected):
    """Catches: datagrams of a run merged or cut by the receiver, or sent out of order."""
    rng = random.Random(7)
    sizes = [1400] * 40 + [1] * 70 + [900, 900, 300] + [rng.randint(0, 16384) for _ in range(60)] + [16384] * 6
    datagrams = [rng.randbytes(n) for n in sizes]
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(2)
        sender = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        if connected:
            sender.connect(receiver.getsockname())
            Sender(sender, "test").many(datagrams)
        else:
            Sender(sender, "test").many(datagrams, receiver.getsockname())
        got = [receiver.recv(65536) for _ in datagrams]
    assert [len(g) for g in got] == sizes
    assert got == datagrams
