"""backhaul/entropy.py: the pooled system randomness behind WebSocket keys, ids and masks."""

from __future__ import annotations

import threading

from backhaul.entropy import POOL, PooledRandom


def test_draws_are_never_handed_out_twice_and_refill_past_the_pool() -> None:
    """Catches: a pool that restarts at its beginning (the same masks again) or hands out the
    tail of an old page after a refill."""
    rng = PooledRandom()
    draws = [rng.randbytes(4) for _ in range(3 * POOL // 4)]   # three pages' worth
    assert all(len(d) == 4 for d in draws)
    assert len(set(draws)) > len(draws) - 3   # 4-byte draws: a chance repeat or two at most
    assert rng.randbytes(20) != rng.randbytes(20)
    assert len(rng.randbytes(POOL)) == POOL   # large draws go to the system directly


def test_the_random_api_keeps_its_ranges() -> None:
    rng = PooledRandom()
    assert all(0 <= rng.getrandbits(31) < 2 ** 31 for _ in range(1000))
    assert rng.getrandbits(0) == 0
    assert all(0.0 <= rng.random() < 1.0 for _ in range(1000))
    picks = {rng.choice("abcd") for _ in range(400)}
    assert picks == set("abcd")
    assert all(0 <= rng.randrange(10) < 10 for _ in range(500))


def test_threads_share_the_pool_without_overlap() -> None:
    """Masks are drawn on the reactor and, for a relay, on pool threads: no two get one slice."""
    rng = PooledRandom()
    got: list[bytes] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [rng.randbytes(16) for _ in range(500)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(got) == 2000 and len(set(got)) == 2000
