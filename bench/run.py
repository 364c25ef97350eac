"""Benchmark of the tunnel against direct loopback and a plain Python relay.

    python bench/run.py [--quick] [--only NAME] [--out FILE]

Prints the machine, runs each measurement over the three paths (progress on
stderr), then prints one table with the relay's and the tunnel's ratios to
direct, notes, and any output of the tunnel processes.
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

from common import Helper, raise_nofile_limit, stop_all
from measure import (
    Settings,
    log,
    measure_connrate,
    measure_idle,
    measure_latency,
    measure_throughput,
)
from report import Row, render_markdown, render_text
from tunnel import check_available

MEASUREMENTS: dict[str, Callable[[Settings], list[Row]]] = {
    "throughput": measure_throughput,
    "cpu": lambda s: measure_throughput(s, stream_counts=(1,)),
    "connrate": measure_connrate,
    "latency": measure_latency,
    "idle": measure_idle,
}
# "cpu" is measured during the 1-stream throughput run, so a full run skips it.
FULL_RUN = ("throughput", "connrate", "latency", "idle")
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
    return parser.parse_args(argv)


def machine_lines(use_iperf: bool, nofile: int, tunnel_state: str) -> list[str]:
    cpu = _cpu_model()
    return [
        f"machine: {os.cpu_count()} cores{f' ({cpu})' if cpu else ''}, kernel {platform.release()}, "
        f"Python {platform.python_version()}",
        f"throughput tool: {'iperf3' if use_iperf else 'Python sender/sink (iperf3 not used)'}",
        f"open files limit: {nofile:,}",
        f"tunnel: {tunnel_state}",
    ]


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
    header = machine_lines(use_iperf, nofile, tunnel_state)
    print("\n".join(header), flush=True)
    if not available:
        print("tunnel cells will read n/a; direct and relay are still measured", flush=True)

    # The probe echo serves every tunnel's readiness check for the whole run.
    with Helper.script("services.py", "echo") as probe:
        s = Settings(
            seconds=2.0 if args.quick else 5.0,
            idle_count=1_000 if args.quick else 9_000,
            ping_rounds=2_000 if args.quick else 5_000,
            use_iperf=use_iperf,
            workdir=workdir,
            probe_port=int(probe.expect("PORT", 10)),
            tunnel_unavailable=None if available else version,
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
    return 1 if failed or not available else 0


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
