"""The ws family's HTTP upgrade head (PROTOCOL.md 3.1) on the captured Go conversations; no sockets."""

from __future__ import annotations

import base64
import random
import re
from pathlib import Path

import pytest

from backhaul.errors import ProtocolError
from backhaul.protocol.http_upgrade import (
    USER_AGENTS,
    BadRequest,
    BadResponse,
    HeadTooLarge,
    Request,
    RequestReader,
    Response,
    ResponseReader,
    accept_key,
    accept_response,
    authorized,
    check_accept,
    client_request,
    data_path,
    encode_key,
    error_response,
    new_key_and_id,
    pick_user_agent,
    route,
)

pytestmark = pytest.mark.timeout(60)

VECTORS = Path(__file__).parent / "vectors"
TOKEN = "musix"
_EVENT = re.compile(r"\s*[\d.]+\s+(conn\d+)\s+(C>S|S>C)\s+(\d+)B\s+(.*)")


def conversation(name: str) -> list[tuple[str, str, bytes]]:
    """The reads of a capture as (conn, direction, bytes); HTTP heads are rebuilt with CRLFs."""
    events: list[tuple[str, str, bytes]] = []
    lines = (VECTORS / name).read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _EVENT.fullmatch(lines[i])
        i += 1
        if match is None:
            continue
        conn, direction, size, rest = match.groups()
        if rest == "HTTP head:":
            head = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                head.append(lines[i].lstrip()[2:])
                i += 1
            data = ("\r\n".join(head) + "\r\n\r\n").encode()
        else:
            data = bytes.fromhex(rest)
        assert len(data) == int(size), (name, conn, direction)
        events.append((conn, direction, data))
    return events


def heads(name: str, direction: str) -> dict[str, bytes]:
    """The first read of each connection in one direction: the HTTP head."""
    out: dict[str, bytes] = {}
    for conn, d, data in conversation(name):
        if d == direction and conn not in out:
            out[conn] = data
    return out


def feed_all(reader, pieces):
    """Feed pieces until the head completes; return it and what the caller would pass on."""
    result = None
    after = b""
    for piece in pieces:
        if result is None:
            result = reader.feed(piece)
        else:
            after += piece  # after the head, the caller sends reads straight to the next layer
    return result, after


def splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, min(12, len(data) - 1))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def upgrade_head(**overrides: str | None) -> bytes:
    """A valid client head (the first of ws.txt's data connections) with fields replaced or removed."""
    fields = {
        "Host": "127.0.0.1:" "59017",  # the captured head's Host (a port no socket uses)
        "User-Agent": USER_AGENTS[7],
        "Authorization": "Bearer musix",
        "Connection": "Upgrade",
        "Sec-WebSocket-Extensions": "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "Sec-WebSocket-Key": "O/A+DEmexyKX0A5aPKw18w==",
        "Sec-WebSocket-Version": "13",
        "Upgrade": "websocket",
        "X-User-Id": "2133014231",
    }
    line = overrides.pop("request_line", None) or "GET /tunnel/2133014231 HTTP/1.1"
    for name, value in overrides.items():
        name = name.replace("_", "-")
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return (line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode()


def parse_request(data: bytes) -> Request:
    request = RequestReader().feed(data)
    assert request is not None
    return request


# ---------------------------------------------------------------------- captured conversations


@pytest.mark.parametrize("name", ["ws.txt", "wsmux.txt"])
def test_captured_requests_are_accepted_routed_and_reproduced(name):
    requests = heads(name, "C>S")
    assert len(requests) >= 3
    for conn, data in requests.items():
        request = parse_request(data)
        assert request.rest == b""
        assert request.method == "GET"
        user_id = int(request.headers["x-user-id"])
        if conn == "conn1":
            assert (request.path, request.route) == ("/channel", "control")
        else:
            assert (request.path, request.route) == (data_path(user_id), "data")
        assert authorized(request, TOKEN)
        assert not authorized(request, "musiX")
        assert request.headers["user-agent"] in USER_AGENTS
        ours = client_request(
            request.headers["host"],
            request.path,
            TOKEN,
            request.headers["user-agent"],
            user_id,
            base64.b64decode(request.key),
        )
        assert ours == data


@pytest.mark.parametrize("name", ["ws.txt", "wsmux.txt"])
def test_captured_101s_pair_with_their_keys(name):
    requests = heads(name, "C>S")
    answers = heads(name, "S>C")
    keys = {conn: parse_request(data).key for conn, data in requests.items()}
    assert set(answers) == set(keys)
    for conn, data in answers.items():
        response = ResponseReader().feed(data)
        assert response is not None
        assert (response.status, response.reason, response.rest) == (101, "Switching Protocols", b"")
        check_accept(response, keys[conn])
        assert accept_response(keys[conn]) == data
        for other, key in keys.items():
            if other != conn:
                with pytest.raises(ProtocolError, match="does not match"):
                    check_accept(response, key)


def test_rfc_6455_example_key():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_accept_agrees_with_wsproto():
    utilities = pytest.importorskip("wsproto.utilities")
    for data in heads("ws.txt", "C>S").values():
        key = parse_request(data).key
        assert accept_key(key).encode() == utilities.generate_accept_token(key.encode())


def _wsmux_101_and_smux() -> tuple[bytes, bytes]:
    """conn2 of wsmux.txt: the server's 101 and the smux bytes it sends next on that connection."""
    events = [data for conn, d, data in conversation("wsmux.txt") if conn == "conn2" and d == "S>C"]
    head, smux = events[0], b"".join(events[1:])
    assert smux[:8] == bytes.fromhex("01 00 00 00 03 00 00 00")  # SYN of stream 3
    return head, smux


def test_response_rest_keeps_smux_bytes_whole_and_byte_by_byte():
    head, smux = _wsmux_101_and_smux()
    whole = ResponseReader().feed(head + smux)
    assert whole is not None and whole.rest == smux
    byte_wise, after = feed_all(ResponseReader(), [head[i : i + 1] for i in range(len(head))] + [smux])
    assert byte_wise is not None and (byte_wise.rest, after) == (b"", smux)
    # The head ends mid-read: the read that completes it carries the first smux bytes.
    late, after = feed_all(ResponseReader(), [head[:-1], head[-1:] + smux])
    assert late is not None and (late.rest, after) == (smux, b"")


def test_response_rest_in_random_splits():
    head, smux = _wsmux_101_and_smux()
    data = head + smux
    rng = random.Random(6455)
    for _ in range(300):
        response, extra = feed_all(ResponseReader(), splits(data, rng))
        assert isinstance(response, Response)
        assert response.rest + extra == smux
        assert response.status == 101


def test_request_rest_keeps_what_follows_the_head():
    data = heads("wsmux.txt", "C>S")["conn2"]
    smux = bytes.fromhex("01 01 00 00 03 00 00 00")
    rng = random.Random(2)
    for pieces in ([data + smux], [data[i : i + 1] for i in range(len(data))] + [smux], splits(data + smux, rng)):
        request, extra = feed_all(RequestReader(), pieces)
        assert request is not None
        assert request.rest + extra == smux


def test_ws_rest_goes_to_wsproto_in_open_state():
    connection = pytest.importorskip("wsproto.connection")
    events = pytest.importorskip("wsproto.events")
    frames = [data for conn, d, data in conversation("ws.txt") if conn == "conn2" and d == "S>C"]
    response = ResponseReader().feed(frames[0] + frames[1])
    assert response is not None
    ws = connection.Connection(connection.ConnectionType.CLIENT, trailing_data=response.rest)
    received = list(ws.events())
    assert len(received) == 1
    assert isinstance(received[0], events.TextMessage) and received[0].data == "39477"


def test_feeding_after_the_head_is_a_caller_bug():
    reader = RequestReader()
    assert reader.feed(upgrade_head()) is not None
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


# ---------------------------------------------------------------------- client side helpers


def test_user_agent_list_is_go_s():
    assert len(USER_AGENTS) == 29
    assert len(set(USER_AGENTS)) == 29
    assert USER_AGENTS[0].endswith("Chrome/114.0.0.0 Safari/537.36")
    assert USER_AGENTS[-1] == (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_12_6) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/87.0.4280.88 Safari/537.36"
    )


def test_random_choices_are_deterministic_with_a_seeded_source():
    first = [(new_key_and_id(rng), pick_user_agent(rng)) for rng in [random.Random(1)] for _ in range(50)]
    second = [(new_key_and_id(rng), pick_user_agent(rng)) for rng in [random.Random(1)] for _ in range(50)]
    assert first == second
    for (key, user_id), agent in first:
        assert len(key) == 16
        assert 0 <= user_id < 2**31
        assert agent in USER_AGENTS
    request = parse_request(client_request("example.com:443", data_path(7), TOKEN, USER_AGENTS[0], 7, first[0][0][0]))
    assert request.key == encode_key(first[0][0][0])
    assert request.route == "data"


