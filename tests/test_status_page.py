"""The status page's parts without sockets: the traffic history's ring and its bounds, the SVG
graph, the target's health on a port, the page's cells, and the metrics every scrape must show
from the start (a 0 for each unlabelled counter, the build, the process's own numbers).

Each test's docstring says which removal (or breakage) of the program it catches.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest

from backhaul import __version__, graph, process
from backhaul.history import MAX_SERIES, MIN_SPAN, POINTS, SPAN, STEP, History
from backhaul.metrics import Registry
from backhaul.status import render_html, render_peers
from backhaul.usage import REFUSED_TEXT, Usage

pytestmark = pytest.mark.timeout(30)


# --- the history ------------------------------------------------------------------------------

def test_history_counts_bytes_per_step_and_the_step_under_way() -> None:
    """Catches: a step that holds totals instead of what moved in it, a rate not per second, the
    current step missing (a graph that lags ten seconds behind), bytes lost at a step."""
    history = History()
    history.update(100.0, {"22": (7000, 7000)})      # before the history began: not drawn
    history.update(105.0, {"22": (7000, 7000), "80": (400, 100)})   # a new port: from its start
    assert history.series["80"].samples() == []      # within the first step: nothing completed
    history.update(110.0, {"80": (1000, 500)})
    history.update(120.5, {"80": (1500, 500)})
    assert history.series["80"].samples() == [(1000, 500), (500, 0)]
    points = history.rates("80", 125.0, {"80": (1800, 900)})
    assert points == [(15.0, STEP, 100.0, 50.0), (5.0, STEP, 50.0, 0.0), (0.0, 5.0, 60.0, 80.0)]
    assert history.series["22"].samples() == [(0, 0), (0, 0)]


def test_history_spreads_a_late_update_over_the_steps_it_missed() -> None:
    """Catches: a reactor that was busy for 30 s drawn as one step of three times the rate, or
    bytes dropped when steps are skipped."""
    history = History()
    history.update(0.0, {"a": (0, 0)})
    history.update(30.0, {"a": (1000, 7)})
    samples = history.series["a"].samples()
    assert len(samples) == 3
    assert sum(s[0] for s in samples) == 1000 and sum(s[1] for s in samples) == 7
    assert max(s[0] for s in samples) - min(s[0] for s in samples) <= 1


def test_history_ring_keeps_one_hour_and_drops_the_oldest() -> None:
    """Catches: a ring that grows without bound, or one that keeps the oldest steps instead of
    the newest."""
    history = History()
    history.update(0.0, {"a": (0, 0)})
    total = 0
    for step in range(1, POINTS + 6):
        total += step
        history.update(step * STEP, {"a": (total, 0)})
    samples = history.series["a"].samples()
    assert len(samples) == POINTS == SPAN // STEP
    assert samples[0][0] == 6 and samples[-1][0] == POINTS + 5


def test_history_graphs_a_bounded_number_of_names() -> None:
    """Catches: one ring per name without a limit (a port range of thousands, clients that come
    and go), and a full history that never makes room when a name is gone."""
    history = History()
    names = {str(n): (0, 0) for n in range(MAX_SERIES + 10)}
    history.update(0.0, names)
    assert len(history.series) == MAX_SERIES
    assert history.rates(str(MAX_SERIES + 5), 1.0, names) is None
    remaining = {name: (500, 0) for name in list(names)[1:]}   # the first name is gone
    history.update(1.0, remaining)
    assert len(history.series) == MAX_SERIES and "0" not in history.series
    assert history.series[str(MAX_SERIES)].base == (500, 0)   # it may have counted while it waited


def test_history_span_follows_the_process_age_within_bounds() -> None:
    """Catches: a graph of a young process squeezed into an hour (a sliver), or one that never
    widens to the hour."""
    history = History()
    history.update(1000.0, {})
    assert history.span(1000.0) == MIN_SPAN
    assert history.span(1000.0 + 610) == 660     # whole minutes, rounded up
    assert history.span(1000.0 + 5 * SPAN) == SPAN


# --- the graph --------------------------------------------------------------------------------

def _polygon(svg: str, css: str) -> list[tuple[float, float]]:
    match = re.search(rf'<polygon class="{css}" points="([^"]+)"', svg)
    assert match, svg
    return [(float(x), float(y)) for x, y in (pair.split(",") for pair in match.group(1).split())]


def test_graph_draws_each_direction_on_its_side_of_the_middle_scaled_to_the_peak() -> None:
    """Catches: an empty graph, directions swapped or drawn over each other, a step drawn at the
    wrong time, a peak that is not the highest rate."""
    points = [(20.0, 10.0, 1000.0, 0.0), (10.0, 10.0, 500.0, 2000.0), (0.0, 4.0, 0.0, 0.0)]
    svg = graph.svg(points, "port 80", span=300, width=300, height=42)
    assert 'data-peak="2000"' in svg and 'data-points="3"' in svg and "<script" not in svg
    middle = 1 + (42 - 1 - 1) / 2
    up, down = _polygon(svg, "to-target"), _polygon(svg, "to-user")
    assert min(y for _x, y in up) == pytest.approx(middle - 20 * 1000 / 2000, abs=0.1)
    assert all(y <= middle + 0.05 for _x, y in up) and all(y >= middle - 0.05 for _x, y in down)
    assert max(y for _x, y in down) == pytest.approx(middle + 20, abs=0.1)    # the peak fills its half
    assert max(x for x, _y in down) == 300.0                                   # now at the right edge
    # the to-target block of 1000 B/s spans the step that ended 20 s ago: x from 270 to 280
    assert (270.0, pytest.approx(middle - 10, abs=0.1)) in up and (280.0, pytest.approx(middle - 10, abs=0.1)) in up


def test_graph_of_nothing_is_flat_and_not_graphed_says_so() -> None:
    """Catches: a division by a zero peak, and a name past the bound drawn as an empty graph."""
    svg = graph.svg([(0.0, 3.0, 0.0, 0.0)], "idle")
    assert 'data-peak="0"' in svg
    assert {y for _x, y in _polygon(svg, "to-target")} == {16.0}   # the middle of 1 + 30 + 1 pixels
    assert "not graphed" in graph.svg(None, "x")


# --- the page ---------------------------------------------------------------------------------

def _page_data(side: str, target: dict, peers: list[dict]) -> dict:
    return {"side": side, "tunnel": "up", "peer": "192.0.2.1:3080", "describe": "tcp", "uptime_seconds": 5,
            "connections_active": 0, "peers": peers,
            "ports": [{"port": "8080", "active": 0, "total": 3, "bytes_to_target": 0, "bytes_to_user": 0,
                       "rate_to_target": 0.0, "rate_to_user": 0.0, "target": target}],
            "build": {"version": __version__, "python": "3.11.0", "wire": "v0.7.2", "text": "backhaul x"},
            "process": {"cpu_percent": 1.5, "cpu_seconds": 2.0, "resident_bytes": 30 << 20, "open_fds": 12,
                        "max_fds": 1024, "threads": 6},
            "graphs": {"span": 300, "side": [(0.0, 2.0, 10.0, 20.0)], "ports": {"8080": [(0.0, 2.0, 10.0, 20.0)]},
                       "peers": {}}}


def _cell(page: str, css: str) -> str:
    match = re.search(rf'<td class="{css}"[^>]*>(.*?)</td>', page, re.S)
    assert match, css
    return match.group(0)


def test_client_page_shows_a_refusing_target_as_down_with_the_error_and_counts() -> None:
    """Catches: a port whose target refuses shown as healthy, the error or its time missing,
    refused and unreachable not told apart."""
    now = time.time()
    error = f"cannot connect to 127.0.0.1:8080: {REFUSED_TEXT}"
    page = render_html(_page_data("client", {"refused": 3, "unreachable": 1, "last_error": error,
                                             "failed_at": now - 4, "connected_at": now - 60}, []))
    health = _cell(page, "health")
    assert 'data-value="down"' in health and ">refused</span>" in health and error in health
    assert '<span class="refused" data-value="3">' in health and '<span class="unreachable" data-value="1">' in health
    assert re.search(r"[45] s ago", health)
    assert '<svg class="graph"' in _cell(page, "graph") and "<script" not in page
    assert f'id="version" data-value="{__version__}"' in page and 'id="threads" data-value="6"' in page

    recovered = render_html(_page_data("client", {"refused": 3, "unreachable": 1, "last_error": error,
                                                  "failed_at": now - 60, "connected_at": now - 4}, []))
    health = _cell(recovered, "health")
    assert 'data-value="up"' in health and error in health and re.search(r"6[01] s ago", health)
    timed_out = render_html(_page_data("client", {"refused": 0, "unreachable": 1, "last_error": "timed out",
                                                  "failed_at": now, "connected_at": 0.0}, []))
    assert ">unreachable</span>" in _cell(timed_out, "health")


def test_server_page_shows_connections_that_got_nothing_back() -> None:
    """Catches: the server's page silent about a port whose every connection ends unanswered."""
    page = render_html(_page_data("server", {"no_reply": 3, "replied_at": 0.0}, []))
    health = _cell(page, "health")
    assert 'data-value="warn"' in health and '<span class="no_reply" data-value="3">' in health
    fresh = render_html(_page_data("server", {"no_reply": 0, "replied_at": 0.0}, []))
    assert 'data-value="idle"' in _cell(fresh, "health")


