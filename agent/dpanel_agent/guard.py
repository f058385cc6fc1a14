"""Checks every request must pass before the agent acts on it: signature, addressee,
freshness (issued_at and expires_at) and replay. Pure logic (clock injectable), so each
refusal is unit-tested; the replay cache can be kept in a file so that it survives a
restart of the agent."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from dpanel_proto.signing import ManagerKey, verify_request
from dpanel_proto.util import atomic_write
from dpanel_proto.wire import MAX_REQUEST_LIFETIME, ErrorCode, Request

__all__ = ["REPLAY_CACHE_NAME", "Refusal", "RequestGuard"]

log = logging.getLogger("dpanel.agent")

#: (code, human message) for a refused request.
Refusal = Tuple[ErrorCode, str]

#: File name of the persisted replay cache inside the state dir.
REPLAY_CACHE_NAME = "replay-cache.json"
#: A cache file larger than this is not read (it can only be damaged or planted).
_MAX_FILE = 4 * 1024 * 1024
_FILE_VERSION = 1


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class RequestGuard:
    """Decides whether a decoded request may be acted on.

    Freshness, by the device's clock ``now``:

    * ``expires_at`` is enforced strictly (no tolerance): a request must still be alive
      when it is checked, and the dispatcher checks again at the moment it acts (a request
      held up by a stalled broker must not be acted on after its caller gave up);
    * ``issued_at`` must lie within ``now - skew .. now + skew``: a request dated in the
      future (which would stay valid, and replayable after the cache is lost, for longer
      than its stated lifetime) is refused, and so is one issued long ago;
    * ``expires_at - issued_at`` is at most :data:`MAX_REQUEST_LIFETIME`.

    ``skew`` is therefore the tolerated difference between the device's clock and the
    manager's (a Pi has no RTC and lags until NTP syncs). A device clock *ahead* of the
    manager's by more than a request's lifetime makes requests expire before they arrive;
    the refusal message shows the device's time so that this is easy to spot.

    The replay cache keeps each accepted request id until the request could no longer
    pass the checks anyway (expiry plus ``skew``, as a margin for a clock stepped back),
    so it stays small; ``max_entries`` bounds it even if a flood of validly signed
    requests arrives (which only the manager can produce). With ``store`` it is written
    to that file (atomically, 0600) *before* a request is acted on, and read back at
    start, so a restarted agent still refuses a request it already honoured.
    """

    def __init__(self, device: str, manager_key: ManagerKey, skew: float,
                 clock: Callable[[], float] = time.time, max_entries: int = 10000,
                 store: Optional[Path] = None) -> None:
        self.device = device
        self._key = manager_key
        self.skew = skew
        self._clock = clock
        self._max = max_entries
        self._store = store
        self._seen: Dict[str, float] = {}  # id -> wall time after which it cannot pass
        if store is not None:
            self._load(store)

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
        refusal = self.freshness(req, now)
        if refusal is not None:
            return refusal
        self._prune(now)
        if req.id in self._seen:
            return ErrorCode.REPLAYED, f"request {req.id} was already seen"
        if len(self._seen) >= self._max:
            # Full of live entries: refusing is safer than forgetting (which allows replay).
            return ErrorCode.INTERNAL, "too many requests in flight; try again shortly"
        self._seen[req.id] = req.expires_at + self.skew
        if self._store is not None and not self._save(self._store):
            # Acting on a request we could not record would let it be replayed after a
            # restart; refusing keeps the promise (and the log says why).
            del self._seen[req.id]
            return ErrorCode.INTERNAL, "cannot record the request in the replay cache"
        return None

    def freshness(self, req: Request, now: Optional[float] = None) -> Optional[Refusal]:
        """The time checks alone (also used at the moment of acting)."""
        now = self._clock() if now is None else now
        # Say what the device thinks the time is: a wrong device clock is the usual cause.
        clock = f"by this device's clock ({_stamp(now)}, tolerance {self.skew:g} s)"
        if now > req.expires_at:
            return (ErrorCode.EXPIRED,
                    f"request expired {now - req.expires_at:.1f} s ago {clock}")
        if req.issued_at > now + self.skew:
            return (ErrorCode.EXPIRED,
                    f"request is dated {req.issued_at - now:.0f} s in the future {clock}")
        if req.issued_at < now - self.skew:
            return (ErrorCode.EXPIRED,
                    f"request was issued {now - req.issued_at:.0f} s ago {clock}")
        return None

    def _prune(self, now: float) -> None:
        if self._seen:
            for rid in [r for r, until in self._seen.items() if until < now]:
                del self._seen[rid]

    # ------------------------------------------------------------------ persistence

    def _load(self, path: Path) -> None:
        """Read the cache file; anything wrong with it is a warning, never a crash (the
        protection then falls back to the short request lifetime)."""
        try:
            if path.stat().st_size > _MAX_FILE:
                raise ValueError(f"larger than {_MAX_FILE} bytes")
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict) or data.get("v") != _FILE_VERSION:
                raise ValueError("not a replay cache of this version")
            seen = data.get("seen")
            if not isinstance(seen, dict):
                raise ValueError("no 'seen' object")
            now = self._clock()
            for rid, until in seen.items():
                if (isinstance(rid, str) and isinstance(until, (int, float))
                        and not isinstance(until, bool) and until >= now):
                    self._seen[rid] = float(until)
        except FileNotFoundError:
            return
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("replay cache %s is unreadable (%s); starting with an empty one",
                        path, exc)
            self._seen.clear()
            return
        # keep the newest entries if the file held more than we keep in memory
        if len(self._seen) > self._max:
            keep = sorted(self._seen.items(), key=lambda kv: kv[1])[-self._max:]
            self._seen = dict(keep)
        log.debug("replay cache: %d live request id(s) loaded from %s", len(self._seen), path)

    def _save(self, path: Path) -> bool:
        data = json.dumps({"v": _FILE_VERSION, "seen": self._seen},
                          separators=(",", ":")).encode()
        try:
            atomic_write(path, data, 0o600)
        except OSError as exc:
            log.error("cannot write the replay cache %s: %s", path,
                      exc.strerror or os.strerror(exc.errno or 0))
            return False
        return True

    def __len__(self) -> int:
        return len(self._seen)
