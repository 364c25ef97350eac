"""The fuzz suite: random and mutated input against every reader of the program.

- In this process, each codec of tests/fuzzing.py (handshake frames, control bytes, target
  headers, smux frames, HTTP upgrade heads and answers, TOML configs) meets ``CODEC_INPUTS``
  inputs and may raise only the program's own errors.
- Against a running server whose good client carries users all the while: bad handshakes (tcp,
  both auth modes), upgrade heads (ws, wss), WebSocket frames in a /channel's challenge (ws),
  smux frames on sessions (tcpmux). Each bad input must end its own connection, be accounted for
  in a log line (one a second per kind, with a count), and leave the good client working.
- Against a running client, from a server played by the test: target headers on its data
  connections, control bytes on its control channel, framed datagrams on an accept_udp flow.
- UDP: garbage datagrams to the udp transport's tunnel port (no token, the token with garbage
  after it, a forged link proof, oversize) from other addresses while a good client carries UDP
  flows; and against a udp transport client, target datagrams with garbage after the target.
- Bad config files through the command line: one line, exit 78, never a traceback.

The long form, 100,000 inputs and more, is bench/fuzz.py.
"""

from __future__ import annotations

import contextlib
import errno
import random
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

from backhaul.protocol import auth
from backhaul.protocol import http_upgrade as http
from backhaul.protocol.framing import SG_CHAN, SG_TCP, SG_UDP, FrameReader, encode_ltv
from backhaul.protocol.smux import PSH, SYN
from backhaul.protocol.target import resolve_target
from backhaul.protocol.udp_frames import MAX_DATAGRAM, FrameDecoder
from tests import fuzzing, harness
from tests.harness import (
    HOST,
    Backhaul,
    Launcher,
    Listener,
    Service,
    Tunnel,
    UdpEcho,
    client_toml,
    closed_by_peer,
    echo_works,
    exchange,
    free_port,
    ltv,
    recv_exact,
    server_toml,
    user_socket,
)
from tests.smux_peer import Frames, lv
from tests.ws_peer import tls_context

pytestmark = pytest.mark.timeout(120)


CODEC_INPUTS = 2000       # per codec, in this process
SERVER_INPUTS = 150       # per server target, through real sockets
CLIENT_INPUTS = 150       # target headers against a client
CONTROL_INPUTS = 3        # control bytes against a client: each one restarts its session (retry_interval)
CONFIG_INPUTS = 6         # bad config files through the command line
UDP_INPUTS = 600          # garbage datagrams to a udp transport server
UDP_CLIENT_INPUTS = 100   # framed datagrams, and target datagrams, against a client
TOKEN = "Fuzz-Good-Token-3a9c"
FAKE_TARGET = b"5201"       # the target the smux fuzz's server sends on each stream
CLOSE_BOUND = 5.0         # a bad input's connection is closed by then
ENDED = (errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET)


# ------------------------------------------------------------------------------------------------
# the codecs, in this process

@pytest.mark.parametrize("kind", list(fuzzing.CODECS))
def test_codecs_raise_only_their_own_errors(kind: str) -> None:
    crashes = fuzzing.fuzz_codec(kind, CODEC_INPUTS, seed=hash(kind) & 0xFFFF)
    shown = "\n".join(f"{type(exc).__name__}: {exc} <- {data[:100]!r}" for data, exc in crashes[:5])
    assert not crashes, f"{len(crashes)} of {CODEC_INPUTS} {kind} inputs crashed the codec:\n{shown}"


# ------------------------------------------------------------------------------------------------
# against a server

def source(i: int) -> str:
    """A fresh loopback address per input (each used once per 65,000): the per-address limit of
    failed handshakes must not be what closes the fuzz's connections."""
    return f"127.{1 + (i // 65000) % 200}.{(i // 250) % 256}.{i % 250 + 1}"


def masked(*messages: bytes) -> bytes:
    conn = Connection(ConnectionType.CLIENT)
    return b"".join(conn.send(BytesMessage(data=message)) for message in messages)


@dataclass
class ServerTarget:
    """One kind of bad input against a server: its corpus, how an input is delivered, and inputs
    that with the corpus end in every kind of refusal this target can cause (sent at the end, so
    each throttled count is written out)."""

    name: str
    transport: str
    auth: str
    corpus: Callable[[int], list[bytes]]
    deliver: str                      # raw | after-hello | ws-channel
    flush: Callable[[int], list[bytes]]


