"""Unit tests of the tunnel's port pool (pure logic: seeded RNG, fake clock)."""

from __future__ import annotations

import random

import pytest

from dpanel_server._pool import PoolExhausted, PortPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(lo: int = 20000, hi: int = 20009, sticky: float = 60.0, seed: int = 1
         ) -> tuple[PortPool, Clock]:
    clock = Clock()
    return PortPool(lo, hi, sticky_seconds=sticky, rng=random.Random(seed), clock=clock), clock


def test_ports_are_distinct_in_range_and_pool_runs_out_cleanly() -> None:
    pool, _ = make()
    got = [pool.acquire(f"d{i}") for i in range(10)]
    assert sorted(got) == list(range(20000, 20010))
    assert pool.in_use == 10 and pool.free == 0
    with pytest.raises(PoolExhausted, match=r"port pool exhausted: 10 of 10 ports \(20000-20009\)"):
        pool.acquire("d10")


def test_allocation_is_random_not_sequential() -> None:
    pool, _ = make(20000, 29999)
    got = [pool.acquire(f"d{i}") for i in range(50)]
    assert len(set(got)) == 50
    assert got != sorted(got)
    assert max(got) - min(got) > 5000  # spread over the range, not clustered at the start


def test_different_seeds_give_different_ports() -> None:
    a, _ = make(20000, 29999, seed=1)
    b, _ = make(20000, 29999, seed=2)
    assert [a.acquire(f"d{i}") for i in range(5)] != [b.acquire(f"d{i}") for i in range(5)]


def test_released_port_returns_to_the_same_device() -> None:
    pool, _ = make(20000, 29999)
    port = pool.acquire("a")
    pool.release(port)
    assert pool.in_use == 0 and pool.reserved == 1
    assert pool.sticky_port("a") == port
    assert pool.acquire("a") == port
    assert pool.reserved == 0


def test_reserved_port_is_not_given_to_others_while_free_ports_exist() -> None:
    pool, _ = make()
    port = pool.acquire("a")
    pool.release(port)
    others = [pool.acquire(f"d{i}") for i in range(9)]
    assert port not in others
    # Full except a's reservation: a newcomer takes it rather than being refused.
    assert pool.acquire("late") == port
    assert pool.sticky_port("a") is None
    # ...so "a" now finds the pool exhausted.
    with pytest.raises(PoolExhausted):
        pool.acquire("a")


def test_reservation_expires() -> None:
    pool, clock = make(sticky=60)
    port = pool.acquire("a")
    pool.release(port)
    clock.now += 59
    assert pool.sticky_port("a") == port
    clock.now += 2
    assert pool.sticky_port("a") is None
    assert pool.reserved == 0


def test_sticky_zero_means_no_reservation() -> None:
    pool, _ = make(sticky=0)
    port = pool.acquire("a")
    pool.release(port)
    assert pool.reserved == 0 and pool.sticky_port("a") is None


def test_release_without_sticky_frees_plainly() -> None:
    pool, _ = make()
    port = pool.acquire("a")
    pool.release(port, sticky=False)
    assert pool.reserved == 0 and pool.in_use == 0 and pool.sticky_port("a") is None


def test_avoid_skips_ports_held_elsewhere() -> None:
    pool, _ = make()
    avoid = set(range(20000, 20009))
    assert pool.acquire("a", avoid=avoid) == 20009
    with pytest.raises(PoolExhausted):
        pool.acquire("b", avoid=avoid)


def test_avoid_also_applies_to_the_devices_own_reservation() -> None:
    pool, _ = make()
    port = pool.acquire("a")
    pool.release(port)
    assert pool.acquire("a", avoid={port}) != port


def test_claim_only_the_devices_own_reserved_port() -> None:
    pool, _ = make()
    a = pool.acquire("a")
    assert not pool.claim("b", a)  # taken by a
    pool.release(a)
    assert not pool.claim("b", a)  # reserved for a
    assert not pool.claim("a", a + 1 if a < 20009 else a - 1)  # never a's
    assert pool.claim("a", a)
    assert pool.owner(a) == "a"


def test_release_of_unknown_port_is_a_no_op() -> None:
    pool, _ = make()
    pool.release(20005)
    pool.release(5)
    assert pool.in_use == 0 and pool.reserved == 0


def test_second_port_of_same_device_moves_its_sticky_port() -> None:
    pool, _ = make()
    first = pool.acquire("a")
    second = pool.acquire("a")
    assert first != second
    pool.release(first)  # no longer a's sticky port: plainly free
    assert pool.reserved == 0
    pool.release(second)
    assert pool.sticky_port("a") == second


def test_contains_and_bad_range() -> None:
    pool, _ = make()
    assert 20000 in pool and 20009 in pool and 20010 not in pool
    with pytest.raises(ValueError, match="port range"):
        PortPool(30000, 20000)
    with pytest.raises(ValueError, match="port range"):
        PortPool(0, 10)


def test_memory_is_proportional_to_ports_in_use() -> None:
    pool, _ = make(1024, 65535)
    for i in range(3):
        pool.acquire(f"d{i}")
    # Free ports are not materialised: only the three taken ones are stored.
    assert len(pool._taken) == 3 and len(pool._reserved) == 0


def test_export_and_preload_carry_ports_across_a_restart() -> None:
    pool, clock = make(20000, 29999)
    a = pool.acquire("a")
    b = pool.acquire("b")
    pool.release(b)
    gone = pool.acquire("gone")
    pool.release(gone)
    clock.now += 61  # "gone"'s reservation expired; "b"'s too (sticky 60)
    exported = pool.export()
    assert exported == {"a": a}
    fresh, _ = make(20000, 29999, seed=9)
    assert fresh.preload({**exported, "out-of-range": 5, "clash": a}) == 1
    assert fresh.in_use == 0 and fresh.reserved == 1
    assert fresh.acquire("clash") != a  # reserved for "a", not handed to others
    assert fresh.acquire("a") == a


def test_preload_without_stickiness_does_nothing() -> None:
    pool, _ = make(sticky=0)
    assert pool.preload({"a": 20001}) == 0
    assert pool.reserved == 0
