"""Jobs: parts per second the manager dispatches, on many simulated agents.

Devices are enrolled through the registry before the stack starts (as the scale section
does); simulated agents (``simagents``) hold MQTT presence and dial the tunnel on an open
request, forwarding to small asyncssh servers in this process that stand in for each
device's SSH server (one listener and host key each; they accept the manager's key and
answer each exec with exit 0 at once). So what is measured is the manager's side of a
job: claim in the registry, open the tunnel, log in over the pooled SSH path, run, store
the result.

    python -m tests.bench.run --out DIR --only jobs --jobs-agents 1000
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import asyncssh

from dpanel_server.registry import Registry
from dpanel_server.stack import prepare_stack
from stackfix import Stack
from support import free_port

from ._util import PY, Child
from .devstack import close_stack

__all__ = ["run_jobs_rate"]


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True


def _exec_servers(n: int) -> list[tuple[int, str]]:
    """``n`` asyncssh servers (one per device: the manager refuses a host key that another
    device holds) on a thread of their own; [(port, host key line)]."""
    out: list[tuple[int, str]] = []
    done = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()

        async def start() -> None:
            for _ in range(n):
                key = asyncssh.generate_private_key("ssh-ed25519")
                srv = await asyncssh.create_server(
                    _Server, "127.0.0.1", 0, server_host_keys=[key],
                    process_factory=lambda p: p.exit(0))
                out.append((srv.sockets[0].getsockname()[1],
                            " ".join(key.export_public_key().decode().split()[:2])))
            done.set()

        loop.run_until_complete(start())
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    done.wait(300)
    return out


def run_jobs_rate(workdir: Path, *, agents: int, concurrency: int = 64,
                  workers: int = 2) -> dict[str, Any]:
    result: dict[str, Any] = {"agents": agents, "max_concurrency": concurrency}
    d = workdir / "jobs-stack"
    shutil.rmtree(d, ignore_errors=True)
    port_range = f"21000-{21000 + max(2 * agents, 1000) - 1}"
    stack = Stack(dir=d, broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), port_range=port_range, keepalive=30)
    cfg = prepare_stack(d, broker_port=stack.broker_port, tunnel_port=stack.tunnel_port,
                        api_port=stack.api_port, port_range=port_range,
                        keepalive_interval=stack.keepalive)
    registry = Registry(cfg.registry_path)
    creds = []
    try:
        for i in range(agents):
            creds.append((f"job-{i:05d}", registry.add(f"job-{i:05d}")[1]))
    finally:
        registry.close()
    servers = _exec_servers(agents)
    devices = [[d, sec, port, key] for (d, sec), (port, key) in zip(creds, servers)]
    sims: list[Child] = []
    try:
        stack.start()
        for i in range(workers):
            spec = {"broker": ["127.0.0.1", stack.broker_port],
                    "tunnel": ["127.0.0.1", stack.tunnel_port], "devices": devices[i::workers],
                    "keepalive": 60, "connect_concurrency": 100}
            path = workdir / f"jobs-sim-{i}.json"
            path.write_text(json.dumps(spec))
            path.chmod(0o600)
            w = Child([PY, "-m", "tests.bench.simagents", str(path)],
                      workdir / f"jobs-sim-{i}.log")
            sims.append(w)
            w.read(60)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600:
            devs = json.loads(stack.cli_ok("device", "list", "--json"))
            if sum(1 for x in devs if x["online"]) >= agents:
                break
            time.sleep(2)
        result["online_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        job = json.loads(stack.cli_ok("job", "run", "--all", "--json", "--max-concurrency",
                                      str(concurrency), "--", "true"))["id"]
        show: dict[str, Any] = {}
        while time.monotonic() - t0 < 1800:
            show = json.loads(stack.cli_ok("job", "show", job, "--json"))
            if show["state"] != "running":
                break
            time.sleep(1)
        secs = time.monotonic() - t0
        result.update({"seconds_to_done": round(secs, 1), "counts": show.get("counts"),
                       "parts_per_s": round(show.get("counts", {}).get("succeeded", 0)
                                            / secs, 1),
                       "job_state": show.get("state")})
        reasons: dict[str, int] = {}
        for p in show.get("parts", []):
            if p["state"] != "succeeded":
                key = (p.get("reason") or p["state"])[:80]
                reasons[key] = reasons.get(key, 0) + 1
        result["other_reasons"] = reasons
    finally:
        for w in sims:
            w.close()
        close_stack(stack)
    return result
