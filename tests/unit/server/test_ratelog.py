"""Unit tests of the per-key rate-limited log (fake clock)."""

from __future__ import annotations

import logging

import pytest

from dpanel_server._ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_flood_is_bounded_and_reports_what_it_suppressed(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="t.ratelog")
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), rate=1, burst=5, clock=clock)
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
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), rate=1, burst=2, clock=clock)
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
    clock = Clock()
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), rate=1, burst=5, global_rate=10,
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
    rl = RateLimitedLog(logging.getLogger("t.ratelog"), rate=1, burst=1, clock=Clock())
    for _ in range(10):
        rl.debug("k", "noise")
    assert rl.warning("k", "real")
