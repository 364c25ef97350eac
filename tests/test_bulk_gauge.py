"""The bulk gauge of an smux session (mux/bulk.py) on synthetic timelines, without sockets."""

from __future__ import annotations

import pytest

from backhaul.mux.bulk import BULK_BYTES, BULK_HOLD, BULK_WINDOW, BulkGauge

pytestmark = pytest.mark.timeout(10)

PACKET = 1448


def test_a_download_paced_at_a_path_rate_makes_the_session_busy_once() -> None:
    """100 Mbit/s arriving a packet at a time (no read ever fills a buffer): busy within a
    window, told once (not at every window it stays busy), quiet BULK_HOLD after it stops."""
    gauge = BulkGauge()
    rate = 100e6 / 8
    told = []
    now = 10.0
    while now < 13.0:
        if gauge.moved(PACKET, now):
            told.append(now)
        now += PACKET / rate
    assert len(told) == 1 and told[0] < 10.0 + BULK_WINDOW
    assert gauge.busy(now)
    assert gauge.busy(now + BULK_HOLD * 0.9)
    assert not gauge.busy(now + BULK_HOLD + 0.01)
    assert gauge.moved(BULK_BYTES, now + BULK_HOLD + 0.02)   # a new burst is told again


def test_interactive_traffic_never_makes_a_session_busy() -> None:
    """A shell or a game (a few KiB many times a second) and a burst under BULK_BYTES
    spread over windows: never busy."""
    gauge = BulkGauge()
    now = 0.0
    for _ in range(10_000):
        assert not gauge.moved(2048, now)
        now += 0.02   # 100 KiB/s
    assert not gauge.busy(now)
    gauge, half = BulkGauge(), BULK_BYTES // 2
    assert not gauge.moved(half, 0.0)
    assert not gauge.moved(half - 1, BULK_WINDOW / 2)
    assert not gauge.moved(half, BULK_WINDOW * 1.6)   # a new window: counted from zero
    assert not gauge.busy(BULK_WINDOW * 1.6)
    assert gauge.moved(half, BULK_WINDOW * 1.7)       # ... up to BULK_BYTES within it
