"""Tests for the configuration loader: seed examples, defaults, every ports form, every error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from backhaul.config import (
    DEFAULT_TOKEN,
    LOG_LEVELS,
    TRANSPORTS,
    ClientConfig,
    Config,
    PortMapping,
    ServerConfig,
    changed_keys,
    load,
    parse,
    parse_ports,
    python_log_level,
)
from backhaul.errors import ConfigError

pytestmark = pytest.mark.timeout(10)

# The user's README examples, copied verbatim (comments included).
SEED_SERVER = """\
[server]
bind_addr = "0.0.0.0:3080" # Address and port for the server to listen (mandatory).
transport = "tcp"          # Protocol ("tcp", "tcpmux", or "ws", optional, default: "tcp").
token = "your_token"       # Authentication token (optional).
nodelay = false            # Enable TCP_NODELAY (optional, default: false).
channel_size = 2048        # Tunnel channel size. Excess connections are discarded. Only for tcp and ws mode (optional, default: 2048).
connection_pool = 8        # Number of pre-established connections. Only for tcp mode (optional, default: 8).
mux_session = 1            # Number of mux sessions for tcpmux. (optional, default: 1).
log_level = "info"         # Log level ("panic", "fatal", "error", "warn", "info", "debug", "trace", optional, default: "info").

ports = [ # Local to remote port mapping in this format LocalPort=RemotePort (mandatory).
    "4000=5201",
    "4001=5201",
]
"""

SEED_CLIENT = """\
[client]
remote_addr = "0.0.0.0:3080" # Server address and port (mandatory).
transport = "tcp"            # Protocol ("tcp", "tcpmux", or "ws", optional, default: "tcp").
token = "your_token"         # Authentication token (optional).
nodelay = false              # Use TCP_NODELAY (optional, default: false).
retry_interval = 1           # Retry interval in seconds (optional, default: 1).
log_level = "info"           # Log level ("panic", "fatal", "error", "warn", "info", "debug", "trace", optional, default: "info").
mux_session = 1              # Number of mux sessions for tcpmux. (optional, default: 1).

forwarder = [ # Forward incoming connection to another address. optional.
   "4000=IP:PORT",
   "4001=127.0.0.1:9090",
]
"""

# The README's per-transport snippets.
SEED_SNIPPETS = [
    '[server]\nbind_addr = "0.0.0.0:3080"\ntransport = "tcp"\nchannel_size = 2048\nconnection_pool = 8\n',
    '[client]\nremote_addr = "0.0.0.0:3080"\ntransport = "tcp"\n',
    '[server]\nbind_addr = "0.0.0.0:3080"\ntransport = "tcpmux"\nmux_session = 10\n',
    '[client]\nremote_addr = "0.0.0.0:3080"\ntransport = "tcpmux"\nmux_session = 10\n',
    '[server]\nbind_addr = "0.0.0.0:3080"\ntransport = "ws"\nchannel_size = 2048\n',
    '[client]\nremote_addr = "0.0.0.0:3080"\ntransport = "ws"\n',
]

SERVER = '[server]\nbind_addr = "0.0.0.0:3080"\n'
CLIENT = '[client]\nremote_addr = "198.51.100.7:3080"\n'
CONGESTION_PROBLEM = ('expected the kernel\'s name of a TCP congestion control, e.g. "bbr" or "cubic" (at most 15 '
                      'lower-case letters, digits, "_" or "-"; empty: the host\'s)')
SECRET = "Zq9-very-SECRET-t0ken"


def _mapping(port: int, target: str, entry: str, host: str = "") -> PortMapping:
    return PortMapping(listen_host=host, listen_port=port, target=target, entry=entry)


# --- the seed examples ----------------------------------------------------------------------


def test_seed_server_example_loads_unchanged() -> None:
    server = parse(SEED_SERVER, "config.toml").server
    assert server is not None
    assert (server.bind_addr, server.bind_host, server.bind_port) == (
        "0.0.0.0:3080",
        "0.0.0.0",
        3080,
    )
    assert server.transport == "tcp"
    assert server.token == "your_token"
    assert server.token_is_default is False
    assert server.nodelay is False
    assert (server.channel_size, server.connection_pool, server.mux_session) == (
        2048,
        8,
        1,
    )
    assert server.log_level == "info"
    assert server.ports == (
        _mapping(4000, "5201", "4000=5201"),
        _mapping(4001, "5201", "4001=5201"),
    )
    assert server.ports[0].listen_addr == ("0.0.0.0", 4000)


def test_seed_client_example_loads_unchanged() -> None:
    config = parse(SEED_CLIENT, "config.toml")
    client = config.client
    assert config.server is None
    assert client is not None
    assert (client.remote_addr, client.remote_host, client.remote_port) == (
        "0.0.0.0:3080",
        "0.0.0.0",
        3080,
    )
    assert client.transport == "tcp"
    assert client.token == "your_token"
    assert client.token_is_default is False
    assert client.nodelay is False
    assert client.retry_interval == 1
    assert client.log_level == "info"
    assert client.mux_session == 1
    assert client.forwarder == (("4000", "IP:PORT"), ("4001", "127.0.0.1:9090"))


@pytest.mark.parametrize("text", SEED_SNIPPETS)
def test_seed_snippets_load(text: str) -> None:
    config = parse(text)
    side = config.server or config.client
    assert side is not None
    assert side.transport in ("tcp", "tcpmux", "ws")


def test_both_sections_in_one_file() -> None:
    config = parse(SEED_SERVER + "\n" + SEED_CLIENT, "both.toml")
    assert config.source == "both.toml"
    assert config.server is not None and config.client is not None
    assert config.server.ports[1].listen_port == 4001
    assert config.client.forward_target("4001") == "127.0.0.1:9090"


# --- defaults -------------------------------------------------------------------------------


def test_server_defaults() -> None:
    server = parse(SERVER).server
    assert server == ServerConfig(
        bind_addr="0.0.0.0:3080", bind_host="0.0.0.0", bind_port=3080
    )
    assert server.transport == "tcp"
    assert server.token == DEFAULT_TOKEN == "musix"
    assert server.token_is_default is True
    assert (server.nodelay, server.keepalive_period, server.channel_size) == (
        False,
        75,
        2048,
    )
    assert (server.connection_pool, server.mux_session, server.log_level) == (
        8,
        1,
        "info",
    )
    assert (server.ports, server.heartbeat, server.mux_con) == ((), 40, 8)
    assert (server.mux_version, server.mux_framesize) == (1, 32768)
    assert (server.mux_recievebuffer, server.mux_streambuffer) == (4194304, 65536)
    assert (
        server.accept_udp,
        server.proxy_protocol,
        server.tls_cert,
        server.tls_key,
    ) == (False, False, "", "")
    assert server.udp_max_flows == 4096
    assert (server.sniffer, server.web_port, server.sniffer_log) == (
        False,
        0,
        "backhaul.json",
    )
    assert (
        server.skip_optz,
        server.pprof,
        server.mss,
        server.so_rcvbuf,
        server.so_sndbuf,
    ) == (False, False, 0, 0, 0)


def test_client_defaults() -> None:
    client = parse(CLIENT).client
    assert client == ClientConfig(
        remote_addr="198.51.100.7:3080", remote_host="198.51.100.7", remote_port=3080
    )
    assert (client.transport, client.token, client.token_is_default) == (
        "tcp",
        "musix",
        True,
    )
    assert (client.connection_pool, client.aggressive_pool, client.retry_interval) == (
        8,
        False,
        1,
    )
    assert (client.dial_timeout, client.nodelay, client.keepalive_period) == (
        10,
        False,
        75,
    )
    assert (client.log_level, client.pprof, client.mux_session, client.edge_ip) == (
        "info",
        False,
        1,
        "",
    )
    assert (client.mux_version, client.mux_framesize) == (1, 32768)
    assert (client.mux_recievebuffer, client.mux_streambuffer) == (4194304, 65536)
    assert (client.sniffer, client.web_port, client.sniffer_log) == (
        False,
        0,
        "backhaul.json",
    )
    assert (client.skip_optz, client.mss, client.so_rcvbuf, client.so_sndbuf) == (
        False,
        0,
        0,
        0,
    )
    assert (client.heartbeat, client.forwarder) == (40, ())


def test_empty_token_means_default() -> None:
    config = parse(SERVER + 'token = ""\n' + CLIENT + 'token = ""\n')
    assert config.server is not None and config.client is not None
    assert (config.server.token, config.server.token_is_default) == ("musix", True)
    assert (config.client.token, config.client.token_is_default) == ("musix", True)


def test_token_is_read_raw() -> None:
    server = parse(SERVER + 'token = "  spaced token "\n').server
    assert server is not None
    assert (server.token, server.token_is_default) == ("  spaced token ", False)


def test_every_v072_key_is_accepted(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("PEM\n")
    server_text = (
        SERVER
        + """\
