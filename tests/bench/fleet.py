"""Tunnels opened at once across two tunnel servers apart from the manager.

``python -m tests.bench.fleet --out DIR [--tunnels 2000] [--servers 2] [--parallel 200]``

A stack with ``--tunnel-servers N`` (real ``dpanel tunnel serve`` processes, each on its
own loopback address), N devices enrolled in the registry, simulated agents
(``simagents``, which here dial the tunnel server named in each signed open request),
then every device's tunnel opened through the API from ``--parallel`` threads at once.
Prints and writes ``DIR/fleet.json``: median/p95/max time to open, the total, failures,
and how placement spread the tunnels over the servers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from dpanel_server.client import ApiClient
from dpanel_server.config import load_config
from dpanel_server.registry import Registry
from dpanel_server.stack import prepare_stack
from stackfix import Stack
from support import free_port, wait_for

from ._util import PY, Child, median
from .devstack import close_stack

__all__ = ["run_fleet"]


def _status(sims: list[Child]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sims:
        st = s.ask({"cmd": "status"})
        for k in ("connected", "tunnels", "tunnel_errors"):
            out[k] = out.get(k, 0) + int(st[k])
        out.setdefault("tunnel_error_sample", []).extend(st["tunnel_error_sample"])
    return out


def run_fleet(workdir: Path, *, tunnels: int, servers: int = 2, parallel: int = 200,
              workers: int = 2) -> dict[str, Any]:
    result: dict[str, Any] = {"goal": {"tunnels": 2000, "servers": 2},
                              "target": {"tunnels": tunnels, "servers": servers,
                                         "parallel": parallel}}
    d = workdir / "fleet-stack"
    shutil.rmtree(d, ignore_errors=True)
    lo = 40000
    port_range = f"{lo}-{lo + max(2 * tunnels, 1000) - 1}"
    stack = Stack(dir=d, broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), port_range=port_range, keepalive=30,
                  extra=("--tunnel-servers", str(servers)))
    prepare_stack(d, broker_port=stack.broker_port, tunnel_port=stack.tunnel_port,
                  api_port=stack.api_port, port_range=port_range,
                  keepalive_interval=stack.keepalive)
    cfg = load_config(stack.config)
    registry = Registry(cfg.registry_url)
    creds = [(f"fl-{i:05d}", registry.add(f"fl-{i:05d}")[1]) for i in range(tunnels)]
    registry.close()
    sims: list[Child] = []
    try:
        stack.start()
        api = ApiClient(load_config(stack.config), timeout=300)
        wait_for(lambda: sum(s["state"] == "up" for s in api.call(
            "GET", "/v1/tunnel-servers")) == servers, "tunnel servers up", 60)
        for i in range(workers):
            spec = {"broker": ["127.0.0.1", stack.broker_port],
                    "tunnel": ["127.0.0.1", stack.tunnel_port],
                    "devices": creds[i::workers], "keepalive": 60,
                    "connect_concurrency": 100, "target_port": 9}
            path = workdir / f"fleet-sim-{i}.json"
            path.write_text(json.dumps(spec))
            path.chmod(0o600)
            w = Child([PY, "-m", "tests.bench.fleet", "--sim", str(path)],
                      workdir / f"fleet-sim-{i}.log")
            sims.append(w)
            w.read(60)
        t0 = time.monotonic()
        wait_for(lambda: _status(sims)["connected"] >= tunnels, "agents connected", 600)

        def online() -> bool:
            return sum(1 for dev in api.call("GET", "/v1/devices") if dev["online"]) >= tunnels
        wait_for(online, "agents online in the manager", 600)
        result["online_s"] = round(time.monotonic() - t0, 1)

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
        result["all_open_s"] = round(time.monotonic() - t0, 1)
        times = sorted(t for t, _ in outcomes if t is not None)
        errors = [e for t, e in outcomes if t is None]
        result["open_latency_s"] = {
            "median": round(median(times) or 0, 3),
            "p95": round(times[int(0.95 * (len(times) - 1))], 3) if times else None,
            "max": round(times[-1], 3) if times else None}
        result["open_failures"] = len(errors)
        result["open_error_sample"] = errors[:5]
        time.sleep(6)  # one heartbeat round, so the table shows every tunnel
        result["per_server"] = {s["name"]: {"tunnels": s["tunnels"], "load": s["load"],
                                            "capacity": s["capacity"], "state": s["state"]}
                                for s in api.call("GET", "/v1/tunnel-servers")}
        result["sim"] = _status(sims)
    finally:
        for w in sims:
            w.close()
        close_stack(stack)
    return result


def _sim_main(spec_path: str) -> None:
    """simagents, but each open dials the tunnel server its request names."""
    import asyncio
    import random

    import asyncssh

    from dpanel_proto import wire

    from . import simagents

    class FleetAgent(simagents.Agent):
        #: the tunnel server the last open request named ("host:port")
        named: Optional[str] = None

        async def _request(self, payload: bytes) -> None:
            try:
                req = wire.decode(payload)
            except wire.DecodeError:
                return
            if isinstance(req, wire.OpenRequest):
                self.named = req.tunnel
            await super()._request(payload)

        async def _open(self) -> tuple[wire.ErrorCode, str]:
            if self.ssh is not None and not self.ssh.is_closed():
                return wire.ErrorCode.OK, ""
            host, port = self.sim.tunnel
            if self.named:
                h, _, p = self.named.rpartition(":")
                host, port = h, int(p)
            # every device from its own address, as a fleet is: one address opening
            # hundreds at once is what the tunnel's per-source gate is there to stop
            n = int(self.device.rsplit("-", 1)[1])
            src = f"127.100.{n // 250}.{n % 250 + 1}"
            for attempt in range(3):  # as the agent redials a tunnel it could not reach
                try:
                    conn = await asyncssh.connect(
                        host, port, username=self.device, password=self.secret,
                        local_addr=(src, 0), known_hosts=None, agent_path=None,
                        config=None, client_keys=None, preferred_auth="password",
                        keepalive_interval=0, compression_algs=None)
                    listener = await conn.forward_remote_port("", 0, "127.0.0.1",
                                                              self.sim.target)
                    break
                except (OSError, asyncssh.Error) as exc:
                    if attempt == 2:
                        self.sim.tunnel_errors.append(
                            f"{self.device}: {type(exc).__name__}: {exc}")
                        return wire.ErrorCode.TUNNEL_UNREACHABLE, str(exc)[:200]
                    self.sim.redials += 1
                    await asyncio.sleep(random.uniform(0.5, 2.0))
            self.ssh, self.port = conn, listener.get_port()
            self.sim.tunnels += 1
            return wire.ErrorCode.OK, ""

    simagents.Agent = FleetAgent  # type: ignore[misc]
    simagents.Sim.redials = 0  # type: ignore[attr-defined]
    sys.argv = [sys.argv[0], spec_path]
    simagents.main()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--tunnels", type=int, default=2000)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--parallel", type=int, default=200)
    p.add_argument("--sim", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sim:
        _sim_main(args.sim)
        return
    if args.out is None:
        p.error("--out: required")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_fleet(args.out, tunnels=args.tunnels, servers=args.servers,
                       parallel=args.parallel)
    (args.out / "fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
