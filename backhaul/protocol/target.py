"""The target string a server sends per connection and how a client turns it into an address.

Rule of PROTOCOL.md 0.3: a bare port means 127.0.0.1:port; otherwise the part after the first
':' must be a port and the string is dialed as written (so IPv6 literals cannot be carried).
"""

from __future__ import annotations

from backhaul.errors import ProtocolError

DEFAULT_HOST = "127.0.0.1"


def resolve_target(target: str) -> tuple[str, int]:
    """Address a client dials for ``target``; ProtocolError when the string is not usable."""
    parts = target.split(":")
    if len(parts) == 1:
        return DEFAULT_HOST, _port(target, target)
    if len(parts) != 2 or not parts[0]:
        raise ProtocolError(f"invalid target {target!r}: expected port or host:port")
    return parts[0], _port(parts[1], target)


def _port(text: str, target: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ProtocolError(f"invalid target {target!r}: {text!r} is not a port number")
    return int(text)
