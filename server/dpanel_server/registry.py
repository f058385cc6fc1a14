"""Device registry: SQLite by default, in plain SQL that also runs on PostgreSQL.

Secrets are never stored: ``secret_hash`` is SHA-256 of the 256-bit random device secret
(a slow KDF adds nothing against a secret with that much entropy, and the tunnel checks
it on every login), and ``broker_hash`` is the Mosquitto ``$7$`` hash the broker's
password file is regenerated from. ``meta.revision`` is bumped on every change, so other
processes (the tunnel server) notice revocations by polling one row.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from dpanel_proto.wire import DecodeError, validate_device_id

from .broker import mosquitto_hash
from .db import Cursor, Database, IntegrityError, _Tx
from .errors import DeviceExists, RegistryError, UnknownDevice

__all__ = ["RESERVED_NAMES", "Device", "Registry", "hash_secret"]

#: Broker usernames that a device may never take.
RESERVED_NAMES = frozenset({"dpanel-manager", "admin", "root", "manager"})

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS devices (
        id VARCHAR(63) PRIMARY KEY,
        secret_hash VARCHAR(64) NOT NULL,
        broker_hash VARCHAR(200) NOT NULL,
        host_key TEXT,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION,
        last_seen DOUBLE PRECISION
    )""",
    "CREATE TABLE IF NOT EXISTS meta (name VARCHAR(63) PRIMARY KEY, value TEXT NOT NULL)",
    # Tombstones of deleted devices (a name may be deleted, re-enrolled and deleted again,
    # so no key): what the device was and when, until the audit history exists.
    """CREATE TABLE IF NOT EXISTS deleted_devices (
        id VARCHAR(63) NOT NULL,
        host_key TEXT,
        labels TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION,
        last_seen DOUBLE PRECISION,
        deleted_at DOUBLE PRECISION NOT NULL
    )""",
]

#: Numbered schema steps (:meth:`.db.Database.migrate`); step 1 is the schema above as it
#: was before versioning (so an old file simply records version 1). Append, never edit.
MIGRATIONS: list[list[str]] = [
    [],
    # 2: the lookups done at every device login and status (host-key owner, revoked set)
    ["CREATE INDEX IF NOT EXISTS devices_host_key ON devices (host_key)",
     "CREATE INDEX IF NOT EXISTS devices_revoked_at ON devices (revoked_at)",
     "CREATE INDEX IF NOT EXISTS deleted_devices_id ON deleted_devices (id)"],
]


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Device:
    id: str
    created_at: float
    revoked_at: Optional[float] = None
    host_key: Optional[str] = None
    last_seen: Optional[float] = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "created_at": self.created_at, "revoked": self.revoked,
            "revoked_at": self.revoked_at, "host_key": self.host_key,
            "last_seen": self.last_seen, "labels": self.labels,
        }


def _exists(device: str, revoked: bool) -> DeviceExists:
    return DeviceExists(
        f"device {device!r} was revoked; free its name with: dpanel device "
        f"delete {device}" if revoked else
        f"device {device!r} already exists; pick another name (or retire it: "
        f"dpanel device delete --force {device})")


