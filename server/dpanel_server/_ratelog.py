"""Rate-limited logging per key (a source address, a device id), so no peer can flood the journal.

A hostile or broken peer can make a daemon log on every packet: one authenticated device
once produced 9,018 lines in 6 s, an unauthenticated client 180 lines a second. Every
per-connection or per-device line therefore goes through :class:`RateLimitedLog`:

* each key has a token bucket (``burst`` lines at once, then ``rate`` lines a second);
* a line over the budget is counted, not written;
* when that key may log again, ``suppressed N similar messages from KEY`` comes first, so
  the operator knows what was left out; :meth:`RateLimitedLog.flush` (called every few
  seconds) reports the rest, so a flood that stopped is accounted for too;
* a global bucket bounds the sum over all keys (a flood from many addresses), and at most
  ``max_keys`` keys are remembered (least recently used forgotten, reporting their count).

Memory is O(max_keys); each call is O(1).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable

__all__ = ["RateLimitedLog"]

_ALL = "all sources"
#: Keys reported by name in one flush; the others are summed into the "all sources" line.
_FLUSH_KEYS = 20


class _Bucket:
    __slots__ = ("stamp", "suppressed", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.suppressed = 0


class RateLimitedLog:
    """``logger``'s methods with a per-key and a global line budget."""

    def __init__(self, logger: logging.Logger, *, rate: float = 0.5, burst: int = 10,
                 global_rate: float = 50.0, global_burst: int = 200, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or global_rate <= 0 or global_burst < 1 or max_keys < 1:
            raise ValueError("rate, burst, global_rate, global_burst, max_keys must be > 0")
        self.logger = logger
        self._rate, self._burst = rate, float(burst)
        self._grate, self._gburst = global_rate, float(global_burst)
        self._max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[str, _Bucket] = OrderedDict()
        self._global = _Bucket(self._gburst, clock())

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
        """Log ``msg % args`` at ``level`` unless ``key`` (or everyone) is over budget.
        Returns whether the line was written."""
        if not self.logger.isEnabledFor(level):
            return False  # a disabled level costs no budget
        now = self._clock()
        bucket = self._bucket(key, now)
        if not self._take(bucket, now, self._rate, self._burst):
            bucket.suppressed += 1
            return False
        if not self._take(self._global, now, self._grate, self._gburst):
            self._global.suppressed += 1
            bucket.tokens += 1  # not this key's fault: give its token back
            return False
        self._report(level, key, bucket)
        self._report(level, _ALL, self._global)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def flush(self) -> None:
        """Report what was suppressed since the last report (call every few seconds, so a
        flood that stopped is still accounted for): one line for each of the first
        ``_FLUSH_KEYS`` keys, the rest folded into one line for all sources."""
        reported = 0
        for key, bucket in list(self._keys.items()):
            if bucket.suppressed:
                if reported < _FLUSH_KEYS:
                    self._report(logging.WARNING, key, bucket)
                    reported += 1
                else:
                    self._global.suppressed += bucket.suppressed
                    bucket.suppressed = 0
            elif bucket.tokens >= self._burst:
                del self._keys[key]  # full and quiet: nothing to remember
        self._report(logging.WARNING, _ALL, self._global)

    @property
    def keys(self) -> int:
        return len(self._keys)

    # ------------------------------------------------------------------ internals

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._keys.get(key)
        if bucket is None:
            while len(self._keys) >= self._max_keys:
                _old_key, old = self._keys.popitem(last=False)
                if old.suppressed:
                    # forgotten keys fold into the global count, reported with it
                    self._global.suppressed += old.suppressed
            bucket = self._keys[key] = _Bucket(self._burst, now)
        else:
            self._keys.move_to_end(key)
        return bucket

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

    def _report(self, level: int, key: str, bucket: _Bucket) -> None:
        if bucket.suppressed:
            n, bucket.suppressed = bucket.suppressed, 0
            self.logger.log(max(level, logging.WARNING),
                            "suppressed %d similar message%s from %s", n,
                            "" if n == 1 else "s", key)
