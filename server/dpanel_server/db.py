"""The one database layer: SQLite or PostgreSQL chosen by URL, behind one small API.

Every registry module (devices, operators, audit, ...) writes portable SQL with ``?``
placeholders and runs it through :class:`Database`; this module alone knows the engine:

* ``sqlite:///PATH`` (or a bare path): one file in WAL mode, so the tunnel process reads
  while the manager writes; ``BEGIN IMMEDIATE`` transactions.
* ``postgresql://...`` (psycopg 3, imported only then): ``?`` becomes ``%s`` (and a
  literal ``%`` is doubled), ``INTEGER PRIMARY KEY AUTOINCREMENT`` becomes ``BIGSERIAL
  PRIMARY KEY``; a connection lost (PostgreSQL restarted) is re-established on the next
  transaction, so a process outlives a database restart.

Portable SQL, in short: ``?`` placeholders, ``ON CONFLICT DO NOTHING`` (not ``INSERT OR
IGNORE``), ``RETURNING id`` (not ``lastrowid``), ``DOUBLE PRECISION``/``TEXT``/
``VARCHAR(n)``/``INTEGER``/``BIGINT``, ``CREATE ... IF NOT EXISTS``.

Schemas are versioned per component in ``schema_version`` (:meth:`Database.migrate`):
numbered steps, each applied once, in one transaction with its version bump.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import threading
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Optional, Sequence, Union

from dpanel_proto.codes import ErrorCode

from .errors import ConfigError, RegistryError

__all__ = ["Cursor", "Database", "DatabaseError", "IntegrityError", "connect", "redact",
           "sqlite_url"]

Params = Sequence[Any]
_Errors = tuple[type[BaseException], ...]

#: How long a PostgreSQL connect may take before readiness (and the caller) hear of it.
CONNECT_TIMEOUT = 5
#: A statement that runs longer is cancelled (a stalled database must not hang the tunnel's
#: device logins forever); generous, since bulk work runs in one statement at most this long.
STATEMENT_TIMEOUT_MS = 30_000


class DatabaseError(RegistryError):
    """The database failed (unreachable, locked too long, broken schema): a 500, not the
    registry's 400 "refused the change"."""

    code = ErrorCode.INTERNAL


class IntegrityError(DatabaseError):
    """A constraint refused the write (a duplicate key, most often)."""

    code = ErrorCode.REGISTRY


def sqlite_url(path: Union[str, Path]) -> str:
    return f"sqlite://{Path(path).resolve()}"  # sqlite:///ABS/PATH: the path keeps its /


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urllib.parse.urlunsplit(parts._replace(
        netloc=f"{parts.username or ''}:***@{netloc[-1]}"))


