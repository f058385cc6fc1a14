"""Section 5: how many agents one manager + one broker hold, with how many tunnels open.

Devices are enrolled through the registry API (``Registry.add``) before the stack starts,
so the stack's own broker-file sync writes all their credentials at once. Simulated
agents (``simagents``) run in a few worker processes; the stack (manager + tunnel + API in
one process) and mosquitto are measured separately. Tunnels are opened through the
manager's HTTP API, as ``dpanel tunnel open`` does, from a small thread pool.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from dpanel_server.client import ApiClient
from dpanel_server.config import load_config
from dpanel_server.registry import Registry
from dpanel_server.stack import prepare_stack
from stackfix import Stack
from support import free_port

from ._util import PY, Child, children_of, cpu_seconds, median, rss_kb
from .devstack import close_stack

__all__ = ["run_scale"]


def _procs(stack: Stack, workers: list[Child]) -> dict[str, list[int]]:
    assert stack.proc is not None
    broker = [p for p in children_of(stack.proc.pid)
              if Path(f"/proc/{p}/comm").read_text().strip() == "mosquitto"]
    return {"stack": [stack.proc.pid], "broker": broker, "sim": [w.pid for w in workers]}


def _usage(procs: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, pids in procs.items():
        rss = cpu = 0.0
        for pid in pids:
            try:
                rss += rss_kb(pid)
                cpu += cpu_seconds(pid)
            except OSError:
                pass
        out[name] = {"rss_kb": rss, "cpu_s": cpu}
    return out


def _delta(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]],
           seconds: float) -> dict[str, dict[str, float]]:
    return {k: {"rss_kb": b[k]["rss_kb"],
                "cpu_s": round(b[k]["cpu_s"] - a[k]["cpu_s"], 2),
                "cpu_percent": round(100 * (b[k]["cpu_s"] - a[k]["cpu_s"]) / max(seconds, 1e-6),
                                     1)}
            for k in b}


def _status(workers: list[Child]) -> dict[str, Any]:
    total: dict[str, Any] = {"connected": 0, "tunnels": 0, "connect_errors": 0, "refused": {},
                             "disconnects": 0, "tunnel_errors": 0, "requests": 0,
                             "tunnel_error_sample": [], "all_connected_s": []}
    for w in workers:
        s = w.ask({"cmd": "status"}, 120)
        for k in ("connected", "tunnels", "connect_errors", "disconnects", "tunnel_errors",
                  "requests"):
            total[k] += s[k]
        for rc, n in s["refused"].items():
            total["refused"][rc] = total["refused"].get(rc, 0) + n
        total["tunnel_error_sample"] += s["tunnel_error_sample"]
        total["all_connected_s"].append(s["all_connected_s"])
    return total


def _broker_warnings(log: Path) -> dict[str, int]:
    """Count mosquitto's complaints, e.g. "Outgoing messages are being dropped for client
    dpanel-manager" (its max_queued_messages, 1000 by default, overflowed)."""
    counts: dict[str, int] = {}
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return counts
    for line in lines:
        text = line.split(": ", 1)[-1].strip()
        if "Warning" in text or "dropped" in text or "Error" in text:
            key = text[:100]
            counts[key] = counts.get(key, 0) + 1
    return counts


def run_scale(workdir: Path, *, agents: int, tunnels: int, workers: int = 2,
              steady: float = 15.0, connect_timeout: float = 600.0,
              parallel_opens: int = 16, connect_rate: float = 0) -> dict[str, Any]:
    """``connect_rate``: agent connections per second (0 = as fast as they go, like a
    fleet coming back after a broker restart)."""
    result: dict[str, Any] = {"goal": {"agents": 10000, "tunnels": 500},
                              "target": {"agents": agents, "tunnels": tunnels},
                              "connect_rate": connect_rate or "unpaced", "errors": {}}
    d = workdir / "scale-stack"
    shutil.rmtree(d, ignore_errors=True)
    lo = 21000
    port_range = f"{lo}-{lo + max(2 * tunnels, 1000) - 1}"
    stack = Stack(dir=d, broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), port_range=port_range, keepalive=30)
    cfg = prepare_stack(d, broker_port=stack.broker_port, tunnel_port=stack.tunnel_port,
                        api_port=stack.api_port, port_range=port_range,
                        keepalive_interval=stack.keepalive)

    t0 = time.monotonic()
    registry = Registry(cfg.registry_path)
    creds: list[tuple[str, str]] = []
    try:
        for i in range(agents):
            device = f"sim-{i:05d}"
            _, secret = registry.add(device)
            creds.append((device, secret))
    finally:
        registry.close()
    result["enrol_s"] = round(time.monotonic() - t0, 1)

    sims: list[Child] = []
    try:
        t0 = time.monotonic()
        stack.start()
        result["stack_start_s"] = round(time.monotonic() - t0, 1)
        procs = _procs(stack, [])
        result["idle_usage"] = _usage(procs)
        _run_agents(stack, creds, workers, workdir, sims, result, connect_timeout, steady,
                    connect_rate)
        # before teardown, whose 10k last wills would flood the broker log too
        result["broker_log_connect_phase"] = _broker_warnings(d / "mosquitto" /
                                                              "mosquitto.log")
        _open_tunnels(stack, creds[:tunnels], parallel_opens, sims, result, steady)
    except Exception as exc:
        result["errors"]["scale"] = f"{type(exc).__name__}: {exc}"
    finally:
        for w in sims:
            w.close()
        close_stack(stack)
        result["broker_log_end"] = _broker_warnings(d / "mosquitto" / "mosquitto.log")
    return result


