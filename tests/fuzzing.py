"""Bad input for the fuzz suite (tests/test_fuzz.py) and its long form (bench/fuzz.py): random and
mutated messages of every kind the program reads, and the codecs that read them, driven in this
process without sockets.

``Mutator`` makes inputs from a corpus of valid messages (bit flips, interesting bytes, length
fields off by a little or a lot, cuts, repeats, splices of two messages) or from nothing (random
bytes). Each entry of ``CODECS`` feeds one input to the code that parses that kind of message and
may raise only the program's own errors: anything else escaping is a bug the fuzz reports. A new
kind of input is one more entry. Standard library and the package only.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import fields

from backhaul.config import ClientConfig, ServerConfig, parse
from backhaul.errors import BackhaulError
from backhaul.protocol import auth
from backhaul.protocol import http_upgrade as http
from backhaul.protocol.control import ClientControl, ServerControl
from backhaul.protocol.framing import SG_CHAN, SG_TCP, SG_UDP, FrameReader, encode_ltv, encode_lv
from backhaul.protocol.handshake import client_accepts, server_accepts
from backhaul.protocol.smux import FIN, NOP, PSH, SYN, UPD, Session, encode_frame
from backhaul.protocol.target import resolve_target
from backhaul.protocol.udp_frames import MAX_DATAGRAM, CongestionWatch, FrameDecoder, encode_down, encode_up

INTERESTING = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0A, 0x0D, 0x20, 0x3A, 0x41, 0x45, 0x7F, 0x80, 0xFF)


class Mutator:
    """Inputs from a corpus of valid messages, one at a time; seeded, so a run can be repeated."""

    def __init__(self, corpus: list[bytes], seed: int, max_size: int = 4096) -> None:
        self.corpus = corpus
        self.rng = random.Random(seed)
        self.max_size = max_size

    def __call__(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.1 or not self.corpus:
            return rng.randbytes(rng.randint(0, 64 if rng.random() < 0.8 else 2048))
        data = bytearray(rng.choice(self.corpus))
        for _ in range(rng.randint(1, 4)):
            self._mutate(data)
        return bytes(data[:self.max_size])

    def _mutate(self, data: bytearray) -> None:
        rng = self.rng
        op = rng.randrange(8)
        if not data:
            data += rng.randbytes(rng.randint(1, 8))
            return
        at = rng.randrange(len(data))
        if op == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[at] = rng.choice(INTERESTING)
        elif op == 2:  # a length field: big-endian u16 at a frame start, or anywhere
            start = 0 if rng.random() < 0.5 else at
            value = rng.choice((0, 1, 0xFF, 0x100, 0x7FFF, 0xFFFF, len(data), len(data) + 1, max(0, len(data) - 4)))
            data[start:start + 2] = struct.pack(">H", value)[:len(data[start:start + 2])]
        elif op == 3:
            del data[at:at + rng.randint(1, 16)]
        elif op == 4:
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 5:
            end = min(len(data), at + rng.randint(1, 32))
            data[at:at] = data[at:end] * rng.randint(1, 4)
        elif op == 6:
            del data[rng.randint(0, len(data)):]
        else:
            other = rng.choice(self.corpus)
            data[at:] = other[rng.randrange(len(other) or 1):] if other else b""


def splits(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random places: readers must not care how bytes arrive."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 3)))) if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# ------------------------------------------------------------------------------------------------
# corpora: valid messages of each kind

TOKEN = "fuzz-token-not-the-real-one"
NONCE = bytes(range(32))


def handshake_corpus() -> list[bytes]:
    client = auth.ClientHandshake(TOKEN, NONCE)
    server = auth.ServerHandshake(TOKEN, bytes(range(32, 64)))
    hello = client.hello()
    challenge = server.challenge(hello[2], hello[3:])
    proof = client.answer(challenge[2], challenge[3:])
    server.check(proof[2], proof[3:])
    signer = client.welcome(server.welcome()[2], server.welcome()[3:])
    return [encode_ltv(SG_CHAN, TOKEN.encode()), encode_ltv(SG_CHAN, b"musix"), hello, challenge, proof,
            server.welcome(), signer.frame(), encode_ltv(SG_CHAN, b"") + b"\x06"]


def control_corpus() -> list[bytes]:
    return [b"\x00", b"\x01", b"\x01" * 8, b"\x06", b"\x03", b"\x00\x01\x06\x00", b"\x02"]


def target_corpus() -> list[bytes]:
    return [encode_ltv(SG_TCP, b"8443"), encode_ltv(SG_TCP, b"target.internal:5201"), encode_ltv(SG_UDP, b"32945"),
            encode_lv(b"8443"), encode_lv(b"127.0.0.2:80") + b"GET / HTTP/1.1\r\n\r\n"]


def smux_corpus() -> list[bytes]:
    frames = []
    for version in (1, 2):
        frames += [encode_frame(version, SYN, 3), encode_frame(version, PSH, 3, encode_lv(b"8443") + b"data"),
                   encode_frame(version, FIN, 3), encode_frame(version, NOP, 0),
                   encode_frame(version, UPD, 3, struct.pack("<II", 2, 65536)),
                   encode_frame(version, SYN, 5) + encode_frame(version, PSH, 5, b"x" * 100)]
    return frames


def udp_frames_corpus() -> list[bytes]:
    """Datagrams framed on a tcp data connection (accept_udp), both directions; the second byte
    of the first frame tells the decoder which direction (see feed_udp_frames)."""
    return [encode_down(b"ping") + encode_down(b""), encode_down(b"x" * 1000) * 3, encode_down(b"y" * MAX_DATAGRAM),
            encode_up(b"pong", 123_456) + encode_up(b"z" * 300, 599_999), encode_up(b"", 0),
            encode_up(b"w" * MAX_DATAGRAM, 1)]


def head_corpus(host: str = "tunnel.internal:3080") -> list[bytes]:
    key = bytes(range(16))
    heads = [http.client_request(host, http.CONTROL_PATH, TOKEN, http.USER_AGENTS[0], 1, key),
             http.client_request(host, http.data_path(7), TOKEN, http.USER_AGENTS[3], 7, key),
             http.upgrade_request(host, http.CONTROL_PATH, None, http.USER_AGENTS[1], 2, key),
             http.upgrade_request(host, http.data_path(9), "Backhaul-Link 1." + "ab" * 32, http.USER_AGENTS[2], 9, key),
             b"GET / HTTP/1.0\r\n\r\n", b"POST /channel HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"]
    return heads


def response_corpus() -> list[bytes]:
    return [http.accept_response("dGhlIHNhbXBsZSBub25jZQ=="), http.error_response(401), http.error_response(431),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]


def config_corpus() -> list[bytes]:
    return [b'[server]\nbind_addr = "0.0.0.0:3080"\ntransport = "tcpmux"\ntoken = "x"\nports = ["443", "80=1.1.1.1:80",'
            b' "500-600=5201"]\nmux_version = 2\nauth = "challenge"\n',
            b'[client]\nremote_addr = "[::1]:3080"\ntransport = "wss"\nforwarder = ["5201=10.0.0.9:9090"]\n'
            b'tls_pin = "' + b"ab:" * 31 + b'ab"\nedge_ip = "198.51.100.1"\n',
            b'[server]\nbind_addr = ":3080"\nheartbeat = 0\nchannel_size = 1\n[client]\nremote_addr = "h:1"\n']


# ------------------------------------------------------------------------------------------------
# the codecs, fed one input each; only BackhaulError (and its kin) may come out

def feed_handshake(data: bytes, rng: random.Random) -> None:
    reader = FrameReader(typed=True)
    for part in splits(rng, data):
        reader.feed(part)
    if reader.done:
        if reader.kind == SG_CHAN:
            server_accepts(reader, TOKEN)
        client_accepts(reader, TOKEN)
        server = auth.ServerHandshake(TOKEN, NONCE)
        client = auth.ClientHandshake(TOKEN, NONCE)
        checker = auth.LinkChecker(bytes(32))
        for call in (lambda: server.challenge(reader.kind, reader.payload),
                     lambda: server.check(reader.kind, reader.payload),
                     lambda: client.answer(reader.kind, reader.payload),
                     lambda: client.welcome(reader.kind, reader.payload),
                     lambda: checker.check_frame(reader.kind, reader.payload)):
            try:
                call()
            except BackhaulError:
                pass


def feed_control(data: bytes, rng: random.Random) -> None:
    client = ClientControl(0.0, rtt_echo=rng.random() < 0.5, beats=3, floor=5.0, heartbeat_echo=rng.random() < 0.5)
    server = ServerControl(40.0, 0.0, rtt_probe=True)
    now = 0.0
    for part in splits(rng, data):
        now += rng.random()
        server.receive(part, now)
        try:
            client.receive(part, now)
        except BackhaulError:
            return
        client.check(now)
        client.outgoing()


def feed_target(data: bytes, rng: random.Random) -> None:
    reader = FrameReader(typed=rng.random() < 0.5, max_length=0xFFFF)
    for part in splits(rng, data):
        reader.feed(part)
    if reader.done:
        resolve_target((reader.payload or b"").decode("utf-8", "replace"))


def feed_smux(data: bytes, rng: random.Random) -> None:
    version = rng.choice((1, 2))
    session = Session(version, rng.random() < 0.5, 32768, 1 << 20, 65536, max_streams=64)
    now = 0.0
    for part in splits(rng, data):
        now += rng.random() * 30
        for _ in session.receive(part, now):
            pass
        session.tick(now)
        for sid in list(session._streams):
            session.read(sid, 1 << 16)
        session.outgoing()


def feed_udp_frames(data: bytes, rng: random.Random) -> None:
    """Both decoders on the same bytes: every datagram they hand up fits, and the timestamps
    of the client's frames feed the congestion watch as the server does."""
    for timestamped in (False, True):
        decoder = FrameDecoder(timestamped)
        watch = CongestionWatch(rng.choice((0, 1, 40, 100)))
        for part in splits(rng, data):
            for payload in decoder.feed(part):
                if len(payload) > MAX_DATAGRAM:
                    raise AssertionError(f"a datagram of {len(payload)} bytes came out of the decoder")
            for stamp in decoder.timestamps:
                watch.congested(stamp, rng.randrange(1 << 42))
            if decoder.pending > MAX_DATAGRAM + 6:
                raise AssertionError(f"{decoder.pending} bytes held for one frame")