def test_client_request_refuses_header_injection():
    key = bytes(16)
    with pytest.raises(ProtocolError) as info:
        client_request("h:1", "/channel", "musix\r\nX-Evil: 1", USER_AGENTS[0], 1, key)
    assert info.value.remote is False
    for bad in [
        dict(host="a b:1"),
        dict(host=""),
        dict(path="channel"),
        dict(path="/a b"),
        dict(user_agent="x\ny"),
        dict(user_id=-1),
        dict(key=bytes(15)),
    ]:
        args = dict(host="h:1", path="/channel", token=TOKEN, user_agent=USER_AGENTS[0], user_id=1, key=key) | bad
        with pytest.raises(ProtocolError):
            client_request(**args)


# ---------------------------------------------------------------------- server side refusals


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /channel\r\n\r\n", 400),
        (b"GET  /channel HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET http://h/channel HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"\r\nGET /channel HTTP/1.1\r\n\r\n", 400),
        (upgrade_head(request_line="POST /channel HTTP/1.1"), 405),
        (upgrade_head(request_line="get /channel HTTP/1.1"), 405),
        (upgrade_head(request_line="GET /channel HTTP/1.0"), 400),
        (upgrade_head(request_line="GET /channel HTTP/2.0"), 400),
        (upgrade_head(Host=None), 400),
        (upgrade_head(Sec_WebSocket_Key=None), 400),
        (upgrade_head(Sec_WebSocket_Key="P4kbSxv2PF5TEOmODYqF"), 400),
        (upgrade_head(Sec_WebSocket_Key="P4kbSxv2PF5TEOmODYqFiA="), 400),
        (upgrade_head(Sec_WebSocket_Key="P4kbSxv2PF5TEOmODYqF!A=="), 400),
        (upgrade_head(Sec_WebSocket_Key="AAAAAAAAAAAAAAAAAAAAAAAA"), 400),  # 18 bytes
        (upgrade_head(Sec_WebSocket_Version="8"), 400),
        (upgrade_head(Sec_WebSocket_Version=None), 400),
        (upgrade_head(Upgrade=None), 400),
        (upgrade_head(Upgrade="h2c"), 400),
        (upgrade_head(Upgrade="websocket/13"), 400),
        (upgrade_head(Connection=None), 400),
        (upgrade_head(Connection="keep-alive"), 400),
        (upgrade_head(Content_Length="5"), 400),
        (upgrade_head(Transfer_Encoding="chunked"), 400),
        (upgrade_head(**{"X-Foo": "a\x00b"}), 400),
        (upgrade_head().replace(b"Upgrade: websocket", b"Upgrade : websocket"), 400),
        (upgrade_head().replace(b"Upgrade: websocket", b"Upgrade websocket"), 400),
        (upgrade_head().replace(b"Upgrade: websocket", b": websocket"), 400),
        (upgrade_head().replace(b"Upgrade: websocket\r\n", b"Upgrade:\r\n websocket\r\n"), 400),  # obs-fold
        (upgrade_head().replace(b"Upgrade: websocket", b"Upgrade: web\nsocket"), 400),
        (upgrade_head().replace(b"Upgrade: websocket", b"Upgrade: web\rsocket"), 400),
        (upgrade_head().replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer other\r\n\r\n"), 400),
        (upgrade_head().replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Key: CPsBqN9IXBjIAch4eO76MQ==\r\n\r\n"), 400),
        (upgrade_head().replace(b"\r\n\r\n", b"\r\nhost: other\r\n\r\n"), 400),
    ],
)
def test_refusals(head, status):
    with pytest.raises(BadRequest) as info:
        RequestReader().feed(head)
    assert info.value.status == status
    assert info.value.remote is True
    # The same verdict whatever the reads look like.
    with pytest.raises(BadRequest):
        feed_all(RequestReader(), [head[i : i + 1] for i in range(len(head))])


def test_too_large_head():
    head = upgrade_head()
    assert RequestReader(max_head=len(head)).feed(head) is not None  # exactly the limit is fine
    padded = head.replace(b"\r\n\r\n", b"\r\nX-Pad: y\r\n\r\n")
    with pytest.raises(HeadTooLarge) as info:
        RequestReader(max_head=len(head)).feed(padded)
    assert info.value.status == 431
    assert isinstance(info.value, ProtocolError)
    # Many short fields, each within limits, still end at the size limit.
    with pytest.raises(HeadTooLarge):
        feed_all(RequestReader(max_head=4096, max_headers=1000), [b"GET / HTTP/1.1\r\n"] + [b"A: b\r\n"] * 1000)


def test_endless_header_line():
    reader = RequestReader(max_head=1 << 20, max_line=1000)
    reader.feed(b"GET /channel HTTP/1.1\r\nX-Long: ")
    with pytest.raises(HeadTooLarge, match="longer than 1000"):
        for _ in range(2000):
            reader.feed(b"a")
    with pytest.raises(HeadTooLarge):
        RequestReader(max_line=100).feed(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n\r\n")


def test_too_many_fields():
    head = upgrade_head().replace(b"\r\n\r\n", b"\r\n" + b"X-A: 1\r\n" * 100 + b"\r\n")
    with pytest.raises(HeadTooLarge, match="more than 100"):
        RequestReader().feed(head)


def test_silence_is_the_caller_s_deadline():
    reader = RequestReader()
    assert reader.feed(b"") is None
    assert reader.feed(upgrade_head()[:-1]) is None  # no time calls: the caller answers 408
    assert error_response(408).startswith(b"HTTP/1.1 408 Request Timeout\r\n")


def test_lenient_where_http_allows():
    # Names without case, values without surrounding whitespace, token lists, repeated list fields.
    head = (
        b"GET /channel?x=1 HTTP/1.1\r\nhost: h:1\r\nAUTHORIZATION:Bearer musix \t\r\nconnection: keep-alive\r\n"
        b"Connection: UPGRADE\r\nupgrade: h2c, WebSocket\r\nsec-websocket-version: 8, 13\r\n"
        b"sec-websocket-key: \tO/A+DEmexyKX0A5aPKw18w==\r\nX-Bin: \xff\r\n\r\n"
    )
    request = parse_request(head)
    assert (request.path, request.route) == ("/channel", "control")
    assert request.headers["connection"] == "keep-alive, UPGRADE"
    assert request.headers["x-bin"] == "\xff"
    assert request.key == "O/A+DEmexyKX0A5aPKw18w=="
    # Trailing whitespace is OWS, not part of the value (Go's textproto trims it too).
    assert request.authorization == "Bearer musix"
    assert authorized(request, TOKEN)


@pytest.mark.parametrize(
    "value",
    [None, "", "Bearer", "Bearer ", "bearer musix", "BEARER musix", "Bearer  musix", "Bearer musix x", "Basic bXVzaXg=",
     "Bearer musi", "Bearer musixx", "Bearer\tmusix"],
)
def test_unauthorized(value):
    request = parse_request(upgrade_head(Authorization=value))
    assert not authorized(request, TOKEN)


def test_token_compare_is_on_bytes():
    request = parse_request(upgrade_head(Authorization="Bearer tök"))  # sent as UTF-8, read as latin-1
    assert authorized(request, "tök")
    assert not authorized(request, "tok")
    assert not authorized(parse_request(upgrade_head()), "musix ")  # a server token with a trailing space


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/channel", "control"),
        ("/channel/", None),
        ("/Channel", None),
        ("/tunnel", "data"),
        ("/tunnel/123", "data"),
        ("/tunnelx", "data"),  # Go's prefix test
        ("/", None),
        ("/favicon.ico", None),
    ],
)
def test_route(path, expected):
    assert route(path) == expected


