"""The reconnect schedule of 10,000 devices after a broker restart is spread and bounded.

A pure model of the agent's MQTT session schedule (dpanel_proto.util.Backoff with the
agent's defaults, reconnect_min 1 s and reconnect_max 120 s): every device loses the
broker at t = 0 and retries at the backoff's delays; the broker is back after ``down``
seconds. What the broker then sees is the arrival of each device's first attempt after
``down``. The real storm (simulated clients on a real Mosquitto) is measured by
``invoke bench --scale``.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dpanel_proto.util import Backoff

N = 10_000
LO, HI = 1.0, 120.0  # the agent's defaults (dpanel_agent.config)


def _arrivals(down: float) -> list[float]:
    out = []
    for _ in range(N):
        b, t = Backoff(LO, HI), 0.0
        while t < down:
            t += b.next()
        out.append(t)
    return out


def _peak_share(arrivals: list[float]) -> float:
    """The largest share of the fleet arriving within one second."""
    return max(Counter(int(t) for t in arrivals).values()) / len(arrivals)


def test_each_wait_is_within_its_window_and_never_above_the_cap() -> None:
    random.seed(1)
    for _ in range(200):
        b = Backoff(LO, HI)
        for n in range(40):
            d = b.next()
            assert 0.0 <= d <= min(HI, LO * 2 ** n)


def test_waits_fill_the_whole_window() -> None:
    """Full jitter: about half the waits of a window are in its lower half (the earlier
    equal jitter put none there)."""
    random.seed(2)
    low = sum(1 for _ in range(N) if Backoff(8.0, 8.0).next() < 4.0)
    assert 0.45 * N < low < 0.55 * N


@pytest.mark.parametrize(("down", "peak"), [(5.0, 0.32), (10.0, 0.2), (30.0, 0.06)])
def test_a_restarted_broker_sees_the_fleet_spread_out(down: float, peak: float) -> None:
    """After an outage of ``down`` seconds no second brings more than ``peak`` of the
    fleet (equal jitter measured 0.48, 0.25, 0.063), and everyone is back within the
    cap's reach: the last arrival is at most down + 2 * HI."""
    random.seed(3)
    arrivals = _arrivals(down)
    assert _peak_share(arrivals) <= peak
    assert max(arrivals) <= down + 2 * HI
    # and the herd is spread over many seconds, not a few
    assert len({int(t) for t in arrivals}) >= 10


def test_after_a_refusal_each_wait_is_at_least_half_its_step() -> None:
    """The tunnel's refusal backoff (floor 0.5): a revoked device's redials never bunch,
    so in the first 5 s after a refusal it dials at most once more (a CI run saw two)."""
    random.seed(3)
    for _ in range(2000):
        b = Backoff(5.0, 300.0, floor=0.5)
        waits = [b.next() for _ in range(6)]
        for n, w in enumerate(waits):
            step = min(300.0, 5.0 * 2 ** n)
            assert step / 2 <= w <= step
        assert waits[0] + waits[1] >= 7.5
    with pytest.raises(ValueError, match="floor"):
        Backoff(1.0, 2.0, floor=1.5)