class Registry:
    """Thread-safe registry on the database a URL names (:mod:`.db`): a SQLite file in
    WAL mode (so the tunnel process can read while the manager writes) by default, or
    PostgreSQL. A bare path means that SQLite file, as before."""

    def __init__(self, url: Union[str, Path]) -> None:
        self.db = Database(url)
        self.path = self.db.path
        # _SCHEMA (CREATE ... IF NOT EXISTS) runs at every open, so tables others add
        # there appear in existing databases too; MIGRATIONS are the numbered steps that
        # change what exists, each applied once (schema_version), keeping the data.
        self.db.ensure("registry", _SCHEMA, MIGRATIONS)
        with self._tx() as cur:
            cur.execute("INSERT INTO meta (name, value) VALUES ('revision', '0') "
                        "ON CONFLICT DO NOTHING")

    def close(self) -> None:
        self.db.close()

    # -- plumbing
    def _tx(self) -> _Tx:
        return self.db.tx()

    def _bump(self, cur: Cursor) -> None:
        cur.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) "
                    "WHERE name = 'revision'")

    def revision(self) -> int:
        with self._tx() as cur:
            row = cur.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])

    @staticmethod
    def _row(row: tuple[Any, ...]) -> Device:
        return Device(id=row[0], created_at=row[1], revoked_at=row[2], host_key=row[3],
                      last_seen=row[4], labels=json.loads(row[5] or "{}"))

    _COLS = "id, created_at, revoked_at, host_key, last_seen, labels"

    # -- devices
    def add(self, device: str, labels: Optional[dict[str, str]] = None) -> tuple[Device, str]:
        """Enrol a device; returns it and its new secret (shown once, never stored)."""
        try:
            validate_device_id(device, "device name")
        except DecodeError as exc:
            raise RegistryError(str(exc)) from None
        if device in RESERVED_NAMES:
            raise RegistryError(f"device name: {device!r} is reserved")
        secret = secrets.token_urlsafe(32)
        now = time.time()
        try:
            with self._tx() as cur:
                if row := cur.execute("SELECT revoked_at FROM devices WHERE id = ?",
                                      (device,)).fetchone():
                    raise _exists(device, row[0] is not None)
                cur.execute(
                    "INSERT INTO devices (id, secret_hash, broker_hash, labels, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (device, hash_secret(secret), mosquitto_hash(secret),
                     json.dumps(labels or {}), now),
                )
                self._bump(cur)
        except IntegrityError:
            # another manager (a replica on the same PostgreSQL) enrolled it meanwhile
            raise _exists(device, False) from None
        return Device(id=device, created_at=now, labels=labels or {}), secret

    def get(self, device: str) -> Device:
        with self._tx() as cur:
            row = cur.execute(f"SELECT {self._COLS} FROM devices WHERE id = ?",  # noqa: S608
                              (device,)).fetchone()
        if row is None:
            raise UnknownDevice(f"unknown device {device!r}")
        return self._row(row)

    def devices(self, include_revoked: bool = True) -> list[Device]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        with self._tx() as cur:
            rows = cur.execute(f"SELECT {self._COLS} FROM devices{where} ORDER BY id").fetchall()  # noqa: S608
        return [self._row(r) for r in rows]

    def revoke(self, device: str) -> Device:
        self.get(device)
        with self._tx() as cur:
            cur.execute("UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                        (time.time(), device))
            self._bump(cur)
        return self.get(device)

    def delete(self, device: str) -> dict[str, Any]:
        """Remove a revoked device, keeping a tombstone in ``deleted_devices``; its name
        can then be enrolled again (with a new secret and a new host key pin)."""
        now = time.time()
        with self._tx() as cur:
            row = cur.execute(f"SELECT {self._COLS} FROM devices WHERE id = ?",  # noqa: S608
                              (device,)).fetchone()
            if row is None:
                raise UnknownDevice(f"unknown device {device!r}")
            if row[2] is None:
                raise RegistryError(f"device {device} is not revoked; revoke it first")
            cur.execute("INSERT INTO deleted_devices (id, host_key, labels, created_at, "
                        "revoked_at, last_seen, deleted_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (row[0], row[3], row[5], row[1], row[2], row[4], now))
            cur.execute("DELETE FROM devices WHERE id = ?", (device,))
            self._bump(cur)
        return dict(self._row(row).as_dict(), deleted_at=now)

    def deleted(self) -> list[dict[str, Any]]:
        """Every tombstone, oldest deletion first."""
        with self._tx() as cur:
            rows = cur.execute("SELECT id, host_key, labels, created_at, revoked_at, "
                               "last_seen, deleted_at FROM deleted_devices "
                               "ORDER BY deleted_at").fetchall()
        return [{"id": r[0], "host_key": r[1], "labels": json.loads(r[2] or "{}"),
                 "created_at": r[3], "revoked_at": r[4], "last_seen": r[5],
                 "deleted_at": r[6]} for r in rows]

    def verify(self, device: str, secret: str) -> bool:
        """True if ``secret`` is the current secret of a non-revoked device."""
        with self._tx() as cur:
            row = cur.execute("SELECT secret_hash, revoked_at FROM devices WHERE id = ?",
                              (device,)).fetchone()
        if row is None or row[1] is not None:
            # still hash, so timing does not tell "unknown" from "wrong secret"
            hmac.compare_digest(hash_secret(secret), "0" * 64)
            return False
        return hmac.compare_digest(hash_secret(secret), row[0])

    def revoked_ids(self) -> set[str]:
        with self._tx() as cur:
            rows = cur.execute("SELECT id FROM devices WHERE revoked_at IS NOT NULL").fetchall()
        return {r[0] for r in rows}

    def broker_entries(self) -> list[tuple[str, str]]:
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT id, broker_hash FROM devices WHERE revoked_at IS NULL").fetchall()
        return [(r[0], r[1]) for r in rows]

    def pin_host_key(self, device: str, host_key: str) -> Optional[str]:
        """Pin ``host_key`` if none is pinned. Returns the pinned key (which may differ).

        A key already pinned by *another* device is never pinned: every device generates
        its own, so a shared key means a cloned card or a device impersonating another.
        """
        with self._tx() as cur:
            owner = cur.execute("SELECT id FROM devices WHERE host_key = ? AND id != ?",
                                (host_key, device)).fetchone()
            if owner is not None:
                row = cur.execute("SELECT host_key FROM devices WHERE id = ?",
                                  (device,)).fetchone()
                return None if row is None or row[0] is None else str(row[0])
            cur.execute("UPDATE devices SET host_key = ? WHERE id = ? AND host_key IS NULL",
                        (host_key, device))
            row = cur.execute("SELECT host_key FROM devices WHERE id = ?", (device,)).fetchone()
        return None if row is None else str(row[0]) if row[0] is not None else None

    def reset_host_key(self, device: str) -> None:
        """Forget the pinned key (after an operator re-imaged the device on purpose)."""
        self.get(device)
        with self._tx() as cur:
            cur.execute("UPDATE devices SET host_key = NULL WHERE id = ?", (device,))

    def touch(self, device: str, when: float) -> None:
        with self._tx() as cur:
            cur.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (when, device))
