"""The database layer on both engines: placeholders, transactions, versioned migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dpanel_server.config import load_config
from dpanel_server.db import Database, DatabaseError, IntegrityError, parse_url, pg_sql, redact
from dpanel_server.errors import ConfigError
from dpanel_server.registry import MIGRATIONS, Registry

#: The registry's schema as it shipped before versioning (no schema_version table).
_OLD_SCHEMA = [
    """CREATE TABLE devices (id VARCHAR(63) PRIMARY KEY, secret_hash VARCHAR(64) NOT NULL,
        broker_hash VARCHAR(200) NOT NULL, host_key TEXT, labels TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION,
        last_seen DOUBLE PRECISION)""",
    "CREATE TABLE meta (name VARCHAR(63) PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE deleted_devices (id VARCHAR(63) NOT NULL, host_key TEXT,
        labels TEXT NOT NULL DEFAULT '{}', created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION, last_seen DOUBLE PRECISION,
        deleted_at DOUBLE PRECISION NOT NULL)""",
]


def test_placeholders_map_outside_literals_only() -> None:
    assert pg_sql("SELECT '?', x FROM t WHERE a = ? AND b LIKE 'a%'") == (
        "SELECT '?', x FROM t WHERE a = %s AND b LIKE 'a%%'")
    assert pg_sql("CREATE TABLE a (id INTEGER PRIMARY KEY AUTOINCREMENT)") == (
        "CREATE TABLE a (id BIGSERIAL PRIMARY KEY)")


def test_url_parsing_and_redaction() -> None:
    assert parse_url("sqlite:///var/lib/x.db") == ("sqlite", "/var/lib/x.db")
    assert parse_url("postgresql://u@h/db")[0] == "postgresql"
    with pytest.raises(ConfigError, match=r"registry\.url"):
        parse_url("mysql://u@h/db")
    with pytest.raises(ConfigError, match="names no file"):
        parse_url("sqlite:///")
    assert redact("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"


@pytest.mark.parametrize("value", ["mysql://h/db", "sqlite:///", "/plain/path.db"])
def test_config_registry_url_errors_name_the_field(tmp_path: Path, value: str) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(f'[registry]\nurl = "{value}"\n')
    with pytest.raises(ConfigError, match=r"registry\.url"):
        load_config(conf)


def test_config_registry_url_default_is_sqlite_in_state_dir(tmp_path: Path) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(f'state_dir = "{tmp_path}"\n')
    assert load_config(conf).registry_url == f"sqlite://{tmp_path}/registry.db"


def test_portable_sql_and_transactions(registry_url: str) -> None:
    """What other registry modules rely on: ?-placeholders, AUTOINCREMENT + RETURNING,
    ON CONFLICT, rollback on error, IntegrityError on a duplicate key."""
    db = Database(registry_url)
    db.execute("CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "what TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)")
    ids = [db.execute("INSERT INTO audit (what, at) VALUES (?, ?) RETURNING id",
                      (f"100% '{n}'?", n / 3))[0][0] for n in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    with pytest.raises(RuntimeError), db.tx() as cur:
        cur.execute("INSERT INTO audit (what, at) VALUES (?, ?)", ("gone", 1.0))
        raise RuntimeError("abort")
    rows = db.execute("SELECT what, at FROM audit WHERE what LIKE ? ORDER BY id", ("100%",))
    assert rows == [("100% '0'?", 0.0), ("100% '1'?", 1 / 3), ("100% '2'?", 2 / 3)]
    db.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO kv (k, v) VALUES (?, ?)", ("a", "1"))
    db.execute("INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT DO NOTHING", ("a", "2"))
    with pytest.raises(IntegrityError):
        db.execute("INSERT INTO kv (k, v) VALUES (?, ?)", ("a", "3"))
    assert db.execute("SELECT v FROM kv") == [("1",)]
    with pytest.raises(DatabaseError):
        db.execute("SELECT nope FROM kv")
    db.ping()  # still usable after the failed statements
    db.close()


def test_migrations_run_once_in_order_and_refuse_a_newer_schema(registry_url: str) -> None:
    db = Database(registry_url)
    steps = [["CREATE TABLE m (a INTEGER)"], ["ALTER TABLE m ADD COLUMN b TEXT"]]
    assert db.migrate("demo", steps[:1]) == 1
    db.execute("INSERT INTO m (a) VALUES (?)", (7,))
    assert db.migrate("demo", steps) == 2
    assert db.migrate("demo", steps) == 2  # again: nothing runs twice
    assert db.execute("SELECT a, b FROM m") == [(7, None)]
    assert db.version("demo") == 2 and db.version("other") == 0
    with pytest.raises(DatabaseError, match="newer than this dpanel"):
        db.migrate("demo", steps[:1])
    db.close()


def test_upgrade_from_the_unversioned_sqlite_schema_keeps_the_data(tmp_path: Path) -> None:
    """A registry.db written by the release before versioning: opening it records the
    version, adds the indexes and keeps every device, its secret and its pin."""
    path = tmp_path / "registry.db"
    old = Registry(tmp_path / "scratch.db")  # only to make a real secret + hashes
    _, secret = old.add("kiosk-1", {"site": "acme"})
    row = old.db.execute("SELECT id, secret_hash, broker_hash, labels, created_at "
                         "FROM devices")[0]
    old.close()
    raw = sqlite3.connect(path)
    for stmt in _OLD_SCHEMA:
        raw.execute(stmt)
    raw.execute("INSERT INTO devices (id, secret_hash, broker_hash, labels, created_at, "
                "host_key) VALUES (?, ?, ?, ?, ?, 'ssh-ed25519 AAAA')", row)
    raw.execute("INSERT INTO devices (id, secret_hash, broker_hash, created_at, revoked_at) "
                "VALUES ('gone-1', 'x', 'y', 1, 2)")
    raw.execute("INSERT INTO meta (name, value) VALUES ('revision', '41')")
    raw.commit()
    raw.close()

    reg = Registry(path)
    assert reg.db.version("registry") == len(MIGRATIONS)
    assert reg.revision() == 41
    assert reg.verify("kiosk-1", secret)
    dev = reg.get("kiosk-1")
    assert dev.labels == {"site": "acme"} and dev.host_key == "ssh-ed25519 AAAA"
    assert reg.revoked_ids() == {"gone-1"}
    indexes = {r[0] for r in reg.db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"devices_host_key", "devices_revoked_at"} <= indexes
    reg.close()
    assert Registry(path).db.version("registry") == len(MIGRATIONS)  # reopen: no-op


def test_sqlite_ping_notices_a_file_moved_away(tmp_path: Path) -> None:
    db = Database(tmp_path / "r.db")
    db.ping()
    (tmp_path / "r.db").rename(tmp_path / "moved.db")
    with pytest.raises(DatabaseError, match="No such file"):
        db.ping()
    (tmp_path / "moved.db").rename(tmp_path / "r.db")
    db.ping()


def test_processes_opening_one_database_at_once_do_not_race(registry_url: str) -> None:
    """Manager, tunnel and replicas start together: concurrent CREATE TABLE IF NOT
    EXISTS fails on PostgreSQL without the schema lock."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        regs = list(pool.map(lambda _: Registry(registry_url), range(4)))
    regs[0].add("dev-1")
    assert all(r.db.version("registry") == len(MIGRATIONS) for r in regs)
    assert [d.id for d in regs[3].devices()] == ["dev-1"]
    for r in regs:
        r.close()
