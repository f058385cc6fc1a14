"""An agent update over an LTE-like link: time and bytes on the wire.

The device (the frozen amd64 agent, in update slots under tests/updfix.Supervisor) lives
in a network namespace whose only link is a veth pair, shaped to 5 Mbit/s each way with
``tc tbf``. This kernel has no ``sch_netem``, so the 300 ms RTT comes from a relay on the
host that holds every chunk 150 ms in each direction (the device reaches the manager's
HTTP API only through it; MQTT goes direct, its round trips are a few small messages).
Counted: the veth's rx+tx bytes from the rollout's start until the new agent committed
(the HTTP fetch of the bundle, MQTT offer and statuses, TCP/IP overhead, and the new
agent's reconnect), against the bundle's size.

    python -m tests.bench.update_link --out out/bench-update
    python -m tests.bench.run --out DIR --only update   (a section of invoke bench; root)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stackfix import Stack
from support import device_link, free_port, wait_for

RATE = "5mbit"
ONE_WAY_S = 0.150


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _counters(ifname: str) -> int:
    base = Path("/sys/class/net") / ifname / "statistics"
    return int((base / "rx_bytes").read_text()) + int((base / "tx_bytes").read_text())


class DelayRelay:
    """host:port -> target, every chunk delivered ``delay`` s after it was read."""

    def __init__(self, host: str, target: tuple[str, int], delay: float) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.target, self.delay = target, delay
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(self.target)
            for a, b in ((c, u), (u, c)):
                q: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(a, q), daemon=True).start()
                threading.Thread(target=self._write, args=(b, q), daemon=True).start()

    def _read(self, s: socket.socket, q: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            q.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _write(self, s: socket.socket, q: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            due, data = q.get()
            time.sleep(max(0.0, due - time.monotonic()))
            if not data:
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                s.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def run_update_link(work: Path) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)"}
    import asyncssh

    from dpanel_proto import __version__ as old
    from dpanel_proto.update import write_bundle
    from updfix import NEW_VERSION, SlotDevice, Supervisor, frozen_agents

    agents = frozen_agents(Path.home() / ".cache" / "dpanel" / "test-dist-upd")
    tag = f"{os.getpid() % 10000}"
    a, b = 200 + os.getpid() % 40, random.randrange(256)
    host, hip, dip = f"10.{a}.{b}.250", f"10.{a}.{b}.1", f"10.{a}.{b}.2"
    ns, veth = f"dpu{tag}n", f"dpu{tag}v"
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"rate": RATE, "rtt_ms": round(2000 * ONE_WAY_S)}
    _run("ip", "addr", "add", f"{host}/32", "dev", "lo")
    st: Optional[Stack] = None
    sup: Optional[Supervisor] = None
    relay: Optional[DelayRelay] = None
    try:
        _run("ip", "netns", "add", ns)
        device_link(ns, veth, hip, dip, no_ipv6=True)
        tbf = ("root", "tbf", "rate", RATE, "burst", "32kbit", "latency", "400ms")
        _run("tc", "qdisc", "add", "dev", veth, *tbf)  # to the device (download)
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", *tbf)  # upload
        st = Stack(dir=work / "stack", broker_port=free_port(), tunnel_port=free_port(),
                   api_port=free_port(), public_host=host)
        st.start()
        wait_for(lambda: (st.dir / "update_key.pub").exists(), "update key", 30)
        key = asyncssh.read_private_key(str(st.dir / "update_key"))
        pub = " ".join((st.dir / "update_key.pub").read_text().split()[:2])
        relay = DelayRelay(host, ("127.0.0.1", st.api_port), ONE_WAY_S)
        dev = SlotDevice(work / "dev", st.enrol("lte-1"), agents[old], pub)
        sup = Supervisor(dev, work / "dev" / "agent.log", netns=ns)
        sup.start()
        wait_for(lambda: st.device("lte-1")["online"], "lte-1 online", 120)
        m = write_bundle(work / "bundle", agents[NEW_VERSION], NEW_VERSION, "amd64", key)
        st.cli_ok("agent", "import", str(work / "bundle"))
        time.sleep(3)  # the connect burst is over
        before, t0 = _counters(veth), time.monotonic()
        out = st.cli_ok("agent", "update", "lte-1", "--version", NEW_VERSION, "--json",
                        "--url", f"http://{host}:{relay.port}")
        rid = json.loads(out)["id"]

        def state() -> str:
            r = json.loads(st.cli_ok("agent", "update", "status", rid, "--json"))
            return str(r["parts"][0]["state"])
        wait_for(lambda: state() in ("updated", "failed", "rolled_back"), "the update", 600)
        secs = time.monotonic() - t0
        wire_bytes = _counters(veth) - before
        part = json.loads(st.cli_ok("agent", "update", "status", rid, "--json"))["parts"][0]
        res["download_s"] = _download_seconds(work / "dev" / "agent.log", part["offered"],
                                              m.size)
        if res["download_s"]:
            res["download_mbit_s"] = round(m.size * 8 / res["download_s"] / 1e6, 2)
        res.update({"state": state(), "bundle_bytes": m.size, "update_s": round(secs, 1),
                    "effective_mbit_s": round(m.size * 8 / secs / 1e6, 2),
                    "wire_bytes": wire_bytes,
                    "wire_overhead": round(wire_bytes / m.size, 3)})
    finally:
        if sup is not None:
            sup.stop()
        if st is not None:
            st.close()
        if relay is not None:
            relay.close()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "addr", "del", f"{host}/32", "dev", "lo"], capture_output=True)
    return res


def rows(r: dict[str, Any]) -> list[Any]:
    """The bench table's rows: the link's use (download vs its rate) and bytes per byte."""
    from .report import Row

    if "bundle_bytes" not in r:
        return []
    link = float(RATE.removesuffix("mbit"))
    out = [Row("update over 5 Mbit/s + 300 ms RTT: download", r.get("download_s"), "s",
               goal="report"),
           Row("update: rollout start to committed", r.get("update_s"), "s", goal="report"),
           Row("update: wire bytes per bundle byte", r.get("wire_overhead"), "x",
               goal="report")]
    if r.get("download_mbit_s"):
        out.append(Row("update: download rate / link rate", r["download_mbit_s"], "Mbit/s",
                       baseline=link, ratio=round(r["download_mbit_s"] / link, 2),
                       goal="report"))
    return out


def _download_seconds(log: Path, offered: float, size: int) -> Optional[float]:
    """From the offer (registry) to the agent's "N of N bytes" log line (same clock)."""
    import datetime

    for line in log.read_text(errors="replace").splitlines():
        if f"update download: {size} of {size} bytes" in line:
            when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return round(when - offered, 1)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.update_link", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/bench-update"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run_update_link(args.out / "work")
    (args.out / "update.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
