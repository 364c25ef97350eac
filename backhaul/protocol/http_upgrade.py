"""The HTTP/1.1 upgrade head of the ws family (PROTOCOL.md 3.1), both sides, sans-IO.

We write and parse the head ourselves instead of using wsproto's handshake: the server must check
``Authorization: Bearer <token>`` in constant time and answer its own 401, bound the head in size,
route ``/channel`` against ``/tunnel/<N>``, and keep the bytes that follow the head in the same
read (on wsmux they are the first smux frames; on ws the first WebSocket frames). After the head
the caller hands those bytes on: to smux as they are, or to
``wsproto.connection.Connection(ConnectionType.SERVER or CLIENT, trailing_data=rest)``, which
starts in the open state and needs no handshake of its own.

Nothing here reads a socket or a clock: the caller owns the deadlines (Go allows 45 s).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import random
import re
from dataclasses import dataclass
from typing import NoReturn

from backhaul.errors import ProtocolError

HANDSHAKE_TIMEOUT = 45.0  # gorilla's Dialer and Upgrader in Backhaul both use 45 s
MAX_HEAD = 16384  # a Go client's head is under 500 bytes; Go's own server would allow 1 MiB
MAX_LINE = 8192
MAX_HEADERS = 100

CONTROL_PATH = "/channel"
DATA_PATH = "/tunnel"

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
# gorilla's Dialer offers this because Backhaul sets EnableCompression; the Go server never accepts it.
EXTENSIONS_OFFER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"

# The Go client's list, in its order (internal/utils/network/ws_dialer.go; its comment says 30, it holds 29).
USER_AGENTS: tuple[str, ...] = (
    # Chrome
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/114.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 11_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/113.0.0.0 "
    "Safari/537.36",
    "Mozilla/5.0 (Linux; Android 12; Pixel 5) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/115.0.0.0 "
    "Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/113.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 9; SM-G960F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/108.0.5359.128 "
    "Mobile Safari/537.36",
    # Firefox
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:114.0) Gecko/20100101 Firefox/114.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:102.0) Gecko/20100101 Firefox/102.0",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:115.0) Gecko/20100101 Firefox/115.0",
    "Mozilla/5.0 (Linux; Android 10; Pixel 4 XL) Gecko/20100101 Firefox/96.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 14_6 like Mac OS X) Gecko/20100101 Firefox/90.0",
    # Safari
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 11_4_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/15.0 "
    "Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 15_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/15.1 "
    "Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS 14_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/14.0 "
    "Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/13.1.2 "
    "Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/91.0.4472.124 "
    "Safari/537.36",
    # Edge
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/91.0.4472.124 "
    "Safari/537.36 Edg/91.0.864.64",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/95.0.4638.69 "
    "Safari/537.36 Edg/95.0.1020.40",
    "Mozilla/5.0 (Linux; Android 11; SM-G998U) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/90.0.4430.210 "
    "Mobile Safari/537.36 EdgA/46.3.4.5155",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/111.0.0.0 "
    "Safari/537.36 Edg/111.0.1661.44",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/115.0.0.0 "
    "Safari/537.36 Edg/115.0.1901.183",
    # Opera
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/112.0.0.0 "
    "Safari/537.36 OPR/97.0.4719.63",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/114.0.0.0 "
    "Safari/537.36 OPR/98.0.4759.15",
    "Mozilla/5.0 (Linux; Android 10; SM-N975F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/113.0.0.0 "
    "Mobile Safari/537.36 OPR/65.2.3381.61420",
    "Mozilla/5.0 (Linux; Android 11; SM-G998U) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/114.0.5735.196 "
    "Mobile Safari/537.36 OPR/71.2.3767.68577",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/116.0.0.0 Safari/537.36 "
    "OPR/99.0.4759.21",
    # Older browsers
    "Mozilla/4.0 (compatible; MSIE 9.0; Windows NT 6.1; Trident/5.0)",
    "Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1; SV1)",
    "Mozilla/5.0 (Windows NT 6.1; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/89.0.4389.82 "
    "Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_12_6) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/87.0.4280.88 "
    "Safari/537.36",
)

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) (HTTP/[0-9]\.[0-9])")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([\x20-\x7e\x80-\xff\t]*))?")
_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HT; a bare CR or LF inside a line is one
# A well-formed field line in one step: the name, and the value without the whitespace before it
# (every byte after the colon is HT or not a CTL, as _FORBIDDEN demands of the whole line).
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*)")
_VALUE_OK = re.compile(r"[\x20-\x7e\x80-\U0010ffff\t]*")
_PATH_OK = re.compile(r"/[\x21-\x7e]*")
_HOST_OK = re.compile(r"[\x21-\x7e]+")

# A client sends most of its lines unchanged on every connection (Host, User-Agent, Upgrade...):
# parsed once, they are looked up afterwards. Not the lines that differ per request, nor the
# token's, and at most MEMO_SIZE of them.
MEMO_SIZE = 256
_NOT_MEMOIZED = frozenset({"sec-websocket-key", "sec-websocket-accept", "x-user-id", "authorization"})
_FIELD_MEMO: dict[bytes, tuple[str, str]] = {}

# Fields that must not repeat: two Authorization or Key values would make "which one counts" a
# question an attacker could exploit; RFC 6455 forbids a repeated key, RFC 9112 a repeated Host.
_SINGLE = frozenset(
    {"host", "authorization", "sec-websocket-key", "sec-websocket-accept", "content-length", "x-user-id"}
)


class HeadTooLarge(ProtocolError):
    """The head, one of its lines, or its number of fields passed our limit.

    A server answers 431 (``status``).
    """

    status = 431


class BadRequest(ProtocolError):
    """The client's head is not an HTTP/1.1 WebSocket upgrade we accept.

    ``status`` is what to answer: 400, or 405 for a method other than GET (as gorilla does).
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class BadResponse(ProtocolError):
    """The server's answer is not a well-formed HTTP/1.x response head.

    Whether a well-formed answer accepts the upgrade is ``check_accept``'s question.
    """