transport = "wssmux"
token = "t"
nodelay = true
keepalive_period = 20
channel_size = 4096
connection_pool = 0
mux_session = 3
log_level = "DEBUG"
ports = ["443"]
pprof = true
heartbeat = 0
mux_con = 16
mux_version = 2
mux_framesize = 65535
mux_recievebuffer = 1048576
mux_streambuffer = 1048576
accept_udp = true
proxy_protocol = true
tls_cert = "{cert}"
tls_key = "{key}"
sniffer = true
web_port = 2060
sniffer_log = "/var/log/b.json"
skip_optz = true
mss = 1360
so_rcvbuf = 4194304
so_sndbuf = 1
"""
    )
    client_text = (
        CLIENT
        + """\
transport = "wssmux"
token = "t"
connection_pool = 24
aggressive_pool = true
retry_interval = 3
dial_timeout = 5
nodelay = true
keepalive_period = 20
log_level = "trace"
pprof = true
mux_version = 2
mux_framesize = 1
mux_recievebuffer = 1
mux_streambuffer = 1
mux_session = 2
edge_ip = "203.0.113.9"
sniffer = true
web_port = 2061
sniffer_log = "c.json"
skip_optz = true
mss = 88
so_rcvbuf = 0
so_sndbuf = 65536
heartbeat = 10
forwarder = []
"""
    )
    server_text = server_text.replace("{cert}", str(tmp_path / "cert.pem")).replace("{key}", str(tmp_path / "key.pem"))
    config = parse(server_text + client_text)
    server, client = config.server, config.client
    assert server is not None and client is not None
    assert (
        server.transport,
        server.log_level,
        server.heartbeat,
        server.connection_pool,
    ) == ("wssmux", "debug", 40, 0)
    assert (
        server.mux_version,
        server.mux_streambuffer,
        server.mss,
        server.web_port,
    ) == (2, 1048576, 1360, 2060)
    assert (
        server.tls_cert,
        server.tls_key,
        server.accept_udp,
        server.proxy_protocol,
    ) == (
        str(tmp_path / "cert.pem"),
        str(tmp_path / "key.pem"),
        True,
        True,
    )
    assert (client.aggressive_pool, client.retry_interval, client.dial_timeout) == (
        True,
        3,
        5,
    )
    assert (client.edge_ip, client.heartbeat, client.mss, client.log_level) == (
        "203.0.113.9",
        10,
        88,
        "trace",
    )
    assert (
        client.mux_framesize,
        client.mux_recievebuffer,
        client.mux_streambuffer,
    ) == (1, 1, 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_is_accepted(transport: str, tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("PEM\n")
    tls = f'tls_cert = "{tmp_path}/c.pem"\ntls_key = "{tmp_path}/c.pem"\n'
    server = parse(SERVER + f'transport = "{transport}"\n' + tls).server
    assert server is not None and server.transport == transport


@pytest.mark.parametrize("name", ["bbr", "cubic", "reno", "dctcp", "a_name_15_long_", "bbr-x"])
@pytest.mark.parametrize("section", [SERVER, CLIENT])
def test_congestion_names_are_accepted(section: str, name: str) -> None:
    """Catches: a name of the kernel's form refused (the kernel says whether it has it, at run time)."""
    config = parse(section + f'congestion = "{name}"\n')
    assert (config.server or config.client).congestion == name


@pytest.mark.parametrize("level", LOG_LEVELS)
def test_every_log_level_is_accepted(level: str) -> None:
    client = parse(CLIENT + f'log_level = "{level}"\n').client
    assert client is not None and client.log_level == level


