"""``dpanel stack up --dir DIR``: broker + tunnel + manager in the foreground, state in DIR."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import shutil
import signal
import subprocess
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from ._files import atomic_write, ensure_secret
from .broker import render_mosquitto_conf
from .config import ServerConfig, load_config, stack_config
from .errors import ConfigError
from .manager import sync_broker_files
from .pki import ensure_broker_tls
from .registry import Registry
from .service import run_services

__all__ = ["dump_config", "prepare_stack", "stack_up"]

log = logging.getLogger("dpanel.stack")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def dump_config(cfg: ServerConfig) -> str:
    """TOML text for ``cfg`` (flat tables of scalars: all our config needs)."""
    top: list[str] = []
    tables: list[str] = []
    for f in fields(cfg):
        if f.name == "source":
            continue
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            tables.append(f"\n[{f.name}]")
            tables += [f"{g.name} = {_toml_value(getattr(value, g.name))}"
                       for g in fields(value) if getattr(value, g.name) is not None]
        elif value is not None:
            top.append(f"{f.name} = {_toml_value(value)}")
    return "# dPanel stack configuration (generated; safe to edit)\n" + "\n".join(
        top + tables) + "\n"


def prepare_stack(state_dir: Path, *, broker_port: int = 18830, tunnel_port: int = 2220,
                  api_port: int = 8780, port_range: str = "20000-29999",
                  public_host: Optional[str] = None,
                  keepalive_interval: float = 15.0, tls: bool = False) -> ServerConfig:
    """Create (first time) or load DIR/server.toml, so a restarted stack keeps its ports,
    keys and registry."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    conf = state_dir / "server.toml"
    if conf.exists():
        return load_config(conf)
    cfg = stack_config(state_dir, broker_port=broker_port, tunnel_port=tunnel_port,
                       api_port=api_port, port_range=port_range)
    cfg.tunnel.keepalive_interval = keepalive_interval
    scheme = "mqtts" if tls else "mqtt"
    if public_host:
        # Devices dial this address; the manager itself still uses loopback.
        cfg.tunnel.listen = cfg.tunnel.public_address = f"{public_host}:{tunnel_port}"
    cfg.broker.url = f"{scheme}://127.0.0.1:{broker_port}"
    cfg.broker.public_url = f"{scheme}://{public_host or '127.0.0.1'}:{broker_port}"
    if tls:
        ca, _, _ = ensure_broker_tls(state_dir.resolve() / "tls",
                                     ["127.0.0.1", "localhost", *filter(None, [public_host])])
        cfg.broker.ca_file = str(ca)
    atomic_write(conf, dump_config(cfg), 0o600)
    return load_config(conf)


def start_mosquitto(cfg: ServerConfig) -> subprocess.Popen[bytes]:
    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if exe is None:
        raise ConfigError("mosquitto is not installed (apt-get install mosquitto)")
    mdir = Path(cfg.broker.passwd_path).parent
    # Credentials first, so the manager's first CONNECT is accepted.
    registry = Registry(cfg.registry_path)
    try:
        sync_broker_files(cfg, registry, ensure_secret(cfg.broker.password_file), "none")
    finally:
        registry.close()
    host, port = cfg.broker.host_port
    conf = render_mosquitto_conf(port=port, host=host, passwd=Path(cfg.broker.passwd_path),
                                 acl=Path(cfg.broker.acl_path), pid_file=mdir / "mosquitto.pid")
    tls = ""
    if cfg.broker.url.startswith("mqtts://"):
        d = Path(cfg.broker.ca_file or "").parent
        tls = (f"cafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\n"
               f"keyfile {d / 'server.key'}\ntls_version tlsv1.2\n")
        conf += tls
    public = cfg.broker.public_url.split("://", 1)[1].rsplit(":", 1)[0]
    if public not in (host, "localhost"):
        conf += f"listener {port} {public}\nuse_username_as_clientid true\n{tls}"
    atomic_write(mdir / "mosquitto.conf", conf, 0o600)
    log_file = (mdir / "mosquitto.log").open("ab")
    return subprocess.Popen([exe, "-c", str(mdir / "mosquitto.conf")], stdout=log_file,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """The stack's broker must not outlive the stack, even when the stack is SIGKILLed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def _supervise(cfg: ServerConfig, holder: list[subprocess.Popen[bytes]]) -> None:
    """Restart the broker if it dies, as systemd would on the appliance."""
    delay = 0.5
    while True:
        await asyncio.sleep(0.5)
        code = holder[0].poll()
        if code is None:
            delay = 0.5
            continue
        log.warning("mosquitto exited with %s; restarting it in %.1f s", code, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10)
        holder[0] = start_mosquitto(cfg)


async def _stack_main(cfg: ServerConfig, holder: list[subprocess.Popen[bytes]]) -> None:
    supervisor = asyncio.create_task(_supervise(cfg, holder))
    try:
        await run_services(cfg)
    finally:
        supervisor.cancel()


def stack_up(cfg: ServerConfig) -> int:
    holder = [start_mosquitto(cfg)]
    try:
        print(f"dpanel stack: broker {cfg.broker.url}, tunnel {cfg.tunnel.listen}, "
              f"API http://{cfg.manager.api_listen}\n"
              f"  use it with: export DPANEL_CONFIG={cfg.source}", flush=True)
        asyncio.run(_stack_main(cfg, holder))
    finally:
        broker = holder[0]
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
    return 0
