"""Operator SSH certificates and the WebSocket proxy, with real processes end to end.

A certificate from POST /v1/certs gets plain OpenSSH (ssh, scp) through the proxy's
WebSocket to a real agent; expired, foreign-CA and wrong-device certificates are refused
by the agent with the reason in its log; devices enrolled with a token that predates
certificates learn the CA (and a rotated one) by signed request, without a restart.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from test_attacks import Mqtt, _as_manager
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from dpanel_proto import wire
from dpanel_proto.signing import sign_request
from dpanel_proto.token import parse_token
from stackfix import BIN, Stack
from support import wait_for


def _api(stack: Stack, method: str, path: str, body: Any = None,
         token: str | None = None) -> Any:
    token = token or (stack.dir / "keys" / "admin.token").read_text().strip()
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.api_port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _operator_key(tmp: Path, name: str = "op") -> Path:
    key = tmp / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def _issue(stack: Stack, key: Path, **body: Any) -> Path:
    """A certificate from the API, saved where OpenSSH looks for it (KEY-cert.pub)."""
    pub = key.with_name(key.name + ".pub").read_text().strip()
    out = _api(stack, "POST", "/v1/certs", {"public_key": pub, **body})
    cert = key.with_name(key.name + "-cert.pub")
    cert.write_text(out["certificate"] + "\n")
    return cert


def _sign(ca: asyncssh.SSHKey, key: Path, principals: list[str], after: float,
          before: float) -> Path:
    """A certificate we sign ourselves (a past window, another CA)."""
    user = asyncssh.read_public_key(str(key.with_name(key.name + ".pub")))
    cert = ca.generate_user_certificate(user, "mallory", principals=principals,
                                        valid_after=int(after), valid_before=int(before))
    path = key.with_name(key.name + "-cert.pub")
    cert.write_certificate(str(path))
    return path


def _ssh(stack: Stack, key: Path, cert: Path) -> list[str]:
    """Plain OpenSSH with the operator's key + certificate, through `dpanel proxy`."""
    _api(stack, "GET", "/v1/known_hosts")  # writes the stack's known_hosts
    return ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
            "-o", f"ProxyCommand={stack.proxy_command()}",
            "-i", str(key), "-o", f"CertificateFile={cert}", "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={stack.dir / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]


def _ws_env(stack: Stack) -> dict[str, str]:
    return dict(stack.env, DPANEL_PROXY="websocket")


def _log(state: Path) -> str:
    return (state / "agent.log").read_text(errors="replace")


def _run(argv: list[str], env: dict[str, str], data: bytes | None = None,
         ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, env=env, input=data, capture_output=True, timeout=180,
                          stdin=None if data is not None else subprocess.DEVNULL)


@pytest.fixture
def agent(stack: Stack, tmp_path: Path) -> Path:
    state = tmp_path / "dev-a"
    stack.start_agent(stack.enrol("dev-a"), state)
    stack.wait_online("dev-a")
    return state


def test_certificate_gets_plain_ssh_and_scp_through_the_websocket(
        stack: Stack, agent: Path, tmp_path: Path) -> None:
    key = _operator_key(tmp_path)
    cert = _issue(stack, key, ttl=600)
    base, env = _ssh(stack, key, cert), _ws_env(stack)
    out = _run([*base, "dev-a", "wc -c; echo err >&2; exit 5"], env, b"y" * 300000)
    assert out.returncode == 5, out
    assert out.stdout.strip() == b"300000" and out.stderr == b"err\n"
    # the proxy really went through the API's WebSocket, and the agent saw the operator
    assert "proxy stream to dev-a opened by admin" in stack.log()
    assert "certificate session opened for 'admin'" in _log(agent)
    src = tmp_path / "up.bin"
    src.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    dst, back = tmp_path / "remote.bin", tmp_path / "back.bin"
    res = _run(["scp", *base[1:], str(src), f"dev-a:{dst}"], env)
    assert res.returncode == 0, res
    res = _run(["scp", *base[1:], f"dev-a:{dst}", str(back)], env)
    assert res.returncode == 0, res
    assert back.read_bytes() == src.read_bytes()
    # and the manager's own pooled connection (pinned manager key) still works
    assert stack.cli("exec", "dev-a", "--", "true").returncode == 0


