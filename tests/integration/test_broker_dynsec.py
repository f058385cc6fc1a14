"""broker.auth = "dynsec": a real stack on Mosquitto's dynamic-security plugin, real agents.

Enrolment and revocation go over ``$CONTROL`` (no password/ACL file, no SIGHUP); revoke
kicks the device at once; a restart repairs drift (a device missing from the broker's
file, a revoked device enabled behind our back) and leaves a clean file alone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as mqtt
import pytest

from dpanel_proto import wire
from dpanel_proto.token import parse_token
from stackfix import Stack
from support import free_port, wait_for

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
    reason="mosquitto's dynamic-security plugin is not installed")


@pytest.fixture(scope="module")
def dstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("dynsec")
    s = Stack(dir=d / "stack", broker_port=free_port(), tunnel_port=free_port(),
              api_port=free_port(), extra=("--broker-auth", "dynsec"))
    s.start()
    try:
        yield s
    finally:
        s.close()


def _login(stack: Stack, user: str, password: str) -> str:
    """Connect once with paho; the CONNACK's reason ("Success", "Not authorized")."""
    result: list[str] = []
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{user}-{time.time()}")
    c.username_pw_set(user, password)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        result.append(str(rc))
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", stack.broker_port)
    c.loop_start()
    try:
        done.wait(15)
    finally:
        c.loop_stop()
        c.disconnect()
    return result[0] if result else "no answer"


def _dynsec_file(stack: Stack) -> dict[str, object]:
    return dict(json.loads((stack.dir / "mosquitto" / "dynamic-security.json").read_text()))


def test_enrol_exec_revoke_without_files(dstack: Stack, tmp_path: Path) -> None:
    conf = (dstack.dir / "mosquitto" / "mosquitto.conf").read_text()
    assert "mosquitto_dynamic_security.so" in conf and "password_file" not in conf
    tokens = {n: dstack.enrol(n) for n in ("dyn-a", "dyn-b")}
    agents = {n: dstack.start_agent(t, tmp_path / n) for n, t in tokens.items()}
    for n in tokens:
        dstack.wait_online(n)
        out = dstack.cli("exec", n, "--", "echo", f"hello {n}")
        assert out.returncode == 0 and out.stdout == f"hello {n}\n".encode(), out
    # the O(1) path: no password/ACL file was ever written
    assert not (dstack.dir / "mosquitto" / "passwd").exists()
    path = dstack.dir / "mosquitto" / "dynamic-security.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert {"dyn-a", "dyn-b"} <= {c["username"] for c in _dynsec_file(dstack)["clients"]}  # type: ignore[index, union-attr]
    # ACLs from DEVICE_ACL, literal per device: dyn-a cannot read dyn-b's requests
    roles = {r["rolename"]: r for r in _dynsec_file(dstack)["roles"]}  # type: ignore[index, union-attr]
    topics = {a["topic"] for a in roles["dpanel-device-dyn-a"]["acls"]}
    assert topics == {p.replace("%u", "dyn-a") for _, p in wire.DEVICE_ACL}

    secret_a = parse_token(tokens["dyn-a"]).secret
    assert _login(dstack, "dyn-a", "wrong" + secret_a) == "Not authorized"
    dstack.cli_ok("device", "revoke", "dyn-a")
    # cut off at once: the broker kicked it (its will says offline), and it cannot return
    dstack.wait_offline("dyn-a", timeout=20)
    assert _login(dstack, "dyn-a", secret_a) == "Not authorized"
    assert agents["dyn-a"].poll() is None  # the agent itself keeps retrying, refused
    # the other device is untouched
    out = dstack.cli("exec", "dyn-b", "--", "true")
    assert out.returncode == 0, out
    assert _login(dstack, "dyn-b", parse_token(tokens["dyn-b"]).secret) == "Success"


