"""The manager against hostile devices, frozen agents and a stalled broker, all real.

Each test runs the real stack (Mosquitto + tunnel + manager + API), real agents and, for
the hostile device, a bare paho client holding a real enrolled device's credentials.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import asyncssh
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, rsa
from paho.mqtt.enums import CallbackAPIVersion

from dpanel_proto import wire
from dpanel_proto.token import parse_token
from stackfix import Stack
from support import wait_for


class Hostile:
    """A device's own broker session, driven by hand (the attacker owns that device)."""

    def __init__(self, stack: Stack, device: str) -> None:
        tok = parse_token(stack.tokens[device])
        self.device = device
        self.connected = threading.Event()
        self.requests: list[wire.Message] = []
        self.answer: wire.Response | None = None
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device)
        self.c.username_pw_set(device, tok.secret)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: (not rc.is_failure and
                                                         self.connected.set())
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", stack.broker_port)
        self.c.loop_start()
        assert self.connected.wait(10), f"{device} could not connect"
        self.c.subscribe(wire.req_topic(device), qos=1)

    def _on_message(self, _c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        req = wire.decode(m.payload)
        self.requests.append(req)
        if self.answer is not None and not isinstance(req, (wire.Status, wire.Response)):
            resp = {**json.loads(wire.encode(self.answer)), "id": req.id}
            self.c.publish(wire.resp_topic(self.device), json.dumps(resp).encode(), qos=1)

    def status(self, *, host_key: str = "", agent_version: str = "1.0",
               raw: dict[str, object] | None = None) -> None:
        msg = {"v": 1, "type": "status", "device": self.device, "state": "online",
               "agent_version": agent_version, "host_key": host_key, **(raw or {})}
        self.c.publish(wire.status_topic(self.device), json.dumps(msg).encode(), qos=1,
                       retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _line(key: asyncssh.SSHKey) -> str:
    return " ".join(key.export_public_key().decode().split()[:2])


def _openssh_line(pub: dsa.DSAPublicKey | rsa.RSAPublicKey) -> str:
    return pub.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()


def _ssh(stack: Stack, device: str) -> subprocess.CompletedProcess[bytes]:
    """Real OpenSSH through `dpanel proxy`, trusting only the manager's known_hosts."""
    stack.cli_ok("ssh-config")  # refreshes known_hosts
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
         "-o", f"ProxyCommand={stack.proxy_command()}",
         "-i", str(stack.dir / "keys" / "manager_key"), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={stack.dir / 'known_hosts'}",
         "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR", device, "echo", "ok"],
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def victim(stack: Stack, tmp_path: Path) -> Iterator[str]:
    stack.start_agent(stack.enrol("dev-v"), tmp_path / "dev-v")
    stack.wait_online("dev-v")
    assert stack.cli("exec", "dev-v", "--", "true").returncode == 0
    yield "dev-v"


# ------------------------------------------------------------------------------ 8.A3


@pytest.mark.filterwarnings("ignore:SSH DSA key support is deprecated")
def test_device_supplied_strings_reach_no_file_terminal_or_log(stack: Stack,
                                                                victim: str) -> None:
    v_key = stack.device(victim)["host_key"]
    assert v_key
    stack.enrol("dev-h")
    evil = Hostile(stack, "dev-h")
    own = _line(asyncssh.generate_private_key("ssh-ed25519"))
    dsa_key = _openssh_line(dsa.generate_private_key(1024).public_key())
    rsa_1024 = _openssh_line(rsa.generate_private_key(65537, 1024).public_key())
    attacks = [
        own + "\n@revoked * " + v_key,           # (a) a second known_hosts line
        own + "\r\n@revoked * " + v_key,
        f"{own} {v_key}",                         # (b) two keys on one line
        own + "\n" + v_key,                       # (b) two keys on two lines
        dsa_key,                                  # (c) DSA
        "ssh-ed25519 AAAAnot-base64!!",          # (c) garbage
        "ssh-ed25519 " + v_key.split()[1][:-8],   # (c) truncated
        rsa_1024,                                 # (c) 1024-bit RSA
        "ssh-rsa " + own.split()[1],             # (c) says RSA, holds ed25519
        "@revoked " + own,
    ]
    for key in attacks:
        evil.status(host_key=key)
    # (d) a terminal-driving agent_version, with a good key
    evil.status(host_key=own, agent_version="1.0\x1b[2J\x1b]0;owned\x07\nFAKE")
    time.sleep(2)
    assert not stack.device("dev-h")["online"], "no bad status may be taken"
    assert stack.device("dev-h")["host_key"] is None
    # a good status with a comment: pinned as our own serialisation, comment dropped
    evil.status(host_key=own + " root@evil", agent_version="1.0")
    stack.wait_online("dev-h")
    assert stack.device("dev-h")["host_key"] == own
    # (e) control characters in a response message (the device refuses an open)
    evil.answer = wire.Response(device="dev-h", id="0" * 32,
                                code=wire.ErrorCode.TUNNEL_REFUSED,
                                message="\x1b[2J\x1b[31mno\r\nERROR forged log line")
    out = stack.cli("tunnel", "open", "dev-h")
    assert out.returncode != 0 and b"tunnel refused" in out.stderr, out
    assert b"\x1b" not in out.stderr and b"\r" not in out.stderr
    assert b"\nERROR forged" not in out.stderr
    out = stack.cli("exec", "dev-h", "--", "true")
    assert out.returncode == 255 and b"\x1b" not in out.stderr, out
    evil.close()

    listing = stack.cli("device", "list")
    assert listing.returncode == 0
    assert b"\x1b" not in listing.stdout and b"FAKE" not in listing.stdout
    as_json = stack.cli_ok("device", "list", "--json")
    assert "\x1b" not in as_json and "@revoked" not in as_json
    stack.cli_ok("ssh-config")
    known = (stack.dir / "known_hosts").read_bytes()
    assert b"@revoked" not in known and b"\r" not in known and b"\x1b" not in known
    lines = known.decode().splitlines()
    assert sorted(lines) == sorted([f"dev-h,dev-h.dpanel {own}",
                                    f"dev-v,dev-v.dpanel {v_key}"]), lines
    log = stack.log()
    assert "\x1b" not in log and "\x07" not in log
    assert "\n@revoked" not in log and "\nFAKE" not in log and "\nERROR forged" not in log
    # the other device is untouched: pinned key unchanged, reachable by real OpenSSH
    assert stack.device(victim)["host_key"] == v_key and stack.device(victim)["host_key_ok"]
    out = _ssh(stack, victim)
    assert out.returncode == 0 and out.stdout == b"ok\n", out


# ------------------------------------------------------------------------------ 8.B6


def _agent_config(tmp_path: Path, keepalive: int) -> tuple[str, ...]:
    conf = tmp_path / "agent.toml"
    conf.write_text(f"mqtt_keepalive = {keepalive}\n")
    return ("--config", str(conf))


def test_frozen_agent_is_not_answering_and_exec_fails_fast(stack: Stack,
                                                           tmp_path: Path) -> None:
    agent = stack.start_agent(stack.enrol("dev-z"), tmp_path / "dev-z",
                              # the broker drops a frozen agent after 1.5 x 30 s: well
                              # after the first request's 15 s timeout, even on a loaded
                              # machine (with 10 s, the will could win the race)
                              extra=_agent_config(tmp_path, 30))
    stack.wait_online("dev-z")
    assert stack.cli("exec", "dev-z", "--", "true").returncode == 0
    stack.cli_ok("tunnel", "close", "dev-z")
    os.killpg(agent.pid, signal.SIGSTOP)
    try:
        # the first request has to wait for its timeout: that is how we learn it
        out = stack.cli("exec", "dev-z", "--", "true")
        assert out.returncode == 255 and b"timed out after" in out.stderr, out
        # from then on: at once, and saying what is wrong
        t0 = time.monotonic()
        out = stack.cli("exec", "dev-z", "--", "true")
        took = time.monotonic() - t0
        assert out.returncode == 255, out
        assert b"dev-z is connected but not answering (since " in out.stderr, out
        assert took < 15, f"exec to a not-answering device took {took:.1f} s"
        # the API and `device list` say so too
        shown = json.loads(stack.cli_ok("device", "show", "dev-z"))
        assert shown["state"] == "not_answering" and shown["not_answering_since"], shown
        listed = stack.cli("device", "list")
        assert any(line.split()[:2] == [b"dev-z", b"not_answering"]
                   for line in listed.stdout.splitlines()), listed
    finally:
        os.killpg(agent.pid, signal.SIGCONT)
    # the manager's ping notices that it is back; no status needed
    wait_for(lambda: stack.cli("exec", "dev-z", "--", "true").returncode == 0,
             "exec once the agent thaws", 40, interval=1)

    # a frozen agent behind a pooled SSH connection: no session within the timeout
    os.killpg(agent.pid, signal.SIGSTOP)
    try:
        out = stack.cli("exec", "dev-z", "--", "true")
        assert out.returncode == 255 and b"not answering" in out.stderr, out
        # and it shows offline once the broker's keepalive (1.5 x 30 s) runs out
        stack.wait_offline("dev-z", timeout=80)
        out = stack.cli("exec", "dev-z", "--", "true")
        assert out.returncode == 255 and b"offline" in out.stderr, out
    finally:
        os.killpg(agent.pid, signal.SIGCONT)
    stack.wait_online("dev-z", timeout=60)
    wait_for(lambda: stack.cli("exec", "dev-z", "--", "true").returncode == 0,
             "exec after the agent came back", 40, interval=1)


def test_stalled_broker_is_noticed_and_late_opens_are_closed(stack: Stack,
                                                            tmp_path: Path) -> None:
    state = tmp_path / "dev-s"
    stack.start_agent(stack.enrol("dev-s"), state)
    stack.wait_online("dev-s")
    assert stack.cli("exec", "dev-s", "--", "true").returncode == 0
    stack.cli_ok("tunnel", "close", "dev-s")
    wait_for(lambda: stack.ports_in_use() == 0, "tunnel closed", 15)
    broker = stack.broker_pid()

    # 1. a request queued in a stalled broker, answered after its caller gave up
    agent_log = state / "agent.log"
    mark = len(agent_log.read_text())
    os.kill(broker, signal.SIGSTOP)
    try:
        out = stack.cli("tunnel", "open", "dev-s")
        assert out.returncode != 0, out
    finally:
        os.kill(broker, signal.SIGCONT)
    # The agent may act on the request late (it is still within its lifetime and the
    # device's clock tolerance), or refuse it as expired; either way no tunnel may stay
    # open with nobody waiting: the manager closes it.
    wait_for(lambda: stack.health().get("broker") is True, "manager back on the broker", 60)
    wait_for(lambda: "open request" in agent_log.read_text()[mark:]
             or "refused open" in agent_log.read_text()[mark:], "agent saw the request", 30)
    wait_for(lambda: stack.ports_in_use() == 0, "late tunnel closed", 30)
    after = agent_log.read_text()[mark:]
    if "tunnel up" in after:
        assert "tunnel closed: close request" in after, after
        assert "closing the tunnel of dev-s" in stack.log()
    time.sleep(3)
    assert stack.ports_in_use() == 0

    # 2. a stalled broker is noticed within two manager keepalives (10 s each)
    os.kill(broker, signal.SIGSTOP)
    try:
        wait_for(lambda: stack.health().get("broker") is False, "stall noticed", 30)
        t0 = time.monotonic()
        out = stack.cli("exec", "dev-s", "--", "true")
        assert out.returncode == 255 and b"not connected to the broker" in out.stderr, out
        assert time.monotonic() - t0 < 15
    finally:
        os.kill(broker, signal.SIGCONT)
    wait_for(lambda: stack.health().get("broker") is True, "manager back", 60)
    wait_for(lambda: stack.cli("exec", "dev-s", "--", "true").returncode == 0,
             "exec after the stall", 60, interval=1)
