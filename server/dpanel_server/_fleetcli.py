"""``dpanel tunnel-server add|list|remove``, ``dpanel tunnel serve`` (a tunnel server elsewhere)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from dpanel_proto.util import atomic_write

from .client import client_for, when

__all__ = ["add_fleet_parser"]


def cmd_ts_add(args: argparse.Namespace) -> int:
    out = client_for(args).call("POST", "/v1/tunnel-servers", {"name": args.name})
    if args.secret_file:
        atomic_write(args.secret_file, out["secret"] + "\n", 0o600, make_parents=True)
        print(f"tunnel server {args.name} enrolled; its secret is in {args.secret_file}")
    else:
        print(out["secret"])
    return 0


def cmd_ts_list(args: argparse.Namespace) -> int:
    servers = client_for(args).call("GET", "/v1/tunnel-servers")
    if args.json:
        print(json.dumps(servers, indent=2))
        return 0
    print(f"{'NAME':<16} {'STATE':<6} {'PUBLIC':<24} {'LOAD':>11} {'LAST SEEN':<19} REASON")
    for s in servers:
        load = f"{s['load']}/{s['capacity']}"
        print(f"{s['name']:<16} {s['state']:<6} {s['public'] or '-':<24} {load:>11} "
              f"{when(s['last_seen']):<19} {s['reason']}")
    return 0


def cmd_ts_remove(args: argparse.Namespace) -> int:
    client_for(args).call("DELETE", f"/v1/tunnel-servers/{args.name}")
    print(f"tunnel server {args.name} removed")
    return 0


def cmd_tunnel_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .config import _hostport
    from .errors import DPanelError
    from .tsrv import RemoteOptions, run_remote_tunnel
    from .tunnel import TunnelSettings

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    try:
        host, port = _hostport(args.listen, "--listen", 2220)
        lo, _, hi = args.ports.partition("-")
        state = Path(args.state_dir)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        settings = TunnelSettings(
            host_key_path=state / "tunnel_host_key", listen_host=host, listen_port=port,
            port_min=int(lo), port_max=int(hi or lo), bind_host=args.bind_host,
            sticky_path=state / "tunnel-ports.json")
        secret = (Path(args.secret_file).read_text().strip() if args.secret_file
                  else os.environ.get("DPANEL_TUNNEL_SECRET", ""))
        if not secret:
            raise DPanelError("--secret-file: required (or $DPANEL_TUNNEL_SECRET): the "
                              "secret `dpanel tunnel-server add NAME` printed")
        manager_key = Path(args.manager_key).read_text().strip() if args.manager_key else None
        opts = RemoteOptions(manager_url=args.manager, name=args.name, secret=secret,
                             public=args.public or f"{host}:{port}",
                             manager_key=manager_key, manager_ca=args.manager_ca,
                             metrics_listen=args.metrics_listen or None)
        asyncio.run(run_remote_tunnel(settings, args.registry, opts))
    except (DPanelError, OSError, ValueError) as exc:
        print(f"dpanel tunnel serve: {exc}", file=sys.stderr)
        return 2
    return 0


def add_fleet_parser(sub: Any, tun: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    ts = sub.add_parser("tunnel-server", help="tunnel servers on other hosts: enrol, list, "
                        "remove").add_subparsers(dest="sub", required=True)
    a = add(ts, "add", cmd_ts_add, "enrol a tunnel server; prints its secret once")
    a.add_argument("name")
    a.add_argument("--secret-file", help="write the secret here (0600) instead of stdout")
    add(ts, "list", cmd_ts_list, "tunnel servers, their state and load").add_argument(
        "--json", action="store_true")
    add(ts, "remove", cmd_ts_remove, "forget a tunnel server").add_argument("name")
    a = add(tun, "serve", cmd_tunnel_serve, "run a tunnel server for a manager elsewhere")
    a.add_argument("--manager", required=True, help="the manager's API URL (heartbeats)")
    a.add_argument("--name", required=True, help="as enrolled: dpanel tunnel-server add NAME")
    a.add_argument("--secret-file", help="the secret `tunnel-server add` printed")
    a.add_argument("--registry", required=True,
                   help="registry URL (postgresql://... ; a SQLite path on the same host)")
    a.add_argument("--listen", default="0.0.0.0:2220", help="SSH listen HOST:PORT")
    a.add_argument("--public", help="HOST:PORT devices and the manager dial "
                   "(default: --listen)")
    a.add_argument("--bind-host", default="127.0.0.1",
                   help="loopback address device ports are bound on")
    a.add_argument("--ports", default="20000-29999", help="device port pool LO-HI")
    a.add_argument("--state-dir", required=True, help="host key and sticky port map")
    a.add_argument("--manager-key", help="pin the manager's public key (a .pub file); "
                   "default: the key the authenticated heartbeat answer names")
    a.add_argument("--manager-ca", help="CA (PEM) of the manager's HTTPS certificate "
                   "(the stack's STATE_DIR/ca.pem); default: the system's")
    a.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                   help="serve /metrics and /ready here (default: off)")
    a.add_argument("--log-level", default="info")
