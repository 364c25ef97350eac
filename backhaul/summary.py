"""What ``backhaul check`` prints: the settings in effect and the addresses they lead to.

An operator sees what the process would do, defaults filled in and the token redacted, before it runs.
"""

from __future__ import annotations

from backhaul.config import (
    CREDENTIAL,
    TLS_TRANSPORTS,
    ClientConfig,
    Config,
    PortMapping,
    ServerConfig,
    address_text,
    file_keys,
    file_value,
    toml_value,
)
from backhaul.errors import ProtocolError
from backhaul.protocol.target import resolve_target

WS_TRANSPORTS = ("ws", "wss", "wsmux", "wssmux")


def describe(config: Config) -> str:
    """The whole report: one TOML table per side, then the addresses as comments."""
    lines = [f"# {config.source}: ok; the settings in effect (defaults filled in, the token redacted)"]
    for name, side in (("server", config.server), ("client", config.client)):
        if side is not None:
            lines += ["", f"[{name}]", *settings(side)]
    lines += ["", "# listens on:", *_commented(listens(config)), "# dials:", *_commented(dials(config))]
    return "\n".join(lines) + "\n"


def settings(side: ServerConfig | ClientConfig) -> list[str]:
    """``key = value`` for every key of the side's table; a secret shows only whether it was set."""
    lines = []
    for key in file_keys(type(side)):
        if key.repr:
            lines.append(f"{key.name} = {toml_value(file_value(side, key.name))}")
        else:
            state = f"redacted, {side.token_source}" if not side.token_is_default else \
                f'not set: the default of v0.7.2, unless systemd passes the credential "{CREDENTIAL}"'
            lines.append(f"{key.name} = <{state}>")
    return lines


def listens(config: Config) -> list[str]:
    """The server's tunnel port and public ports, and the status page of either side."""
    pages = [f"tcp {address_text(side.web_addr, side.web_port)}  status page, /metrics, /healthz ({name})"
             for name, side in (("server", config.server), ("client", config.client))
             if side is not None and side.web_port]
    server = config.server
    if server is None:
        return pages
    tunnel = "tcp+udp" if server.transport == "udp" else "tcp"   # udp: the control channel is TCP
    public = "udp" if server.transport == "udp" else "tcp+udp" if server.accept_udp else "tcp"
    lines = [f"{tunnel} {address_text(server.bind_host, server.bind_port)}  tunnel ({server.transport})"]
    for entry, mappings in _by_entry(server.ports).items():
        first, last = mappings[0], mappings[-1]
        where = address_text(*first.listen_addr) + (f"-{last.listen_port}" if last is not first else "")
        lines.append(f"{public} {where}  public, ports entry {toml_value(entry)}: "
                     f"the client dials {_dials_for(mappings, config)}")
    return lines + pages


def dials(config: Config) -> list[str]:
    """The client's server address and its targets; a server dials nothing."""
    client = config.client
    if client is None:
        return []
    proto = "tcp+udp" if client.transport == "udp" else "tcp"
    tls = " with TLS" if client.transport in TLS_TRANSPORTS else ""
    source = f" from {client.local_addr}" if client.local_addr else ""
    count = len(client.servers)
    lines = []
    for index, remote in enumerate(client.servers):
        which = "the server" if count == 1 else f"server {index + 1} of {count}"
        if client.edge_ip and client.transport in WS_TRANSPORTS:
            server = f"{address_text(client.edge_ip, remote.port)}  {which} through the CDN edge " \
                     f"(Host and SNI {remote.addr})"
        else:
            server = f"{address_text(remote.host, remote.port)}  {which}"
        lines.append(f"{proto} {server} ({client.transport}{tls}){source}")
    if count > 1:
        back = (f"back to an earlier one that answers again after {client.failback_idle} s without users"
                if client.failback_idle else "never back to an earlier one (failback_idle = 0)")
        lines.append(f"    the first that answers, the next when its session ends; {back}")
    lines.append("tcp the targets the server sends: a bare port as 127.0.0.1:PORT, host:port as written")
    lines += [f"tcp {right}  for the target {left!r} (forwarder)" for left, right in client.forwarder]
    return lines


def dial_text(target: str, client: ClientConfig | None) -> str:
    """The address a client dials for ``target`` (after its forwarder, when its config is known)."""
    wanted = client.forward_target(target) if client is not None else target
    try:
        host, port = resolve_target(wanted)
    except ProtocolError as exc:
        return f"nothing: {exc}"
    return f"{host}:{port}"


def _dials_for(mappings: list[PortMapping], config: Config) -> str:
    first, last = dial_text(mappings[0].target, config.client), dial_text(mappings[-1].target, config.client)
    return first if first == last else f"{first} ... {last} (each port its own)"


def _by_entry(ports: tuple[PortMapping, ...]) -> dict[str, list[PortMapping]]:
    entries: dict[str, list[PortMapping]] = {}
    for mapping in ports:
        entries.setdefault(mapping.entry, []).append(mapping)
    return entries


def _commented(lines: list[str]) -> list[str]:
    return [f"#   {line}" for line in lines] or ["#   nothing"]
