"""PROXY protocol v2 header as the Go server emits it (PROTOCOL.md 6.3): PROXY command, TCP.

IPv4 when both ends are IPv4, otherwise IPv6 with IPv4-mapped addresses; no TLVs.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def encode_proxy_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    ports = struct.pack(">HH", source[1], destination[1])
    if src.version == 4 and dst.version == 4:
        return SIGNATURE + b"\x21\x11\x00\x0c" + src.packed + dst.packed + ports
    return SIGNATURE + b"\x21\x21\x00\x24" + _as_v6(src) + _as_v6(dst) + ports


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if address.version == 4:
        return ipaddress.IPv6Address("::ffff:" + str(address)).packed
    return address.packed
