"""A real two-node RabbitMQ cluster (Debian's rabbitmq-server, MQTT plugin) with the
manager as its HTTP auth backend: devices spread over both nodes, revoke cuts one off
at once, and when a node dies its devices move to the other by themselves.

One cluster for the whole module (booting RabbitMQ is the slow part); the tests run in
file order and build on each other's devices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as mqtt
import pytest
from rabbitfix import Cluster, Node, available

from dpanel_proto import wire
from dpanel_proto.token import parse_token
from dpanel_server._files import ensure_secret
from dpanel_server.brokerauth import broker_auth_secret_path
from dpanel_server.config import dump_config, stack_config
from stackfix import BIN, Stack
from support import free_port, stop_proc, wait_for

pytestmark = pytest.mark.skipif(not available(), reason="rabbitmq-server is not installed")

#: crc32(name) % 2 puts rmq-1/rmq-2 first on node a, rmq-4/rmq-5 first on node b
ON_A = ("rmq-1", "rmq-2")
ON_B = ("rmq-4", "rmq-5")


@dataclass
class Env:
    stack: Stack  # only its CLI/agent helpers: the manager and tunnel run apart
    cluster: Cluster
    a: Node
    b: Node
    manager_password: str
    auth_url: str
    dir: Path
    procs: list[subprocess.Popen[bytes]]
    manager_env: dict[str, str]


@pytest.fixture(scope="module")
def rmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("rmq")
    state = d / "state"
    state.mkdir(mode=0o700)
    api_port = free_port()
    cfg = stack_config(state, broker_port=free_port(), tunnel_port=free_port(),
                       api_port=api_port, port_range="31000-31999")
    auth_port = free_port()
    secret = ensure_secret(broker_auth_secret_path(cfg))
    cluster = Cluster(dir=d / "rabbit", auth_port=auth_port, auth_secret=secret)
    a, b = cluster.add_nodes("a", "b")
    procs: list[subprocess.Popen[bytes]] = []
    stack = Stack(dir=state, broker_port=a.mqtt_port, tunnel_port=0, api_port=api_port)
    try:
        cluster.start()
        cfg.broker.url = cfg.broker.public_url = f"{a.url},{b.url}"
        cfg.broker.auth = "http"
        cfg.broker.auth_listen = f"127.0.0.1:{auth_port}"
        cfg.broker.kick = f"rabbitmqctl:{a.name}"
        (state / "server.toml").write_text(dump_config(cfg))
        # rabbitmqctl (the revoke's kick) needs the cluster's cookie and epmd port
        env = dict(a.env, DPANEL_CONFIG=str(state / "server.toml"))
        for role in ("tunnel", "manager"):
            log = (d / f"{role}.log").open("ab")
            procs.append(subprocess.Popen(
                [str(BIN / "dpanel"), "--config", str(state / "server.toml"), role, "run",
                 "--log-level", "info"], env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL))
        wait_for(lambda: stack.health().get("broker"), "manager on the broker", 60)
        yield Env(stack, cluster, a, b, ensure_secret(cfg.broker.password_file),
                  f"http://127.0.0.1:{auth_port}/brokerauth", d, procs, env)
    finally:
        stack.close()
        for p in procs:
            stop_proc(p)
        cluster.stop()


def _login(port: int, user: str, password: str, client_id: str = "") -> str:
    result: list[str] = []
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user)
    c.username_pw_set(user, password)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        result.append(str(rc))
        done.set()

    c.on_connect = on_connect
    c.on_disconnect = lambda *_: done.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        done.wait(20)
    finally:
        c.loop_stop()
        c.disconnect()
    return result[0] if result else "refused"


def _node_users(node: Node, ask: Node | None = None) -> set[str]:
    """Client ids connected to ``node``: a connection's name ends with the MQTT listener
    it came in on (``127.0.0.1:5123 -> 127.0.0.1:PORT``)."""
    out = (ask or node).ctl("list_mqtt_connections", "client_id", "conn_name",
                            "--no-table-headers", "--silent")
    users = set()
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].strip().endswith(f":{node.mqtt_port}"):
            users.add(parts[0].strip())
    return users


def _retained(port: int, user: str, password: str) -> dict[str, bytes]:
    """The retained statuses a fresh subscriber on this node gets."""
    got: dict[str, bytes] = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe{time.time_ns()}")
    c.username_pw_set(user, password)
    c.on_message = lambda _c, _u, m: got.__setitem__(m.topic, bytes(m.payload))
    c.on_connect = lambda cl, *_: cl.subscribe(f"{wire.TOPIC_ROOT}/+/status", qos=1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(3)  # retained messages arrive right after SUBACK; nothing to wait *for*
    c.loop_stop()
    c.disconnect()
    return got


def test_auth_backend_is_the_brokers_only(rmq: Env) -> None:
    base = rmq.auth_url
    form = b"username=dpanel-manager&password=" + rmq.manager_password.encode()
    wrong = urllib.request.Request(f"{base}/not-the-secret/user", data=form)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(wrong, timeout=10)
    assert exc.value.code == 404
    # a device id with someone else's client id, a wrong secret: refused by the broker
    tok = rmq.stack.enrol("rmq-x")
    secret = parse_token(tok).secret
    assert _login(rmq.a.mqtt_port, "rmq-x", "x" + secret) != "Success"
    assert _login(rmq.a.mqtt_port, "rmq-x", secret, client_id="rmq-1") != "Success"
    assert _login(rmq.b.mqtt_port, "rmq-x", secret) == "Success"


def test_devices_spread_over_both_nodes(rmq: Env, tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.mktemp("agents")
    for name in (*ON_A, *ON_B):
        rmq.stack.start_agent(rmq.stack.enrol(name), d / name)
    for name in (*ON_A, *ON_B):
        rmq.stack.wait_online(name, timeout=60)
    try:
        wait_for(lambda: set(ON_A) <= _node_users(rmq.a) and set(ON_B) <= _node_users(rmq.b),
                 "devices on their own nodes", 60, interval=1)
    except TimeoutError:
        print(rmq.a.ctl("list_mqtt_connections", "client_id", "conn_name"))
        raise
    for name in (*ON_A, *ON_B):
        out = rmq.stack.cli("exec", name, "--", "echo", name)
        assert out.returncode == 0 and out.stdout == f"{name}\n".encode(), out


def test_retained_presence_and_wills_across_nodes(rmq: Env) -> None:
    # What the manager cannot rely on: RabbitMQ 3.10 keeps retained messages per node and
    # sends none to a wildcard subscription (this probe's dpanel/+/status gets nothing on
    # either node; see README). Presence does without them (presencesync.py).
    seen_a = _retained(rmq.a.mqtt_port, "dpanel-manager", rmq.manager_password)
    seen_b = _retained(rmq.b.mqtt_port, "dpanel-manager", rmq.manager_password)
    topic = wire.status_topic
    on_b_seen_from_a = [n for n in ON_B if topic(n) in seen_a]
    on_a_seen_from_b = [n for n in ON_A if topic(n) in seen_b]
    print(f"retained seen across nodes: a sees {on_b_seen_from_a}, b sees {on_a_seen_from_b}")
    # a will fires on the device's node and reaches the manager (on node a) via the cluster
    agent = next(p for p in rmq.stack.agents if ON_B[1] in " ".join(map(str, p.args)))
    os.killpg(agent.pid, signal.SIGKILL)
    rmq.stack.wait_offline(ON_B[1], timeout=90)


def test_manager_restart_sees_devices_on_every_node(rmq: Env) -> None:
    # the restarted manager lands on node a; the statuses retained on node b never reach
    # it (per-node retained store), so it pings the devices it has not heard of
    manager = rmq.procs[1]
    stop_proc(manager)
    rmq.procs[1] = subprocess.Popen(manager.args, env=rmq.manager_env,
                                    stdout=(rmq.dir / "manager.log").open("ab"),
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for(lambda: rmq.stack.health().get("broker"), "manager back on the broker", 60)
    for name in (ON_A[0], ON_A[1], ON_B[0]):
        rmq.stack.wait_online(name, timeout=60)
    assert rmq.stack.cli("exec", ON_B[0], "--", "true").returncode == 0


def _states(rmq: Env) -> dict[str, str] | None:
    """GET /v1/devices straight (the CLI is a process start per call: too slow to see a
    short window): device -> state, or None while the API does not answer."""
    token = (rmq.stack.dir / "keys" / "admin.token").read_text().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{rmq.stack.api_port}/v1/devices",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return {d["id"]: d["state"] for d in json.loads(r.read())}
    except OSError:
        return None


def test_manager_restart_never_shows_live_devices_offline(
        rmq: Env, tmp_path_factory: pytest.TempPathFactory) -> None:
    # RabbitMQ never sends a retained message to a wildcard subscription (and keeps them
    # per node), so a restarted manager hears no status at all: it must show what the
    # shared store last recorded, verify it (a resync ping each), and mark offline what
    # died while no manager listened for its will.
    live = (ON_A[0], ON_A[1], ON_B[0])
    gone = "rmq-6"
    agent = rmq.stack.start_agent(rmq.stack.enrol(gone), tmp_path_factory.mktemp(gone))
    rmq.stack.wait_online(gone, timeout=60)
    manager = rmq.procs[1]
    stop_proc(manager)
    os.killpg(agent.pid, signal.SIGKILL)  # its will fires with no manager subscribed
    agent.wait(30)
    rmq.procs[1] = subprocess.Popen(manager.args, env=rmq.manager_env,
                                    stdout=(rmq.dir / "manager.log").open("ab"),
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    snapshots: list[dict[str, str]] = []

    def settled() -> bool:
        states = _states(rmq)
        if states is None:
            return False
        snapshots.append(states)
        return states[gone] == "offline" and all(states[d] == "online" for d in live)

    wait_for(settled, "live devices online and the dead one offline", 90, interval=0.2)
    flickered = [(i, d, s[d]) for i, s in enumerate(snapshots) for d in live
                 if s[d] != "online"]
    assert not flickered, f"live devices shown offline after the restart: {flickered[:5]}"
    assert snapshots[0][gone] == "online"  # as recorded, until the resync gave up on it
    out = rmq.stack.cli("exec", ON_B[0], "--", "echo", "b")  # the device on the other node
    assert out.returncode == 0 and out.stdout == b"b\n", out
    log = (rmq.dir / "manager.log").read_text()
    assert f"device {gone} did not answer after the broker connect: offline" in log


def test_revoke_closes_the_connection_at_once(rmq: Env) -> None:
    victim = ON_A[1]
    rmq.stack.cli_ok("device", "revoke", victim)
    rmq.stack.wait_offline(victim, timeout=30)
    wait_for(lambda: victim not in _node_users(rmq.a) | _node_users(rmq.b, rmq.a),
             "revoked device's connection closed", 30, interval=1)
    secret = parse_token(rmq.stack.tokens[victim]).secret
    assert _login(rmq.a.mqtt_port, victim, secret) != "Success"


def test_node_death_moves_devices_to_the_other(rmq: Env) -> None:
    survivor = ON_B[0]
    assert survivor in _node_users(rmq.b)
    log = rmq.stack.agents[[*ON_A, *ON_B].index(survivor)].args
    agent_log = Path(str(log[log.index("--state-dir") + 1])) / "agent.log"
    seen = len(agent_log.read_text())
    rmq.b.kill()
    # The device of the dead node comes back on node a by itself. (rabbitmqctl cannot
    # list MQTT connections while a node of the cluster is down: the agent's log says.)
    wait_for(lambda: f"connected to broker 127.0.0.1:{rmq.a.mqtt_port} as device {survivor}"
             in agent_log.read_text()[seen:], f"{survivor} on node a", 120, interval=0.5)
    # the manager was on node a (its first URL) and stays there; if it had been on b it
    # moves too: either way it is on the broker before anyone asks
    wait_for(lambda: rmq.stack.health().get("broker"), "manager on the broker", 60)
    for name in (ON_A[0], survivor):
        rmq.stack.wait_online(name, timeout=60)
        out = rmq.stack.cli("exec", name, "--", "echo", "after")
        assert out.returncode == 0 and out.stdout == b"after\n", (name, out)
