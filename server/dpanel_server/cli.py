"""The ``dpanel`` command line: devices, exec, ssh/proxy, tunnels, and the server daemons.

Client commands talk to the manager's HTTP API with the stdlib only, so they start fast;
the daemons (``stack up``, ``manager run``, ``tunnel run``) import the heavy parts lazily.
Modules only some commands need are imported inside them: ``dpanel exec`` start-up time
is most of a warm exec.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dpanel_proto.codes import ErrorCode
from dpanel_proto.ports import API_PORT, STACK_BROKER_PORT, TUNNEL_PORT
from dpanel_proto.util import atomic_write

from . import __version__
from .client import ApiClient, ApiError, client_for, find_config, when
from .config import ServerConfig
from .errors import DPanelError

__all__ = ["main"]

#: ssh-config hosts are ``<device>.dpanel``; ``dpanel proxy`` accepts either spelling.
HOST_SUFFIX = ".dpanel"


#: server.toml, or a ``dpanel login`` context (see client.make_client)
_client = client_for


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


class UsageError(DPanelError):
    """A wrong flag or argument: one line, exit 2 (255 for exec/ssh/proxy, as ssh)."""

    code = ErrorCode.INVALID


def _device_name(name: str) -> str:
    """A device id from NAME or NAME.dpanel, checked before it goes into a URL path."""
    from urllib.parse import quote

    from dpanel_proto.wire import DecodeError, validate_device_id

    name = name[: -len(HOST_SUFFIX)] if name.endswith(HOST_SUFFIX) else name
    try:
        return quote(validate_device_id(name, "device"), safe="")
    except DecodeError as exc:
        raise UsageError(str(exc)) from None


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for kv in items:
        key, eq, value = kv.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--label {kv!r}: expected KEY=VALUE (e.g. --label site=acme)")
        labels[key] = value
    return labels


# ---------------------------------------------------------------------------- device


def cmd_device_add(args: argparse.Namespace) -> int:
    labels = _labels(args.label)
    body: dict[str, object] = {"name": args.name, "labels": labels}
    if args.proxy:
        body["proxy"] = args.proxy
    out = _client(args).call("POST", "/v1/devices", body)
    if args.print_token:
        print(out["token"])
    else:
        print(f"enrolled {args.name}. Its token (shown once; it is a secret):\n\n"
              f"{out['token']}\n\nOn the device: dpanel-tunnel --token-file FILE  "
              "(or: dpanel-tunnel TOKEN)")
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    if args.deleted:
        gone = _client(args).call("GET", "/v1/deleted-devices")
        if args.json:
            _print_json(gone)
            return 0
        print(f"{'DEVICE':<24} {'CREATED':<20} {'REVOKED':<20} DELETED")
        for d in gone:
            print(f"{d['id']:<24} {_when(d['created_at']):<20} {_when(d['revoked_at']):<20} "
                  f"{_when(d['deleted_at'])}")
        return 0
    devices = _client(args).call("GET", "/v1/devices")
    if args.names:  # for shell completion: one name a line, nothing else
        print("\n".join(d["id"] for d in devices if not d["revoked"]))
        return 0
    if args.json:
        _print_json(devices)
        return 0
    print(f"{'DEVICE':<24} {'STATE':<13} {'TUNNEL':<7} {'AGENT':<9} HOST KEY")
    for d in devices:
        state = d.get("state") or ("revoked" if d["revoked"] else
                                   "online" if d["online"] else "offline")
        key = "pinned" if d["host_key"] else "-"
        if not d["host_key_ok"]:
            key = "CHANGED (refused)"
        print(f"{d['id']:<24} {state:<13} {d['port'] or '-'!s:<7} {d['agent_version'] or '-':<9}"
              f" {key}")
    return 0


_when = when


def cmd_device_show(args: argparse.Namespace) -> int:
    _print_json(_client(args).call("GET", f"/v1/devices/{_device_name(args.name)}"))
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    _client(args).call("DELETE", f"/v1/devices/{_device_name(args.name)}")
    print(f"revoked {args.name}: cut off from the broker and the tunnel")
    return 0


def cmd_device_delete(args: argparse.Namespace) -> int:
    force = "&force=true" if args.force else ""
    _client(args).call("DELETE", f"/v1/devices/{_device_name(args.name)}?purge=true{force}")
    print(f"deleted {args.name}{' (revoked first)' if args.force else ''}: the name is free; "
          "its record is kept (dpanel device list --deleted)")
    return 0


def cmd_device_reset_hostkey(args: argparse.Namespace) -> int:
    _client(args).call("POST", f"/v1/devices/{_device_name(args.name)}/reset-hostkey")
    print(f"{args.name}: host key unpinned; the next one it announces is pinned")
    return 0


# ---------------------------------------------------------------------------- exec

def _select(api: ApiClient, args: argparse.Namespace) -> list[str]:
    import fnmatch

    devices = [d for d in api.call("GET", "/v1/devices") if not d["revoked"]]
    if args.all:
        return [d["id"] for d in devices]
    chosen = []
    for d in devices:
        for expr in args.filter:
            key, eq, value = expr.partition("=")
            if (eq and fnmatch.fnmatch(d["labels"].get(key, ""), value)) or (
                    not eq and fnmatch.fnmatch(d["id"], expr)):
                chosen.append(d["id"])
                break
    return chosen


def cmd_exec(args: argparse.Namespace) -> int:
    from . import _exec

    argv = list(args.command)
    if not argv:
        raise UsageError("exec: no command given (dpanel exec DEVICE -- CMD ...)")
    if args.parallel < 1:
        raise UsageError(f"exec: -j/--parallel must be at least 1, not {args.parallel}")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"exec: --timeout must be more than 0 seconds, not {args.timeout:g}")
    if args.max_output < 0:
        raise UsageError("exec: --max-output cannot be negative")
    body: dict[str, Any] = {"command": argv if len(argv) > 1 else argv[0]}
    if args.timeout:
        body["timeout"] = args.timeout
    limit = int(args.max_output * (1 << 20))
    fan_out = args.all or args.filter
    if fan_out:
        if args.device:
            raise UsageError("exec: --all/--filter take no DEVICE (dpanel exec --all -- CMD)")
        if args.stdin:
            raise UsageError("exec: -i/--stdin is for one device; a fan-out gets no stdin")
    elif not args.device:
        raise UsageError("exec: name a DEVICE, or use --all / --filter")
    elif args.prefix or args.out_dir or args.fail_fast:
        raise UsageError("exec: --prefix, --out-dir and --fail-fast are for --all/--filter")
    api = _client(args)
    if fan_out:
        devices = _select(api, args)
        if not devices:
            what = "--all" if args.all else " ".join(f"--filter {f}" for f in args.filter)
            raise ApiError(f"exec: no enrolled, unrevoked device matches {what}")
        return _exec.exec_fanout(api, devices, body, parallel=args.parallel,
                                 as_json=args.json, prefix=args.prefix,
                                 out_dir=Path(args.out_dir) if args.out_dir else None,
                                 fail_fast=args.fail_fast, limit=limit)
    # without -i the remote stdin is at EOF at once (as ssh -n); with -i ours streams
    stdin = sys.stdin.buffer if args.stdin else None
    return _exec.exec_one(api, _device_name(args.device), body, stdin, args.json, limit)

# ---------------------------------------------------------------------------- ssh


def _open_port(api: ApiClient, device: str) -> int:
    return int(api.call("POST", f"/v1/devices/{device}/tunnel", {})["port"])


def cmd_proxy(args: argparse.Namespace) -> int:
    """stdio <-> the device's tunnel port, for OpenSSH ProxyCommand."""
    import socket
    import threading

    from .opssh import refresh_if_cached
    from .wsproxy import is_local, ws_proxy

    device = _device_name(args.device)
    api = _client(args)
    refresh_if_cached(api, args.ttl)  # renews a certificate that ssh-config set up
    # the WebSocket through the API port from a login context, when the manager is
    # elsewhere (or asked for); straight to the tunnel port on the manager host, faster
    via = os.environ.get("DPANEL_PROXY", "auto")
    if via == "websocket" or (via == "auto" and (api.remote or not is_local(api))):
        return ws_proxy(api, device)
    opened = api.call("POST", f"/v1/devices/{device}/tunnel", {})
    if opened.get("tunnel_server"):
        return ws_proxy(api, device)  # on another host's loopback: only the API reaches it
    sock = socket.create_connection(("127.0.0.1", int(opened["port"])), timeout=10)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def upstream() -> None:
        fd = sys.stdin.fileno()
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                sock.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    threading.Thread(target=upstream, daemon=True).start()
    out = sys.stdout.fileno()
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
    return 0


