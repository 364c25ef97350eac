"""Benchmark across an emulated long path: direct vs the tunnel (vs the Go program) between two
network namespaces joined by the forwarder of wanpath.py.

    python bench/wan.py                                    # tcp, 100 ms, 100 Mbit/s, every row
    python bench/wan.py --transport tcpmux --transport tcpmux/v2 --transport ws --rtt-ms 20 --rtt-ms 100
    python bench/wan.py --only fresh --only ab --quick
    python bench/wan.py --cc cubic --server-set 'congestion="bbr"' --client-set 'congestion="bbr"'
    BACKHAUL_GO=/path/to/backhaul python bench/wan.py      # the Go program as a fourth path

Root only (TUN devices, network namespaces); elsewhere it prints why and exits 0. The users'
side (this driver, the load generators, the tunnel server) runs in one namespace, the targets
and the tunnel client in the other; see bench/README.md.
"""

import argparse
import dataclasses
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from clients import fresh_connections, ping_pong
from common import Helper, in_netns, is_listening, raise_nofile_limit, stop_all, tls_settings
from measure import Endpoint, IperfSink, Settings, each_path, log, measure_ab, percentile
from nginx_ab import Nginx, find_tools, run_ab
from report import Cell, Row, render_markdown, render_text
from run import go_state, tunnel_log_lines
from tunnel import check_available
from wanpath import ADDRESS_A, ADDRESS_B, WanPath, describe, namespaces, own_drops, unavailable