def feed_request(data: bytes, rng: random.Random) -> None:
    reader = http.RequestReader()
    request = None
    for part in splits(rng, data):
        request = reader.feed(part)
        if request is not None:
            break
    if request is not None:
        http.authorized(request, TOKEN)
        try:
            auth.LinkChecker(bytes(32)).check_authorization(request.authorization)
        except BackhaulError:
            pass
        http.accept_response(request.key)


def feed_response(data: bytes, rng: random.Random) -> None:
    reader = http.ResponseReader()
    for part in splits(rng, data):
        response = reader.feed(part)
        if response is not None:
            http.check_accept(response, "dGhlIHNhbXBsZSBub25jZQ==")
            return


_DERIVED = {"bind_host", "bind_port", "remote_host", "remote_port", "token_is_default", "token_source"}
SECTION_KEYS = {"server": [f.name for f in fields(ServerConfig) if f.name not in _DERIVED],
                "client": [f.name for f in fields(ClientConfig) if f.name not in _DERIVED]}
KEYS = SECTION_KEYS["server"] + SECTION_KEYS["client"] + ["bind_adr", "x", ""]
REQUIRED = {"server": 'bind_addr = "0.0.0.0:3080"', "client": 'remote_addr = "tunnel.internal:3080"'}


def toml_value(rng: random.Random, depth: int = 0) -> str:
    """A random TOML value of any type, often of a wrong one or out of range."""
    choice = rng.randrange(9 if depth < 2 else 6)
    if choice == 0:
        return str(rng.choice((0, 1, -1, 2**31, 2**63 - 1, -(2**63), 65535, 65536, rng.randint(-10**6, 10**6))))
    if choice == 1:
        return rng.choice(("true", "false"))
    if choice == 2:
        return rng.choice(("0.5", "-0.0", "inf", "nan", "1e300"))
    if choice == 3:
        return json.dumps(rng.choice(("", "tcp", "challenge", "token", "tunnel.internal:3080", "[::1]:80", "443-600=5201",
                                      "a" * 70000, "\u0000", "é:1", "0.0.0.0:0", "1=2=3", "debug")))
    if choice == 4:
        return json.dumps("".join(chr(rng.randint(1, 0x2FF)) for _ in range(rng.randint(0, 12))))
    if choice == 5:
        return "1979-05-27T07:32:00Z"
    if choice == 6:
        return "[" + ", ".join(toml_value(rng, depth + 1) for _ in range(rng.randint(0, 4))) + "]"
    if choice == 7:
        return "{" + ", ".join(f"{rng.choice(KEYS) or 'k'} = {toml_value(rng, depth + 1)}"
                               for _ in range(rng.randint(0, 3))) + "}"
    return json.dumps(str(rng.randint(0, 70000)))