def _identity(api: ApiClient, cfg: ServerConfig,
              ttl: Optional[int]) -> list[tuple[str, str]]:
    """The operator's own key and a fresh certificate for it (POST /v1/certs); on the
    manager host, when the manager key is readable, that key after it, for agents that
    predate certificates."""
    from .opssh import ensure_cert, operator_key

    key = operator_key()
    out = [("IdentityFile", str(key.key)), ("CertificateFile", str(ensure_cert(api, key, ttl)))]
    if os.access(cfg.manager.ssh_key, os.R_OK):
        out.append(("IdentityFile", cfg.manager.ssh_key))
    return out


def _ssh_options(cfg: ServerConfig, config_arg: Optional[str],
                 identity: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return _ssh_block(f"--config {shlex.quote(config_arg or cfg.source)}", cfg.manager.ssh_user,
                      identity, str(cfg.known_hosts_path))


def _ssh_block(select: str, user: str, identity: list[tuple[str, str]],
               known_hosts: str) -> list[tuple[str, str]]:
    import shutil

    me = shutil.which("dpanel") or f"{sys.executable} -m dpanel_server.cli"
    return [
        ("ProxyCommand", f"{me} {select} proxy %n"),
        ("User", user),
        *identity,
        ("IdentitiesOnly", "yes"),
        ("UserKnownHostsFile", known_hosts),
        ("StrictHostKeyChecking", "yes"),
        ("ServerAliveInterval", "15"),
    ]


def _ssh_setup(args: argparse.Namespace) -> tuple[ApiClient, list[tuple[str, str]], str]:
    """(client, ssh options, where host keys are pinned) for ``ssh`` and ``ssh-config``:
    on the manager host from server.toml, on a laptop from the ``dpanel login`` context
    (the pinned host keys then come from the API into a file of that context's own, and
    the ProxyCommand is this same context's WebSocket proxy)."""
    from .opssh import ensure_cert, operator_key

    api = _client(args)
    if not api.remote:
        cfg = find_config(args.config)
        api = ApiClient(cfg)
        api.call("GET", "/v1/known_hosts")  # refreshes the known_hosts file
        return api, _ssh_options(cfg, args.config, _identity(api, cfg, args.ttl)), str(
            cfg.known_hosts_path)
    assert api.context is not None
    from .login import config_path

    name = api.context.name
    known = config_path().parent / f"known_hosts-{name}"
    text = str(api.call("GET", "/v1/known_hosts")["known_hosts"])
    atomic_write(known, text, 0o600, make_parents=True)
    key = operator_key()
    identity = [("IdentityFile", str(key.key)),
                ("CertificateFile", str(ensure_cert(api, key, args.ttl)))]
    user = os.environ.get("DPANEL_SSH_USER") or "root"
    return api, _ssh_block(f"--context {shlex.quote(name)}", user, identity, str(known)), str(
        known)


#: device names per ``Host`` line in the ssh-config block (keeps lines short)
_NAMES_PER_HOST = 32


def cmd_ssh_config(args: argparse.Namespace) -> int:
    """``Host *.dpanel`` plus every enrolled device's bare name.

    Bare names are listed rather than matched with ``Match exec "dpanel proxy --check
    %h"``: that would start a dpanel process and an API call for *every* ssh to *any*
    host (and fail them all while the manager is down). The list costs nothing at
    connect time; its price is re-running this after enrolling devices.
    """
    api, options, known = _ssh_setup(args)
    names = [d["id"] for d in api.call("GET", "/v1/devices") if not d["revoked"]]
    print(f"# dPanel Edge devices: `ssh DEVICE` or `ssh DEVICE{HOST_SUFFIX}`; scp, rsync and "
          "Ansible work.")
    print(f"# generated by dpanel {__version__} for the {len(names)} devices enrolled now; "
          "run `dpanel ssh-config` again after enrolling more (*.dpanel always works).")
    print(f"# host keys are pinned in {known}")
    groups = [names[i:i + _NAMES_PER_HOST] for i in range(0, len(names), _NAMES_PER_HOST)]
    for i, group in enumerate(groups or [[]]):
        print(" ".join(["Host", *([f"*{HOST_SUFFIX}"] if i == 0 else []), *group]))
        for k, v in options:
            print(f"    {k} {v}")
    return 0


#: OpenSSH client options that take a value (from ssh's getopt string), so that
#: ``dpanel ssh [SSH-OPTIONS] DEVICE [COMMAND...]`` finds DEVICE as ssh itself would.
_SSH_VALUE_OPTS = set("bceilmopBDEFIJLOPQRSwW")


def _split_ssh(rest: list[str]) -> tuple[list[str], list[str], Optional[str], list[str]]:
    """(our options, ssh options, DEVICE, remote command) from what follows ``ssh``."""
    ours: list[str] = []
    opts: list[str] = []
    i = 0
    while i < len(rest):
        w = rest[i]
        if w in ("--config", "--context", "--ttl") and i + 1 < len(rest):
            ours += rest[i:i + 2]
            i += 2
            continue
        if w.startswith(("--config=", "--context=", "--ttl=")) or w in ("-h", "--help"):
            ours.append(w)
            i += 1
            continue
        if not w.startswith("-") or w == "-":
            return ours, opts, w, rest[i + 1:]
        opts.append(w)
        # -vL8080:h:80 -> the value is the rest of the word; -L 8080:h:80 -> the next word
        for j, ch in enumerate(w[1:], 1):
            if ch in _SSH_VALUE_OPTS:
                if j == len(w) - 1 and i + 1 < len(rest):
                    i += 1
                    opts.append(rest[i])
                break
        i += 1
    return ours, opts, None, []


def cmd_ssh(args: argparse.Namespace) -> int:
    _api, options, _known = _ssh_setup(args)
    opts = [f"-o{k}={v}" for k, v in options]
    argv = ["ssh", *opts, *args.ssh_opts, "--", _device_name(args.device), *args.ssh_args]
    os.execvp("ssh", argv)
    return 255  # not reached


# ---------------------------------------------------------------------------- tunnel


def cmd_tunnel_open(args: argparse.Namespace) -> int:
    body = {"ttl": args.ttl} if args.ttl else {}
    out = _client(args).call("POST", f"/v1/devices/{_device_name(args.device)}/tunnel", body)
    where = (f" of tunnel server {out['tunnel_server']}" if out.get("tunnel_server")
             else "")
    print(f"{args.device}: tunnel open on {out.get('host', '127.0.0.1')}:{out['port']}{where}")
    return 0


def cmd_tunnel_close(args: argparse.Namespace) -> int:
    out = _client(args).call("DELETE", f"/v1/devices/{_device_name(args.device)}/tunnel")
    print(f"{args.device}: {'closed' if out['closed'] else 'was not open'}")
    return 0


def cmd_tunnel_list(args: argparse.Namespace) -> int:
    api = _client(args)
    tunnels = api.call("GET", "/v1/tunnels")
    if args.json:
        _print_json(tunnels)
    else:
        # tunnels on tunnel servers elsewhere: that server's loopback, and its name
        where = {d: (s["bind_host"], f"  ({s['name']})")
                 for s in api.call("GET", "/v1/tunnel-servers") for d in s["devices"]}
        for device, port in sorted(tunnels.items()):
            host, name = where.get(device, ("127.0.0.1", ""))
            print(f"{device:<24} {host}:{port}{name}")
    return 0


# ---------------------------------------------------------------------------- daemons


def _logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # asyncssh logs every channel at INFO; our own modules say what matters
    logging.getLogger("asyncssh").setLevel(max(logging.WARNING, logging.root.level))


def cmd_stack_up(args: argparse.Namespace) -> int:
    from .stack import prepare_stack, stack_up

    _logging(args.log_level)
    cfg = prepare_stack(Path(args.dir), broker_port=args.broker_port,
                        tunnel_port=args.tunnel_port, api_port=args.api_port,
                        port_range=args.port_range, public_host=args.public_host,
                        advertise=args.advertise, keepalive_interval=args.keepalive_interval,
                        tls=args.tls, registry=args.registry,
                        https_listen=args.https_listen, edge_listen=args.edge_listen,
                        broker_auth=args.broker_auth)
    return stack_up(cfg, tunnel_servers=args.tunnel_servers)


def cmd_manager_run(args: argparse.Namespace) -> int:
    import asyncio

    from .service import run_manager

    _logging(args.log_level)
    asyncio.run(run_manager(find_config(args.config)))
    return 0


def cmd_tunnel_run(args: argparse.Namespace) -> int:
    import asyncio

    from .service import run_tunnel

    _logging(args.log_level)
    asyncio.run(run_tunnel(find_config(args.config)))
    return 0


def cmd_edge_run(args: argparse.Namespace) -> int:
    import asyncio

    from .edge_service import run_edge

    _logging(args.log_level)
    asyncio.run(run_edge(find_config(args.config)))
    return 0


# ---------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpanel", description="dPanel Edge manager CLI")
    p.add_argument("--config", help="server.toml (default: $DPANEL_CONFIG or "
                   "/etc/dpanel/server.toml)")
    p.add_argument("--context", help="a `dpanel login` context (default: $DPANEL_CONTEXT, "
                   "else the current one; without any login, server.toml)")
    p.add_argument("--version", action="version", version=f"dpanel {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(parent: Any, name: str, fn: Callable[[argparse.Namespace], int],
            help: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        # `dpanel tunnel run --config F` and `dpanel --config F tunnel run` both work
        sp.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("--context", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    dev = sub.add_parser("device", help="enrol, list, show, revoke devices"
                         ).add_subparsers(dest="sub", required=True)
    a = add(dev, "add", cmd_device_add, "enrol a device and print its token")
    a.add_argument("name")
    a.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    a.add_argument("--print-token", action="store_true", help="print only the token")
    a.add_argument("--proxy", metavar="URL", help="HTTP CONNECT proxy the device must use "
                   "(http://[user:pass@]host:port; carried in the token)")
    a = add(dev, "list", cmd_device_list, "list devices with presence")
    a.add_argument("--json", action="store_true")
    a.add_argument("--deleted", action="store_true", help="list deleted devices instead")
    a.add_argument("--names", action="store_true", help="only the names of enrolled, "
                   "unrevoked devices, one a line (shell completion uses it)")
    a = add(dev, "delete", cmd_device_delete, "free a revoked device's name (its record "
            "is kept)")
    a.add_argument("name")
    a.add_argument("--force", action="store_true", help="revoke it first if need be")
    for name, fn, text in (("show", cmd_device_show, "show one device"),
                           ("revoke", cmd_device_revoke, "cut a device off at once"),
                           ("reset-hostkey", cmd_device_reset_hostkey,
                            "accept the next host key a re-imaged device announces")):
        add(dev, name, fn, text).add_argument("name")

    a = add(sub, "exec", cmd_exec, "run a command on one device or many: dpanel exec "
            "[OPTIONS] DEVICE|--all|--filter F [--] COMMAND...")
    a.add_argument("device", nargs="?")
    a.add_argument("command", nargs="*", help="the command: everything after DEVICE (or "
                   "after --)")
    a.add_argument("--all", action="store_true", help="every enrolled device")
    a.add_argument("--filter", action="append", default=[],
                   help="glob on the device id, or KEY=GLOB on its labels (repeatable)")
    a.add_argument("-j", "--parallel", type=int, default=16, help="fan-out concurrency")
    a.add_argument("-i", "--stdin", action="store_true",
                   help="stream our stdin to the command (without -i it reads EOF at once)")
    a.add_argument("--timeout", type=float, help="seconds before the command is stopped")
    a.add_argument("--json", action="store_true", help="results as JSON (exit, output as "
                   "text and base64, truncated, seconds, error and code)")
    a.add_argument("-p", "--prefix", action="store_true",
                   help="fan-out: stream every output line as 'DEVICE: line'")
    a.add_argument("--out-dir", metavar="DIR", help="fan-out: write DIR/DEVICE.stdout, "
                   ".stderr and .exit (each complete, renamed into place)")
    a.add_argument("--fail-fast", action="store_true",
                   help="fan-out: start no more devices after the first failure (the "
                   "running ones finish)")
    a.add_argument("--max-output", type=float, default=1.0, metavar="MB",
                   help="output kept per device and stream for the table and --json "
                   "(default 1 MB; --out-dir and --prefix get all of it)")

    a = add(sub, "ssh", cmd_ssh, "OpenSSH to a device: dpanel ssh [SSH-OPTIONS] DEVICE "
            "[COMMAND...]")
    a.add_argument("device")
    ttl_help = "lifetime of the operator's SSH certificate, seconds (default 3600)"
    a.add_argument("--ttl", type=int, help=ttl_help)
    a = add(sub, "proxy", cmd_proxy, "stdio bridge for OpenSSH ProxyCommand "
            "(a WebSocket to the API when the manager is remote; DPANEL_PROXY="
            "websocket|direct|auto)")
    a.add_argument("device")
    a.add_argument("--ttl", type=int, help=ttl_help)
    a = add(sub, "ssh-config", cmd_ssh_config, "print a ~/.ssh/config block: DEVICE.dpanel, "
            "and the bare names of the devices enrolled now")
    a.add_argument("--ttl", type=int, help=ttl_help)

    from ._jobcli import add_job_parser

    add_job_parser(sub, add)  # dpanel job ...
    from ._updcli import add_agent_parser

    add_agent_parser(sub, add)  # dpanel agent ...

    tun = sub.add_parser("tunnel", help="open/close/list tunnels, or run the tunnel server"
                         ).add_subparsers(dest="sub", required=True)
    a = add(tun, "open", cmd_tunnel_open, "open a device's tunnel")
    a.add_argument("device")
    a.add_argument("--ttl", type=int)
    add(tun, "close", cmd_tunnel_close, "close a device's tunnel").add_argument("device")
    add(tun, "list", cmd_tunnel_list, "list open tunnels").add_argument("--json",
                                                                        action="store_true")
    a = add(tun, "run", cmd_tunnel_run, "run the public tunnel server (systemd service)")
    a.add_argument("--log-level", default="info")
    from ._fleetcli import add_fleet_parser

    add_fleet_parser(sub, tun, add)  # dpanel tunnel-server ..., dpanel tunnel serve

    mgr = sub.add_parser("manager", help="run the manager").add_subparsers(dest="sub",
                                                                           required=True)
    add(mgr, "run", cmd_manager_run, "run the manager + API (systemd service)").add_argument(
        "--log-level", default="info")

    edg = sub.add_parser("edge", help="run the one-port TLS edge").add_subparsers(
        dest="sub", required=True)
    add(edg, "run", cmd_edge_run, "run the device edge alone (systemd service)").add_argument(
        "--log-level", default="info")

    st = sub.add_parser("stack", help="all services on loopback").add_subparsers(
        dest="sub", required=True)
    a = add(st, "up", cmd_stack_up, "run broker + tunnel + manager in the foreground")
    a.add_argument("--tunnel-servers", type=int, default=0, metavar="N",
                   help="also run N tunnel servers as on other hosts (`dpanel tunnel "
                   "serve`, each on its own loopback address); placement then uses them")
    # Defaults are None: for an existing --dir only the flags given change its server.toml.
    a.add_argument("--dir", required=True, help="state directory (created; reused, and "
                   "the flags given are applied to it)")
    a.add_argument("--broker-port", type=int, help=f"default {STACK_BROKER_PORT}")
    a.add_argument("--tunnel-port", type=int, help=f"default {TUNNEL_PORT}")
    a.add_argument("--api-port", type=int, help=f"default {API_PORT}")
    a.add_argument("--port-range", help="device ports (default 20000-29999)")
    a.add_argument("--public-host", metavar="ADDR", help="also listen for devices on this "
                   "address of this machine (0.0.0.0: all; then give --advertise)")
    a.add_argument("--advertise", metavar="HOST", help="the name or address device tokens "
                   "carry, if not where the stack listens (a public name, NAT, qemu's "
                   "10.0.2.2)")
    a.add_argument("--tls", action="store_true", default=None,
                   help="MQTT over TLS with a generated CA (pinned in device tokens)")
    a.add_argument("--broker-auth", choices=("files", "dynsec"),
                   help="how device credentials reach Mosquitto (default for a new DIR: "
                   "dynsec when the plugin is installed; see README 'Brokers')")
    a.add_argument("--https-listen", metavar="HOST:PORT", help="also serve the API over "
                   "HTTPS here, with a CA generated in DIR (its certificate: DIR/ca.pem), for "
                   "`dpanel login`; \"\": off again")
    a.add_argument("--edge-listen", metavar="HOST:PORT",
                   help="also serve devices MQTT and SSH on this one TLS port (ALPN "
                   "dpanel-mqtt/dpanel-ssh; e.g. 0.0.0.0:443 with --advertise); tokens "
                   "then name it; 'off' stops it")
    a.add_argument("--registry", metavar="URL", help="the registry database: "
                   "sqlite:///PATH (default: DIR/registry.db) or postgresql://...")
    a.add_argument("--keepalive-interval", type=float,
                   help="tunnel SSH keepalive, default 15 s; dead devices free their port "
                   "after 3 misses")
    a.add_argument("--log-level", default="info")

    from ._cli_ops import add_commands

    add_commands(sub, add)  # user, whoami, login, context, completion
    from .audit_cli import add_audit_parser

    add_audit_parser(sub, add, _client)
    return p


#: exec options that take a value, to find where the command starts without a "--"
_EXEC_VALUE_OPTS = {"--filter", "-j", "--parallel", "--timeout", "--out-dir",
                    "--max-output", "--config", "--context"}


def _subcommand_at(words: list[str]) -> int:
    """Index of the subcommand word (after top-level options such as --config F)."""
    i = 0
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] in ("--config", "--context") else 1
    return i


def _exec_command_start(rest: list[str]) -> Optional[int]:
    """Where the remote command starts in what follows ``exec`` when there is no "--":
    the first word after DEVICE (the first word at all with --all/--filter), as ssh."""
    positionals = 0
    fan_out = False
    i = 0
    while i < len(rest):
        w = rest[i]
        if w.startswith("-") and w != "-":
            name = w.split("=", 1)[0]
            fan_out |= name in ("--all", "--filter")
            if name in _EXEC_VALUE_OPTS and "=" not in w:
                i += 1
            elif not w.startswith("--") and len(w) > 2:
                # clustered short options: -ij8 / -ij 8
                cluster = w[1:]
                if "j" in cluster and cluster.index("j") == len(cluster) - 1:
                    i += 1
            i += 1
            continue
        positionals += 1
        if positionals > (0 if fan_out else 1):
            return i
        i += 1
    return None


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same clean unwinding as Ctrl-C: the exec stream is
    closed, so the manager hangs the remote command up."""


def _on_sigterm(_sig: int, _frame: object) -> None:
    raise _Terminated


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the remote command, verbatim: options such as
    # -i must be ours when they come before it and the command's when after. Without
    # "--", the command starts after DEVICE, as with ssh.
    tail: Optional[list[str]] = None
    if "--" in words:
        cut = words.index("--")
        words, tail = words[:cut], words[cut + 1:]
    at = _subcommand_at(words)
    cmd = words[at] if at < len(words) else ""
    ssh_opts: list[str] = []
    if cmd == "ssh":
        ours, ssh_opts, device, remote = _split_ssh(words[at + 1:])
        words = [*words[:at + 1], *ours, *([device] if device is not None else [])]
        tail = [*remote, *(tail or [])]
    elif cmd == "exec" and tail is None:
        start = _exec_command_start(words[at + 1:])
        if start is not None:
            words, tail = words[:at + 1 + start], words[at + 1 + start:]
    args = _parser().parse_args(words)
    if cmd == "ssh":
        args.ssh_opts, args.ssh_args = ssh_opts, tail
    elif tail is not None:
        if hasattr(args, "command"):
            args.command = [*args.command, *tail]
        else:
            _parser().error("'--' is only for exec and ssh")
    if cmd == "exec":
        import signal

        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.fn(args))
    except UsageError as exc:
        print(f"dpanel: {exc}", file=sys.stderr)
        return 255 if args.cmd in ("exec", "proxy", "ssh") else 2
    except ApiError as exc:
        print(f"dpanel: {exc}", file=sys.stderr)
        return 255 if args.cmd in ("exec", "proxy", "ssh") else 1
    except DPanelError as exc:
        print(f"dpanel: {exc}", file=sys.stderr)
        return 2
    except _Terminated:
        return 143
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141
    except OSError as exc:  # e.g. a daemon's port is taken: say so, no traceback
        print(f"dpanel: {exc.strerror or exc}"
              f"{f' ({exc.filename})' if exc.filename else ''}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
