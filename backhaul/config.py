"""Turn a Backhaul TOML file into frozen, fully validated server and client settings.

Every key is checked here, once, so the runtime that opens the sockets never meets a bad value.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import re
from dataclasses import dataclass, field, fields

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 and older
    import tomli as tomllib  # type: ignore[no-redef]

from backhaul.errors import ConfigError

DEFAULT_TOKEN = "musix"
TRANSPORTS = ("tcp", "tcpmux", "ws", "wss", "wsmux", "wssmux", "udp")
LOG_LEVELS = ("panic", "fatal", "error", "warn", "warning", "info", "debug", "trace")
AUTH_MODES = ("token", "challenge")  # ours: "challenge" is docs/auth.md, both ends this program

DEFAULT_HEARTBEAT = 40
MAX_TOKEN_BYTES = 0xFFFF  # the handshake's u16 length
MAX_RANGE_PORTS = 1000
_INT_MAX = 2**31 - 1
_SECTIONS = ("server", "client")
_RANGE_THEN_COLON = re.compile(r"^\s*(\d+\s*(?:-\s*\d+\s*)?):(.*)$")

_PY_LEVELS = {
    "panic": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}


@dataclass(frozen=True)
class PortMapping:
    """One server listener: where it listens and the target string it sends to the client."""

    listen_host: str
    listen_port: int
    target: str
    entry: str

    @property
    def listen_addr(self) -> tuple[str, int]:
        """The address to bind: all interfaces when no host was given."""
        return (self.listen_host or "0.0.0.0", self.listen_port)


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` table."""

    bind_addr: str
    bind_host: str
    bind_port: int
    transport: str = "tcp"
    token: str = field(default=DEFAULT_TOKEN, repr=False)
    token_is_default: bool = True
    nodelay: bool = False
    keepalive_period: int = 75
    channel_size: int = 2048
    connection_pool: int = 8
    mux_session: int = 1
    log_level: str = "info"
    ports: tuple[PortMapping, ...] = ()
    heartbeat: int = DEFAULT_HEARTBEAT
    mux_con: int = 8
    mux_version: int = 1
    mux_framesize: int = 32768
    mux_recievebuffer: int = 4194304
    mux_streambuffer: int = 65536
    accept_udp: bool = False
    proxy_protocol: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    sniffer: bool = False
    web_port: int = 0
    sniffer_log: str = "backhaul.json"
    skip_optz: bool = False
    pprof: bool = False
    mss: int = 0
    so_rcvbuf: int = 0
    so_sndbuf: int = 0
    auth: str = "token"


@dataclass(frozen=True)
class ClientConfig:
    """The ``[client]`` table."""

    remote_addr: str
    remote_host: str
    remote_port: int
    transport: str = "tcp"
    token: str = field(default=DEFAULT_TOKEN, repr=False)
    token_is_default: bool = True
    connection_pool: int = 8
    aggressive_pool: bool = False
    retry_interval: int = 1
    dial_timeout: int = 10
    nodelay: bool = False
    keepalive_period: int = 75
    log_level: str = "info"
    pprof: bool = False
    mux_version: int = 1
    mux_framesize: int = 32768
    mux_recievebuffer: int = 4194304
    mux_streambuffer: int = 65536
    mux_session: int = 1
    edge_ip: str = ""
    tls_verify: bool = False
    tls_ca: str = ""
    tls_pin: str = ""
    sniffer: bool = False
    web_port: int = 0
    sniffer_log: str = "backhaul.json"
    skip_optz: bool = False
    mss: int = 0
    so_rcvbuf: int = 0
    so_sndbuf: int = 0
    heartbeat: int = DEFAULT_HEARTBEAT
    forwarder: tuple[tuple[str, str], ...] = ()
    auth: str = "token"

    def forward_target(self, target: str) -> str:
        """The address to dial for ``target``: a forwarder's right side, or ``target`` itself."""
        for left, right in self.forwarder:
            if left == target:
                return right
        return target


@dataclass(frozen=True)
class Config:
    """A whole file: either side, or both (then both run in one process)."""

    source: str
    server: ServerConfig | None
    client: ClientConfig | None


