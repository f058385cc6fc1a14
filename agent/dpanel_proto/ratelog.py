"""Rate-limited logging per key, for the agent and the tunnel: no peer may flood the journal.

A hostile or broken peer can make a daemon log on every packet (one device once produced
9,018 lines in 6 s, an unauthenticated client 180 lines a second; an SD card wears out,
journald drops the lines that matter). Every per-peer line therefore goes through
:class:`RateLimitedLog`:

* each key (a kind of event and, where it matters, its source) has a token bucket:
  ``burst`` lines at once, then ``rate`` lines a second (default: ``burst`` per ``window``
  seconds, i.e. 5 per 10 s);
* a line over the budget is counted, not written;
* the count comes out as one "suppressed N" line: before the key's next written line, from
  :meth:`RateLimitedLog.flush`, and - when an asyncio loop runs - from a loop timer
  ``window`` seconds later, so a flood that stopped is accounted for too;
* a global bucket bounds the sum over all keys (a flood from many sources), and at most
  ``max_keys`` keys are remembered (least recently used forgotten, their count folded into
  the global one).

Memory is O(max_keys); each call is O(1). Stdlib only (dpanel_proto is the bottom layer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Callable, Optional

__all__ = ["REPORT_KIND", "REPORT_SOURCE", "Budget", "RateLimitedLog"]

#: "suppressed" line naming a kind of event (the agent: "malformed requests: suppressed ...").
REPORT_KIND = "%(key)s: suppressed %(n)d similar message(s) in %(secs).0f s"
#: "suppressed" line naming a source (the tunnel: "... from 10.0.0.1", "... from device d").
REPORT_SOURCE = "suppressed %(n)d similar message%(s)s from %(key)s"

_ALL = "all sources"
#: Keys reported by name in one flush; the others are summed into the "all sources" line.
_FLUSH_KEYS = 20


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


class _Bucket:
    __slots__ = ("since", "stamp", "suppressed", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.suppressed = 0
        self.since = stamp  # when the first line of the pending count was suppressed


class RateLimitedLog:
    """``logger``'s methods with a per-key and a global line budget.

    ``rate`` (lines a second per key) defaults to ``burst / window``; the global budget
    defaults to the sum of ``max_keys`` keys' budgets (it bites only on a flood of distinct
    keys). ``report`` is the "suppressed" line (:data:`REPORT_KIND` or :data:`REPORT_SOURCE`).
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 5, window: float = 10.0,
                 rate: Optional[float] = None, global_rate: Optional[float] = None,
                 global_burst: Optional[int] = None, max_keys: int = 256,
                 report: str = REPORT_KIND,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate is None:
            rate = burst / window if window > 0 else 0.0
        if global_rate is None:
            global_rate = rate * max_keys
        if global_burst is None:
            global_burst = burst * max_keys
        if rate <= 0 or burst < 1 or global_rate <= 0 or global_burst < 1 or max_keys < 1:
            raise ValueError("rate, burst, window, global_rate, global_burst, max_keys "
                             "must be > 0")
        self.logger = logger
        self._rate, self._burst = rate, float(burst)
        self._grate, self._gburst = global_rate, float(global_burst)
        #: delay of the loop timer that reports a count after the flood stopped
        self._window = window if window > 0 else burst / rate
        self._max_keys = max_keys
        self._report_fmt = report
        self._clock = clock
        self._keys: OrderedDict[str, _Bucket] = OrderedDict()
        self._global = _Bucket(self._gburst, clock())
        self._timer: Optional[asyncio.TimerHandle] = None

    # ------------------------------------------------------------------ API

    def debug(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.DEBUG, key, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def exception(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args, exc_info=True)

    def log(self, level: int, key: str, msg: str, *args: object,
            exc_info: bool = False) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` (or everyone) is over budget
        (the argument order of :meth:`logging.Logger.log`, with the key second).
        Returns whether the line was written."""
        if not self.logger.isEnabledFor(level):
            return False  # a disabled level costs no budget
        now = self._clock()
        bucket = self._bucket(key, now)
        if not self._take(bucket, now, self._rate, self._burst):
            self._suppress(bucket, now)
            return False
        if not self._take(self._global, now, self._grate, self._gburst):
            self._suppress(self._global, now)
            bucket.tokens += 1  # not this key's fault: give its token back
            return False
        self._report(level, key, bucket, now)
        self._report(level, _ALL, self._global, now)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def flush(self) -> None:
        """Report what was suppressed since the last report (the tunnel calls it every few
        seconds, a loop timer does after a suppression): one line for each of the first
        ``_FLUSH_KEYS`` keys, the rest folded into one line for all sources."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._clock()
        reported = 0
        for key, bucket in list(self._keys.items()):
            if bucket.suppressed:
                if reported < _FLUSH_KEYS:
                    self._report(logging.WARNING, key, bucket, now)
                    reported += 1
                else:
                    self._fold(bucket, now)
            elif self._refill(bucket, now, self._rate, self._burst) >= self._burst:
                del self._keys[key]  # full and quiet: nothing to remember
        self._report(logging.WARNING, _ALL, self._global, now)

    @property
    def keys(self) -> int:
        return len(self._keys)

    # ------------------------------------------------------------------ internals

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._keys.get(key)
        if bucket is None:
            while len(self._keys) >= self._max_keys:
                _old_key, old = self._keys.popitem(last=False)
                # forgotten keys fold into the global count, reported with it
                self._fold(old, now)
            bucket = self._keys[key] = _Bucket(self._burst, now)
        else:
            self._keys.move_to_end(key)
        return bucket

    def _fold(self, bucket: _Bucket, now: float) -> None:
        if bucket.suppressed:
            if not self._global.suppressed:
                self._global.since = bucket.since
            self._global.suppressed += bucket.suppressed
            bucket.suppressed = 0

    def _suppress(self, bucket: _Bucket, now: float) -> None:
        if not bucket.suppressed:
            bucket.since = now
        bucket.suppressed += 1
        if self._timer is None:
            # so the count comes out even if the flood stops; without a running loop (a
            # thread, a test) it comes with the key's next line or flush()
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self._window, self.flush)

    @staticmethod
    def _refill(bucket: _Bucket, now: float, rate: float, burst: float) -> float:
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        return bucket.tokens

    def _take(self, bucket: _Bucket, now: float, rate: float, burst: float) -> bool:
        if self._refill(bucket, now, rate, burst) < 1:
            return False
        bucket.tokens -= 1
        return True

    def _report(self, level: int, key: str, bucket: _Bucket, now: float) -> None:
        if bucket.suppressed:
            n, bucket.suppressed = bucket.suppressed, 0
            self.logger.log(max(level, logging.WARNING), self._report_fmt,
                            {"key": key, "n": n, "s": "" if n == 1 else "s",
                             "secs": now - bucket.since})