def test_peer_state_is_a_coloured_pill() -> None:
    """Catches: the client's "state" cell drawn as a pill with white text on no background."""
    table = render_peers([{"server": "192.0.2.1:3080", "state": "in use", "active": 0},
                          {"server": "192.0.2.2:3080", "state": "standby", "active": 0}],
                         {"192.0.2.1:3080": [(0.0, 1.0, 5.0, 5.0)]}, 300)
    assert '<td class="state"><span class="pill up">in use</span></td>' in table
    assert '<span class="pill idle">standby</span>' in table
    in_use = table.split("<tr")[2]
    assert '<svg class="graph"' in in_use
    css = render_html(_page_data("client", {"refused": 0, "unreachable": 0, "last_error": "", "failed_at": 0.0,
                                            "connected_at": 0.0}, []))
    # a pill's white text always has a background: the default one, or its state's
    assert re.search(r"\.pill\{[^}]*color:#fff[^}]*background:#", css)


# --- usage and metrics ------------------------------------------------------------------------

def test_usage_counts_target_failures_by_kind_in_the_metrics() -> None:
    """Catches: dial failures not counted per port, a timeout counted as a refusal, the counter
    missing from /metrics."""
    from backhaul.metrics import METRICS
    usage = Usage("client", user_side=False)
    try:
        usage.target_failed("7001", f"cannot connect to 127.0.0.1:7001: {REFUSED_TEXT}")
        usage.target_failed("7001", "cannot connect to 127.0.0.1:7001: timed out after 10 s")
        usage.target_failed("7001", f"cannot connect to 127.0.0.1:7001: {REFUSED_TEXT}")
        row = usage.snapshot()[0]
        assert row["target"]["refused"] == 2 and row["target"]["unreachable"] == 1
        text = METRICS.render()
        assert 'backhaul_target_dial_failures_total{side="client",port="7001",reason="refused"} 2' in text
        assert 'backhaul_target_dial_failures_total{side="client",port="7001",reason="unreachable"} 1' in text
        assert 'backhaul_connections_refused_total{side="client",reason="target_unreachable"}' in text
    finally:
        usage.close()