# Keys computed from others, never read from the file.
_DERIVED = {"bind_host", "bind_port", "remote_host", "remote_port", "token_is_default"}
_SERVER_KEYS = tuple(f.name for f in fields(ServerConfig) if f.name not in _DERIVED)
_CLIENT_KEYS = tuple(f.name for f in fields(ClientConfig) if f.name not in _DERIVED)


def python_log_level(name: str) -> int:
    """Map a logrus level name (any case) onto a :mod:`logging` level."""
    try:
        return _PY_LEVELS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {name!r}; expected one of: {', '.join(LOG_LEVELS)}"
        ) from None


def load(path: str) -> Config:
    """Read and validate the TOML file at ``path``."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigError(
            path, "", f"cannot read the file: {exc.strerror or exc}"
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(path, "", "the file is not valid UTF-8") from None
    return parse(text, path)


def parse(text: str, source: str = "<config>") -> Config:
    """Validate TOML ``text``; ``source`` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {exc}") from None
    for name, value in document.items():
        if name not in _SECTIONS:
            raise ConfigError(source, name, _unknown_top_level(name, value))
    if not document:
        raise ConfigError(source, "", "no [server] or [client] section found")
    server = (
        _server(_table(document, "server", source), source)
        if "server" in document
        else None
    )
    client = (
        _client(_table(document, "client", source), source)
        if "client" in document
        else None
    )
    return Config(source=source, server=server, client=client)


def _unknown_top_level(name: str, value: object) -> str:
    what = "unknown section" if isinstance(value, dict) else "unknown top-level key"
    return f"{what}; expected [server] and/or [client]{_did_you_mean(name, _SECTIONS)}"


def _did_you_mean(name: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _table(document: dict[str, object], name: str, source: str) -> dict[str, object]:
    table = document[name]
    if not isinstance(table, dict):
        raise ConfigError(source, name, f"expected a table: [{name}]")
    return table


class _Reader:
    """Typed access to one section, with errors that name ``section.key``."""

    def __init__(
        self,
        table: dict[str, object],
        source: str,
        section: str,
        known: tuple[str, ...],
    ) -> None:
        self.table = table
        self.source = source
        self.section = section
        for name in table:
            if name not in known:
                raise ConfigError(
                    source, self.key(name), f"unknown key{_did_you_mean(name, known)}"
                )

    def key(self, name: str) -> str:
        return f"{self.section}.{name}"

    def error(self, name: str, problem: str, value: object = None) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem, value)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.table.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, "expected an integer", value)
        if not low <= value <= high:
            raise self.error(name, f"must be between {low} and {high}", value)
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, "expected true or false", value)
        return value

    def string(self, name: str, default: str = "") -> str:
        value = self.table.get(name, default)
        if not isinstance(value, str):
            raise self.error(name, "expected a string", value)
        return value

    def choice(
        self,
        name: str,
        default: str,
        choices: tuple[str, ...],
        what: str,
        *,
        fold: bool = False,
    ) -> str:
        value = self.string(name, default)
        folded = value.lower() if fold else value
        if folded not in choices:
            raise self.error(
                name, f"unknown {what}; expected one of: {', '.join(choices)}", value
            )
        return folded

    def token(self) -> tuple[str, bool]:
        value = self.table.get("token", "")
        if not isinstance(value, str):
            raise self.error("token", "expected a string")  # never show the value
        size = len(value.encode())
        if size > MAX_TOKEN_BYTES:
            raise self.error("token", f"is {size} bytes long; the handshake carries at most {MAX_TOKEN_BYTES}")
        return (value, False) if value else (DEFAULT_TOKEN, True)

    def address(self, name: str, *, listen: bool) -> tuple[str, str, int]:
        if name not in self.table:
            raise self.error(name, "required key is missing")
        text = self.string(name)
        try:
            host, port = _split_host_port(text)
            number = _port_number(port, "port")
        except ValueError as exc:
            raise self.error(
                name, f'{exc}; expected host:port, e.g. "0.0.0.0:3080"', text
            ) from None
        if not host and not listen:
            raise self.error(name, "the host is missing; expected host:port", text)
        return text, host or "0.0.0.0", number


