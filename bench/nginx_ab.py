"""nginx as the target and ApacheBench (`ab`) as the client of the `ab` measurement.

The bench installs neither: `apt-get install nginx apache2-utils`. nginx runs
from a config of its own in a temporary directory (prefix, pid, logs and temp
paths there), in the foreground as one process, on an ephemeral loopback port,
and answers every request with `200 ok`.
"""

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common import HOST, free_port, in_netns, is_listening, stop_process, track

START_TIMEOUT = 10.0
AB_SOCKET_TIMEOUT = 10  # ab -s: seconds one response may take before ab gives up
# nginx is usually in /usr/sbin, which is not on every user's PATH.
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            return 200 "ok";
        }}
    }}
}}
"""


def find_tools() -> tuple[dict[str, str], list[str]]:
    """Paths of nginx and ab, and the names of those not installed."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    found = {name: shutil.which(name, path=search) for name in ("nginx", "ab")}
    return {k: v for k, v in found.items() if v}, [k for k, v in found.items() if not v]


class Nginx:
    """One nginx process serving `return 200 "ok";` on 127.0.0.1:port."""

    def __init__(self, binary: str, workdir: Path, netns: str = "", host: str = HOST) -> None:
        """``netns``: the network namespace to run in; ``host``: the address to listen on."""
        self.dir = workdir / "nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.netns = netns
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, host=host, port=self.port))
        # -e: the error log from the very start (before the config is read) goes here too.
        argv = in_netns(netns, [binary, "-p", f"{self.dir}/", "-e", str(self.dir / "error.log"), "-c", str(conf)])
        with open(self.dir / "nginx.out", "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        track(self.proc)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not is_listening(self.port, self.proc.pid if self.netns else None):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with code {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx not listening within {START_TIMEOUT:.0f} s: {self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, count: int = 3) -> str:
        lines: list[str] = []
        for name in ("nginx.out", "error.log"):
            path = self.dir / name
            if path.exists():
                lines += [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-count:]) or "no output"

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> "Nginx":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class AbResult:
    """The numbers of one ab report."""

    rps: float  # "Requests per second"
    complete: int
    failed: int
    failed_detail: str  # "Connect: 0, Receive: 0, Length: 0, Exceptions: 0" when some failed
    non2xx: int


def run_ab(binary: str, port: int, requests: int, concurrency: int, timeout: float, host: str = HOST) -> AbResult:
    """One ab run, one request per connection (no -k); the numbers of its report.

    -r keeps ab going past a reset or closed connection, so such failures are
    counted in "Failed requests" instead of ending the run without numbers.
    """
    argv = [
        binary,
        "-q",
        "-r",
        "-s",
        str(AB_SOCKET_TIMEOUT),
        "-n",
        str(requests),
        "-c",
        str(concurrency),
        f"http://{host}:{port}/",
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"ab did not finish {requests:,} requests within {timeout:.0f} s") from None
    out = done.stdout
    rps = _number(r"Requests per second:\s+([\d.]+)", out)
    if done.returncode != 0 or rps is None:
        why = (done.stderr.strip().splitlines() or ["no report in its output"])[-1]
        raise RuntimeError(f"ab exited with code {done.returncode}: {why}")
    detail = re.search(r"Failed requests:\s+\d+\s*\n\s*\((.*)\)", out)
    return AbResult(
        rps=rps,
        complete=int(_number(r"Complete requests:\s+(\d+)", out) or 0),
        failed=int(_number(r"Failed requests:\s+(\d+)", out) or 0),
        failed_detail=detail.group(1) if detail else "",
        non2xx=int(_number(r"Non-2xx responses:\s+(\d+)", out) or 0),
    )


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None
