"""Section 3: memory per open tunnel on the tunnel server, vs sshd per ``ssh -R`` connection.

Ours: a bare TunnelServer process; a separate client process holds N device-like asyncssh
connections, each with one reverse forward. Per tunnel = RSS growth of the server / N,
measured from a warm baseline (a few tunnels already open, so lazily loaded code is not
charged to the tunnels). sshd forks per connection, so its cost is the PSS summed over
the per-connection processes (PSS splits shared pages fairly between them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ._util import PY, Child, fd_count, pss_kb, rss_kb
from .openssh import ReverseForward, Sshd

__all__ = ["run_memory"]

_WARM = 5


def run_memory(workdir: Path, *, counts: tuple[int, ...], sshd_conns: int) -> dict[str, Any]:
    result: dict[str, Any] = {"goal": "dpanel per tunnel < 0.1 x sshd per connection",
                              "errors": {}}
    try:
        result["dpanel"] = _dpanel(workdir, counts)
    except Exception as exc:
        result["errors"]["dpanel"] = f"{type(exc).__name__}: {exc}"
    try:
        result["sshd"] = _sshd(sshd_conns)
    except Exception as exc:
        result["errors"]["sshd"] = f"{type(exc).__name__}: {exc}"
    sshd_kb = result.get("sshd", {}).get("pss_kb_per_conn")
    ratios = {}
    for n, row in result.get("dpanel", {}).get("at", {}).items():
        if sshd_kb and row.get("rss_kb_per_tunnel") is not None:
            ratios[n] = round(row["rss_kb_per_tunnel"] / sshd_kb, 3)
    result["ratio_vs_sshd"] = ratios
    return result


def _dpanel(workdir: Path, counts: tuple[int, ...]) -> dict[str, Any]:
    need = max(counts) + _WARM
    server = Child([PY, "-m", "tests.bench.tunnel_proc", "--key", str(workdir / "mem_host_key"),
                    "--ports", f"24000-{24000 + max(3 * need, 1000)}",
                    "--max-unauth", "1000"], workdir / "mem-tunnel.log")
    client = None
    try:
        port = int(server.read(60)["port"])
        client = Child([PY, "-m", "tests.bench.fwd_clients", "--port", str(port),
                        "--prefix", "mem", "--concurrency", "16"], workdir / "mem-client.log")
        client.read(60)
        got = client.ask({"cmd": "open", "n": _WARM, "target": 9}, 120)
        server.ask({"cmd": "gc"})
        time.sleep(0.5)
        base = rss_kb(server.pid)
        out: dict[str, Any] = {"baseline_rss_kb": base, "warm_tunnels": _WARM,
                               "baseline_fds": fd_count(server.pid), "at": {}}
        opened = got["ok"]
        failed = got["failed"]
        for n in sorted(counts):
            t0 = time.monotonic()
            got = client.ask({"cmd": "open", "n": n + _WARM - opened - failed, "target": 9},
                             1800)
            opened += got["ok"]
            failed += got["failed"]
            stats = server.ask({"cmd": "gc"})["stats"]
            time.sleep(0.5)
            rss = rss_kb(server.pid)
            grown = opened - _WARM
            out["at"][str(n)] = {
                "tunnels": grown, "failed": failed, "errors": got["errors"],
                "server_rss_kb": rss, "server_pss_kb": pss_kb(server.pid),
                "rss_kb_per_tunnel": round((rss - base) / grown, 1) if grown else None,
                "fds_per_tunnel": round((fd_count(server.pid) - out["baseline_fds"]) / grown, 2)
                if grown else None,
                "server_ports_in_use": stats.get("ports_in_use"),
                "client_rss_kb": rss_kb(client.pid),
                "open_seconds": round(time.monotonic() - t0, 1),
            }
        return out
    finally:
        if client is not None:
            client.close()
        server.close()


def _sshd(conns: int) -> dict[str, Any]:
    with Sshd(max_startups=conns + 10) as sshd:
        idle = sshd.per_connection_memory()
        forwards: list[ReverseForward] = []
        try:
            for _ in range(conns):
                forwards.append(ReverseForward(sshd, 9))
            for fwd in forwards:
                fwd.wait(60)
            time.sleep(0.5)
            mem = sshd.per_connection_memory()
            client_rss = sum(rss_kb(f.proc.pid) for f in forwards)
        finally:
            for fwd in forwards:
                fwd.close()
    n = len(forwards)
    return {
        "connections": n, "processes": mem["processes"],
        "pss_kb_per_conn": round((mem["pss_kb"] - idle["pss_kb"]) / n, 1),
        "rss_kb_per_conn": round((mem["rss_kb"] - idle["rss_kb"]) / n, 1),
        "ssh_client_rss_kb_per_conn": round(client_rss / n, 1),
    }
