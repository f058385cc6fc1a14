"""The agent's audit spool and shipper: bounded, 0600, survives a restart, never blocks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Optional

import pytest

from dpanel_agent.audit import AuditShipper, Recorder, RecordingFailed, SessionAudit, Spool
from dpanel_proto import wire


class _Info:
    def __init__(self) -> None:
        self.acked = False

    def is_published(self) -> bool:
        return self.acked


class _Broker:
    def __init__(self) -> None:
        self.up = False
        self.sent: list[tuple[bytes, _Info]] = []

    def publish(self, topic: str, payload: bytes) -> Optional[_Info]:
        assert topic == wire.audit_topic("dev-1")
        info = _Info()
        self.sent.append((payload, info))
        return info


def _shipper(tmp_path: Path, broker: _Broker) -> AuditShipper:
    return AuditShipper("dev-1", tmp_path, broker.publish, lambda: broker.up)


def _session(shipper: AuditShipper, command: str = "uptime") -> SessionAudit:
    return SessionAudit(shipper, "dev-1", "exec", operator="alice", via="manager",
                        source="127.0.0.1:1", command=command)


def test_spool_is_bounded_private_and_reloaded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_files=3, max_bytes=1000)
    paths = [spool.put(b"x" * 10) for _ in range(3)]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in paths)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    with pytest.raises(RecordingFailed):
        spool.put(b"x")
    (tmp_path / "s" / ".tmp-half-written").write_bytes(b"{")
    again = Spool(tmp_path / "s", max_files=3, max_bytes=1000)  # an agent restart
    assert again.pending() == sorted(paths)  # oldest first; the torn temp file is gone
    again.remove(paths[0])
    again.put(b"y")  # room again


async def test_records_wait_for_the_broker_and_its_ack(tmp_path: Path) -> None:
    broker = _Broker()
    shipper = _shipper(tmp_path, broker)
    shipper.start()
    try:
        _session(shipper).finish()  # broker down: returns at once, the record is on disk
        assert len(shipper.records.pending()) == 1 and broker.sent == []
        broker.up = True
        shipper.kick()
        for _ in range(100):
            if broker.sent:
                break
            await asyncio.sleep(0.02)
        payload, info = broker.sent[0]
        rec = wire.decode_audit(payload)
        assert isinstance(rec, wire.AuditRecord) and rec.command == "uptime"
        assert len(shipper.records.pending()) == 1  # not acknowledged yet: kept
        info.acked = True
        shipper.kick()
        for _ in range(100):
            if not shipper.records.pending():
                break
            await asyncio.sleep(0.02)
        assert shipper.records.pending() == []
    finally:
        await shipper.stop()


async def test_unacked_records_are_sent_again_after_a_reconnect(tmp_path: Path) -> None:
    broker = _Broker()
    broker.up = True
    shipper = _shipper(tmp_path, broker)
    shipper._wake = asyncio.Event()
    _session(shipper).finish()
    shipper._pump()
    assert len(broker.sent) == 1
    broker.up = False
    shipper._pump()  # the connection dropped before the PUBACK
    broker.up = True
    shipper._pump()
    assert len(broker.sent) == 2 and broker.sent[0][0] == broker.sent[1][0]


def test_a_corrupted_spool_file_is_dropped_not_stuck(tmp_path: Path) -> None:
    broker = _Broker()
    broker.up = True
    shipper = _shipper(tmp_path, broker)
    shipper.records.put(b"garbage")
    _session(shipper).finish()
    shipper._pump()
    assert len(broker.sent) == 1 and len(shipper.records.pending()) == 1


def test_recorder_writes_asciicast_parts(tmp_path: Path) -> None:
    import base64
    import json

    broker = _Broker()
    shipper = _shipper(tmp_path, broker)
    rec = Recorder(shipper, "ab" * 16, 80, 24, "xterm")
    rec.start()
    rec.output("héllo\r\n".encode()[:2])  # a character split across two reads
    rec.output("héllo\r\n".encode()[2:])
    rec.close()
    parts = [wire.decode_audit(p.read_bytes()) for p in shipper.recordings.pending()]
    assert all(isinstance(p, wire.RecordingChunk) for p in parts)
    text = b"".join(base64.b64decode(p.data) for p in parts  # type: ignore[union-attr]
                    ).decode()
    header, *events = text.splitlines()
    assert json.loads(header)["version"] == 2
    assert "".join(json.loads(e)[2] for e in events) == "héllo\r\n"
    assert parts[-1].last  # type: ignore[union-attr]


def test_recorder_fails_when_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "recordings").write_text("a file, not a directory")
    shipper = _shipper(tmp_path, _Broker())
    with pytest.raises(RecordingFailed):
        Recorder(shipper, "ab" * 16, 80, 24, "xterm").start()


def test_certificate_identity_wins_over_what_the_client_says() -> None:
    from dpanel_agent.sshd import BuiltinSSHServer, _Server

    class _Chan:
        def __init__(self, env: dict[str, str]) -> None:
            self.env = env

        def get_environment(self) -> dict[str, str]:
            return self.env

    owner: Any = BuiltinSSHServer.__new__(BuiltinSSHServer)
    owner.audit, owner.device = None, "dev-1"
    env = {"DPANEL_OPERATOR": "root", "DPANEL_SOURCE": "10.0.0.9",
           "DPANEL_AUDIT_ID": "cd" * 16}
    server = _Server(owner)
    a = server.audit(_Chan(env), "exec", "id")
    assert (a.operator, a.via, a.correlation) == ("root", "manager", "cd" * 16)
    assert "10.0.0.9" in a.source
    server.cert_key_id = "alice"  # what the certificate check sets
    a = server.audit(_Chan(env), "exec", "id")
    assert (a.operator, a.via, a.correlation) == ("alice", "cert", "")
    assert "10.0.0.9" not in a.source


def test_recorder_hash_covers_every_part(tmp_path: Path) -> None:
    import base64
    import hashlib

    shipper = _shipper(tmp_path, _Broker())
    rec = Recorder(shipper, "ab" * 16, 80, 24, "xterm")
    rec.start()
    rec.output(b"x" * 40000)  # several parts
    rec.close()
    parts = [wire.decode_audit(p.read_bytes()) for p in shipper.recordings.pending()]
    data = b"".join(base64.b64decode(p.data) for p in parts)  # type: ignore[union-attr]
    assert len(parts) > 2 and hashlib.sha256(data).hexdigest() == rec.sha256
