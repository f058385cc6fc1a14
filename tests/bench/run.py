"""``invoke bench``: dPanel Edge side by side with OpenSSH on this machine, in one run.

``python -m tests.bench.run --out DIR`` writes ``DIR/bench.json`` (rewritten after every
section, so a crash keeps what was measured) and ``DIR/bench.png``, and prints a table of
ratios against OpenSSH and the goals. A section that fails records its error and the
others still run. Nothing here asserts a time: benches are not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ._util import raise_nofile, section

__all__ = ["SECTIONS", "main"]

SECTIONS = ("throughput", "scp", "exec", "remote_exec", "api_load", "memory", "agent_idle",
            "scale", "enrol", "update", "jobs", "image", "web")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "?"


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import asyncssh

    return {
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "asyncssh": asyncssh.__version__,
        "openssh": _version(["ssh", "-V"]), "mosquitto": _version(["mosquitto", "-h"]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
        "argv": sys.argv[1:], "loadavg_start": os.getloadavg(),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _image(args: argparse.Namespace) -> dict[str, Any]:
    if not args.with_image:
        return {"skipped": "pass --with-image (slow)"}
    try:
        from . import image as image_bench
    except ImportError as exc:
        return {"skipped": f"tests.bench.image not available ({exc})"}
    return dict(image_bench.run_bench())


def _skipped(why: str) -> dict[str, Any]:
    return {"skipped": why}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="directory for bench.json/png")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes everywhere: a smoke run of every section (~1 min)")
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="run only this section (repeatable)")
    p.add_argument("--agents", type=int, help="scale: simulated agents (goal 10000)")
    p.add_argument("--tunnels", type=int, help="scale: tunnels to open (goal 500)")
    p.add_argument("--sim-workers", type=int, help="scale: simulator processes")
    p.add_argument("--connect-rate", type=float, default=0,
                   help="scale: agent connections per second (default: unpaced burst)")
    p.add_argument("--bytes", type=int, help="throughput: bytes per transfer (256 MiB)")
    p.add_argument("--reps", type=int, help="repetitions (throughput 3, exec 7)")
    p.add_argument("--idle-window", type=float, help="agent idle: seconds counted (130)")
    p.add_argument("--tunnel-counts", default=None,
                   help="memory: comma-separated tunnel counts (100,1000)")
    p.add_argument("--sshd-conns", type=int, help="memory: ssh -R connections (30)")
    p.add_argument("--enrol-devices", type=int, help="enrol: devices per run (1000)")
    p.add_argument("--jobs-agents", type=int, help="jobs: simulated agents (1000)")
    p.add_argument("--with-image", action="store_true",
                   help="also run tests.bench.image.run_bench() (slow)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the scratch directory (logs, stack state) for debugging")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    q = args.quick
    counts = args.tunnel_counts or ("5,10" if q else "100,1000")
    return {
        "bytes": args.bytes or (4 << 20 if q else 256 << 20),
        "tput_reps": args.reps or (1 if q else 3),
        "exec_reps": args.reps or (2 if q else 7),
        "idle_window": args.idle_window if args.idle_window is not None else (2 if q else 130),
        "counts": tuple(int(c) for c in counts.split(",")),
        "sshd_conns": args.sshd_conns or (3 if q else 30),
        "agents": args.agents or (40 if q else 10000),
        "tunnels": args.tunnels or (4 if q else 500),
        "sim_workers": args.sim_workers or (1 if q else 2),
        "steady": 1.0 if q else 15.0,
        "enrol_devices": args.enrol_devices or (20 if q else 1000),
    }


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    s = _settings(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Children (mosquitto, the stack, simulators, sshd) inherit this.
    fds = raise_nofile(max(65536, 3 * s["agents"] + 1000))
    work = Path(tempfile.mkdtemp(prefix="dpanel-bench-"))

    from .agent_idle import run_agent_idle
    from .api_load import run_api_load
    from .enrol import run_enrol
    from .jobs_rate import run_jobs_rate
    from .latency import run_latency
    from .memory import run_memory
    from .remote_exec import run_remote_exec
    from .scale import run_scale
    from .scp_paths import run_scp_paths
    from .throughput import run_throughput
    from .update_link import run_update_link
    from .web import run_web

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "throughput": lambda: run_throughput(work, nbytes=s["bytes"], reps=s["tput_reps"],
                                             ciphers=() if args.quick else
                                             ("aes128-gcm@openssh.com",)),
        "scp": lambda: run_scp_paths(work, nbytes=args.bytes or ((4 << 20) if args.quick
                                                                 else 128 << 20),
                                     reps=s["tput_reps"]),
        "exec": lambda: run_latency(work, reps=s["exec_reps"]),
        # not in a --quick smoke run unless asked for: the smoke test's budget is spent
        "remote_exec": lambda: (run_remote_exec(work, reps=1 if args.quick else
                                                s["exec_reps"])
                                if not args.quick or args.only else
                                {"skipped": "--quick (use --only remote_exec)"}),
        "api_load": lambda: run_api_load(work, nbytes=(8 << 20) if args.quick else 100 << 20),
        "memory": lambda: run_memory(work, counts=s["counts"], sshd_conns=s["sshd_conns"]),
        "agent_idle": lambda: run_agent_idle(work, window=s["idle_window"]),
        "scale": lambda: run_scale(work, agents=s["agents"], tunnels=s["tunnels"],
                                   workers=s["sim_workers"], steady=s["steady"],
                                   connect_rate=args.connect_rate),
        "enrol": lambda: run_enrol(work, n=s["enrol_devices"]),
        "image": lambda: _image(args),
        # an agent update over a 5 Mbit/s, 300 ms RTT link (root: network namespaces)
        # both cost a minute or more even when small: not in --quick (the CI smoke run)
        "update": lambda: _skipped("not in --quick") if args.quick else run_update_link(
            work / "update"),
        "jobs": lambda: _skipped("not in --quick") if args.quick else run_jobs_rate(
            work, agents=args.jobs_agents or 1000),
        # a browser and 3,000 devices: not part of the --quick smoke run unless asked for
        "web": lambda: ({"skipped": "--quick: pass --only web"} if args.quick and not args.only
                        else run_web(work, devices=40 if args.quick else 3000,
                                     reps=5 if args.quick else 20)),
    }
    results: dict[str, Any] = {"meta": {**_meta(args), "settings": s, "nofile": fds,
                                        "workdir": str(work)}}
    json_path = out / "bench.json"
    try:
        for name in SECTIONS:
            if args.only and name not in args.only:
                continue
            results[name] = section(name, runners[name])
            _write_json(json_path, results)
    finally:
        if args.keep_work:
            print(f"scratch kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["meta"]["loadavg_end"] = os.getloadavg()

    from .report import plot, summarize, table

    results["summary"] = summarize(results)
    _write_json(json_path, results)
    try:
        plot(results, out / "bench.png")
    except Exception as exc:  # the numbers matter more than the picture
        results["meta"]["plot_error"] = f"{type(exc).__name__}: {exc}"
        _write_json(json_path, results)
    print(table(results["summary"]))
    errors = {k: v["error"] for k, v in results.items()
              if isinstance(v, dict) and "error" in v}
    for k, v in errors.items():
        print(f"section {k} failed: {v}")
    print(f"\nwrote {json_path} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
