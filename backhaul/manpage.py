"""The manual page backhaul(1), in groff, made from the program's own definitions.

Keys, defaults and descriptions come from config.py, options from the argument parser, exit codes
from cli.py, so the page cannot drift from the code: ``python -m backhaul.manpage > backhaul.1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import MISSING, Field
from typing import Any

from backhaul import __version__, cli
from backhaul.config import (
    CREDENTIAL,
    DEFAULT_DRAIN,
    ClientConfig,
    ServerConfig,
    address_text,
    file_keys,
    parse_ports,
    toml_value,
)
from backhaul.summary import dial_text

# Entries of the ports list shown in PORTS, each explained by what the parser makes of it.
PORTS_EXAMPLES = ("443", "443-600", "4000=5201", "443-600=5201", "443=1.1.1.1:5201",
                  "127.0.0.2:443=5201", "8080=db.local:5432")

DESCRIPTION = """\
A reverse tunnel through NAT and firewalls. A client behind NAT dials out to a public server; the
server listens on public ports and hands each user connection back through the tunnel to a
service on the client's side. It speaks the wire protocol of Backhaul v0.7.2 byte for byte, so
either side of a deployment of that program can be replaced by this one.
.PP
A configuration file holds a [server] table, a [client] table, or both; with both, the two sides
run in one process. Every key is checked at start: a bad value stops the program with one line
naming the file, the key, the value and what is allowed. A key or transport this version cannot
honour yet is refused at start with a line that says so."""

BEHAVIOUR = """\
The client reconnects every retry_interval seconds after any failure, forever. The server keeps
its public ports open while the client is away and takes it back without a restart.
.PP
With clients = "balance" the server keeps every client that completes the handshake; links
belong to the client of their source address, and each user goes to the client with the most
idle links. With a list in remote_addr the client uses the first server that answers, goes on
with the next when its session ends, and returns to an earlier one after failback_idle seconds
without users.
.PP
The token is compared in constant time and never appears in a log line, an error or the output
of \\fBcheck\\fR. Without the Python package wsproto the WebSocket transports (ws, wss, wsmux,
wssmux) are refused at start with a line saying what to install; the others work without it.
.PP
The soft limit of open files is raised to the hard limit at start: the server needs two
descriptors for each connection it carries."""

SIGNALS = (
    ("SIGHUP", "reload: read the configuration file again and apply it (so does a change of the file, looked "
               f"at every {cli.WATCH_EVERY:g} s). A user connection the change does not touch goes on; a key "
               "of the tunnel itself (transport, token, addresses, pool, mux) restarts the tunnel, whose "
               "peer reconnects. A file that does not load, or a port that cannot be bound, changes nothing: "
               "one line at priority err says why (reload refused: ...) and the running configuration stays."),
    ("SIGTERM, SIGINT", "drain, then stop: the public ports close and the client takes no new links, the open "
                        f"connections get drain_timeout seconds (default {DEFAULT_DRAIN}) to finish, then the "
                        "peer is told, everything is closed and the process exits 0. With no open connection it "
                        "stops at once; a second signal during the drain stops at once."),
)

TOKEN = f"""\
The token is read from one place: the key \\fBtoken\\fR, the file named by \\fBtoken_file\\fR (one line,
its line ending dropped), or the systemd credential \\fB{CREDENTIAL}\\fR, the file
\\fI$CREDENTIALS_DIRECTORY\\fR/{CREDENTIAL}. Two of them is a bad configuration, naming both; an empty
credential counts as none. The units load the credential from /etc/backhaul/\\fINAME\\fR.token
(LoadCredential=), a file of mode 0600 that systemd reads as root, so the configuration can be
world\\-readable with no secret in it. \\fBcheck\\fR says where the token came from, never what it is.
Unset everywhere, the default of Backhaul v0.7.2 is used and a warning says so at start."""

ENDPOINTS = (
    ("/", "the status page (HTML, no script from outside): the tunnel, its peers and every port"),
    ("/status.json", "the numbers of the status page as JSON (the sniffer_log file holds the same)"),
    ("/metrics", "counters and gauges in the Prometheus text format"),
    ("/healthz", "200 ok while the tunnel is up, 503 while it is down"),
)

SYSTEMD = """\
backhaul.service runs /etc/backhaul/backhaul.toml; backhaul@\\fINAME\\fR.service runs
/etc/backhaul/\\fINAME\\fR.toml. Both may run side by side, each under a user of its own
(DynamicUser=). They are Type=notify (started once every port listens and, on a client, the
control channel is up), watched (WatchdogSec=), and restarted on failure but not on a bad
configuration (exit 78), which fails the start once with its reason at priority err.
\\fBsystemctl reload\\fR runs \\fBbackhaul \\-c\\fR \\fIFILE\\fR \\fB\\-\\-check\\fR, then sends SIGHUP: a file that
does not load makes the reload fail. \\fBsystemctl stop\\fR drains (SIGTERM; TimeoutStopSec=20).
Under systemd each line carries its syslog priority; every line that explains a failed start or a
refused reload is at err (\\fBjournalctl \\-p err \\-u\\fR \\fIUNIT\\fR).
.PP
An upgrade of the Debian package restarts the running units into the new version; its removal
stops them; its purge removes /var/lib/backhaul."""

EXIT_STATUS = (
    (cli.EXIT_OK, "after a clean stop, or a configuration that passed \\fBcheck\\fR or \\fB\\-\\-check\\fR"),
    (cli.EXIT_RUNTIME, "an address could not be bound (the line on stderr names it)"),
    (cli.EXIT_CONFIG, "a bad configuration (EX_CONFIG): restarting will not help"),
    (2, "a bad command line"),
)

ENVIRONMENT = (
    ("BACKHAUL_RELAY=copy", "copy bytes through a buffer instead of splice(2), for diagnosis"),
    ("CREDENTIALS_DIRECTORY", f"set by systemd: the file {CREDENTIAL} in it holds the token (see TOKEN)"),
    ("JOURNAL_STREAM", "set by systemd: when it names stderr, lines carry their syslog priority and no time"),
    ("NOTIFY_SOCKET, WATCHDOG_USEC", "set by systemd: readiness, status, reload and stop notices, watchdog pings"),
)

FILES = (
    ("/etc/backhaul/\\fINAME\\fR.toml", "the configuration run by the systemd unit backhaul@\\fINAME\\fR.service"),
    ("/etc/backhaul/\\fINAME\\fR.token", "its token (mode 0600), passed as the credential token; optional"),
    ("/var/lib/backhaul/\\fINAME\\fR", "its state directory and working directory: a relative sniffer_log lands here"),
    ("/etc/backhaul/backhaul.toml, /etc/backhaul/backhaul.token, /var/lib/backhaul/backhaul",
     "the same for backhaul.service"),
    ("/etc/backhaul/example\\-server.toml, /etc/backhaul/example\\-client.toml",
     "commented examples of either side, to copy"),
    ("/usr/share/doc/backhaul/", "README.md, and docs/ (auth.md: the handshake of auth = \\(dqchallenge\\(dq)"),
)


def escape(text: str) -> str:
    """Plain text made safe for groff: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def render(date: str = "") -> str:
    """The whole page."""
    lines = [
        f'.TH BACKHAUL 1 "{date}" "backhaul {__version__}" "User Commands"',
        ".nh", ".ad l",  # keys and addresses read better unbroken
        ".SH NAME",
        "backhaul \\- reverse tunnel through NAT and firewalls, wire\\-compatible with Backhaul v0.7.2",
        ".SH SYNOPSIS",
        ".B backhaul", ".B \\-c", ".I FILE", ".br",
        ".B backhaul check", ".B \\-c", ".I FILE", ".br",
        ".B backhaul \\-\\-version",
        ".SH DESCRIPTION", DESCRIPTION,
        ".SH COMMANDS", *commands(cli.parser()),
        ".SH OPTIONS", *options(cli.parser()),
        ".SH CONFIGURATION",
        "Keys of the [server] table, then of the [client] table, with their defaults.",
        '.SS "[server]"', *keys(ServerConfig),
        '.SS "[client]"', *keys(ClientConfig),
        ".SH PORTS",
        "Each entry of the server's \\fBports\\fR list is \\fILISTEN\\fR or \\fILISTEN\\fR=\\fITARGET\\fR. "
        "\\fILISTEN\\fR is a port, a range START\\-END, or host:port; \\fITARGET\\fR, sent to the client "
        "for each connection, is a port (the client dials 127.0.0.1) or host:port (host names are "
        "resolved by the client). Without a target each port is its own target. For example:",
        *ports_examples(),
        ".SH BEHAVIOUR", BEHAVIOUR,
        ".SH SIGNALS", *_tagged((f"\\fB{name}\\fR", escape(text)) for name, text in SIGNALS),
        ".SH TOKEN", TOKEN,
        ".SH STATUS PAGE",
        "Each side with a web_port serves on web_addr:web_port (127.0.0.1 by default):",
        *_tagged((f"\\fB{path}\\fR", escape(text)) for path, text in ENDPOINTS),
        ".SH SYSTEMD", SYSTEMD,
        ".SH EXIT STATUS", *_tagged((f"\\fB{code}\\fR", text) for code, text in EXIT_STATUS),
        ".SH ENVIRONMENT", *_tagged((f"\\fB{escape(name)}\\fR", escape(text)) for name, text in ENVIRONMENT),
        ".SH FILES", *_tagged(FILES),
        ".SH EXAMPLES",
        "Validate a configuration and see what it would do:",
        ".PP", ".RS", ".B backhaul check \\-c /etc/backhaul/example\\-server.toml", ".RE",
        ".PP",
        "Run /etc/backhaul/server.toml as a service, now and at every boot:",
        ".PP", ".RS", ".B systemctl enable \\-\\-now backhaul@server", ".RE",
        ".SH SEE ALSO",
        ".BR journalctl (1),",
        ".BR systemctl (1),",
        ".BR systemd.exec (5),",
        ".BR systemd.service (5)",
    ]
    return "\n".join(lines) + "\n"


