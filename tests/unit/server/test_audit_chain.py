"""The audit chain: appends link, verify names the first edited/deleted/inserted row."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dpanel_proto import wire
from dpanel_server.audit import AuditLog, ChainError, parse_since
from dpanel_server.registry import Registry


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog(Registry(tmp_path / "reg.db"))


def _fill(log: AuditLog, n: int = 5) -> None:
    for i in range(n):
        log.api_record("alice", "dev-1", "exec", f"echo {i}", "started")


def _db(log: AuditLog) -> sqlite3.Connection:
    return sqlite3.connect(str(log._reg.path), isolation_level=None)


def test_chain_verifies_and_links(log: AuditLog) -> None:
    assert log.verify_chain()["rows"] == 0
    _fill(log)
    out = log.verify_chain()
    assert out["ok"] and out["rows"] == 5
    rows = _db(log).execute("SELECT seq, prev_hash, hash FROM audit_log ORDER BY seq").fetchall()
    assert rows[0][1] == "0" * 64
    for a, b in zip(rows, rows[1:]):
        assert b[1] == a[2]


def test_edited_row_is_named(log: AuditLog) -> None:
    _fill(log)
    body = json.loads(_db(log).execute("SELECT body FROM audit_log WHERE seq = 3").fetchone()[0])
    body["command"] = "innocent"
    _db(log).execute("UPDATE audit_log SET body = ? WHERE seq = 3", (json.dumps(body),))
    with pytest.raises(ChainError, match="row 3 was edited"):
        log.verify_chain()


def test_edited_filter_column_is_named(log: AuditLog) -> None:
    _fill(log)
    _db(log).execute("UPDATE audit_log SET user_name = 'mallory' WHERE seq = 2")
    with pytest.raises(ChainError, match="row 2 was edited"):
        log.verify_chain()


def test_deleted_row_is_named(log: AuditLog) -> None:
    _fill(log)
    _db(log).execute("DELETE FROM audit_log WHERE seq = 2")
    with pytest.raises(ChainError, match="row 2 is missing"):
        log.verify_chain()


def test_deleted_tail_is_noticed(log: AuditLog) -> None:
    _fill(log)
    _db(log).execute("DELETE FROM audit_log WHERE seq = 5")
    with pytest.raises(ChainError, match="rows were deleted from the end"):
        log.verify_chain()


def test_inserted_row_is_named(log: AuditLog) -> None:
    _fill(log)
    db = _db(log)
    # shift rows 3.. up and slip a forged row in at 3, with a self-consistent hash
    for seq in range(5, 2, -1):
        db.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (seq + 1, seq))
    from dpanel_server.audit import canonical, row_hash
    prev = db.execute("SELECT hash FROM audit_log WHERE seq = 2").fetchone()[0]
    body = {"origin": "api", "rid": "f" * 32, "device": "dev-1", "user": "alice",
            "kind": "exec", "started": 1.0, "correlation": ""}
    text = canonical(body)
    db.execute("INSERT INTO audit_log (seq, origin, rid, device, user_name, kind, started, "
               "correlation, body, prev_hash, hash) VALUES (3, 'api', ?, 'dev-1', 'alice', "
               "'exec', 1.0, '', ?, ?, ?)", ("f" * 32, text, prev, row_hash(3, prev, text)))
    with pytest.raises(ChainError, match="row 4: prev_hash"):
        log.verify_chain()


def test_device_records_dedup_and_forgery(log: AuditLog) -> None:
    rec = wire.AuditRecord(device="dev-2", id="ab" * 16, kind="exec", operator="alice",
                           command="id", exit=0)
    payload = wire.encode_audit(rec)
    log.ingest("dev-1", payload)  # arrived on dev-1's topic, claims dev-2
    log.ingest("dev-1", payload)  # a QoS 1 resend: kept once
    rows = log.query()
    assert len(rows) == 1
    assert rows[0]["device"] == "dev-1" and "claimed device dev-2" in rows[0]["note"]
    assert log.query(device="dev-2") == []


def test_reconcile_links_api_and_device(log: AuditLog) -> None:
    corr = "cd" * 16
    log.api_record("alice", "dev-1", "exec", "sh -c 'exit 7'", "started", correlation=corr)
    log.ingest("dev-1", wire.encode_audit(wire.AuditRecord(
        device="dev-1", id="ab" * 16, kind="exec", operator="alice", command="sh -c 'exit 7'",
        exit=7, correlation=corr)))
    rows = log.query()
    assert len(rows) == 1 and rows[0]["exit"] == 7 and rows[0]["api"]["user"] == "alice"
    assert log.query(user="alice") == rows
    assert log.verify_chain()["rows"] == 2


def test_recording_parts_join(log: AuditLog) -> None:
    import base64

    rid = "ab" * 16
    log.ingest("dev-1", wire.encode_audit(wire.AuditRecord(
        device="dev-1", id=rid, kind="shell", operator="alice", command="shell",
        recording="ok")))
    for seq, part in ((1, b"world"), (0, b"hello "), (1, b"world")):
        log.ingest("dev-1", wire.encode_audit(wire.RecordingChunk(
            device="dev-1", id=rid, seq=seq, data=base64.b64encode(part).decode())))
    assert log.recording(1) == b"hello world"


def _chunk(rid: str, seq: int, part: bytes, last: bool = False) -> bytes:
    import base64

    return wire.encode_audit(wire.RecordingChunk(device="dev-1", id=rid, seq=seq,
                                                 data=base64.b64encode(part).decode(),
                                                 last=last))


def test_a_complete_recording_becomes_one_cast_file(tmp_path: Path) -> None:
    import hashlib

    log = AuditLog(Registry(tmp_path / "reg.db"), tmp_path / "state")
    rid, data = "ef" * 16, b"hello world"
    # parts out of order and resent; the file appears only when none is missing
    log.ingest("dev-1", _chunk(rid, 2, b"ld", last=True))
    log.ingest("dev-1", _chunk(rid, 0, b"hello "))
    path = tmp_path / "state" / "recordings" / "dev-1" / f"{rid}.cast"
    assert not path.exists()
    log.ingest("dev-1", _chunk(rid, 1, b"wor"))
    assert path.read_bytes() == data and path.stat().st_mode & 0o777 == 0o600
    assert _db(log).execute("SELECT COUNT(*) FROM audit_recordings").fetchone()[0] == 0
    log.ingest("dev-1", _chunk(rid, 1, b"wor"))  # resent after the file: no stray part
    assert _db(log).execute("SELECT COUNT(*) FROM audit_recordings").fetchone()[0] == 0
    log.ingest("dev-1", wire.encode_audit(wire.AuditRecord(
        device="dev-1", id=rid, kind="shell", operator="alice", command="shell",
        recording="ok", recording_sha256=hashlib.sha256(data).hexdigest())))
    row = log.query()[0]
    assert row["recording_file"] == f"recordings/dev-1/{rid}.cast"
    assert log.checked_recording(row["id"]) == (data, "verified")
    assert log.verify_chain()["ok"]
    path.write_bytes(b"hello w0rld")
    assert log.checked_recording(row["id"]) == (b"hello w0rld", "mismatch")
    with pytest.raises(ChainError, match=r"row 1: its recording .* was edited"):
        log.verify_chain()


def test_an_unwritable_recordings_dir_keeps_the_parts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "recordings").write_text("not a directory")
    log = AuditLog(Registry(tmp_path / "reg.db"), state)
    rid = "cd" * 16
    log.ingest("dev-1", _chunk(rid, 0, b"kept", last=True))
    log.ingest("dev-1", wire.encode_audit(wire.AuditRecord(
        device="dev-1", id=rid, kind="shell", operator="alice", command="shell",
        recording="ok")))
    assert log.recording(log.query()[0]["id"]) == b"kept"


def test_a_proxy_stream_names_the_operators_address(log: AuditLog) -> None:
    log.note_stream("dev-1", "127.0.0.1:40000", "198.51.100.7:5555")
    for rid, src in (("a1" * 16, "tunnel 127.0.0.1:40000"),  # ours: the operator's
                     ("a2" * 16, "tunnel 127.0.0.1:40001"),  # no such stream: as reported
                     ("a3" * 16, "198.51.100.9:1")):          # the device's word, kept
        log.ingest("dev-1", wire.encode_audit(wire.AuditRecord(
            device="dev-1", id=rid, kind="exec", operator="alice", command="id", exit=0,
            via="cert", source=src)))
    got = [r["source"] for r in log.query()]
    assert got == ["198.51.100.7:5555 (proxy, tunnel 127.0.0.1:40000)",
                   "tunnel 127.0.0.1:40001", "198.51.100.9:1"]
    # another device's record cannot take this device's stream
    log.ingest("dev-2", wire.encode_audit(wire.AuditRecord(
        device="dev-2", id="a4" * 16, kind="exec", operator="x", command="id", exit=0,
        via="cert", source="tunnel 127.0.0.1:40000")))
    assert log.query(device="dev-2")[0]["source"] == "tunnel 127.0.0.1:40000"


def test_parse_since() -> None:
    assert parse_since("1h", now=10000.0) == 6400.0
    assert parse_since("2026-12-01T00:00:00Z") == 1796083200.0
    with pytest.raises(ValueError, match="since"):
        parse_since("yesterday")


def test_a_flooding_device_is_cut_off(log: AuditLog) -> None:
    admitted = sum(log.admit("dev-1") for _ in range(1000))
    assert 0 < admitted < 1000
    assert log.admit("dev-2")  # the others are not affected


def test_a_scope_sees_only_its_devices(log: AuditLog) -> None:
    log.api_record("alice", "dev-1", "exec", "id", "started")
    log.api_record("bob", "dev-2", "exec", "id", "started")
    assert {r["device"] for r in log.query(devices={"dev-1"})} == {"dev-1"}
    assert {r["device"] for r in log.query()} == {"dev-1", "dev-2"}
