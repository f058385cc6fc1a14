"""Rate-limited logging: bursts pass, floods are counted and reported once per window."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dpanel_agent.ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_burst_then_suppressed_count_with_the_next_window(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.rl"), burst=3, window=10, clock=clock)
    with caplog.at_level(logging.INFO, "t.rl"):
        logged = [rl.warning("bad", "bad input %d", i) for i in range(1000)]
        assert logged.count(True) == 3
        rl.warning("other", "another kind")  # its own budget
        clock.t += 10
        rl.warning("bad", "bad input again")
    lines = _lines(caplog)
    assert lines[:3] == ["bad input 0", "bad input 1", "bad input 2"]
    assert "another kind" in lines
    assert "bad: suppressed 997 similar message(s) in 10 s" in lines
    assert lines[-1] == "bad input again" and len(lines) == 6


def test_distinct_keys_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger("t.rl2"), burst=1, window=10, max_keys=4,
                        clock=Clock())
    with caplog.at_level(logging.INFO, "t.rl2"):
        for i in range(1000):
            rl.warning(f"source {i}", "from source %d", i)
    assert len(caplog.records) <= 5  # 4 keys + one shared overflow key
    assert len(rl._keys) <= 5


async def test_counts_are_reported_by_a_timer_when_the_flood_stops(
        caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger("t.rl3"), burst=1, window=0.2)
    with caplog.at_level(logging.INFO, "t.rl3"):
        for _ in range(50):
            rl.warning("flood", "x")
        await asyncio.sleep(0.5)
    assert any("flood: suppressed 49" in m for m in _lines(caplog)), _lines(caplog)


def test_budget_refills_per_window() -> None:
    from dpanel_agent.ratelog import Budget

    clock = Clock()
    b = Budget(3, 10, clock=clock)
    assert [b.take() for _ in range(5)] == [True, True, True, False, False]
    clock.t += 10
    assert b.take()