def commands(parser: argparse.ArgumentParser) -> list[str]:
    """One entry per command the parser takes, with its help text; without one, the program runs."""
    entries = [("(none)", "run the tunnel the configuration describes, until SIGTERM or SIGINT")]
    for action in parser._actions:  # argparse has no public list of its arguments
        if not action.option_strings:
            entries += [(f"\\fB{escape(str(name))}\\fR", escape(action.help or "")) for name in action.choices or ()]
    return _tagged(entries)


def options(parser: argparse.ArgumentParser) -> list[str]:
    """One entry per option of the parser, with its help text."""
    entries = []
    for action in parser._actions:
        if action.option_strings:
            value = f" \\fI{escape(str(action.metavar or action.dest.upper()))}\\fR" if action.nargs != 0 else ""
            names = ", ".join(f"\\fB{escape(name)}\\fR{value}" for name in action.option_strings)
            entries.append((names, escape(action.help or "")))
    return _tagged(entries)


def keys(side: type[ServerConfig] | type[ClientConfig]) -> list[str]:
    """One entry per key: its name, its default (or that it is required) and its description."""
    return _tagged((f"\\fB{key.name}\\fR = {_default(key)}", escape(key.metadata["doc"])) for key in file_keys(side))


def ports_examples() -> list[str]:
    """What the parser makes of each example entry: where it listens and what the client dials."""
    entries = []
    for entry in PORTS_EXAMPLES:
        mappings = parse_ports([entry], "ports")
        first, last = mappings[0], mappings[-1]
        where = address_text(*first.listen_addr)
        if last is not first:
            where += f" to {last.listen_port}"
        dialed = dial_text(first.target, None)
        if last.target != first.target:
            dialed += f" to {dial_text(last.target, None)}, each port to its own"
        entries.append((escape(toml_value(entry)), escape(f"listens on {where}; the client dials {dialed}")))
    return _tagged(entries)


def _default(key: Field[Any]) -> str:
    if key.default is MISSING:
        return "\\fI(required)\\fR"
    if not key.repr:  # a secret: its description says what happens when it is not set
        return "\\fI(unset)\\fR"
    return escape(toml_value(key.default))


def _tagged(entries: Any) -> list[str]:
    lines = []
    for tag, text in entries:
        lines += [".TP", tag, text]
    return lines


def main() -> int:
    """Write the page to stdout, dated by SOURCE_DATE_EPOCH when set (reproducible builds)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    date = time.strftime("%Y-%m-%d", time.gmtime(int(epoch))) if epoch else ""
    sys.stdout.write(render(date))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