@pytest.mark.parametrize(
    ("bind_addr", "host", "port"),
    [
        ("0.0.0.0:3080", "0.0.0.0", 3080),
        (":3080", "0.0.0.0", 3080),
        ("[::]:3080", "::", 3080),
        ("[::1]:65535", "::1", 65535),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("tunnel.example:443", "tunnel.example", 443),
    ],
)
def test_bind_addr_forms(bind_addr: str, host: str, port: int) -> None:
    server = parse(f'[server]\nbind_addr = "{bind_addr}"\n').server
    assert server is not None
    assert (server.bind_addr, server.bind_host, server.bind_port) == (
        bind_addr,
        host,
        port,
    )


def test_remote_addr_ipv6_in_brackets() -> None:
    client = parse('[client]\nremote_addr = "[2001:db8::1]:3080"\n').client
    assert client is not None
    assert (client.remote_addr, client.remote_host, client.remote_port) == (
        "[2001:db8::1]:3080",
        "2001:db8::1",
        3080,
    )


def test_configs_are_frozen() -> None:
    server = parse(SERVER).server
    with pytest.raises(AttributeError):
        server.bind_port = 1  # type: ignore[misc, union-attr]


# --- ports ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("443", [_mapping(443, "443", "443")]),
        ("4000=5201", [_mapping(4000, "5201", "4000=5201")]),
        ("4000=5000", [_mapping(4000, "5000", "4000=5000")]),
        (
            "443-445",
            [
                _mapping(443, "443", "443-445"),
                _mapping(444, "444", "443-445"),
                _mapping(445, "445", "443-445"),
            ],
        ),
        (
            "443-445=5201",
            [
                _mapping(443, "5201", "443-445=5201"),
                _mapping(444, "5201", "443-445=5201"),
                _mapping(445, "5201", "443-445=5201"),
            ],
        ),
        (
            "443-444=1.1.1.1:5201",
            [
                _mapping(443, "1.1.1.1:5201", "443-444=1.1.1.1:5201"),
                _mapping(444, "1.1.1.1:5201", "443-444=1.1.1.1:5201"),
            ],
        ),
        ("443=1.1.1.1:5201", [_mapping(443, "1.1.1.1:5201", "443=1.1.1.1:5201")]),
        (
            "127.0.0.2:443=5201",
            [_mapping(443, "5201", "127.0.0.2:443=5201", "127.0.0.2")],
        ),
        (
            "127.0.0.2:443=1.1.1.1:5201",
            [_mapping(443, "1.1.1.1:5201", "127.0.0.2:443=1.1.1.1:5201", "127.0.0.2")],
        ),
        (
            "host.example:443=db.local:5432",
            [
                _mapping(
                    443,
                    "db.local:5432",
                    "host.example:443=db.local:5432",
                    "host.example",
                )
            ],
        ),
        ("0.0.0.0:8080=80", [_mapping(8080, "80", "0.0.0.0:8080=80", "0.0.0.0")]),
        ("[::1]:443=5201", [_mapping(443, "5201", "[::1]:443=5201", "::1")]),
        (
            " 443 - 444 = 5201 ",
            [
                _mapping(443, "5201", " 443 - 444 = 5201 "),
                _mapping(444, "5201", " 443 - 444 = 5201 "),
            ],
        ),
        (" 8443 ", [_mapping(8443, "8443", " 8443 ")]),
        ("1=65535", [_mapping(1, "65535", "1=65535")]),
        ("65535=1", [_mapping(65535, "1", "65535=1")]),
        ("7000-7000", [_mapping(7000, "7000", "7000-7000")]),
        ("22=ssh-host.lan:22", [_mapping(22, "ssh-host.lan:22", "22=ssh-host.lan:22")]),
    ],
)
def test_valid_ports_forms(entry: str, expected: list[PortMapping]) -> None:
    assert parse_ports([entry], "cfg.toml") == tuple(expected)


def test_protocol_range_example_443_600() -> None:
    mappings = parse_ports(["443-600"], "cfg.toml")
    assert len(mappings) == 158
    assert mappings[0] == _mapping(443, "443", "443-600")
    assert mappings[57] == _mapping(500, "500", "443-600")
    assert mappings[-1] == _mapping(600, "600", "443-600")
    shared = parse_ports(["443-600=5201"], "cfg.toml")
    assert {m.target for m in shared} == {"5201"}
    assert [m.listen_port for m in shared] == list(range(443, 601))


def test_range_of_exactly_1000_ports_is_allowed() -> None:
    assert len(parse_ports(["10000-10999"], "cfg.toml")) == 1000


def test_ports_in_file_order() -> None:
    server = parse(
        SERVER + 'ports = ["5000", "127.0.0.2:5000=80", "4000-4001=9"]\n'
    ).server
    assert server is not None
    assert [m.listen_addr for m in server.ports] == [
        ("0.0.0.0", 5000),
        ("127.0.0.2", 5000),
        ("0.0.0.0", 4000),
        ("0.0.0.0", 4001),
    ]


def test_listen_addr_property() -> None:
    assert _mapping(1, "1", "1").listen_addr == ("0.0.0.0", 1)
    assert _mapping(2, "1", "x", "::1").listen_addr == ("::1", 2)


# --- invalid files --------------------------------------------------------------------------

IPV6_TARGET = (
    "an IPv6 literal cannot be a target: the protocol's target string cannot carry one "
    "(a Go client refuses it); use a hostname or an IPv4 address"
)
TRANSPORT_LIST = "tcp, tcpmux, ws, wss, wsmux, wssmux, udp"
LEVEL_LIST = "panic, fatal, error, warn, warning, info, debug, trace"


def _ports(*entries: str) -> str:
    quoted = ", ".join(f'"{entry}"' for entry in entries)
    return SERVER + f"ports = [{quoted}]\n"


def _forwarder(*entries: str) -> str:
    quoted = ", ".join(f'"{entry}"' for entry in entries)
    return CLIENT + f"forwarder = [{quoted}]\n"


