"""Smoke run of ``invoke bench`` at the smallest sizes: every section runs and reports
numbers. Nothing about how good the numbers are (benches are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from numbers import Number
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _number(d: Any, *path: str) -> Any:
    for key in path:
        assert isinstance(d, dict) and key in d, f"missing {'.'.join(path)}"
        d = d[key]
    assert isinstance(d, Number) and not isinstance(d, bool), f"{'.'.join(path)} = {d!r}"
    return d


@pytest.mark.root
def test_bench_quick_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tests.bench.run", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    r = json.loads((out / "bench.json").read_text())
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    for name in ("throughput", "exec", "memory", "agent_idle", "scale", "image"):
        assert name in r, name
        assert "error" not in r[name], (name, r[name]["error"])

    t = r["throughput"]
    assert not t["errors"], t["errors"]
    for path in ("loopback", "openssh", "dpanel", "openssh-ssh", "agent-ssh"):
        for d in ("push_mbps", "pull_mbps"):
            assert _number(t, "paths", path, d) > 0
    assert _number(t, "ratios", "dpanel", "push") > 0

    e = r["exec"]
    assert not e["errors"], e["errors"]
    for key in ("openssh_fresh", "cold_cli", "cold_api", "warm_cli", "warm_api"):
        assert _number(e, key, "median_s") > 0
    _number(e, "warm_vs_ssh")

    m = r["memory"]
    assert not m["errors"], m["errors"]
    for n in ("5", "10"):
        assert _number(m, "dpanel", "at", n, "tunnels") == int(n)
        _number(m, "dpanel", "at", n, "rss_kb_per_tunnel")
    assert _number(m, "sshd", "pss_kb_per_conn") > 0

    a = r["agent_idle"]
    assert not a["errors"], a["errors"]
    assert _number(a, "python", "rss_kb") > 0
    _number(a, "python", "sent_bytes_per_hour")
    assert _number(a, "python", "connect_bytes", "sent") > 0  # the proxy saw the CONNECT

    s = r["scale"]
    assert not s["errors"], s["errors"]
    assert _number(s, "connected") == s["target"]["agents"]
    assert _number(s, "online_in_manager") == s["target"]["agents"]
    assert _number(s, "tunnels_open") == s["target"]["tunnels"]
    assert _number(s, "steady_usage", "broker", "rss_kb") > 0

    assert "skipped" in r["image"]  # no --with-image
    metrics = [row["metric"] for row in r["summary"]]
    assert any(m.startswith("throughput dpanel push") for m in metrics)
    assert "ratio" in proc.stdout.decode()  # the table was printed
