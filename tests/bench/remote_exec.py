"""Time to first output of ``dpanel exec`` from a laptop-style login context over HTTPS,
cold and warm, against the on-host path; and the time to issue an SSH certificate.

"Remote" is a HOME holding only what ``dpanel login https://... --ca-file`` wrote (the
CLI then speaks HTTPS to ``stack up --https-listen``, pinned, with an operator token);
"on-host" is today's ``dpanel`` reading server.toml and talking plain HTTP on loopback.
Cold = the device's tunnel closed before the run (so the manager opens it and dials
SSH); warm = right after another exec (tunnel and pooled SSH connection up). Both are
the wall time from starting the ``dpanel`` process to the first byte on its stdout,
Python start-up included, as an operator feels it. Median of ``reps``.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any, Callable, Iterator, Optional

from stackfix import BIN, Stack
from support import free_port

from .devstack import close_stack, start_agent
from .report import Row

__all__ = ["rows", "run_remote_exec"]

_DEVICE = "bench-rx"


@contextmanager
def _https_stack(workdir: Path) -> Iterator[Stack]:
    d = workdir / "rx-stack"
    shutil.rmtree(d, ignore_errors=True)
    stack = Stack(dir=d, broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), https_port=free_port(), port_range="36100-36199")
    try:
        stack.start()
        yield stack
    finally:
        close_stack(stack)


def _first_output(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    t = time.perf_counter() - t0
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{argv[1:]} failed ({proc.returncode}): {err[-300:]!r}")
    return t


def _api_first_output(api: Any) -> float:
    """The same through the CLI's own client, in this process: no Python start-up."""
    t0 = time.perf_counter()
    first: Optional[float] = None
    for event in api.stream("POST", f"/v1/devices/{_DEVICE}/exec", {"command": "echo hi"}):
        if "error" in event:
            raise RuntimeError(str(event["error"]))
        if first is None and "stdout" in event:
            first = time.perf_counter() - t0
        if "exit" in event:
            break
    if first is None:
        raise RuntimeError("exec stream ended without output")
    return first


def _series(stack: Stack, run: Callable[[], float], reps: int) -> dict[str, float]:
    cold, warm = [], []
    for _ in range(reps):
        stack.cli_ok("tunnel", "close", _DEVICE)
        time.sleep(0.3)  # let the agent finish tearing its forward down (as section exec)
        cold.append(run())
        warm.append(run())
    return {"cold_s": round(median(cold), 3), "warm_s": round(median(warm), 3)}


def _remote_client(home: Path) -> Any:
    """An ApiClient of the login context in ``home`` (what the laptop's CLI builds)."""
    from dpanel_server.client import ApiClient
    from dpanel_server.login import pick_context

    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(home / ".config")
    try:
        ctx = pick_context(None, required=True)
    finally:
        if old is None:
            os.environ.pop("XDG_CONFIG_HOME", None)
        else:
            os.environ["XDG_CONFIG_HOME"] = old
    assert ctx is not None
    return ApiClient(context=ctx)


def run_remote_exec(workdir: Path, *, reps: int) -> dict[str, Any]:
    result: dict[str, Any] = {"reps": reps, "paths": {}}
    with _https_stack(workdir) as stack:
        start_agent(stack, _DEVICE, workdir)
        stack.wait_online(_DEVICE, 60)
        token = stack.cli_ok("user", "add", "bench", "--role", "operator",
                             "--print-token").strip()
        home = workdir / "rx-laptop"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir()
        remote_env = {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
        url = f"https://127.0.0.1:{stack.https_port}"
        out = subprocess.run([str(BIN / "dpanel"), "login", url, "--token", token,
                              "--ca-file", str(stack.dir / "ca.pem")], env=remote_env,
                             capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise RuntimeError(f"login failed: {out.stderr[-300:]!r}")
        argv = [str(BIN / "dpanel"), "exec", _DEVICE, "--", "echo", "hi"]
        host_env = dict(stack.env)
        result["paths"]["remote-https"] = _series(
            stack, lambda: _first_output(argv, remote_env), reps)
        result["paths"]["on-host"] = _series(stack, lambda: _first_output(argv, host_env),
                                             reps)
        from dpanel_server.client import ApiClient
        from dpanel_server.config import load_config

        remote_api, host_api = _remote_client(home), ApiClient(load_config(stack.config))
        result["paths"]["remote-https-api"] = _series(
            stack, lambda: _api_first_output(remote_api), reps)
        result["paths"]["on-host-api"] = _series(
            stack, lambda: _api_first_output(host_api), reps)
        # certificate issue, over the same pinned HTTPS as a laptop's `dpanel ssh`
        key = workdir / "rx-key"
        key.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        ctx = ssl.create_default_context(cafile=str(stack.dir / "ca.pem"))
        body = json.dumps({"public_key": Path(f"{key}.pub").read_text().strip()}).encode()
        times = []
        for _ in range(max(reps, 5)):
            req = urllib.request.Request(f"{url}/v1/certs", method="POST", data=body,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
                json.loads(r.read())
            times.append(time.perf_counter() - t0)
        result["cert_issue_https_s"] = round(median(times), 4)
    p = result["paths"]
    result["ratios"] = {f"remote/on-host {how}{k[:-2]}": _ratio(
        p[f"remote-https{suffix}"].get(k), p[f"on-host{suffix}"].get(k))
        for suffix, how in (("", "cli "), ("-api", "api ")) for k in ("cold_s", "warm_s")}
    return result


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 2) if a and b else None


def rows(r: dict[str, Any]) -> list[Row]:
    out = []
    p = r.get("paths", {})
    for suffix, how in (("", "CLI"), ("-api", "API client")):
        for k in ("cold_s", "warm_s"):
            v = p.get(f"remote-https{suffix}", {}).get(k)
            b = p.get(f"on-host{suffix}", {}).get(k)
            out.append(Row(f"exec first output ({how}), laptop over HTTPS {k[:-2]} vs "
                           "on-host", v, "s", b, _ratio(v, b), "report"))
    out.append(Row("certificate issue over HTTPS (POST /v1/certs)",
                   r.get("cert_issue_https_s"), "s", goal="report"))
    return out
