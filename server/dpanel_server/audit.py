"""The audit trail: an append-only, hash-chained table of who ran what, where, with what result.

Two sources write to it:

* **devices**, over MQTT (``dpanel/v1/dev/<id>/audit``): what their SSH server served
  (exec, shell, sftp, forward), with the operator from the SSH certificate or from the
  manager's ``DPANEL_OPERATOR``, the exit status and the bytes each way. A record is
  trusted only for the device whose topic it came on (the broker's ACL lets a device
  write only its own topic); a record naming another device is attributed to the real
  sender and says so in ``note``;
* **the API**: every exec, tunnel open/close, enrol, revoke and delete call (user,
  device, action, result).

**Reconcile**: the API passes a correlation id to the device in the exec's environment
(``DPANEL_AUDIT_ID``); the device's record carries it back, so :meth:`AuditLog.query`
shows one logical action with both views (the device's record, with the API's as ``api``).

**Chain**: row ``seq`` stores ``prev_hash`` (the previous row's ``hash``, 64 zeros for
the first) and ``hash = SHA-256("dpanel-audit-v1" NUL seq NUL prev_hash NUL body)``
where ``body`` is the record's canonical JSON (sorted keys, no spaces). The filter
columns beside it are copies, checked against the body. The head (last seq and hash) is
also kept in ``meta``, so that cutting rows off the end shows too. :meth:`verify_chain`
names the first row that was edited, deleted or inserted. (Whoever can rewrite the whole
file can rebuild a consistent chain; pin the head that ``dpanel audit verify`` prints
somewhere else to catch that too.)

Recordings (asciicast v2, from the device in parts) are staged in ``audit_recordings``
(keyed by device, session id and part, so a resent part is kept once and parts may come
in any order) and, once the last part is in and none is missing, written as one file
``STATE_DIR/recordings/<device>/<session>.cast`` (0600, atomically: a reader never sees
half a file) and their staged rows deleted. The device's record names that file
(``recording_file``, relative to the state directory) and carries the SHA-256 the device
computed (``recording_sha256``), both inside the chained body: an edited file shows at
``dpanel audit play`` and ``audit verify``. A recording still staged (or one from before
the files, or when the file cannot be written) is read from the table as before.

Plain SQL (``?`` placeholders, no SQLite-only syntax) so that it also runs on PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dpanel_proto import wire
from dpanel_proto.ratelog import Budget, RateLimitedLog
from dpanel_proto.util import atomic_write

from .db import IntegrityError
from .registry import Registry

__all__ = ["GENESIS", "AuditLog", "ChainError", "parse_since"]

log = logging.getLogger("dpanel.audit")
_rl = RateLimitedLog(log)

GENESIS = "0" * 64
#: A recording may have at most this many parts (x 16 KiB = 64 MiB).
MAX_RECORDING_PARTS = 4096
#: Audit messages one device may send: a flood is dropped (and logged), not stored.
_DEVICE_BURST, _DEVICE_WINDOW = 300, 10.0
#: What the API records of a command line, at most.
_API_COMMAND = wire.MAX_AUDIT_COMMAND

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS audit_log (
        seq BIGINT PRIMARY KEY,
        origin VARCHAR(8) NOT NULL,
        rid VARCHAR(64) NOT NULL,
        device VARCHAR(63) NOT NULL,
        user_name VARCHAR(64) NOT NULL,
        kind VARCHAR(16) NOT NULL,
        started DOUBLE PRECISION NOT NULL,
        correlation VARCHAR(64) NOT NULL DEFAULT '',
        body TEXT NOT NULL,
        prev_hash VARCHAR(64) NOT NULL,
        hash VARCHAR(64) NOT NULL,
        UNIQUE (origin, device, rid)
    )""",
    "CREATE INDEX IF NOT EXISTS audit_log_device ON audit_log (device, seq)",
    "CREATE INDEX IF NOT EXISTS audit_log_corr ON audit_log (correlation)",
    """CREATE TABLE IF NOT EXISTS audit_recordings (
        device VARCHAR(63) NOT NULL,
        rid VARCHAR(64) NOT NULL,
        seq INTEGER NOT NULL,
        data TEXT NOT NULL,
        last_part INTEGER NOT NULL,
        PRIMARY KEY (device, rid, seq)
    )""",
]