def test_unknown_path_is_answered_404():
    request = parse_request(upgrade_head(request_line="GET /admin HTTP/1.1"))
    assert request.route is None
    assert error_response(404) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n"
        b"Content-Length: 19\r\nConnection: close\r\n\r\n404 page not found\n"
    )


# ---------------------------------------------------------------------- responses we write


def test_error_responses():
    assert error_response(401) == (
        b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n"
        b"Content-Length: 13\r\nConnection: close\r\n\r\nunauthorized\n"
    )
    assert error_response(401, date="Sun, 06 Nov 1994 08:49:37 GMT") == (
        b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n"
        b"Date: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 13\r\nConnection: close\r\n\r\nunauthorized\n"
    )
    assert error_response(400) == (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nSec-Websocket-Version: 13\r\n"
        b"X-Content-Type-Options: nosniff\r\nContent-Length: 12\r\nConnection: close\r\n\r\nBad Request\n"
    )
    for status in (400, 401, 404, 405, 408, 431):
        data = error_response(status)
        response = ResponseReader().feed(data)
        assert response is not None
        assert response.status == status
        assert int(response.headers["content-length"]) == len(response.rest)
        assert response.headers["connection"] == "close"
        with pytest.raises(ProtocolError):
            check_accept(response, "dGhlIHNhbXBsZSBub25jZQ==")
    with pytest.raises(ValueError):
        error_response(500)


