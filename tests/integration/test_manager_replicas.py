"""Two manager replicas on one PostgreSQL and one Mosquitto, with real agents.

The appliance layout (broker, ``dpanel tunnel run``) plus two ``dpanel manager run``
processes, replicas "a" and "b", each with its own API port and broker client id, on one
real PostgreSQL 15. API calls alternate between the replicas; presence, requests and
answers must be right on either. A job whose part waits for a device that comes back
online is seen by both replicas' schedulers at the same presence push, and must run
once. Then one replica is killed with a command running through it: that command fails
with a clear error, and the other replica carries on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import paho.mqtt.client as mqtt
import pytest
import tomli_w
import tomllib
from pgfix import Postgres
from test_tunnel_layouts import Appliance

from dpanel_proto.token import parse_token
from dpanel_server.registry import Registry
from dpanel_server.stack import prepare_stack, start_mosquitto
from dpanel_server.tunnelctl import TunnelControl, control_path
from stackfix import BIN
from support import free_port, stop_proc, wait_for


@dataclass
class Replicas(Appliance):
    """Appliance with a second manager process (``proc_b``) on its own config file."""

    api_port_b: int = 0
    proc_b: Optional[subprocess.Popen[bytes]] = None

    @property
    def config_b(self) -> Path:
        return self.dir / "server-b.toml"

    def start(self) -> None:
        prepare_stack(self.dir, broker_port=self.broker_port, tunnel_port=self.tunnel_port,
                      api_port=self.api_port, port_range=self.port_range,
                      registry=self.registry)
        data = tomllib.loads(self.config.read_text())
        data["manager"]["replica"] = "a"
        self.config.write_text(tomli_w.dumps(data))
        data["manager"]["replica"] = "b"
        data["manager"]["api_listen"] = f"127.0.0.1:{self.api_port_b}"
        self.config_b.write_text(tomli_w.dumps(data))
        self.config_b.chmod(0o600)
        from dpanel_server.config import load_config

        self.broker = start_mosquitto(load_config(self.config))
        self.tunnel = self._daemon("tunnel")
        wait_for(lambda: TunnelControl(control_path(self.dir)).stats().get("reachable"),
                 "tunnel control socket up", 60)
        # both at once, on one state directory: they must agree on the manager key and
        # the admin token that the first start generates
        self.proc = self._daemon("manager")
        self.proc_b = self._manager_b()
        for replica in ("a", "b"):
            last: list[bytes] = []

            def up(replica: str = replica, last: list[bytes] = last) -> bool:
                out = self.on(replica, "device", "list", timeout=60)
                last[:] = [out.stderr]
                return out.returncode == 0

            try:
                wait_for(up, f"replica {replica} up", 60)
            except TimeoutError:
                raise AssertionError(f"replica {replica}: {last!r}\n{self.log()[-2000:]}"
                                     ) from None

    def _manager_b(self) -> subprocess.Popen[bytes]:
        log = (self.dir.parent / f"{self.dir.name}-manager-b.log").open("ab")
        return subprocess.Popen([str(BIN / "dpanel"), "--config", str(self.config_b),
                                 "manager", "run", "--log-level", "info"], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def env_of(self, replica: str) -> dict[str, str]:
        return dict(self.env, DPANEL_CONFIG=str(self.config if replica == "a"
                                                else self.config_b))

    def on(self, replica: str, *args: str,
           timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(BIN / "dpanel"), *args], env=self.env_of(replica),
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def on_ok(self, replica: str, *args: str) -> str:
        out = self.on(replica, *args)
        assert out.returncode == 0, (replica, args, out.stdout, out.stderr)
        return out.stdout.decode()

    def state_on(self, replica: str, device: str) -> str:
        return str(json.loads(self.on_ok(replica, "device", "show", device))["state"])

    def log(self) -> str:
        p = self.dir.parent / f"{self.dir.name}-manager-b.log"
        return super().log() + (p.read_text(errors="replace") if p.exists() else "")

    def close(self) -> None:
        if self.proc_b is not None:
            stop_proc(self.proc_b)
        super().close()


@pytest.fixture(scope="module")
def replicas(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("replicas")
    s = Replicas(dir=tmp / "st", broker_port=free_port(), tunnel_port=free_port(),
                 api_port=free_port(), api_port_b=free_port(), registry=postgres.new_db())
    s.start()
    try:
        yield s
    finally:
        s.close()


def _connack(port: int, user: str, password: str, client_id: str) -> int:
    """The broker's CONNACK code for this login (0: accepted)."""
    got: list[int] = []
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        got.append(int(rc.value) if hasattr(rc, "value") else int(rc))
        done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.username_pw_set(user, password)
    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert done.wait(30), "no CONNACK"
    finally:
        c.loop_stop()
        c.disconnect()
    return got[0]


def _wait_state(s: Replicas, device: str, state: str, timeout: float = 60) -> None:
    for replica in ("a", "b"):
        wait_for(lambda r=replica: s.state_on(r, device) == state,  # type: ignore[misc]
                 f"{device} {state} on replica {replica}", timeout)


