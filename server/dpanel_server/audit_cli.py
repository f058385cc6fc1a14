"""``dpanel audit``: list the audit trail, verify its hash chain, replay a recorded shell.

Standard library only (it is a client command). Everything shown is escaped with
:func:`dpanel_proto.wire.printable` once more here, so that no record, whoever wrote it,
can put a newline or an escape sequence into the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Optional
from urllib.parse import urlencode

from dpanel_proto.wire import printable

from .client import ApiClient

__all__ = ["add_audit_parser", "cmd_audit"]


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or not ts:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _cell(value: Any, width: Optional[int] = None) -> str:
    text = printable("" if value is None else str(value))
    if width is not None and len(text) > width:
        text = text[:width - 1] + "…"
    return text


def _exit_text(r: dict[str, Any]) -> str:
    if r.get("signal"):
        return f"sig {r['signal']}"
    if r.get("exit") is not None:
        return str(r["exit"])
    return _cell(r.get("result") or "-")


def _public(r: dict[str, Any]) -> dict[str, Any]:
    """A record as --json prints it: the spellings scripts rely on, and the rest."""
    out = dict(r)
    out.setdefault("exit", None)
    return out


def _list(api: ApiClient, args: argparse.Namespace) -> int:
    q = {k: v for k, v in (("device", args.device), ("user", args.user),
                           ("since", args.since), ("limit", args.limit)) if v}
    rows: list[dict[str, Any]] = api.call("GET", "/v1/audit" + (f"?{urlencode(q)}" if q
                                                                 else ""))
    if args.json:
        print(json.dumps([_public(r) for r in rows], indent=2, sort_keys=True))
        return 0
    print(f"{'ID':>6}  {'STARTED':20}  {'DEVICE':16}  {'USER':12}  {'KIND':12}  "
          f"{'EXIT':>8}  {'IN':>9}  {'OUT':>9}  COMMAND")
    for r in rows:
        line = (f"{r.get('id', ''):>6}  {_when(r.get('started')):20}  "
                f"{_cell(r.get('device'), 16):16}  {_cell(r.get('user'), 12):12}  "
                f"{_cell(r.get('kind'), 12):12}  {_exit_text(r):>8}  "
                f"{r.get('bytes_in') or 0:>9}  {r.get('bytes_out') or 0:>9}  "
                f"{_cell(r.get('command'), 200)}")
        extra = [x for x in (("rec" if r.get("recording") == "ok" else
                              f"rec {r['recording']}" if r.get("recording") else ""),
                             _cell(r.get("note"), 120)) if x]
        print(line + (f"  [{'; '.join(extra)}]" if extra else ""))
    return 0


def _verify(api: ApiClient) -> int:
    out = api.call("GET", "/v1/audit/verify")
    if out.get("ok"):
        print(f"audit chain ok: {out.get('rows')} rows, head {out.get('head')}")
        return 0
    print(f"dpanel: audit chain broken: {_cell(out.get('error'))}", file=sys.stderr)
    return 1


def _play(api: ApiClient, args: argparse.Namespace,
          write: Callable[[str], object] = sys.stdout.write) -> int:
    if not args.id.isdigit():
        print(f"dpanel: audit play: {args.id!r} is not an audit record id (the ID column "
              "of dpanel audit)", file=sys.stderr)
        return 2
    resp = api._send("GET", f"/v1/audit/{int(args.id)}/recording")
    data = resp.read()
    state = resp.getheader("X-Dpanel-Recording") or "unverified"
    if state != "verified":
        print(f"dpanel: warning: recording {int(args.id)} is {state} (it does not match, "
              "or there is no, SHA-256 in its chained audit record)", file=sys.stderr)
    lines = data.decode(errors="replace").splitlines()
    if not lines:
        print("dpanel: the recording is empty", file=sys.stderr)
        return 1
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = {}
    if header.get("version") != 2:
        print("dpanel: not an asciicast v2 recording", file=sys.stderr)
        return 1
    speed = args.speed if args.speed and args.speed > 0 else 1.0
    last = 0.0
    for raw in lines[1:]:
        try:
            t, kind, text = json.loads(raw)
        except (ValueError, TypeError):
            continue
        if kind != "o" or not isinstance(text, str):
            continue
        if not args.raw:
            # timing as recorded, each pause capped at 2 s (as asciinema's idle limit)
            time.sleep(min(max(0.0, float(t) - last), 2.0) / speed)
            last = float(t)
        write(text)
    sys.stdout.flush()
    return 0


def cmd_audit(args: argparse.Namespace, client: Callable[[argparse.Namespace], ApiClient]
              ) -> int:
    words = list(args.words)
    api = client(args)
    if not words:
        return _list(api, args)
    if words == ["verify"]:
        return _verify(api)
    if words[0] == "play" and len(words) == 2:
        args.id = words[1]
        return _play(api, args)
    print("dpanel: audit: expected nothing, 'verify' or 'play ID'", file=sys.stderr)
    return 2


def add_audit_parser(sub: Any, add: Callable[..., argparse.ArgumentParser],
                     client: Callable[[argparse.Namespace], ApiClient]) -> None:
    a = add(sub, "audit", lambda args: cmd_audit(args, client),
            "the audit trail: dpanel audit [--device D] [--user U] [--since 1h|ISO] "
            "[--json] | dpanel audit verify | dpanel audit play ID [--speed N] [--raw]")
    a.add_argument("words", nargs="*", metavar="verify | play ID")
    a.add_argument("--device")
    a.add_argument("--user")
    a.add_argument("--since", help="a duration (90s, 15m, 1h, 2d) or an ISO 8601 time")
    a.add_argument("--limit", type=int, help="the newest N records (default 1000)")
    a.add_argument("--json", action="store_true", help="a JSON list of records (user, "
                   "device, kind, command, exit, started, ended, ...)")
    a.add_argument("--speed", type=float, default=1.0, help="play: replay speed factor")
    a.add_argument("--raw", action="store_true", help="play: dump the output, no timing")
