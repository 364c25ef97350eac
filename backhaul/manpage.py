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
from backhaul.config import ClientConfig, ServerConfig, address_text, file_keys, parse_ports, toml_value
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
On SIGTERM or SIGINT the process stops accepting, tells the peer, closes everything and exits.
.PP
The token is compared in constant time and never appears in a log line, an error or the output
of \\fBcheck\\fR. Without the Python package wsproto the WebSocket transports (ws, wss, wsmux,
wssmux) are refused at start with a line saying what to install; the others work without it.
.PP
The soft limit of open files is raised to the hard limit at start: the server needs two
descriptors for each connection it carries."""

EXIT_STATUS = (
    (cli.EXIT_OK, "after a clean stop, or a configuration that passed \\fBcheck\\fR or \\fB\\-\\-check\\fR"),
    (cli.EXIT_RUNTIME, "an address could not be bound (the line on stderr names it)"),
    (cli.EXIT_CONFIG, "a bad configuration (EX_CONFIG): restarting will not help"),
    (2, "a bad command line"),
)

ENVIRONMENT = (
    ("BACKHAUL_RELAY=copy", "copy bytes through a buffer instead of splice(2), for diagnosis"),
)

FILES = (
    ("/etc/backhaul/\\fINAME\\fR.toml", "the configuration run by the systemd unit backhaul@\\fINAME\\fR.service"),
    ("/etc/backhaul/example\\-server.toml, /etc/backhaul/example\\-client.toml",
     "commented examples of either side, to copy"),
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
        ".BR systemctl (1),",
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
