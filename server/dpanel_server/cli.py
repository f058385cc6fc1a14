"""The ``dpanel`` command line: devices, exec, ssh/proxy, tunnels, and the server daemons.

Client commands talk to the manager's HTTP API with the stdlib only, so they start fast;
the daemons (``stack up``, ``manager run``, ``tunnel run``) import the heavy parts lazily.
Modules only some commands need are imported inside them: ``dpanel exec`` start-up time
is most of a warm exec.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dpanel_proto.ports import API_PORT, STACK_BROKER_PORT, TUNNEL_PORT

from . import __version__
from .client import ApiClient, ApiError, find_config
from .config import ServerConfig
from .errors import DPanelError

__all__ = ["main"]

#: ssh-config hosts are ``<device>.dpanel``; ``dpanel proxy`` accepts either spelling.
HOST_SUFFIX = ".dpanel"


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(find_config(args.config))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _device_name(name: str) -> str:
    return name[: -len(HOST_SUFFIX)] if name.endswith(HOST_SUFFIX) else name


# ---------------------------------------------------------------------------- device


def cmd_device_add(args: argparse.Namespace) -> int:
    labels = dict(kv.split("=", 1) for kv in args.label)
    out = _client(args).call("POST", "/v1/devices", {"name": args.name, "labels": labels})
    if args.print_token:
        print(out["token"])
    else:
        print(f"enrolled {args.name}. Its token (shown once; it is a secret):\n\n"
              f"{out['token']}\n\nOn the device: dpanel-tunnel --token-file FILE  "
              "(or: dpanel-tunnel TOKEN)")
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    devices = _client(args).call("GET", "/v1/devices")
    if args.json:
        _print_json(devices)
        return 0
    print(f"{'DEVICE':<24} {'STATE':<9} {'TUNNEL':<7} {'AGENT':<9} HOST KEY")
    for d in devices:
        state = "revoked" if d["revoked"] else "online" if d["online"] else "offline"
        key = "pinned" if d["host_key"] else "-"
        if not d["host_key_ok"]:
            key = "CHANGED (refused)"
        print(f"{d['id']:<24} {state:<9} {d['port'] or '-'!s:<7} {d['agent_version'] or '-':<9}"
              f" {key}")
    return 0


def cmd_device_show(args: argparse.Namespace) -> int:
    _print_json(_client(args).call("GET", f"/v1/devices/{args.name}"))
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    _client(args).call("DELETE", f"/v1/devices/{args.name}")
    print(f"revoked {args.name}: cut off from the broker and the tunnel")
    return 0


def cmd_device_reset_hostkey(args: argparse.Namespace) -> int:
    _client(args).call("POST", f"/v1/devices/{args.name}/reset-hostkey")
    print(f"{args.name}: host key unpinned; the next one it announces is pinned")
    return 0


# ---------------------------------------------------------------------------- exec


def _exec_one_stream(api: ApiClient, device: str, body: dict[str, Any]) -> int:
    out, err = sys.stdout.buffer, sys.stderr.buffer
    sinks = {"stdout": out, "stderr": err}
    for event in api.stream("POST", f"/v1/devices/{device}/exec", body):
        if "exit" in event:
            return int(event["exit"])
        if "error" in event:
            raise ApiError(event["error"], code=event.get("code", ""))
        for kind, sink in sinks.items():
            if kind in event:
                sink.write(base64.b64decode(event[kind]))
                sink.flush()
    raise ApiError(f"device {device}: stream ended without an exit status")


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


class _Progress:
    def __init__(self, total: int) -> None:
        import threading

        self.total, self.done, self.failed = total, 0, 0
        self._tty = sys.stderr.isatty()
        self._lock = threading.Lock()

    def step(self, ok: bool) -> None:
        with self._lock:
            self.done += 1
            self.failed += not ok
            width = 30
            fill = width * self.done // max(self.total, 1)
            line = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total}"
                    f"  failed {self.failed}")
            if self._tty:
                sys.stderr.write("\r" + line + ("\n" if self.done == self.total else ""))
            elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()


def _exec_fanout(api: ApiClient, devices: list[str], body: dict[str, Any],
                 parallel: int, as_json: bool) -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    body = dict(body, stream=False)
    progress = _Progress(len(devices))
    results: dict[str, dict[str, Any]] = {}

    def run(device: str) -> tuple[str, dict[str, Any]]:
        start = time.monotonic()
        try:
            r = api.call("POST", f"/v1/devices/{device}/exec", body)
        except DPanelError as exc:
            r = {"exit": None, "stdout": "", "stderr": "", "error": str(exc)}
        r["seconds"] = round(time.monotonic() - start, 3)
        return device, r

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for fut in as_completed([pool.submit(run, d) for d in devices]):
            device, r = fut.result()
            results[device] = r
            progress.step(r.get("exit") == 0)
    if as_json:
        _print_json(results)
    else:
        print(f"{'DEVICE':<24} {'EXIT':>4} {'SECONDS':>8}  OUTPUT")
        for device in sorted(results):
            r = results[device]
            text = r.get("error") or (r["stdout"] or r["stderr"]).strip()
            first = text.splitlines()[0] if text else ""
            code = "ERR" if r.get("exit") is None else str(r["exit"])
            print(f"{device:<24} {code:>4} {r['seconds']:>8.2f}  {first[:80]}")
        ok = sum(1 for r in results.values() if r.get("exit") == 0)
        print(f"\n{ok}/{len(results)} succeeded")
    return 0 if all(r.get("exit") == 0 for r in results.values()) else 1


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if not argv:
        raise ApiError("exec: no command given (dpanel exec DEVICE -- CMD ...)")
    body: dict[str, Any] = {"command": argv if len(argv) > 1 else argv[0]}
    if args.timeout:
        body["timeout"] = args.timeout
    if args.stdin:
        body["stdin"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    api = _client(args)
    if args.all or args.filter:
        if args.device:
            raise ApiError("exec: --all/--filter take no DEVICE (dpanel exec --all -- CMD)")
        devices = _select(api, args)
        if not devices:
            raise ApiError("exec: no device matches")
        return _exec_fanout(api, devices, body, args.parallel, args.json)
    if not args.device:
        raise ApiError("exec: name a DEVICE, or use --all / --filter")
    return _exec_one_stream(api, _device_name(args.device), body)


# ---------------------------------------------------------------------------- ssh


def _open_port(api: ApiClient, device: str) -> int:
    return int(api.call("POST", f"/v1/devices/{device}/tunnel", {})["port"])


def cmd_proxy(args: argparse.Namespace) -> int:
    """stdio <-> the device's tunnel port, for OpenSSH ProxyCommand."""
    import socket
    import threading

    device = _device_name(args.device)
    api = _client(args)
    sock = socket.create_connection(("127.0.0.1", _open_port(api, device)), timeout=10)
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