#: recordings under the state directory; session ids are what wire accepts
_REC_DIR = "recordings"
#: proxy streams remembered for attributing device records (oldest forgotten first)
_MAX_STREAMS = 4096
_RID = re.compile(r"[0-9a-f]{16,64}")

#: The columns copied out of the body (for filtering), and the body key of each.
_COPIED = (("origin", "origin"), ("rid", "rid"), ("device", "device"),
           ("user_name", "user"), ("kind", "kind"), ("started", "started"),
           ("correlation", "correlation"))


class ChainError(Exception):
    """The chain is broken; the message names the first bad row."""


def canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def row_hash(seq: int, prev_hash: str, body: str) -> str:
    h = hashlib.sha256()
    h.update(b"dpanel-audit-v1\0" + str(seq).encode() + b"\0" + prev_hash.encode() + b"\0")
    h.update(body.encode())
    return h.hexdigest()


def parse_since(text: str, now: Optional[float] = None) -> float:
    """``90s``, ``15m``, ``1h``, ``2d`` ago, or an ISO 8601 time -> epoch seconds."""
    import datetime as dt

    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    t = text.strip()
    if t and t[-1] in units and t[:-1].replace(".", "", 1).isdigit():
        return now - float(t[:-1]) * units[t[-1]]
    try:
        when = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"since: {text!r} is neither a duration (90s, 15m, 1h, 2d) nor an "
                         "ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


@dataclass(frozen=True)
class Row:
    seq: int
    body: dict[str, Any]

    def view(self) -> dict[str, Any]:
        return dict(self.body, id=self.seq)


