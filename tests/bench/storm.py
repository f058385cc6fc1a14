"""``invoke bench --scale``: how many devices one Mosquitto holds, and the reconnect storm.

One real Mosquitto (dPanel's own configuration, password + ACL files with a PBKDF2 hash
per device, as the appliance runs it) and light simulated agents (:mod:`.simagents`: a
real MQTT 3.1.1 session each, with a last will, a subscription and a retained status,
reconnecting on the agent's own Backoff schedule) in a few worker processes.

1. connect: N devices connect; the broker's memory per connection and CPU per connect.
2. idle: broker CPU with everyone connected (keepalives only).
3. storm: the broker is killed and started again on the same port; the time until all N
   have their session back (CONNACK, subscription, retained status published), and the
   broker's CPU each second meanwhile (``/proc/<pid>/stat``).

"Online" here is the broker's view (every device re-published its status); the
manager's presence follows those statuses (the scale section of ``invoke bench``
measures a manager behind them).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from dpanel_server.broker import (
    Listener,
    mosquitto_hash,
    render_acl,
    render_mosquitto_conf,
    render_passwd,
)
from support import free_port, wait_port

from ._util import PY, Child, cpu_seconds, raise_nofile, rss_kb

__all__ = ["run_storm"]

MANAGER = "dpanel-manager"


class Broker:
    def __init__(self, d: Path, devices: list[tuple[str, str]]) -> None:
        self.dir, self.port = d, free_port()
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        entries = [(dev, mosquitto_hash(secret)) for dev, secret in devices]
        entries.append((MANAGER, mosquitto_hash("unused-" + os.urandom(8).hex())))
        (d / "passwd").write_text(render_passwd(entries))
        (d / "acl").write_text(render_acl(MANAGER))
        self.conf = d / "mosquitto.conf"
        self.conf.write_text(render_mosquitto_conf(
            passwd=d / "passwd", acl=d / "acl", pid_file=d / "mosquitto.pid",
            listeners=[Listener(self.port, "127.0.0.1", public=True, max_connections=-1)]))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        with (self.dir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_port(self.port, timeout=60)
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _connected(sims: list[Child]) -> int:
    return sum(int(w.ask({"cmd": "status"}, 120)["connected"]) for w in sims)


def _wait_all(sims: list[Child], n: int, broker: Broker, timeout: float,
              stall: float = 60.0, since: float = 0.0) -> dict[str, Any]:
    """Poll every 0.5 s until n are connected; the broker's CPU share each second.
    The polls may lag behind a busy simulator, so the figure is taken from each
    simulator's own clock: when its last device got its session back."""
    t0 = time.monotonic()
    since = since or time.time()
    cpu0, last_t = cpu_seconds(broker.pid), t0
    samples: list[tuple[float, int, float]] = []  # (t, connected, cpu %)
    seen, moved = -1, t0
    while True:
        time.sleep(0.5)
        c = _connected(sims)
        now = time.monotonic()
        if now - last_t >= 1.0 or c >= n:
            cpu = cpu_seconds(broker.pid)
            samples.append((round(now - t0, 1), c,
                            round(100 * (cpu - cpu0) / max(now - last_t, 1e-6), 1)))
            cpu0, last_t = cpu, now
        if c != seen:
            seen, moved = c, now
        if c >= n or now - t0 > timeout or now - moved > stall:
            break
    cpus = [s[2] for s in samples]
    ats = [w.ask({"cmd": "status"}, 120).get("all_connected_at") for w in sims]
    exact = (round(max(ats) - since, 1) if seen >= n and all(ats) and min(ats) >= since
             else None)
    return {"connected": seen, "of": n, "seconds": exact if exact is not None
            else round(moved - t0, 1), "seconds_by_poll": round(moved - t0, 1),
            "broker_cpu_percent_peak": max(cpus) if cpus else 0,
            "broker_cpu_percent_mean": round(sum(cpus) / len(cpus), 1) if cpus else 0,
            "samples_t_connected_cpu": samples}


def run_storm(workdir: Path, n: int, workers: int = 2, timeout: float = 900.0,
              down: float = 2.0) -> dict[str, Any]:
    """N simulated devices on one broker; then the broker dies for ``down`` seconds."""
    limit = raise_nofile(n + 1000)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out: dict[str, Any] = {"target": n, "nofile_soft": limit, "nofile_hard": hard}
    if limit < n + 100:
        # every broker connection is a descriptor in the one mosquitto process
        out["capped_by"] = (f"RLIMIT_NOFILE hard limit {hard} (not raisable here): one "
                            f"Mosquitto process holds at most ~{limit - 100} connections")
        n = limit - 100
    out["devices"] = n
    creds = [(f"sim-{i:05d}", os.urandom(12).hex()) for i in range(n)]
    t0 = time.monotonic()
    broker = Broker(workdir / "storm-broker", creds)
    out["passwd_write_s"] = round(time.monotonic() - t0, 1)
    sims: list[Child] = []
    try:
        broker.start()
        rss0, cpu0 = rss_kb(broker.pid), cpu_seconds(broker.pid)
        per = max(1, workers)
        for i in range(per):
            spec = {"broker": ["127.0.0.1", broker.port], "tunnel": ["127.0.0.1", 9],
                    "devices": creds[i::per], "keepalive": 60, "connect_concurrency": 200,
                    "backoff": [1.0, 120.0], "sources": 4}
            path = workdir / f"storm-sim-{i}.json"
            path.write_text(json.dumps(spec))
            w = Child([PY, "-m", "tests.bench.simagents", str(path)],
                      workdir / f"storm-sim-{i}.log")
            sims.append(w)
            w.read(120)
        out["connect"] = _wait_all(sims, n, broker, timeout)
        rss1, cpu1 = rss_kb(broker.pid), cpu_seconds(broker.pid)
        got = max(1, out["connect"]["connected"])
        out["broker_rss_kb"] = {"empty": rss0, "connected": rss1}
        out["broker_kb_per_connection"] = round((rss1 - rss0) / got, 2)
        out["broker_cpu_ms_per_connect"] = round(1000 * (cpu1 - cpu0) / got, 3)
        time.sleep(10)
        out["idle_broker_cpu_percent"] = round(10 * (cpu_seconds(broker.pid) - cpu1), 2)
        out["sim_rss_kb"] = sum(rss_kb(w.pid) for w in sims)
        # the storm: kill -9 (no clean goodbye), down for a moment, then back
        broker.kill()
        time.sleep(down)
        back = time.time()
        out["broker_restart_s"] = round(broker.start(), 2)
        out["storm"] = _wait_all(sims, got, broker, timeout, since=back)
        out["storm"]["down_s"] = down
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for w in sims:
            w.close()
        broker.kill()
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--out", default="out/storm")
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    print(json.dumps(run_storm(Path(a.out), a.n), indent=1))