def _common(reader: _Reader) -> dict[str, object]:
    """Keys both sides share."""
    token, token_is_default = reader.token()
    heartbeat = (
        reader.integer("heartbeat", DEFAULT_HEARTBEAT, 0, 86400) or DEFAULT_HEARTBEAT
    )
    values: dict[str, object] = {
        "transport": reader.choice("transport", "tcp", TRANSPORTS, "transport"),
        "token": token,
        "token_is_default": token_is_default,
        "nodelay": reader.boolean("nodelay"),
        "keepalive_period": reader.integer("keepalive_period", 75, 1, 86400),
        "connection_pool": reader.integer("connection_pool", 8, 0, 65535),
        "mux_session": reader.integer("mux_session", 1, 1, 65535),
        "log_level": reader.choice(
            "log_level", "info", LOG_LEVELS, "log level", fold=True
        ),
        "heartbeat": heartbeat,
        "sniffer": reader.boolean("sniffer"),
        "web_port": reader.integer("web_port", 0, 0, 65535),
        "sniffer_log": reader.string("sniffer_log", "backhaul.json"),
        "skip_optz": reader.boolean("skip_optz"),
        "pprof": reader.boolean("pprof"),
        "mss": _mss(reader),
        "so_rcvbuf": reader.integer("so_rcvbuf", 0, 0, _INT_MAX),
        "so_sndbuf": reader.integer("so_sndbuf", 0, 0, _INT_MAX),
        "auth": _auth(reader),
    }
    values.update(_mux(reader))
    return values


def _auth(reader: _Reader) -> str:
    """Ours: how the handshake proves the token (docs/auth.md)."""
    value = reader.string("auth", "token")
    if value not in AUTH_MODES:
        raise reader.error("auth", 'expected "token" (the handshake of Backhaul v0.7.2, the default) or '
                           '"challenge" (ours, docs/auth.md: this program on both ends)', value)
    return value


def _mss(reader: _Reader) -> int:
    value = reader.integer("mss", 0, 0, 65535)
    if 0 < value < 88:
        raise reader.error(
            "mss", "must be 0 (the OS default) or between 88 and 65535", value
        )
    return value


def _mux(reader: _Reader) -> dict[str, int]:
    version = reader.integer("mux_version", 1, 1, 2)
    framesize = reader.integer("mux_framesize", 32768, 1, 65535)
    receive = reader.integer("mux_recievebuffer", 4194304, 1, _INT_MAX)
    stream = reader.integer("mux_streambuffer", 65536, 1, _INT_MAX)
    if stream > receive:
        problem = f"must be between 1 and mux_recievebuffer ({receive})"
        raise reader.error("mux_streambuffer", problem, stream)
    return {
        "mux_version": version,
        "mux_framesize": framesize,
        "mux_recievebuffer": receive,
        "mux_streambuffer": stream,
    }


def _server(table: dict[str, object], source: str) -> ServerConfig:
    reader = _Reader(table, source, "server", _SERVER_KEYS)
    bind_addr, bind_host, bind_port = reader.address("bind_addr", listen=True)
    return ServerConfig(
        bind_addr=bind_addr,
        bind_host=bind_host,
        bind_port=bind_port,
        channel_size=reader.integer("channel_size", 2048, 1, 1_000_000),
        mux_con=reader.integer("mux_con", 8, 1, 65535),
        accept_udp=reader.boolean("accept_udp"),
        proxy_protocol=reader.boolean("proxy_protocol"),
        tls_cert=_readable_file(reader, "tls_cert", required=_uses_tls(reader)),
        tls_key=_readable_file(reader, "tls_key", required=_uses_tls(reader)),
        ports=parse_ports(table.get("ports", []), source, reader.key("ports")),
        **_common(reader),  # type: ignore[arg-type]
    )


def _client(table: dict[str, object], source: str) -> ClientConfig:
    reader = _Reader(table, source, "client", _CLIENT_KEYS)
    remote_addr, remote_host, remote_port = reader.address("remote_addr", listen=False)
    return ClientConfig(
        remote_addr=remote_addr,
        remote_host=remote_host,
        remote_port=remote_port,
        aggressive_pool=reader.boolean("aggressive_pool"),
        retry_interval=reader.integer("retry_interval", 1, 1, 86400),
        dial_timeout=reader.integer("dial_timeout", 10, 1, 3600),
        edge_ip=_edge_ip(reader),
        tls_verify=reader.boolean("tls_verify"),
        tls_ca=_readable_file(reader, "tls_ca", required=False),
        tls_pin=_pin(reader),
        forwarder=_parse_forwarder(
            table.get("forwarder", []), source, reader.key("forwarder")
        ),
        **_common(reader),  # type: ignore[arg-type]
    )