ROWS = ("bulk", "stream", "fresh", "ab", "interactive", "links")
WAN_PATHS = ("direct", "tunnel", "go")
GO_ENV = "BACKHAUL_GO"
ANY = "0.0.0.0"            # the targets listen on every address of their namespace: direct reaches them
FRESH_COUNT = 100
LINKS_CONCURRENCY = 200
IPERF_TRIES = 5
NEEDS_IPERF3 = ("bulk", "stream", "fresh", "interactive")
MIXED_PATHS = ("go server", "go client")
MUX_TRANSPORTS = ("tcpmux", "wsmux", "wssmux")
A_HEX_REMOTE = "".join(f"{int(part):02X}" for part in reversed(ADDRESS_B.split(".")))  # /proc/net/tcp form


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark across an emulated long path (root only).")
    parser.add_argument("--transport", action="append", metavar="NAME",
                        help="tcp, tcpmux, ws, wss, wsmux, wssmux; a mux one with /v2 (tcpmux/v2): mux_version = 2 "
                             "on both sides; repeatable (default tcp)")
    parser.add_argument("--rtt-ms", dest="rtt_ms", action="append", type=float, metavar="MS",
                        help="round trip of the path (half each way); repeatable (default 100)")
    parser.add_argument("--rate-mbit", dest="rate_mbit", type=float, default=100.0, help="each way (default 100)")
    parser.add_argument("--queue-ms", dest="queue_ms", type=float, default=25.0,
                        help="the path's drop-tail queue, in ms at its rate (default 25)")
    parser.add_argument("--cc", default="", metavar="NAME",
                        help="congestion control of both namespaces (the 'host's' default for direct, Go, and "
                             "ours without `congestion`); default: as the host")
    parser.add_argument("--only", action="append", choices=ROWS, help="run these rows only; repeatable")
    parser.add_argument("--quick", action="store_true", help="5 s bulk runs, 2,000 ab requests, 10 s after a load")
    parser.add_argument("--seconds", type=float, default=0.0, help="seconds per bulk run (default 10, quick 5)")
    parser.add_argument("--ab-requests", dest="ab_requests", type=int, default=0,
                        help="requests per ab run (default 5,000, quick 2,000)")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to watch the connections between the hosts after a load (default 60)")
    parser.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more line for the [server] table of our tunnels and the Go pair's; repeatable")
    parser.add_argument("--client-set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more line for the [client] table; repeatable")
    parser.add_argument("--out", type=Path, help="also write the table as Markdown to this file")
    parser.add_argument("--inside", default="", help=argparse.SUPPRESS)   # the targets' namespace
    # The host's tcp_mem: a namespace of its own does not show it (the run inside is given it).
    parser.add_argument("--tcp-mem", dest="tcp_mem", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inside:
        return inside(args)
    why = unavailable()
    if why:
        print(f"wan: skipped: {why}", flush=True)
        return 0
    # The driver itself runs in the users' namespace: its loopback is the server host's, so the
    # tunnel pairs, probes and load generators of measure.py work there unchanged.
    with namespaces() as (users, targets):
        with open("/proc/sys/net/ipv4/tcp_mem") as f:
            pressure = f.read().split()[1]
        argv_inside = in_netns(users, [sys.executable, str(Path(__file__).resolve()), "--inside", targets,
                                       "--tcp-mem", pressure, *(sys.argv[1:] if argv is None else argv)])
        child = subprocess.Popen(argv_inside)
        try:
            return child.wait()
        except BaseException:
            child.terminate()
            child.wait(30)
            raise


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def inside(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-wan-"))
    try:
        return run(args, workdir)
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------ run


@dataclasses.dataclass
class Wan:
    """The emulated path of one run and what the rows need of it."""

    path: WanPath
    targets: str                  # the targets' namespace
    tcp_pressure: int             # pages of TCP buffers, host-wide, past which the kernel clamps windows
    seconds: float
    settle: float
    rate_mbit: float
    label: str = ""               # "[100 ms, tcp, bbr]": what the row names start with
    own_drops: int = 0            # the forwarder's own drops over the whole run
    socket_cc: str = ""           # --cc the namespaces refused: set on each socket of iperf3 and ours
    interactive: float = 30.0     # seconds of the interactive row's download (p99 of ~250 round trips)

    def sink(self) -> IperfSink:
        """An iperf3 server on the targets' side (its tests on ``socket_cc`` when that is set)."""
        return IperfSink(netns=self.targets, host=ANY, congestion=self.socket_cc)


def run(args: argparse.Namespace, workdir: Path) -> int:
    raise_nofile_limit()
    targets = args.inside
    quick = args.quick
    socket_cc = set_congestion(args.cc, targets) if args.cc else ""
    cc = congestion_of(targets)
    if socket_cc:
        # Ours gets it through its own key; the Go program has none and runs the default.
        args.server_set.append(f'congestion="{socket_cc}"')
        args.client_set.append(f'congestion="{socket_cc}"')
        cc_text = (f"{socket_cc} per socket: iperf3 -C on both ends of its tests, our `congestion` key; "
                   f"the Go pair and the other connections: {cc}")
        cc = f"{socket_cc}/socket"
    else:
        cc_text = f"{cc} in both namespaces"
    ours = "" if socket_cc else _ours_congestion(args.server_set + args.client_set)
    rtts = args.rtt_ms or [100.0]
    transports = args.transport or ["tcp"]
    available, version = check_available()
    go_binary = os.environ.get(GO_ENV) or None
    go_ok, go_text = go_state(go_binary)
    unavailable_paths: dict[str, str] = {} if available else {"tunnel": version}
    if go_binary and not go_ok:
        unavailable_paths["go"] = go_text
    seconds = args.seconds or (5.0 if quick else 10.0)
    path = WanPath("", targets, delay_ms=rtts[0] / 2, rate_mbit=args.rate_mbit, queue_ms=args.queue_ms)
    wan = Wan(path, targets, args.tcp_mem, seconds, args.settle or (10.0 if quick else 60.0), args.rate_mbit,
              socket_cc=socket_cc, interactive=10.0 if quick else 30.0)
    header = [
        f"machine: {os.cpu_count()} cores, kernel {platform.release()}, Python {platform.python_version()}; "
        f"load average at start {_loadavg()}",
        f"path: two network namespaces, {ADDRESS_A} (users, tunnel server) and {ADDRESS_B} (targets, tunnel "
        f"client); {args.rate_mbit:g} Mbit/s each way, drop-tail queue {args.queue_ms:g} ms, round trip "
        f"{', '.join(f'{r:g}' for r in rtts)} ms",
        f"forwarder: {path.ready['priority']} (bench/wanpath.py)",
        f"congestion control: {cc_text}" + (f"; ours: congestion = {ours}" if ours else ""),
        f"tunnel: {version if available else 'UNAVAILABLE - ' + version}",
        f"go: {go_text}",
    ]
    print("\n".join(header), flush=True)
    rows: list[Row] = []
    with path, Helper.script("services.py", "echo", netns=targets, env={"BENCH_LISTEN": ANY}) as probe:
        s = Settings(seconds=seconds, idle_count=0, ab_rounds=1, ping_rounds=0, use_iperf=True, workdir=workdir,
                     probe_port=int(probe.expect("PORT", 10)), go_binary=go_binary, unavailable=unavailable_paths,
                     target_netns=targets, direct_host=ADDRESS_B, tunnel_host=ADDRESS_A,
                     ab_requests=args.ab_requests or (2_000 if quick else 5_000), ab_timeout=600.0,
                     client_extra=tuple(args.client_set))
        s.around_run = lambda label, name: _checked(wan, s, label, name)
        iperf3 = shutil.which("iperf3")
        if not iperf3:
            s.notes.append("bulk, interactive and the forwarder's capacity: not measured (needs iperf3: "
                           "apt-get install iperf3)")
        elif available:
            header.append(capacity(wan, s))
            print(header[-1], flush=True)
        for rtt in rtts:
            path.set(delay_ms=rtt / 2, loss=0)
            for spec in transports:
                transport, mux = transport_spec(spec)
                wan.label = f"[{rtt:g} ms, {spec}, {cc}{', ours ' + ours if ours else ''}]"
                ts = dataclasses.replace(s, transport=transport, client_extra=s.client_extra + mux,
                                         server_extra=tls_settings(transport, tuple(args.server_set), workdir) + mux)
                for name in args.only or ROWS:
                    if name in NEEDS_IPERF3 and not iperf3:
                        continue
                    t0 = time.monotonic()
                    log(f"{wan.label} {name} ...")
                    rows += ROW_MEASURES[name](ts, wan)
                    log(f"{wan.label} {name} done in {time.monotonic() - t0:.0f} s")
    header.append(f"load average at the end {_loadavg()}; the forwarder's own drops over the run: {wan.own_drops}")
    print()
    print(render_text(rows))
    print("\nnotes:" + ("" if s.notes else " none"))
    for line in s.notes:
        print(f"  {line}")
    print(header[-1])
    logs = tunnel_log_lines(s)
    print("\ntunnel process output:" + ("" if logs else " none"))
    print("\n".join(logs))
    if args.out:
        args.out.write_text(render_markdown(rows, header, s.notes))
        print(f"\nMarkdown table written to {args.out}")
    failed = any(c.text == "error" for r in rows for c in r.cells.values())
    return 1 if failed or unavailable_paths else 0


def transport_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """``tcpmux/v2`` as the transport and the lines that ask both sides for smux version 2."""
    transport, _, version = spec.partition("/")
    if not version:
        return transport, ()
    if version not in ("v1", "v2") or not transport.endswith("mux"):
        raise SystemExit(f"wan: --transport {spec}: /v1 or /v2 goes after a mux transport (tcpmux, wsmux, wssmux)")
    return transport, (f"mux_version={version[1]}",)


@contextmanager
def _checked(wan: Wan, s: Settings, label: str, name: str) -> Iterator[None]:
    """Around one run of one path: the forwarder's counts for it, and its own drops checked."""
    before = wan.path.stats()
    memory = tcp_memory()
    yield
    delta = difference(wan.path.stats(), before)
    drops = own_drops(delta)
    wan.own_drops += drops
    log(f"    forwarder ({name}): {describe(delta)}")
    if drops:
        s.notes.append(f"{wan.label} {label} via {name}: the forwarder dropped {drops} packet(s) of its own: "
                       f"{describe(delta)}")
    used = max(memory, tcp_memory())
    if wan.tcp_pressure and used > wan.tcp_pressure:
        s.notes.append(f"{wan.label} {label} via {name}: the host's TCP buffers were past the kernel's pressure "
                       f"mark ({used:,} pages, tcp_mem {wan.tcp_pressure:,}): every connection's window was "
                       f"clamped, the figures measured that, not the path")


def tcp_memory() -> int:
    """Pages of TCP buffers in use on the whole host (every namespace, every process): past the
    middle value of tcp_mem the kernel clamps every connection's window. Other work on the
    machine can push it there; a figure taken then measured that."""
    with open("/proc/net/sockstat") as f:
        return next(int(line.split()[line.split().index("mem") + 1]) for line in f if line.startswith("TCP:"))


def difference(after: dict, before: dict) -> dict:
    """The counts of one run: ``after`` minus ``before`` (settings and maxima as they are after)."""
    counted = ("packets", "bytes", "lost", "queue_drops", "overflow", "delivered", "write_errors", "late",
               "kernel_dropped")
    return {d: {k: (v - before[d][k] if k in counted else v) for k, v in after[d].items()} for d in ("ab", "ba")}


def set_congestion(name: str, targets: str) -> str:
    """The default congestion control of both namespaces (never the host's: ours are fresh); "",
    or ``name`` when it has to be set per socket instead. The kernel lets a namespace other than
    the host's default only to an algorithm of the host's net.ipv4.tcp_allowed_congestion_control
    (often "reno bbr"); root may still set any available one on a socket (CAP_NET_ADMIN), which
    iperf3 (-C, both ends of a test) and our `congestion` key do. SystemExit when the kernel has
    no such algorithm at all."""
    for netns in ("", targets):
        done = subprocess.run(in_netns(netns, ["sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={name}"]),
                              capture_output=True, text=True, timeout=10)
        if done.returncode:
            with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
                available = f.read().split()
            if name not in available:
                raise SystemExit(f"wan: --cc {name}: not an algorithm of this kernel "
                                 f"({done.stderr.strip()}); available: {' '.join(available)}")
            log(f"wan: --cc {name}: a namespace may default only to the host's "
                f"net.ipv4.tcp_allowed_congestion_control; set per socket instead")
            return name
    return ""


def congestion_of(targets: str) -> str:
    names = {subprocess.run(in_netns(netns, ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"]),
                            capture_output=True, text=True, timeout=10).stdout.strip() for netns in ("", targets)}
    return "/".join(sorted(names))


def _ours_congestion(settings: list[str]) -> str:
    found = {value.strip().strip('"') for key, _, value in (x.partition("=") for x in settings)
             if key.strip() == "congestion"}
    return "/".join(sorted(found))


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def capacity(wan: Wan, s: Settings) -> str:
    """What the forwarder carries alone: direct, one stream each way, no rate limit, no delay."""
    wan.path.set(rate_mbit=0, delay_ms=0)
    sink = wan.sink()
    try:
        alone = Endpoint("forwarder alone", sink.port, {}, host=ADDRESS_B)
        got = [iperf(sink, alone, 1, min(s.seconds, 5.0), reverse) for reverse in (False, True)]
        stats = wan.path.stats()
    finally:
        sink.stop()
        wan.path.set(rate_mbit=wan.rate_mbit)
    return (f"forwarder alone (direct, 1 stream, no rate limit, no delay): {got[0]:,.0f} Mbit/s up, {got[1]:,.0f} "
            f"down, own drops {own_drops(stats)} (machine load average {_loadavg()})")


# ----------------------------------------------------------------------------------- rows


def iperf(sink: IperfSink, ep: Endpoint, streams: int, seconds: float, reverse: bool) -> float:
    """Mbit/s of one iperf3 run. The iperf3 server is still closing the previous test across the
    long path for a moment after it ended ("busy"), and after a test that failed it listens anew
    (a connection meanwhile is refused): a run that fails so is run again, a few times, each a
    whole new test."""
    attempt = 1
    while True:
        deadline = time.monotonic() + 10
        while not is_listening(sink.port, sink.proc.pid):
            if time.monotonic() > deadline or sink.proc.poll() is not None:
                raise RuntimeError("the iperf3 server no longer listens")
            time.sleep(0.1)
        try:
            moved, secs = sink.run(ep.port, streams, seconds, reverse, host=ep.host)
            return moved * 8 / secs / 1e6
        except RuntimeError as exc:
            if attempt == IPERF_TRIES:
                raise
            log(f"    iperf3 ({ep.path}, {streams} streams{' down' if reverse else ''}): {exc}; again")
        attempt += 1
        time.sleep(1.0)


def _named(wan: Wan, rows: list[Row], kind: str, fmt: str, unit: str) -> list[Row]:
    for row in rows:
        row.name = f"{wan.label} {row.name}"
        row.kind, row.fmt, row.unit = kind, fmt, unit
    return rows


def measure_bulk(s: Settings, wan: Wan) -> list[Row]:
    """iperf3, 1 and 8 streams, user to target (up) and target to user (down), at 0 and 1 % loss.
    Whole runs, slow start included: iperf3's -O (leave out the first seconds) counted bytes
    of the left-out seconds in some runs (99.7 Mbit/s through a 100 Mbit/s path)."""
    runs = [(loss, streams, reverse) for loss in (0.0, 0.01) for streams in (1, 8) for reverse in (False, True)]
    names = {run: f"bulk {run[1]} stream{'s' if run[1] > 1 else ''} {'down' if run[2] else 'up'}, "
                  f"{run[0] * 100:g} % loss (Mbit/s)" for run in runs}
    sink = wan.sink()

    def one(ep: Endpoint) -> dict[str, Cell]:
        cells = {}
        try:
            for run in runs:
                wan.path.set(loss=run[0])
                cells[names[run]] = Cell(iperf(sink, ep, run[1], s.seconds, run[2]))
        finally:
            wan.path.set(loss=0)
        return cells

    try:
        rows = each_path("bulk", list(names.values()), sink.port, s, one, paths=WAN_PATHS)
    finally:
        sink.stop()
    return _named(wan, rows, "higher", "{:,.1f}", " Mbit/s")


def measure_stream(s: Settings, wan: Wan) -> list[Row]:
    """One stream up and down at 0 % loss, also through the mixed pairs (with the Go program):
    the Go server with our client (up: its smux sender, our receiver's window) and our server
    with the Go client (down: the same the other way)."""
    names = ["one stream up (Mbit/s)", "one stream down (Mbit/s)"]
    sink = wan.sink()

    def one(ep: Endpoint) -> dict[str, Cell]:
        return {names[0]: Cell(iperf(sink, ep, 1, s.seconds, False)),
                names[1]: Cell(iperf(sink, ep, 1, s.seconds, True))}

    extra = MIXED_PATHS if s.go_binary and "go" not in s.unavailable else ()
    try:
        rows = each_path("stream", names, sink.port, s, one, paths=WAN_PATHS, extra=extra)
    finally:
        sink.stop()
    return _named(wan, rows, "higher", "{:,.1f}", " Mbit/s")


def measure_fresh(s: Settings, wan: Wan) -> list[Row]:
    """FRESH_COUNT new connections one after another (connect -> request -> reply, p50 / p99) to
    an echo service, on a quiet path, then again right after an 8-stream download through the
    same path ended (whatever the download left in buffers on its way must not hold them up)."""
    names = [f"{FRESH_COUNT} fresh connections p50 (ms)", f"{FRESH_COUNT} fresh connections p99 (ms)",
             f"{FRESH_COUNT} fresh connections right after a download p50 (ms)",
             f"{FRESH_COUNT} fresh connections right after a download p99 (ms)"]
    sink = wan.sink()

    def one(ep: Endpoint) -> dict[str, Cell]:
        quiet = sorted(fresh_connections(ep.echo_port, FRESH_COUNT, host=ep.host, echo=True))
        mbit = iperf(sink, ep, 8, s.seconds, True)
        after = sorted(fresh_connections(ep.echo_port, FRESH_COUNT, host=ep.host, echo=True))
        return {names[0]: Cell(percentile(quiet, 0.5)), names[1]: Cell(percentile(quiet, 0.99)),
                names[2]: Cell(percentile(after, 0.5), extra=f"download {mbit:,.0f} Mbit/s"),
                names[3]: Cell(percentile(after, 0.99))}

    try:
        rows = each_path("fresh", names, sink.port, s, one, paths=WAN_PATHS)
    finally:
        sink.stop()
    return _named(wan, rows, "lower", "{:,.0f}", " ms")


def measure_ab_rows(s: Settings, wan: Wan) -> list[Row]:
    """ab -c 50 and -c 200 against nginx on the targets' side (measure.py's, across the path)."""
    return _named(wan, measure_ab(s), "higher", "{:,.0f}", "")


def measure_interactive(s: Settings, wan: Wan) -> list[Row]:
    """1-byte round trips on an echo connection while a download (iperf3 -R, one stream) runs
    through the same path: through the same tunnel, or beside it for direct."""
    names = ["round trip during a download p50 (ms)", "round trip during a download p99 (ms)"]
    sink = wan.sink()

    def one(ep: Endpoint) -> dict[str, Cell]:
        download: dict[str, float] = {}
        failed: list[Exception] = []

        def pull() -> None:
            try:
                download["mbit"] = iperf(sink, ep, 1, wan.interactive + 2, True)
            except RuntimeError as exc:
                failed.append(exc)

        puller = threading.Thread(target=pull, name="download")
        puller.start()
        try:
            time.sleep(1.5)   # past the download's slow start
            samples = sorted(x / 1e3 for x in ping_pong(ep.echo_port, 1_000_000, warmup=2,
                                                         max_seconds=wan.interactive - 1, host=ep.host))
        finally:
            puller.join(wan.interactive + 70)
        if failed:
            raise failed[0]
        extra = f"download {download.get('mbit', 0):,.0f} Mbit/s"
        return {names[0]: Cell(percentile(samples, 0.5), extra=extra),
                names[1]: Cell(percentile(samples, 0.99), extra=f"{len(samples)} samples")}

    try:
        # On a mux, one session per client to begin with (connection_pool = 1 on both sides):
        # the download takes it, and the round trips must not wait behind the download's backlog
        # or its lost packets (ours asks for a quiet session once bulk crosses every one).
        one_session = ("connection_pool=1",) if s.transport in MUX_TRANSPORTS else ()
        shared = dataclasses.replace(s, server_extra=s.server_extra + one_session,
                                     client_extra=s.client_extra + one_session)
        extra = MIXED_PATHS if s.go_binary and "go" not in s.unavailable and one_session else ()
        rows = each_path("interactive", names, sink.port, shared, one, paths=WAN_PATHS, extra=extra)
    finally:
        sink.stop()
    return _named(wan, rows, "lower", "{:,.1f}", " ms")


def measure_links(s: Settings, wan: Wan) -> list[Row]:
    """The TCP connections between the two hosts while ab -c 200 runs through the path, and
    ``settle`` seconds after it ended (a pool that grew for the load should shrink back)."""
    names = [f"TCP connections between the hosts during ab -c {LINKS_CONCURRENCY} (most)",
             f"TCP connections between the hosts {wan.settle:g} s after it"]
    tools, missing = find_tools()
    if missing:
        s.notes.append(f"links: skipped, {' and '.join(missing)} not found (apt-get install nginx apache2-utils)")
        return []

    def one(ep: Endpoint) -> dict[str, Cell]:
        done = threading.Event()
        outcome: dict[str, object] = {}

        def load() -> None:
            try:
                outcome["ab"] = run_ab(tools["ab"], ep.port, s.ab_requests, LINKS_CONCURRENCY, s.ab_timeout,
                                       host=ep.host)
            except RuntimeError as exc:
                outcome["error"] = exc
            finally:
                done.set()

        loader = threading.Thread(target=load, name="ab")
        loader.start()
        most = 0
        while not done.wait(0.25):
            most = max(most, connections_between_hosts())
        loader.join()
        if "error" in outcome:
            raise RuntimeError(outcome["error"])
        time.sleep(wan.settle)
        return {names[0]: Cell(most), names[1]: Cell(connections_between_hosts())}

    with Nginx(tools["nginx"], s.workdir, wan.targets, ANY) as nginx:
        rows = each_path("links", names, nginx.port, s, one, paths=WAN_PATHS)
    return _named(wan, rows, "info", "{:,.0f}", "")


def connections_between_hosts() -> int:
    """Established TCP connections from this namespace (the users' host) to the targets' host."""
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f.readlines()[1:]
                   if line.split()[3] == "01" and line.split()[2].startswith(A_HEX_REMOTE + ":"))


ROW_MEASURES: dict[str, Callable[[Settings, Wan], list[Row]]] = {
    "bulk": measure_bulk,
    "stream": measure_stream,
    "fresh": measure_fresh,
    "ab": measure_ab_rows,
    "interactive": measure_interactive,
    "links": measure_links,
}

if __name__ == "__main__":
    sys.exit(main())
