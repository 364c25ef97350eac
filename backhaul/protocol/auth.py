"""The authenticated handshake of ``auth = "challenge"`` (docs/auth.md), both sides, sans-IO.

Both ends prove they hold the token with HMAC-SHA256 over fresh nonces from both sides, and
neither sends it. The client proves first, so whoever can merely connect to a server learns no
proof to test token guesses against offline. Every data connection then carries a proof bound
to the control session (its key and a counter), so a connection from the client's address
without one, or with one seen before, is refused.

Frames are v0.7.2's LTV frames (backhaul/protocol/framing.py) with types outside v0.7.2's range.
Nothing here reads a socket or a clock: the callers own the deadlines and draw the nonces.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Callable, Iterable

from backhaul.errors import ProtocolError
from backhaul.protocol.framing import encode_ltv

HELLO = 0x41       # client -> server: Nc
CHALLENGE = 0x42   # server -> client: Ns
PROOF = 0x43       # client -> server: the client's proof
WELCOME = 0x44     # server -> client: the server's proof
LINK = 0x45        # client -> server, first on every data connection: n, the link proof

NONCE_SIZE = 32
MAC_SIZE = 32
LINK_PAYLOAD = 8 + MAC_SIZE
LINK_FRAME_SIZE = 3 + LINK_PAYLOAD    # 43 bytes: what a server reads before a link joins the pool
LINK_WINDOW = 4096                    # link numbers this far below the highest seen may still come
LINK_SCHEME = "Backhaul-Link"         # the Authorization scheme of a ws data connection

LABEL_CLIENT = b"backhaul auth 1 client"
LABEL_SERVER = b"backhaul auth 1 server"
LABEL_SESSION = b"backhaul auth 1 session"
LABEL_LINK = b"backhaul auth 1 link"

_U64 = struct.Struct(">Q")
_LINK_VALUE = re.compile(r"([1-9][0-9]{0,19})\.([0-9a-f]{64})")


class AuthError(ProtocolError):
    """The peer's side of the handshake is wrong: ``kind`` names how, for counting and logs."""

    def __init__(self, message: str, kind: str) -> None:
        self.kind = kind
        super().__init__(message)


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the parts' concatenation."""
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def _expect(kind: int | None, payload: bytes | None, wanted: int, size: int, name: str) -> bytes:
    if kind != wanted:
        got = "none" if kind is None else f"0x{kind:02x}"
        raise AuthError(f"expected a {name} frame (0x{wanted:02x}), got type {got}", "garbage")
    if payload is None or len(payload) != size:
        raise AuthError(f"a {name} frame of {len(payload or b'')} bytes, expected {size}", "garbage")
    return payload


def _nonce(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ProtocolError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}", remote=False)
    return nonce


class ClientHandshake:
    """The client's side: ``hello``, then ``answer`` the challenge, then check the ``welcome``."""

    __slots__ = ("_key", "_nc", "_ns")

    def __init__(self, token: str, nonce: bytes) -> None:
        self._key = token.encode()
        self._nc = _nonce(nonce)
        self._ns: bytes | None = None

    def hello(self) -> bytes:
        return encode_ltv(HELLO, self._nc)

    def answer(self, kind: int | None, payload: bytes | None) -> bytes:
        """The PROOF frame for the server's CHALLENGE frame; AuthError when it is not one."""
        self._ns = _expect(kind, payload, CHALLENGE, NONCE_SIZE, "CHALLENGE")
        return encode_ltv(PROOF, mac(self._key, LABEL_CLIENT, self._nc, self._ns))

    def welcome(self, kind: int | None, payload: bytes | None) -> LinkSigner:
        """Check the server's proof in WELCOME; the signer of this session's links. AuthError
        ("server") when the server could not prove the token."""
        if self._ns is None:
            raise ProtocolError("welcome() before answer()", remote=False)
        proof = _expect(kind, payload, WELCOME, MAC_SIZE, "WELCOME")
        if not hmac.compare_digest(proof, mac(self._key, LABEL_SERVER, self._nc, self._ns)):
            raise AuthError("the server could not prove the token", "server")
        return LinkSigner(mac(self._key, LABEL_SESSION, self._nc, self._ns))


