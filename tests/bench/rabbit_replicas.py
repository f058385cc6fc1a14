"""``invoke bench --scale`` section ``rabbit_replicas``: two manager replicas on the
2-node RabbitMQ cluster (MQTT 3.1.1: no shared subscriptions, so statuses, answers and
audit records reach both replicas; the registry's unique key stores each record once),
auth_http answered by replica a, a PostgreSQL registry.

Functional first (two real agents, exec alternating between replicas, audit rows, kill
replica b, a carries on); then ``n`` simulated devices (:mod:`.simagents`) half on each
node, for RabbitMQ's memory per MQTT connection and its connect rate through the
manager's HTTP auth backend; how long until both replicas show every device online
(``online_timeline``: CONNACKs, statuses the broker acknowledged, online in a and b);
then replica b restarted, which must not show the fleet offline (RabbitMQ sends it no
retained status: presence comes from the shared store, then a resync ping per device).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from pgfix import running_postgres
from rabbitfix import Cluster, Node

from dpanel_server._files import ensure_secret
from dpanel_server.brokerauth import broker_auth_secret_path
from dpanel_server.config import dump_config, stack_config
from dpanel_server.registry import Registry
from dpanel_server.tunnelctl import TunnelControl, control_path
from stackfix import BIN, Stack
from support import free_port, stop_proc, wait_for

from ._util import PY, Child, descendants, rss_kb

__all__ = ["run_rabbit_replicas"]


def _beam_rss(node: Node) -> int:
    assert node.proc is not None
    total = 0
    for pid in descendants(node.proc.pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "beam.smp":
                total += rss_kb(pid)
        except OSError:
            pass
    return total


def _auth_requests(api_port: int) -> dict[str, float]:
    """The broker's auth_http questions replica a answered so far, by check."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("dpanel_broker_auth_requests_total{"):
            check = line.split('check="', 1)[1].split('"', 1)[0]
            out[check] = float(line.rsplit(" ", 1)[1])
    return out