def _ssh_options(cfg: ServerConfig, config_arg: Optional[str]) -> list[tuple[str, str]]:
    import shutil

    me = shutil.which("dpanel") or f"{sys.executable} -m dpanel_server.cli"
    conf = f" --config {shlex.quote(config_arg or cfg.source)}"
    return [
        ("ProxyCommand", f"{me}{conf} proxy %n"),
        ("User", cfg.manager.ssh_user),
        ("IdentityFile", cfg.manager.ssh_key),
        ("IdentitiesOnly", "yes"),
        ("UserKnownHostsFile", str(cfg.known_hosts_path)),
        ("StrictHostKeyChecking", "yes"),
        ("ServerAliveInterval", "15"),
    ]


def cmd_ssh_config(args: argparse.Namespace) -> int:
    cfg = find_config(args.config)
    ApiClient(cfg).call("GET", "/v1/known_hosts")  # refreshes the known_hosts file
    print(f"# dPanel Edge devices: `ssh DEVICE{HOST_SUFFIX}`, scp, rsync and Ansible work.")
    print(f"# generated by dpanel {__version__}; host keys are pinned in "
          f"{cfg.known_hosts_path}")
    print(f"Host *{HOST_SUFFIX}")
    for k, v in _ssh_options(cfg, args.config):
        print(f"    {k} {v}")
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    cfg = find_config(args.config)
    ApiClient(cfg).call("GET", "/v1/known_hosts")
    opts = [f"-o{k}={v}" for k, v in _ssh_options(cfg, args.config)]
    argv = ["ssh", *opts, _device_name(args.device), *args.ssh_args]
    os.execvp("ssh", argv)
    return 255  # not reached


# ---------------------------------------------------------------------------- tunnel


def cmd_tunnel_open(args: argparse.Namespace) -> int:
    body = {"ttl": args.ttl} if args.ttl else {}
    out = _client(args).call("POST", f"/v1/devices/{args.device}/tunnel", body)
    print(f"{args.device}: tunnel open on 127.0.0.1:{out['port']}")
    return 0