def _link_frame() -> bytes:
    return auth.LinkSigner(bytes(32)).frame()


SERVER_TARGETS = [
    ServerTarget("tcp-token-handshakes", "tcp", "token", lambda _p: fuzzing.handshake_corpus(), "raw",
                 lambda _p: [b"", b"\xff\xff\xff", encode_ltv(SG_CHAN, b"wrong"), auth.ClientHandshake(
                     "x", bytes(32)).hello()]),
    ServerTarget("tcp-challenge-handshakes", "tcp", "challenge", lambda _p: fuzzing.handshake_corpus(), "raw",
                 lambda _p: [b"", b"\xff\xff\xff", encode_ltv(SG_CHAN, b"wrong"), _link_frame()]),
    ServerTarget("tcp-challenge-proofs", "tcp", "challenge", lambda _p: fuzzing.handshake_corpus(), "after-hello",
                 lambda _p: [b"", b"\xff\xff\xff", encode_ltv(auth.PROOF, bytes(32))]),
    ServerTarget("ws-token-heads", "ws", "token", lambda p: fuzzing.head_corpus(f"{HOST}:{p}"), "raw",
                 lambda p: [b"", b"\xff\r\n\r\n", http.client_request(f"{HOST}:{p}", "/channel", "wrong",
                                                                      http.USER_AGENTS[0], 1, bytes(16)),
                            http.upgrade_request(f"{HOST}:{p}", "/channel", None, http.USER_AGENTS[0], 1, bytes(16))]),
    ServerTarget("wss-token-heads", "wss", "token", lambda p: fuzzing.head_corpus(f"{HOST}:{p}"), "raw",
                 lambda p: [b"", b"\xff\r\n\r\n", http.client_request(f"{HOST}:{p}", "/channel", "wrong",
                                                                      http.USER_AGENTS[0], 1, bytes(16))]),
    ServerTarget("ws-challenge-frames", "ws", "challenge",
                 lambda _p: [masked(auth.ClientHandshake("x", bytes(32)).hello()),
                             masked(auth.ClientHandshake("x", bytes(32)).hello(), encode_ltv(auth.PROOF, bytes(32))),
                             masked(b"\x00", b"\x01\x02")],
                 "ws-channel", lambda _p: [b"", b"\x88\x80\x00\x00\x00\x00", masked(b"\xff\xff\xff")]),
]