def parse_url(url: str, what: str = "registry.url") -> tuple[str, str]:
    """(engine, target): ("sqlite", PATH) or ("postgresql", URL). Errors name ``what``."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") - 1:]
        if path in ("/", "") or path.endswith("/"):
            raise ConfigError(f"{what}: {url!r} names no file (sqlite:///ABSOLUTE/PATH.db)")
        return "sqlite", path
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    if "://" in url or ":" in url.split("/", 1)[0]:
        raise ConfigError(f"{what}: {redact(url)!r} is not sqlite:///PATH or postgresql://...")
    return "sqlite", url  # a bare path, as Registry(path) always took


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """``?`` -> ``%s`` outside quoted literals, ``%`` doubled (psycopg's own syntax), and
    the one DDL spelling that differs, so callers never know which engine runs."""
    out: list[str] = []
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
            out.append(ch)
        elif ch == "?" and not quoted:
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return re.sub(r"(?i)\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", "BIGSERIAL PRIMARY KEY",
                  "".join(out))


class Cursor:
    """What a transaction hands out: ``execute`` (chainable), ``fetchone``, ``fetchall``,
    ``rowcount``; the same whichever engine runs."""

    def __init__(self, db: Database, raw: Any) -> None:
        self._db, self._raw = db, raw

    def execute(self, sql: str, params: Params = ()) -> Cursor:
        self._db._run(self._raw, sql, params)
        return self

    def executemany(self, sql: str, rows: Sequence[Params]) -> Cursor:
        self._db._run(self._raw, sql, rows, many=True)
        return self

    def fetchone(self) -> Any:  # a tuple or None; Any as sqlite3's, for callers' ease
        row = self._raw.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._raw.fetchall()]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._raw.rowcount)


class Database:
    """One connection, serialised by a lock (the registry's load is small and short
    transactions; several processes share the database, not one process many threads)."""

    def __init__(self, url: Union[str, Path], *, what: str = "registry.url") -> None:
        self.url = str(url) if not isinstance(url, Path) else sqlite_url(url)
        self.engine, self._target = parse_url(self.url, what)
        self._lock = threading.RLock()
        self._conn: Any = None
        self._pg: Any = None  # the psycopg module, imported only for PostgreSQL
        self._ino: Optional[tuple[int, int]] = None
        if self.engine == "postgresql":
            import psycopg  # the server's only use of it; SQLite installs never import it
            self._pg = psycopg
        else:
            Path(self._target).parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._connect()

    @property
    def display(self) -> str:
        return redact(self.url)

    @property
    def path(self) -> Optional[Path]:
        """The SQLite file (None on PostgreSQL)."""
        return Path(self._target) if self.engine == "sqlite" else None

    # ------------------------------------------------------------------ connections
    def _connect(self) -> None:
        if self.engine == "sqlite":
            conn = sqlite3.connect(self._target, check_same_thread=False, timeout=30,
                                   isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            # WAL + NORMAL: a power cut loses at most the last commits, never consistency
            conn.execute("PRAGMA synchronous=NORMAL")
            st = os.stat(self._target)
            self._ino = (st.st_dev, st.st_ino)
            os.chmod(self._target, 0o600)
            self._conn = conn
            return
        try:
            self._conn = self._pg.connect(
                self._target, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="dpanel")
        except self._pg.Error as exc:
            self._conn = None
            raise DatabaseError(f"cannot reach the database {self.display}: "
                                f"{_one_line(exc)}") from None

    def _alive(self) -> bool:
        if self.engine == "sqlite":
            return self._conn is not None
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ statements
    def _run(self, raw: Any, sql: str, params: Any, many: bool = False) -> None:
        if self.engine == "postgresql":
            sql = pg_sql(sql)
        integrity: _Errors = (sqlite3.IntegrityError, *self._pg_errors("IntegrityError"))
        failed: _Errors = (sqlite3.Error, *self._pg_errors("Error"))
        try:
            if many:
                raw.executemany(sql, params)
            else:
                raw.execute(sql, tuple(params))
        except integrity as exc:
            raise IntegrityError(f"database: {_one_line(exc)}") from None
        except failed as exc:
            raise DatabaseError(f"database {self.display}: {_one_line(exc)}") from None

    def _pg_errors(self, name: str) -> _Errors:
        return (getattr(self._pg, name),) if self._pg is not None else ()

    def tx(self, readonly: bool = False) -> _Tx:
        """``with db.tx() as cur:`` one transaction (committed on success, rolled back on
        an exception); on SQLite it takes the write lock at once (BEGIN IMMEDIATE), so
        read-then-write steps cannot deadlock against another process. ``readonly``
        transactions take no write lock (a probe must not queue behind writers)."""
        return _Tx(self, readonly)

    def execute(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction; its rows (if any)."""
        with self.tx() as cur:
            cur.execute(sql, params)
            no_rows: _Errors = (sqlite3.Error, *self._pg_errors("ProgrammingError"))
            try:
                return cur.fetchall()
            except no_rows:
                return []  # a statement with no result set (psycopg says so)

    def ping(self) -> None:
        """Raise :class:`DatabaseError` unless the database answers now (readiness). For
        SQLite, the file at the path must still be the one open (a file removed or
        replaced under the manager would take every later write to a ghost)."""
        if self.engine == "sqlite":
            try:
                st = os.stat(self._target)
                with open(self._target, "rb") as f:
                    head = f.read(16)
            except OSError as exc:
                raise DatabaseError(f"database {self._target}: {exc.strerror}") from None
            if (st.st_dev, st.st_ino) != self._ino or (head and head != b"SQLite format 3\0"):
                raise DatabaseError(f"database {self._target}: the file was replaced")
        with self.tx(readonly=True) as cur:
            cur.execute("SELECT 1").fetchall()

    # ------------------------------------------------------------------ migrations
    def _schema_lock(self, cur: Cursor) -> None:
        if self.engine == "postgresql":
            # processes starting at once (manager, tunnel, replicas) must not race on
            # DDL: concurrent CREATE TABLE IF NOT EXISTS can fail on PostgreSQL
            cur.execute("SELECT pg_advisory_xact_lock(?)", (0x64_70_61_6E,))

    def ensure(self, component: str, schema: Sequence[str],
               steps: Sequence[Sequence[str]] = ()) -> int:
        """What a registry module calls at open: ``schema`` (CREATE ... IF NOT EXISTS,
        run every time, so tables added later appear in old databases too), then its
        numbered ``steps`` (:meth:`migrate`). Returns the schema version."""
        with self.tx() as cur:
            self._schema_lock(cur)
            for stmt in schema:
                cur.execute(stmt)
        return self.migrate(component, steps)

    def migrate(self, component: str, steps: Sequence[Sequence[str]]) -> int:
        """Bring ``component``'s schema to version ``len(steps)``: step N (1-based) runs
        once, with its version bump, in one transaction; data stays. Returns the version.
        A database newer than this code is refused (an old binary must not write to it)."""
        with self.tx() as cur:
            self._schema_lock(cur)
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                        "component VARCHAR(63) PRIMARY KEY, version INTEGER NOT NULL)")
        with self.tx() as cur:
            self._schema_lock(cur)  # two processes must not both run a step
            row = cur.execute("SELECT version FROM schema_version WHERE component = ?",
                              (component,)).fetchone()
            have = 0 if row is None else int(row[0])
            if have > len(steps):
                raise DatabaseError(
                    f"database {self.display}: {component} schema is version {have}, newer "
                    f"than this dpanel knows ({len(steps)}); upgrade dpanel")
            for n in range(have, len(steps)):
                for stmt in steps[n]:
                    cur.execute(stmt)
            if row is None:
                cur.execute("INSERT INTO schema_version (component, version) VALUES (?, ?)",
                            (component, len(steps)))
            elif have != len(steps):
                cur.execute("UPDATE schema_version SET version = ? WHERE component = ?",
                            (len(steps), component))
        return len(steps)

    def version(self, component: str) -> int:
        rows = self.execute("SELECT version FROM schema_version WHERE component = ?",
                            (component,))
        return int(rows[0][0]) if rows else 0


class _Tx:
    def __init__(self, db: Database, readonly: bool = False) -> None:
        self._db = db
        self._begin = "BEGIN" if readonly or db.engine != "sqlite" else "BEGIN IMMEDIATE"

    def __enter__(self) -> Cursor:
        db = self._db
        db._lock.acquire()
        try:
            for attempt in (0, 1):
                if not db._alive():
                    db._connect()
                raw = db._conn.cursor()
                try:
                    db._run(raw, self._begin, ())
                    break
                except DatabaseError:
                    # a connection that died while idle (PostgreSQL restarted) fails its
                    # first statement: one fresh connection, and nothing was done yet
                    if db.engine == "sqlite" or db._alive() or attempt:
                        raise
            self._raw = raw
            return Cursor(db, raw)
        except BaseException:
            db._lock.release()
            raise

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        db = self._db
        try:
            if db._alive():
                db._run(self._raw, "ROLLBACK" if exc_type else "COMMIT", ())
            elif exc_type is None:
                raise DatabaseError(f"database {db.display}: connection lost before commit")
        except DatabaseError:
            if exc_type is None:
                raise
        finally:
            db._lock.release()


def connect(url: Union[str, Path], *, what: str = "registry.url") -> Database:
    return Database(url, what=what)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__