def test_dpanel_ssh_uses_the_operators_own_certificate(stack: Stack, agent: Path) -> None:
    out = stack.cli("ssh", "--ttl", "300", "dev-a", "echo hi; exit 4")
    assert out.returncode == 4 and out.stdout == b"hi\n", out
    key = stack.dir / "operator" / "id_ed25519"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    certs = list(key.parent.glob("id_ed25519-dpanel-*-cert.pub"))
    assert len(certs) == 1
    assert "certificate session opened for 'admin'" in _log(agent)
    # the device audits the session under the certificate's identity, not "manager"
    row = wait_for(lambda: next((r for r in json.loads(stack.cli_ok("audit", "--json"))
                                 if r["command"] == "echo hi; exit 4"), None),
                   "the certificate session's audit row", 60)
    assert (row["user"], row["via"], row["exit"], row["device"]) == ("admin", "cert", 4,
                                                                     "dev-a"), row
    conf = stack.cli_ok("ssh-config")
    assert f"CertificateFile {certs[0]}" in conf and f"IdentityFile {key}" in conf


def test_refused_certificates_say_why(stack: Stack, agent: Path, tmp_path: Path) -> None:
    state_b = tmp_path / "dev-b"
    stack.start_agent(stack.enrol("dev-b"), state_b)
    stack.wait_online("dev-b")
    key = _operator_key(tmp_path)
    ca = asyncssh.read_private_key(str(stack.dir / "user_ca"))
    env = _ws_env(stack)
    now = time.time()

    _sign(ca, key, ["dpanel:*"], now - 7200, now - 3600)
    out = _run([*_ssh(stack, key, key.with_name("op-cert.pub")), "dev-a", "true"], env)
    assert out.returncode == 255, out
    wait_for(lambda: "refused certificate 'mallory'" in _log(agent) and "expired" in _log(agent),
             "expired certificate refused with its reason", 30)

    _sign(asyncssh.generate_private_key("ssh-ed25519"), key, ["dpanel:*"], now - 60, now + 600)
    out = _run([*_ssh(stack, key, key.with_name("op-cert.pub")), "dev-a", "true"], env)
    assert out.returncode == 255, out
    wait_for(lambda: "another CA" in _log(agent), "foreign CA refused with its reason", 30)

    # a genuine certificate for dev-a only, presented straight to dev-b's tunnel port
    cert = _issue(stack, key, ttl=600, devices=["dev-a"])
    port = _api(stack, "POST", "/v1/devices/dev-b/tunnel", {})["port"]
    direct = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-p", str(port),
              "-i", str(key), "-o", f"CertificateFile={cert}", "-o", "IdentitiesOnly=yes",
              "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
              "-o", "LogLevel=ERROR", "127.0.0.1", "true"]
    out = _run(direct, env)
    assert out.returncode == 255, out
    wait_for(lambda: "principal mismatch" in _log(state_b), "wrong device refused", 30)
    assert "dpanel:dev-a" in _log(state_b)
    # the same certificate is good for dev-a, and both agents are still up
    out = _run([*_ssh(stack, key, cert), "dev-a", "echo ok"], env)
    assert out.returncode == 0 and out.stdout == b"ok\n", out
    assert stack.cli("exec", "dev-b", "--", "true").returncode == 0


def test_websocket_proxy_wants_the_token_in_the_header(stack: Stack, agent: Path) -> None:
    token = (stack.dir / "keys" / "admin.token").read_text().strip()
    url = f"ws://127.0.0.1:{stack.api_port}/v1/devices/dev-a/proxy"
    for attempt, headers, status in (
            (f"{url}?token={token}", {}, 400),
            (f"{url}?access_token={token}", {"Authorization": f"Bearer {token}"}, 400),
            (url, {}, 401),
            (url, {"Authorization": "Bearer wrong"}, 401),
            (url.replace("dev-a", "no-such"), {"Authorization": f"Bearer {token}"}, 404)):
        with pytest.raises(InvalidStatus) as exc:
            connect(attempt, additional_headers=headers, open_timeout=30).close()
        assert exc.value.response.status_code == status, attempt
    # the right way in gets the device's SSH banner
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                 open_timeout=60) as ws:
        assert bytes(ws.recv(timeout=60)).startswith(b"SSH-2.0-")
    assert token not in stack.log()
    # `dpanel proxy` over the WebSocket says why it was refused, with ssh's exit status
    out = _run([str(BIN / "dpanel"), "proxy", "no-such"], _ws_env(stack))
    assert out.returncode == 255 and b"no-such" in out.stderr, out


