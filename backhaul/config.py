"""Turn a Backhaul TOML file into frozen, fully validated server and client settings.

Every key is checked here, once, so the runtime that opens the sockets never meets a bad value.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import os
import re
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 and older
    import tomli as tomllib  # type: ignore[no-redef]

from backhaul.errors import ConfigError

DEFAULT_TOKEN = "musix"
TRANSPORTS = ("tcp", "tcpmux", "ws", "wss", "wsmux", "wssmux", "udp")
CLIENT_MODES = ("replace", "balance")
LOG_LEVELS = ("panic", "fatal", "error", "warn", "warning", "info", "debug", "trace")
AUTH_MODES = ("token", "challenge")  # ours: "challenge" is docs/auth.md, both ends this program

DEFAULT_HEARTBEAT = 40
DEFAULT_WEB_ADDR = "127.0.0.1"   # ours: the status page is local unless asked otherwise
DEFAULT_DRAIN = 10               # ours: seconds open user connections get to finish on SIGTERM
DEFAULT_FAILBACK_IDLE = 60       # ours: seconds without users before the client returns to its first server
MAX_SERVERS = 16                 # addresses in a client's remote_addr list
MAX_TOKEN_BYTES = 0xFFFF  # the handshake's u16 length
CREDENTIAL = "token"      # the systemd credential holding the token: LoadCredential=token:FILE in the unit
MAX_RANGE_PORTS = 1000
_INT_MAX = 2**31 - 1
_SECTIONS = ("server", "client")
_CONGESTION_NAME = re.compile(r"[a-z0-9_-]{1,15}")  # the kernel's names: TCP_CA_NAME_MAX is 16 with the NUL
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
class Remote:
    """One server address of a client's remote_addr: as written, and split."""

    addr: str
    host: str
    port: int


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


def setting(default: Any, doc: str, *, secret: bool = False) -> Any:
    """A key of the file: its default (REQUIRED: none) and the line the man page says about it.

    The description sits beside the key so that adding a key documents it in the same place.
    """
    return field(default=default, repr=not secret, metadata={"doc": doc})


REQUIRED: Any = MISSING

# The keys both sides have: default and description, declared once (a description of "" is each
# side's own, given where it names the key). Each side's class names them where its man page
# section lists them; ``_common`` reads and checks them for both.
_SHARED: dict[str, tuple[Any, str]] = {
    "nodelay": (False, ""),
    "keepalive_period": (75, ""),
    "connection_pool": (8, ""),
    "mux_session": (1, ""),
    "heartbeat": (DEFAULT_HEARTBEAT, ""),
    "mss": (0, ""),
    "so_rcvbuf": (0, ""),
    "so_sndbuf": (0, ""),
    "transport": ("tcp", f"tunnel transport, the same on both sides: {', '.join(TRANSPORTS)}"),
    "token": (DEFAULT_TOKEN, f'shared secret, the same on both sides (see TOKEN); unset anywhere: '
              f'"{DEFAULT_TOKEN}", with a warning'),
    "token_file": ("", "a file holding the token (one line), instead of token; relative to this file's "
                   "directory (ours)"),
    "log_level": ("info", f"least severe level logged: {', '.join(LOG_LEVELS)}"),
    "pprof": (False, "accepted for compatibility; logs that it has no effect"),
    "mux_version": (1, "smux protocol version, 1 or 2, the same on both sides (2: per-stream windows)"),
    "mux_framesize": (32768, "largest smux frame sent, in bytes (any up to 65535 is accepted, as Go does)"),
    "mux_recievebuffer": (4194304, "unread bytes per smux session before its socket is no longer read"),
    "mux_streambuffer": (65536, "smux version 2: a stream's first window, in bytes; it grows with the path"),
    "sniffer": (False, "write the per-port usage to sniffer_log every few seconds"),
    "web_port": (0, "port of the status page, /metrics and /healthz (0: off)"),
    "sniffer_log": ("backhaul.json", "file the per-port usage is written to (JSON) when sniffer is on"),
    "web_addr": (DEFAULT_WEB_ADDR, "address the status page listens on (ours)"),
    "drain_timeout": (DEFAULT_DRAIN, "seconds open connections may take to finish after SIGTERM (ours)"),
    "skip_optz": (False, "accepted for compatibility; the host's settings are never changed"),
    "congestion": ("", 'TCP congestion control of tunnel connections, e.g. "bbr" (empty: the host\'s) (ours)'),
    "auth": ("token", '"token" (v0.7.2) or "challenge": HMAC proofs, the token never sent; the same on both '
             "sides (ours)"),
}