def config_document(rng: random.Random) -> bytes:
    """A TOML file of [server] and/or [client] tables (rarely another) with the section's keys
    (and now and then another), random values of any type, the required key mostly right."""
    lines = []
    sections = rng.sample(("server", "client"), rng.randint(1, 2)) + (["other"] if rng.random() < 0.05 else [])
    for section in sections:
        lines.append(f"[{section}]")
        if section in REQUIRED and rng.random() < 0.7:
            lines.append(REQUIRED[section])
        keys = SECTION_KEYS.get(section, KEYS)
        for key in set(rng.choice(keys if rng.random() < 0.9 else KEYS) for _ in range(rng.randint(0, 4))):
            if key and not (section in REQUIRED and key in REQUIRED[section] and len(lines) > 1):
                lines.append(f"{key} = {toml_value(rng)}")
    return "\n".join(lines).encode()


def feed_config(data: bytes, rng: random.Random) -> None:
    if rng.random() < 0.5:
        data = config_document(rng)  # half the inputs valid TOML, to reach the checks of every key
    parse(data.decode("utf-8", "replace"), "fuzz.toml")


Feed = Callable[[bytes, random.Random], None]

# kind of input -> (corpus, the codec that reads it); a new kind is one more line
CODECS: dict[str, tuple[Callable[[], list[bytes]], Feed]] = {
    "handshake": (handshake_corpus, feed_handshake),
    "control": (control_corpus, feed_control),
    "target": (target_corpus, feed_target),
    "smux": (smux_corpus, feed_smux),
    "udp-frames": (udp_frames_corpus, feed_udp_frames),
    "http-request": (head_corpus, feed_request),
    "http-response": (response_corpus, feed_response),
    "toml": (config_corpus, feed_config),
}


def fuzz_codec(kind: str, count: int, seed: int) -> list[tuple[bytes, BaseException]]:
    """Feed ``count`` inputs of ``kind`` to its codec; the inputs that raised anything but the
    program's own errors, with what they raised."""
    corpus, feed = CODECS[kind]
    mutate = Mutator(corpus(), seed)
    rng = random.Random(seed + 1)
    crashes = []
    for _ in range(count):
        data = mutate()
        try:
            feed(data, rng)
        except BackhaulError:
            pass
        except Exception as exc:
            crashes.append((data, exc))
    return crashes
