"""``invoke bench --scale``: the fleet-size figures docs/scale.md is sized from.

Sections (each also runs alone: ``--only storm10k,capacity,manager,enrol``):

- ``storm10k``: 10,000 simulated devices on one Mosquitto, then a broker restart: time
  until all are back, broker CPU meanwhile (:mod:`.storm`).
- ``capacity``: the goal is 50,000 on one Mosquitto; as many as this machine allows
  (one broker process is capped by its open-file limit), with memory per connection
  and CPU per connect (:mod:`.storm`).
- ``manager``: one manager + Mosquitto (the stack) with 10,000 simulated devices online
  in the manager's presence (:func:`.scale.run_scale`, no tunnels).
- ``enrol``: enrolment rate one at a time and in bulk (1,000 devices) on SQLite and
  PostgreSQL (:mod:`.enrol`).
- ``rabbit_replicas``: 2 manager replicas on the 2-node RabbitMQ cluster, functional, then
  2,000 simulated devices for RabbitMQ's memory per connection (:mod:`.rabbit_replicas`).

Writes ``scale.json`` in ``--out`` and prints a short summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from dpanel_proto.util import atomic_write

from .enrol import run_enrol
from .rabbit_replicas import run_rabbit_replicas
from .scale import run_scale
from .storm import run_storm

SECTIONS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "storm10k": lambda d: run_storm(d, 10_000),
    "capacity": lambda d: run_storm(d, 50_000),
    "manager": lambda d: run_scale(d, agents=10_000, tunnels=0, steady=10.0),
    "enrol": lambda d: run_enrol(d, 1000),
    "rabbit_replicas": lambda d: run_rabbit_replicas(d, 2000),
}


def _brief(name: str, r: dict[str, Any]) -> str:
    if name in ("storm10k", "capacity"):
        c, s = r.get("connect", {}), r.get("storm", {})
        return (f"{r.get('devices')} devices ({r.get('capped_by', 'not capped')}): connected "
                f"in {c.get('seconds')} s; broker {r.get('broker_kb_per_connection')} KB/conn, "
                f"{r.get('broker_cpu_ms_per_connect')} ms CPU/connect, idle "
                f"{r.get('idle_broker_cpu_percent')} % CPU; after a restart all "
                f"{s.get('connected')}/{s.get('of')} back in {s.get('seconds')} s, broker CPU "
                f"peak {s.get('broker_cpu_percent_peak')} % mean "
                f"{s.get('broker_cpu_percent_mean')} %")
    if name == "manager":
        return (f"{r.get('online_in_manager')}/{r.get('target', {}).get('agents')} online in "
                f"the manager after {r.get('online_s')} s; steady usage "
                f"{r.get('steady_usage')}")
    if name == "enrol":
        return "; ".join(f"{eng}: " + ", ".join(f"{k} {v.get('per_s')}/s" for k, v in
                                                 res.items() if isinstance(v, dict))
                         for eng, res in r.items() if isinstance(res, dict))
    if name == "rabbit_replicas":
        return (f"online 5 s after the last CONNACK: a {r.get('online_in_replica_a')}, b "
                f"{r.get('online_in_replica_b')}; all online in both after "
                f"{r.get('all_online_s')} s; replica b restarted: at least "
                f"{r.get('restart_b_min_online')} online throughout, all after "
                f"{r.get('restart_b_all_online_s')} s")
    return json.dumps(r)[:300]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/bench-scale")
    ap.add_argument("--only", default=",".join(SECTIONS))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in a.only.split(","):
        t0 = time.monotonic()
        try:
            results[name] = SECTIONS[name](out)
        except Exception as exc:  # one section failing must not lose the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["section_s"] = round(time.monotonic() - t0, 1)
        atomic_write(out / "scale.json", json.dumps(results, indent=1) + "\n", 0o644)
        print(f"{name}: {_brief(name, results[name])}", flush=True)
    print(f"wrote {out / 'scale.json'}")


if __name__ == "__main__":
    main()
