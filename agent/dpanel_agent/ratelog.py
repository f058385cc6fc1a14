"""Rate-limited logging: a flood of bad input must not turn into a flood of log lines
(an SD card wears out, journald drops the lines that matter), yet the operator must see
that it happened, so suppressed lines are counted and reported as "suppressed N"."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Dict, List, Optional

__all__ = ["Budget", "RateLimitedLog"]


class Budget:
    """At most ``burst`` events per ``window`` seconds (a fixed window: enough to bound a
    flood, and two numbers to reason about); :meth:`take` says whether one more fits."""

    def __init__(self, burst: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.window = window
        self._clock = clock
        self._start = -window
        self._used = 0

    def take(self) -> bool:
        now = self._clock()
        if now - self._start >= self.window:
            self._start, self._used = now, 0
        if self._used >= self.burst:
            return False
        self._used += 1
        return True


class _Window:
    __slots__ = ("count", "level", "start", "suppressed", "timer")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0
        self.level = logging.WARNING
        self.timer: Optional[asyncio.TimerHandle] = None


class RateLimitedLog:
    """At most ``burst`` lines per ``key`` in each ``window`` seconds; the rest are
    counted, and one ``suppressed N similar message(s)`` line follows when the window
    ends (from a loop timer when an event loop runs, else with the next line of that key).

    A key names a kind of event and, where it matters, its source ("malformed request",
    "refused key from 127.0.0.1"); the number of keys is bounded too, so that a flood of
    distinct sources cannot grow the table without end.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 5, window: float = 10.0,
                 max_keys: int = 256, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self._max_keys = max_keys
        self._clock = clock
        self._keys: Dict[str, _Window] = {}

    def log(self, key: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` is over its budget; True if it was logged."""
        now = self._clock()
        w = self._keys.get(key)
        if w is not None and now - w.start >= self.window:
            self._flush(key)
            w = None
        if w is None:
            if len(self._keys) >= self._max_keys:
                key = "<other sources>"  # one shared budget for the overflow
                w = self._keys.get(key)
            if w is None:
                w = self._keys[key] = _Window(now)
        if w.count < self.burst:
            w.count += 1
            self.logger.log(level, msg, *args)
            return True
        w.suppressed += 1
        w.level = max(w.level, level)
        if w.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                w.timer = loop.call_later(max(0.0, w.start + self.window - now),
                                          self._flush, key)
        return False

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(key, logging.WARNING, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self.log(key, logging.INFO, msg, *args)

    def flush(self) -> None:
        """Report every pending count now (shutdown)."""
        keys: List[str] = list(self._keys)
        for key in keys:
            self._flush(key)

    def _flush(self, key: str) -> None:
        w = self._keys.pop(key, None)
        if w is None:
            return
        if w.timer is not None:
            w.timer.cancel()
        if w.suppressed:
            self.logger.log(w.level, "%s: suppressed %d similar message(s) in %.0f s",
                            key, w.suppressed, self._clock() - w.start)
