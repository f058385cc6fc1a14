"""The shared rate-limited log (dpanel_proto.ratelog): the agent's per-kind use (bursts pass,
floods are counted and reported, by a loop timer too) and the tunnel's per-source use
(token bucket, global bucket, bounded keys, flush)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dpanel_proto.ratelog import REPORT_SOURCE, RateLimitedLog


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
    from dpanel_proto.ratelog import Budget

    clock = Clock()
    b = Budget(3, 10, clock=clock)
    assert [b.take() for _ in range(5)] == [True, True, True, False, False]
    clock.t += 10
    assert b.take()


# ---- per-source use (the tunnel): token bucket, global bucket, flush


_SLOG = logging.getLogger("t.ratelog")


class SClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_flood_is_bounded_and_reports_what_it_suppressed(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t.ratelog")
    clock = SClock()
    rl = RateLimitedLog(_SLOG, report=REPORT_SOURCE, rate=1, burst=5, clock=clock)
    for i in range(1000):
        rl.warning("1.2.3.4", "auth failed %d", i)
    assert len(caplog.records) == 5
    rl.warning("5.6.7.8", "other key")  # another key has its own budget
    assert len(caplog.records) == 6
    clock.now += 1
    rl.warning("1.2.3.4", "resumed")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[-2:] == ["suppressed 995 similar messages from 1.2.3.4", "resumed"]


def test_flush_reports_a_flood_that_stopped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t.ratelog")
    clock = SClock()
    rl = RateLimitedLog(_SLOG, report=REPORT_SOURCE, rate=1, burst=2, clock=clock)
    for _ in range(10):
        rl.info("dev", "x")
    rl.flush()
    assert caplog.records[-1].getMessage() == "suppressed 8 similar messages from dev"
    assert caplog.records[-1].levelno == logging.WARNING
    n = len(caplog.records)
    rl.flush()
    assert len(caplog.records) == n  # nothing new to say


def test_many_keys_are_bounded_globally(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t.ratelog")
    clock = SClock()
    rl = RateLimitedLog(_SLOG, report=REPORT_SOURCE, rate=1, burst=5, global_rate=10,
                        global_burst=50, max_keys=100, clock=clock)
    for i in range(10_000):
        rl.warning(f"10.0.{i // 256}.{i % 256}", "refused")
    assert len(caplog.records) == 50
    assert rl.keys <= 100
    rl.flush()
    assert caplog.records[-1].getMessage().endswith("from all sources")
    assert len(caplog.records) <= 50 + 21


def test_disabled_levels_cost_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="t.ratelog")
    rl = RateLimitedLog(_SLOG, report=REPORT_SOURCE, rate=1, burst=1, clock=SClock())
    for _ in range(10):
        rl.debug("k", "noise")
    assert rl.warning("k", "real")
