"""What one side shows an operator: the status page, ``/metrics``, ``/healthz``, and the usage
file of ``sniffer``, all from the side's usage numbers (backhaul/usage.py).

Runs on the reactor: a page is built from memory in well under a millisecond, and the usage file
is written by a worker (a temporary file renamed over the old one, so a reader never sees half).
"""

from __future__ import annotations

import html
import json
import logging
import os
import tempfile
import time
from typing import Protocol

from backhaul.log import Throttle
from backhaul.metrics import METRICS
from backhaul.reactor import Reactor, Timer
from backhaul.usage import RATE_WINDOW, Usage
from backhaul.web import Answer, WebServer

log = logging.getLogger("backhaul.status")

SNIFF_EVERY = 5          # rate samples between two writes of the usage file
REFRESH = 5              # seconds between reloads of the page by the browser
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class Side(Protocol):
    """A server or a client, as the status page sees it."""

    name: str
    usage: Usage

    def tunnel_peer(self) -> str:
        """The peer's address while the control channel is up, else ""."""

    def describe(self) -> str:
        """One line: transport and addresses."""


class SideStatus:
    """The page and the usage file of one side; reactor thread except ``open_page``."""

    def __init__(self, side: Side, reactor: Reactor) -> None:
        self.side = side
        self.reactor = reactor
        self.page: WebServer | None = None
        self.sniffer_log = ""
        self._timer: Timer | None = None
        self._ticks = 0
        self._writing = False
        self._warn = Throttle(log, 60.0)

    def open_page(self, host: str, port: int) -> WebServer:
        """Bind a page (TransportError names the address); ``use`` starts it."""
        page = WebServer(self.reactor, host, port, {
            "/": self._html, "/metrics": _metrics, "/healthz": self._healthz, "/status.json": self._json})
        page.open()
        return page

    def use(self, page: WebServer | None, sniffer_log: str) -> None:
        """Serve ``page`` (closing the one served before) and write ``sniffer_log`` ("" for none)."""
        if page is not self.page:
            if self.page is not None:
                self.page.close()
            self.page = page
            if page is not None:
                page.start()
                log.info("%s status page on http://%s/", self.side.name, page.address)
        self.sniffer_log = sniffer_log
        if (page is not None or sniffer_log) and self._timer is None:
            self.side.usage.sample()
            self._timer = self.reactor.call_later(RATE_WINDOW, self._tick)

    def _tick(self) -> None:
        self.side.usage.sample()
        self._ticks += 1
        if self.sniffer_log and self._ticks % SNIFF_EVERY == 0 and not self._writing:
            self._writing = True
            if not self.reactor.submit(self._write_usage, self.sniffer_log, self._usage_file()):
                self._writing = False
        self._timer = self.reactor.call_later(RATE_WINDOW, self._tick)

    def close(self) -> None:
        """Stop serving; the usage file gets its last numbers (written here, at once)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.page is not None:
            self.page.close()
            self.page = None
        if self.sniffer_log:
            self._write_usage(self.sniffer_log, self._usage_file())

    # --- what is shown ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        side = self.side
        peer = side.tunnel_peer()
        rows = side.usage.snapshot()
        return {
            "side": side.name,
            "tunnel": "up" if peer else "down",
            "peer": peer,
            "describe": side.describe(),
            "uptime_seconds": int(time.monotonic() - side.usage.started),
            "connections_active": sum(int(row["active"]) for row in rows),  # type: ignore[call-overload]
            "ports": rows,
        }

    def _usage_file(self) -> bytes:
        data = self.snapshot()
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return json.dumps(data, indent=1).encode() + b"\n"

    def _write_usage(self, path: str, data: bytes) -> None:
        """Replace ``path`` atomically: a temporary file in the same directory, renamed over it."""
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(prefix=".backhaul-usage-", dir=os.path.dirname(os.path.abspath(path)))
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o644)
                handle.write(data)
            os.replace(tmp, path)
            tmp = ""
        except OSError as exc:
            self._warn.warning("cannot write the usage file (sniffer_log) %s: %s", path, exc.strerror or exc)
        finally:
            if tmp:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            self._writing = False

    def _json(self, _query: str) -> Answer:
        return 200, "application/json", json.dumps(self.snapshot()).encode()

    def _healthz(self, _query: str) -> Answer:
        peer = self.side.tunnel_peer()
        if peer:
            return 200, "text/plain; charset=utf-8", f"ok: tunnel up, {self.side.name} peer {peer}\n".encode()
        return 503, "text/plain; charset=utf-8", b"tunnel down\n"

    def _html(self, _query: str) -> Answer:
        return 200, "text/html; charset=utf-8", render_html(self.snapshot()).encode()


def _metrics(_query: str) -> Answer:
    return 200, PROMETHEUS_TEXT, METRICS.render().encode()


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""  # not reached


def human_duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .6em}
.state{display:inline-block;padding:.1em .6em;border-radius:.8em;color:#fff}
.up{background:#2a7d2a}.down{background:#b03030}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{color:#666}dd{margin:0}
table{border-collapse:collapse;margin-top:1em}th,td{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}small{color:#777}
"""


def render_html(data: dict[str, object]) -> str:
    """The page: state, peer, uptime, and per port connections, bytes and rates. No scripts, no
    external assets; it reloads itself every few seconds."""
    esc = html.escape
    state = str(data["tunnel"])
    rows = []
    for row in data["ports"]:  # type: ignore[attr-defined]
        cells = [f'<td class="port">{esc(str(row["port"]))}</td>']
        for key in ("active", "total", "bytes_to_target", "bytes_to_user"):
            value = int(row[key])
            extra = f" <small>({human_bytes(value)})</small>" if key.startswith("bytes") else ""
            cells.append(f'<td class="{key}" data-value="{value}">{value:,}{extra}</td>')
        for key in ("rate_to_target", "rate_to_user"):
            value = float(row[key])
            cells.append(f'<td class="{key}" data-value="{value:.0f}">{human_bytes(value)}/s</td>')
        rows.append(f'<tr data-port="{esc(str(row["port"]))}">{"".join(cells)}</tr>')
    body_rows = "\n".join(rows) or '<tr><td colspan="7">no connections yet</td></tr>'
    port_kind = "public port" if data["side"] == "server" else "target port"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>backhaul {esc(str(data["side"]))}: tunnel {esc(state)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>backhaul {esc(str(data["side"]))} <span id="state" class="state {esc(state)}">tunnel {esc(state)}</span></h1>
<dl>
<dt>peer</dt><dd id="peer">{esc(str(data["peer"]) or "none")}</dd>
<dt>tunnel</dt><dd id="describe">{esc(str(data["describe"]))}</dd>
<dt>uptime</dt><dd id="uptime" data-value="{data["uptime_seconds"]}">{human_duration(int(data["uptime_seconds"]))}</dd>
<dt>connections open</dt><dd id="active" data-value="{data["connections_active"]}">{data["connections_active"]}</dd>
</dl>
<table id="ports">
<thead><tr><th>{port_kind}</th><th>active</th><th>total</th><th>bytes to target</th><th>bytes to user</th>
<th>rate to target</th><th>rate to user</th></tr></thead>
<tbody>
{body_rows}
</tbody></table>
<p><small>numbers as of the page load; it reloads every {REFRESH} s.
<a href="/metrics">metrics</a> &middot; <a href="/status.json">json</a></small></p>
</body></html>
"""
