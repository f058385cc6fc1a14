"""``dpanel agent update|import|bundles``: agent updates from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from .client import client_for, when
from .errors import DPanelError
from .jobs import parse_duration

__all__ = ["add_agent_parser"]


class _Usage(DPanelError):
    pass


def _safe(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


#: how the summary names a part's state
_SUMMARY = (("updated", "updated"), ("rolled_back", "rolled back"), ("failed", "failed"),
            ("offered", "in progress"), ("pending", "pending"), ("skipped", "skipped"))


def summary(r: dict[str, Any]) -> str:
    """``3 updated, 1 rolled back, 2 pending (offline)``."""
    out = []
    for key, word in _SUMMARY:
        n = r["counts"].get(key, 0)
        if not n:
            continue
        if key == "pending":
            off = sum(1 for p in r["parts"] if p["state"] == "pending" and not p.get("online"))
            word += f" ({off} offline)" if off else ""
        out.append(f"{n} {word}")
    return ", ".join(out) or "no devices"


def _show(r: dict[str, Any]) -> None:
    print(f"rollout {r['id']} ({r['state']}) of {r['version']} by {_safe(r['created_by'])}, "
          f"created {when(r['created'])}: canary {r['canary']}, max-failures "
          f"{r['max_failures']}")
    print(f"{'DEVICE':<24} {'STATE':<12} {'FROM':<12} {'NOW':<12} REASON")
    for p in r["parts"]:
        state = p["state"] + ("*" if p["canary"] else "")
        now = p.get("agent_version") or ("offline" if not p.get("online") else "-")
        print(f"{p['device']:<24} {state:<12} {_safe(p['from_version'] or '-'):<12} "
              f"{_safe(now):<12} {_safe(p['reason'] or '')}")
    print(f"summary: {summary(r)}  (* = canary)")


def cmd_agent_update(args: argparse.Namespace) -> int:
    from .cli import _device_name

    api = client_for(args)
    words = list(args.devices)
    if words and words[0] in ("status", "list"):
        # dpanel agent update status [ID] | list
        if words[0] == "list" or len(words) == 1:
            rollouts = api.call("GET", "/v1/agent/rollouts")
            if words[0] == "status" and rollouts:
                rollouts = rollouts[-1:]
            if args.json:
                print(json.dumps(rollouts, indent=2, sort_keys=True))
                return 0
            if words[0] == "status":
                for r in rollouts:
                    _show(r)
                return 0
            print(f"{'ROLLOUT':<18} {'STATE':<10} {'VERSION':<12} {'CREATED':<20} SUMMARY")
            for r in rollouts:
                print(f"{r['id']:<18} {r['state']:<10} {_safe(r['version']):<12} "
                      f"{when(r['created']):<20} {summary(r)}")
            return 0
        r = api.call("GET", f"/v1/agent/rollouts/{quote(words[1], safe='')}")
        if args.json:
            print(json.dumps(r, indent=2, sort_keys=True))
        else:
            _show(r)
        return 0
    if not args.version:
        raise _Usage("agent update: --version is required")
    if sum(map(bool, (words, args.filter, args.all))) != 1:
        raise _Usage("agent update: give DEVICE..., --filter K=V or --all (one of them)")
    body: dict[str, Any] = {
        "version": args.version, "devices": [_device_name(d) for d in words],
        "filters": args.filter, "all": args.all, "canary": args.canary,
        "max_failures": args.max_failures, "max_concurrency": args.max_concurrency,
        "commit_timeout": int(parse_duration(args.commit_timeout, "--commit-timeout")),
        "expires": parse_duration(args.expires, "--expires")}
    if args.url:
        body["url_base"] = args.url
    r = api.call("POST", "/v1/agent/rollouts", body)
    if args.json:
        print(json.dumps({"id": r["id"]}))
    else:
        print(f"rollout {r['id']}: {r['version']} to {len(r['parts'])} device(s); follow "
              f"it with: dpanel agent update status {r['id']}")
    return 0


def cmd_agent_import(args: argparse.Namespace) -> int:
    """On the manager host: check a bundle against STATE_DIR/update_key and store it."""
    from .client import find_config
    from .updates import BundleStore

    cfg = find_config(getattr(args, "config", None))
    m = BundleStore(Path(cfg.state_dir)).add(Path(args.bundle))
    print(f"imported {m.version} for {m.arch} ({m.size} bytes, sha256 {m.sha256[:16]}...)")
    return 0


def cmd_agent_bundles(args: argparse.Namespace) -> int:
    bundles = client_for(args).call("GET", "/v1/agent/bundles")
    if args.json:
        print(json.dumps(bundles, indent=2, sort_keys=True))
        return 0
    for b in bundles:
        print(f"{b['version']:<16} {b['arch']:<6} {b['size']:>10}  {b['sha256']}")
    return 0


def add_agent_parser(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    agent = sub.add_parser("agent", help="agent updates: import bundles, roll versions out"
                           ).add_subparsers(dest="sub", required=True)
    a = add(agent, "update", cmd_agent_update, "roll a version out: dpanel agent update "
            "--filter K=V|--all|DEVICE... --version X; or: update status [ID] | list")
    a.add_argument("devices", nargs="*", metavar="DEVICE")
    a.add_argument("--version", help="the agent version to install (an imported bundle)")
    a.add_argument("--all", action="store_true")
    a.add_argument("--filter", action="append", default=[],
                   help="glob on the device id, or KEY=GLOB on its labels (repeatable)")
    a.add_argument("--canary", type=int, default=1,
                   help="devices updated first; the rest wait until they all updated")
    a.add_argument("--max-failures", type=int, default=0,
                   help="rollbacks/failures tolerated; one more halts the rollout")
    a.add_argument("--max-concurrency", type=int, default=20)
    a.add_argument("--commit-timeout", default="5m",
                   help="time a new agent has to come back online before it reverts")
    a.add_argument("--expires", default="7d", help="pending (offline) devices are skipped "
                   "after this")
    a.add_argument("--url", help="base URL devices fetch from (default: this API's URL)")
    a.add_argument("--json", action="store_true")
    a = add(agent, "import", cmd_agent_import, "store a signed bundle (manager host)")
    a.add_argument("bundle", help="a bundle directory from build-agent --update-key")
    a = add(agent, "bundles", cmd_agent_bundles, "list imported bundles")
    a.add_argument("--json", action="store_true")
