"""The codec of auth = "challenge" (docs/auth.md) on exact byte vectors, and its refusals: a wrong
key, a proof reflected to its sender, a conversation replayed, link proofs reused or from another
session. Pure, no sockets."""

from __future__ import annotations

import pytest

from backhaul.errors import ProtocolError
from backhaul.protocol import auth
from backhaul.protocol.auth import AuthError, ClientHandshake, LinkChecker, ServerHandshake
from backhaul.protocol.framing import FrameReader, encode_ltv

pytestmark = pytest.mark.timeout(10)

NC = bytes(range(32))
NS = bytes(range(32, 64))

# docs/auth.md, "Exact bytes" (checked with openssl dgst -sha256 -mac HMAC -macopt key:musix)
HELLO = bytes.fromhex("002041" "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
CHALLENGE = bytes.fromhex("002042" "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")
PROOF = bytes.fromhex("002043" "355d5e3f1d074c54f540fd1a85d05ff41d34c1e1fcebbed112cd559422e9864f")
WELCOME = bytes.fromhex("002044" "1b154a4c101fa49328cb57e0c5c48e32a5b59754a9690ee3d14aa0b9c2e9503a")
SESSION = bytes.fromhex("6733e3aa3e79ec58de2d22c40abc24dd9a9a7d0b5e21027e0e9bc4de0cc3fa4a")
LINK_1 = bytes.fromhex("002845" "0000000000000001" "2f7d0d62b44ab3f6882ec42e3c14c5b312debf69850adf4cc53a7f133b845ec8")
AUTHORIZATION_2 = "Backhaul-Link 2.e902de69c4bf50ccdb354be1777a611e13f1ce32200cec4b8b462417ff26dbd7"


def frame(data: bytes) -> tuple[int | None, bytes | None]:
    reader = FrameReader(typed=True)
    assert reader.feed(data) == b"" and reader.done
    return reader.kind, reader.payload


def handshake(client_token: str = "musix", server_token: str = "musix"
              ) -> tuple[ClientHandshake, ServerHandshake, bytes, bytes, bytes]:
    client, server = ClientHandshake(client_token, NC), ServerHandshake(server_token, NS)
    hello = client.hello()
    challenge = server.challenge(*frame(hello))
    proof = client.answer(*frame(challenge))
    return client, server, hello, challenge, proof


def test_the_exchange_is_the_documented_bytes() -> None:
    client, server, hello, challenge, proof = handshake()
    assert (hello, challenge, proof) == (HELLO, CHALLENGE, PROOF)
    server.check(*frame(proof))
    welcome = server.welcome()
    assert welcome == WELCOME
    signer = client.welcome(*frame(welcome))
    assert auth.mac(b"musix", auth.LABEL_SESSION, NC, NS) == SESSION
    assert signer.frame() == LINK_1 and len(LINK_1) == auth.LINK_FRAME_SIZE
    assert signer.authorization() == AUTHORIZATION_2
    checker = server.links()
    assert checker.check_frame(*frame(LINK_1)) == 1
    assert checker.check_authorization(AUTHORIZATION_2) == 2


def test_the_token_is_never_on_the_wire() -> None:
    token = "Never-On-The-Wire-93b1"
    client, server, hello, challenge, proof = handshake(token, token)
    server.check(*frame(proof))
    welcome = server.welcome()
    signer = client.welcome(*frame(welcome))
    wire = hello + challenge + proof + welcome + signer.frame() + signer.authorization().encode()
    assert token.encode() not in wire


def test_wrong_key_is_refused_by_the_server() -> None:
    _client, server, _hello, _challenge, proof = handshake(client_token="guess")
    with pytest.raises(AuthError, match="wrong token") as info:
        server.check(*frame(proof))
    assert info.value.kind == "token"
    with pytest.raises(ProtocolError, match="before a valid proof"):
        server.welcome()  # nothing keyed leaves for a client that proved nothing


def test_a_server_with_another_key_is_found_by_the_client() -> None:
    client = ClientHandshake("musix", NC)
    fake = ServerHandshake("not-musix", NS)
    proof = client.answer(*frame(fake.challenge(*frame(client.hello()))))
    with pytest.raises(AuthError, match="wrong token"):
        fake.check(*frame(proof))
    # a fake server that welcomes anyway, with the only proof it can make
    forged = encode_ltv(auth.WELCOME, auth.mac(b"not-musix", auth.LABEL_SERVER, NC, NS))
    with pytest.raises(AuthError, match="the server could not prove the token") as info:
        client.welcome(*frame(forged))
    assert info.value.kind == "server"


def test_reflection_fails_both_ways() -> None:
    """The server's proof sent back as the client's, and the client's as the server's: each
    direction has its own label, so neither verifies."""
    client, server, _hello, _challenge, proof = handshake()
    server.check(*frame(proof))
    welcome = server.welcome()
    reflected_to_server = bytes((0x00, 0x20, auth.PROOF)) + frame(welcome)[1]  # type: ignore[operator]
    other = ServerHandshake("musix", NS)
    other.challenge(*frame(HELLO))
    with pytest.raises(AuthError, match="wrong token"):
        other.check(*frame(reflected_to_server))
    reflected_to_client = bytes((0x00, 0x20, auth.WELCOME)) + frame(proof)[1]  # type: ignore[operator]
    with pytest.raises(AuthError, match="could not prove"):
        client.welcome(*frame(reflected_to_client))


def test_a_recorded_conversation_replayed_proves_nothing() -> None:
    """The client's HELLO and PROOF replayed to a server that draws a fresh nonce."""
    replayed = ServerHandshake("musix", bytes(range(64, 96)))
    replayed.challenge(*frame(HELLO))
    with pytest.raises(AuthError, match="wrong token"):
        replayed.check(*frame(PROOF))
    # and the server's side replayed to a client with a fresh nonce
    client = ClientHandshake("musix", bytes(range(96, 128)))
    client.answer(*frame(CHALLENGE))
    with pytest.raises(AuthError, match="could not prove"):
        client.welcome(*frame(WELCOME))


@pytest.mark.parametrize(("data", "method", "message"), [
    (bytes.fromhex("0005016d75736978"), "challenge", "expected a HELLO frame \\(0x41\\), got type 0x01"),
    (bytes.fromhex("000141ff"), "challenge", "a HELLO frame of 1 bytes, expected 32"),
    (PROOF, "challenge", "expected a HELLO frame \\(0x41\\), got type 0x43"),
])
def test_server_refuses_frames_that_are_not_a_hello(data: bytes, method: str, message: str) -> None:
    server = ServerHandshake("musix", NS)
    with pytest.raises(AuthError, match=message) as info:
        getattr(server, method)(*frame(data))
    assert info.value.kind == "garbage"


def test_client_refuses_a_v072_reply_and_short_frames() -> None:
    client = ClientHandshake("musix", NC)
    with pytest.raises(AuthError, match="expected a CHALLENGE frame"):
        client.answer(*frame(bytes.fromhex("0005016d75736978")))
    client.answer(*frame(CHALLENGE))
    with pytest.raises(AuthError, match="a WELCOME frame of 31 bytes"):
        client.welcome(*frame(WELCOME[:2].replace(b"\x20", b"\x1f") + WELCOME[2:-1]))


def test_nonces_must_be_32_bytes() -> None:
    with pytest.raises(ProtocolError, match="a nonce is 32 bytes, not 16"):
        ClientHandshake("musix", bytes(16))


# --- link proofs --------------------------------------------------------------------------------

def session() -> tuple[auth.LinkSigner, LinkChecker]:
    client, server, _hello, _challenge, proof = handshake()
    server.check(*frame(proof))
    return client.welcome(*frame(server.welcome())), server.links()


def test_a_link_proof_is_accepted_once() -> None:
    signer, checker = session()
    link = signer.frame()
    assert checker.check_frame(*frame(link)) == 1
    with pytest.raises(AuthError, match="link number 1 was used already") as info:
        checker.check_frame(*frame(link))
    assert info.value.kind == "replay"


def test_links_out_of_order_within_the_window_and_none_older() -> None:
    signer, checker = session()
    frames = [signer.frame() for _ in range(auth.LINK_WINDOW + 2)]   # n = 1 .. 4098
    assert checker.check_frame(*frame(frames[4])) == 5
    assert checker.check_frame(*frame(frames[0])) == 1                # late, but within the window
    assert checker.check_frame(*frame(frames[-1])) == auth.LINK_WINDOW + 2
    with pytest.raises(AuthError, match="link number 2 is older than the last 4096"):
        checker.check_frame(*frame(frames[1]))
    assert checker.check_frame(*frame(frames[2])) == 3                # exactly 4095 below: still in
    with pytest.raises(AuthError, match="used already"):
        checker.check_frame(*frame(frames[4]))


def test_a_link_of_another_session_is_refused() -> None:
    signer, _checker = session()
    later_client, later_server = ClientHandshake("musix", bytes(32)), ServerHandshake("musix", NS)
    proof = later_client.answer(*frame(later_server.challenge(*frame(later_client.hello()))))
    later_server.check(*frame(proof))
    later = later_server.links()
    with pytest.raises(AuthError, match="does not verify in this session") as info:
        later.check_frame(*frame(signer.frame()))
    assert info.value.kind == "link"
    assert later.highest == 0


@pytest.mark.parametrize("value", [
    None, "", "Bearer musix", "Backhaul-Link", "Backhaul-Link 1", "Backhaul-Link 0." + "00" * 32,
    "Backhaul-Link 01." + "00" * 32, "backhaul-link 1." + "00" * 32, "Backhaul-Link 1." + "AB" * 32,
    "Backhaul-Link 1." + "00" * 31, "Backhaul-Link 99999999999999999999." + "00" * 32,
    "Backhaul-Link -1." + "00" * 32, "Backhaul-Link 1." + "00" * 32,
])
def test_malformed_or_wrong_link_authorizations_are_refused(value: str | None) -> None:
    _signer, checker = session()
    with pytest.raises(AuthError) as info:
        checker.check_authorization(value)
    assert info.value.kind == "link"


def test_a_zeroed_link_frame_is_refused() -> None:
    _signer, checker = session()
    with pytest.raises(AuthError, match="does not verify"):
        checker.check_frame(auth.LINK, bytes(auth.LINK_PAYLOAD))
    with pytest.raises(AuthError, match="not a link proof"):
        checker.check_frame(auth.LINK, bytes(5))