def test_restart_repairs_drift_only(dstack: Stack, tmp_path: Path) -> None:
    tok = dstack.enrol("dyn-c")
    gone = dstack.enrol("dyn-d")
    dstack.cli_ok("device", "revoke", "dyn-d")
    dstack.stop()
    # drift behind the manager's back, broker stopped: dyn-c's client vanishes (a restored
    # old broker file), revoked dyn-d is enabled again
    path = dstack.dir / "mosquitto" / "dynamic-security.json"
    doc = json.loads(path.read_text())
    doc["clients"] = [c for c in doc["clients"] if c["username"] != "dyn-c"]
    for c in doc["clients"]:
        if c["username"] == "dyn-d":
            c.pop("disabled", None)
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    dstack.start()
    assert _login(dstack, "dyn-c", parse_token(tok).secret) == "Success"
    assert _login(dstack, "dyn-d", parse_token(gone).secret) == "Not authorized"
    dstack.start_agent(tok, tmp_path / "dyn-c")
    dstack.wait_online("dyn-c")
    assert dstack.cli("exec", "dyn-c", "--", "true").returncode == 0
    # a clean restart changes nothing in the broker's file
    dstack.stop()
    before = path.read_bytes()
    dstack.start()
    assert path.read_bytes() == before


def test_delete_frees_the_broker_client(dstack: Stack) -> None:
    tok = dstack.enrol("dyn-e")
    dstack.cli_ok("device", "delete", "dyn-e", "--force")
    names = wait_for(lambda: (n := {c["username"] for c in _dynsec_file(dstack)["clients"]})  # type: ignore[index, union-attr]
                     and "dyn-e" not in n and n, "dyn-e deleted from the broker", 15)
    assert "dyn-e" not in names
    # the name can be enrolled again, with a new secret that works and an old one that not
    tok2 = dstack.enrol("dyn-e")
    assert _login(dstack, "dyn-e", parse_token(tok2).secret) == "Success"
    assert _login(dstack, "dyn-e", parse_token(tok).secret) == "Not authorized"


def test_manager_reconcile_on_a_running_broker(tmp_path: Path) -> None:
    """The manager's own reconcile (what runs on every reconnect), against a live broker
    that drifted: an unknown client and a revoked one enabled get disabled, a missing
    one is reported, and nothing else is touched."""
    import asyncio
    import subprocess

    from dpanel_server._mqtt import ManagerMqtt
    from dpanel_server.broker import Listener, mosquitto_hash, render_mosquitto_conf
    from dpanel_server.dynsec import RESPONSE_TOPIC, Dynsec, bootstrap, find_plugin
    from support import stop_proc, wait_port

    port = free_port()
    ds = tmp_path / "ds.json"
    bootstrap(ds, "mgr", "mpw", [("keep", mosquitto_hash("k" * 40)),
                                 ("stale", mosquitto_hash("s" * 40))])
    conf = tmp_path / "m.conf"
    conf.write_text(render_mosquitto_conf(passwd=tmp_path / "p", acl=tmp_path / "a",
                                          pid_file=tmp_path / "pid",
                                          listeners=[Listener(port, public=True)],
                                          dynsec=(find_plugin(), ds)))
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)

        async def main() -> dict[str, list[str]]:
            loop = asyncio.get_running_loop()
            holder: list[Dynsec] = []
            mq = ManagerMqtt(loop, "127.0.0.1", port, "mgr", "mpw", [RESPONSE_TOPIC],
                             lambda t, p: holder[0].on_response(t, p))
            holder.append(Dynsec(mq.publish))
            mq.start()
            try:
                await asyncio.to_thread(mq.connected.wait, 15)
                await asyncio.sleep(0.5)  # the SUBACK of the response topic
                # registry: keep + new (never reached the broker); stale is revoked
                return await holder[0].reconcile({"keep", "new"}, "mgr")
            finally:
                await asyncio.to_thread(mq.stop)

        done = asyncio.run(main())
        assert done == {"disabled": ["stale"], "missing": ["new"], "enabled": []}
        assert _login_port(port, "stale", "s" * 40) == "Not authorized"
        assert _login_port(port, "keep", "k" * 40) == "Success"
    finally:
        stop_proc(proc)


def _login_port(port: int, user: str, password: str) -> str:
    s = Stack(dir=Path("/nonexistent"), broker_port=port, tunnel_port=0, api_port=0)
    return _login(s, user, password)
