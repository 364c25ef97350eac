"""The C allocator's settings (backhaul/memory.py): glibc found by its own symbols, the arena cap
left to an operator's MALLOC_ARENA_MAX, and the trim on a worker from the start, every 10 s."""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import pytest

from backhaul import memory

pytestmark = pytest.mark.timeout(10)


class FakeReactor:
    """What memory.start uses of a reactor: submit, call_soon, call_later; recorded, not run."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Callable[..., Any], tuple]] = []
        self.soon: list[Callable[[], None]] = []
        self.later: list[tuple[float, Callable[[], None]]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> bool:
        self.submitted.append((fn, args))
        return True

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.soon.append(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.later.append((delay, fn))


class FakeLibc:
    def __init__(self) -> None:
        self.mallopt_calls: list[tuple[int, int]] = []

    def mallopt(self, option: int, value: int) -> int:
        self.mallopt_calls.append((option, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        return 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_is_found_by_its_own_symbols() -> None:
    libc = memory._glibc()
    assert libc is not None and libc.malloc_trim(0) in (0, 1)


@pytest.mark.parametrize("operator_set", [False, True])
def test_start_caps_arenas_unless_the_operator_did_and_trims_from_the_start(monkeypatch: pytest.MonkeyPatch,
                                                                             operator_set: bool) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    if operator_set:
        monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    else:
        monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    reactor = FakeReactor()
    memory.start(reactor)  # type: ignore[arg-type]
    assert libc.mallopt_calls == ([] if operator_set else [(memory._M_ARENA_MAX, memory.ARENAS)])
    assert len(reactor.soon) == 1 and not reactor.submitted   # the first trim: at once, on the loop
    reactor.soon[0]()
    assert reactor.submitted == [(libc.malloc_trim, (0,))]    # on a worker: the GIL is free meanwhile
    assert [delay for delay, _ in reactor.later] == [memory.TRIM_EVERY]


def test_nothing_is_done_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    reactor = FakeReactor()
    memory.start(reactor)  # type: ignore[arg-type]
    assert not (reactor.soon or reactor.later or reactor.submitted)
