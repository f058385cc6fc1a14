"""Audit end to end, all real: API exec, an OpenSSH PTY shell, scp, a forward, forged and
hostile records, the hash chain against edits in the SQLite file, and shell recordings."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from dpanel_proto import wire
from dpanel_proto.token import parse_token
from stackfix import Stack
from support import free_port, stop_proc, wait_for, wait_port


def _ssh_base(stack: Stack) -> list[str]:
    stack.cli_ok("ssh-config")  # refreshes known_hosts
    return ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
            "-o", f"ProxyCommand={stack.proxy_command()}",
            "-i", str(stack.dir / "keys" / "manager_key"), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={stack.dir / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]


def _audit(stack: Stack, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(stack.cli_ok("audit", "--json", *args)))


def _wait_row(stack: Stack, what: str, pred: Any, *args: str) -> dict[str, Any]:
    def find() -> Any:
        return next((r for r in _audit(stack, *args) if pred(r)), None)
    row: dict[str, Any] = wait_for(find, what, 60)
    return row


def _forward_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:  # every connection (wait_port's probe too): one line back
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return  # closed
            with conn:
                conn.sendall(conn.recv(100).upper())

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


@pytest.fixture
def device(stack: Stack, tmp_path: Path) -> str:
    stack.start_agent(stack.enrol("dev-1"), tmp_path / "dev-1")
    stack.wait_online("dev-1")
    return "dev-1"


def test_sessions_are_audited_and_chained(stack: Stack, device: str, tmp_path: Path) -> None:
    base = _ssh_base(stack)
    # 1. an API exec: the device's record (exit 7) and the API's, reconciled in one row
    out = stack.cli("exec", device, "--", "sh", "-c", "exit 7")
    assert out.returncode == 7, out
    row = _wait_row(stack, "exec row", lambda r: r["kind"] == "exec"
                    and r["command"] == "sh -c 'exit 7'")
    assert row["exit"] == 7 and row["user"] == "admin" and row["device"] == device
    assert row["api"]["user"] == "admin" and row["api"]["result"] == "started"
    assert row["via"] == "manager" and row["started"] <= row["ended"]
    # 2. an OpenSSH shell with a PTY
    out = subprocess.run([*base, "-tt", device], input=b"echo audit-$((6*7)); exit 3\n",
                         capture_output=True, timeout=120)
    assert out.returncode == 3, out
    shell = _wait_row(stack, "shell row", lambda r: r["kind"] == "shell")
    assert shell["exit"] == 3 and shell["command"] == "shell"
    assert shell["bytes_in"] > 0 and shell["bytes_out"] > 0 and shell["recording"] == "ok"
    assert shell["user"] == "manager"  # the pinned manager key, no operator named
    # the recording replays what was typed and echoed
    play = stack.cli("audit", "play", str(shell["id"]), "--raw")
    assert play.returncode == 0 and b"warning" not in play.stderr, play  # hash matches
    assert b"audit-42" in play.stdout and b"echo audit-$((6*7))" in play.stdout
    # the recording is a .cast file in the state dir, named in the chained row, 0600,
    # and no longer staged in the table
    cast = stack.dir / shell["recording_file"]
    assert shell["recording_file"] == f"recordings/{device}/{shell['rid']}.cast"
    assert cast.stat().st_mode & 0o777 == 0o600
    assert json.loads(cast.read_bytes().splitlines()[0])["version"] == 2
    assert b"audit-42" in cast.read_bytes()
    assert (cast.parent.stat().st_mode & 0o777) == 0o700
    db = sqlite3.connect(str(stack.dir / "registry.db"), isolation_level=None)
    try:
        assert db.execute("SELECT COUNT(*) FROM audit_recordings").fetchone()[0] == 0
    finally:
        db.close()
    # an edited file no longer matches its chained record: play warns, verify names it
    original = cast.read_bytes()
    cast.write_bytes(original.replace(b"audit-42", b"nothing!"))
    play = stack.cli("audit", "play", str(shell["id"]), "--raw")
    assert b"is mismatch" in play.stderr and b"audit-42" not in play.stdout, play
    bad = stack.cli("audit", "verify")
    assert bad.returncode == 1 and b"was edited" in bad.stderr and b".cast" in bad.stderr
    # a recording stored the old way (parts in the table, no file) still replays
    cast.unlink()
    db = sqlite3.connect(str(stack.dir / "registry.db"), isolation_level=None)
    try:
        import base64
        db.execute("INSERT INTO audit_recordings (device, rid, seq, data, last_part) "
                   "VALUES (?, ?, 0, ?, 1)",
                   (device, shell["rid"], base64.b64encode(original).decode()))
    finally:
        db.close()
    play = stack.cli("audit", "play", str(shell["id"]), "--raw")
    assert play.returncode == 0 and b"warning" not in play.stderr, play
    assert b"audit-42" in play.stdout
    # 3. scp (SFTP)
    src = tmp_path / "payload.bin"
    src.write_bytes(b"z" * 300000)
    res = subprocess.run(["scp", *base[1:], str(src), f"{device}:{tmp_path / 'up.bin'}"],
                         capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res
    sftp = _wait_row(stack, "sftp row", lambda r: r["kind"] == "sftp")
    assert sftp["bytes_in"] >= 300000 and sftp["exit"] == 0
    # 4. a direct-tcpip forward (what ssh -L and -W open)
    srv, port = _forward_server()
    try:
        out = subprocess.run([*base, "-W", f"127.0.0.1:{port}", device],
                             input=b"hello port\n", capture_output=True, timeout=120)
    finally:
        srv.close()
    assert out.stdout == b"HELLO PORT\n", out
    fwd = _wait_row(stack, "forward row", lambda r: r["kind"] == "forward")
    assert fwd["command"] == f"forward 127.0.0.1:{port}"
    assert fwd["bytes_in"] == 11 and fwd["bytes_out"] == 11
    # and ssh -L: one record per forwarded connection
    srv, port = _forward_server()
    local = free_port()
    fwd_ssh = subprocess.Popen([*base, "-N", "-o", "ExitOnForwardFailure=yes",
                                "-L", f"127.0.0.1:{local}:127.0.0.1:{port}", device],
                               stdin=subprocess.DEVNULL)
    try:
        wait_port(local, timeout=60)
        with socket.create_connection(("127.0.0.1", local), timeout=30) as conn:
            conn.sendall(b"via -L\n")
            assert conn.makefile("rb").readline() == b"VIA -L\n"
    finally:
        stop_proc(fwd_ssh)
        srv.close()
    fwd = _wait_row(stack, "-L forward row", lambda r: r["kind"] == "forward"
                    and r["command"] == f"forward 127.0.0.1:{port}" and r["bytes_in"])
    assert fwd["bytes_in"] == 7 and fwd["bytes_out"] == 7
    # 5. hostile command lines: control characters and a huge one
    out = stack.cli("exec", device, "--", "sh", "-c", ": '\x1b[2J\nFAKE 1 dev-9 root'")
    assert out.returncode == 0, out
    huge = "y" * 100000
    assert stack.cli("exec", device, "--", "sh", "-c", f": {huge}").returncode == 0
    _wait_row(stack, "huge row", lambda r: r["kind"] == "exec" and "more characters"
              in r["command"])
    esc = _wait_row(stack, "escaped row", lambda r: "FAKE" in r["command"])
    assert "\x1b" not in esc["command"] and "\n" not in esc["command"]
    rows = _audit(stack)
    assert all(len(r["command"]) <= wire.MAX_AUDIT_COMMAND for r in rows)
    table = stack.cli_ok("audit", "--device", device)
    assert "\x1b" not in table
    lines = table.splitlines()
    assert len(lines) == len(rows) + 1  # header + one line a record: no forged lines
    assert not any(ln.startswith("FAKE") for ln in lines)
    # 6. filters
    assert {r["kind"] for r in _audit(stack, "--user", "manager")} == {"shell", "sftp",
                                                                       "forward"}
    assert _audit(stack, "--since", "2000-01-01T00:00:00Z") == rows
    assert stack.cli("audit", "--since", "soonish").returncode != 0
    # 7. the chain: intact, then an edited row and a deleted row in the SQLite file
    ok = stack.cli("audit", "verify")
    assert ok.returncode == 0 and b"audit chain ok" in ok.stdout, ok
    db = sqlite3.connect(str(stack.dir / "registry.db"), isolation_level=None)
    try:
        body = json.loads(db.execute("SELECT body FROM audit_log WHERE seq = 2").fetchone()[0])
        body["exit"] = 0
        db.execute("UPDATE audit_log SET body = ? WHERE seq = 2", (json.dumps(body),))
        bad = stack.cli("audit", "verify")
        assert bad.returncode == 1 and b"row 2 was edited" in bad.stderr, bad
        db.execute("DELETE FROM audit_log WHERE seq = 2")
        bad = stack.cli("audit", "verify")
        assert bad.returncode == 1 and b"row 2 is missing" in bad.stderr, bad
    finally:
        db.close()


def test_forged_records_and_refused_recording(stack: Stack, device: str,
                                              tmp_path: Path) -> None:
    # a device (no agent: its own credentials) tries to write dev-1's audit
    tok = parse_token(stack.enrol("rogue"))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rogue")
    c.username_pw_set("rogue", tok.secret)
    c.connect("127.0.0.1", stack.broker_port)
    c.loop_start()
    try:
        def rec(claim: str, rid: str, command: str) -> bytes:
            return wire.encode_audit(wire.AuditRecord(
                device=claim, id=rid, kind="exec", operator="alice", command=command,
                exit=0, started=time.time(), ended=time.time()))
        c.publish(wire.audit_topic("dev-1"), rec("dev-1", "a1" * 16, "cross-topic"),
                  qos=1).wait_for_publish(10)
        c.publish(wire.audit_topic("rogue"), rec("dev-1", "b2" * 16, "own-topic"),
                  qos=1).wait_for_publish(10)
        c.publish(wire.audit_topic("rogue"), b"{not json", qos=1).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()
    own = _wait_row(stack, "forged row", lambda r: r["command"] == "own-topic")
    # attributed to the real sender, whatever it claimed; the cross-topic one never came
    assert own["device"] == "rogue" and "claimed device dev-1" in own["note"]
    rows = _audit(stack)
    assert not any(r["command"] == "cross-topic" for r in rows)
    assert not any(r["device"] == "dev-1" for r in rows if r.get("origin") == "device")
    # a device whose recording cannot be written refuses shells (record_failure default)
    state = tmp_path / "dev-2"
    state.mkdir()
    (state / "recordings").write_text("not a directory\n")
    stack.start_agent(stack.enrol("dev-2"), state)
    stack.wait_online("dev-2")
    base = _ssh_base(stack)
    out = subprocess.run([*base, "-tt", "dev-2"], input=b"echo should-not-run\n",
                         capture_output=True, timeout=120)
    assert out.returncode == 1, out
    assert b"recording cannot be written; refused" in out.stdout + out.stderr
    assert b"should-not-run" not in out.stdout.replace(b"echo should-not-run", b"")
    row = _wait_row(stack, "refused row", lambda r: r["kind"] == "shell", "--device", "dev-2")
    assert row["recording"] == "refused" and row["exit"] == 1
    # exec without a PTY is not recorded, so it still works there
    assert stack.cli("exec", "dev-2", "--", "true").returncode == 0
    assert stack.cli_ok("audit", "verify").startswith("audit chain ok")


def test_broker_outage_loses_no_record(stack: Stack, tmp_path: Path) -> None:
    import os
    import signal

    state = tmp_path / "dev-o"
    stack.start_agent(stack.enrol("dev-o"), state)
    stack.wait_online("dev-o")
    assert stack.cli("exec", "dev-o", "--", "true").returncode == 0  # pooled connection up
    pid = stack.broker_pid()
    os.kill(pid, signal.SIGSTOP)  # the broker stalls: nothing it holds gets acknowledged
    try:
        # the tunnel does not need the broker: the session runs, its record waits on disk
        out = stack.cli("exec", "dev-o", "--", "sh", "-c", "echo during-outage; exit 4",
                        timeout=60)
        assert out.returncode == 4, out
        spooled = wait_for(lambda: _spooled(state, b"during-outage"), "record in the spool",
                           30)
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in spooled)
    finally:
        os.kill(pid, signal.SIGCONT)
    row = _wait_row(stack, "record after the outage",
                    lambda r: "during-outage" in r["command"], "--device", "dev-o")
    assert row["exit"] == 4
    wait_for(lambda: not _spooled(state, b"during-outage"), "spool drained", 60)


def _spooled(state: Path, needle: bytes) -> list[Path]:
    """Spool files holding ``needle`` (the shipper removes files as we look)."""
    found = []
    for p in (state / "audit").iterdir():
        try:
            if needle in p.read_bytes():
                found.append(p)
        except FileNotFoundError:
            pass
    return found


def test_recording_failing_mid_session_ends_the_shell(stack: Stack, device: str,
                                                      tmp_path: Path) -> None:
    rec = tmp_path / "dev-1" / "recordings"
    # the shell breaks its own recording (the device is this machine), then writes more
    script = (f"rm -rf {rec}; echo x > {rec}; head -c 200000 /dev/zero | tr '\\0' a; "
              "sleep 3; echo END-$((1+1))\n").encode()
    out = subprocess.run([*_ssh_base(stack), "-tt", device], input=script,
                         capture_output=True, timeout=120)
    assert out.returncode == 255, out
    assert b"session ended (record_failure" in out.stdout + out.stderr
    assert b"END-2" not in out.stdout
    row = _wait_row(stack, "ended row", lambda r: r["kind"] == "shell")
    assert row["recording"] == "refused" and "mid-session" in row["note"]


def test_a_job_run_is_audited_under_its_creator(stack: Stack, device: str) -> None:
    job = json.loads(stack.cli_ok("job", "run", "--json", device, "--", "sh", "-c",
                                  "exit 5"))["id"]
    row = _wait_row(stack, "job row", lambda r: r.get("api", {}).get("kind") == "job")
    assert row["kind"] == "exec" and row["exit"] == 5 and row["user"] == "admin"
    assert row["api"]["result"].startswith(f"job {job}: failed")
    assert f"job {job}" in row["source"]


def _api(stack: Stack, method: str, path: str, token: str,
         body: Any = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{stack.api_port}{path}", data=data,
                                 method=method, headers={"Authorization": f"Bearer {token}"})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_operators_are_audited_and_scoped(stack: Stack, tmp_path: Path) -> None:
    for name, site in (("site-a1", "a"), ("site-b1", "b")):
        tok = stack.cli_ok("device", "add", name, "--label", f"site={site}",
                           "--print-token").strip()
        stack.start_agent(tok, tmp_path / name)
        stack.wait_online(name)
    viewer = stack.cli_ok("user", "add", "vera", "--role", "viewer", "--print-token").strip()
    alice = stack.cli_ok("user", "add", "alice", "--role", "operator", "--scope", "site=a",
                         "--print-token").strip()
    # alice runs a command: the device files it under her name, via the manager
    status, _ = _api(stack, "POST", "/v1/devices/site-a1/exec", alice,
                     {"command": ["sh", "-c", "exit 3"], "stream": False})
    assert status == 200
    row = _wait_row(stack, "alice's exec", lambda r: r["user"] == "alice"
                    and r["kind"] == "exec" and r.get("exit") == 3)
    assert row["device"] == "site-a1" and row["via"] == "manager"
    # refusals are audited: a viewer's exec, alice outside her scope
    assert _api(stack, "POST", "/v1/devices/site-a1/exec", viewer,
                {"command": "true", "stream": False})[0] == 403
    assert _api(stack, "POST", "/v1/devices/site-b1/exec", alice,
                {"command": "true", "stream": False})[0] == 403
    rows = _audit(stack)
    refused = [(r["user"], r["device"]) for r in rows if r.get("result") == "forbidden"]
    assert ("vera", "site-a1") in refused and ("alice", "site-b1") in refused
    # a viewer reads the audit; a scoped operator sees only her devices' records
    status, seen = _api(stack, "GET", "/v1/audit", viewer)
    assert status == 200 and {r["device"] for r in seen} >= {"site-a1", "site-b1"}
    status, seen = _api(stack, "GET", "/v1/audit", alice)
    assert status == 200 and seen and {r["device"] for r in seen} == {"site-a1"}
    assert _api(stack, "GET", "/v1/audit/verify", viewer)[1]["ok"] is True
