"""The per-address limit of failed handshakes (tunnel/limiter.py), on a clock of the test's."""

from __future__ import annotations

import logging

import pytest

from backhaul.tunnel.limiter import HANDSHAKE_FAILURES, FailureLimiter

pytestmark = pytest.mark.timeout(10)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_refused_from_its_limit_to_the_end_of_its_window(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = FailureLimiter(limit=3, window=10.0, clock=clock)
    limited = HANDSHAKE_FAILURES.value("limited")
    with caplog.at_level(logging.WARNING, logger="backhaul.tunnel.limiter"):
        for _ in range(2):
            limiter.failed("192.0.2.1")
        assert not limiter.refuses("192.0.2.1")
        limiter.failed("192.0.2.1")
        assert limiter.refuses("192.0.2.1") and limiter.refuses("192.0.2.1")
        assert not limiter.refuses("192.0.2.2"), "another address pays for nothing"
        limiter.failed("192.0.2.1")  # past the limit: no second line
        clock.now += 9.9
        assert limiter.refuses("192.0.2.1")
        clock.now += 0.2
        assert not limiter.refuses("192.0.2.1"), "the window ended"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refusing connections from 192.0.2.1 for 10 s: 3 failed handshakes within 10 s"], lines
    assert HANDSHAKE_FAILURES.value("limited") == limited + 3


def test_the_table_of_addresses_is_bounded_oldest_out() -> None:
    clock = Clock()
    limiter = FailureLimiter(limit=2, window=10.0, max_sources=100, clock=clock)
    limiter.failed("10.0.0.1")
    limiter.failed("10.0.0.1")
    for i in range(150):
        limiter.failed(f"10.1.0.{i}")
    assert len(limiter) == 100
    assert not limiter.refuses("10.0.0.1"), "the oldest address was forgotten first"


def test_many_addresses_crossing_at_once_cost_a_line_a_second(caplog: pytest.LogCaptureFixture) -> None:
    limiter = FailureLimiter(limit=1, window=10.0)
    with caplog.at_level(logging.WARNING, logger="backhaul.tunnel.limiter"):
        for i in range(50):
            limiter.failed(f"10.2.0.{i}")
    assert len(caplog.records) == 1


def test_an_exempt_address_is_never_refused_and_the_line_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """The address of a client of the tunnel is exempt: 500 failures are all judged, and the one
    line at the limit says that, instead of claiming a refusal that never happens."""
    clock = Clock()
    limiter = FailureLimiter(limit=20, window=10.0, clock=clock, exempt=lambda ip: ip == "192.0.2.7")
    with caplog.at_level(logging.WARNING, logger="backhaul.tunnel.limiter"):
        for _ in range(500):
            assert not limiter.refuses("192.0.2.7")
            limiter.failed("192.0.2.7")
        for _ in range(20):
            limiter.failed("192.0.2.8")   # its line falls in the same second: held by the throttle
        assert limiter.refuses("192.0.2.8"), "an address that is not exempt is still held back"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["20 failed handshakes within 10 s from 192.0.2.7, the address of a client of this tunnel: "
                     "not refused, each is judged"], lines
