"""The measurements. Each starts its target service, then runs the same client
against every path in turn (direct, relay, tunnel, and the Go program when
BACKHAUL_GO is set) and returns table rows."""

import dataclasses
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from clients import ping_pong
from common import (
    HOST,
    Helper,
    cpu_seconds,
    fd_count,
    free_port,
    in_netns,
    is_listening,
    stop_process,
    threads_and_rss,
    track,
)
from nginx_ab import AbResult, Nginx, find_tools, run_ab
from report import PATHS, Cell, Row
from tunnel import TunnelPair

GB = 1e9
AB_REQUESTS = 10_000


@dataclass
class Settings:
    """What a run was asked for, and what it collects besides the rows."""

    seconds: float
    idle_count: int
    ab_rounds: int  # ab runs per path and concurrency, interleaved across the paths
    ping_rounds: int
    use_iperf: bool
    workdir: Path
    probe_port: int  # echo service behind every tunnel's readiness probe
    transport: str = "tcp"  # the `transport` key of both sides' configs (ours and Go's)
    server_extra: tuple[str, ...] = ()  # more KEY=VALUE lines for [server] (ours and Go's)
    client_extra: tuple[str, ...] = ()  # more KEY=VALUE lines for [client]
    go_binary: str | None = None  # the Go program, measured as a fourth path when set
    unavailable: dict[str, str] = field(default_factory=dict)  # path -> why it cannot run here
    # Across the emulated long path (wan.py): the namespace of the targets and the tunnel's
    # client, the address direct users reach the targets at, and the one the client dials.
    target_netns: str = ""
    direct_host: str = HOST
    tunnel_host: str = HOST
    notes: list[str] = field(default_factory=list)
    tunnel_logs: list[tuple[str, str, list[str]]] = field(default_factory=list)
    ab_requests: int = AB_REQUESTS
    ab_timeout: float = 120.0
    # Around each run of a path (label, path): wan.py checks its emulated link's own drops there.
    around_run: Callable[[str, str], AbstractContextManager[None]] | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        """The paths every measurement runs (the two-client pair only where asked for; the plain
        relay, a loopback yardstick, not across the long path)."""
        return tuple(p for p in PATHS if p not in ONLY_ASKED and (p != "go" or self.go_binary)
                     and (p != "relay" or not self.target_netns))


# The paths that run the Go program, and in which roles: "go server" is the Go server with our
# client, "go client" our server with the Go client (measured only where a row asks for them).
GO_ROLES = {"go": ("server", "client"), "go server": ("server",), "go client": ("client",)}
ONLY_ASKED = ("2 clients", "go server", "go client")


@dataclass
class Endpoint:
    """Where a client connects for one path, and the processes in between."""

    path: str
    port: int
    pids: dict[str, int]
    host: str = HOST
    echo_port: int = 0  # an echo service through the same path (the readiness probe's), 0: none


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays the report."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- paths


@contextmanager
def open_path(path: str, target_port: int, label: str, s: Settings) -> Iterator[Endpoint]:
    """Bring up one path to the target (nothing, a relay process, or a tunnel pair: ours or Go's)."""
    if path == "direct":
        yield Endpoint(path, target_port, {}, s.direct_host, s.probe_port)
    elif path == "relay":
        with Helper.script("relay.py", target_port) as relay:
            yield Endpoint(path, int(relay.expect("PORT", 10)), {"relay": relay.pid})
    else:
        go_roles = GO_ROLES.get(path, ())
        go_binary = s.go_binary if go_roles else None
        pair = TunnelPair(s.workdir, label, target_port, s.probe_port, s.transport, go_binary,
                          s.server_extra, s.client_extra, clients=2 if path == "2 clients" else 1,
                          client_netns=s.target_netns, tunnel_host=s.tunnel_host, go_roles=go_roles)
        try:
            with pair:
                yield Endpoint(path, pair.public_port, pair.pids, echo_port=pair.probe_public_port)
                pair.check_alive()  # a crash mid-measurement taints the numbers: say so
        finally:
            for role, lines in pair.logs().items():
                if lines:
                    s.tunnel_logs.append((label, f"go {role}" if role in go_roles else role, lines))
            s.notes += [f"{path} ({label}): {n}" for n in pair.notes]


