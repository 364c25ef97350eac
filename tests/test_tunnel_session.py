"""The client session skeleton every transport shares (tunnel/session.py), on a real reactor with
a real control connection (a socket pair): how it starts, how it ends on purpose and when the
server goes, what it tells the client, what it closes."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from backhaul.config import ClientConfig, parse
from backhaul.protocol.framing import SG_CLOSED
from backhaul.reactor import Reactor
from backhaul.tunnel.carrier import SocketCarrier
from backhaul.tunnel.core import ClientFlowLink, ClientLink, ClientSession
from backhaul.tunnel.session import TunnelSession
from tests.harness import client_toml, free_port, on_reactor, wait_until

pytestmark = pytest.mark.timeout(30)

POOL = 3


class PairSession(TunnelSession):
    """A session whose links are socket pairs: the far ends stand for the server's side."""

    def __init__(self, core: Core, sock: socket.socket) -> None:
        super().__init__(core, SocketCarrier(core.reactor, sock, "the server"), what="test link", most=8,
                         rtt_echo=True)
        self.links: list[socket.socket] = []
        self.far_ends: list[socket.socket] = []
        self.dials = 0

    def dial_link(self) -> None:
        self.dials += 1
        near, far = socket.socketpair()
        self.links.append(near)
        self.far_ends.append(far)
        self.pool.opened()

    def idle_links(self) -> int:
        return len(self.links)

    def open_links(self) -> int:
        return len(self.links)

    def close_links(self) -> None:
        for sock in self.links:
            sock.close()
        self.links.clear()


class Core:
    """The client's side of the contract: a config, the reactor, and what the session tells it."""

    def __init__(self, config: ClientConfig, reactor: Reactor) -> None:
        self.config = config
        self.reactor = reactor
        self.resolver = None
        self.ended: list[tuple[ClientSession, str]] = []

    def carry(self, link: ClientLink, target: str) -> None:
        raise AssertionError("no link of these tests carries a user")

    def carry_flow(self, link: ClientFlowLink, target: str) -> None:
        raise AssertionError("no link of these tests carries a flow")

    def session_ended(self, session: ClientSession, reason: str) -> None:
        self.ended.append((session, reason))



@pytest.fixture
def core(reactor: Reactor) -> Core:
    config = parse(client_toml(free_port(), connection_pool=POOL, aggressive_pool=False)).client
    assert config is not None
    return Core(config, reactor)


@pytest.fixture
def control() -> Iterator[tuple[socket.socket, socket.socket]]:
    near, far = socket.socketpair()
    near.setblocking(False)
    far.settimeout(5)
    yield near, far
    far.close()
    near.close()


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def far_ends_closed(session: PairSession) -> bool:
    for far in session.far_ends:
        far.settimeout(5)
        if far.recv(1):
            return False
    return True


def close_far_ends(session: PairSession) -> None:
    for far in session.far_ends:
        far.close()


def test_a_started_session_opens_its_pool_and_a_close_tells_the_server_and_the_client_once(
        core: Core, control: tuple[socket.socket, socket.socket]) -> None:
    """Catches: a pool not opened at the start, a closing signal not sent on a close asked for,
    links left open, the client told twice (or not) that the session ended."""
    near, far = control
    session = PairSession(core, near)
    try:
        on_reactor(core.reactor, session.start)
        wait_until(lambda: on_reactor(core.reactor, session.idle_links) == POOL, 5, "the first links")
        on_reactor(core.reactor, lambda: session.close("", notify=True))
        on_reactor(core.reactor, lambda: session.close("again", notify=True))
        assert read_to_eof(far).endswith(bytes((SG_CLOSED,)))
        assert far_ends_closed(session)
        assert core.ended == [(session, "")]
        assert on_reactor(core.reactor, session.idle_links) == 0
    finally:
        close_far_ends(session)


def test_a_session_closed_before_it_started_opens_nothing(core: Core,
                                                          control: tuple[socket.socket, socket.socket]) -> None:
    """Catches: a session closed before its start (a reload while it was dialed, a fail-back
    given up) that still opens links, or leaves its control connection open."""
    near, far = control
    session = PairSession(core, near)
    on_reactor(core.reactor, lambda: session.close("", notify=True))
    on_reactor(core.reactor, session.start)
    assert read_to_eof(far).endswith(bytes((SG_CLOSED,)))
    assert session.dials == 0
    assert core.ended == [(session, "")]


def test_a_lost_control_channel_ends_the_session_with_its_reason(core: Core,
                                                                 control: tuple[socket.socket, socket.socket]) -> None:
    """Catches: a session that outlives its control channel (links kept, more dialed), or that
    tells the client no reason, so that it would not reconnect."""
    near, far = control
    session = PairSession(core, near)
    try:
        on_reactor(core.reactor, session.start)
        wait_until(lambda: on_reactor(core.reactor, session.idle_links) == POOL, 5, "the first links")
        far.close()
        wait_until(lambda: core.ended, 5, "the session to end")
        [(ended, reason)] = core.ended
        assert ended is session and reason
        assert far_ends_closed(session)
        dials = session.dials
        on_reactor(core.reactor, lambda: session.pool.requested(2))
        assert session.dials == dials
    finally:
        close_far_ends(session)