def test_viewer_and_bad_requests_get_no_certificate(stack: Stack, tmp_path: Path) -> None:
    key = _operator_key(tmp_path)
    pub = key.with_name("op.pub").read_text().strip()
    for body, status in (({"public_key": pub, "ttl": 10 ** 6}, 422),
                         ({"public_key": "ssh-ed25519 !!!"}, 422),
                         ({"public_key": pub, "devices": ["nope"]}, 404)):
        with pytest.raises(urllib.error.HTTPError) as exc:
            _api(stack, "POST", "/v1/certs", body)
        assert exc.value.code == status, body
    with pytest.raises(urllib.error.HTTPError) as exc:
        _api(stack, "POST", "/v1/certs", {"public_key": pub}, token="not-the-token")
    assert exc.value.code == 401


def test_old_token_device_learns_the_ca_and_its_rotation(stack: Stack, tmp_path: Path) -> None:
    # a token from before certificates: no user_ca field at all
    tok = parse_token(stack.enrol("dev-o"))
    old = replace(tok, user_ca=None).encode()
    body = old.split(".")[1]
    fields = json.loads(zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))
    assert "user_ca" not in fields and parse_token(old).user_ca is None
    state = tmp_path / "dev-o"
    proc = stack.start_agent(old, state)
    stack.wait_online("dev-o")
    assert not (state / "user_ca.pub").exists()
    key = _operator_key(tmp_path)
    env = _ws_env(stack)
    cert = _issue(stack, key, ttl=600)
    # the proxy's open request carries the CA, before ssh authenticates
    out = _run([*_ssh(stack, key, cert), "dev-o", "echo migrated"], env)
    assert out.returncode == 0 and out.stdout == b"migrated\n", out
    ca1 = (stack.dir / "user_ca.pub").read_text().split()[1]
    assert (state / "user_ca.pub").read_text().split()[1] == ca1

    # a forged rotation (right shape, wrong signature) changes nothing
    rogue = asyncssh.generate_private_key("ssh-ed25519")
    rogue_line = " ".join(rogue.export_public_key().decode().split()[:2])
    now = time.time()
    forged = sign_request(wire.OpenRequest(device="dev-o", id="c" * 32, issued_at=now,
                                           expires_at=now + 60, user_ca=rogue_line),
                          asyncssh.generate_private_key("ssh-ed25519"))
    mgr = _as_manager(stack)
    mgr.pub(wire.req_topic("dev-o"), wire.encode(forged))
    mgr.close()
    wait_for(lambda: "refused open request " + "c" * 32 in _log(state), "forgery refused", 30)
    assert (state / "user_ca.pub").read_text().split()[1] == ca1

    # rotation: the manager gets a new CA; the running agent learns it at the next open
    stack.stop()
    for name in ("user_ca", "user_ca.pub"):
        (stack.dir / name).rename(stack.dir / f"{name}.old")
    stack.start()
    stack.wait_online("dev-o", 120)
    ca2 = (stack.dir / "user_ca.pub").read_text().split()[1]
    assert ca2 != ca1
    new_cert = _issue(stack, key, ttl=600)
    out = _run([*_ssh(stack, key, new_cert), "dev-o", "echo rotated"], env)
    assert out.returncode == 0 and out.stdout == b"rotated\n", out
    assert (state / "user_ca.pub").read_text().split()[1] == ca2
    assert proc.poll() is None  # the same agent process throughout
    # a certificate of the old CA no longer gets in
    _sign(asyncssh.read_private_key(str(stack.dir / "user_ca.old")), key, ["dpanel:*"],
          now - 60, now + 600)
    out = _run([*_ssh(stack, key, key.with_name("op-cert.pub")), "dev-o", "true"], env)
    assert out.returncode == 255, out
    wait_for(lambda: "another CA" in _log(state), "old CA refused", 30)