INVALID = [
    # structure
    ("", "cfg.toml: no [server] or [client] section found"),
    ("# only a comment\n", "cfg.toml: no [server] or [client] section found"),
    (
        '[servr]\nbind_addr = "0.0.0.0:3080"\n',
        "cfg.toml: servr: unknown section; expected [server] and/or [client]; did you mean 'server'?",
    ),
    (
        "[tunnel]\nx = 1\n",
        "cfg.toml: tunnel: unknown section; expected [server] and/or [client]",
    ),
    (
        'bind_addr = "0.0.0.0:3080"\n' + SERVER,
        "cfg.toml: bind_addr: unknown top-level key; expected [server] and/or [client]",
    ),
    ("server = 5\n", "cfg.toml: server: expected a table: [server]"),
    (
        "[server]\nbind_addr = \n",
        "cfg.toml: invalid TOML: Invalid value (at line 2, column 13)",
    ),
    (
        SERVER + 'bind_addr = "0.0.0.0:3081"\n',
        "cfg.toml: invalid TOML: Cannot overwrite a value (at line 3, column 27)",
    ),
    # unknown keys
    (
        '[server]\nbind_adr = "0.0.0.0:3080"\n',
        "cfg.toml: server.bind_adr: unknown key; did you mean 'bind_addr'?",
    ),
    (SERVER + "zzz = 1\n", "cfg.toml: server.zzz: unknown key"),
    (
        SERVER + "mux_receivebuffer = 1\n",
        "cfg.toml: server.mux_receivebuffer: unknown key; did you mean 'mux_recievebuffer'?",
    ),
    (SERVER + "forwarder = []\n", "cfg.toml: server.forwarder: unknown key"),
    (
        CLIENT + "retry_intrval = 3\n",
        "cfg.toml: client.retry_intrval: unknown key; did you mean 'retry_interval'?",
    ),
    (
        CLIENT + 'ports = ["443"]\n',
        "cfg.toml: client.ports: unknown key; did you mean 'web_port'?",
    ),
    # wrong types
    (
        SERVER + 'channel_size = "2048"\n',
        "cfg.toml: server.channel_size = '2048': expected an integer",
    ),
    (
        SERVER + "heartbeat = 1.5\n",
        "cfg.toml: server.heartbeat = 1.5: expected an integer",
    ),
    (
        SERVER + "connection_pool = true\n",
        "cfg.toml: server.connection_pool = True: expected an integer",
    ),
    (
        CLIENT + "retry_interval = false\n",
        "cfg.toml: client.retry_interval = False: expected an integer",
    ),
    (SERVER + "nodelay = 1\n", "cfg.toml: server.nodelay = 1: expected true or false"),
    (
        CLIENT + 'aggressive_pool = "yes"\n',
        "cfg.toml: client.aggressive_pool = 'yes': expected true or false",
    ),
    (SERVER + "tls_cert = 5\n", "cfg.toml: server.tls_cert = 5: expected a string"),
    (SERVER + "transport = 1\n", "cfg.toml: server.transport = 1: expected a string"),
    (SERVER + "token = 12345\n", "cfg.toml: server.token: expected a string"),
    (
        "[server]\nbind_addr = 3080\n",
        "cfg.toml: server.bind_addr = 3080: expected a string",
    ),
    (
        SERVER + 'ports = "4000=5201"\n',
        "cfg.toml: server.ports = '4000=5201': expected a list of strings",
    ),
    (
        SERVER + "ports = [4000]\n",
        "cfg.toml: server.ports[0] = 4000: expected a string",
    ),
    (
        CLIENT + 'forwarder = "4000=a:1"\n',
        "cfg.toml: client.forwarder = '4000=a:1': expected a list of strings",
    ),
    (
        CLIENT + "forwarder = [4000]\n",
        "cfg.toml: client.forwarder[0] = 4000: expected a string",
    ),
    # ranges
    (
        SERVER + "channel_size = 0\n",
        "cfg.toml: server.channel_size = 0: must be between 1 and 1000000",
    ),
    (
        SERVER + "keepalive_period = 0\n",
        "cfg.toml: server.keepalive_period = 0: must be between 1 and 86400",
    ),
    (
        SERVER + "connection_pool = -1\n",
        "cfg.toml: server.connection_pool = -1: must be between 0 and 65535",
    ),
    (
        SERVER + "heartbeat = -1\n",
        "cfg.toml: server.heartbeat = -1: must be between 0 and 86400",
    ),
    (
        SERVER + "mux_version = 3\n",
        "cfg.toml: server.mux_version = 3: must be between 1 and 2",
    ),
    (
        SERVER + "mux_framesize = 65536\n",
        "cfg.toml: server.mux_framesize = 65536: must be between 1 and 65535",
    ),
    (
        SERVER + "mux_recievebuffer = 0\n",
        "cfg.toml: server.mux_recievebuffer = 0: must be between 1 and 2147483647",
    ),
    (
        SERVER + "mux_streambuffer = 5000000\n",
        "cfg.toml: server.mux_streambuffer = 5000000: must be between 1 and mux_recievebuffer (4194304)",
    ),
    (
        SERVER + "mux_con = 0\n",
        "cfg.toml: server.mux_con = 0: must be between 1 and 65535",
    ),
    (
        SERVER + "udp_max_flows = 0\n",
        "cfg.toml: server.udp_max_flows = 0: must be between 1 and 1000000",
    ),
    (
        SERVER + "mux_session = 0\n",
        "cfg.toml: server.mux_session = 0: must be between 1 and 65535",
    ),
    (
        SERVER + "web_port = 70000\n",
        "cfg.toml: server.web_port = 70000: must be between 0 and 65535",
    ),
    (
        SERVER + 'web_addr = "localhost"\n',
        "cfg.toml: server.web_addr = 'localhost': expected an IP address to serve the status page on, "
        'e.g. "127.0.0.1" or "::1"',
    ),
    (
        CLIENT + "drain_timeout = 3601\n",
        "cfg.toml: client.drain_timeout = 3601: must be between 0 and 3600",
    ),
    (
        SERVER + 'sniffer_log = ""\n',
        "cfg.toml: server.sniffer_log = '': expected the path of a file to write the usage to",
    ),
    (
        SERVER + "web_port = 2060\n" + CLIENT + "web_port = 2060\n",
        "cfg.toml: client.web_port = 2060: 127.0.0.1:2060 is already the server's status page; give each side "
        "its own port",
    ),
    (
        SERVER + "sniffer = true\n" + CLIENT + "sniffer = true\n",
        "cfg.toml: client.sniffer_log = 'backhaul.json': the server writes its usage to this file already; "
        "give each side its own file",
    ),
    (
        SERVER + "mss = 50\n",
        "cfg.toml: server.mss = 50: must be 0 (the OS default) or between 88 and 65535",
    ),
    (
        SERVER + "so_rcvbuf = -1\n",
        "cfg.toml: server.so_rcvbuf = -1: must be between 0 and 2147483647",
    ),
    (
        CLIENT + "retry_interval = 0\n",
        "cfg.toml: client.retry_interval = 0: must be between 1 and 86400",
    ),
    (
        CLIENT + "dial_timeout = 3601\n",
        "cfg.toml: client.dial_timeout = 3601: must be between 1 and 3600",
    ),
    (
        CLIENT + "so_sndbuf = -5\n",
        "cfg.toml: client.so_sndbuf = -5: must be between 0 and 2147483647",
    ),
    (
        CLIENT + 'congestion = "BBR"\n',
        f"cfg.toml: client.congestion = 'BBR': {CONGESTION_PROBLEM}",
    ),
    (
        SERVER + 'congestion = "bbr cubic"\n',
        f"cfg.toml: server.congestion = 'bbr cubic': {CONGESTION_PROBLEM}",
    ),
    (
        SERVER + 'congestion = "a_name_too_long_"\n',
        f"cfg.toml: server.congestion = 'a_name_too_long_': {CONGESTION_PROBLEM}",
    ),
    (
        CLIENT + "congestion = 1\n",
        "cfg.toml: client.congestion = 1: expected a string",
    ),
    # choices
    (
        SERVER + 'transport = "quic"\n',
        f"cfg.toml: server.transport = 'quic': unknown transport; expected one of: {TRANSPORT_LIST}",
    ),
    (
        CLIENT + 'transport = "TCP"\n',
        f"cfg.toml: client.transport = 'TCP': unknown transport; expected one of: {TRANSPORT_LIST}",
    ),
    (
        SERVER + 'log_level = "verbose"\n',
        f"cfg.toml: server.log_level = 'verbose': unknown log level; expected one of: {LEVEL_LIST}",
    ),
    # addresses
    (
        '[server]\ntransport = "tcp"\n',
        "cfg.toml: server.bind_addr: required key is missing",
    ),
    ("[server]\n", "cfg.toml: server.bind_addr: required key is missing"),
    ("[client]\n", "cfg.toml: client.remote_addr: required key is missing"),
    (
        '[server]\nbind_addr = "0.0.0.0"\n',
        "cfg.toml: server.bind_addr = '0.0.0.0': the port is missing; expected host:port, e.g. \"0.0.0.0:3080\"",
    ),
    (
        '[server]\nbind_addr = ""\n',
        "cfg.toml: server.bind_addr = '': the port is missing; expected host:port, e.g. \"0.0.0.0:3080\"",
    ),
    (
        '[server]\nbind_addr = "0.0.0.0:0"\n',
        (
            "cfg.toml: server.bind_addr = '0.0.0.0:0': port 0 is out of range 1-65535; "
            'expected host:port, e.g. "0.0.0.0:3080"'
        ),
    ),
    (
        '[server]\nbind_addr = "0.0.0.0:http"\n',
        (
            "cfg.toml: server.bind_addr = '0.0.0.0:http': port 'http' is not a number; "
            'expected host:port, e.g. "0.0.0.0:3080"'
        ),
    ),
    (
        '[server]\nbind_addr = "::1:3080"\n',
        (
            "cfg.toml: server.bind_addr = '::1:3080': an IPv6 address must be in brackets, e.g. \"[::1]:443\"; "
            'expected host:port, e.g. "0.0.0.0:3080"'
        ),
    ),
    (
        '[server]\nbind_addr = "[::1]3080"\n',
        (
            "cfg.toml: server.bind_addr = '[::1]3080': an IPv6 address in brackets must be followed by :port; "
            'expected host:port, e.g. "0.0.0.0:3080"'
        ),
    ),
    (
        '[client]\nremote_addr = "[example.com]:80"\n',
        (
            "cfg.toml: client.remote_addr = '[example.com]:80': brackets are only for IPv6 addresses; "
            'expected host:port, e.g. "0.0.0.0:3080"'
        ),
    ),
    (
        '[client]\nremote_addr = "1.2.3.4: 80"\n',
        (
            "cfg.toml: client.remote_addr = '1.2.3.4: 80': spaces are not allowed; "
            'expected host:port, e.g. "0.0.0.0:3080"'
        ),
    ),
    (
        '[client]\nremote_addr = ":3080"\n',
        "cfg.toml: client.remote_addr = ':3080': the host is missing; expected host:port",
    ),
    # ports
    (_ports(""), "cfg.toml: server.ports[0] = '': empty entry"),
    (_ports("443", "  "), "cfg.toml: server.ports[1] = '  ': empty entry"),
    (
        _ports("443=80=8080"),
        "cfg.toml: server.ports[0] = '443=80=8080': more than one '='; expected LISTEN=TARGET",
    ),
    (
        _ports("443-600:5201"),
        "cfg.toml: server.ports[0] = '443-600:5201': use '=' between the listen port and the target: \"443-600=5201\"",
    ),
    (
        _ports("4000:5201"),
        "cfg.toml: server.ports[0] = '4000:5201': use '=' between the listen port and the target: \"4000=5201\"",
    ),
    (
        _ports("127.0.0.2:443"),
        (
            "cfg.toml: server.ports[0] = '127.0.0.2:443': without '=' an entry is a port or a port range; "
            "use '=' to add a listen host or a target, e.g. \"127.0.0.2:443=443\""
        ),
    ),
    (
        _ports("600-443"),
        "cfg.toml: server.ports[0] = '600-443': range start 600 is greater than range end 443",
    ),
    (
        _ports("600-443=80"),
        "cfg.toml: server.ports[0] = '600-443=80': range start 600 is greater than range end 443",
    ),
    (
        _ports("1000-2000"),
        "cfg.toml: server.ports[0] = '1000-2000': range 1000-2000 has 1001 ports; at most 1000 are allowed",
    ),
    (
        _ports("1-2-3"),
        "cfg.toml: server.ports[0] = '1-2-3': bad port range '1-2-3'; expected START-END, e.g. 443-600",
    ),
    (
        _ports("443-"),
        "cfg.toml: server.ports[0] = '443-': range end '' is not a number",
    ),
    (
        _ports("0=80"),
        "cfg.toml: server.ports[0] = '0=80': listen port 0 is out of range 1-65535",
    ),
    (
        _ports("65536"),
        "cfg.toml: server.ports[0] = '65536': listen port 65536 is out of range 1-65535",
    ),
    (
        _ports("http=80"),
        "cfg.toml: server.ports[0] = 'http=80': listen port 'http' is not a number",
    ),
    (_ports("=80"), "cfg.toml: server.ports[0] = '=80': the listen port is empty"),
    (_ports("443="), "cfg.toml: server.ports[0] = '443=': the target is empty"),
    (
        _ports("443=0"),
        "cfg.toml: server.ports[0] = '443=0': target port 0 is out of range 1-65535",
    ),
    (
        _ports("443=70000"),
        "cfg.toml: server.ports[0] = '443=70000': target port 70000 is out of range 1-65535",
    ),
    (
        _ports("443=db.local"),
        "cfg.toml: server.ports[0] = '443=db.local': target port 'db.local' is not a number",
    ),
    (
        _ports("443=db.local:pg"),
        "cfg.toml: server.ports[0] = '443=db.local:pg': target port 'pg' is not a number",
    ),
    (
        _ports("443=:5201"),
        "cfg.toml: server.ports[0] = '443=:5201': the target host before ':' is empty",
    ),
    (
        _ports("443=1.1.1.1:5201:1"),
        "cfg.toml: server.ports[0] = '443=1.1.1.1:5201:1': target port '5201:1' is not a number",
    ),
    (
        _ports("443=db local:80"),
        "cfg.toml: server.ports[0] = '443=db local:80': spaces are not allowed in the target",
    ),
    (
        _ports("443=[::1]:80"),
        f"cfg.toml: server.ports[0] = '443=[::1]:80': {IPV6_TARGET}",
    ),
    (
        _ports("443=2001:db8::1:80"),
        f"cfg.toml: server.ports[0] = '443=2001:db8::1:80': {IPV6_TARGET}",
    ),
    (_ports("443=::1"), f"cfg.toml: server.ports[0] = '443=::1': {IPV6_TARGET}"),
    (
        _ports("127.0.0.2:443-600=5201"),
        "cfg.toml: server.ports[0] = '127.0.0.2:443-600=5201': a port range cannot have a listen host",
    ),
    (
        _ports("::1:443=5201"),
        "cfg.toml: server.ports[0] = '::1:443=5201': an IPv6 address must be in brackets, e.g. \"[::1]:443\"",
    ),
    (
        _ports(":443=5201"),
        "cfg.toml: server.ports[0] = ':443=5201': the listen host before ':' is empty",
    ),
    # duplicate listen addresses
    (
        _ports("4000=5201", "4001=5201", "4000=5202"),
        (
            "cfg.toml: server.ports[2] = '4000=5202': listen address 0.0.0.0:4000 is already used by "
            "server.ports[0] ('4000=5201')"
        ),
    ),
    (
        _ports("3990-4010=80", "4005"),
        (
            "cfg.toml: server.ports[1] = '4005': listen address 0.0.0.0:4005 is already used by "
            "server.ports[0] ('3990-4010=80')"
        ),
    ),
    (
        _ports("443", "0.0.0.0:443=80"),
        (
            "cfg.toml: server.ports[1] = '0.0.0.0:443=80': listen address 0.0.0.0:443 is already used by "
            "server.ports[0] ('443')"
        ),
    ),
    (
        _ports("[::1]:443=80", "[::1]:443=81"),
        (
            "cfg.toml: server.ports[1] = '[::1]:443=81': listen address [::1]:443 is already used by "
            "server.ports[0] ('[::1]:443=80')"
        ),
    ),
    # forwarder
    (
        _forwarder("4000"),
        "cfg.toml: client.forwarder[0] = '4000': expected TARGET=HOST:PORT with exactly one '='",
    ),
    (
        _forwarder("4000=a=b:1"),
        "cfg.toml: client.forwarder[0] = '4000=a=b:1': expected TARGET=HOST:PORT with exactly one '='",
    ),
    (
        _forwarder(" =127.0.0.1:80"),
        "cfg.toml: client.forwarder[0] = ' =127.0.0.1:80': the left side (the target the server sends) is empty",
    ),
    (
        _forwarder("4000= "),
        "cfg.toml: client.forwarder[0] = '4000= ': the right side (host:port to dial) is empty",
    ),
    (
        _forwarder("4000=127.0.0.1"),
        "cfg.toml: client.forwarder[0] = '4000=127.0.0.1': the right side must be host:port",
    ),
    (
        _forwarder("4000=a:1", "4000 = b:2"),
        "cfg.toml: client.forwarder[1] = '4000 = b:2': '4000' is already forwarded by client.forwarder[0]",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_files(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "cfg.toml")
    assert str(caught.value) == message
    assert caught.value.source == "cfg.toml"


def test_error_carries_key_problem_and_value() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(_ports("443", "443-600:5201"), "cfg.toml")
    error = caught.value
    assert (error.key, error.value) == ("server.ports[1]", "443-600:5201")
    assert (
        error.problem
        == "use '=' between the listen port and the target: \"443-600=5201\""
    )


def test_parse_ports_uses_the_given_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_ports(["443", ""], "x.toml", key="extra.ports")
    assert str(caught.value) == "x.toml: extra.ports[1] = '': empty entry"
    with pytest.raises(ConfigError) as caught:
        parse_ports(None, "x.toml")
    assert str(caught.value) == "x.toml: server.ports: expected a list of strings"


def test_parse_ports_empty_list() -> None:
    assert parse_ports([], "cfg.toml") == ()


# --- the token never leaks ------------------------------------------------------------------

LEAKY = [
    SERVER + f'token = "{SECRET}"\nchannel_size = "x"\n',
    SERVER + f'token = "{SECRET}"\nports = ["443-600:5201"]\n',
    SERVER + f'tokn = "{SECRET}"\n',
    SERVER + f'secret = "{SECRET}"\n',
    SERVER + f'token = ["{SECRET}"]\n',
    SERVER + f'token = {{ value = "{SECRET}" }}\n',
    CLIENT + f'token = "{SECRET}"\ndial_timeout = 0\n',
    CLIENT + f'token = "{SECRET}\n',
    CLIENT + f'token = "{SECRET}" "\n',
    CLIENT + f'token = "{SECRET}"\ntoken = "{SECRET}"\n',
    f'token = "{SECRET}"\n' + SERVER,
    f'[token]\n"{SECRET}" = 1\n' + SERVER,
]


@pytest.mark.parametrize("text", LEAKY)
def test_token_never_in_error_messages(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "cfg.toml")
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)
    assert SECRET not in repr(caught.value.value)


def test_token_never_in_repr() -> None:
    config = parse(SERVER + f'token = "{SECRET}"\n' + CLIENT + f'token = "{SECRET}"\n')
    assert config.server is not None and config.client is not None
    assert config.server.token == SECRET and config.client.token == SECRET
    for shown in (repr(config), str(config), repr(config.server), repr(config.client)):
        assert SECRET not in shown
    assert "token_is_default=False" in repr(config.server)


# --- load() ---------------------------------------------------------------------------------


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(SEED_SERVER + "\n" + SEED_CLIENT, encoding="utf-8")
    config = load(str(path))
    assert isinstance(config, Config)
    assert config.source == str(path)
    assert config.server is not None and config.client is not None


def test_load_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + SERVER.encode())
    server = load(str(path)).server
    assert server is not None and server.bind_port == 3080


