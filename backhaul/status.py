"""What one side shows an operator: the status page, ``/metrics``, ``/healthz``, and the usage
file of ``sniffer``, all from the side's usage numbers (backhaul/usage.py) and the process's own
(backhaul/process.py).

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

from backhaul import graph, process
from backhaul.log import Throttle
from backhaul.metrics import METRICS
from backhaul.reactor import Reactor, Timer
from backhaul.usage import RATE_WINDOW, REFUSED_TEXT, Usage
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

    def peers(self) -> list[dict[str, object]]:
        """The other side's ends, one row each: the server's clients (by address), or the
        client's servers; the first key names the row."""


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
        self._cpu = (time.monotonic(), process.cpu_seconds())   # the last tick's, for the CPU share
        self.cpu_percent = 0.0

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
        now, cpu = time.monotonic(), process.cpu_seconds()
        self.cpu_percent = 100 * (cpu - self._cpu[1]) / max(now - self._cpu[0], 1e-3)
        self._cpu = (now, cpu)
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
            "peers": side.peers(),
            "build": {"version": process.BUILD.version, "python": process.BUILD.python,
                      "wire": process.BUILD.wire, "text": process.BUILD.text()},
            "process": {"cpu_percent": round(self.cpu_percent, 1), "cpu_seconds": round(process.cpu_seconds(), 2),
                        "resident_bytes": process.resident_bytes(), "open_fds": process.open_fds(),
                        "max_fds": process.max_fds(), "threads": process.threads()},
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
        data = self.snapshot()
        data["graphs"] = self.side.usage.graphs()
        return 200, "text/html; charset=utf-8", render_html(data).encode()


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
.pill{display:inline-block;padding:.1em .6em;border-radius:.8em;color:#fff;background:#777;white-space:nowrap}
.up{background:#2a7d2a}.down{background:#b03030}.warn{background:#b86e00}.idle{background:#777}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{color:#666}dd{margin:0}
table{border-collapse:collapse;margin-top:1em}th,td{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}small{color:#777}td.health{text-align:left;max-width:24em}
tfoot td{font-weight:600;border-top:2px solid #bbb}td.graph{padding:.2em .4em}
""" + graph.STYLE

PORT_KEYS = ("active", "total", "bytes_to_target", "bytes_to_user")
ROW_BLOCKS = 60   # blocks in a port's or a peer's graph: a minute each over the hour (the side's has a step each)


def render_html(data: dict[str, object]) -> str:
    """The page: state, version, the process, the side's last hour, and per port connections,
    bytes, rates, the target's health and the last hour; then the peers. No scripts, no
    external assets; it reloads itself every few seconds."""
    esc = html.escape
    state = str(data["tunnel"])
    graphs: dict = data.get("graphs") or {"span": 3600, "side": None, "ports": {}, "peers": {}}  # type: ignore
    side = str(data["side"])
    now = time.time()
    span = int(graphs["span"])
    scale = graph.peak_of(graphs["side"])   # ports and peers share the side's scale: comparable at a glance
    rows = []
    sums = dict.fromkeys(PORT_KEYS, 0)
    for row in data["ports"]:  # type: ignore[attr-defined]
        port = str(row["port"])
        cells = [f'<td class="port">{esc(port)}</td>']
        for key in PORT_KEYS:
            value = int(row[key])
            sums[key] += value
            cells.append(_count_cell(key, value))
        for key in ("rate_to_target", "rate_to_user"):
            value = float(row[key])
            cells.append(f'<td class="{key}" data-value="{value:.0f}">{graph.rate_text(value)}</td>')
        cells.append(render_health(row, side, now))
        drawn = graph.svg(graphs["ports"].get(port), f"port {port}", span=span, scale=scale, blocks=ROW_BLOCKS)
        cells.append(f'<td class="graph">{drawn}</td>')
        rows.append(f'<tr data-port="{esc(port)}">{"".join(cells)}</tr>')
    body_rows = "\n".join(rows) or '<tr><td colspan="9">no connections yet</td></tr>'
    totals = "".join(_count_cell(key, sums[key]) for key in PORT_KEYS)
    peers = render_peers(data["peers"], graphs["peers"], span, scale)  # type: ignore[arg-type]
    port_kind = "public port" if side == "server" else "target port"
    health_head = "target" if side == "client" else "target <small>(as the server sees it)</small>"
    build: dict = data["build"]  # type: ignore[assignment]
    proc: dict = data["process"]  # type: ignore[assignment]
    fds = f'{proc["open_fds"]:,}' + (f' of {proc["max_fds"]:,}' if proc["max_fds"] else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>backhaul {esc(side)}: tunnel {esc(state)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>backhaul {esc(side)} <span id="state" class="pill {esc(state)}">tunnel {esc(state)}</span></h1>
<dl>
<dt>peer</dt><dd id="peer">{esc(str(data["peer"]) or "none")}</dd>
<dt>tunnel</dt><dd id="describe">{esc(str(data["describe"]))}</dd>
<dt>uptime</dt><dd id="uptime" data-value="{data["uptime_seconds"]}">{human_duration(int(data["uptime_seconds"]))}</dd>
<dt>connections open</dt><dd id="active" data-value="{data["connections_active"]}">{data["connections_active"]}</dd>
<dt>version</dt><dd id="version" data-value="{esc(build["version"])}">{esc(build["text"])}</dd>
<dt>process</dt><dd id="process">
CPU <span id="cpu" data-value="{proc["cpu_percent"]}">{proc["cpu_percent"]:.1f} %</span> of a core
<small>({proc["cpu_seconds"]:.1f} s in all)</small> &middot;
RSS <span id="rss" data-value="{proc["resident_bytes"]}">{human_bytes(proc["resident_bytes"])}</span> &middot;
<span id="fds" data-value="{proc["open_fds"]}">{fds}</span> open files &middot;
<span id="threads" data-value="{proc["threads"]}">{proc["threads"]}</span> threads</dd>
<dt>traffic</dt><dd id="traffic">{graph.svg(graphs["side"], "all ports", span=span, width=540, height=90, axis=True)}
<small><span class="key to-target"></span> to target (above the line) &nbsp;
<span class="key to-user"></span> to user (below)</small></dd>
</dl>
<table id="ports">
<thead><tr><th>{port_kind}</th><th>active</th><th>total</th><th>bytes to target</th><th>bytes to user</th>
<th>rate to target</th><th>rate to user</th><th>{health_head}</th><th>{graph.span_text(span)}</th></tr></thead>
<tbody>
{body_rows}
</tbody>
<tfoot><tr id="totals"><td>since start</td>{totals}<td colspan="4"></td></tr></tfoot></table>
{peers}
<p><small>numbers as of the page load; it reloads every {REFRESH} s.
<a href="/metrics">metrics</a> &middot; <a href="/status.json">json</a></small></p>
</body></html>
"""


def _count_cell(key: str, value: int) -> str:
    extra = f" <small>({human_bytes(value)})</small>" if key.startswith("bytes") else ""
    return f'<td class="{key}" data-value="{value}">{value:,}{extra}</td>'


def render_health(row: dict[str, object], side: str, now: float) -> str:
    """The cell of a port's target. The client knows its dials: down (refused, unreachable)
    while the last one failed, with the error and when, and the counts. The server knows only
    whether connections got a byte back: a run of those that did not is what a failing dial on
    the client looks like from here (or a service that answers nothing)."""
    esc = html.escape
    target: dict = row["target"]  # type: ignore[assignment]
    if side == "client":
        refused, unreachable = int(target["refused"]), int(target["unreachable"])  # type: ignore[call-overload]
        failed_at, connected_at = float(target["failed_at"]), float(target["connected_at"])  # type: ignore[arg-type]
        if failed_at > connected_at:
            state, word = "down", "refused" if REFUSED_TEXT in str(target["last_error"]) else "unreachable"
            detail = f'{_ago(failed_at, now)}: {esc(str(target["last_error"]))}'
        elif connected_at:
            state, word, detail = "up", "ok", f"connected {_ago(connected_at, now)}"
        else:
            state, word, detail = "idle", "no dial yet", ""
        if failed_at:
            detail += (f'<br>refused <span class="refused" data-value="{refused}">{refused}</span>, unreachable '
                       f'<span class="unreachable" data-value="{unreachable}">{unreachable}</span>')
            if state != "down":   # the failure is history: when, and what it was
                detail += f'; the last {_ago(failed_at, now)}: {esc(str(target["last_error"]))}'
    else:
        no_reply, replied_at = int(target["no_reply"]), float(target["replied_at"])  # type: ignore[call-overload]
        if no_reply:
            state, word = "warn", "no reply"
            which = "connection" if no_reply == 1 else "connections"
            detail = (f'the last <span class="no_reply" data-value="{no_reply}">{no_reply}</span> {which} ended '
                      "without a byte from the target: is it up? (the client's page says)")
        elif replied_at:
            state, word, detail = "up", "ok", f'answered {_ago(replied_at, now)}'
        elif int(row["bytes_to_user"]):  # type: ignore[call-overload]
            state, word, detail = "up", "ok", "answering"
        else:
            state, word, detail = "idle", "no connection ended yet", ""
    return (f'<td class="health" data-value="{state}"><span class="pill {state}">{word}</span>'
            f'{" <small>" + detail + "</small>" if detail else ""}</td>')


def _ago(when: float, now: float) -> str:
    seconds = max(0, int(now - when))
    text = f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago" if seconds < 7200 \
        else f"{seconds // 3600} h ago"
    return f'<span title="{_utc(when)}">{text}</span>'


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


PEER_STATES = {"in use": "up", "standby": "idle"}


def render_peers(rows: list[dict[str, object]], graphs: dict[str, object] | None = None, span: int = 3600,
                 scale: float = 0.0) -> str:
    """The table of the other side's ends (the server's clients, the client's servers), its
    columns the rows' keys, and each one's last hour; empty when there is none."""
    if not rows:
        return ""
    esc = html.escape
    graphs = graphs or {}
    keys = list(rows[0])
    head = "".join(f"<th>{esc(key.replace('_', ' '))}</th>" for key in keys) + f"<th>{graph.span_text(span)}</th>"
    body = []
    for row in rows:
        cells = []
        name = str(row[keys[0]])
        for key in keys:
            value = row.get(key, "")
            if isinstance(value, list):
                value = ", ".join(str(item) for item in value) or "none"
            number = f' data-value="{value}"' if isinstance(value, int) else ""
            shown = esc(str(value))
            if key == "state":   # a pill, coloured by what it says
                shown = f'<span class="pill {PEER_STATES.get(str(value), "idle")}">{shown}</span>'
            cells.append(f'<td class="{esc(key)}"{number}>{shown}</td>')
        points = graphs.get(name)
        drawn = graph.svg(points, name, span=span, scale=scale, blocks=ROW_BLOCKS) \
            if points is not None else ""  # type: ignore[arg-type]
        cells.append(f'<td class="graph">{drawn}</td>')
        body.append(f'<tr data-peer="{esc(name)}">{"".join(cells)}</tr>')
    return f'<table id="peers">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body) + "\n</tbody></table>"
