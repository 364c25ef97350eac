"""The long form of the fuzz suite (tests/test_fuzz.py): the same drivers with many more inputs.

    python bench/fuzz.py                      # 100,000 inputs in all, seed 1
    python bench/fuzz.py --inputs 1000000 --seed 7

Six tenths of the inputs go to the codecs in this process (tests/fuzzing.py), the rest through
real sockets to a server with a good client carrying users (bad handshakes, upgrade heads,
WebSocket frames, smux sessions, garbage datagrams to the udp transport's UDP port) and to a
client from a server played here (target headers, framed datagrams of accept_udp, the udp
transport's target datagrams).
Prints one line per target (inputs, seconds, failures) and the first failures; exit code 1 when
anything failed. Needs the test extra (pytest, wsproto): it runs the suite's own drivers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import fuzzing, test_fuzz
from tests.harness import Launcher, Listener, Service, UdpEcho, echo_handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Long fuzz run: codecs, a server, a client.")
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs in all (default 100,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4, help="connections in flight against a server")
    args = parser.parse_args(argv)
    total = args.inputs
    per_codec = int(total * 0.6) // len(fuzzing.CODECS)
    per_server = int(total * 0.3) // len(test_fuzz.SERVER_TARGETS)
    per_other = int(total * 0.05)
    rows: list[tuple[str, int, float, list[str]]] = []

    for kind in fuzzing.CODECS:
        start = time.monotonic()
        crashes = fuzzing.fuzz_codec(kind, per_codec, args.seed)
        shown = [f"{type(exc).__name__}: {exc} <- {data[:80]!r}" for data, exc in crashes]
        rows.append((f"codec {kind}", per_codec, time.monotonic() - start, shown))
        report(rows[-1])

    with tempfile.TemporaryDirectory(prefix="backhaul-fuzz-") as tmp, Service(echo_handler, "echo") as echo:
        for target in test_fuzz.SERVER_TARGETS:
            launcher = Launcher(Path(tmp) / target.name)
            launcher.directory.mkdir()
            try:
                result = test_fuzz.run_server_fuzz(launcher, target, per_server, echo.port, args.seed, args.workers)
            finally:
                launcher.stop_all()
            rows.append((f"server {target.name}", per_server, float(result["seconds"]),  # type: ignore[arg-type]
                         list(result["failures"])))  # type: ignore[call-overload]
            report(rows[-1], f"{result['users']} good users carried meanwhile")
        launcher = Launcher(Path(tmp) / "smux")
        launcher.directory.mkdir()
        try:
            result = test_fuzz.run_smux_fuzz(launcher, per_other, args.seed)
        finally:
            launcher.stop_all()
        rows.append(("server smux-sessions", per_other, float(result["seconds"]),  # type: ignore[arg-type]
                     list(result["failures"])))  # type: ignore[call-overload]
        report(rows[-1])
        launcher = Launcher(Path(tmp) / "headers")
        launcher.directory.mkdir()
        listener = Listener()
        try:
            result = test_fuzz.run_header_fuzz(launcher, listener, per_other, args.seed)
        finally:
            launcher.stop_all()
            listener.close()
        rows.append(("client target-headers", per_other, float(result["seconds"]),  # type: ignore[arg-type]
                     list(result["failures"])))  # type: ignore[call-overload]
        report(rows[-1])
        udp_echo = UdpEcho()
        try:
            rows += udp_rows(Path(tmp), udp_echo, per_other, args.seed)
        finally:
            udp_echo.close()

    inputs = sum(row[1] for row in rows)
    failed = sum(len(row[3]) for row in rows)
    print(f"\n{inputs} inputs in {sum(row[2] for row in rows):.0f} s, {failed} failures")
    return 1 if failed else 0


def udp_rows(tmp: Path, echo: UdpEcho, count: int, seed: int) -> list[tuple[str, int, float, list[str]]]:
    """The UDP drivers: framed datagrams and target datagrams against a client, garbage
    datagrams against a udp transport server in both auth modes."""
    rows: list[tuple[str, int, float, list[str]]] = []
    runs = [("client udp-frames", lambda la, li: test_fuzz.run_udp_frames_fuzz(la, li, echo, count, seed)),
            ("client udp-targets", lambda la, _li: test_fuzz.run_udp_target_fuzz(la, echo, count, seed)),
            ("server udp-datagrams", lambda la, _li: test_fuzz.run_udp_datagram_fuzz(la, echo.port, count, seed)),
            ("server udp-datagrams challenge",
             lambda la, _li: test_fuzz.run_udp_datagram_fuzz(la, echo.port, count, seed, mode="challenge"))]
    for name, run in runs:
        launcher = Launcher(tmp / name.replace(" ", "-"))
        launcher.directory.mkdir()
        listener = Listener()
        try:
            result = run(launcher, listener)
        finally:
            launcher.stop_all()
            listener.close()
        rows.append((name, count, float(result["seconds"]), list(result["failures"])))  # type: ignore[arg-type,call-overload]
        report(rows[-1])
    return rows


def report(row: tuple[str, int, float, list[str]], note: str = "") -> None:
    name, inputs, seconds, failures = row
    print(f"{name:34} {inputs:8} inputs {seconds:7.1f} s  {len(failures):4} failures  {note}", flush=True)
    for failure in failures[:5]:
        print(f"    {failure}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