def test_load_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert (
        str(caught.value) == f"{path}: cannot read the file: No such file or directory"
    )
    assert caught.value.key == ""


def test_load_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path))
    assert str(caught.value) == f"{tmp_path}: cannot read the file: Is a directory"


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(SERVER.encode() + b'token = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert str(caught.value) == f"{path}: the file is not valid UTF-8"


def test_load_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[server\nbind_addr = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert str(caught.value).startswith(f"{path}: invalid TOML: ")
    assert caught.value.key == ""


def test_load_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[client]\nremote_adr = "a:1"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert (
        str(caught.value)
        == f"{path}: client.remote_adr: unknown key; did you mean 'remote_addr'?"
    )


# --- helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("panic", logging.CRITICAL),
        ("fatal", logging.CRITICAL),
        ("error", logging.ERROR),
        ("warn", logging.WARNING),
        ("warning", logging.WARNING),
        ("info", logging.INFO),
        ("debug", logging.DEBUG),
        ("trace", logging.DEBUG),
        ("INFO", logging.INFO),
    ],
)
def test_python_log_level(name: str, level: int) -> None:
    assert python_log_level(name) == level


def test_python_log_level_unknown() -> None:
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        python_log_level("verbose")


def test_log_level_is_case_insensitive_like_logrus() -> None:
    server = parse(SERVER + 'log_level = "Warn"\n').server
    assert server is not None and server.log_level == "warn"


