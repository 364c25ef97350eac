"""The idle links of one client on the server (tunnel/links.py), the part tcp, ws and udp share:
refusal past channel_size, watching before a user can take a link, pings, stale links, stop.
Without sockets: a reactor whose timers the test fires."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from backhaul.tunnel.links import IdleLinks

pytestmark = pytest.mark.timeout(10)

log = logging.getLogger("backhaul.test_idle_links")


class Timer:
    def __init__(self, delay: float, fn: Any, args: tuple) -> None:
        self.delay, self.fn, self.args, self.cancelled = delay, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self) -> None:
        self.timers: list[Timer] = []

    def call_later(self, delay: float, fn: Any, *args: Any) -> Timer:
        timer = Timer(delay, fn, args)
        self.timers.append(timer)
        return timer

    def fire(self, delay: float) -> None:
        """Run the live timers of ``delay`` (each once)."""
        due = [t for t in self.timers if t.delay == delay and not t.cancelled]
        self.timers = [t for t in self.timers if t not in due]
        for timer in due:
            timer.fn(*timer.args)


class Config:
    channel_size = 2
    connection_pool = 1
    heartbeat = 7.0


class Core:
    def __init__(self) -> None:
        self.reactor = Reactor()
        self.config = Config()
        self.events: list[str] = []

    def link_available(self) -> None:
        self.events.append("available")


class Link:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False


def make(core: Core, *, ping: bool = False, follow_demand: bool = True) -> IdleLinks[Link]:
    def close(link: Link) -> None:
        link.closed = True
        core.events.append(f"close {link.name}")

    def send_ping(link: Link) -> None:
        core.events.append(f"ping {link.name}")
        if link.name == "dies":   # a send that ends the link takes it out of the pool at once
            links.pool.remove(link)

    links: IdleLinks[Link] = IdleLinks(
        core, lambda n: core.events.append(f"ask {n}"), log, "data connection", close=close,  # type: ignore[arg-type]
        watch=lambda link: core.events.append(f"watch {link.name}"), peer=lambda link: f"peer of {link.name}",
        follow_demand=follow_demand, ping=send_ping if ping else None, stale=lambda link: link.closed)
    return links


def test_a_link_past_channel_size_is_closed_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    core = Core()
    links = make(core)
    with caplog.at_level(logging.WARNING, logger=log.name):
        for name in ("a", "b", "c"):
            links.keep(Link(name))
    assert core.events == ["watch a", "available", "watch b", "available", "close c"], "watched before offered"
    assert [r.getMessage() for r in caplog.records] == [
        "closed data connection from peer of c: 2 idle already (channel_size)"]
    assert links.idle() == 2


def test_idle_links_are_pinged_every_heartbeat_and_stop_closes_them() -> None:
    core = Core()
    core.config.channel_size = 3
    links = make(core, ping=True)
    links.start()
    for name in ("a", "dies", "b"):
        links.keep(Link(name))
    core.events.clear()
    core.reactor.fire(Config.heartbeat)
    assert core.events == ["ping a", "ping dies", "ping b"]
    assert links.idle() == 2
    core.reactor.fire(Config.heartbeat)
    assert core.events[3:] == ["ping a", "ping b"], "the ping timer is armed again"
    links.stop()
    assert core.events[5:] == ["close a", "close b"]
    assert all(t.cancelled for t in core.reactor.timers), "no timer outlives stop"
    assert links.idle() == 0


def test_a_link_without_pings_arms_no_heartbeat() -> None:
    core = Core()
    links = make(core)
    links.start()
    assert Config.heartbeat not in [t.delay for t in core.reactor.timers]
    links.stop()


def test_a_stale_link_is_never_handed_out() -> None:
    core = Core()
    links = make(core)
    first, second = Link("a"), Link("b")
    links.keep(first)
    links.keep(second)
    first.closed = True   # ended on its own, still in the pool
    assert links.take() is second
    assert links.take() is None


def test_only_a_pool_that_follows_demand_closes_idle_links_on_its_own() -> None:
    assert make(Core(), follow_demand=True).pool.retire is not None
    assert make(Core(), follow_demand=False).pool.retire is None
