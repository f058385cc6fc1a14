"""``dpanel stack up --dir DIR``: broker + tunnel + manager in the foreground, state in DIR.

What the stack binds and what device tokens name are two settings: ``--public-host``
(an address of this machine the tunnel and the broker also listen on, or 0.0.0.0) and
``--advertise`` (the name or address devices dial: a public name, a NAT address, qemu's
10.0.2.2). Flags given for an existing DIR are applied to its server.toml, and each
change is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from dpanel_proto.ports import API_PORT, STACK_BROKER_PORT, TUNNEL_PORT
from dpanel_proto.util import parse_hostport

from ._files import atomic_write, ensure_secret
from .broker import Listener, render_mosquitto_conf
from .config import ServerConfig, check_advertised, dump_config, load_config, stack_config
from .db import parse_url, redact
from .dynsec import find_plugin, merge_missing
from .errors import BrokerError, ConfigError
from .manager import sync_broker_files
from .pki import ensure_broker_tls
from .registry import Registry
from .service import run_services

__all__ = ["prepare_stack", "stack_up", "start_mosquitto"]

log = logging.getLogger("dpanel.stack")

LOOPBACK = "127.0.0.1"
#: How long a starting broker may take to accept connections before it counts as failed.
BROKER_START_TIMEOUT = 15.0
#: How many log lines of a broker that failed to start go into the error.
ERROR_LINES = 8
#: A broker that dies this soon after starting, this many times in a row, ends the stack.
QUICK_DEATH = 10.0
MAX_QUICK_DEATHS = 3


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _check_bindable(host: str) -> None:
    """--public-host must be an address of this machine; one that is not (a NAT address,
    qemu's 10.0.2.2) is what --advertise is for. Said before anything starts, instead of
    a tunnel that cannot bind and a broker in a restart loop."""
    if _wildcard(host):
        return
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--public-host {host}: cannot resolve it ({exc})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            raise ConfigError(
                f"--public-host {host}: not an address of this machine, so nothing can "
                f"listen on it; to only name it in device tokens, use --advertise {host}"
            ) from None


def _current(cfg: ServerConfig) -> dict[str, object]:
    """The stack settings a server.toml stands for (what the flags would have been)."""
    scheme, hp = cfg.broker.url.split("://", 1)
    _, broker_port = parse_hostport(hp, "broker.url", STACK_BROKER_PORT)
    tunnel_host, tunnel_port = parse_hostport(cfg.tunnel.listen, "tunnel.listen", TUNNEL_PORT)
    _, api_port = parse_hostport(cfg.manager.api_listen, "manager.api_listen", API_PORT)
    adv, _ = parse_hostport(cfg.broker.public_url.split("://", 1)[1], "broker.public_url",
                            broker_port)
    return {"broker_port": broker_port, "tunnel_port": tunnel_port, "api_port": api_port,
            "port_range": cfg.tunnel.port_range,
            "keepalive_interval": cfg.tunnel.keepalive_interval, "tls": scheme == "mqtts",
            "public_host": None if tunnel_host == LOOPBACK else tunnel_host, "advertise": adv,
            "https_listen": cfg.manager.https_listen,
            "edge_listen": cfg.edge.listen, "broker_auth": cfg.broker.auth}


def prepare_stack(state_dir: Path, *, broker_port: Optional[int] = None,
                  tunnel_port: Optional[int] = None, api_port: Optional[int] = None,
                  port_range: Optional[str] = None, public_host: Optional[str] = None,
                  advertise: Optional[str] = None,
                  keepalive_interval: Optional[float] = None,
                  tls: Optional[bool] = None,
                  https_listen: Optional[str] = None,
                  edge_listen: Optional[str] = None,
                  registry: Optional[str] = None,
                  broker_auth: Optional[str] = None) -> ServerConfig:
    """Create (first time) or load DIR/server.toml, so a restarted stack keeps its ports,
    keys and registry. Every argument that is not None is applied, to an existing DIR
    too (each change is printed); None keeps what DIR has, or the default."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    conf = state_dir / "server.toml"
    existing = conf.exists()
    cfg = load_config(conf) if existing else stack_config(state_dir)
    old = _current(cfg)
    given = {"broker_port": broker_port, "tunnel_port": tunnel_port, "api_port": api_port,
             "port_range": port_range, "keepalive_interval": keepalive_interval, "tls": tls,
             "public_host": public_host, "advertise": advertise,
             "https_listen": https_listen,
             # "" or "off": no edge any more (None keeps what DIR has)
             "edge_listen": edge_listen, "broker_auth": broker_auth}
    want = dict(old)
    want.update({k: v for k, v in given.items() if v is not None})
    if want["https_listen"] == "":
        want["https_listen"] = None  # --https-listen "": off again
    elif https_listen:
        try:
            parse_hostport(https_listen, "--https-listen", 443)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if not existing:
        want.update(broker_port=broker_port or STACK_BROKER_PORT,
                    tunnel_port=tunnel_port or TUNNEL_PORT, api_port=api_port or API_PORT,
                    broker_auth=broker_auth or default_broker_auth())
    bind = want["public_host"]
    assert bind is None or isinstance(bind, str)
    if bind in ("", LOOPBACK):
        bind = want["public_host"] = None
    if bind is not None:
        _check_bindable(bind)
    adv = advertise
    if adv is None:
        if public_host is not None and not _wildcard(public_host):
            adv = public_host  # listening there: devices dial it too, as before
        elif existing and not (bind and old["advertise"] == LOOPBACK):
            adv = str(old["advertise"])
        elif bind and _wildcard(bind):
            raise ConfigError(
                f"--public-host {bind} listens on every address, which no device can "
                "dial: say which name or address tokens should carry with --advertise HOST")
        else:
            adv = bind or LOOPBACK
    check_advertised(adv, "--advertise")
    want["advertise"] = adv
    _apply(cfg, want, state_dir)
    if registry is not None:
        parse_url(registry, "--registry")
    if registry is not None and registry != cfg.registry.url:
        if existing:
            print(f"dpanel stack: applying to {conf}: registry {redact(cfg.registry_url)} -> "
                  f"{redact(registry)} (devices are not copied over)", flush=True)
        cfg.registry.url = registry
        cfg.validate()
    text = dump_config(cfg)
    if existing:
        changed = [k for k in want if want[k] != old[k]]
        if changed:
            print(f"dpanel stack: applying to {conf}: "
                  + "; ".join(f"{k} {old[k]} -> {want[k]}" for k in changed)
                  + ("" if set(changed) <= {"keepalive_interval", "port_range", "api_port",
                                            "https_listen", "broker_auth"}
                     else " (tokens issued before carry the old addresses: re-issue them)"),
                  flush=True)
    if not existing or conf.read_text() != text:
        atomic_write(conf, text, 0o600)
    cfg = load_config(conf)
    if cfg.manager.https_listen is not None:
        _stack_https(cfg, state_dir)
    return cfg


def _stack_https(cfg: ServerConfig, state_dir: Path) -> None:
    """The HTTPS listener's CA and certificate (made now, not at the first request), and
    the CA at DIR/ca.pem (0644) for ``dpanel login --ca-file``."""
    from .https_listener import https_ca_path, https_files

    https_files(cfg)
    atomic_write(state_dir / "ca.pem", https_ca_path(cfg).read_bytes(), 0o644)


def default_broker_auth() -> str:
    """A new stack's broker.auth: dynsec where Debian's plugin is installed (O(1) per
    enrolment/revocation, no reload), else the password/ACL files."""
    try:
        find_plugin()
    except BrokerError:
        return "files"
    return "dynsec"


def _apply(cfg: ServerConfig, want: dict[str, object], state_dir: Path) -> None:
    broker_port, tunnel_port, api_port = (int(str(want[k])) for k in (
        "broker_port", "tunnel_port", "api_port"))
    bind = want["public_host"]
    adv = str(want["advertise"])
    scheme = "mqtts" if want["tls"] else "mqtt"
    cfg.tunnel.listen = _fmt(str(bind) if bind else LOOPBACK, tunnel_port)
    cfg.tunnel.public_address = _fmt(adv, tunnel_port)
    cfg.tunnel.port_range = str(want["port_range"])
    cfg.tunnel.keepalive_interval = float(str(want["keepalive_interval"]))
    cfg.broker.auth = str(want["broker_auth"])
    # The manager always dials the broker on loopback; devices dial the advertised name.
    cfg.broker.url = f"{scheme}://{_fmt(LOOPBACK, broker_port)}"
    cfg.broker.public_url = f"{scheme}://{_fmt(adv, broker_port)}"
    cfg.broker.listen = _fmt(str(bind), broker_port) if bind else None
    host, _ = parse_hostport(cfg.manager.api_listen, "manager.api_listen", API_PORT)
    cfg.manager.api_listen = _fmt(host, api_port)
    https = want.get("https_listen")
    cfg.manager.https_listen = str(https) if https else None
    cfg.broker.ca_file = None
    edge = str(want.get("edge_listen") or "")
    edge = "" if edge.lower() == "off" else edge
    want["edge_listen"] = edge or None
    edge_host = ""
    if edge:
        edge_host, edge_port = parse_hostport(edge, "--edge-listen", 443)
        cfg.edge.listen = _fmt(edge_host, edge_port)
        # an edge on one address of this machine is what devices dial, unless advertised
        edge_adv = edge_host if adv == LOOPBACK and edge_host and not _wildcard(
            edge_host) else adv
        cfg.edge.public_address = _fmt(edge_adv, edge_port)
    else:
        cfg.edge.listen = cfg.edge.public_address = None
        cfg.edge.cert_file = cfg.edge.key_file = None
    if want["tls"] or edge:
        # the edge's certificate comes from the broker's CA: the one devices pin
        tls_dir = state_dir.resolve() / "tls"
        names = [adv, "localhost", LOOPBACK, *([str(bind)] if bind and not _wildcard(
            str(bind)) else []), *([edge_host] if edge_host and not _wildcard(edge_host)
                                   else [])]
        for change in ensure_broker_tls(tls_dir, names):
            log.info("broker TLS: %s %s %s", change.what, change.path, change.reason)
        cfg.broker.ca_file = str(tls_dir / "ca.crt")
        if edge:
            cfg.edge.cert_file = str(tls_dir / "server.crt")
            cfg.edge.key_file = str(tls_dir / "server.key")
    cfg.validate()


# ---------------------------------------------------------------------------- broker


def _nofile() -> int:
    """The descriptor limit the broker gets (soft raised to hard, see _child_setup)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if hard == resource.RLIM_INFINITY else min(int(hard), 1 << 20)


def broker_listeners(cfg: ServerConfig) -> list[Listener]:
    """The stack's broker: the manager's loopback listener (devices use it too when the
    stack is all on loopback) and, with --public-host, one more for devices. Both are
    public: the flood limits apply. Never derived from public_url, which is only a name
    in tokens (editing it used to send the broker into a restart loop)."""
    tls_dir = Path(cfg.broker.ca_file).parent if cfg.broker.ca_file else None
    tls = tls_dir if cfg.broker.url.startswith("mqtts://") else None
    # Below the descriptor limit, so that a flood meets max_connections, not EMFILE.
    cap = max(64, _nofile() - 512)
    host, port = cfg.broker.host_port
    out = [Listener(port, host, tls_dir=tls, public=True, max_connections=cap)]
    if cfg.broker.listen:
        lhost, lport = parse_hostport(cfg.broker.listen, "broker.listen", port)
        out.append(Listener(lport, lhost or None, tls_dir=tls, public=True,
                            max_connections=cap))
    return out


def _child_setup() -> None:
    """The stack's broker must not outlive the stack, even when the stack is SIGKILLed;
    and it gets every descriptor the hard limit allows (a shell's soft 1024 would cap
    the devices at about a thousand)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tail(path: Path, offset: int) -> str:
    """The last lines the broker wrote since ``offset`` (its own words for a failure)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-ERROR_LINES:])


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on ``port`` (a connect test would also be
    answered by whoever else holds the port, the very case where Mosquitto cannot bind)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(
            f"/proc/{pid}/fd")}
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if (len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port
                    and cols[9] in inodes):
                return True
    return False


def start_mosquitto(cfg: ServerConfig) -> subprocess.Popen[bytes]:
    """Write the config, start Mosquitto and wait until it accepts connections. A broker
    that exits (or never listens) raises :class:`BrokerError` with its own last lines."""
    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if exe is None:
        raise ConfigError("mosquitto is not installed (apt-get install mosquitto)")
    mdir = Path(cfg.broker.passwd_path).parent
    # Credentials first, so the manager's first CONNECT is accepted.
    registry = Registry(cfg.registry_url)
    try:
        if cfg.broker.auth == "dynsec":
            dynsec = (find_plugin(), Path(cfg.broker.dynsec_path))
            repaired = merge_missing(dynsec[1], cfg.broker.username,
                                     ensure_secret(cfg.broker.password_file),
                                     registry.broker_entries(), registry.revoked_ids())
            if repaired:
                log.info("broker dynamic-security file: %s", ", ".join(repaired[:20]))
        else:
            dynsec = None
            sync_broker_files(cfg, registry, ensure_secret(cfg.broker.password_file), "none")
    finally:
        registry.close()
    conf = render_mosquitto_conf(passwd=Path(cfg.broker.passwd_path),
                                 acl=Path(cfg.broker.acl_path),
                                 pid_file=mdir / "mosquitto.pid",
                                 listeners=broker_listeners(cfg), dynsec=dynsec,
                                 # manager replicas: one client id each (see broker.py)
                                 clientid_is_username=not cfg.manager.replica)
    atomic_write(mdir / "mosquitto.conf", conf, 0o600)
    log_path = mdir / "mosquitto.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    # The child keeps its own descriptor; ours is closed at once (one per start leaked).
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([exe, "-c", str(mdir / "mosquitto.conf")], stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_child_setup)
    host, port = cfg.broker.host_port
    deadline = time.monotonic() + BROKER_START_TIMEOUT
    while not _listening(proc.pid, port):
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            if code is None:
                proc.kill()
                proc.wait()
            why = _tail(log_path, offset) or "(it printed nothing)"
            state = f"exited with {code}" if code is not None else (
                f"did not listen on {_fmt(host, port)} within {BROKER_START_TIMEOUT:.0f} s")
            raise BrokerError(f"mosquitto {state} ({mdir / 'mosquitto.conf'}):\n{why}")
        time.sleep(0.05)
    return proc


async def _supervise(cfg: ServerConfig, holder: list[subprocess.Popen[bytes]]) -> None:
    """Restart the broker if it dies, as systemd would on the appliance. One that cannot
    start again ends the stack (BrokerError, with the broker's words), instead of a
    restart loop that only shows up as warnings."""
    delay = 0.5
    quick = 0  # consecutive deaths soon after a start
    started = time.monotonic()
    while True:
        await asyncio.sleep(0.5)
        code = holder[0].poll()
        if code is None:
            if time.monotonic() - started > QUICK_DEATH:
                delay, quick = 0.5, 0
            continue
        # Killed by a signal (an operator, the OOM killer) is not a failure to run; an
        # error exit soon after each start is (a config the broker rejects at runtime).
        soon = time.monotonic() - started < QUICK_DEATH
        quick = quick + 1 if soon and code > 0 else 0
        mdir = Path(cfg.broker.passwd_path).parent
        if quick >= MAX_QUICK_DEATHS:
            raise BrokerError(f"mosquitto keeps exiting ({code}) right after it starts; "
                              f"its last words ({mdir / 'mosquitto.log'}):\n"
                              + (_tail(mdir / "mosquitto.log", 0) or "(none)"))
        log.warning("mosquitto exited with %s; restarting it in %.1f s", code, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10)
        holder[0] = await asyncio.to_thread(start_mosquitto, cfg)
        started = time.monotonic()


async def _stack_main(cfg: ServerConfig, holder: list[subprocess.Popen[bytes]],
                      tunnel_servers: int = 0) -> None:
    services = asyncio.create_task(run_services(cfg))
    supervisor = asyncio.create_task(_supervise(cfg, holder))
    tasks = [supervisor, services]
    if tunnel_servers:  # --tunnel-servers N (see .stackfleet)
        from .stackfleet import run_stack_fleet

        tasks.append(asyncio.create_task(run_stack_fleet(cfg, tunnel_servers)))
    try:
        done, _ = await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    for task in done:
        task.result()  # the broker's or the services' error, if any


def stack_up(cfg: ServerConfig, tunnel_servers: int = 0) -> int:
    holder = [start_mosquitto(cfg)]
    try:
        print(f"dpanel stack: broker {cfg.broker.url}, tunnel {cfg.tunnel.listen}, "
              f"API http://{cfg.manager.api_listen}"
              + (f" and https://{cfg.manager.https_listen} (CA {Path(cfg.state_dir) / 'ca.pem'})"
                 if cfg.manager.https_listen else "")
              + f"; devices dial {cfg.tunnel.public_address}"
              f" and {cfg.broker.public_url}"
              + (f", or TLS edge {cfg.edge.public_address} (listening on {cfg.edge.listen})"
                 if cfg.edge.listen else "") + "\n"
              f"  use it with: export DPANEL_CONFIG={cfg.source}", flush=True)
        asyncio.run(_stack_main(cfg, holder, tunnel_servers))
    finally:
        broker = holder[0]
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
    return 0