def test_heartbeat_zero_means_default() -> None:
    config = parse(SERVER + "heartbeat = 0\n" + CLIENT + "heartbeat = 0\n")
    assert config.server is not None and config.client is not None
    assert (config.server.heartbeat, config.client.heartbeat) == (40, 40)


def test_forward_target() -> None:
    client = parse(
        _forwarder("5201=10.0.0.5:5201", " 1.1.1.1:53 = dns.lan:53 ", "4000=IP:PORT")
    ).client
    assert client is not None
    assert client.forwarder == (
        ("5201", "10.0.0.5:5201"),
        ("1.1.1.1:53", "dns.lan:53"),
        ("4000", "IP:PORT"),
    )
    assert client.forward_target("5201") == "10.0.0.5:5201"
    assert client.forward_target("1.1.1.1:53") == "dns.lan:53"
    assert client.forward_target("4000") == "IP:PORT"
    assert client.forward_target("5202") == "5202"
    assert client.forward_target("") == ""


def test_forward_target_without_rules() -> None:
    client = parse(CLIENT).client
    assert client is not None and client.forward_target("8443") == "8443"


# --- TLS keys (ours: tls_verify, tls_ca, tls_pin) and edge_ip -------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    (SERVER + 'transport = "wss"\n', "<config>: server.tls_cert: required by transport 'wss': a PEM file"),
    (SERVER + 'transport = "wssmux"\ntls_cert = "/nonexistent/c.pem"\n',
     "<config>: server.tls_cert = '/nonexistent/c.pem': cannot read the file: No such file or directory"),
    (CLIENT + 'tls_ca = "/nonexistent/ca.pem"\n',
     "<config>: client.tls_ca = '/nonexistent/ca.pem': cannot read the file: No such file or directory"),
    (CLIENT + 'tls_pin = "abc"\n', "<config>: client.tls_pin = 'abc': expected the sha256 fingerprint of the "
     "server certificate: 64 hex digits, colons allowed"),
    (CLIENT + 'edge_ip = "cdn.example"\n',
     "<config>: client.edge_ip = 'cdn.example': expected an IP address (the CDN edge to connect to)"),
])
def test_tls_and_edge_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value) == message