class GoodTraffic(threading.Thread):
    """Users through the good client, one after another, until stopped; ``one(seed)`` serves
    one and says what went wrong ("" when nothing did)."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.port = port
        self.done = 0
        self.failures: list[str] = []
        self._halt = threading.Event()
        self.start()

    def one(self, seed: int) -> str:
        raise NotImplementedError

    def run(self) -> None:
        seed = 0
        while not self._halt.is_set():
            seed += 1
            failure = self.one(seed)
            if failure:
                self.failures.append(failure)
            else:
                self.done += 1
            self._halt.wait(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


class GoodUsers(GoodTraffic):
    """TCP users, each sha256-checked."""

    def __init__(self, port: int) -> None:
        super().__init__(port, "good-users")

    def one(self, seed: int) -> str:
        try:
            echo_works(self.port, size=20_000, seed=seed)
        except (AssertionError, OSError) as exc:
            return f"user {seed}: {exc!r}"
        return ""


@contextlib.contextmanager
def tunnel_connection(transport: str, port: int, src: str) -> Iterator[socket.socket]:
    sock = socket.socket()
    try:
        sock.settimeout(CLOSE_BOUND)
        sock.bind((src, 0))
        sock.connect((HOST, port))
        if transport in ("wss", "wssmux"):
            sock = tls_context().wrap_socket(sock, server_hostname="localhost")
        yield sock
    finally:
        sock.close()


def send_and_wait(sock: socket.socket, data: bytes, rng: random.Random) -> str:
    """Send ``data`` in random pieces, end our side, and wait for the peer to end the connection:
    "" when it did (also while we were still sending), else what happened."""
    try:
        for part in fuzzing.splits(rng, data):
            sock.sendall(part)
        # A truncated message ends here, not at a deadline (TLS: a FIN without close_notify, which
        # the server reads as the end of the head too).
        sock.shutdown(socket.SHUT_WR)
    except ssl.SSLEOFError:
        return ""   # TLS: the server closed its socket (no close_notify) while we were still sending
    except OSError as exc:
        if exc.errno in ENDED:
            return ""
        raise
    return "" if closed_by_peer(sock, CLOSE_BOUND) else "not closed"


def deliver(target: ServerTarget, port: int, data: bytes, i: int, rng: random.Random) -> str:
    """One bad input on a connection of its own; "" when the server ended the connection."""
    try:
        with tunnel_connection(target.transport, port, source(i)) as sock:
            if target.deliver == "after-hello":
                sock.sendall(auth.ClientHandshake("x", bytes(32)).hello())
                recv_exact(sock, 35)
            elif target.deliver == "ws-channel":
                sock.sendall(http.upgrade_request(f"{HOST}:{port}", "/channel", None, http.USER_AGENTS[0], i,
                                                  bytes(16)))
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    assert chunk, "closed before the 101"
                    head += chunk
                assert head.startswith(b"HTTP/1.1 101 "), head[:40]
            return send_and_wait(sock, data, rng)
    except (ConnectionResetError, BrokenPipeError):
        return ""
    except (OSError, AssertionError) as exc:
        return f"{type(exc).__name__}: {exc}"


REFUSALS = ("rejected client", "rejected data connection", "smux session from")


def accounted(proc: Backhaul) -> int:
    """Bad inputs the log accounts for: one per refusal line, plus the count each one carries."""
    total = 0
    for line in proc.log().splitlines():
        if any(what in line for what in REFUSALS):
            held = re.search(r"\((\d+) more like it\)$", line)
            total += 1 + (int(held[1]) if held else 0)
    return total


def run_server_fuzz(launcher: Launcher, target: ServerTarget, count: int, echo_port: int, seed: int = 0,
                    workers: int = 1) -> dict[str, object]:
    """``count`` inputs of ``target`` against a server with a good client; returns the figures and
    the failures found (inputs whose connection stayed open, users that failed, a dead server)."""
    extra = {"auth": target.auth}
    tunnel = Tunnel(launcher, [str(echo_port)], TOKEN, transport=target.transport, label=target.name,
                    server_extra=extra, client_extra=extra).up()
    server, client = tunnel.server, tunnel.client
    assert server is not None and client is not None
    mutate = fuzzing.Mutator(target.corpus(tunnel.bind_port), seed)
    users = GoodUsers(tunnel.public[0])
    try:
        return _fuzz_with_users(target, tunnel, mutate, users, count, seed, workers)
    finally:
        users.stop()


def _fuzz_with_users(target: ServerTarget, tunnel: Tunnel, mutate: fuzzing.Mutator, users: GoodUsers, count: int,
                     seed: int, workers: int) -> dict[str, object]:
    server, client = tunnel.server, tunnel.client
    assert server is not None and client is not None
    failures: list[str] = []
    start = time.monotonic()
    lock = threading.Lock()
    counter = iter(range(count))

    def work(worker: int) -> None:
        rng = random.Random(seed * 1000 + worker)
        while True:
            with lock:
                i = next(counter, None)
                data = mutate() if i is not None else b""
            if i is None or not server.alive():
                return
            outcome = deliver(target, tunnel.bind_port, data, i, rng)
            if outcome:
                failures.append(f"input {i} {data[:80]!r}: {outcome}")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - start
    time.sleep(1.1)  # past every throttle's second: the next line of each kind carries its count
    flush = target.flush(tunnel.bind_port) + target.corpus(tunnel.bind_port)
    rng = random.Random(seed)
    for j, data in enumerate(flush):
        if deliver(target, tunnel.bind_port, data, count + j, rng):
            failures.append(f"flush input {data!r} was not refused")
    # The first flush input of each kind writes a line that carries the fuzz's held count of that
    # kind; the flush's own later inputs may stay held (no line of their kind follows them).
    sent = count + len(flush)
    deadline = time.monotonic() + 5
    while accounted(server) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    users.stop()
    logged = accounted(server)
    if not count <= logged <= sent:
        failures.append(f"{count} bad inputs (and {len(flush)} to flush the counts), {logged} accounted for in the log")
    failures += users.failures[:5]
    if not server.alive():
        failures.append("the server died")
    for proc in (server, client):
        if "Traceback" in proc.log():
            failures.append(f"{proc.name} logged a traceback")
    if len(client.lines("control channel up")) != 1:
        failures.append("the good client lost its session")
    return {"inputs": count, "seconds": took, "users": users.done, "failures": failures}


@pytest.mark.parametrize("target", SERVER_TARGETS, ids=[t.name for t in SERVER_TARGETS])
def test_bad_input_against_a_server_ends_only_its_connection(launcher: Launcher, echo_service: Service,
                                                              target: ServerTarget) -> None:
    result = run_server_fuzz(launcher, target, SERVER_INPUTS, echo_service.port)
    failures = result["failures"]
    assert isinstance(failures, list)
    assert not failures, "\n".join(failures[:20])
    assert isinstance(result["users"], int) and result["users"] > 0


# ------------------------------------------------------------------------------------------------
# smux frames against a tcpmux server: the test is the client (its sessions are the only ones)

def run_smux_fuzz(launcher: Launcher, count: int, seed: int = 5) -> dict[str, object]:
    """The test handshakes as the client, keeps one good session with a user's stream on it, and
    opens a session per bad input: each must end, the good stream must carry on both ways."""
    bind_port, public = free_port(), free_port()
    server = launcher.start("server-smux", server_toml(bind_port, [f"{HOST}:{public}={FAKE_TARGET.decode()}"], TOKEN,
                                                       transport="tcpmux", mux_con=64))
    server.wait_for_log(f"tcpmux tunnel listening on {HOST}:{bind_port}")
    mutate = fuzzing.Mutator(fuzzing.smux_corpus(), seed)
    rng = random.Random(seed)
    failures: list[str] = []
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        control = stack.enter_context(harness.connect(bind_port))
        control.sendall(ltv(SG_CHAN, TOKEN.encode()))
        recv_exact(control, 3 + len(TOKEN))
        good = Frames(stack.enter_context(harness.connect(bind_port)), 1)
        user = stack.enter_context(harness.connect(public))
        good.expect(SYN, 3)
        assert b"".join(good.read(3, 2 + len(FAKE_TARGET))) == lv(FAKE_TARGET)
        for i in range(count):
            data = mutate()
            with harness.connect(bind_port, timeout=CLOSE_BOUND) as bad:
                if send_and_wait(bad, data, rng):
                    failures.append(f"input {i} {data[:60]!r}: the session stayed open")
            if i % 25 == 0:  # the good stream, both ways
                payload = random.Random(i).randbytes(3000)
                user.sendall(payload)
                if b"".join(good.read(3, len(payload))) != payload:
                    failures.append(f"the good stream lost bytes after input {i}")
                good.send(PSH, 3, payload[::-1])
                if recv_exact(user, len(payload)) != payload[::-1]:
                    failures.append(f"the good stream lost bytes after input {i}")
        if server.lines("waiting for the client to reconnect"):  # checked before we close it
            failures.append("the control channel went down")
    if not server.alive() or "Traceback" in server.log():
        failures.append("the server died or logged a traceback")
    return {"inputs": count, "seconds": time.monotonic() - start, "failures": failures}


def test_bad_smux_frames_end_only_their_session(launcher: Launcher) -> None:
    failures = run_smux_fuzz(launcher, SERVER_INPUTS)["failures"]
    assert not failures, failures


# ------------------------------------------------------------------------------------------------
# against a client: the test plays the server

def safe_header(data: bytes, sink: int) -> bool:
    """False for a header the client would dial somewhere else than ``sink`` on loopback (a
    name to look up, another host or port): the fuzz must not reach beyond its own sockets."""
    reader = FrameReader(typed=True)
    reader.feed(data)
    if not reader.done or reader.kind != SG_TCP:
        return True
    try:
        host, port = resolve_target((reader.payload or b"").decode("utf-8", "replace"))
    except Exception:
        return True
    return host == HOST and port == sink


def fake_tcp_server(listener: Listener, token: str) -> socket.socket:
    control = listener.accept()
    assert recv_exact(control, 3 + len(token)) == encode_ltv(SG_CHAN, token.encode())
    control.sendall(encode_ltv(SG_CHAN, token.encode()))
    return control


def run_header_fuzz(launcher: Launcher, listener: Listener, count: int, seed: int = 9) -> dict[str, object]:
    """Each bad header on a data connection of a real client: that connection ends (its target,
    if it names one, is a sink of ours that closes at once), the control channel stays up, the
    client never dies."""
    failures: list[str] = []
    start = time.monotonic()
    with Service(lambda conn: None, "sink") as sink:
        client = launcher.start("client", client_toml(listener.port, TOKEN, connection_pool=1))
        control = fake_tcp_server(listener, TOKEN)
        mutate = fuzzing.Mutator([*fuzzing.target_corpus(), encode_ltv(SG_TCP, str(sink.port).encode())], seed)
        rng = random.Random(seed)
        link = listener.accept()
        for i in range(count):
            data = mutate()
            while not safe_header(data, sink.port):
                data = mutate()
            control.sendall(bytes((SG_CHAN,)))  # one more data connection for the next input
            if send_and_wait(link, data, rng):
                failures.append(f"input {i} {data[:60]!r}: the data connection stayed open")
            link.close()
            listener.accepted.remove(link)
            link = listener.accept()
        link.close()
        if not client.alive() or "Traceback" in client.log():
            failures.append("the client died or logged a traceback")
        if client.lines("lost the server"):
            failures.append("the control channel went down")
    return {"inputs": count, "seconds": time.monotonic() - start, "failures": failures}


def test_bad_target_headers_end_only_their_data_connection(launcher: Launcher, listener: Listener) -> None:
    failures = run_header_fuzz(launcher, listener, CLIENT_INPUTS)["failures"]
    assert not failures, failures


def test_bad_control_bytes_restart_the_session_with_a_line(launcher: Launcher, listener: Listener) -> None:
    client = launcher.start("client", client_toml(listener.port, TOKEN, connection_pool=0))
    rng = random.Random(3)
    for i in range(CONTROL_INPUTS):
        control = fake_tcp_server(listener, TOKEN)
        data = bytes((rng.choice([b for b in range(256) if b not in (0, 1, 2, 3, 6)]),)) + rng.randbytes(8)
        control.sendall(data)
        line = client.wait_for_log("lost the server", timeout=5, count=i + 1)
        assert f"unexpected control byte 0x{data[0]:02x} from the server" in line, line
        assert closed_by_peer(control, CLOSE_BOUND)
        control.close()
    assert client.alive() and "Traceback" not in client.log()


# ------------------------------------------------------------------------------------------------
# bad config files through the command line

def test_bad_config_files_get_one_line_and_exit_78(tmp_path) -> None:
    rng = random.Random(12)
    for i in range(CONFIG_INPUTS):
        data = fuzzing.config_document(rng)
        path = tmp_path / f"bad{i}.toml"
        path.write_bytes(data)
        done = subprocess.run([sys.executable, "-m", "backhaul", "-c", str(path), "--check"], cwd=harness.REPO,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode in (0, 78), (data, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        if done.returncode == 78:
            assert len(done.stderr.splitlines()) == 1, done.stderr


# ------------------------------------------------------------------------------------------------
# UDP: framed datagrams on the tcp carrier against a client

def run_udp_frames_fuzz(launcher: Launcher, listener: Listener, echo: UdpEcho, count: int,
                        seed: int = 11) -> dict[str, object]:
    """Each input on a data connection of a real client, after the SG_UDP header that makes it
    an accept_udp flow to a UDP echo: the datagrams of its whole frames come back (framed the
    other way), a frame longer than 16384 ends that connection; the control channel stays up."""
    failures: list[str] = []
    start = time.monotonic()
    client = launcher.start("client", client_toml(listener.port, TOKEN, connection_pool=1))
    control = fake_tcp_server(listener, TOKEN)
    mutate = fuzzing.Mutator(fuzzing.udp_frames_corpus(), seed)
    rng = random.Random(seed)
    header = encode_ltv(SG_UDP, str(echo.port).encode())
    link = listener.accept()
    for i in range(count):
        data = mutate()
        decoder = FrameDecoder(timestamped=False)
        try:
            expected, lying = decoder.feed(data), False
        except Exception:   # the program's own error: a frame past 16384
            expected, lying = [], True
        control.sendall(bytes((SG_CHAN,)))  # one more data connection for the next input
        try:
            for part in fuzzing.splits(rng, header + data):
                link.sendall(part)
            if lying:
                if not closed_by_peer(link, CLOSE_BOUND):
                    failures.append(f"input {i} {data[:60]!r}: a lying frame left its connection open")
            else:
                back = FrameDecoder(timestamped=True)
                got: list[bytes] = []
                link.settimeout(CLOSE_BOUND)
                while len(got) < len(expected):
                    chunk = link.recv(65536)
                    if not chunk:
                        break
                    got += back.feed(chunk)
                if got != expected:
                    failures.append(f"input {i} {data[:60]!r}: {len(got)} of {len(expected)} datagrams came back "
                                    "as sent")
        except OSError as exc:
            if not (lying and exc.errno in ENDED):   # a lie may end the connection while we send
                failures.append(f"input {i} {data[:60]!r}: {exc!r}")
        link.close()
        listener.accepted.remove(link)
        link = listener.accept()
    link.close()
    if not client.alive() or "Traceback" in client.log():
        failures.append("the client died or logged a traceback")
    if client.lines("lost the server"):
        failures.append("the control channel went down")
    return {"inputs": count, "seconds": time.monotonic() - start, "failures": failures}


def test_bad_udp_frames_end_only_their_flow(launcher: Launcher, listener: Listener, udp_echo: UdpEcho) -> None:
    failures = run_udp_frames_fuzz(launcher, listener, udp_echo, UDP_CLIENT_INPUTS)["failures"]
    assert not failures, failures


# ------------------------------------------------------------------------------------------------
# UDP: garbage datagrams to a udp transport server

class GoodFlows(GoodTraffic):
    """UDP users, each a new flow of a few datagrams."""

    def __init__(self, port: int) -> None:
        super().__init__(port, "good-flows")

    def one(self, seed: int) -> str:
        with contextlib.closing(user_socket()) as user:
            for k in range(3):
                payload = random.Random(seed * 10 + k).randbytes(1 + seed % 1400)
                if exchange(user, self.port, payload, timeout=2.0, tries=3) is None:
                    return f"flow {seed}: datagram {k} never came back"
        return ""


def udp_garbage_corpus(token: str) -> list[bytes]:
    signer = auth.LinkSigner(bytes(32))   # a session key that is not the server's
    return [token.encode(), token.encode() + b"\x00garbage", b"\x02", b"",
            signer.frame(), signer.frame() + b"tail", b"8443", encode_ltv(SG_CHAN, token.encode())]


def run_udp_datagram_fuzz(launcher: Launcher, echo_port: int, count: int, seed: int = 13,
                          mode: str = "token") -> dict[str, object]:
    """``count`` garbage datagrams to the UDP tunnel port of a udp transport server, from other
    addresses than its client's (every tenth one oversize), while the good client carries UDP
    users: none opens a link, the server says so in lines (one a second per kind), and the users
    keep working."""
    extra = {"auth": mode}
    tunnel = Tunnel(launcher, [str(echo_port)], TOKEN, transport="udp", label=f"udp-{mode}",
                    server_extra=extra, client_extra={**extra, "connection_pool": 4}).up()
    server = tunnel.server
    assert server is not None
    failures: list[str] = []
    start = time.monotonic()
    mutate = fuzzing.Mutator(udp_garbage_corpus(TOKEN), seed)
    rng = random.Random(seed)
    users = GoodFlows(tunnel.public[0])
    try:
        for i in range(count):
            data = rng.randbytes(rng.randint(MAX_DATAGRAM + 1, 65507)) if i % 10 == 9 else mutate()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((source(i // 4), 0))   # four from each address: the limit stays out of it
                sock.sendto(data, (HOST, tunnel.bind_port))
            if i % 50 == 49:
                time.sleep(0.05)   # a flood, but one the good users' datagrams still get through
        time.sleep(0.5)
    finally:
        users.stop()
    failures += users.failures
    if users.done < 3:
        failures.append(f"only {users.done} good flows during the fuzz")
    if not server.alive() or "Traceback" in server.log():
        failures.append("the server died or logged a traceback")
    if not server.lines("on the UDP tunnel port"):
        failures.append("no line about the garbage")
    if server.lines("waiting for the client to reconnect"):
        failures.append("the control channel went down")
    return {"inputs": count, "seconds": time.monotonic() - start, "failures": failures, "users": users.done}


@pytest.mark.parametrize("mode", ["token", "challenge"])
def test_garbage_datagrams_to_the_udp_tunnel_port_open_nothing(launcher: Launcher, udp_echo: UdpEcho,
                                                               mode: str) -> None:
    failures = run_udp_datagram_fuzz(launcher, udp_echo.port, UDP_INPUTS, mode=mode)["failures"]
    assert not failures, failures


# ------------------------------------------------------------------------------------------------
# UDP: target datagrams against a udp transport client

def safe_target(data: bytes, sink: int) -> bool:
    """False for a target the client would open a socket to elsewhere than ``sink`` on
    loopback, or look up: the fuzz stays within its own sockets."""
    try:
        host, port = resolve_target(data.decode("utf-8", "replace"))
    except Exception:
        return True
    return host == HOST and port == sink


@contextlib.contextmanager
def fake_udp_server(token: str) -> Iterator[tuple[int, socket.socket, socket.socket]]:
    """A udp transport server played by the test: its port (TCP and UDP), and once a client
    came, (port, control connection, UDP socket)."""
    for _ in range(50):
        tcp = socket.create_server((HOST, 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind((HOST, tcp.getsockname()[1]))
            break
        except OSError:
            tcp.close()
            udp.close()
    else:
        raise OSError("no port free for both TCP and UDP")
    try:
        udp.settimeout(CLOSE_BOUND)
        tcp.settimeout(CLOSE_BOUND)
        yield tcp.getsockname()[1], tcp, udp
    finally:
        tcp.close()
        udp.close()


def run_udp_target_fuzz(launcher: Launcher, echo: UdpEcho, count: int, seed: int = 17) -> dict[str, object]:
    """Each input is the datagram that gives a link of a real udp transport client its target:
    a good one, with garbage after it, garbage, oversize. The client carries the good ones and
    drops the others with a line; its control channel stays up, and a good target still works
    at the end."""
    failures: list[str] = []
    start = time.monotonic()
    good = str(echo.port).encode()
    corpus = [good, good + b"\x00junk", good + b" extra", b"127.0.0.1:" + good, good + b"\n" + good,
              b"x" * 2000]
    mutate = fuzzing.Mutator(corpus, seed)
    with fake_udp_server(TOKEN) as (port, tcp, udp):
        client = launcher.start("client", client_toml(port, TOKEN, transport="udp", connection_pool=1))
        control, _ = tcp.accept()
        with control:
            control.settimeout(CLOSE_BOUND)
            assert recv_exact(control, 3 + len(TOKEN)) == encode_ltv(SG_CHAN, TOKEN.encode())
            control.sendall(encode_ltv(SG_CHAN, TOKEN.encode()))

            links: set[tuple[str, int]] = set()

            def next_link() -> tuple[str, int]:
                while True:
                    data, addr = udp.recvfrom(65536)
                    if data == TOKEN.encode():   # first: a new link may reuse a closed one's port
                        links.add(addr)
                        return addr
                    if addr in links:
                        continue   # an echo through a link whose target was good
                    failures.append(f"a datagram from the client that opens no link: {data[:40]!r}")

            link = next_link()
            for i in range(count + 1):
                data = mutate() if i < count else good
                while not safe_target(data, echo.port):
                    data = mutate()
                if i % 10 == 9:
                    data = random.Random(i).randbytes(5000)
                control.sendall(bytes((SG_CHAN,)))   # one more link for the next input
                udp.sendto(data, link)
                udp.sendto(b"after the target", link)
                if i == count:   # the last one is good: the echo comes back through the link
                    try:
                        reply, addr = udp.recvfrom(65536)
                        while addr != link:
                            reply, addr = udp.recvfrom(65536)
                        if reply != b"after the target":
                            failures.append(f"a good target after the fuzz echoed {reply[:40]!r}")
                    except TimeoutError:
                        failures.append("a good target after the fuzz carried nothing")
                    break
                link = next_link()
            time.sleep(0.3)
            # checked while the control connection is still open: its close is a real loss
            if not client.alive() or "Traceback" in client.log():
                failures.append("the client died or logged a traceback")
            if client.lines("lost the server"):
                failures.append("the control channel went down")
    return {"inputs": count, "seconds": time.monotonic() - start, "failures": failures}


def test_bad_targets_end_only_their_udp_link(launcher: Launcher, udp_echo: UdpEcho) -> None:
    failures = run_udp_target_fuzz(launcher, udp_echo, UDP_CLIENT_INPUTS)["failures"]
    assert not failures, failures