def test_check_accept_names_the_problem():
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    good = accept_response(key)

    def check(data: bytes) -> None:
        response = ResponseReader().feed(data)
        assert response is not None
        check_accept(response, key)

    check(good)
    check(good.replace(b"Upgrade: websocket", b"upgrade: WebSocket").replace(b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 101"))
    with pytest.raises(ProtocolError, match=r"refused the token \(401\)"):
        check(error_response(401))
    with pytest.raises(ProtocolError, match="answered 404 Not Found"):
        check(error_response(404))
    with pytest.raises(ProtocolError, match="answered 200"):
        check(good.replace(b"101 Switching Protocols", b"200 OK"))
    with pytest.raises(ProtocolError, match="Upgrade: websocket"):
        check(good.replace(b"Upgrade: websocket\r\n", b""))
    with pytest.raises(ProtocolError, match="Connection: Upgrade"):
        check(good.replace(b"Connection: Upgrade\r\n", b"Connection: close\r\n"))
    with pytest.raises(ProtocolError, match="lacks Sec-WebSocket-Accept"):
        check(good.replace(b"Sec-WebSocket-Accept", b"X-Accept"))
    with pytest.raises(ProtocolError, match="does not match"):
        check(good.replace(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOA="))
    with pytest.raises(ProtocolError, match="sec-websocket-extensions"):
        check(good.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"))


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 101 Switching Protocols\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 1010 Nope\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n Upgrade: websocket\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade websocket\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: a\r\nSec-WebSocket-Accept: b\r\n\r\n",
    ],
)
def test_malformed_responses(data):
    with pytest.raises(BadResponse):
        ResponseReader().feed(data)


def test_response_too_large():
    with pytest.raises(HeadTooLarge):
        ResponseReader(max_head=100).feed(b"HTTP/1.1 101 Switching Protocols\r\n" + b"X: y\r\n" * 20)


# ---------------------------------------------------------------------- garbage


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        pos = rng.randrange(len(out))
        match rng.randrange(4):
            case 0:
                out[pos] = rng.randrange(256)
            case 1:
                out.insert(pos, rng.choice(b"\r\n :\t,\x00\xff"))
            case 2:
                del out[pos]
            case _:
                out[pos:pos] = out[rng.randrange(len(out)) :][: rng.randint(1, 40)]
    return bytes(out)


@pytest.mark.parametrize("side", ["request", "response"])
def test_garbage_raises_only_protocol_errors_and_stays_bounded(side):
    rng = random.Random(f"garbage-{side}")
    samples = list(heads("wsmux.txt", "C>S" if side == "request" else "S>C").values())
    max_head = 1024
    for round_ in range(3000):
        if round_ % 2:
            data = rng.randbytes(rng.randint(1, 3000))
        else:
            data = _mutate(rng.choice(samples), rng)
        reader = RequestReader(max_head) if side == "request" else ResponseReader(max_head)
        try:
            result = None
            for piece in splits(data, rng) if len(data) > 1 else [data]:
                result = reader.feed(piece)
                buffered = reader._head._buf
                assert buffered is None or len(buffered) <= max_head
                if result is not None:
                    break
        except ProtocolError:
            continue
        if result is not None and side == "request":
            assert result.route in ("control", "data", None)
            assert len(base64.b64decode(result.key)) == 16


@pytest.mark.parametrize("reads", ["whole", "in pieces"])
def test_a_line_too_long_is_named_for_what_it_is(reads):
    """Catches: a header line past the limit blamed on the request line (a 100 MB head answered
    431 with a line that sends the operator looking at the wrong part)."""
    def verdict(head: bytes) -> str:
        reader = RequestReader(max_head=1 << 20, max_line=1000)
        with pytest.raises(HeadTooLarge) as info:
            if reads == "whole":
                reader.feed(head)
            else:
                feed_all(reader, [head[i : i + 700] for i in range(0, len(head), 700)])
        return str(info.value)

    long_field = upgrade_head().replace(b"\r\n\r\n", b"\r\nX-Long: " + b"a" * 5000 + b"\r\n\r\n")
    fields = upgrade_head().count(b"\r\n") - 1
    assert verdict(long_field) == (f"header line {fields} of the request, starting b'X-Long: aaaaaaaaaaaaaaaa', "
                                   "is longer than 1000 bytes")
    assert verdict(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n") == "the request line is longer than 1000 bytes"
    endless = b"GET /channel HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"b" * 5000
    assert verdict(endless).startswith("header line 2 of the request, starting b'X-Endless: bbbbbbbbbbbbb',")