def test_tls_pin_is_normalised_and_tls_files_checked(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("PEM\n")
    pin = ":".join(["AB"] * 32)
    client = parse(CLIENT + f'tls_verify = true\ntls_ca = "{ca}"\ntls_pin = "{pin}"\n').client
    assert client is not None
    assert (client.tls_verify, client.tls_ca, client.tls_pin) == (True, str(ca), "ab" * 32)


# --- auth (ours: docs/auth.md) ------------------------------------------------------------------

def test_auth_defaults_to_the_v072_handshake_on_both_sides() -> None:
    config = parse(SERVER + CLIENT)
    assert config.server is not None and config.client is not None
    assert (config.server.auth, config.client.auth) == ("token", "token")
    config = parse(SERVER + 'auth = "challenge"\n' + CLIENT + 'auth = "challenge"\n')
    assert config.server is not None and config.client is not None
    assert (config.server.auth, config.client.auth) == ("challenge", "challenge")


@pytest.mark.parametrize(("text", "key", "value"), [
    (SERVER + 'auth = "hmac"\n', "server.auth", "'hmac'"),
    (CLIENT + 'auth = "Challenge"\n', "client.auth", "'Challenge'"),
    (CLIENT + 'auth = ""\n', "client.auth", "''"),
])
def test_auth_other_values_are_refused_precisely(text: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "cfg.toml")
    assert str(caught.value) == (f'cfg.toml: {key} = {value}: expected "token" (the handshake of Backhaul '
                                 'v0.7.2, the default) or "challenge" (ours, docs/auth.md: this program on both ends)')


def test_auth_must_be_a_string() -> None:
    with pytest.raises(ConfigError, match=r"server\.auth = True: expected a string"):
        parse(SERVER + "auth = true\n")


def test_a_nul_in_a_file_path_is_a_config_error() -> None:
    """Found by the fuzz suite: open() raises ValueError, not OSError, for such a path."""
    with pytest.raises(ConfigError) as caught:
        parse(CLIENT + 'tls_ca = "a\\u0000b"\n', "cfg.toml")
    assert str(caught.value) == "cfg.toml: client.tls_ca = 'a\\x00b': cannot read the file: embedded null byte"

def test_operations_keys_of_ours() -> None:
    """web_addr and drain_timeout: defaults, both sides, and a status page per side on one port when
    the addresses differ."""
    config = parse(SERVER + CLIENT, "cfg.toml")
    assert config.server is not None and config.client is not None
    assert (config.server.web_addr, config.server.drain_timeout) == ("127.0.0.1", 10)
    assert (config.client.web_addr, config.client.drain_timeout) == ("127.0.0.1", 10)
    config = parse(SERVER + 'web_port = 2060\nweb_addr = "::1"\ndrain_timeout = 0\n'
                   + CLIENT + "web_port = 2060\n", "cfg.toml")
    assert config.server is not None and config.client is not None
    assert (config.server.web_addr, config.server.web_port, config.server.drain_timeout) == ("::1", 2060, 0)
    assert (config.client.web_addr, config.client.web_port) == ("127.0.0.1", 2060)


def test_changed_keys_names_what_a_reload_changes() -> None:
    old = parse(SERVER + 'ports = ["8000=9000"]\n', "a.toml").server
    new = parse(SERVER + 'ports = ["8000=9001"]\ntoken = "x"\nheartbeat = 5\n', "b.toml").server
    assert old is not None and new is not None
    assert changed_keys(old, new) == ["token", "ports", "heartbeat"]
    assert changed_keys(old, old) == []


# --- high availability: clients, remote_addr lists, failback_idle, local_addr ---------------

def test_clients_mode_is_replace_unless_balance() -> None:
    server = parse(SERVER).server
    assert server is not None and server.clients == "replace"
    server = parse(SERVER + 'clients = "balance"\n').server
    assert server is not None and server.clients == "balance"


def test_remote_addr_list_is_the_failover_order() -> None:
    client = parse('[client]\nremote_addr = ["198.51.100.7:3080", "backup.example:443", "[::1]:80"]\n').client
    assert client is not None
    assert [(r.addr, r.host, r.port) for r in client.servers] == [
        ("198.51.100.7:3080", "198.51.100.7", 3080), ("backup.example:443", "backup.example", 443), ("[::1]:80", "::1", 80)]
    assert (client.remote_addr, client.remote_host, client.remote_port) == ("198.51.100.7:3080", "198.51.100.7", 3080)
    second = client.for_server(1)
    assert (second.remote_addr, second.remote_host, second.remote_port) == ("backup.example:443", "backup.example", 443)
    assert second.servers == client.servers and client.for_server(0) is client
    assert client.failback_idle == 60 and client.local_addr == ""
    single = parse(CLIENT).client
    assert single is not None and [r.addr for r in single.servers] == [single.remote_addr]


@pytest.mark.parametrize(("text", "message"), [
    ('[client]\nremote_addr = []\n',
     '<config>: client.remote_addr = []: expected host:port or a list of them, e.g. ["a.example:3080", "b.example:3080"]'),
    ('[client]\nremote_addr = ["a.example:1", 2]\n', "<config>: client.remote_addr[1] = 2: expected a string, host:port"),
    ('[client]\nremote_addr = ["a.example:1", "b.example"]\n',
     "<config>: client.remote_addr[1] = 'b.example': the port is missing; expected host:port, e.g. \"0.0.0.0:3080\""),
    ('[client]\nremote_addr = ["a.example:1", "a.example:1"]\n',
     "<config>: client.remote_addr[1] = 'a.example:1': is already in the list"),
    ('[client]\nremote_addr = [' + ", ".join(f'"h{i}.example:1"' for i in range(17)) + "]\n",
     "<config>: client.remote_addr: has 17 addresses; at most 16 are allowed"),
    (CLIENT + "failback_idle = -1\n", "<config>: client.failback_idle = -1: must be between 0 and 86400"),
    (CLIENT + 'local_addr = "eth0"\n',
     "<config>: client.local_addr = 'eth0': expected an IP address of this host, e.g. \"192.0.2.7\""),
    ('[client]\nremote_addr = ["198.51.100.7:1", "[2001:db8::1]:1"]\nlocal_addr = "192.0.2.7"\n',
     "<config>: client.local_addr = '192.0.2.7': is IPv4, but remote_addr[1] [2001:db8::1]:1 is IPv6"),
    (SERVER + 'clients = "all"\n', "<config>: server.clients = 'all': unknown mode; expected one of: replace, balance"),
])
def test_ha_keys_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value) == message


def test_a_reload_sees_a_changed_server_list() -> None:
    """Catches: a reload comparing only the first address of remote_addr (it keeps the old list)."""
    old = parse('[client]\nremote_addr = ["198.51.100.7:1", "198.51.100.8:1"]\n').client
    new = parse('[client]\nremote_addr = ["198.51.100.7:1", "198.51.100.9:1"]\nfailback_idle = 5\n').client
    assert old is not None and new is not None
    assert changed_keys(old, new) == ["remote_addr", "failback_idle"]
