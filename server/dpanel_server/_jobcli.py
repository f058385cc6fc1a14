"""``dpanel job run|list|show|cancel|logs``: the jobs API from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable
from urllib.parse import quote

from .client import client_for, when
from .errors import DPanelError
from .jobs import parse_duration, parse_max_errors

__all__ = ["add_job_parser"]


class _Usage(DPanelError):
    pass


_client = client_for  # server.toml, or a `dpanel login` context, as every command


def _job_id(text: str) -> str:
    if not text or len(text) > 64 or not all(c.isalnum() or c in "-_" for c in text):
        raise _Usage(f"job: {text[:40]!r} is not a job id")
    return text


_when = when


def _safe(text: str) -> str:
    # device output and reasons reach a terminal: no escape sequences of theirs
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)


def cmd_job_run(args: argparse.Namespace) -> int:
    from .cli import _device_name

    argv = list(args.command)
    if not argv:
        raise _Usage("job run: no command given (dpanel job run ... -- CMD ...)")
    if sum(map(bool, (args.devices, args.filter, args.all))) != 1:
        raise _Usage("job run: give DEVICE..., --filter K=V or --all (one of them)")
    if args.max_concurrency < 1:
        raise _Usage(f"--max-concurrency: must be at least 1, not {args.max_concurrency}")
    try:
        max_errors = parse_max_errors(args.max_errors)
        expires = parse_duration(args.expires, "--expires")
        timeout = parse_duration(args.timeout, "--timeout") if args.timeout else None
    except DPanelError as exc:
        raise _Usage(str(exc)) from None
    body: dict[str, Any] = {
        "command": argv if len(argv) > 1 else argv[0],
        "devices": [_device_name(d) for d in args.devices], "filters": args.filter,
        "all": args.all, "max_concurrency": args.max_concurrency, "max_errors": max_errors,
        "expires": expires}
    if timeout:
        body["timeout"] = timeout
    job = _client(args).call("POST", "/v1/jobs", body)
    if args.json:
        print(json.dumps({"id": job["id"]}))
    else:
        print(f"job {job['id']}: {len(job['parts'])} device(s); follow it with: "
              f"dpanel job show {job['id']}")
    return 0


def _counts(job: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(job.get("counts", {}).items())) or "-"


def cmd_job_list(args: argparse.Namespace) -> int:
    jobs = _client(args).call("GET", "/v1/jobs")
    if args.json:
        print(json.dumps(jobs, indent=2, sort_keys=True))
        return 0
    print(f"{'JOB':<18} {'STATE':<10} {'BY':<12} {'CREATED':<20} PARTS / COMMAND")
    for j in jobs:
        print(f"{j['id']:<18} {j['state']:<10} {_safe(j['created_by'])[:12]:<12} "
              f"{_when(j['created']):<20} {_counts(j)}  {_safe(j['command'])[:60]}")
    return 0


def cmd_job_show(args: argparse.Namespace) -> int:
    job = _client(args).call("GET", f"/v1/jobs/{_job_id(args.id)}")
    if args.json:
        print(json.dumps(job, indent=2, sort_keys=True))
        return 0
    print(f"job {job['id']} ({job['state']}) by {_safe(job['created_by'])}, created "
          f"{_when(job['created'])}, expires {_when(job['expires'])}")
    print(f"command: {_safe(job['command'])}")
    print(f"max-concurrency {job['max_concurrency']}, max-errors {job['max_errors']}: "
          f"{_counts(job)}")
    print(f"{'DEVICE':<24} {'STATE':<10} {'EXIT':<5} {'ENDED':<20} REASON")
    for p in job["parts"]:
        ex = "-" if p["exit"] is None else str(p["exit"])
        print(f"{p['device']:<24} {p['state']:<10} {ex:<5} {_when(p['ended']):<20} "
              f"{_safe(p['reason'] or '')}")
    return 0


def cmd_job_cancel(args: argparse.Namespace) -> int:
    job = _client(args).call("POST", f"/v1/jobs/{_job_id(args.id)}/cancel", {})
    print(f"job {job['id']}: {job['state']} ({_counts(job)})")
    return 0


def cmd_job_logs(args: argparse.Namespace) -> int:
    from .cli import _device_name

    api = _client(args)
    job_id = _job_id(args.id)
    if args.device:
        devices = [_device_name(args.device)]
    else:
        devices = [p["device"] for p in api.call("GET", f"/v1/jobs/{job_id}")["parts"]
                   if p["state"] not in ("pending", "running")]
    for d in devices:
        p = api.call("GET", f"/v1/jobs/{job_id}/parts/{quote(d, safe='')}")
        ex = "-" if p["exit"] is None else p["exit"]
        print(f"=== {d}: {p['state']} (exit {ex}){' [truncated]' if p['truncated'] else ''}")
        if p["stdout"]:
            sys.stdout.write(_safe(p["stdout"]))
        if p["stderr"]:
            sys.stdout.write(_safe(p["stderr"]))
    return 0


def add_job_parser(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    job = sub.add_parser("job", help="jobs: a command for many devices, run on each once, "
                         "when online, until it expires").add_subparsers(dest="sub",
                                                                         required=True)
    a = add(job, "run", cmd_job_run, "start a job: dpanel job run --filter K=V|--all|"
            "DEVICE... [OPTIONS] -- COMMAND...")
    a.add_argument("devices", nargs="*", metavar="DEVICE")
    a.set_defaults(command=[])
    a.add_argument("--all", action="store_true", help="every enrolled device")
    a.add_argument("--filter", action="append", default=[],
                   help="glob on the device id, or KEY=GLOB on its labels (repeatable)")
    a.add_argument("--max-concurrency", type=int, default=16, help="parts running at once")
    a.add_argument("--max-errors", default="0", help="failed parts tolerated: N or N%% "
                   "(one more stops the job; default 0)")
    a.add_argument("--expires", default="7d", help="pending parts expire after this "
                   "(30s, 15m, 12h, 7d; default 7d)")
    a.add_argument("--timeout", help="each part's command is stopped after this")
    a.add_argument("--json", action="store_true", help='print {"id": ...}')
    a = add(job, "list", cmd_job_list, "list jobs")
    a.add_argument("--json", action="store_true")
    a = add(job, "show", cmd_job_show, "a job and its parts")
    a.add_argument("id")
    a.add_argument("--json", action="store_true")
    add(job, "cancel", cmd_job_cancel, "cancel pending parts, hang up running ones"
        ).add_argument("id")
    a = add(job, "logs", cmd_job_logs, "output of a job's ended parts")
    a.add_argument("id")
    a.add_argument("--device")