def each_path(
    label: str,
    names: list[str],
    target_port: int,
    s: Settings,
    fn: Callable[[Endpoint], dict[str, Cell]],
    paths: tuple[str, ...] = PATHS,
    extra: tuple[str, ...] = (),
    rotate: int = 0,
) -> list[Row]:
    """Run `fn` on every path (and on the `extra` ones), starting `rotate` paths later and
    wrapping round; one failed path becomes an error cell, not a failed run."""
    cells: dict[str, dict[str, Cell]] = {name: {} for name in names}
    order = s.paths + extra
    turn = rotate % len(order)
    for path in order[turn:] + order[:turn]:
        if path not in paths + extra:
            got = {name: Cell.missing("-") for name in names}
        elif path in s.unavailable:
            got = {name: Cell.missing("n/a") for name in names}
        else:
            got = _run_one(label, path, target_port, s, fn)
        for name in names:
            cells[name][path] = got.get(name, Cell.missing("error"))
    return [Row(name, "info", cells[name]) for name in names]


def _run_one(
    label: str, path: str, target_port: int, s: Settings, fn: Callable[[Endpoint], dict[str, Cell]]
) -> dict[str, Cell]:
    t0 = time.monotonic()
    try:
        with open_path(path, target_port, label, s) as endpoint, \
                (s.around_run(label, path) if s.around_run else nullcontext()):
            got = fn(endpoint)
    except Exception as exc:  # reported in the notes; the run goes on
        s.notes.append(f"{label} via {path}: {type(exc).__name__}: {exc}")
        log(f"  {label:<22} {path:<7} FAILED: {exc}")
        return {}
    shown = ", ".join(f"{k}: {_brief(c)}" for k, c in got.items())
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    log(f"  {label:<22} {path:<7} {shown}  ({time.monotonic() - t0:.1f} s)")
    return got


def _brief(cell: Cell) -> str:
    if cell.text is not None:
        return cell.text
    value = f"{cell.value:,.2f}" if cell.value is not None else "-"
    return f"{value} {cell.extra}".strip()


# -------------------------------------------------------------- throughput


class PySink:
    """Python sink service plus Python sender processes."""

    name = "python sender/sink"

    def __init__(self) -> None:
        self.service = Helper.script("services.py", "sink")
        self.port = int(self.service.expect("PORT", 10))

    def run(self, port: int, streams: int, seconds: float) -> tuple[float, float]:
        """Bytes received by the sink and the seconds between its first and last byte."""
        with Helper.script("clients.py", "send", port, "--streams", streams, "--seconds", seconds) as sender:
            result = sender.expect_json("RESULT", seconds + 60)
        if result["errors"]:
            raise RuntimeError("sender: " + "; ".join(result["errors"]))
        conns = [self.service.expect_json("CONN", 15) for _ in range(streams)]
        total = sum(c["bytes"] for c in conns)
        window = max(c["last"] for c in conns) - min(c["first"] for c in conns if c["bytes"])
        return total, window

    def stop(self) -> None:
        self.service.stop()