class ServerHandshake:
    """The server's side: ``challenge`` the HELLO, ``check`` the PROOF, then send ``welcome``."""

    __slots__ = ("_key", "_nc", "_ns", "_proven")

    def __init__(self, token: str, nonce: bytes) -> None:
        self._key = token.encode()
        self._ns = _nonce(nonce)
        self._nc: bytes | None = None
        self._proven = False

    def challenge(self, kind: int | None, payload: bytes | None) -> bytes:
        """The CHALLENGE frame for the client's HELLO frame; AuthError when it is not one."""
        self._nc = _expect(kind, payload, HELLO, NONCE_SIZE, "HELLO")
        return encode_ltv(CHALLENGE, self._ns)

    def check(self, kind: int | None, payload: bytes | None) -> None:
        """Verify the client's PROOF (constant time); AuthError ("token") when it is wrong."""
        if self._nc is None:
            raise ProtocolError("check() before challenge()", remote=False)
        proof = _expect(kind, payload, PROOF, MAC_SIZE, "PROOF")
        if not hmac.compare_digest(proof, mac(self._key, LABEL_CLIENT, self._nc, self._ns)):
            raise AuthError("wrong token", "token")
        self._proven = True

    def welcome(self) -> bytes:
        """The WELCOME frame: our proof, sent only to a client that proved the token."""
        if not self._proven or self._nc is None:
            raise ProtocolError("welcome() before a valid proof", remote=False)
        return encode_ltv(WELCOME, mac(self._key, LABEL_SERVER, self._nc, self._ns))

    def links(self) -> LinkChecker:
        """The checker of this session's links (after a valid proof)."""
        if not self._proven or self._nc is None:
            raise ProtocolError("links() before a valid proof", remote=False)
        return LinkChecker(mac(self._key, LABEL_SESSION, self._nc, self._ns))


def link_proof(session_key: bytes, n: int) -> bytes:
    return mac(session_key, LABEL_LINK, _U64.pack(n))


class LinkSigner:
    """The client's proofs for the data connections of one control session, numbered from 1."""

    __slots__ = ("_key", "count")

    def __init__(self, session_key: bytes) -> None:
        self._key = session_key
        self.count = 0

    def _next(self) -> tuple[int, bytes]:
        self.count += 1
        return self.count, link_proof(self._key, self.count)

    def frame(self) -> bytes:
        """The LINK frame a tcp or tcpmux data connection sends first."""
        n, proof = self._next()
        return encode_ltv(LINK, _U64.pack(n) + proof)

    def authorization(self) -> str:
        """The Authorization value of a ws data connection's upgrade request."""
        n, proof = self._next()
        return f"{LINK_SCHEME} {n}.{proof.hex()}"


class LinkChecker:
    """The server's check of one session's link proofs: each number once, none older than
    LINK_WINDOW below the highest seen (links are dialed in parallel and arrive out of order)."""

    __slots__ = ("_key", "highest", "_seen")

    def __init__(self, session_key: bytes) -> None:
        self._key = session_key
        self.highest = 0
        self._seen = 0      # bit i: number highest - i has been used

    def check_frame(self, kind: int | None, payload: bytes | None) -> int:
        """The link number of a valid, unused LINK frame; AuthError ("link") otherwise."""
        if kind != LINK or payload is None or len(payload) != LINK_PAYLOAD:
            raise AuthError("not a link proof", "link")
        (n,) = _U64.unpack_from(payload)
        return self._check(n, payload[8:])

    def check_authorization(self, value: str | None) -> int:
        """The link number of a valid, unused ``Backhaul-Link`` Authorization value."""
        scheme, _, rest = (value or "").partition(" ")
        match = _LINK_VALUE.fullmatch(rest) if scheme == LINK_SCHEME else None
        if match is None:
            raise AuthError("no link proof", "link")
        n = int(match[1])
        if n >= 1 << 64:
            raise AuthError("a link number past 64 bits", "link")
        return self._check(n, bytes.fromhex(match[2]))

    def _check(self, n: int, proof: bytes) -> int:
        if not hmac.compare_digest(proof, link_proof(self._key, n)) or n == 0:
            raise AuthError("a link proof that does not verify in this session", "link")
        if n > self.highest:
            shift = n - self.highest
            self._seen = ((self._seen << shift) | 1) & ((1 << LINK_WINDOW) - 1) if shift < LINK_WINDOW else 1
            self.highest = n
            return n
        age = self.highest - n
        if age >= LINK_WINDOW:
            raise AuthError(f"link number {n} is older than the last {LINK_WINDOW}", "replay")
        if self._seen >> age & 1:
            raise AuthError(f"link number {n} was used already", "replay")
        self._seen |= 1 << age
        return n


def check_any(checkers: Iterable[LinkChecker], check: Callable[[LinkChecker], int]) -> int:
    """The link number ``check`` gets from the first session whose proof it is (two clients
    behind one address each have their own session). AuthError otherwise: a replay over a
    proof of no session, so the log names the worse."""
    failure: AuthError | None = None
    for links in checkers:
        try:
            return check(links)
        except AuthError as exc:
            if failure is None or exc.kind == "replay":
                failure = exc
    raise failure if failure is not None else AuthError("no session to prove a link to", "link")
