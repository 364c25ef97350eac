"""The tunnel port's gate (tunnel/gate.py): one account of a failed handshake (metric, limiter,
throttled line) and one answer to "is this address turned away", without sockets."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from backhaul.tunnel.gate import Gate
from backhaul.tunnel.limiter import HANDSHAKE_FAILURES, FailureLimiter
from backhaul.tunnel.pending import Pending, PendingSet

pytestmark = pytest.mark.timeout(10)


def limited_gate(limit: int, trusted: frozenset[str] = frozenset()) -> Gate:
    return Gate(lambda ip: ip in trusted, FailureLimiter(limit=limit, window=10.0, clock=lambda: 1000.0))


def test_a_failure_is_counted_told_to_the_limiter_and_said(caplog: pytest.LogCaptureFixture) -> None:
    gate = limited_gate(2)
    token, limited = HANDSHAKE_FAILURES.value("token"), HANDSHAKE_FAILURES.value("limited")
    with caplog.at_level(logging.WARNING, logger="backhaul.tunnel"):
        assert gate.admits("192.0.2.1")
        gate.failed("192.0.2.1", "token", "rejected client %s: %s", "192.0.2.1", "wrong token")
        assert gate.admits("192.0.2.1"), "one failure is under the limit"
        gate.failed("192.0.2.1", "token", "rejected client %s: %s", "192.0.2.1", "wrong token")
        assert not gate.admits("192.0.2.1")
        assert gate.admits("192.0.2.2"), "another address pays for nothing"
    assert HANDSHAKE_FAILURES.value("token") == token + 2
    assert HANDSHAKE_FAILURES.value("limited") == limited + 1
    lines = [r.getMessage() for r in caplog.records]
    # the second rejection falls in the same second as the first: held back by the throttle
    assert lines == ["rejected client 192.0.2.1: wrong token",
                     "refusing connections from 192.0.2.1 for 10 s: 2 failed handshakes within 10 s"], lines


def test_each_kind_has_its_own_line_a_second(caplog: pytest.LogCaptureFixture) -> None:
    gate = limited_gate(1000)
    with caplog.at_level(logging.WARNING, logger="backhaul.tunnel"):
        for _ in range(5):
            gate.failed("192.0.2.3", "garbage", "rejected client %s: %s", "192.0.2.3", "not a Backhaul handshake")
        gate.failed("192.0.2.3", "timeout", "rejected client %s: no handshake within %g s", "192.0.2.3", 2.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["rejected client 192.0.2.3: not a Backhaul handshake",
                     "rejected client 192.0.2.3: no handshake within 2 s"], lines


def test_trusted_and_proven_addresses_are_never_turned_away() -> None:
    gate = limited_gate(1, trusted=frozenset({"192.0.2.10"}))
    for ip in ("192.0.2.10", "192.0.2.11", "192.0.2.12"):
        gate.failed(ip, "closed", "rejected client %s", ip)
    gate.proven("192.0.2.11")
    assert gate.admits("192.0.2.10"), "a control channel's address"
    assert gate.admits("192.0.2.11"), "the last address that proved the token"
    assert not gate.admits("192.0.2.12")
    gate.proven("192.0.2.12")
    assert gate.admits("192.0.2.12") and not gate.admits("192.0.2.11"), "only the last proof counts"


def test_another_account_replaces_the_metric_and_line_but_not_the_limiter(caplog: pytest.LogCaptureFixture) -> None:
    gate = limited_gate(2)
    before = HANDSHAKE_FAILURES.value("not_a_link")
    said: list[tuple[object, ...]] = []
    with caplog.at_level(logging.WARNING, logger="backhaul.tunnel"):
        gate.failed("192.0.2.20", "not_a_link", "dropped a datagram from %s: %s", "192.0.2.20:9", "no token",
                    account=lambda *line: said.append(line))
    assert said == [("not_a_link", "dropped a datagram from %s: %s", "192.0.2.20:9", "no token")]
    assert HANDSHAKE_FAILURES.value("not_a_link") == before
    assert not caplog.records, "no line of the gate's own"
    gate.failed("192.0.2.20", "not_a_link", "dropped a datagram from %s: %s", "192.0.2.20:9", "no token",
                account=lambda *line: said.append(line))
    assert not gate.admits("192.0.2.20"), "the failures still count against their address"


class FakeTimer:
    def cancel(self) -> None:
        pass


class FakeReactor:
    """Just what a PendingSet asks of a reactor: deadlines that never fire, closes recorded."""

    def __init__(self) -> None:
        self.closed: list[Any] = []

    def call_later(self, _delay: float, _fn: Any, *_args: Any) -> FakeTimer:
        return FakeTimer()

    def close_socket(self, sock: Any) -> None:
        self.closed.append(sock)


def test_an_eviction_is_a_failure_of_the_evicted_address(caplog: pytest.LogCaptureFixture) -> None:
    reactor = FakeReactor()
    gate = limited_gate(2)
    pending: PendingSet[Pending] = PendingSet(reactor, "handshakes", 2.0, lambda _e: None, max_pending=100,
                                              per_source=1, gate=gate)  # type: ignore[arg-type]
    evicted = HANDSHAKE_FAILURES.value("evicted")
    with caplog.at_level(logging.WARNING, logger="backhaul.tunnel"):
        first, second, third = (Pending(object(), f"192.0.2.30:{n}", "192.0.2.30") for n in (1, 2, 3))  # type: ignore[arg-type]
        pending.add(first)
        pending.add(second)   # one per source: the first makes room
        pending.add(third)
    assert reactor.closed == [first.sock, second.sock]
    assert HANDSHAKE_FAILURES.value("evicted") == evicted + 2
    assert not gate.admits("192.0.2.30"), "two evictions reached the limit of two failures"
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("closed the oldest pending connection 192.0.2.30:1 to make room: "
                        "1 handshakes from 192.0.2.30 already pending"), lines
    pending.close()


def test_the_clients_links_have_a_cap_of_their_own_beside_strangers() -> None:
    """Catches: a tunnel's own links evicted by the shared cap (a pool asks for hundreds at once
    under load), or a stranger's flood pushing them out, or no bound on them at all."""
    reactor = FakeReactor()
    pending: PendingSet[Pending] = PendingSet(reactor, "upgrade heads", 2.0, lambda _e: None, max_pending=4,
                                              per_source=2, gate=limited_gate(100), max_trusted=6)  # type: ignore[arg-type]
    pending.trusted = frozenset({"192.0.2.40"})
    links = [Pending(object(), f"192.0.2.40:{n}", "192.0.2.40") for n in range(6)]  # type: ignore[arg-type]
    strangers = [Pending(object(), f"192.0.2.{50 + n}:1", f"192.0.2.{50 + n}") for n in range(5)]  # type: ignore[arg-type]
    for entry in links[:3] + strangers[:4] + links[3:]:
        pending.add(entry)
    assert reactor.closed == [], "six links (more than the per-source share) and four strangers fit"
    strangers[1].heard = True
    pending.add(strangers[4])
    assert reactor.closed == [strangers[0].sock], "the oldest silent stranger made room, never a link"
    late = Pending(object(), "192.0.2.40:99", "192.0.2.40")  # type: ignore[arg-type]
    pending.add(late)
    assert reactor.closed == [strangers[0].sock, links[0].sock], "past their own cap the oldest link makes room"
    assert len(pending) == 10
    pending.close()
