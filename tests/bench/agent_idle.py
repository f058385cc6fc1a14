"""Section 4: an idle agent: resident memory, CPU, and bytes on the wire per hour.

The agent's token is rewritten to dial the broker through a counting proxy (tokens carry
the broker address; the checksum is only against typos), so the bytes are measured, not
derived from the keepalive setting. The counting window starts after the agent is online
and its connect burst is over.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from dpanel_proto.token import parse_token

from ._util import ROOT, cpu_seconds, descendants, pss_kb, rss_kb
from .devstack import AGENT_EXE, running_stack, start_agent
from .proxy import CountingProxy

__all__ = ["FROZEN", "run_agent_idle"]

FROZEN = ROOT / "dist" / "amd64" / "dpanel-tunnel"
#: Per TCP segment on Ethernet: 14 Ethernet + 20 IPv4 + 32 TCP with timestamps.
_SEGMENT_OVERHEAD = 66


def run_agent_idle(workdir: Path, *, window: float, settle: float = 3.0) -> dict[str, Any]:
    result: dict[str, Any] = {"goal": {"rss_mb": "<= 40"}, "window_s": window, "errors": {}}
    variants: list[tuple[str, Path]] = [("python", AGENT_EXE)]
    if FROZEN.exists():
        variants.append(("frozen", FROZEN))
    else:
        result["frozen"] = {"skipped": f"{FROZEN} not built (invoke build-agent)"}
    with running_stack(workdir, "idle-stack", port_range="27500-27599") as stack:
        for name, exe in variants:
            try:
                result[name] = _measure(stack, workdir, name, exe, window, settle)
            except Exception as exc:
                result["errors"][name] = f"{type(exc).__name__}: {exc}"
    return result


def _tree_memory(pid: int) -> tuple[int, int, list[int]]:
    """RSS and PSS of an agent and its children (a PyInstaller onefile is a bootloader
    parent plus the Python child)."""
    pids = [pid, *descendants(pid)]
    rss = pss = 0
    for p in pids:
        try:
            rss += rss_kb(p)
            pss += pss_kb(p)
        except OSError:
            pass
    return rss, pss, pids


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def _measure(stack: Any, workdir: Path, name: str, exe: Path, window: float,
             settle: float) -> dict[str, Any]:
    device = f"idle-{name}"
    token = parse_token(stack.enrol(device))
    proxy = CountingProxy(int(token.broker.rsplit(":", 1)[1]))
    try:
        via_proxy = dataclasses.replace(token, broker=f"mqtt://127.0.0.1:{proxy.port}").encode()
        t0 = time.monotonic()
        agent = start_agent(stack, device, workdir, token=via_proxy, exe=exe)
        stack.wait_online(device, 60)
        online_s = time.monotonic() - t0
        time.sleep(settle)
        rss0, _, pids = _tree_memory(agent.pid)
        c0, cpu0, w0 = proxy.snapshot(), _cpu(pids), time.monotonic()
        time.sleep(window)
        c1, cpu1, w1 = proxy.snapshot(), _cpu(pids), time.monotonic()
        rss, pss, pids = _tree_memory(agent.pid)
        if agent.poll() is not None:
            raise RuntimeError(f"agent exited with {agent.returncode} while idle")
        span = w1 - w0
        up, down = c1.up_bytes - c0.up_bytes, c1.down_bytes - c0.down_bytes
        segs = (c1.up_reads - c0.up_reads) + (c1.down_reads - c0.down_reads)
        per_hour = 3600 / span
        out: dict[str, Any] = {
            "exe": str(exe), "processes": len(pids), "online_after_s": round(online_s, 2),
            "rss_kb": rss, "pss_kb": pss, "rss_kb_at_start": rss0,
            "cpu_percent": round(100 * (cpu1 - cpu0) / span, 3),
            "sent_bytes_per_hour": round(up * per_hour),
            "received_bytes_per_hour": round(down * per_hour),
            "mqtt_messages_in_window": segs,
            # rough on-the-wire figure: each message is one segment, acknowledged by one
            "wire_bytes_per_hour_est": round((up + down + segs * 2 * _SEGMENT_OVERHEAD)
                                             * per_hour),
            "connect_bytes": {"sent": c0.up_bytes, "received": c0.down_bytes},
        }
        out.update(_with_tunnel(stack, device, agent.pid))
        return out
    finally:
        proxy.close()


def _with_tunnel(stack: Any, device: str, pid: int) -> dict[str, Optional[int]]:
    """RSS once a tunnel is open (the SSH client and built-in server are loaded)."""
    try:
        stack.cli_ok("exec", device, "--", "true")
        time.sleep(0.5)
        rss, _, _ = _tree_memory(pid)
        stack.cli_ok("tunnel", "close", device)
        return {"rss_kb_tunnel_open": rss}
    except (AssertionError, subprocess.SubprocessError, OSError):
        return {"rss_kb_tunnel_open": None}