def _run_agents(stack: Stack, creds: list[tuple[str, str]], workers: int, workdir: Path,
                sims: list[Child], result: dict[str, Any], connect_timeout: float,
                steady: float, connect_rate: float, stall: float = 20.0) -> None:
    n = len(creds)
    shards = [creds[i::workers] for i in range(workers)]
    u0 = _usage(_procs(stack, []))
    t0 = time.monotonic()
    for i, shard in enumerate(shards):
        spec = {"broker": ["127.0.0.1", stack.broker_port],
                "tunnel": ["127.0.0.1", stack.tunnel_port], "devices": shard,
                "keepalive": 60, "connect_concurrency": 100, "target_port": 9,
                "connect_rate": connect_rate / workers}
        path = workdir / f"sim-{i}.json"
        path.write_text(json.dumps(spec))
        path.chmod(0o600)
        w = Child([PY, "-m", "tests.bench.simagents", str(path)], workdir / f"sim-{i}.log")
        sims.append(w)
        w.read(60)
    # 1. every simulated agent has its CONNACK
    last, last_change = -1, time.monotonic()
    status = _status(sims)
    while status["connected"] < n and time.monotonic() - t0 < connect_timeout:
        if status["connected"] != last:
            last, last_change = status["connected"], time.monotonic()
        elif time.monotonic() - last_change > 3 * stall:
            break  # no progress for a minute: report what we have
        time.sleep(1)
        status = _status(sims)
    result["connected"] = status["connected"]
    result["connect_s"] = round(time.monotonic() - t0, 1)
    result["sim_status_connected"] = {k: status[k] for k in
                                      ("connect_errors", "refused", "disconnects")}
    # 2. the manager knows they are online (its presence table, through the API). Each
    # poll lists every device (~0.2 s of manager CPU at 10k), so poll sparingly, and stop
    # once the count is complete or has not moved for a while (statuses the broker
    # dropped never arrive: they are retained, but only re-sent on a resubscribe).
    api = ApiClient(load_config(stack.config), timeout=300)
    online, polls, t_change = -1, 0, time.monotonic()
    while True:
        t_list = time.monotonic()
        devices = api.call("GET", "/v1/devices")
        polls += 1
        result["device_list_s"] = round(time.monotonic() - t_list, 2)
        now_online = sum(1 for dev in devices if dev["online"])
        if now_online != online:
            online, t_change = now_online, time.monotonic()
        if online >= status["connected"] or time.monotonic() - t_change > stall:
            break
        time.sleep(2)
    result["online_in_manager"] = online
    result["online_s"] = round(t_change - t0, 1)  # when the last status was taken in
    result["device_list_polls"] = polls
    procs = _procs(stack, sims)
    result["connect_phase_usage"] = _delta({**u0, "sim": {"rss_kb": 0, "cpu_s": 0}},
                                           _usage(procs), time.monotonic() - t0)
    # 3. steady state: everybody connected and idle (keepalives only)
    a = _usage(procs)
    time.sleep(steady)
    result["steady_usage"] = _delta(a, _usage(procs), steady)


def _open_tunnels(stack: Stack, creds: list[tuple[str, str]], parallel: int,
                  sims: list[Child], result: dict[str, Any], steady: float) -> None:
    api = ApiClient(load_config(stack.config), timeout=120)
    procs = _procs(stack, sims)
    u0 = _usage(procs)

    def open_one(device: str) -> tuple[Optional[float], str]:
        t = time.monotonic()
        try:
            api.call("POST", f"/v1/devices/{device}/tunnel", {})
        except Exception as exc:
            return None, f"{device}: {exc}"
        return time.monotonic() - t, ""

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        outcomes = list(pool.map(open_one, [dev for dev, _ in creds]))
    elapsed = time.monotonic() - t0
    times = sorted(t for t, _ in outcomes if t is not None)
    errors = [e for t, e in outcomes if t is None]
    result["tunnels_open_s"] = round(elapsed, 1)
    result["tunnel_open_latency_s"] = {
        "median": round(median(times) or 0, 3),
        "p95": round(times[int(0.95 * (len(times) - 1))], 3) if times else None,
        "max": round(times[-1], 3) if times else None}
    result["tunnel_open_failures"] = len(errors)
    result["tunnel_open_error_sample"] = errors[:5]
    result["open_phase_usage"] = _delta(u0, _usage(procs), elapsed)
    health = api.call("GET", "/v1/health")
    result["tunnel_stats"] = health.get("tunnel", {})
    result["tunnels_open"] = int(result["tunnel_stats"].get("ports_in_use", 0))
    status = _status(sims)
    result["sim_status_final"] = {k: status[k] for k in
                                  ("connected", "tunnels", "tunnel_errors", "disconnects",
                                   "tunnel_error_sample")}
    result["connected_final"] = status["connected"]
    a = _usage(procs)
    time.sleep(steady)
    result["steady_usage_with_tunnels"] = _delta(a, _usage(procs), steady)