# --- TLS (wss, wssmux) ----------------------------------------------------------------------

TLS_TRANSPORTS = ("wss", "wssmux")


def _uses_tls(reader: _Reader) -> bool:
    return reader.table.get("transport") in TLS_TRANSPORTS


def _readable_file(reader: _Reader, name: str, *, required: bool) -> str:
    """A path that must name a readable file (checked now, so the service fails at start)."""
    path = reader.string(name)
    if not path:
        if required:
            raise reader.error(name, f"required by transport {reader.table.get('transport')!r}: a PEM file")
        return ""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise reader.error(name, f"cannot read the file: {getattr(exc, 'strerror', None) or exc}", path) from None
    return path


def _pin(reader: _Reader) -> str:
    """sha256 fingerprint of the server certificate: 64 hex digits, colons allowed."""
    text = reader.string("tls_pin")
    digits = text.replace(":", "").lower()
    if text and (len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits)):
        raise reader.error("tls_pin", "expected the sha256 fingerprint of the server certificate: "
                           "64 hex digits, colons allowed", text)
    return digits


def _edge_ip(reader: _Reader) -> str:
    text = reader.string("edge_ip")
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise reader.error("edge_ip", "expected an IP address (the CDN edge to connect to)", text) from None
    return text


# --- addresses and ports --------------------------------------------------------------------


