"""End to end over tcpmux v2 on a long path (a forwarder on loopback holds every chunk 50 ms each
way): the window the receiving side grants a download's stream starts at mux_streambuffer, as
smux's does, and grows while the user reads promptly; the UPD frames on the wire are smux's own;
every byte arrives, checked with sha256. Behaviour, not speed: what is checked is the windows
the receiver granted, read from the bytes that crossed the forwarder."""

from __future__ import annotations

import hashlib
import struct

import pytest

from backhaul.protocol.smux import UPD, FrameDecoder
from tests.faultproxy import FaultProxy
from tests.harness import HOST, Launcher, client_toml, connect, wait_until
from tests.mux_tunnels import TOKEN, Source, mux_tunnel

pytestmark = pytest.mark.timeout(120)


KiB = 1024
MiB = 1024 * KiB
DOWNLOAD = 8 * MiB
ONE_WAY = 0.05          # seconds each chunk waits in the forwarder, each way
STREAM_BUFFER = 65536   # mux_streambuffer, the default
RECORD = 256 * KiB      # bytes kept of each direction of each connection through the forwarder


def test_download_window_grows_on_a_long_path(launcher: Launcher) -> None:
    source = Source(DOWNLOAD, seed=21)
    settings = {"mux_version": 2, "connection_pool": 1, "mux_session": 1}
    tunnel = mux_tunnel(launcher, [str(source.service.port)], server={"mux_version": 2}, client=settings)
    tunnel.start_server()
    proxy = FaultProxy(tunnel.bind_port, record=RECORD)
    try:
        proxy.delay(ONE_WAY)
        tunnel.client_text = client_toml(proxy.port, TOKEN, transport="tcpmux", **settings)
        client = tunnel.start_client()
        client.wait_for_log(f"connected to server {HOST}:{proxy.port}: control channel up")
        wait_until(lambda: len(proxy.pairs) >= 2, 10, "the control channel and the session through the forwarder")
        digest, total = hashlib.sha256(), 0
        with connect(tunnel.public[0]) as user:
            while data := user.recv(MiB):
                digest.update(data)
                total += len(data)
        assert total == DOWNLOAD and digest.digest() == source.expected(), f"{total} bytes, sha256 differs"
        # The server received the download: its UPDs went to the client, on the session (pair 1).
        frames = FrameDecoder(2).feed(bytes(proxy.pairs[1].to_down.seen))
        updates = [struct.unpack("<II", f.payload) for f in frames if f.cmd == UPD]
        assert updates, "no UPD from the receiving side"
        consumed = [c for c, _w in updates]
        windows = [w for _c, w in updates]
        assert consumed == sorted(consumed) and len(set(consumed)) == len(consumed)
        assert windows[0] == STREAM_BUFFER, "the first grant is mux_streambuffer, as smux's"
        assert max(windows) > 4 * STREAM_BUFFER, f"the window did not grow: {sorted(set(windows))}"
        assert max(windows) <= 4 * MiB * 7 // 8, "one stream got more than seven eighths of the receive buffer"
        print(f"\nUPD windows granted (first {len(windows)} UPDs): start {windows[0]}, largest {max(windows)}")
        for proc in (tunnel.server, tunnel.client):
            assert proc is not None and "Traceback" not in proc.log()
    finally:
        proxy.close()
        source.service.close()
