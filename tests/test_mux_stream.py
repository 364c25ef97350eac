"""The link conformance cases (tests/conformance.py) over an smux stream: two sessions of ours in
this process on one loopback connection (both say hello, so a reset crosses as one), as tcpmux's
server (the opener) and client hold them:
user <-> StreamRelay <-> MuxStream (opener) <=> MuxStream (acceptor) <-> StreamRelay <-> target."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backhaul.mux.session import MuxConnection, MuxSettings, MuxStream
from backhaul.relay.stream import StreamRelay
from tests import conformance

pytestmark = pytest.mark.timeout(60)


class MuxBench(conformance.Bench):
    """Every link one new stream of the same two sessions."""

    def __init__(self, version: int) -> None:
        super().__init__("stream")
        opener_sock, acceptor_sock = conformance.tcp_pair(self.listener)
        settings = MuxSettings(version, 32768, 4 << 20, 65536)
        self.accepted: list[MuxStream] = []   # reactor thread
        self.lost: list[str] = []

        def build() -> tuple[MuxConnection, MuxConnection]:
            opener = MuxConnection(self.reactor, opener_sock, "the acceptor", settings, opener=True,
                                   on_stream=None, on_lost=lambda _c, why: self.lost.append(why))
            acceptor = MuxConnection(self.reactor, acceptor_sock, "the opener", settings, opener=False,
                                     on_stream=self.accepted.append, on_lost=lambda _c, why: self.lost.append(why))
            opener.start()
            acceptor.start()
            return opener, acceptor

        self.opener, self.acceptor = self.on_reactor(build)

    def link(self) -> conformance.Link:
        user, near = conformance.tcp_pair(self.listener)
        far, target = conformance.tcp_pair(self.listener)
        self.sockets += [user, target]
        link = conformance.Link(user, target)

        def open_stream() -> MuxStream:
            stream = self.opener.open_stream()
            self.opener.flush()   # the SYN goes now
            return stream

        opened = self.on_reactor(open_stream)
        conformance.wait_until(lambda: self.on_reactor(lambda: bool(self.accepted)), "the stream to arrive")

        def build() -> None:
            accepted = self.accepted.pop(0)
            link.ends = (opened, accepted)  # type: ignore[assignment]
            link.relays = [StreamRelay(self.reactor, near, opened, on_close=lambda r: self._on_close(link, r)),
                           StreamRelay(self.reactor, far, accepted, on_close=lambda r: self._on_close(link, r))]
            self._start(link)

        self.on_reactor(build)
        self.links.append(link)
        user.settimeout(10)
        target.settimeout(10)
        return link

    def close(self) -> None:
        def abort_all() -> None:
            for relay in list(self.open):
                relay.abort()

        self.on_reactor(abort_all)
        conformance.wait_until(lambda: self.on_reactor(lambda: not self.open), "every relay to close")

        def end_sessions() -> None:
            self.opener.close()
            self.acceptor.close()

        self.on_reactor(end_sessions)
        super().close()


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def mux_bench(request: pytest.FixtureRequest) -> Iterator[MuxBench]:
    b = MuxBench(request.param)
    yield b
    b.close()


@pytest.mark.parametrize("case", [c for _, c in conformance.CASES], ids=[n for n, _ in conformance.CASES])
def test_relay_conformance_over_an_smux_stream(mux_bench: MuxBench, case) -> None:
    case(mux_bench)
    assert not mux_bench.lost, mux_bench.lost