def _split_host_port(text: str) -> tuple[str, str]:
    """Split "host:port" / "[v6]:port"; brackets are removed from the host."""
    if any(char.isspace() for char in text):
        raise ValueError("spaces are not allowed")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError("an IPv6 address in brackets must be followed by :port")
        host = text[1:end]
        if not _is_ipv6(host):
            raise ValueError("brackets are only for IPv6 addresses")
        return host, text[end + 2 :]
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("the port is missing")
    if ":" in host:
        raise ValueError('an IPv6 address must be in brackets, e.g. "[::1]:443"')
    return host, port


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _port_number(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{what} {text!r} is not a number")
    number = int(text)
    if not 1 <= number <= 65535:
        raise ValueError(f"{what} {number} is out of range 1-65535")
    return number


def _port_range(text: str) -> tuple[int, int]:
    """ "443" -> (443, 443); "443-600" -> (443, 600)."""
    if "-" not in text:
        number = _port_number(text, "listen port")
        return number, number
    parts = [part.strip() for part in text.split("-")]
    if len(parts) != 2:
        raise ValueError(f"bad port range {text!r}; expected START-END, e.g. 443-600")
    start = _port_number(parts[0], "range start")
    end = _port_number(parts[1], "range end")
    if start > end:
        raise ValueError(f"range start {start} is greater than range end {end}")
    if end - start + 1 > MAX_RANGE_PORTS:
        raise ValueError(
            f"range {start}-{end} has {end - start + 1} ports; at most {MAX_RANGE_PORTS} are allowed"
        )
    return start, end


def _listen_side(text: str) -> tuple[str, int, int]:
    """Left side of a ports entry: a port, a port range, or host:port."""
    if not text:
        raise ValueError("the listen port is empty")
    if ":" not in text:
        return ("", *_port_range(text))
    host, port = _split_host_port(text)
    if "-" in port:
        raise ValueError("a port range cannot have a listen host")
    if not host:
        raise ValueError("the listen host before ':' is empty")
    number = _port_number(port, "listen port")
    return host, number, number


def _check_target(target: str) -> None:
    """The right side must be something a Go client can resolve: a port, or host:port."""
    if not target:
        raise ValueError("the target is empty")
    if any(char.isspace() for char in target):
        raise ValueError("spaces are not allowed in the target")
    if _is_ipv6_target(target):
        raise ValueError(
            "an IPv6 literal cannot be a target: the protocol's target string cannot carry one "
            "(a Go client refuses it); use a hostname or an IPv4 address"
        )
    if ":" not in target:
        _port_number(target, "target port")
        return
    host, _, port = target.partition(":")
    if not host:
        raise ValueError("the target host before ':' is empty")
    _port_number(port, "target port")


def _is_ipv6_target(target: str) -> bool:
    if target.startswith("["):
        return True
    return target.count(":") > 1 and (
        _is_ipv6(target) or _is_ipv6(target.rpartition(":")[0])
    )


def _ports_entry(entry: str) -> list[tuple[str, int, str]]:
    """Parse one ``ports`` entry into (listen_host, listen_port, target) triples."""
    if not entry.strip():
        raise ValueError("empty entry")
    parts = entry.split("=")
    if len(parts) > 2:
        raise ValueError("more than one '='; expected LISTEN=TARGET")
    if len(parts) == 1:
        return _ports_without_target(entry.strip())
    host, start, end = _listen_side(parts[0].strip())
    target = parts[1].strip()
    _check_target(target)
    return [(host, port, target) for port in range(start, end + 1)]


def _ports_without_target(text: str) -> list[tuple[str, int, str]]:
    if ":" in text:
        wrong = _RANGE_THEN_COLON.match(text)
        if wrong:
            fixed = f"{wrong.group(1).strip()}={wrong.group(2).strip()}"
            raise ValueError(
                f"use '=' between the listen port and the target: \"{fixed}\""
            )
        raise ValueError(
            "without '=' an entry is a port or a port range; use '=' to add a listen host "
            'or a target, e.g. "127.0.0.2:443=443"'
        )
    start, end = _port_range(text)
    if "-" not in text:
        return [("", start, text)]
    return [("", port, str(port)) for port in range(start, end + 1)]


def _address_text(host: str, port: int) -> str:
    shown = host or "0.0.0.0"
    return f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"


def parse_ports(
    entries: object, source: str, key: str = "server.ports"
) -> tuple[PortMapping, ...]:
    """Expand the ``ports`` list (the v0.7.2 syntax) into one PortMapping per listener."""
    if not isinstance(entries, list):
        raise ConfigError(source, key, "expected a list of strings", entries)
    mappings: list[PortMapping] = []
    owners: dict[tuple[str, int], tuple[int, str]] = {}
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        if not isinstance(entry, str):
            raise ConfigError(source, where, "expected a string", entry)
        try:
            triples = _ports_entry(entry)
        except ValueError as exc:
            raise ConfigError(source, where, str(exc), entry) from None
        for host, port, target in triples:
            slot = ((host or "0.0.0.0").lower(), port)
            if slot in owners:
                first, text = owners[slot]
                problem = f"listen address {_address_text(host, port)} is already used by {key}[{first}] ({text!r})"
                raise ConfigError(source, where, problem, entry)
            owners[slot] = (index, entry)
            mappings.append(
                PortMapping(
                    listen_host=host, listen_port=port, target=target, entry=entry
                )
            )
    return tuple(mappings)


def _forwarder_entry(entry: str) -> tuple[str, str]:
    parts = entry.split("=")
    if len(parts) != 2:
        raise ValueError("expected TARGET=HOST:PORT with exactly one '='")
    left, right = parts[0].strip(), parts[1].strip()
    if not left:
        raise ValueError("the left side (the target the server sends) is empty")
    if not right:
        raise ValueError("the right side (host:port to dial) is empty")
    if ":" not in right:
        raise ValueError("the right side must be host:port")
    return left, right


def _parse_forwarder(
    entries: object, source: str, key: str
) -> tuple[tuple[str, str], ...]:
    """``forwarder`` rules. A right side whose port is not numeric loads; dialing it fails later."""
    if not isinstance(entries, list):
        raise ConfigError(source, key, "expected a list of strings", entries)
    rules: list[tuple[str, str]] = []
    owners: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]"
        if not isinstance(entry, str):
            raise ConfigError(source, where, "expected a string", entry)
        try:
            left, right = _forwarder_entry(entry)
        except ValueError as exc:
            raise ConfigError(source, where, str(exc), entry) from None
        if left in owners:
            raise ConfigError(
                source,
                where,
                f"'{left}' is already forwarded by {key}[{owners[left]}]",
                entry,
            )
        owners[left] = index
        rules.append((left, right))
    return tuple(rules)
