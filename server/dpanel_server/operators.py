"""Operator accounts: who may call the API, with which role and scope, by a hashed token.

A token is ``dpo1.<name>.<secret>``: the name finds the row, the secret (256 random bits,
urlsafe base64) is checked against its SHA-256 in constant time. A slow KDF adds nothing
against a secret with that much entropy, and the check runs on every request. Secrets are
never stored or logged; a revoked account keeps its row (its name is never reused, so that
audit records keep meaning one person) and its token fails at the next request.

The table lives in the registry's database (db.py), in plain SQL for SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, cast

from dpanel_proto.codes import ErrorCode

from .authz import ROLES, Principal, Role, parse_selector
from .errors import DPanelError, RegistryError
from .registry import Registry

__all__ = ["TOKEN_PREFIX", "Operator", "Operators", "UnknownUser", "UserExists",
           "parse_operator_token", "validate_name"]

TOKEN_PREFIX = "dpo1."

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS operators (
        name VARCHAR(63) PRIMARY KEY,
        role VARCHAR(16) NOT NULL,
        scope TEXT NOT NULL DEFAULT '[]',
        token_hash VARCHAR(64) NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    )""",
]

#: lowercase letters, digits, '-' and '_' (no '.', which separates the token's parts)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
#: the built-in admin token's principal is called this; no account may take the name
RESERVED = frozenset({"admin"})
#: selectors one account may have (each widens the scope)
MAX_SELECTORS = 64
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{43}\Z")  # token_urlsafe(32)


class UnknownUser(RegistryError):
    code = ErrorCode.UNKNOWN_USER


class UserExists(RegistryError):
    code = ErrorCode.USER_EXISTS


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise DPanelError(f"name: {str(name)[:40]!r} is not an operator name (lowercase "
                          "letters, digits, '-' and '_', 1-63 characters)", ErrorCode.INVALID)
    if name in RESERVED:
        raise DPanelError(f"name: {name!r} is reserved for the built-in admin token",
                          ErrorCode.INVALID)
    return name


def parse_operator_token(token: str) -> Optional[tuple[str, str]]:
    """(name, secret) of a well-formed ``dpo1.`` token, else None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    name, sep, secret = token[len(TOKEN_PREFIX):].partition(".")
    if not sep or not _NAME_RE.match(name) or not _SECRET_RE.match(secret):
        return None
    return name, secret


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


#: compared against when the name is unknown, so that a miss costs what a hit does
_DUMMY_HASH = _hash("no such operator")


@dataclass(frozen=True)
class Operator:
    name: str
    role: Role
    scope: tuple[str, ...]
    created_at: float
    revoked_at: Optional[float] = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def principal(self) -> Principal:
        return Principal(self.name, self.role, self.scope)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "scope": list(self.scope),
                "created_at": self.created_at, "revoked_at": self.revoked_at,
                "revoked": self.revoked}


class Operators:
    """The operator table, on the registry's connection (and its lock)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        # under the schema lock: manager replicas may open one PostgreSQL at once
        registry.db.ensure("operators", SCHEMA)

    @staticmethod
    def _row(row: Sequence[Any]) -> Operator:
        # an unknown role (an edited row) never widens anything
        role = cast(Role, row[1] if row[1] in ROLES else "viewer")
        return Operator(row[0], role, tuple(json.loads(row[2])), row[3], row[4])

    def add(self, name: str, role: str, scope: Sequence[str] = ()) -> tuple[Operator, str]:
        """Create an account; returns it and its token (shown once, never stored)."""
        validate_name(name)
        if role not in ROLES:
            raise DPanelError(f"role: {role!r} is not one of {', '.join(ROLES)}",
                              ErrorCode.INVALID)
        sels = tuple(dict.fromkeys(scope))
        if len(sels) > MAX_SELECTORS:
            raise DPanelError(f"scope: at most {MAX_SELECTORS} selectors", ErrorCode.INVALID)
        for sel in sels:
            parse_selector(sel)
            if len(sel) > 320 or not sel.isprintable():  # it is shown on terminals
                raise DPanelError(f"scope: {sel[:40]!r} must be at most 320 printable "
                                  "characters", ErrorCode.INVALID)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self._registry._tx() as cur:
            old = cur.execute("SELECT revoked_at FROM operators WHERE name = ?",
                              (name,)).fetchone()
            if old is not None:
                why = " (revoked: names are never reused)" if old[0] is not None else ""
                raise UserExists(f"operator {name} exists{why}")
            cur.execute("INSERT INTO operators (name, role, scope, token_hash, created_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (name, role, json.dumps(list(sels)), _hash(secret), now))
        op = Operator(name, role, sels, now)
        return op, f"{TOKEN_PREFIX}{name}.{secret}"

    def get(self, name: str) -> Operator:
        with self._registry._tx() as cur:
            row = cur.execute("SELECT name, role, scope, created_at, revoked_at FROM operators "
                              "WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownUser(f"no operator named {name!r}")
        return self._row(row)

    def list(self) -> list[Operator]:
        with self._registry._tx() as cur:
            rows = cur.execute("SELECT name, role, scope, created_at, revoked_at FROM operators "
                               "ORDER BY name").fetchall()
        return [self._row(r) for r in rows]

    def revoke(self, name: str) -> Operator:
        with self._registry._tx() as cur:
            cur.execute("UPDATE operators SET revoked_at = ? WHERE name = ? AND "
                        "revoked_at IS NULL", (time.time(), name))
        return self.get(name)

    def authenticate(self, token: str) -> Optional[Principal]:
        """The principal a ``dpo1.`` token stands for, or None (unknown, wrong, revoked)."""
        parsed = parse_operator_token(token)
        if parsed is None:
            return None
        name, secret = parsed
        with self._registry._tx() as cur:
            row = cur.execute("SELECT name, role, scope, created_at, revoked_at, token_hash "
                              "FROM operators WHERE name = ?", (name,)).fetchone()
        ok = hmac.compare_digest(_hash(secret), row[5] if row is not None else _DUMMY_HASH)
        if row is None or not ok:
            return None
        op = self._row(row[:5])
        return None if op.revoked else op.principal
