"""Pool auto-sizing arithmetic, without sockets."""

from __future__ import annotations

import pytest

from backhaul.poolsize import PoolSizer

pytestmark = pytest.mark.timeout(10)


def run_window(sizer: PoolSizer, idle: int, size: int, requests: int) -> bool:
    for _ in range(requests):
        assert sizer.take_request()
    return any([sizer.sample(idle, size) for _ in range(10)])


def test_grows_when_the_pool_runs_dry():
    sizer = PoolSizer(base=8, aggressive=False)
    # load ceil(50/10)=5, average idle 0: 5 + 4 > 0 -> one extra link
    assert run_window(sizer, idle=0, size=8, requests=50)


def test_holds_when_idle_links_cover_the_load():
    sizer = PoolSizer(base=8, aggressive=False)
    # load 1, average 8: 1 + 4 > 40 is false; 1 + 3 < 32 but size == base -> no shrink
    assert not run_window(sizer, idle=8, size=8, requests=10)
    assert sizer.take_request()


def test_shrinks_by_skipping_one_request_above_base():
    sizer = PoolSizer(base=8, aggressive=False)
    assert not run_window(sizer, idle=20, size=20, requests=10)
    assert not sizer.take_request()  # skipped once
    assert sizer.take_request()


def test_aggressive_grows_sooner():
    calm, eager = PoolSizer(8, False), PoolSizer(8, True)
    # load 2: calm with 2 idle holds (2+4 > 10 is false); eager with 1 idle grows (2+1 > 2)
    assert not run_window(calm, idle=2, size=8, requests=20)
    assert run_window(eager, idle=1, size=8, requests=20)


def test_decides_only_every_ten_samples():
    sizer = PoolSizer(8, False)
    assert [sizer.sample(0, 8) for _ in range(10)] == [False] * 9 + [True]