class AuditLog:
    """The audit table on the registry's database (the same transactions and lock)."""

    def __init__(self, registry: Registry, state_dir: Optional[Path] = None) -> None:
        self._reg = registry
        self._budgets: dict[str, Budget] = {}
        #: where recordings/<device>/<session>.cast go (None: kept in the table only)
        self.state_dir = state_dir
        #: (device, our "host:port" toward its tunnel port) -> the operator's address as
        #: the API saw it, for the proxy streams we bridged (see :meth:`note_stream`)
        self._streams: OrderedDict[tuple[str, str], str] = OrderedDict()
        registry.db.ensure("audit", _SCHEMA)

    def note_stream(self, device: str, tunnel_side: str, client: str) -> None:
        """A proxy stream (``GET /v1/devices/{d}/proxy``) from ``client`` reaches the
        device's tunnel port from our ``tunnel_side`` address. The device's SSH server
        reports that address as ``source = "tunnel HOST:PORT"`` for what a certificate
        holder ran through it; :meth:`ingest` then names the operator's own address,
        which only the manager saw (the device never can, and cannot forge it: a source
        that matches no stream of its own device stays as the device reported it)."""
        key = (device, tunnel_side)
        self._streams.pop(key, None)
        self._streams[key] = client
        while len(self._streams) > _MAX_STREAMS:
            self._streams.popitem(last=False)

    def _source(self, device: str, reported: str) -> str:
        if reported.startswith("tunnel "):
            client = self._streams.get((device, reported[7:]))
            if client is not None:
                return f"{client} (proxy, {reported})"
        return reported

    def recording_path(self, device: str, rid: str) -> Optional[Path]:
        """The .cast file of a session (both names are validated before, and again here:
        they become a path)."""
        if self.state_dir is None or not (wire.DEVICE_ID_RE.fullmatch(device)
                                          and _RID.fullmatch(rid)):
            return None
        return self.state_dir / _REC_DIR / device / f"{rid}.cast"

    # ------------------------------------------------------------------ writing
    def append(self, body: dict[str, Any]) -> Optional[int]:
        """Append one record (``origin``, ``rid``, ``device`` required); returns its seq,
        or None if that record is already there (a device's resend). Two writers that
        raced for the same seq (PostgreSQL, several managers): the loser tries again."""
        for attempt in range(5):
            try:
                return self._append(body)
            except IntegrityError:
                if attempt == 4:
                    raise
        return None  # pragma: no cover

    def _append(self, body: dict[str, Any]) -> Optional[int]:
        with self._reg.db.tx() as cur:
            if cur.execute("SELECT seq FROM audit_log WHERE origin = ? AND device = ? AND "
                           "rid = ?", (body["origin"], body["device"], body["rid"])
                           ).fetchone():
                return None
            head = cur.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
                               ).fetchone()
            seq, prev = (int(head[0]) + 1, str(head[1])) if head else (1, GENESIS)
            text = canonical(body)
            digest = row_hash(seq, prev, text)
            cur.execute("INSERT INTO audit_log (seq, origin, rid, device, user_name, kind, "
                        "started, correlation, body, prev_hash, hash) VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (seq, *(body[k] for _, k in _COPIED), text, prev, digest))
            head_value = f"{seq}:{digest}"
            if cur.execute("UPDATE meta SET value = ? WHERE name = 'audit_head'",
                           (head_value,)).rowcount == 0:
                cur.execute("INSERT INTO meta (name, value) VALUES ('audit_head', ?)",
                            (head_value,))
        return seq

    def api_record(self, user: str, device: str, kind: str, command: str, result: str, *,
                   source: str = "", exit: Optional[int] = None,
                   correlation: str = "") -> Optional[int]:
        """The API's own record of a call (exec, tunnel-open, tunnel-close, enrol,
        revoke, delete)."""
        now = time.time()
        rid = correlation or secrets.token_hex(16)
        return self.append({
            "origin": "api", "rid": rid, "device": wire.printable(device[:63]),
            "user": wire.printable(user[:64]), "via": "api",
            "kind": kind, "command": wire.printable(command[:_API_COMMAND]),
            "exit": exit, "signal": "", "result": wire.printable(result[:512]),
            "source": wire.printable(source[:256]), "started": now, "ended": now,
            "bytes_in": 0, "bytes_out": 0, "correlation": rid, "recording": "", "note": "",
        })

    def admit(self, device: str) -> bool:
        """Whether one more message from ``device`` fits its budget (call it on the event
        loop, before queueing any work: a flooding device costs nothing but this)."""
        budget = self._budgets.setdefault(device, Budget(_DEVICE_BURST, _DEVICE_WINDOW))
        if budget.take():
            return True
        _rl.warning(f"audit flood {device}", "device %s sends audit messages faster than "
                    "%d per %g s; dropped", device, _DEVICE_BURST, _DEVICE_WINDOW)
        return False

    def ingest(self, device: str, payload: bytes) -> None:
        """One message from ``device``'s audit topic. Raises DecodeError when malformed."""
        msg = wire.decode_audit(payload)
        if isinstance(msg, wire.RecordingChunk):
            self._chunk(device, msg)
            return
        note = msg.note
        if msg.device != device:
            # the topic is the truth (the broker's ACL): never another device's record
            _rl.warning(f"audit forged {device}", "device %s sent an audit record claiming "
                        "to be from %s; kept as its own", device, msg.device)
            note = (f"claimed device {msg.device}; " + note)[:256]
        extra: dict[str, Any] = {}
        path = self.recording_path(device, msg.id) if msg.recording else None
        if path is not None and self.state_dir is not None:
            extra["recording_file"] = str(path.relative_to(self.state_dir))
        self.append({
            **extra,
            "origin": "device", "rid": msg.id, "device": device, "user": msg.operator,
            "via": msg.via, "kind": msg.kind, "command": msg.command, "exit": msg.exit,
            "signal": msg.signal, "result": "", "source": self._source(device, msg.source),
            "started": msg.started, "ended": msg.ended, "bytes_in": msg.bytes_in,
            "bytes_out": msg.bytes_out, "correlation": msg.correlation,
            "recording": msg.recording, "note": note,
            "recording_sha256": msg.recording_sha256,
        })

    def _chunk(self, device: str, chunk: wire.RecordingChunk) -> None:
        if chunk.seq >= MAX_RECORDING_PARTS:
            _rl.warning(f"audit rec {device}", "device %s: recording %s is over %d parts; "
                        "the rest is dropped", device, chunk.id, MAX_RECORDING_PARTS)
            return
        done = self.recording_path(device, chunk.id)
        if done is not None and done.exists():
            return  # a part resent after its recording was complete and written
        try:
            with self._reg.db.tx() as cur:
                if cur.execute("SELECT 1 FROM audit_recordings WHERE device = ? AND rid = ? "
                               "AND seq = ?", (device, chunk.id, chunk.seq)).fetchone():
                    return
                cur.execute("INSERT INTO audit_recordings (device, rid, seq, data, last_part) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (device, chunk.id, chunk.seq, chunk.data, 1 if chunk.last else 0))
                parts = cur.execute("SELECT seq, data, last_part FROM audit_recordings WHERE "
                                    "device = ? AND rid = ? ORDER BY seq",
                                    (device, chunk.id)).fetchall()
        except IntegrityError:
            # manager replicas without shared subscriptions all receive every chunk: the
            # one that lost the race finds it stored (the primary key), which is fine
            return
        if not parts or not int(parts[-1][2]) or [int(p[0]) for p in parts] != list(
                range(len(parts))):
            return  # not complete yet: the last part, or one before it, is still missing
        self._to_file(device, chunk.id, b"".join(base64.b64decode(p[1]) for p in parts))

    def _to_file(self, device: str, rid: str, data: bytes) -> None:
        """Write a complete recording to its file, then drop its staged parts (a crash
        in between leaves both: the file wins, the parts are removed next time)."""
        path = self.recording_path(device, rid)
        if path is None:
            return
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.exists():
                return  # a duplicate last part: the file is written once, never replaced
            atomic_write(path, data, 0o600)
        except OSError as exc:
            # the parts stay in the table and are served from there: nothing is lost
            _rl.error(f"audit file {device}", "recording %s of %s: cannot write %s: %s; "
                      "kept in the registry", rid, device, path, exc)
            return
        with self._reg.db.tx() as cur:
            cur.execute("DELETE FROM audit_recordings WHERE device = ? AND rid = ?",
                        (device, rid))

    # ------------------------------------------------------------------ reading
    def _rows(self, where: str = "", args: tuple[Any, ...] = (),
              limit: Optional[int] = None) -> list[Row]:
        sql = f"SELECT seq, body FROM audit_log{where} ORDER BY seq DESC"  # noqa: S608
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._reg.db.tx() as cur:
            rows = cur.execute(sql, args).fetchall()
        return [Row(int(r[0]), json.loads(r[1])) for r in reversed(rows)]

    def query(self, *, device: Optional[str] = None, user: Optional[str] = None,
              since: Optional[float] = None, limit: int = 1000,
              devices: Optional[set[str]] = None) -> list[dict[str, Any]]:
        """Records oldest first (the newest ``limit``), reconciled: a device record whose
        correlation id matches an API record gets that record as ``api``, and the API
        record is not listed on its own. ``devices`` limits to those (a scope)."""
        clauses: list[str] = []
        args: list[Any] = []
        if device is not None:
            clauses.append("device = ?")
            args.append(device)
        if since is not None:
            clauses.append("started >= ?")
            args.append(since)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._rows(where, tuple(args), limit=None)
        if devices is not None:
            rows = [r for r in rows if r.body.get("device") in devices]
        api_by_corr = {r.body["correlation"]: r for r in rows
                       if r.body.get("origin") == "api" and r.body.get("correlation")}
        linked: set[int] = set()
        out: list[dict[str, Any]] = []
        for r in rows:
            if r.body.get("origin") != "device":
                continue
            api = api_by_corr.get(r.body.get("correlation") or "")
            if api is not None and api.body.get("device") == r.body.get("device"):
                linked.add(api.seq)
        for r in rows:
            if r.seq in linked:
                continue
            view = r.view()
            if r.body.get("origin") == "device":
                api = api_by_corr.get(r.body.get("correlation") or "")
                if api is not None and api.seq in linked:
                    view["api"] = api.view()
                    if api.body.get("user") != view.get("user"):
                        view["note"] = (f"API caller {api.body.get('user')}; "
                                        + str(view.get("note") or ""))[:256]
            out.append(view)
        if user is not None:
            out = [v for v in out if v.get("user") == user
                   or (v.get("api") or {}).get("user") == user]
        return out[-limit:] if limit else out

    def get(self, seq: int) -> Optional[dict[str, Any]]:
        rows = self._rows(" WHERE seq = ?", (seq,))
        return rows[0].view() if rows else None

    def recording(self, seq: int) -> Optional[bytes]:
        """The asciicast text of the shell session of row ``seq``, as far as received."""
        found = self.checked_recording(seq)
        return found[0] if found else None

    def checked_recording(self, seq: int) -> Optional[tuple[bytes, str]]:
        """(asciicast, state): ``verified`` when it matches the SHA-256 in the chained
        record, ``mismatch`` when it does not, ``unverified`` when the record has none
        (not in yet, or the recording failed)."""
        row = self.get(seq)
        if row is None or row.get("origin") != "device":
            return None
        data = self._joined(row)
        if data is None:
            return None
        want = row.get("recording_sha256") or ""
        if not want:
            return data, "unverified"
        return data, "verified" if hashlib.sha256(data).hexdigest() == want else "mismatch"

    def _joined(self, row: dict[str, Any]) -> Optional[bytes]:
        path = self.recording_path(str(row["device"]), str(row["rid"]))
        if path is not None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                pass  # still staged, or recorded before recordings were files
            except OSError as exc:
                _rl.error("audit file read", "recording %s: cannot read %s: %s",
                          row["rid"], path, exc)
        with self._reg.db.tx() as cur:
            parts = cur.execute("SELECT data FROM audit_recordings WHERE device = ? AND "
                                "rid = ? ORDER BY seq", (row["device"], row["rid"])).fetchall()
        if not parts:
            return None
        return b"".join(base64.b64decode(p[0]) for p in parts)

    # ------------------------------------------------------------------ verifying
    def _check_file(self, seq: int, body: dict[str, Any]) -> None:
        """A recording file that is there must match the SHA-256 in its chained record
        (one not there yet is not an error: its last part may still be on the way)."""
        want = body.get("recording_sha256") or ""
        name = body.get("recording_file") or ""
        if not want or not name or self.state_dir is None:
            return
        path = self.recording_path(str(body.get("device")), str(body.get("rid")))
        if path is None or str(path.relative_to(self.state_dir)) != name:
            raise ChainError(f"row {seq}: recording_file {name!r} is not where its "
                             "session's recording goes")
        h = hashlib.sha256()
        try:
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ChainError(f"row {seq}: cannot read its recording {path}: "
                             f"{exc.strerror}") from None
        if h.hexdigest() != want:
            raise ChainError(f"row {seq}: its recording {path} was edited (its SHA-256 "
                             "does not match the chained record)")

    def verify_chain(self) -> dict[str, Any]:
        """Walk the whole chain; raises :class:`ChainError` naming the first bad row."""
        with self._reg.db.tx() as cur:
            rows = cur.execute("SELECT seq, origin, rid, device, user_name, kind, started, "
                               "correlation, body, prev_hash, hash FROM audit_log "
                               "ORDER BY seq").fetchall()
            head = cur.execute("SELECT value FROM meta WHERE name = 'audit_head'").fetchone()
        prev, expect = GENESIS, 1
        for r in rows:
            seq = int(r[0])
            if seq != expect:
                raise ChainError(f"row {expect} is missing (deleted): the chain goes from "
                                 f"row {expect - 1} to row {seq}")
            if r[9] != prev:
                raise ChainError(f"row {seq}: prev_hash does not match row {seq - 1}'s hash "
                                 "(a row was inserted, deleted or rewritten)")
            if row_hash(seq, prev, r[8]) != r[10]:
                raise ChainError(f"row {seq} was edited: its hash does not match its record")
            try:
                body = json.loads(r[8])
            except ValueError:
                raise ChainError(f"row {seq}: the record is not JSON") from None
            for i, (_col, key) in enumerate(_COPIED, start=1):
                if body.get(key) != r[i]:
                    raise ChainError(f"row {seq} was edited: column {_col} does not match "
                                     "its record")
            self._check_file(seq, body)
            prev, expect = r[10], seq + 1
        last = expect - 1
        if head is not None:
            hseq, _, hhash = str(head[0]).partition(":")
            if int(hseq) != last or hhash != (prev if last else GENESIS):
                raise ChainError(f"the chain ends at row {last}, but its head says row "
                                 f"{hseq}: rows were deleted from the end")
        elif rows:
            raise ChainError("the chain's head record is missing")
        return {"ok": True, "rows": last, "head": prev}
