"""Bench section ``api_load``: API latency (p50/p99 of ``GET /v1/health``) while one device
streams 100 MB to a fan-out (``dpanel exec --all -- head -c 100M /dev/zero``), against
the same calls on an idle stack. It shows whether a big output stalls the manager's
event loop (it froze it for a minute before exec output handling became linear)."""

from __future__ import annotations

import http.client
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from ._util import BIN
from .devstack import running_stack, start_agent

__all__ = ["rows", "run_api_load"]

DEVICE = "load-dev"


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def _health_times(port: int, stop: threading.Event, out: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while not stop.is_set():
        t0 = time.perf_counter()
        conn.request("GET", "/v1/health")
        conn.getresponse().read()
        out.append(time.perf_counter() - t0)
        time.sleep(0.02)
    conn.close()


def _stats(times: list[float]) -> dict[str, Any]:
    return {"p50_ms": round(_percentile(times, 0.5) * 1000, 2),
            "p99_ms": round(_percentile(times, 0.99) * 1000, 2),
            "max_ms": round(max(times, default=0) * 1000, 2), "n": len(times)}


def run_api_load(workdir: Path, *, nbytes: int = 100 << 20) -> dict[str, Any]:
    with running_stack(workdir, "load-stack", port_range="27600-27699") as stack:
        start_agent(stack, DEVICE, workdir)
        stack.wait_online(DEVICE, 30)
        stack.cli_ok("exec", DEVICE, "--", "true")  # tunnel + pooled connection up
        idle: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=_health_times, args=(stack.api_port, stop, idle))
        t.start()
        time.sleep(3)
        stop.set()
        t.join()

        busy: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=_health_times, args=(stack.api_port, stop, busy))
        t.start()
        t0 = time.perf_counter()
        out = subprocess.run([str(BIN / "dpanel"), "exec", "--all", "--", "head", "-c",
                              str(nbytes), "/dev/zero"], env=stack.env, capture_output=True,
                             timeout=600, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        stop.set()
        t.join()
        if out.returncode != 0:
            raise RuntimeError(f"fan-out exited {out.returncode}: {out.stderr[-300:]!r}")
    return {"bytes": nbytes, "transfer_s": round(seconds, 2),
            "transfer_mbps": round(nbytes / seconds / 1e6, 1),
            "idle": _stats(idle), "during": _stats(busy)}


def rows(r: dict[str, Any]) -> list[Any]:
    from .report import Row

    during, idle = r.get("during") or {}, r.get("idle") or {}
    mib = (r.get("bytes") or 0) >> 20
    return [Row(f"API /v1/health {q} while a device streams {mib} MiB to a fan-out (vs idle)",
                during.get(f"{q}_ms"), "ms", idle.get(f"{q}_ms"), None, "report")
            for q in ("p50", "p99")]