def test_ca_goes_only_to_agents_that_report_one(stack: Stack) -> None:
    """An agent from before certificates (no user_ca in its status) must never get an
    open request with the field: it would not verify (its signed bytes differ)."""
    tok = parse_token(stack.enrol("dev-s"))
    spy = Mqtt(stack.broker_port, "dev-s", tok.secret)
    spy.c.subscribe(wire.req_topic("dev-s"), qos=1)
    try:
        for status, expect in ((wire.Status(device="dev-s", state="online"), False),
                               (wire.Status(device="dev-s", state="online", user_ca=""),
                                True)):
            spy.messages.clear()
            # offline first: once the manager shows it online again, it has read this
            # very status (one topic, in order), user_ca included
            spy.pub(wire.status_topic("dev-s"), wire.encode(
                wire.Status(device="dev-s", state="offline")), retain=True)
            wait_for(lambda: not stack.device("dev-s")["online"], "dev-s offline", 30)
            spy.pub(wire.status_topic("dev-s"), wire.encode(status), retain=True)
            wait_for(lambda: stack.device("dev-s")["online"], "dev-s online", 30)
            opener = subprocess.Popen([str(BIN / "dpanel"), "tunnel", "open", "dev-s"],
                                      env=stack.env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            try:
                req = wire.decode(wait_for(lambda: [p for t, p in spy.messages
                                                    if t.endswith("/req")],
                                           "open request seen", 30)[0])
            finally:
                opener.kill()
                opener.wait()
            assert isinstance(req, wire.OpenRequest)
            assert (req.user_ca is not None) is expect, status
            if expect:
                assert req.user_ca == " ".join(
                    (stack.dir / "user_ca.pub").read_text().split()[:2])
    finally:
        spy.close()


def test_operator_laptop_over_https_scope_viewer_and_revocation(tmp_path: Path) -> None:
    """Operators from the `id` work: a viewer gets no certificate; a scoped operator on
    a "laptop" (fresh HOME, only a login context over HTTPS) gets one naming only the
    devices in scope, uses it with plain OpenSSH through the pinned-TLS WebSocket, is
    refused the other site's device, and once revoked gets no new certificate."""
    from support import free_port

    s = Stack(dir=tmp_path / "stack", broker_port=free_port(), tunnel_port=free_port(),
              api_port=free_port(), https_port=free_port())
    s.start()
    try:
        for name, site in (("dev-a", "a"), ("dev-b", "b")):
            tok = s.cli_ok("device", "add", name, "--label", f"site={site}",
                           "--print-token").strip()
            s.start_agent(tok, tmp_path / name)
        for name in ("dev-a", "dev-b"):
            s.wait_online(name)
        viewer = s.cli_ok("user", "add", "vera", "--role", "viewer", "--print-token").strip()
        alice = s.cli_ok("user", "add", "alice", "--role", "operator", "--scope", "site=a",
                         "--print-token").strip()
        key = _operator_key(tmp_path)
        pub = key.with_name("op.pub").read_text().strip()
        with pytest.raises(urllib.error.HTTPError) as exc:
            _api(s, "POST", "/v1/certs", {"public_key": pub}, token=viewer)
        assert exc.value.code == 403
        out = _api(s, "POST", "/v1/certs", {"public_key": pub, "ttl": 600}, token=alice)
        assert out["principals"] == ["dpanel:dev-a"] and out["key_id"] == "alice"
        cert = key.with_name("op-cert.pub")
        cert.write_text(out["certificate"] + "\n")

        home = tmp_path / "laptop"
        home.mkdir()
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}
        login = subprocess.run([str(BIN / "dpanel"), "login", f"https://127.0.0.1:{s.https_port}",
                                "--token", alice, "--ca-file", str(s.dir / "ca.pem")],
                               env=env, capture_output=True, timeout=120,
                               stdin=subprocess.DEVNULL)
        assert login.returncode == 0, login
        _api(s, "GET", "/v1/known_hosts")
        ssh = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
               "-o", f"ProxyCommand={BIN / 'dpanel'} proxy %n", "-i", str(key),
               "-o", f"CertificateFile={cert}", "-o", "IdentitiesOnly=yes",
               "-o", f"UserKnownHostsFile={s.dir / 'known_hosts'}",
               "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]
        res = _run([*ssh, "dev-a", "cat; exit 6"], env, b"over https\n")
        assert res.returncode == 6 and res.stdout == b"over https\n", res
        assert "proxy stream to dev-a opened by alice" in s.log()
        assert "certificate session opened for 'alice'" in _log(tmp_path / "dev-a")
        res = _run([*ssh, "dev-b", "true"], env)
        assert res.returncode == 255 and b"scope" in res.stderr, res
        s.cli_ok("user", "revoke", "alice")
        with pytest.raises(urllib.error.HTTPError) as exc:
            _api(s, "POST", "/v1/certs", {"public_key": pub}, token=alice)
        assert exc.value.code == 401
        res = _run([*ssh, "dev-a", "true"], env)  # the proxy is refused at once, too
        assert res.returncode == 255, res
    finally:
        s.close()