class IperfSink:
    """An iperf3 server as the sink; the iperf3 client drives the streams."""

    name = "iperf3"

    def __init__(self, netns: str = "", host: str = HOST, congestion: str = "") -> None:
        """``netns``: the network namespace to run in; ``host``: the address to listen on;
        ``congestion``: the algorithm of the test's sockets (iperf3 -C, both ends), else the default."""
        self.port = free_port()
        self.congestion = congestion
        self.proc = subprocess.Popen(
            in_netns(netns, [shutil.which("iperf3") or "iperf3", "-s", "-B", host, "-p", str(self.port)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        track(self.proc)
        # A probe connection would look like a test to iperf3; watch the socket table instead.
        deadline = time.monotonic() + 10
        while not is_listening(self.port, self.proc.pid if netns else None):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("iperf3 server did not start listening")
            time.sleep(0.05)

    def run(self, port: int, streams: int, seconds: float, reverse: bool = False,
            host: str = HOST) -> tuple[float, float]:
        argv = [
            shutil.which("iperf3") or "iperf3",
            "-c",
            host,
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-P",
            str(streams),
            "-J",
            *(["-R"] if reverse else []),
            *(["-C", self.congestion] if self.congestion else []),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        report = json.loads(done.stdout or "{}")
        if "error" in report or done.returncode != 0:
            raise RuntimeError(f"iperf3: {report.get('error', done.stderr.strip())}")
        received = report["end"]["sum_received"]
        return float(received["bytes"]), float(received["seconds"])

    def stop(self) -> None:
        stop_process(self.proc)


def measure_throughput(s: Settings, stream_counts: tuple[int, ...] = (1, 8)) -> list[Row]:
    """User to target over 1 and 8 streams; with iperf3 also 1 stream target to user (``-R``),
    the direction of most traffic behind a reverse tunnel (a WebSocket client masks it)."""
    rows: list[Row] = []
    runs = [(streams, False) for streams in stream_counts]
    if s.use_iperf and 1 in stream_counts:
        runs.append((1, True))
    for streams, reverse in runs:
        label = f"throughput {streams} stream" + ("s" if streams > 1 else "") + (" back" if reverse else "")
        sink = IperfSink() if s.use_iperf else PySink()
        try:
            rows += _throughput_rows(s, sink, streams, label, reverse)
        finally:
            sink.stop()
    if not s.use_iperf:
        s.notes.append("throughput back (target to user): not measured (needs iperf3)")
    return rows


def _throughput_rows(s: Settings, sink: PySink | IperfSink, streams: int, label: str,
                     reverse: bool = False) -> list[Row]:
    cpu_name = "CPU s per GB moved" + (" back" if reverse else "")
    names = [label] + ([cpu_name] if streams == 1 else [])

    def one(ep: Endpoint) -> dict[str, Cell]:
        before = {name: cpu_seconds(pid) for name, pid in ep.pids.items()}
        moved, window = sink.run(ep.port, streams, s.seconds, reverse) if reverse else \
            sink.run(ep.port, streams, s.seconds)
        per_gb = {name: (cpu_seconds(pid) - before[name]) / (moved / GB) for name, pid in ep.pids.items()}
        cells = {label: Cell(moved / window / 1e6)}
        if streams == 1:
            # Show the split when there are two processes (server + client of the tunnel).
            split = " + ".join(f"{name} {v:.2f}" for name, v in per_gb.items()) if len(per_gb) > 1 else ""
            cells[cpu_name] = Cell(sum(per_gb.values()), extra=split) if per_gb else Cell.missing("-")
        return cells

    rows = each_path(label, names, sink.port, s, one)
    rows[0].kind, rows[0].unit = "higher", " MB/s"
    rows[0].name += " (MB/s)"
    if streams == 1:
        rows[1].kind, rows[1].fmt = "cost", "{:,.2f}"
    return rows


# --------------------------------------------------------- connections/second


def measure_connrate(s: Settings) -> list[Row]:
    # Two workers so the target keeps up with two generator processes.
    with Helper.script("services.py", "reqrep", "--workers", 2) as target:
        port = int(target.expect("PORT", 10))
        rows: list[Row] = []
        for concurrency in (50, 200):
            label = f"conn/s c={concurrency}"
            row = each_path(label, [label], port, s, lambda ep, c=concurrency: _rate(ep, c, s))[0]
            row.kind = "higher"
            rows.append(row)
        return rows


def _rate(ep: Endpoint, concurrency: int, s: Settings, generators: int = 2) -> dict[str, Cell]:
    label = f"conn/s c={concurrency}"
    # A common start time so both generators load the path at once.
    start_at = time.monotonic() + 1.0
    helpers = [
        Helper.script(
            "clients.py",
            "rate",
            ep.port,
            "--concurrency",
            concurrency // generators,
            "--seconds",
            s.seconds,
            "--start-at",
            start_at,
            "--host",
            ep.host,
        )
        for _ in range(generators)
    ]
    try:
        results = [h.expect_json("RESULT", s.seconds + 30) for h in helpers]
    finally:
        for h in helpers:
            h.stop()
    ok = sum(r["ok"] for r in results)
    elapsed = max(r["seconds"] for r in results)
    failed: dict[str, int] = {}
    for r in results:
        for why, n in r["failed"].items():
            failed[why] = failed.get(why, 0) + n
    if failed:
        s.notes.append(f"{label} via {ep.path}: failures {failed}")
    return {label: Cell(ok / elapsed, extra=f"{sum(failed.values())} fail")}


# ----------------------------------------------------- one client or two


def measure_clients(s: Settings) -> list[Row]:
    """Connections/s and throughput through one server with one client (tunnel) and with two
    (a balance server, each client from its own loopback address), in the same run; the two-client
    cell also shows its ratio to the one-client cell."""
    rows: list[Row] = []
    with Helper.script("services.py", "reqrep", "--workers", 2) as target:
        port = int(target.expect("PORT", 10))
        label = "conn/s c=200"
        row = each_path(f"{label} clients", [label], port, s, lambda ep: _rate(ep, 200, s),
                        paths=("direct", "tunnel"), extra=("2 clients",))[0]
        row.kind = "higher"
        rows.append(row)
    sink = IperfSink() if s.use_iperf else PySink()
    try:
        label = "throughput 8 streams (MB/s)"

        def moved(ep: Endpoint) -> dict[str, Cell]:
            total, window = sink.run(ep.port, 8, s.seconds)
            return {label: Cell(total / window / 1e6)}

        row = each_path("throughput clients", [label], sink.port, s, moved, paths=("direct", "tunnel"),
                        extra=("2 clients",))[0]
        row.kind, row.unit = "higher", " MB/s"
        rows.append(row)
    finally:
        sink.stop()
    for row in rows:
        one, two = row.cells.get("tunnel"), row.cells.get("2 clients")
        if one and two and one.value and two.value is not None:
            two.extra = ", ".join(x for x in (two.extra, f"{two.value / one.value:.2f}x one client") if x)
        row.name += ", 1 vs 2 clients"
    return rows


# ------------------------------------------------------- ab against nginx


def measure_ab(s: Settings) -> list[Row]:
    """ApacheBench against nginx, one request per connection; skipped when either is missing.

    Each concurrency runs ``ab_rounds`` rounds over every path, the paths in a rotated order
    each round, and shows each path's median: the machine's speed drifts within minutes (the
    direct figure alone moves by a fifth between runs), and a ratio of figures taken side by
    side in each round is what the table is for."""
    tools, missing = find_tools()
    if missing:
        why = f"ab: skipped, {' and '.join(missing)} not found (apt-get install nginx apache2-utils)"
        s.notes.append(why)
        log(f"  {why}")
        return []
    try:
        nginx = Nginx(tools["nginx"], s.workdir, s.target_netns, "0.0.0.0" if s.target_netns else HOST)
    except RuntimeError as exc:
        s.notes.append(f"ab: skipped, nginx did not start: {exc}")
        log(f"  ab: skipped, nginx did not start: {exc}")
        return []
    rows: list[Row] = []
    with nginx:
        for concurrency in (50, 200):
            rows += _ab_rows(tools["ab"], concurrency, nginx.port, s)
    return rows


def _ab_rows(ab: str, concurrency: int, port: int, s: Settings) -> list[Row]:
    """The requests/s row, and the CPU the middle processes spent per connection (user + system
    of both tunnel processes, or of the relay): what a connection costs, whatever else the
    machine runs meanwhile."""
    label = f"ab req/s c={concurrency}"
    runs: dict[str, list[AbResult]] = {}
    cpu: dict[str, list[float]] = {}

    def one(ep: Endpoint) -> dict[str, Cell]:
        before = sum(cpu_seconds(pid) for pid in ep.pids.values())
        result = _ab(ep, ab, concurrency, s)
        runs.setdefault(ep.path, []).append(result)
        if ep.pids:
            spent = sum(cpu_seconds(pid) for pid in ep.pids.values()) - before
            cpu.setdefault(ep.path, []).append(spent / max(1, result.complete) * 1e6)
        return {label: Cell(result.rps)}

    rounds = [each_path(label, [label], port, s, one, rotate=turn)[0] for turn in range(s.ab_rounds)]
    if s.ab_rounds > 1:
        s.notes.append(f"{label}, each round to its own direct: " + "; ".join(map(_round_ratios, rounds)))
    row = _median_row(rounds, runs)
    row.kind = "higher"
    cost = Row(f"CPU µs per ab connection c={concurrency}", "cost")
    for path in row.cells:
        spent = cpu.get(path)
        cost.cells[path] = Cell(statistics.median(spent), extra=f"{min(spent):,.0f}-{max(spent):,.0f}"
                                if len(spent) > 1 else "") if spent else Cell.missing("-")
    return [row, cost]


def _ab(ep: Endpoint, ab: str, concurrency: int, s: Settings) -> AbResult:
    result = run_ab(ab, ep.port, s.ab_requests, concurrency, timeout=s.ab_timeout, host=ep.host)
    if result.failed or result.non2xx:
        s.notes.append(
            f"ab req/s c={concurrency} via {ep.path}: {result.failed} failed ({result.failed_detail}),"
            f" {result.non2xx} non-2xx of {result.complete:,} complete"
        )
    return result


def _median_row(rounds: list[Row], runs: dict[str, list[AbResult]]) -> Row:
    """The rounds as one row: per path the median, the range when there are several rounds,
    and the failures of all rounds; a path that failed in a round shows that round's error."""
    first = rounds[0]
    cells: dict[str, Cell] = {}
    for path, cell in first.cells.items():
        broken = next((r.cells[path] for r in rounds if r.cells[path].value is None), None)
        results = runs.get(path, [])
        if broken is not None or not results:
            cells[path] = broken or cell
            continue
        rps = [r.rps for r in results]
        failed = sum(r.failed for r in results)
        non2xx = sum(r.non2xx for r in results)
        extra = f"{failed} fail" + (f", {non2xx} non-2xx" if non2xx else "")
        if len(rps) > 1:
            extra += f", {min(rps):,.0f}-{max(rps):,.0f}"
        cells[path] = Cell(statistics.median(rps), extra=extra)
    return Row(first.name, first.kind, cells)


def _round_ratios(row: Row) -> str:
    """One round's figures as ratios to that round's direct figure."""
    direct = row.cells.get("direct")
    if direct is None or not direct.value:
        return "no direct figure"
    cells = sorted(row.cells.items(), key=_path_order)
    return ", ".join(f"{path} {cell.value / direct.value:.2f}x" for path, cell in cells
                     if path != "direct" and cell.value is not None)


def _path_order(item: tuple[str, Cell]) -> int:
    return PATHS.index(item[0]) if item[0] in PATHS else len(PATHS)


# ------------------------------------------------------------------ latency


def measure_latency(s: Settings) -> list[Row]:
    names = ["latency p50 (µs)", "latency p99 (µs)"]
    with Helper.script("services.py", "echo") as echo:
        port = int(echo.expect("PORT", 10))

        def one(ep: Endpoint) -> dict[str, Cell]:
            samples = sorted(ping_pong(ep.port, s.ping_rounds, warmup=500, max_seconds=60, host=ep.host))
            if not samples:
                raise RuntimeError("no round trips completed")
            return {names[0]: Cell(percentile(samples, 0.50)), names[1]: Cell(percentile(samples, 0.99))}

        rows = each_path("latency", names, port, s, one)
    for row in rows:
        row.kind, row.fmt, row.unit = "lower", "{:,.1f}", " µs"
    return rows


def percentile(sorted_samples: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted samples."""
    index = min(len(sorted_samples) - 1, max(0, round(q * len(sorted_samples)) - 1))
    return sorted_samples[index]


# ---------------------------------------------------------- idle connections


def measure_idle(s: Settings) -> list[Row]:
    n = s.idle_count
    phases = ("0 conns", f"{n:,} conns", "after close")
    names = [f"idle {phase}: {role}" for phase in phases for role in ("server", "client")]
    names.append("idle pairing")
    with Helper.script("services.py", "echo") as target:
        port = int(target.expect("PORT", 10))
        rows = each_path("idle", names, port, s, lambda ep: _idle(ep, s, names), paths=("tunnel", "go"))
    return rows


def _snapshot(pids: dict[str, int]) -> dict[str, Cell]:
    out: dict[str, Cell] = {}
    for role, pid in pids.items():
        threads, rss = threads_and_rss(pid)
        out[role] = Cell(text=f"{threads} thr, {rss:,.1f} MiB, {fd_count(pid):,} fds")
    return out


def _idle(ep: Endpoint, s: Settings, names: list[str]) -> dict[str, Cell]:
    n = s.idle_count
    cells: dict[str, Cell] = {}

    def record(phase_index: int) -> None:
        for role, cell in _snapshot(ep.pids).items():
            cells[names[phase_index * 2 + (role == "client")]] = cell

    time.sleep(0.5)  # let the readiness probe's connection wind down
    record(0)
    holder = Helper.script(
        "clients.py",
        "hold",
        ep.port,
        "--count",
        n,
        "--rate",
        2000,
        "--inflight",
        200,
        "--deadline",
        60 + n / 100,
        stdin=True,
    )
    with holder:
        t0 = time.monotonic()
        state = _await_pairing(holder, n, 90 + n / 100)
        took = time.monotonic() - t0
        time.sleep(1.0)  # let both tunnel processes settle after the last pairing
        record(1)
        holder.send("status")
        status = holder.expect_json("STATUS", 10)
        holder.send("close")
        holder.expect("CLOSED", 30)
    time.sleep(3.0)  # give the tunnel time to notice the closes and release resources
    record(2)
    cells[names[-1]] = Cell(
        text=(
            f"{status['paired']:,}/{n:,} paired in {took:.1f} s, {sum(state['failed'].values())} failed"
            f" of {state['attempts']:,} tries, {status['dropped']} dropped while held"
        )
    )
    if state["failed"]:
        s.notes.append(f"idle via {ep.path}: failed opens {state['failed']}")
    if status["paired"] < n:
        s.notes.append(f"idle via {ep.path}: only {status['paired']:,} of {n:,} connections were paired")
    return cells


def _await_pairing(holder: Helper, n: int, timeout: float) -> dict:
    """Wait for the holder to pair all connections (or give up); show progress now and then."""
    deadline = time.monotonic() + timeout
    next_log = time.monotonic() + 5
    while True:
        kind, rest = holder.expect_any(("PROGRESS", "READY", "INCOMPLETE"), deadline - time.monotonic())
        state = json.loads(rest)
        if kind != "PROGRESS":
            return state
        if time.monotonic() >= next_log:
            log(f"  idle: {state['paired']:,}/{n:,} paired, {sum(state['failed'].values())} failed")
            next_log = time.monotonic() + 5


# ---------------------------------------------------------------------- UDP

UDP_SIZES = (64, 1400)
# (transport, label, server lines): UDP over the tcp transport (accept_udp) and the udp transport
UDP_MODES = (("tcp", "tcp carrier", ("accept_udp=true",)), ("udp", "udp transport", ()))
PACED_SHARE = 0.3       # the paced run offers this share of direct's Mbit/s: no loss expected (tcp carrier)
UDP_FLOWS = 200         # flows opened to see that threads do not grow with them


class IperfUdp:
    """iperf3 -u: its control connection is TCP to the same port number as the datagrams."""

    def __init__(self) -> None:
        self.sink = IperfSink()
        self.port = self.sink.port

    def run(self, port: int, size: int, seconds: float, mbps: float = 0.0) -> dict[str, float]:
        """One test at an offered rate (0: as fast as the sender goes); what the receiver got.

        A pause first: datagrams of the previous test still on their way would reach the next one
        (iperf3's server takes the first source it hears as its client). Socket buffers of 4 MiB
        at both ends, so that the receiver's own bursts are not what is measured."""
        time.sleep(1.0)
        argv = [shutil.which("iperf3") or "iperf3", "-c", HOST, "-p", str(port), "-u", "-l", str(size),
                "-b", str(int(mbps * 1e6)), "-w", "4M", "-t", str(seconds), "-J"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        report = json.loads(done.stdout or "{}")
        if "error" in report or done.returncode != 0:
            raise RuntimeError(f"iperf3: {report.get('error', done.stderr.strip())}")
        end = report["end"]
        got = end.get("sum_received") or end["sum"]   # iperf3 >= 3.12 has sum_received
        sent, lost = int(got["packets"]), int(got["lost_packets"])
        return {"mbps": got["bits_per_second"] / 1e6, "pps": (sent - lost) / got["seconds"], "sent": sent,
                "lost": lost}

    def stop(self) -> None:
        self.sink.stop()


def measure_udp(s: Settings) -> list[Row]:
    """Datagrams/s and Mbit/s of 64 B and 1400 B datagrams through both UDP modes, and the loss at
    a paced rate; needs iperf3."""
    if not shutil.which("iperf3"):
        s.notes.append("udp: not measured (needs iperf3: apt-get install iperf3)")
        return []
    rows: list[Row] = []
    iperf = IperfUdp()
    try:
        for mode, label, lines in UDP_MODES:
            ms = dataclasses.replace(s, transport=mode, server_extra=s.server_extra + lines)
            for size in UDP_SIZES:
                rows += _udp_rows(ms, iperf, size, label)
    finally:
        iperf.stop()
    with Helper.script("services.py", "echo") as echo:
        port = int(echo.expect("PORT", 10))
        for mode, label, lines in UDP_MODES:
            ms = dataclasses.replace(s, transport=mode, server_extra=s.server_extra + lines)
            name = f"threads with 1 -> {UDP_FLOWS} UDP flows ({label})"
            rows += each_path(name, [name], port, ms, lambda ep, n=name: _flow_threads(ep, n), paths=("tunnel", "go"))
    return rows


def _udp_rows(s: Settings, iperf: IperfUdp, size: int, label: str) -> list[Row]:
    mbit = f"UDP {size} B Mbit/s ({label})"
    rate = f"UDP {size} B datagrams/s ({label})"
    names = [mbit, rate]
    paced = f"UDP {size} B lost at {PACED_SHARE:g}x direct's Mbit/s ({label})"
    if size == max(UDP_SIZES):
        names.append(paced)
    offered: dict[str, float] = {}

    def one(ep: Endpoint) -> dict[str, Cell]:
        with _iperf_control(ep, s, iperf.port):
            full = iperf.run(ep.port, size, s.seconds)
            cells = {mbit: Cell(full["mbps"], extra=f"{_lost(full)} lost"), rate: Cell(full["pps"])}
            if paced in names:
                if ep.path == "direct":
                    offered["mbps"] = full["mbps"] * PACED_SHARE
                got = iperf.run(ep.port, size, s.seconds, offered["mbps"])
                cells[paced] = Cell(text=f"{_lost(got)} ({got['lost']:,} of {got['sent']:,} at "
                                         f"{offered['mbps']:,.0f} Mbit/s)")
        return cells

    rows = each_path(mbit, names, iperf.port, s, one, paths=("direct", "tunnel", "go"))
    rows[0].kind, rows[1].kind = "higher", "higher"
    return rows


def _lost(result: dict[str, float]) -> str:
    return f"{100 * result['lost'] / result['sent']:.1f}%" if result["sent"] else "-"


@contextmanager
def _iperf_control(ep: Endpoint, s: Settings, iperf_port: int) -> Iterator[None]:
    """The udp transport carries datagrams only: iperf3's control connection goes through a plain
    relay listening on the TCP port of the same number."""
    if ep.path == "direct" or s.transport != "udp":
        yield
        return
    with Helper.script("relay.py", iperf_port, "--listen", ep.port) as relay:
        relay.expect("PORT", 10)
        yield


def _flow_threads(ep: Endpoint, name: str) -> dict[str, Cell]:
    """Threads of the tunnel processes with one UDP flow, then with UDP_FLOWS flows open."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(UDP_FLOWS)]
    try:
        _echo_datagram(socks[0], ep.port)
        before = {role: threads_and_rss(pid)[0] for role, pid in ep.pids.items()}
        for sock in socks[1:]:
            _echo_datagram(sock, ep.port)
        after = {role: threads_and_rss(pid)[0] for role, pid in ep.pids.items()}
    finally:
        for sock in socks:
            sock.close()
    text = " + ".join(f"{role} {before[role]} -> {after[role]}" for role in ep.pids)
    return {name: Cell(text=text)}


def _echo_datagram(sock: socket.socket, port: int, tries: int = 5) -> None:
    sock.settimeout(1.0)
    for _ in range(tries):
        sock.sendto(b"flow", (HOST, port))
        try:
            if sock.recv(64) == b"flow":
                return
        except TimeoutError:
            continue
    raise RuntimeError(f"no echo through UDP port {port}")
