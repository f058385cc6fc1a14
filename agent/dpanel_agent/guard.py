"""Checks every request must pass before the agent acts on it: signature, addressee,
expiry and replay. Pure logic (clock injectable), so each refusal is unit-tested."""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

from dpanel_proto.signing import ManagerKey, verify_request
from dpanel_proto.wire import MAX_REQUEST_LIFETIME, ErrorCode, Request

__all__ = ["Refusal", "RequestGuard"]

#: (code, human message) for a refused request.
Refusal = Tuple[ErrorCode, str]


class RequestGuard:
    """Decides whether a decoded request may be acted on.

    The replay cache keeps each accepted request id until the request could no longer
    pass the expiry check anyway, so it stays small; ``max_entries`` bounds it even if a
    flood of validly signed requests arrives (which only the manager can produce).
    """

    def __init__(self, device: str, manager_key: ManagerKey, skew: float,
                 clock: Callable[[], float] = time.time, max_entries: int = 10000) -> None:
        self.device = device
        self._key = manager_key
        self.skew = skew
        self._clock = clock
        self._max = max_entries
        self._seen: Dict[str, float] = {}  # id -> wall time after which it cannot pass

    def check(self, req: Request) -> Optional[Refusal]:
        """None if the request may be acted on (and remembers it), else why not."""
        if not verify_request(req, self._key):
            return ErrorCode.BAD_SIGNATURE, "signature does not verify with the pinned manager key"
        if req.device != self.device:
            return ErrorCode.WRONG_DEVICE, f"request is for {req.device}, this is {self.device}"
        lifetime = req.expires_at - req.issued_at
        if lifetime < 0 or lifetime > MAX_REQUEST_LIFETIME:
            return (ErrorCode.BAD_REQUEST,
                    f"request lifetime {lifetime:.0f} s is outside 0-{MAX_REQUEST_LIFETIME} s")
        now = self._clock()
        if now > req.expires_at + self.skew:
            # Say what the device thinks the time is: a wrong device clock is the usual cause.
            return (ErrorCode.EXPIRED,
                    f"request expired {now - req.expires_at:.0f} s ago by this device's clock "
                    f"({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))}, tolerance "
                    f"{self.skew:g} s)")
        self._prune(now)
        if req.id in self._seen:
            return ErrorCode.REPLAYED, f"request {req.id} was already seen"
        if len(self._seen) >= self._max:
            # Full of live entries: refusing is safer than forgetting (which allows replay).
            return ErrorCode.INTERNAL, "too many requests in flight; try again shortly"
        self._seen[req.id] = req.expires_at + self.skew
        return None

    def _prune(self, now: float) -> None:
        if self._seen:
            for rid in [r for r, until in self._seen.items() if until < now]:
                del self._seen[rid]

    def __len__(self) -> int:
        return len(self._seen)
