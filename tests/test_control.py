"""The control channel's state machines on exact bytes, with time as an argument; no sockets."""

from __future__ import annotations

import pytest

from backhaul.errors import ProtocolError
from backhaul.protocol.control import (
    ClientControl,
    Heartbeat,
    LinksRequested,
    PeerClosing,
    RttMeasured,
    ServerControl,
)

pytestmark = pytest.mark.timeout(10)


# --- server ---------------------------------------------------------------------------------------

def test_server_opens_with_the_rtt_probe_only_where_the_transport_has_one():
    assert ServerControl(40, 0.0, rtt_probe=True).outgoing() == b"\x06"
    assert ServerControl(40, 0.0, rtt_probe=False).outgoing() == b""


def test_server_heartbeats_on_its_period_and_not_before():
    control = ServerControl(40, 100.0, rtt_probe=False)
    assert control.next_deadline() == 140.0
    control.tick(139.9)
    assert control.outgoing() == b""
    control.tick(140.0)
    assert control.outgoing() == b"\x00"
    assert control.next_deadline() == 180.0


def test_server_requests_and_goodbye_in_order():
    control = ServerControl(40, 0.0, rtt_probe=True)
    control.request_links(3)
    control.close()
    assert control.outgoing() == b"\x06\x01\x01\x01\x03"
    assert control.outgoing() == b""


def test_server_measures_rtt_once_and_ignores_what_go_ignores():
    control = ServerControl(40, 10.0, rtt_probe=True)
    events = control.receive(b"\x00\x01\x7f\x06\x06", 10.025)
    assert len(events) == 1 and isinstance(events[0], RttMeasured)
    assert events[0].ms == pytest.approx(25.0)
    assert control.receive(b"\x06", 11.0) == []  # no probe out: an echo means nothing


def test_server_hears_the_clients_goodbye():
    control = ServerControl(40, 0.0, rtt_probe=False)
    events = control.receive(b"\x7f\x03", 1.0)
    assert [type(e) for e in events] == [PeerClosing]


# --- client -----------------------------------------------------------------------------------

MIN_SILENCE = 5.0


def client(rtt_echo: bool = True) -> ClientControl:
    return ClientControl(0.0, rtt_echo=rtt_echo, beats=3, floor=MIN_SILENCE)


def test_client_acts_on_the_captured_control_bytes():
    # Go server (vectors/tcp.txt): RTT probe, then requests and heartbeats.
    control = client()
    events = control.receive(bytes((0x06, 0x01, 0x01, 0x00, 0x01, 0x03)), 1.0)
    assert control.outgoing() == b"\x06"  # the RTT echo
    assert [type(e) for e in events] == [LinksRequested, Heartbeat, LinksRequested, PeerClosing]
    assert [e.count for e in events if isinstance(e, LinksRequested)] == [2, 1]


def test_client_refuses_unknown_control_byte():
    with pytest.raises(ProtocolError, match="unexpected control byte 0x02 from the server"):
        client().receive(b"\x01\x02", 1.0)


def test_tcpmux_client_treats_rtt_as_an_error_like_go():
    with pytest.raises(ProtocolError, match="0x06"):
        client(rtt_echo=False).receive(b"\x06", 1.0)


def test_client_never_cuts_for_silence_before_it_knows_the_servers_cadence():
    # A Go server may beat every 150 s; before its first heartbeat, nothing tells us it is late.
    control = client()
    assert control.silence_limit is None
    control.check(10_000.0)  # no error
    assert control.next_deadline() is None


def test_client_learns_a_slow_server_cadence_and_keeps_the_session():
    # Server heartbeat 150 s, our own config would say 40: the session must survive.
    control = client()
    for beat in range(1, 6):
        control.receive(b"\x00", 150.0 * beat)
        control.check(150.0 * beat + 149.0)
    assert control.silence_limit == 450.0


def test_client_finds_a_dead_server_after_three_of_its_heartbeats():
    control = client()
    control.receive(b"\x00", 30.0)
    control.receive(b"\x00", 60.0)
    assert control.next_deadline() == 60.0 + 90.0
    control.check(150.0)
    with pytest.raises(ProtocolError, match=r"silent for 91 s \(3 of its 30 s heartbeats\)"):
        control.check(151.0)


def test_other_bytes_count_as_life_but_not_as_cadence():
    control = client()
    control.receive(b"\x00", 2.0)          # cadence 2 s -> limit MIN_SILENCE
    control.receive(b"\x01", 2.0 + MIN_SILENCE - 1)
    control.check(2.0 + MIN_SILENCE + 1)   # heard a request 2 s ago: alive
    assert control.cadence == 2.0
    with pytest.raises(ProtocolError):
        control.check(2.0 + 2 * MIN_SILENCE + 2)


def test_a_faster_server_is_checked_at_its_own_pace():
    control = client()
    for t in (5.0, 10.0, 15.0):
        control.receive(b"\x00", t)
    assert control.silence_limit == 15.0
    with pytest.raises(ProtocolError):
        control.check(31.0)