def test_an_unlabelled_counter_shows_zero_before_its_first_event() -> None:
    """Catches: a counter that appears only at its first increment (rate() misses that one)."""
    registry = Registry()
    registry.counter("x_waits_total", "waits")
    registry.counter("x_drops_total", "drops", ("reason",))
    text = registry.render()
    assert "\nx_waits_total 0\n" in text
    assert "x_drops_total{" not in text     # labels unknown until counted: nothing to show


def test_process_metrics_follow_the_process() -> None:
    """Catches: process numbers that are constants, or read from the wrong place (memory in
    pages, a start time off by the boot time, threads of Python only)."""
    from backhaul.metrics import METRICS
    text = METRICS.render()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "process_threads"):
        assert re.search(rf"^{name} [0-9.e+]+$", text, re.M), name
    assert re.search(rf'^backhaul_build_info\{{version="{re.escape(__version__)}",python="[0-9.]+",'
                     r'wire="v0\.7\.2"\} 1$', text, re.M)
    assert "# TYPE process_cpu_seconds_total counter" in text

    before_cpu, before_rss, before_threads = process.cpu_seconds(), process.resident_bytes(), process.threads()
    ballast = bytearray(64 << 20)
    for at in range(0, len(ballast), 4096):   # touch every page: resident, not only reserved
        ballast[at] = 1
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    release = threading.Event()
    helper = threading.Thread(target=release.wait, name="status-test-thread")
    helper.start()
    try:
        assert process.threads() == before_threads + 1
        assert process.resident_bytes() >= before_rss + (48 << 20)
        assert process.cpu_seconds() >= before_cpu + 0.15
    finally:
        release.set()
        helper.join(5)
        del ballast
    fds = process.open_fds()
    with open("/dev/null"):
        assert process.open_fds() == fds + 1

    started = time.time()
    child = subprocess.run([sys.executable, "-c", "from backhaul import process; print(process.STARTED)"],
                           capture_output=True, text=True, timeout=20, check=True)
    assert started - 1.0 <= float(child.stdout) <= time.time() + 0.1



