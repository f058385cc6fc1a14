"""Idle bytes on the wire per link profile, counted on the device's veth, and presence.

Each profile's agent runs in its own network namespace whose only link is a veth pair to
the host; the host end's interface counters (rx + tx bytes: Ethernet, IP, TCP, TLS and
MQTT, everything) are read at the start and end of a window that begins once the agent
is online and its connect burst is over. The window should span whole keepalive periods
of the slowest profile (metered: 1500 s; a window of one period counts one ping).
Then every link is cut at once (the device is "dead") and the time until the manager
shows each device offline is the presence bound, up to ``--presence-cap`` seconds.

    python -m tests.bench.wire --out out/bench-wire --window 1500
    invoke bench --wan          (the same, with defaults)

Root only (network namespaces). Writes wire.json and prints a README-ready table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stackfix import Stack
from support import device_link, free_port

#: (label, profile, transport): edge = TLS on the one port, plain = mqtt:// + ssh ports
CASES = [("default/edge", "default", "edge"), ("metered/edge", "metered", "edge"),
         ("metered/plain", "metered", "plain")]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _counters(ifname: str) -> tuple[int, int]:
    base = Path("/sys/class/net") / ifname / "statistics"
    return (int((base / "rx_bytes").read_text()) + int((base / "tx_bytes").read_text()),
            int((base / "rx_packets").read_text()) + int((base / "tx_packets").read_text()))


def measure(out: Path, window: float, presence_cap: float, settle: float) -> dict[str, Any]:
    tag = f"{os.getpid() % 10000}"
    a, b = 200 + os.getpid() % 40, random.randrange(256)
    host = f"10.{a}.{b}.250"  # on lo: stays up when the devices' links are cut
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    namespaces: list[str] = []
    links: list[str] = []
    stacks: list[Stack] = []
    results: dict[str, Any] = {"window_s": window, "cases": {}}
    _run("ip", "addr", "add", f"{host}/32", "dev", "lo")
    try:
        # two stacks: one with the edge (tokens name it), one without (plain ports)
        for transport in ("edge", "plain"):
            extra = ("--edge-listen", f"{host}:443") if transport == "edge" else ()
            st = Stack(dir=work / f"stack-{transport}", broker_port=free_port(),
                       tunnel_port=free_port(), api_port=free_port(), public_host=host,
                       extra=extra)
            stacks.append(st)
        for i in range(len(CASES)):
            ns, veth = f"dpw{tag}n{i}", f"dpw{tag}v{i}"
            _run("ip", "netns", "add", ns)
            namespaces.append(ns)
            hip, dip = f"10.{a}.{b}.{1 + 4 * i}", f"10.{a}.{b}.{2 + 4 * i}"
            # no IPv6 on the link: its router solicitations and MLD reports would be
            # counted as the agent's (the same ~140 bytes per minute for every profile)
            device_link(ns, veth, hip, dip, no_ipv6=True)
            links.append(veth)
        for st in stacks:
            st.start()
        started: list[tuple[str, Stack, str, str]] = []
        for i, (label, profile, transport) in enumerate(CASES):
            st = stacks[0] if transport == "edge" else stacks[1]
            name = f"wire-{i}"
            conf = work / f"{name}.toml"
            conf.write_text(f'profile = "{profile}"\n')
            st.start_agent(st.enrol(name), work / name, netns=namespaces[i],
                           extra=("--config", str(conf), "--log-level", "info"))
            started.append((label, st, name, links[i]))
        for _, st, name, _ in started:
            st.wait_online(name, 60)
        time.sleep(settle)
        before = {label: _counters(veth) for label, _, _, veth in started}
        t0 = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t0
        for label, _, _, veth in started:
            nbytes, npk = (x - y for x, y in zip(_counters(veth), before[label]))
            per_day = nbytes / elapsed * 86400
            results["cases"][label] = {"bytes": nbytes, "packets": npk, "window_s": elapsed,
                                       "bytes_per_day": round(per_day),
                                       "mb_per_month": round(per_day * 30 / 1e6, 3)}
        # presence: cut every link at once, time until each shows offline
        for _, _, _, veth in started:
            _run("ip", "link", "set", veth, "down")
        cut = time.monotonic()
        pending = {label: (st, name) for label, st, name, _ in started}
        while pending and time.monotonic() - cut < presence_cap:
            for label, (st, name) in list(pending.items()):
                if not st.device(name)["online"]:
                    results["cases"][label]["offline_after_s"] = round(time.monotonic() - cut)
                    del pending[label]
            time.sleep(2)
        for label in pending:
            results["cases"][label]["offline_after_s"] = f"> {presence_cap:.0f} (not measured)"
    finally:
        for st in stacks:
            st.close()
        for link in links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "addr", "del", f"{host}/32", "dev", "lo"], capture_output=True)
    return results


def table(results: dict[str, Any]) -> str:
    rows = ["| profile / transport | idle bytes/day | MB/month | offline after (s) |",
            "| --- | ---: | ---: | ---: |"]
    for label, r in results["cases"].items():
        rows.append(f"| {label} | {r['bytes_per_day']:,} | {r['mb_per_month']} | "
                    f"{r.get('offline_after_s', '-')} |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.wire", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/bench-wire"))
    p.add_argument("--window", type=float, default=1500.0, help="seconds counted (1500)")
    p.add_argument("--presence-cap", type=float, default=200.0,
                   help="seconds to wait for a cut device to show offline (200)")
    p.add_argument("--settle", type=float, default=5.0)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench wire: needs root (network namespaces)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    res = measure(args.out, args.window, args.presence_cap, args.settle)
    (args.out / "wire.json").write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