# ---------------------------------------------------------------------- client side


def encode_key(raw: bytes) -> str:
    """The Sec-WebSocket-Key text for 16 random bytes."""
    if len(raw) != 16:
        raise ProtocolError(f"a WebSocket key is 16 bytes, not {len(raw)}", remote=False)
    return base64.b64encode(raw).decode("ascii")


def new_key_and_id(rng: random.Random) -> tuple[bytes, int]:
    """Fresh key bytes and user id for one dial, as the Go client draws them.

    The id is a non-negative int31 (Go's ``rand.Int31``). Pass ``backhaul.entropy.RANDOM`` in
    production and a seeded ``random.Random`` in tests. One draw for both.
    """
    drawn = rng.randbytes(20)
    return drawn[:16], int.from_bytes(drawn[16:], "big") >> 1


def pick_user_agent(rng: random.Random) -> str:
    """One of the Go client's User-Agent strings, uniformly, fresh for every connection."""
    return rng.choice(USER_AGENTS)


def data_path(user_id: int) -> str:
    """The data connections' path since v0.6.5: ``/tunnel/<N>``, N being the X-User-Id too."""
    return f"{DATA_PATH}/{user_id}"


def client_request(host: str, path: str, token: str, user_agent: str, user_id: int, key: bytes) -> bytes:
    """The GET upgrade head byte for byte as Go's net/http writes it for gorilla's Dialer.

    Host and User-Agent come first, then the other fields sorted by name (Go's ``Header.Write``).
    ``host`` is remote_addr as configured; ``key`` the 16 raw bytes (base64'd here).
    """
    return upgrade_request(host, path, f"Bearer {token}", user_agent, user_id, key, what="token")