def run_rabbit_replicas(workdir: Path, n: int = 2000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    d = workdir / "rabbit-replicas"
    subprocess.run(["rm", "-rf", str(d)], check=False)
    state = d / "state"
    state.mkdir(mode=0o700, parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    sims: list[Child] = []
    with running_postgres() as pg:
        url = pg.new_db()
        api_a, api_b = free_port(), free_port()
        cfg = stack_config(state, broker_port=free_port(), tunnel_port=free_port(),
                           api_port=api_a, port_range="31000-31999")
        auth_a, auth_b = free_port(), free_port()
        secret = ensure_secret(broker_auth_secret_path(cfg))
        cluster = Cluster(dir=d / "rabbit", auth_port=auth_a, auth_secret=secret)
        a, b = cluster.add_nodes("a", "b")
        stack = Stack(dir=state, broker_port=a.mqtt_port, tunnel_port=0, api_port=api_a)
        try:
            t0 = time.monotonic()
            cluster.start()
            out["cluster_start_s"] = round(time.monotonic() - t0, 1)
            cfg.broker.url = cfg.broker.public_url = f"{a.url},{b.url}"
            cfg.broker.auth = "http"
            cfg.registry.url = url
            cfg.manager.replica = "a"
            cfg.broker.auth_listen = f"127.0.0.1:{auth_a}"
            (state / "server.toml").write_text(dump_config(cfg))
            cfg.manager.replica = "b"
            cfg.manager.api_listen = f"127.0.0.1:{api_b}"
            cfg.broker.auth_listen = f"127.0.0.1:{auth_b}"
            (state / "server-b.toml").write_text(dump_config(cfg))
            def launch(role: str, conf: str) -> subprocess.Popen[bytes]:
                log = (d / f"{role}-{conf}.log").open("ab")
                return subprocess.Popen(
                    [str(BIN / "dpanel"), "--config", str(state / conf), role, "run",
                     "--log-level", "info"], env=dict(a.env), stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

            for role, conf in (("tunnel", "server.toml"), ("manager", "server.toml"),
                               ("manager", "server-b.toml")):
                procs.append(launch(role, conf))
                if role == "tunnel":
                    wait_for(lambda: TunnelControl(control_path(state)).stats().get(
                        "reachable"), "tunnel", 60)

            def on(r: str, *args: str, timeout: float = 120
                   ) -> subprocess.CompletedProcess[bytes]:
                conf = "server.toml" if r == "a" else "server-b.toml"
                return subprocess.run([str(BIN / "dpanel"), *args],
                                      env=dict(stack.env, DPANEL_CONFIG=str(state / conf)),
                                      capture_output=True, timeout=timeout,
                                      stdin=subprocess.DEVNULL)

            def state_on(r: str, dev: str) -> str:
                res = on(r, "device", "show", dev)
                return str(json.loads(res.stdout)["state"]) if res.returncode == 0 else "?"

            for r in "ab":
                wait_for(lambda r=r: on(r, "device", "list").returncode == 0,  # type: ignore[misc]
                         f"replica {r}", 90)
            tokens = {}
            for dev, r in (("rmq-1", "a"), ("rmq-4", "b")):  # first on node a / node b
                res = on(r, "device", "add", dev, "--print-token")
                assert res.returncode == 0, res
                tokens[dev] = res.stdout.decode().strip()
                stack.start_agent(tokens[dev], d / dev)
            for dev in tokens:
                for r in "ab":
                    wait_for(lambda r=r, dev=dev: state_on(r, dev) == "online",  # type: ignore[misc]
                             f"{dev} online on {r}", 90)
            ok = 0
            pairs = [("a", "rmq-1"), ("b", "rmq-1"), ("b", "rmq-4"), ("a", "rmq-4")] * 2
            for i, (r, dev) in enumerate(pairs):
                res = on(r, "exec", dev, "--", "echo", f"x{i}")
                ok += res.returncode == 0 and res.stdout == f"x{i}\n".encode()
            out["exec_alternating_ok"] = f"{ok}/{len(pairs)}"
            time.sleep(3)
            reg = Registry(url)
            rows = reg.db.execute("SELECT COUNT(*), COUNT(DISTINCT rid) FROM audit_log "
                                  "WHERE origin = 'device'", ())
            out["audit_device_rows_total_distinct"] = list(rows[0])

            # simulated devices, half on each node, through replica a's auth backend
            creds = []
            t0 = time.monotonic()
            for i in range(n):
                _, secret_i = reg.add(f"sim-{i:05d}")
                creds.append((f"sim-{i:05d}", secret_i))
            out["sim_enrol_s"] = round(time.monotonic() - t0, 1)
            reg.close()
            rss0 = {"a": _beam_rss(a), "b": _beam_rss(b)}
            auth0 = _auth_requests(api_a)
            t0 = time.monotonic()
            for i, node in enumerate((a, b)):
                spec = {"broker": ["127.0.0.1", node.mqtt_port], "tunnel": ["127.0.0.1", 9],
                        "devices": creds[i::2], "keepalive": 60, "connect_concurrency": 50}
                path = d / f"sim-{i}.json"
                path.write_text(json.dumps(spec))
                w = Child([PY, "-m", "tests.bench.simagents", str(path)], d / f"sim-{i}.log")
                sims.append(w)
                w.read(120)

            def connected() -> int:
                return sum(int(w.ask({"cmd": "status"}, 120)["connected"]) for w in sims)

            try:
                wait_for(lambda: connected() >= n, f"{n} simulated devices", 600, 1.0)
            except TimeoutError:
                pass
            out["sim_connected"] = connected()
            out["sim_connect_s"] = round(time.monotonic() - t0, 1)
            time.sleep(5)
            rss1 = {"a": _beam_rss(a), "b": _beam_rss(b)}
            out["beam_rss_kb"] = {"before": rss0, "connected": rss1}
            got = max(1, out["sim_connected"])
            out["rabbit_kb_per_connection"] = round(
                (sum(rss1.values()) - sum(rss0.values())) / got, 1)
            def online(r: str) -> int:
                res = on(r, "device", "list", "--json")
                if res.returncode != 0:
                    return -1  # not answering (yet)
                return sum(1 for x in json.loads(res.stdout or b"[]") if x.get("online"))

            # what the bench used to report: the count 5 s after the last CONNACK
            out["online_in_replica_a"] = online("a")
            out["online_in_replica_b"] = online("b")
            # then until every replica shows every device: [s since the sims started,
            # CONNACKs, online statuses the broker acknowledged, online in a, in b]
            timeline = []
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                st = [w.ask({"cmd": "status"}, 120) for w in sims]
                row = [round(time.monotonic() - t0, 1), sum(x["connected"] for x in st),
                       sum(x["status_acked"] for x in st), online("a"), online("b")]
                timeline.append(row)
                if min(row[3:]) >= n + 2:
                    out["all_online_s"] = row[0]
                    break
                time.sleep(2)
            out["online_timeline"] = timeline
            auth1 = _auth_requests(api_a)
            # what each device's login, subscription and first status cost in round trips
            # to the auth backend (the broker waits for each)
            out["auth_http_per_device"] = {k: round((v - auth0.get(k, 0)) / n, 2)
                                           for k, v in auth1.items()}

            # restart replica b: it must not show the fleet offline meanwhile (RabbitMQ
            # sends it no retained status: presence from the shared store + a resync)
            blog_path = d / "manager-server-b.toml.log"
            before = blog_path.read_text(errors="replace").count("presence resync:")
            stop_proc(procs[2])
            t0 = time.monotonic()
            procs[2] = launch("manager", "server-b.toml")
            seen: list[list[float]] = []
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                count = online("b")
                if count >= 0:
                    seen.append([round(time.monotonic() - t0, 1), count])
                    if count >= n + 2 and len(seen) > 3:
                        break
                time.sleep(1)
            out["restart_b_online_timeline"] = seen
            answering = [c for _, c in seen]
            out["restart_b_min_online"] = min(answering) if answering else None
            out["restart_b_all_online_s"] = next((t for t, c in seen if c >= n + 2), None)
            def resynced() -> bool:
                return blog_path.read_text(errors="replace").count("presence resync:") > before

            try:  # its pings verified every device (or gave up on it)
                wait_for(resynced, "replica b's resync", 600, 2.0)
            except TimeoutError:
                pass
            # restart_b_online_timeline never went below all: the resync showed no one
            # offline; its figures (pings, answers, marked offline, seconds):
            out["restart_b_resync"] = next(
                (line.split("presence resync: ", 1)[1] for line in reversed(
                    blog_path.read_text(errors="replace").splitlines())
                 if "presence resync:" in line), None)
            out["restart_b_online_after_resync"] = online("b")
            auth2 = _auth_requests(api_a)
            out["auth_http_during_restart"] = {k: v - auth1.get(k, 0) for k, v in auth2.items()}
            st = [w.ask({"cmd": "status"}, 120) for w in sims]
            out["sim_pings_answered"] = sum(x["pings"] for x in st)

            os.kill(procs[2].pid, signal.SIGKILL)
            after = [on("a", "exec", dev, "--", "echo", "after").stdout == b"after\n"
                     for dev in tokens]
            out["exec_on_a_after_b_killed"] = f"{sum(after)}/{len(after)}"
            logs = "".join(p.read_text(errors="replace") for p in d.glob("*.log"))
            out["bug_in_logs"] = "bug:" in logs or "Traceback" in logs
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            for w in sims:
                w.close()
            stack.close()
            for p in procs:
                stop_proc(p)
            cluster.stop()
    return out