def cmd_tunnel_close(args: argparse.Namespace) -> int:
    out = _client(args).call("DELETE", f"/v1/devices/{args.device}/tunnel")
    print(f"{args.device}: {'closed' if out['closed'] else 'was not open'}")
    return 0


def cmd_tunnel_list(args: argparse.Namespace) -> int:
    tunnels = _client(args).call("GET", "/v1/tunnels")
    if args.json:
        _print_json(tunnels)
    else:
        for device, port in sorted(tunnels.items()):
            print(f"{device:<24} 127.0.0.1:{port}")
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
                        tls=args.tls)
    return stack_up(cfg)


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


# ---------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpanel", description="dPanel Edge manager CLI")
    p.add_argument("--config", help="server.toml (default: $DPANEL_CONFIG or "
                   "/etc/dpanel/server.toml)")
    p.add_argument("--version", action="version", version=f"dpanel {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(parent: Any, name: str, fn: Callable[[argparse.Namespace], int],
            help: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        # `dpanel tunnel run --config F` and `dpanel --config F tunnel run` both work
        sp.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    dev = sub.add_parser("device", help="enrol, list, show, revoke devices"
                         ).add_subparsers(dest="sub", required=True)
    a = add(dev, "add", cmd_device_add, "enrol a device and print its token")
    a.add_argument("name")
    a.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    a.add_argument("--print-token", action="store_true", help="print only the token")
    a = add(dev, "list", cmd_device_list, "list devices with presence")
    a.add_argument("--json", action="store_true")
    for name, fn, text in (("show", cmd_device_show, "show one device"),
                           ("revoke", cmd_device_revoke, "cut a device off at once"),
                           ("reset-hostkey", cmd_device_reset_hostkey,
                            "accept the next host key a re-imaged device announces")):
        add(dev, name, fn, text).add_argument("name")

    a = add(sub, "exec", cmd_exec, "run a command on one device or many")
    a.add_argument("device", nargs="?")
    a.add_argument("command", nargs="*", help="the command (put it after --)")
    a.add_argument("--all", action="store_true", help="every enrolled device")
    a.add_argument("--filter", action="append", default=[],
                   help="glob on the device id, or KEY=GLOB on its labels (repeatable)")
    a.add_argument("-j", "--parallel", type=int, default=16, help="fan-out concurrency")
    a.add_argument("-i", "--stdin", action="store_true", help="send our stdin")
    a.add_argument("--timeout", type=float, help="seconds before the command is stopped")
    a.add_argument("--json", action="store_true", help="fan-out results as JSON")

    a = add(sub, "ssh", cmd_ssh, "interactive shell on a device (OpenSSH)")
    a.add_argument("device")
    a.add_argument("ssh_args", nargs="*", help="more ssh arguments (after --)")
    add(sub, "proxy", cmd_proxy, "stdio bridge for OpenSSH ProxyCommand").add_argument("device")
    add(sub, "ssh-config", cmd_ssh_config, "print a ~/.ssh/config block for all devices")

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

    mgr = sub.add_parser("manager", help="run the manager").add_subparsers(dest="sub",
                                                                           required=True)
    add(mgr, "run", cmd_manager_run, "run the manager + API (systemd service)").add_argument(
        "--log-level", default="info")

    st = sub.add_parser("stack", help="all services on loopback").add_subparsers(
        dest="sub", required=True)
    a = add(st, "up", cmd_stack_up, "run broker + tunnel + manager in the foreground")
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
    a.add_argument("--keepalive-interval", type=float,
                   help="tunnel SSH keepalive, default 15 s; dead devices free their port "
                   "after 3 misses")
    a.add_argument("--log-level", default="info")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the remote command, verbatim: options such as
    # -i must be ours when they come before it and the command's when after.
    tail: Optional[list[str]] = None
    if "--" in words:
        cut = words.index("--")
        words, tail = words[:cut], words[cut + 1:]
    args = _parser().parse_args(words)
    if tail is not None:
        if hasattr(args, "command"):
            args.command = [*args.command, *tail]
        elif hasattr(args, "ssh_args"):
            args.ssh_args = [*args.ssh_args, *tail]
        else:
            _parser().error("'--' is only for exec and ssh")
    try:
        return int(args.fn(args))
    except ApiError as exc:
        print(f"dpanel: {exc}", file=sys.stderr)
        return 255 if args.cmd in ("exec", "proxy", "ssh") else 1
    except DPanelError as exc:
        print(f"dpanel: {exc}", file=sys.stderr)
        return 2
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