def test_replicas_serve_presence_requests_jobs_and_survive_a_kill(
        replicas: Replicas, tmp_path: Path) -> None:
    s = replicas
    # enrol on either replica: the database is shared
    tokens = {"dev-1": s.on_ok("a", "device", "add", "dev-1", "--print-token").strip(),
              "dev-2": s.on_ok("b", "device", "add", "dev-2", "--print-token").strip()}
    agents = {d: s.start_agent(t, tmp_path / d) for d, t in tokens.items()}
    for d in tokens:
        _wait_state(s, d, "online")

    # replicas have their own client ids because the broker no longer forces client id
    # = username; the dynamic-security plugin still binds each device's: dev-2 with its
    # own password but dev-1's client id is refused, and dev-1 keeps its session
    agent_log = tmp_path / "dev-1" / "agent.log"
    drops = agent_log.read_text().count("lost the broker connection")
    assert _connack(s.broker_port, "dev-2", parse_token(tokens["dev-2"]).secret,
                    "dev-1") != 0
    assert _connack(s.broker_port, "dev-2", parse_token(tokens["dev-2"]).secret,
                    "dev-2-probe") != 0
    time.sleep(2)  # a takeover would have closed dev-1's session at once
    assert agent_log.read_text().count("lost the broker connection") == drops
    assert s.state_on("a", "dev-1") == "online"

    # requests and answers, alternating: each answer reaches both replicas, and the one
    # that asked takes it
    for i, (replica, device) in enumerate([("a", "dev-1"), ("b", "dev-1"), ("b", "dev-2"),
                                          ("a", "dev-2"), ("b", "dev-1"), ("a", "dev-1")]):
        out = s.on(replica, "exec", device, "--", "sh", "-c", f"echo {device}-{i}; exit 3")
        assert (out.returncode, out.stdout) == (3, f"{device}-{i}\n".encode()), \
            (replica, out.stderr)

    # presence push seen by both replicas at once: dev-2 goes away, a job is started
    # with its part pending, and dev-2 comes back; both schedulers see it come online
    stop_proc(agents["dev-2"])
    _wait_state(s, "dev-2", "offline", 120)
    runs = tmp_path / "runs"
    job = json.loads(s.on_ok("b", "job", "run", "dev-1", "dev-2", "--json", "--",
                             "sh", "-c", f"echo ran >> {runs}"))["id"]

    def parts() -> dict[str, Any]:
        shown = json.loads(s.on_ok("a", "job", "show", job, "--json"))
        return {p["device"]: p["state"] for p in shown["parts"]}

    wait_for(lambda: parts()["dev-1"] not in ("pending", "running"), "dev-1 part done", 60)
    assert parts()["dev-1"] == "succeeded", s.on_ok("a", "job", "show", job, "--json")
    assert parts()["dev-2"] == "pending"
    agents["dev-2"] = s.start_agent(tokens["dev-2"], tmp_path / "dev-2")
    wait_for(lambda: parts()["dev-2"] not in ("pending", "running"), "dev-2 part done", 90)
    time.sleep(2)  # a second run would need a second claim, which the CAS refuses
    assert runs.read_text() == "ran\nran\n", "a job part ran twice (or not at all)"
    assert parts() == {"dev-1": "succeeded", "dev-2": "succeeded"}

    # the devices' audit records of all this were stored (once each: the shared
    # subscription hands each to one replica, and the unique key would refuse a second)
    reg = Registry(s.registry or "")
    try:
        rows = reg.db.execute("SELECT COUNT(*), COUNT(DISTINCT rid) FROM audit_log "
                              "WHERE origin = 'device'", ())
    finally:
        reg.close()
    assert rows[0][0] >= 8 and rows[0][0] == rows[0][1], rows

    # kill replica b with a command running through it: that command fails clearly
    started = tmp_path / "started"
    running = subprocess.Popen(
        [str(BIN / "dpanel"), "exec", "dev-1", "--", "sh", "-c",
         f"touch {started}; sleep 30; echo never"], env=s.env_of("b"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_for(started.exists, "the command runs on dev-1", 60)
        assert s.proc_b is not None
        os.kill(s.proc_b.pid, signal.SIGKILL)
        out, err = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode != 0 and b"never" not in out
    assert err.strip() and b"Traceback" not in err, err
    # new calls to replica b fail at once, naming what failed
    dead = s.on("b", "device", "list", timeout=60)
    assert dead.returncode != 0 and b"Traceback" not in dead.stderr, dead.stderr

    # replica a carries on: requests on both devices, presence, and a new job
    for device in tokens:
        out = s.on("a", "exec", device, "--", "echo", f"still {device}")
        assert (out.returncode, out.stdout) == (0, f"still {device}\n".encode()), out.stderr
    stop_proc(agents["dev-1"])
    wait_for(lambda: s.state_on("a", "dev-1") == "offline", "dev-1 offline on a", 120)
    assert s.state_on("a", "dev-2") == "online"
    assert "bug:" not in s.log() and "Traceback" not in s.log(), s.log()[-3000:]
    assert "subscription to" not in s.log(), s.log()[-3000:]  # no refused SUBACK
