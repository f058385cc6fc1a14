"""``invoke bench --scale`` section ``rabbit_replicas``: two manager replicas on the
2-node RabbitMQ cluster (MQTT 3.1.1: no shared subscriptions, so statuses, answers and
audit records reach both replicas; the registry's unique key stores each record once),
auth_http answered by replica a, a PostgreSQL registry.

Functional first (two real agents, exec alternating between replicas, audit rows, kill
replica b, a carries on); then ``n`` simulated devices (:mod:`.simagents`) half on each
node, for RabbitMQ's memory per MQTT connection and its connect rate through the
manager's HTTP auth backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
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
            for role, conf in (("tunnel", "server.toml"), ("manager", "server.toml"),
                               ("manager", "server-b.toml")):
                log = (d / f"{role}-{conf}.log").open("ab")
                procs.append(subprocess.Popen(
                    [str(BIN / "dpanel"), "--config", str(state / conf), role, "run",
                     "--log-level", "info"], env=dict(a.env), stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
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
            online = json.loads(on("a", "device", "list", "--json").stdout or b"[]")
            out["online_in_replica_a"] = sum(1 for x in online if x.get("online"))
            online_b = json.loads(on("b", "device", "list", "--json").stdout or b"[]")
            out["online_in_replica_b"] = sum(1 for x in online_b if x.get("online"))

            import diaghook
            diaghook.run(out, on, a, b, creds, d, sims)
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