def upgrade_request(host: str, path: str, authorization: str | None, user_agent: str, user_id: int, key: bytes,
                    *, what: str = "authorization") -> bytes:
    """``client_request`` with any Authorization value, or none (auth = "challenge": a link
    proof on /tunnel/<N>, nothing on /channel; docs/auth.md). ``what`` names the value in errors."""
    if not _PATH_OK.fullmatch(path):
        raise ProtocolError(f"path {path!r} is not an origin-form request target", remote=False)
    if user_id < 0:
        raise ProtocolError(f"user id {user_id} is negative", remote=False)
    _check_constant_fields(host, user_agent)
    # Go refuses to send a field value with a control character; so do we (no header injection).
    if authorization is not None and not _VALUE_OK.fullmatch(authorization):
        raise ProtocolError(f"the {what} holds a control character", remote=False)
    lines = (
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        f"User-Agent: {user_agent}",
        *([f"Authorization: {authorization}"] if authorization is not None else ()),
        "Connection: Upgrade",
        f"Sec-WebSocket-Extensions: {EXTENSIONS_OFFER}",
        f"Sec-WebSocket-Key: {encode_key(key)}",
        "Sec-WebSocket-Version: 13",
        "Upgrade: websocket",
        f"X-User-Id: {user_id}",
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@functools.lru_cache(maxsize=64)
def _check_constant_fields(host: str, user_agent: str) -> None:
    """The fields that stay the same over a client's dials, checked once (a ProtocolError is not
    cached: it comes again)."""
    if not _HOST_OK.fullmatch(host):
        raise ProtocolError(f"host {host!r} cannot go into a Host header", remote=False)
    if not _VALUE_OK.fullmatch(user_agent):
        raise ProtocolError("the user agent holds a control character", remote=False)


@dataclass(frozen=True, slots=True)
class Response:
    """A parsed response head and the bytes that came after it in the same reads.

    ``rest`` belongs to the next layer (smux on wsmux, WebSocket frames on ws) and must be kept.
    """

    status: int
    reason: str
    headers: dict[str, str]
    rest: bytes


class ResponseReader:
    """Client side: collects the server's answer until its blank line.

    ``feed`` returns None until the head is complete, then the Response; never feed it again after.
    """

    __slots__ = ("_head",)

    def __init__(self, max_head: int = MAX_HEAD, *, max_line: int = MAX_LINE, max_headers: int = MAX_HEADERS) -> None:
        self._head = _HeadCollector(max_head, max_line, max_headers, BadResponse, "response")

    def feed(self, data: bytes) -> Response | None:
        done = self._head.feed(data)
        if done is None:
            return None
        lines, rest = done
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise BadResponse(f"status line {_show(lines[0])} is not HTTP/1.x")
        headers = _parse_fields(lines[1:], BadResponse)
        return Response(int(match[1]), (match[2] or b"").decode("latin-1"), headers, rest)


def check_accept(response: Response, key: str) -> None:
    """Raise ProtocolError unless the response accepts our upgrade with ``key`` (the text sent).

    Checks what gorilla's Dialer checks (status, Upgrade, Connection, Sec-WebSocket-Accept), and
    also refuses an extension or subprotocol, which we never use and so could not honour.
    """
    if response.status == 401:
        raise ProtocolError("the server refused the token (401)")
    if response.status != 101:
        raise ProtocolError(f"the server answered {response.status} {response.reason} instead of 101")
    if not _has_token(response.headers, "upgrade", "websocket"):
        raise ProtocolError("the 101 response lacks 'Upgrade: websocket'")
    if not _has_token(response.headers, "connection", "upgrade"):
        raise ProtocolError("the 101 response lacks 'Connection: Upgrade'")
    got = response.headers.get("sec-websocket-accept")
    if got is None:
        raise ProtocolError("the 101 response lacks Sec-WebSocket-Accept")
    if got != accept_key(key):
        raise ProtocolError(f"Sec-WebSocket-Accept {got!r} does not match our key")
    for name in ("sec-websocket-extensions", "sec-websocket-protocol"):
        if name in response.headers:
            raise ProtocolError(f"the server chose {name} {response.headers[name]!r}, which we cannot honour")


# ---------------------------------------------------------------------- server side


@dataclass(frozen=True, slots=True)
class Request:
    """A valid upgrade request and the bytes that came after its head in the same reads.

    ``path`` is the request target up to any ``?``, not percent-decoded (Go decodes; a Go client
    never encodes). Header names are lower-case; repeated list fields are joined with ", ".
    """

    method: str
    path: str
    headers: dict[str, str]
    key: str
    authorization: str | None
    rest: bytes

    @property
    def route(self) -> str | None:
        return route(self.path)


class RequestReader:
    """Server side: collects and validates one client head until its blank line.

    ``feed`` returns None until the head is complete, then the Request; never feed it again after.
    """

    __slots__ = ("_head",)

    def __init__(self, max_head: int = MAX_HEAD, *, max_line: int = MAX_LINE, max_headers: int = MAX_HEADERS) -> None:
        self._head = _HeadCollector(max_head, max_line, max_headers, BadRequest, "request")

    def feed(self, data: bytes) -> Request | None:
        done = self._head.feed(data)
        if done is None:
            return None
        lines, rest = done
        return _parse_request(lines, rest)


def route(path: str) -> str | None:
    """``"control"`` for exactly /channel, ``"data"`` for any path starting /tunnel, else None.

    The prefix test is Go's (``/tunnelx`` counts, as ``/tunnel`` did before v0.6.5). On None the
    Go server upgrades and then leaves the connection open and unused; we answer 404 and close
    instead: no Go client asks for another path, and a prober should not get a free WebSocket
    that ties up a socket forever.
    """
    if path == CONTROL_PATH:
        return "control"
    if path.startswith(DATA_PATH):
        return "data"
    return None


def authorized(request: Request, token: str) -> bool:
    """True when Authorization is exactly ``Bearer <token>``; the comparison takes constant time.

    Go compares the first value with ``!=``; we refuse a repeated field outright (BadRequest).
    Whitespace around the value is not part of it (RFC 9110 OWS), as in Go.
    """
    expected = b"Bearer " + token.encode("utf-8")
    # The value was decoded as latin-1, so this gives back the bytes the peer sent.
    got = (request.authorization or "").encode("latin-1")
    return hmac.compare_digest(got, expected) and request.authorization is not None


def accept_key(key: str) -> str:
    """RFC 6455's Sec-WebSocket-Accept for a Sec-WebSocket-Key text."""
    digest = hashlib.sha1(key.encode("latin-1") + WS_GUID).digest()  # SHA-1 is what RFC 6455 prescribes
    return base64.b64encode(digest).decode("ascii")


def accept_response(key: str) -> bytes:
    """The 101 exactly as gorilla's Upgrader writes it (no extension: compression stays off)."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
    ).encode("ascii")


_ERRORS: dict[int, tuple[str, bytes]] = {
    400: ("Bad Request", b"Bad Request\n"),  # gorilla's handshake failure: http.Error(StatusText)
    401: ("Unauthorized", b"unauthorized\n"),  # Backhaul's http.Error(w, "unauthorized", 401)
    404: ("Not Found", b"404 page not found\n"),  # Go's http.NotFound
    405: ("Method Not Allowed", b"Method Not Allowed\n"),
    408: ("Request Timeout", b"Request Timeout\n"),
    431: ("Request Header Fields Too Large", b"Request Header Fields Too Large\n"),
}


def error_response(status: int, *, date: str | None = None) -> bytes:
    """A refusal shaped as Go's ``http.Error`` writes it, plus ``Connection: close``.

    Go keeps the connection open after a 401; we close it, so we say so. ``date`` (an IMF-fixdate
    such as ``email.utils.formatdate(usegmt=True)``) is the caller's, since we read no clock.
    """
    if status not in _ERRORS:
        raise ValueError(f"no error response for status {status}")
    reason, body = _ERRORS[status]
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain; charset=utf-8"]
    if status == 400:
        # gorilla sets it on every handshake failure; RFC 6455 4.4 asks for it on a version mismatch.
        lines.append("Sec-Websocket-Version: 13")
    lines.append("X-Content-Type-Options: nosniff")
    if date is not None:
        lines.append(f"Date: {date}")
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _parse_request(lines: list[bytes], rest: bytes) -> Request:
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadRequest(f"request line {_show(lines[0])} is malformed")
    method, target, version = (part.decode("ascii") for part in match.groups())
    if version != "HTTP/1.1":
        raise BadRequest(f"{version} is not HTTP/1.1")
    headers = _parse_fields(lines[1:], BadRequest)
    if method != "GET":
        raise BadRequest(f"method {method} is not GET", status=405)
    if not headers.get("host"):
        raise BadRequest("no Host field (HTTP/1.1 requires it)")
    # A body would make the bytes after the head ambiguous: body, or the upgraded stream?
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        raise BadRequest("an upgrade request must not carry a body")
    if not _has_token(headers, "connection", "upgrade"):
        raise BadRequest("'upgrade' not found in the Connection field")
    if not _has_token(headers, "upgrade", "websocket"):
        raise BadRequest("'websocket' not found in the Upgrade field")
    if not _has_token(headers, "sec-websocket-version", "13"):
        raise BadRequest("Sec-WebSocket-Version is not 13")
    key = headers.get("sec-websocket-key")
    if key is None:
        raise BadRequest("no Sec-WebSocket-Key field")
    if not _valid_key(key):
        raise BadRequest(f"Sec-WebSocket-Key {key!r} is not base64 of 16 bytes")
    return Request(method, target.partition("?")[0], headers, key, headers.get("authorization"), rest)


def _valid_key(key: str) -> bool:
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key.encode("latin-1"), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _parse_fields(lines: list[bytes], error: type[ProtocolError]) -> dict[str, str]:
    headers: dict[str, str] = {}
    memo = _FIELD_MEMO
    for line in lines:
        parsed = memo.get(line)
        if parsed is None:
            parsed = _parse_field(line, error)
            if parsed[0] not in _NOT_MEMOIZED:
                if len(memo) >= MEMO_SIZE:
                    memo.clear()  # many distinct lines: not a client repeating itself
                memo[line] = parsed
        name, value = parsed
        if name in headers:
            if name in _SINGLE:
                raise error(f"repeated {name} field")
            headers[name] += ", " + value  # RFC 9110 5.3: a repeated list field is one comma-joined list
        else:
            headers[name] = value
    return headers


def _parse_field(line: bytes, error: type[ProtocolError]) -> tuple[str, str]:
    """One field line: its name in lower case and its value without the whitespace around it."""
    match = _FIELD.fullmatch(line)
    if match is None:
        _bad_field(line, error)
    return match[1].lower().decode("ascii"), match[2].rstrip(b" \t").decode("latin-1")


def _bad_field(line: bytes, error: type[ProtocolError]) -> NoReturn:
    """Say what is wrong with a field line that is not well-formed."""
    if line[:1] in (b" ", b"\t"):
        raise error(f"obsolete line folding at {_show(line)}")
    if _FORBIDDEN.search(line):
        raise error(f"control character in header line {_show(line)}")
    raise error(f"header line {_show(line)} is malformed")


def _has_token(headers: dict[str, str], name: str, token: str) -> bool:
    """A comma-separated list field holds ``token``, compared without case (gorilla's rule)."""
    value = headers.get(name, "").lower()
    return value == token or any(item.strip(" \t") == token for item in value.split(","))


def _show(line: bytes) -> str:
    """A line for an error message: peer bytes, shortened and made printable."""
    return repr(line[:80]) + ("..." if len(line) > 80 else "")


class _HeadCollector:
    """Gathers a head line by line until the blank line, holding at most ``max_head`` bytes.

    Lines are kept as offsets into one buffer so the memory used never exceeds the limit.
    """

    __slots__ = ("_buf", "_scan", "_line_start", "_lines", "_max_head", "_max_line", "_max_lines", "_error", "_what")

    def __init__(self, max_head: int, max_line: int, max_headers: int, error: type[ProtocolError], what: str) -> None:
        self._buf: bytearray | None = bytearray()
        self._scan = 0  # where the search for the next CRLF resumes
        self._line_start = 0
        self._lines: list[tuple[int, int]] = []
        self._max_head = max_head
        self._max_line = max_line
        self._max_lines = max_headers + 1  # the request or status line is not a header
        self._error = error
        self._what = what

    def _too_long(self, index: int, line: bytes | bytearray) -> HeadTooLarge:
        """The error for line ``index`` of the head (0: the request or status line), naming it."""
        if index == 0:
            part = "the request line" if self._what == "request" else "the status line"
        else:
            part = f"header line {index} of the {self._what}, starting {_show(bytes(line[:24]))},"
        return HeadTooLarge(f"{part} is longer than {self._max_line} bytes")

    def _whole(self, data: bytes) -> tuple[list[bytes], bytes] | None:
        """The usual case: a whole head in one read. Cut it at once, with the same limits."""
        end = data.find(b"\r\n\r\n", 0, self._max_head)
        if end < 0:
            return None
        lines = data[:end].split(b"\r\n")
        if not lines[0]:
            raise self._error(f"the {self._what} starts with an empty line")
        if len(lines) > self._max_lines:
            raise HeadTooLarge(f"the {self._what} has more than {self._max_lines - 1} header fields")
        for index, line in enumerate(lines):
            if len(line) > self._max_line:
                raise self._too_long(index, line)
        self._buf = None
        return lines, data[end + 4 :]

    def feed(self, data: bytes) -> tuple[list[bytes], bytes] | None:
        buf = self._buf
        if buf is None:
            raise RuntimeError(f"the {self._what} head is already complete")
        if not buf:
            whole = self._whole(bytes(data))
            if whole is not None:
                return whole
        taken = max(0, self._max_head - len(buf))
        buf += data[:taken]  # never hold more than the limit, however much is fed
        while (end := buf.find(b"\r\n", self._scan)) >= 0:
            if end == self._line_start:
                if not self._lines:
                    raise self._error(f"the {self._what} starts with an empty line")
                lines = [bytes(buf[start:stop]) for start, stop in self._lines]
                rest = bytes(buf[end + 2 :]) + bytes(data[taken:])
                self._buf = None
                return lines, rest
            if end - self._line_start > self._max_line:
                raise self._too_long(len(self._lines), buf[self._line_start : end])
            self._lines.append((self._line_start, end))
            if len(self._lines) > self._max_lines:
                raise HeadTooLarge(f"the {self._what} has more than {self._max_lines - 1} header fields")
            self._line_start = self._scan = end + 2
        # A CR at the very end may be the first half of the next CRLF: look at it again next time.
        self._scan = max(self._line_start, len(buf) - 1)
        if len(buf) - self._line_start > self._max_line:
            raise self._too_long(len(self._lines), buf[self._line_start :])
        if len(buf) >= self._max_head:
            raise HeadTooLarge(f"the {self._what} head is larger than {self._max_head} bytes")
        return None