def shared(name: str, doc: str = "") -> Any:
    """The key ``name`` of ``_SHARED`` as a field of either side; ``doc``: this side's description
    of a key the sides describe each in their own words."""
    default, common_doc = _SHARED[name]
    assert bool(doc) != bool(common_doc), f"{name}: one description, the shared one or the side's"
    return setting(default, doc or common_doc, secret=name == "token")


def _default(name: str) -> Any:
    return _SHARED[name][0]


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` table."""

    bind_addr: str = setting(REQUIRED, 'tunnel listen address, host:port (e.g. "0.0.0.0:3080"); clients dial it')
    clients: str = setting("replace", '"replace": a new client takes over (as in Go); "balance": all stay, users '
                           "go to the most idle (ours)")
    bind_host: str = ""
    bind_port: int = 0
    transport: str = shared("transport")
    token: str = shared("token")
    token_file: str = shared("token_file")
    token_is_default: bool = True
    token_source: str = ""   # where the token came from, said by check: never the token itself
    nodelay: bool = shared("nodelay", "TCP_NODELAY on tunnel and user connections")
    keepalive_period: int = shared("keepalive_period", "seconds between TCP keepalive probes on tunnel connections")
    channel_size: int = setting(2048, "bound of the queues of waiting user connections and of idle data connections")
    connection_pool: int = shared("connection_pool", "idle data connections kept ready at least (tcp, ws, wss: more "
                                                     "under load)")
    mux_session: int = shared("mux_session", "accepted for compatibility; the client decides how many sessions it "
                                             "opens")
    log_level: str = shared("log_level")
    ports: tuple[PortMapping, ...] = setting((), "public listeners and the target each sends to the client (see PORTS)")
    heartbeat: int = shared("heartbeat", "seconds between heartbeats on the control channel (0: the default)")
    mux_con: int = setting(8, "tcpmux, wsmux: streams per smux session before the client is asked for another")
    mux_version: int = shared("mux_version")
    mux_framesize: int = shared("mux_framesize")
    mux_recievebuffer: int = shared("mux_recievebuffer")
    mux_streambuffer: int = shared("mux_streambuffer")
    accept_udp: bool = setting(False, "tcp transport: the public ports also carry UDP, one flow per user address")
    udp_max_flows: int = setting(4096, "UDP flows kept at once, all ports together; past it one makes room (ours)")
    proxy_protocol: bool = setting(False, "send a PROXY v2 header to the target before the user's bytes")
    tls_cert: str = setting("", "wss, wssmux: the server certificate, a PEM file (required by those transports)")
    tls_key: str = setting("", "wss, wssmux: the certificate's private key, a PEM file (required by those transports)")
    sniffer: bool = shared("sniffer")
    web_port: int = shared("web_port")
    sniffer_log: str = shared("sniffer_log")
    web_addr: str = shared("web_addr")
    drain_timeout: int = shared("drain_timeout")
    skip_optz: bool = shared("skip_optz")
    pprof: bool = shared("pprof")
    mss: int = shared("mss", "TCP maximum segment size on tunnel and user sockets (0: the OS default)")
    so_rcvbuf: int = shared("so_rcvbuf", "SO_RCVBUF on tunnel and user sockets, in bytes (0: the OS default)")
    so_sndbuf: int = shared("so_sndbuf", "SO_SNDBUF on tunnel sockets, in bytes (0: the OS default)")
    congestion: str = shared("congestion")
    auth: str = shared("auth")


@dataclass(frozen=True)
class ClientConfig:
    """The ``[client]`` table."""

    remote_addr: str = setting(REQUIRED, "the server's bind_addr as reachable from here, host:port; or a list, "
                               "tried in order (ours)")
    remote_host: str = ""
    remote_port: int = 0
    servers: tuple[Remote, ...] = ()   # every address of remote_addr, in order; remote_addr is the first
    failback_idle: int = setting(DEFAULT_FAILBACK_IDLE, "seconds without users before going back to an earlier "
                                 "remote_addr (0: never) (ours)")
    local_addr: str = setting("", "local IP address the connections to the server leave from (empty: any) (ours)")
    transport: str = shared("transport")
    token: str = shared("token")
    token_file: str = shared("token_file")
    token_is_default: bool = True
    token_source: str = ""   # where the token came from, said by check: never the token itself
    connection_pool: int = shared("connection_pool", "data connections (mux: sessions) opened right after the "
                                                     "handshake")
    aggressive_pool: bool = setting(False, "grow the pool of data connections faster under load")
    retry_interval: int = setting(1, "seconds between attempts to reach the server, forever")
    dial_timeout: int = setting(10, "seconds allowed for a connection to the server or to a target")
    nodelay: bool = shared("nodelay", "TCP_NODELAY on data connections (the control channel and targets always have "
                                      "it)")
    keepalive_period: int = shared("keepalive_period", "seconds between TCP keepalive probes on tunnel and target "
                                                       "connections")
    log_level: str = shared("log_level")
    pprof: bool = shared("pprof")
    mux_version: int = shared("mux_version")
    mux_framesize: int = shared("mux_framesize")
    mux_recievebuffer: int = shared("mux_recievebuffer")
    mux_streambuffer: int = shared("mux_streambuffer")
    mux_session: int = shared("mux_session", "tcpmux, wsmux: smux sessions kept open at least")
    edge_ip: str = setting("", "ws transports: connect to this IP address (a CDN edge); Host and SNI stay remote_addr")
    tls_verify: bool = setting(False, "wss, wssmux: check the server's certificate against tls_ca or the system's CAs")
    tls_ca: str = setting("", "wss, wssmux: a PEM file of the certificate authorities to trust")
    tls_pin: str = setting("", "wss, wssmux: sha256 fingerprint of the server's certificate (64 hex digits)")
    sniffer: bool = shared("sniffer")
    web_port: int = shared("web_port")
    sniffer_log: str = shared("sniffer_log")
    web_addr: str = shared("web_addr")
    drain_timeout: int = shared("drain_timeout")
    skip_optz: bool = shared("skip_optz")
    mss: int = shared("mss", "TCP maximum segment size on tunnel sockets (0: the OS default)")
    so_rcvbuf: int = shared("so_rcvbuf", "SO_RCVBUF on tunnel sockets, in bytes (0: the OS default)")
    so_sndbuf: int = shared("so_sndbuf", "SO_SNDBUF on tunnel sockets, in bytes (0: the OS default)")
    congestion: str = shared("congestion")
    auth: str = shared("auth")
    heartbeat: int = shared("heartbeat", "accepted; the silence limit follows the server's heartbeats")
    forwarder: tuple[tuple[str, str], ...] = setting((), '"TARGET=HOST:PORT": dial HOST:PORT for the target TARGET')

    def __post_init__(self) -> None:
        if not self.servers:   # made in code with one address: that one is the list
            object.__setattr__(self, "servers", (Remote(self.remote_addr, self.remote_host, self.remote_port),))

    def forward_target(self, target: str) -> str:
        """The address to dial for ``target``: a forwarder's right side, or ``target`` itself."""
        for left, right in self.forwarder:
            if left == target:
                return right
        return target

    def for_server(self, index: int) -> ClientConfig:
        """This config as it dials ``servers[index]``: a session with that server reads its address
        from remote_addr, remote_host and remote_port like any single-server config."""
        remote = self.servers[index]
        if remote.addr == self.remote_addr:
            return self
        return replace(self, remote_addr=remote.addr, remote_host=remote.host, remote_port=remote.port)


@dataclass(frozen=True)
class Config:
    """A whole file: either side, or both (then both run in one process)."""

    source: str
    server: ServerConfig | None
    client: ClientConfig | None


# Fields computed from others, never read from the file.
_DERIVED = {"bind_host", "bind_port", "remote_host", "remote_port", "servers", "token_is_default", "token_source"}


def file_keys(side: type[ServerConfig] | type[ClientConfig]) -> tuple[Field[Any], ...]:
    """The fields of ``side`` that are keys of the file, in the order the man page lists them."""
    return tuple(f for f in fields(side) if f.name not in _DERIVED)


def file_value(side: ServerConfig | ClientConfig, name: str) -> object:
    """The value of key ``name`` in effect, as it would be written in the file."""
    value = getattr(side, name)
    if name == "ports":
        return list(dict.fromkeys(mapping.entry for mapping in value))  # a range is one entry
    if name == "forwarder":
        return [f"{left}={right}" for left, right in value]
    if name == "remote_addr" and isinstance(side, ClientConfig) and len(side.servers) > 1:
        return [remote.addr for remote in side.servers]
    return value


def toml_value(value: object) -> str:
    """``value`` (a string, integer, boolean or a sequence of strings) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    return str(value)


_SERVER_KEYS = tuple(f.name for f in file_keys(ServerConfig))
_CLIENT_KEYS = tuple(f.name for f in file_keys(ClientConfig))


def changed_keys(old: ServerConfig | ClientConfig, new: ServerConfig | ClientConfig) -> list[str]:
    """The keys of the file whose values differ between two configs of one side (a reload)."""
    keys = _SERVER_KEYS if isinstance(old, ServerConfig) else _CLIENT_KEYS
    # token_file matters only through the token it holds: a moved file with the same token changes nothing
    changed = [name for name in keys if name != "token_file" and file_value(old, name) != file_value(new, name)]
    if "token" not in changed and old.token_is_default != new.token_is_default:
        changed.append("token")
    return changed


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
    except PermissionError as exc:
        # The units run as a user of their own (DynamicUser=): a file of mode 0600 is root's alone.
        raise ConfigError(path, "", f"cannot read the file: {exc.strerror or exc} (this process runs as uid "
                          f"{os.geteuid()}); keep the token out of it (token_file, or the systemd credential "
                          f"{CREDENTIAL!r}) and make it readable, e.g. mode 0644") from None
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
    if server is not None and client is not None and server.web_port and server.web_port == client.web_port \
            and server.web_addr == client.web_addr:
        raise ConfigError(source, "client.web_port", f"{client.web_addr}:{client.web_port} is already the "
                          "server's status page; give each side its own port", client.web_port)
    if server is not None and client is not None and server.sniffer and client.sniffer \
            and server.sniffer_log == client.sniffer_log:
        raise ConfigError(source, "client.sniffer_log", "the server writes its usage to this file already; "
                          "give each side its own file", client.sniffer_log)
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

    def token(self) -> tuple[str, bool, str, str]:
        """The token, whether it is the default, token_file as written and where the token came
        from: the key token, token_file, or the systemd credential "token". Two of them is an
        error (which one would win is a guess an operator should not have to make)."""
        value = self.table.get("token", "")
        if not isinstance(value, str):
            raise self.error("token", "expected a string")  # never show the value
        size = len(value.encode())
        if size > MAX_TOKEN_BYTES:
            raise self.error("token", f"is {size} bytes long; the handshake carries at most {MAX_TOKEN_BYTES}")
        path = self.string("token_file")
        found = [(value, "token", "set in the file")] if value else []
        if path:
            if value:
                raise self.error("token_file", "token is set as well; keep one")
            where = os.path.join(os.path.dirname(self.source), path)
            try:
                found.append((read_secret(where), "token_file", f"from token_file {where}"))
            except ValueError as exc:
                raise self.error("token_file", str(exc), path) from None
        credential = _credential_path()
        if credential:
            try:
                secret = read_secret(credential, empty_ok=True)
            except ValueError as exc:
                raise ConfigError(credential, "", f"the systemd credential {CREDENTIAL!r}: {exc}") from None
            if secret and found:
                raise self.error(found[0][1], f"the systemd credential {CREDENTIAL!r} ({credential}) holds a "
                                 "token as well; keep one")
            if secret:
                found.append((secret, "", f"from the systemd credential {CREDENTIAL!r} ({credential})"))
        if not found:
            return DEFAULT_TOKEN, True, path, ""
        token, _key, source = found[0]
        return token, False, path, source

    def address(self, name: str, *, listen: bool) -> tuple[str, str, int]:
        if name not in self.table:
            raise self.error(name, "required key is missing")
        return self.split_address(name, self.string(name), listen=listen)

    def split_address(self, name: str, text: str, *, listen: bool) -> tuple[str, str, int]:
        """``text`` (the value of ``name``) as (text, host, port)."""
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


def _credential_path() -> str:
    """The file of the systemd credential "token" when systemd gave this process credentials."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    return os.path.join(directory, CREDENTIAL) if directory else ""


def read_secret(path: str, *, empty_ok: bool = False) -> str:
    """The one line of a secret file, its line ending dropped. ValueError says what is wrong
    with the file and never shows what it holds. A missing file is "" when ``empty_ok``."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TOKEN_BYTES + 3)  # the longest token and a line ending, and one byte to tell
    except FileNotFoundError:
        if empty_ok:
            return ""
        raise ValueError("cannot read the file: no such file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ValueError(f"cannot read the file: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("the file is not valid UTF-8") from None
    if "\n" in text or "\r" in text:
        raise ValueError("the file holds more than one line; it must hold the token alone")
    if not text and not empty_ok:
        raise ValueError("the file is empty")
    if len(text.encode()) > MAX_TOKEN_BYTES:   # only so much was read: its true length is not known
        raise ValueError(f"the token in the file is longer than the handshake carries ({MAX_TOKEN_BYTES} bytes)")
    return text


def _common(reader: _Reader) -> dict[str, object]:
    """Keys both sides share."""
    token, token_is_default, token_file, token_source = reader.token()
    heartbeat = (
        reader.integer("heartbeat", _default("heartbeat"), 0, 86400) or DEFAULT_HEARTBEAT
    )
    values: dict[str, object] = {
        "transport": reader.choice("transport", _default("transport"), TRANSPORTS, "transport"),
        "token": token,
        "token_is_default": token_is_default,
        "token_file": token_file,
        "token_source": token_source,
        "nodelay": reader.boolean("nodelay", _default("nodelay")),
        "keepalive_period": reader.integer("keepalive_period", _default("keepalive_period"), 1, 86400),
        "connection_pool": reader.integer("connection_pool", _default("connection_pool"), 0, 65535),
        "mux_session": reader.integer("mux_session", _default("mux_session"), 1, 65535),
        "log_level": reader.choice("log_level", _default("log_level"), LOG_LEVELS, "log level", fold=True),
        "heartbeat": heartbeat,
        "sniffer": reader.boolean("sniffer", _default("sniffer")),
        "web_port": reader.integer("web_port", _default("web_port"), 0, 65535),
        "sniffer_log": _sniffer_log(reader),
        "web_addr": _web_addr(reader),
        "drain_timeout": reader.integer("drain_timeout", _default("drain_timeout"), 0, 3600),
        "skip_optz": reader.boolean("skip_optz", _default("skip_optz")),
        "pprof": reader.boolean("pprof", _default("pprof")),
        "mss": _mss(reader),
        "so_rcvbuf": reader.integer("so_rcvbuf", _default("so_rcvbuf"), 0, _INT_MAX),
        "so_sndbuf": reader.integer("so_sndbuf", _default("so_sndbuf"), 0, _INT_MAX),
        "congestion": _congestion(reader),
        "auth": _auth(reader),
    }
    values.update(_mux(reader))
    return values


def _auth(reader: _Reader) -> str:
    """Ours: how the handshake proves the token (docs/auth.md)."""
    value = reader.string("auth", _default("auth"))
    if value not in AUTH_MODES:
        raise reader.error("auth", 'expected "token" (the handshake of Backhaul v0.7.2, the default) or '
                           '"challenge" (ours, docs/auth.md: this program on both ends)', value)
    return value

def _congestion(reader: _Reader) -> str:
    """Ours: a TCP congestion control by the kernel's name. Whether this host has it is known only
    where the program runs: the socket that is refused it says so (backhaul.net)."""
    value = reader.string("congestion", _default("congestion"))
    if value and not _CONGESTION_NAME.fullmatch(value):
        raise reader.error("congestion", 'expected the kernel\'s name of a TCP congestion control, e.g. "bbr" or '
                           '"cubic" (at most 15 lower-case letters, digits, "_" or "-"; empty: the host\'s)', value)
    return value


def _web_addr(reader: _Reader) -> str:
    """The address the status page binds: an IP address, never a name (no lookup at start)."""
    text = reader.string("web_addr", _default("web_addr"))
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise reader.error("web_addr", 'expected an IP address to serve the status page on, e.g. "127.0.0.1" '
                           'or "::1"', text) from None
    return text


def _sniffer_log(reader: _Reader) -> str:
    text = reader.string("sniffer_log", _default("sniffer_log"))
    if not text or text.endswith("/"):
        raise reader.error("sniffer_log", "expected the path of a file to write the usage to", text)
    return text


def _mss(reader: _Reader) -> int:
    value = reader.integer("mss", _default("mss"), 0, 65535)
    if 0 < value < 88:
        raise reader.error(
            "mss", "must be 0 (the OS default) or between 88 and 65535", value
        )
    return value


def _mux(reader: _Reader) -> dict[str, int]:
    version = reader.integer("mux_version", _default("mux_version"), 1, 2)
    framesize = reader.integer("mux_framesize", _default("mux_framesize"), 1, 65535)
    receive = reader.integer("mux_recievebuffer", _default("mux_recievebuffer"), 1, _INT_MAX)
    stream = reader.integer("mux_streambuffer", _default("mux_streambuffer"), 1, _INT_MAX)
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
        clients=reader.choice("clients", "replace", CLIENT_MODES, "mode"),
        channel_size=reader.integer("channel_size", 2048, 1, 1_000_000),
        mux_con=reader.integer("mux_con", 8, 1, 65535),
        accept_udp=reader.boolean("accept_udp"),
        udp_max_flows=reader.integer("udp_max_flows", 4096, 1, 1_000_000),
        proxy_protocol=reader.boolean("proxy_protocol"),
        tls_cert=_readable_file(reader, "tls_cert", required=_uses_tls(reader)),
        tls_key=_readable_file(reader, "tls_key", required=_uses_tls(reader)),
        ports=parse_ports(table.get("ports", []), source, reader.key("ports")),
        **_common(reader),  # type: ignore[arg-type]
    )


def _client(table: dict[str, object], source: str) -> ClientConfig:
    reader = _Reader(table, source, "client", _CLIENT_KEYS)
    servers = _remote_addrs(reader)
    return ClientConfig(
        remote_addr=servers[0].addr,
        remote_host=servers[0].host,
        remote_port=servers[0].port,
        servers=servers,
        failback_idle=reader.integer("failback_idle", DEFAULT_FAILBACK_IDLE, 0, 86400),
        local_addr=_local_addr(reader, servers),
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


def _remote_addrs(reader: _Reader) -> tuple[Remote, ...]:
    """remote_addr: one host:port, or a list of them (failover, in order of preference)."""
    value = reader.table.get("remote_addr")
    if not isinstance(value, list):
        return (Remote(*reader.address("remote_addr", listen=False)),)
    if not value:
        raise reader.error("remote_addr", 'expected host:port or a list of them, e.g. ["a.example:3080", '
                           '"b.example:3080"]', value)
    if len(value) > MAX_SERVERS:
        raise reader.error("remote_addr", f"has {len(value)} addresses; at most {MAX_SERVERS} are allowed")
    servers: list[Remote] = []
    for index, item in enumerate(value):
        name = f"remote_addr[{index}]"
        if not isinstance(item, str):
            raise reader.error(name, "expected a string, host:port", item)
        remote = Remote(*reader.split_address(name, item, listen=False))
        if any(other.addr == remote.addr for other in servers):
            raise reader.error(name, "is already in the list", item)
        servers.append(remote)
    return tuple(servers)


def _local_addr(reader: _Reader, servers: tuple[Remote, ...]) -> str:
    """An IP address of this host to connect from; a server given as an address of the other
    family could never be reached from it."""
    text = reader.string("local_addr")
    if not text:
        return ""
    try:
        version = ipaddress.ip_address(text).version
    except ValueError:
        raise reader.error("local_addr", 'expected an IP address of this host, e.g. "192.0.2.7"', text) from None
    for index, remote in enumerate(servers):
        try:
            other = ipaddress.ip_address(remote.host).version
        except ValueError:
            continue  # a name: its address is known when it is looked up
        if other != version:
            where = f"remote_addr[{index}]" if len(servers) > 1 else "remote_addr"
            raise reader.error("local_addr", f"is IPv{version}, but {where} {remote.addr} is IPv{other}", text)
    return text


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


def address_text(host: str, port: int) -> str:
    """``host:port`` as an operator writes it: all interfaces for no host, IPv6 in brackets."""
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
                problem = f"listen address {address_text(host, port)} is already used by {key}[{first}] ({text!r})"
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
