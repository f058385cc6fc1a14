"""``scp`` throughput by the three ways an operator reaches a device: through the API's
WebSocket (``dpanel proxy`` from a remote laptop, issue 9), through the on-host path
(``dpanel proxy`` straight to the tunnel port), and plain OpenSSH to a local sshd.

The two dPanel paths use the same operator certificate from ``POST /v1/certs`` and the
same agent, so their ratio is what the WebSocket hop costs. Upload and download, median
of ``reps`` runs; MB/s = 10^6 bytes per second of scp wall time (start-up included).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from statistics import median
from typing import Any, Optional

from .devstack import running_stack, start_agent
from .openssh import Sshd
from .report import Row

__all__ = ["rows", "run_scp_paths"]


def _scp(argv: list[str], src: str, dst: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(["scp", "-q", *argv, src, dst], env=env, capture_output=True,
                         timeout=900, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"scp {src} {dst} failed: {out.stderr[-400:]!r}")
    return time.perf_counter() - t0


def _measure(argv: list[str], host: str, env: dict[str, str], blob: Path, reps: int,
             nbytes: int) -> dict[str, float]:
    remote = f"/tmp/dpanel-bench-scp-{os.getpid()}.bin"
    up = [_scp(argv, str(blob), f"{host}:{remote}", env) for _ in range(reps)]
    back = blob.with_suffix(".back")
    down = [_scp(argv, f"{host}:{remote}", str(back), env) for _ in range(reps)]
    if back.stat().st_size != nbytes:
        raise RuntimeError(f"download through {host}: {back.stat().st_size} of {nbytes} bytes")
    back.unlink()
    subprocess.run(["rm", "-f", remote], check=False)
    return {"upload_MBps": round(nbytes / median(up) / 1e6, 1),
            "download_MBps": round(nbytes / median(down) / 1e6, 1)}


def run_scp_paths(workdir: Path, *, nbytes: int, reps: int) -> dict[str, Any]:
    blob = workdir / "scp-blob.bin"
    with blob.open("wb") as f:
        f.write(os.urandom(nbytes))
    result: dict[str, Any] = {"bytes": nbytes, "reps": reps, "paths": {}, "errors": {}}
    with running_stack(workdir, "scp-stack", port_range="36000-36099") as stack:
        start_agent(stack, "bench-scp", workdir)
        stack.wait_online("bench-scp", 60)
        key = workdir / "operator"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        token = (stack.dir / "keys" / "admin.token").read_text().strip()
        t0 = time.perf_counter()
        req = urllib.request.Request(
            f"http://127.0.0.1:{stack.api_port}/v1/certs", method="POST",
            data=json.dumps({"public_key": Path(f"{key}.pub").read_text().strip()}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            cert = json.loads(r.read())["certificate"]
        result["cert_issue_s"] = round(time.perf_counter() - t0, 4)
        Path(f"{key}-cert.pub").write_text(cert + "\n")
        stack.cli_ok("ssh-config")  # writes known_hosts
        argv = ["-F", "/dev/null", "-o", "BatchMode=yes",
                "-o", f"ProxyCommand={stack.proxy_command()}", "-i", str(key),
                "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={stack.dir / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes"]
        for path, via in (("websocket", "websocket"), ("on-host", "direct")):
            try:
                result["paths"][path] = _measure(argv, "bench-scp",
                                                 dict(stack.env, DPANEL_PROXY=via), blob,
                                                 reps, nbytes)
            except Exception as exc:  # one path failing must not hide the others
                result["errors"][path] = f"{type(exc).__name__}: {exc}"
    try:
        with Sshd() as sshd:
            # ssh's options without "ssh -F /dev/null" and the host; scp spells -p as -P
            sargv = ["-F", "/dev/null", *["-P" if a == "-p" else a
                                          for a in sshd.ssh_argv()[3:-1]]]
            result["paths"]["openssh"] = _measure(sargv, "root@127.0.0.1", dict(os.environ),
                                                  blob, reps, nbytes)
    except Exception as exc:
        result["errors"]["openssh"] = f"{type(exc).__name__}: {exc}"
    blob.unlink(missing_ok=True)
    result["ratios"] = _ratios(result["paths"])
    return result


def _ratios(paths: dict[str, dict[str, float]]) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    for a, b in (("websocket", "on-host"), ("websocket", "openssh"), ("on-host", "openssh")):
        for d in ("upload_MBps", "download_MBps"):
            va, vb = paths.get(a, {}).get(d), paths.get(b, {}).get(d)
            out[f"{a}/{b} {d[:-5]}"] = round(va / vb, 2) if va and vb else None
    return out


def rows(r: dict[str, Any]) -> list[Row]:
    out = []
    paths = r.get("paths", {})
    for path in ("websocket", "on-host"):
        for d in ("upload_MBps", "download_MBps"):
            v, b = paths.get(path, {}).get(d), paths.get("openssh", {}).get(d)
            out.append(Row(f"scp {path} {d[:-5]} vs openssh", v, "MB/s", b,
                           round(v / b, 2) if v and b else None, "report"))
    out.append(Row("certificate issue (POST /v1/certs)", r.get("cert_issue_s"), "s",
                   goal="report"))
    return out
