"""Transports by name: each is one module with a ``SERVER`` and a ``CONNECT`` function.

A server transport owns the tunnel port and supplies links that carry one user connection each;
a client transport dials the server and opens a session (control channel plus links). Both speak
to the core only through the interfaces of backhaul/tunnel/core.py.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from backhaul.tunnel.core import ClientConnect, ServerCore, ServerRow

# name -> module under backhaul.transport; a new transport is one more line here
MODULES = {
    "tcp": "tcp",
    "tcpmux": "tcpmux",
    "ws": "ws",
    "wss": "ws",
    "wsmux": "wsmux",
    "wssmux": "wsmux",
    "udp": "udp",
}
NEEDS = {"ws": "wsproto", "wss": "wsproto", "wsmux": "wsproto", "wssmux": "wsproto"}   # optional packages by transport


def unavailable(transport: str) -> str | None:
    """Why ``transport`` cannot run here, or None when it can."""
    if transport not in MODULES:
        return f"transport {transport!r} is not available in this version yet (available: {', '.join(MODULES)})"
    package = NEEDS.get(transport)
    if package and importlib.util.find_spec(package) is None:
        return (f"transport {transport!r} needs the Python package {package}: install backhaul[ws] "
                f"(pip install 'backhaul[ws]', or python3-{package} on Debian)")
    return None


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"backhaul.transport.{MODULES[name]}")


def server_transport(name: str, core: ServerCore) -> ServerRow:
    """The tunnel port of the transport ``name`` and the kinds of link it hands out."""
    return _module(name).SERVER(core)


def client_connect(name: str) -> ClientConnect:
    """The function that dials the server and does the handshake (blocking; the client's thread)."""
    return _module(name).CONNECT