def test_history_counts_a_name_whose_totals_began_anew_from_zero() -> None:
    """Catches: negative traffic drawn for a peer the usage forgot (past its bound) and that came
    back with totals counted from 0."""
    history = History()
    history.update(0.0, {"192.0.2.1": (5000, 5000)})
    history.update(10.0, {"192.0.2.1": (6000, 6000)})
    history.update(20.0, {"192.0.2.1": (300, 200)})
    assert history.series["192.0.2.1"].samples() == [(1000, 1000), (300, 200)]
    assert history.rates("192.0.2.1", 25.0, {"192.0.2.1": (400, 200)})[-1] == (0.0, 5.0, 20.0, 0.0)


def test_a_port_graph_on_the_side_scale_shows_a_few_bytes_as_little() -> None:
    """Catches: 18 bytes drawn as high as the side's megabytes (each graph on its own peak only)."""
    points = [(0.0, 10.0, 2.0, 0.0)]
    own = _polygon(graph.svg(points, "quiet"), "to-target")
    shared = _polygon(graph.svg(points, "quiet", scale=1 << 20), "to-target")
    assert min(y for _x, y in own) == pytest.approx(1.0)            # the top: its own peak
    assert min(y for _x, y in shared) == pytest.approx(16.0, abs=0.1)   # about the middle line
    assert 'data-peak="2"' in graph.svg(points, "quiet", scale=1 << 20)


def test_a_small_graph_groups_steps_into_blocks_that_keep_the_bytes() -> None:
    """Catches: a page of many graphs with a polygon corner per step (slow to build, heavy to
    load), or blocks whose mean loses or invents bytes."""
    points = [(float(ago), 10.0, 100.0, 0.0) for ago in range(3590, 0, -10)] + [(0.0, 5.0, 400.0, 0.0)]
    blocks = graph.grouped(points, 60.0)
    assert len(blocks) <= 61
    assert sum(length * rate for _ago, length, rate, _u in blocks) == pytest.approx(
        sum(length * rate for _ago, length, rate, _u in points))
    drawn = graph.svg(points, "busy", blocks=60)
    assert len(_polygon(drawn, "to-target")) < 2 * 61 + 2
    idle = graph.svg([(float(ago), 10.0, 0.0, 0.0) for ago in range(3590, -10, -10)], "idle")
    assert len(_polygon(idle, "to-target")) == 4   # one flat block, not a corner per step
