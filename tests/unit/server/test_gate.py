"""Unit tests of the pre-auth gate's decisions (fake clock and random)."""

from __future__ import annotations

import random

import pytest

from dpanel_server._gate import PreAuthGate, Startups, source_key
from dpanel_server.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate(clock: Clock, **kw: object) -> PreAuthGate:
    values: dict[str, object] = {"max_unauthenticated": 10,
                                 "per_source": Startups.parse("5:30:8"),
                                 "rng": random.Random(1), "clock": clock}
    values.update(kw)
    return PreAuthGate(**values)  # type: ignore[arg-type]


def test_source_keys() -> None:
    assert source_key("203.0.113.7") == "203.0.113.7"
    assert source_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert source_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"


@pytest.mark.parametrize("bad", ["", "5:30", "a:b:c", "9:30:5", "5:130:9", "0:30:5"])
def test_startups_errors_name_the_field(bad: str) -> None:
    with pytest.raises(ConfigError, match="per_source_startups"):
        Startups.parse(bad)


def test_random_early_drop_per_source() -> None:
    s = Startups.parse("5:30:8")
    assert s.drop_probability(4) == 0
    assert s.drop_probability(5) == pytest.approx(0.3)
    assert 0.3 < s.drop_probability(7) < 1
    assert s.drop_probability(8) == 1


def test_one_source_never_holds_more_than_full() -> None:
    g = gate(Clock(), max_unauthenticated=100)
    admitted = sum(g.admit(object(), "10.0.0.1")[0] is None for _ in range(1000))
    assert admitted == g.pending_from("10.0.0.1") <= 8
    assert g.admit(object(), "10.0.0.2") == (None, None)  # another source is unaffected


def test_full_gate_evicts_the_busiest_sources_oldest_not_the_newcomer() -> None:
    clock = Clock()
    g = gate(clock)
    handles = []
    for i in range(10):  # 4 from A, 3 from B, 3 from C (all below per-source start)
        h = ("conn", i)
        clock.now += 1
        assert g.admit(h, "A" if i < 4 else "B" if i < 7 else "C") == (None, None)
        handles.append(h)
    g.authing(handles[0])  # A's oldest already authenticates: it is spared
    refusal, victim = g.admit("device", "D")
    assert refusal is None and victim == handles[1]
    assert g.pending == 10 and g.pending_from("D") == 1
    # a source that holds as many as the busiest does not displace others
    for _ in range(5):
        refusal, victim = g.admit(object(), "A")
        if refusal is not None:
            break
    assert refusal is not None and "too many unauthenticated" in refusal and victim is None


def test_botnet_with_one_connection_per_address_evicts_the_oldest() -> None:
    clock = Clock()
    g = gate(clock)
    for i in range(10):
        clock.now += 1
        g.admit(f"bot{i}", f"10.0.0.{i}")
    assert g.admit("device", "192.0.2.1") == (None, "bot0")


def test_penalties_block_after_min_and_expire() -> None:
    clock = Clock()
    g = gate(clock, penalty_authfail=5.0, penalty_min=15.0, penalty_max=60.0)
    for i in range(3):
        assert g.admit(i, "S")[0] is None
        g.done(i, "authfail")
    refusal, _ = g.admit("x", "S")
    assert refusal is not None and "penalised" in refusal
    assert g.admit("y", "T")[0] is None  # only that source
    clock.now += 15.1
    assert g.admit("z", "S")[0] is None
    # refusals by us ("ours") and logins cost nothing
    for i in range(50):
        g.admit(("o", i), "U")
        g.done(("o", i), "ours" if i % 2 else "auth")
    assert g.penalised("U") == 0


def test_penalty_is_capped() -> None:
    clock = Clock()
    g = gate(clock, penalty_authfail=5.0, penalty_min=15.0, penalty_max=60.0)
    for i in range(100):
        g.admit(i, "S")
        g.done(i, "authfail")
    assert g.penalised("S") <= 60
