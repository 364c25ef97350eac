"""Benchmark of the tunnel against direct loopback and a plain Python relay.

    python bench/run.py [--quick] [--only NAME] [--out FILE] [--transport NAME]
    BACKHAUL_GO=/path/to/backhaul python bench/run.py     # the Go program as a fourth path

Prints the machine, runs each measurement over the paths (progress on
stderr), then prints one table with the relay's, the tunnel's (and the Go
program's) ratios to direct, notes, and any output of the tunnel processes.
"""

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import Helper, raise_nofile_limit, stop_all, tls_settings
from measure import (
    Settings,
    log,
    measure_ab,
    measure_clients,
    measure_connrate,
    measure_idle,
    measure_latency,
    measure_throughput,
    measure_udp,
)
from report import Row, render_markdown, render_text
from tunnel import check_available, check_go

MEASUREMENTS: dict[str, Callable[[Settings], list[Row]]] = {
    "throughput": measure_throughput,
    "cpu": lambda s: measure_throughput(s, stream_counts=(1,)),
    "connrate": measure_connrate,
    "ab": measure_ab,
    "latency": measure_latency,
    "idle": measure_idle,
    "udp": measure_udp,
    "clients": measure_clients,
}
# "cpu" is measured during the 1-stream throughput run, so a full run skips it.
FULL_RUN = ("throughput", "connrate", "ab", "latency", "idle", "udp", "clients")
GO_ENV = "BACKHAUL_GO"  # names the Go program's binary; its pair becomes the "go" path
LOG_LINES_SHOWN = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark: direct vs plain relay vs tunnel on loopback.")
    parser.add_argument("--quick", action="store_true", help="short run: 2 s per measurement, 1,000 idle connections")
    parser.add_argument("--only", choices=sorted(MEASUREMENTS), help="run one measurement")
    parser.add_argument("--out", type=Path, help="also write the table as Markdown to this file")
    parser.add_argument(
        "--no-iperf3",
        action="store_true",
        help="use the Python sender and sink for throughput even if iperf3 is installed",
    )
    parser.add_argument(
        "--transport",
        default="tcp",
        metavar="NAME",
        help="the `transport` of both tunnel sides' configs (ours and the Go pair's); default tcp",
    )
    parser.add_argument(
        "--server-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more line for the [server] table of every tunnel (TOML value, e.g. mux_con=1024); repeatable",
    )
    parser.add_argument(
        "--client-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more line for the [client] table of every tunnel (e.g. mux_version=2); repeatable",
    )
    return parser.parse_args(argv)


def machine_lines(use_iperf: bool, nofile: int, tunnel_state: str, go_state: str, transport: str) -> list[str]:
    cpu = _cpu_model()
    return [
        f"machine: {os.cpu_count()} cores{f' ({cpu})' if cpu else ''}, kernel {platform.release()}, "
        f"Python {platform.python_version()}",
        f"throughput tool: {'iperf3' if use_iperf else 'Python sender/sink (iperf3 not used)'}",
        f"open files limit: {nofile:,}",
        f"tunnel: {tunnel_state}",
        f"go: {go_state}",
        f"transport: {transport}",
    ]


def go_state(binary: str | None) -> tuple[bool, str]:
    """Whether the Go pair can run, and the header text saying which binary (or why not)."""
    if not binary:
        return False, f"not measured ({GO_ENV} not set)"
    ok, version = check_go(binary)
    return ok, f"{version} ({binary})" if ok else f"UNAVAILABLE - {binary}: {version}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def tunnel_log_lines(s: Settings) -> list[str]:
    """The tunnel processes' output, grouped per measurement; bounded so one noisy run can't flood."""
    out: list[str] = []
    for label, role, lines in s.tunnel_logs:
        out.append(f"[{label}] {role}: {len(lines)} line(s)")
        out += [f"    {line}" for line in lines[:LOG_LINES_SHOWN]]
        if len(lines) > LOG_LINES_SHOWN:
            out.append(f"    ... {len(lines) - LOG_LINES_SHOWN} more")
    return out


def run(args: argparse.Namespace, workdir: Path) -> int:
    nofile = raise_nofile_limit()
    use_iperf = shutil.which("iperf3") is not None and not args.no_iperf3
    available, version = check_available()
    tunnel_state = version if available else f"UNAVAILABLE - `python -m backhaul` failed: {version}"
    go_binary = os.environ.get(GO_ENV) or None
    go_ok, go_text = go_state(go_binary)
    extra = [f"server.{x}" for x in args.server_set] + [f"client.{x}" for x in args.client_set]
    settings_text = " ".join([args.transport, *extra])
    header = machine_lines(use_iperf, nofile, tunnel_state, go_text, settings_text)
    print("\n".join(header), flush=True)
    unavailable: dict[str, str] = {}
    if not available:
        unavailable["tunnel"] = version
        print("tunnel cells will read n/a; direct and relay are still measured", flush=True)
    if go_binary and not go_ok:
        unavailable["go"] = go_text
        print("go cells will read n/a", flush=True)

    # The probe echo serves every tunnel's readiness check for the whole run.
    with Helper.script("services.py", "echo") as probe:
        s = Settings(
            seconds=2.0 if args.quick else 5.0,
            idle_count=1_000 if args.quick else 9_000,
            ab_rounds=1 if args.quick else 3,
            ping_rounds=2_000 if args.quick else 5_000,
            use_iperf=use_iperf,
            workdir=workdir,
            probe_port=int(probe.expect("PORT", 10)),
            transport=args.transport,
            server_extra=tls_settings(args.transport, tuple(args.server_set), workdir),
            client_extra=tuple(args.client_set),
            go_binary=go_binary,
            unavailable=unavailable,
        )
        rows: list[Row] = []
        for name in [args.only] if args.only else FULL_RUN:
            t0 = time.monotonic()
            log(f"{name} ...")
            rows += MEASUREMENTS[name](s)
            log(f"{name} done in {time.monotonic() - t0:.0f} s")

    print()
    print(render_text(rows))
    for title, lines in (("notes", s.notes), ("tunnel process output", tunnel_log_lines(s))):
        print(f"\n{title}:" + ("" if lines else " none"))
        for line in lines:
            print(f"  {line}" if title == "notes" else line)
    if args.out:
        args.out.write_text(render_markdown(rows, header, s.notes))
        print(f"\nMarkdown table written to {args.out}")
    failed = any(c.text == "error" for r in rows for c in r.cells.values())
    return 1 if failed or unavailable else 0


def _terminate(signum: int, _frame: object) -> None:
    # Turn SIGTERM into an exception so the finally below ends every child.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-bench-"))
    try:
        return run(args, workdir)
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
