"""Attacks that must fail, each against the real stack and the real agent."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import asyncssh
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from dpanel_proto import wire
from dpanel_proto.signing import sign_request
from dpanel_proto.token import parse_token
from stackfix import BIN, Stack
from support import stop_proc, wait_for


class Mqtt:
    """A bare MQTT session with someone's credentials (the attacker's tool)."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user)
        self.c.username_pw_set(user, password)
        self.c.on_message = lambda _c, _u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.c.on_connect = lambda _c, _u, _f, rc, _p: (not rc.is_failure and
                                                         self.connected.set())
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.connected.wait(10), f"{user} could not connect"

    def pub(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _as_manager(stack: Stack) -> Mqtt:
    pw = (stack.dir / "keys" / "broker-manager.secret").read_text().strip()
    # same username => same client id: this briefly bumps the real manager, which
    # reconnects by itself. Only someone holding the manager's broker password can publish
    # requests at all; the point here is that even they cannot replay or forge one.
    return Mqtt(stack.broker_port, "dpanel-manager", pw)


def _agent_log(state: Path) -> str:
    return (state / "agent.log").read_text(errors="replace")


def test_replayed_open_request_is_refused(stack: Stack, tmp_path: Path) -> None:
    token = stack.enrol("dev-r")
    tok = parse_token(token)
    # Capture a genuine signed request as it crosses the broker (the device's own
    # credentials can read its request topic while its agent is down).
    spy = Mqtt(stack.broker_port, "dev-r", tok.secret)
    spy.c.subscribe(wire.req_topic("dev-r"), qos=1)
    spy.pub(wire.status_topic("dev-r"), wire.encode(wire.Status(device="dev-r",
                                                                 state="online")))
    time.sleep(0.5)
    opener = subprocess.Popen([str(BIN / "dpanel"), "tunnel", "open", "dev-r"], env=stack.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    captured = wait_for(lambda: [p for t, p in spy.messages if t.endswith("/req")],
                        "request captured", 30)[0]
    stop_proc(opener)
    spy.close()
    state = tmp_path / "dev-r"
    stack.start_agent(token, state)
    stack.wait_online("dev-r")
    # The genuine request is still within its expiry: replay it twice.
    mgr = _as_manager(stack)
    mgr.pub(wire.req_topic("dev-r"), captured)
    mgr.pub(wire.req_topic("dev-r"), captured)
    mgr.close()
    wait_for(lambda: "replay" in _agent_log(state).lower(), "agent logs the replay", 20)
    # at most the first copy was honoured (it had never reached the agent before)
    assert _agent_log(state).lower().count("replay") >= 1


def test_expired_and_forged_requests_are_refused(stack: Stack, tmp_path: Path) -> None:
    state = tmp_path / "dev-x"
    stack.start_agent(stack.enrol("dev-x"), state)
    stack.wait_online("dev-x")
    manager_key = asyncssh.read_private_key(str(stack.dir / "keys" / "manager_key"))
    now = time.time()
    expired = sign_request(wire.OpenRequest(device="dev-x", id="e" * 32, issued_at=now - 600,
                                            expires_at=now - 500), manager_key)
    forged = sign_request(wire.OpenRequest(device="dev-x", id="f" * 32, issued_at=now,
                                           expires_at=now + 60),
                          asyncssh.generate_private_key("ssh-ed25519"))
    unsigned = wire.OpenRequest(device="dev-x", id="a" * 32, issued_at=now, expires_at=now + 60)
    other = sign_request(wire.OpenRequest(device="dev-other", id="b" * 32, issued_at=now,
                                          expires_at=now + 60), manager_key)
    mgr = _as_manager(stack)
    for req in (expired, forged, unsigned, other):
        mgr.pub(wire.req_topic("dev-x"), wire.encode(req))
    mgr.pub(wire.req_topic("dev-x"), b"\x00garbage{{{")
    mgr.pub(wire.req_topic("dev-x"), b"{" + b" " * (wire.MAX_PAYLOAD + 10) + b"}")
    mgr.close()
    wait_for(lambda: _agent_log(state).lower().count("refus") >= 4
             or _agent_log(state).lower().count("reject") >= 4, "four refusals logged", 20)
    time.sleep(1)
    assert stack.device("dev-x")["port"] is None  # no tunnel was opened
    # and the agent is alive and still obeys genuine requests (once the real manager,
    # bumped off the broker by our borrowed session above, is back)
    wait_for(lambda: stack.cli("exec", "dev-x", "--", "true").returncode == 0,
             "genuine exec after the attack", 30, interval=1)


def test_changed_host_key_is_refused(stack: Stack, tmp_path: Path) -> None:
    token = stack.enrol("dev-k")
    state = tmp_path / "dev-k"
    agent = stack.start_agent(token, state)
    stack.wait_online("dev-k")
    assert stack.cli("exec", "dev-k", "--", "true").returncode == 0
    stop_proc(agent)
    stack.wait_offline("dev-k")
    shutil.rmtree(state)  # a new card with the same token: a new host key
    stack.start_agent(token, state)
    wait_for(lambda: not stack.device("dev-k")["host_key_ok"], "mismatch noticed", 30)
    out = stack.cli("exec", "dev-k", "--", "true")
    assert out.returncode == 255 and b"changed its SSH host key" in out.stderr
    # the operator accepts the re-imaged device on purpose
    old_key = stack.device("dev-k")["host_key"]
    stack.cli_ok("device", "reset-hostkey", "dev-k")
    new_key = stack.device("dev-k")["host_key"]
    assert new_key and new_key != old_key
    assert stack.cli("exec", "dev-k", "--", "true").returncode == 0


def test_device_cannot_impersonate_another_via_its_port(stack: Stack, tmp_path: Path) -> None:
    stack.start_agent(stack.enrol("dev-b"), tmp_path / "dev-b")
    stack.wait_online("dev-b")
    b_port = int(stack.cli_ok("tunnel", "open", "dev-b").rsplit(":", 1)[1])
    # dev-a is an attacker holding only its own credentials: it announces itself, then
    # answers every open request with dev-b's port.
    tok_a = parse_token(stack.enrol("dev-a"))
    key_a = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    evil = Mqtt(stack.broker_port, "dev-a", tok_a.secret)

    def on_message(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        req = wire.decode(m.payload)
        evil.c.publish(wire.resp_topic("dev-a"), wire.encode(wire.Response(
            device="dev-a", id=req.id, code=wire.ErrorCode.OK, port=b_port)), qos=1)

    evil.c.on_message = on_message
    evil.c.subscribe(wire.req_topic("dev-a"), qos=1)
    evil.pub(wire.status_topic("dev-a"), wire.encode(wire.Status(
        device="dev-a", state="online", host_key=key_a)), retain=True)
    stack.wait_online("dev-a")
    out = stack.cli("exec", "dev-a", "--", "hostname")
    evil.close()
    assert out.returncode == 255, out
    assert b"refused" in out.stderr
    # and announcing dev-b's host key as its own does not get it pinned
    b_key = stack.device("dev-b")["host_key"]
    tok_c = parse_token(stack.enrol("dev-c"))
    thief = Mqtt(stack.broker_port, "dev-c", tok_c.secret)
    thief.pub(wire.status_topic("dev-c"), wire.encode(wire.Status(
        device="dev-c", state="online", host_key=b_key)))
    wait_for(lambda: not stack.device("dev-c")["host_key_ok"], "stolen key refused", 15)
    assert stack.device("dev-c")["host_key"] is None
    thief.close()


def test_wrong_token_never_gets_in_and_agent_keeps_trying(stack: Stack,
                                                           tmp_path: Path) -> None:
    tok = parse_token(stack.enrol("dev-w"))
    bad = dataclasses.replace(tok, secret="W" * 43).encode()
    state = tmp_path / "dev-w"
    agent = stack.start_agent(bad, state)
    time.sleep(6)
    assert agent.poll() is None, "agent must keep running and retrying"
    assert not stack.device("dev-w")["online"]
    log = _agent_log(state).lower()
    assert "not authori" in log or "bad user name or password" in log or "refused" in log


def test_revoked_device_is_cut_off_at_once(stack: Stack, tmp_path: Path) -> None:
    stack.start_agent(stack.enrol("dev-v"), tmp_path / "dev-v")
    stack.wait_online("dev-v")
    port = int(stack.cli_ok("tunnel", "open", "dev-v").rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    stack.cli_ok("device", "revoke", "dev-v")

    def port_closed() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return False
        except OSError:
            return True

    wait_for(port_closed, "tunnel port closed after revoke", 15)
    out = stack.cli("exec", "dev-v", "--", "true")
    assert out.returncode == 255 and b"revoked" in out.stderr
    time.sleep(3)  # it keeps knocking, and stays out
    assert port_closed()
    assert "dev-v" not in stack.cli_ok("tunnel", "list")
