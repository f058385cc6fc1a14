"""Section 2: exec latency. Cold = ``dpanel exec DEV -- true`` with no tunnel open (MQTT
request, agent dials the tunnel, manager SSHes in); warm = the same with the tunnel and
the manager's pooled SSH connection up. Baseline: a fresh ``ssh -p PORT localhost true``
against a throwaway sshd. The CLI rows include the ``dpanel`` process start-up; the API
rows are the same request from a warm HTTP client, i.e. the server-side latency."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

from dpanel_server.client import ApiClient
from dpanel_server.config import load_config

from ._util import BIN, median
from .devstack import running_stack, start_agent
from .openssh import Sshd

__all__ = ["run_latency"]

DEVICE = "lat-dev"


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run_ok(argv: list[str], env: Optional[dict[str, str]] = None) -> None:
    out = subprocess.run(argv, capture_output=True, env=env, timeout=60,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[:3]}... exited {out.returncode}: {out.stderr[-300:]!r}")


def _api_exec(api: ApiClient) -> None:
    for event in api.stream("POST", f"/v1/devices/{DEVICE}/exec", {"command": "true"}):
        if "exit" in event:
            if event["exit"] != 0:
                raise RuntimeError(f"exec exit {event['exit']}")
            return
        if "error" in event:
            raise RuntimeError(str(event["error"]))
    raise RuntimeError("exec stream ended without an exit status")


def _stats(times: list[float]) -> dict[str, Any]:
    return {"median_s": round(median(times) or 0, 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "n": len(times)}


def run_latency(workdir: Path, *, reps: int) -> dict[str, Any]:
    result: dict[str, Any] = {"goal": {"cold_s": "< 1.0", "warm_vs_ssh": "<= 0.5"},
                              "errors": {}}
    ssh_times: list[float] = []
    try:
        with Sshd() as sshd:
            argv = [*sshd.ssh_argv(), "true"]
            _run_ok(argv)  # warm the page cache for ssh/sshd binaries
            ssh_times = [_timed(lambda: _run_ok(argv)) for _ in range(reps)]
        result["openssh_fresh"] = _stats(ssh_times)
    except Exception as exc:
        result["errors"]["openssh_fresh"] = f"{type(exc).__name__}: {exc}"

    floor = [_timed(lambda: _run_ok([str(BIN / "dpanel"), "--version"])) for _ in range(3)]
    result["cli_startup"] = _stats(floor)

    try:
        _dpanel_rows(workdir, reps, result)
    except Exception as exc:
        result["errors"]["dpanel"] = f"{type(exc).__name__}: {exc}"

    warm = result.get("warm_cli", {}).get("median_s")
    base = result.get("openssh_fresh", {}).get("median_s")
    if warm and base:
        result["warm_vs_ssh"] = round(warm / base, 2)
    warm_api = result.get("warm_api", {}).get("median_s")
    if warm_api and base:
        result["warm_api_vs_ssh"] = round(warm_api / base, 2)
    return result


def _dpanel_rows(workdir: Path, reps: int, result: dict[str, Any]) -> None:
    with running_stack(workdir, "lat-stack", port_range="27400-27499") as stack:
        start_agent(stack, DEVICE, workdir)
        stack.wait_online(DEVICE, 30)
        exec_argv = [str(BIN / "dpanel"), "exec", DEVICE, "--", "true"]
        close_argv = [str(BIN / "dpanel"), "tunnel", "close", DEVICE]
        env = stack.env
        api = ApiClient(load_config(stack.config))
        _run_ok(exec_argv, env)  # first contact: host key pinning, known_hosts, imports

        cold_cli, cold_api, warm_cli, warm_api = [], [], [], []
        for _ in range(reps):
            _run_ok(close_argv, env)
            time.sleep(0.3)  # let the agent finish tearing its forward down
            cold_cli.append(_timed(lambda: _run_ok(exec_argv, env)))
            warm_cli.append(_timed(lambda: _run_ok(exec_argv, env)))
        for _ in range(reps):
            _run_ok(close_argv, env)
            time.sleep(0.3)
            cold_api.append(_timed(lambda: _api_exec(api)))
            warm_api.append(_timed(lambda: _api_exec(api)))
        open_times = []
        for _ in range(max(1, reps // 2)):
            _run_ok(close_argv, env)
            time.sleep(0.3)
            open_times.append(_timed(lambda: api.call("POST", f"/v1/devices/{DEVICE}/tunnel",
                                                      {})))
        result["cold_cli"] = _stats(cold_cli)
        result["cold_api"] = _stats(cold_api)
        result["warm_cli"] = _stats(warm_cli)
        result["warm_api"] = _stats(warm_api)
        # the MQTT round trip + agent dial alone (no SSH login into the device)
        result["tunnel_open_api"] = _stats(open_times)
