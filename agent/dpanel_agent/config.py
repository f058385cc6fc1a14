"""Agent configuration: one TOML file, validated once at load, errors name file, line, field.

Example (``/etc/dpanel/agent.toml`` in images)::

    token_file = "/var/lib/dpanel-tunnel/token"
    import_token_from = ["/boot/firmware/dpanel-token.txt", "/boot/dpanel-token.txt"]
    state_dir = "/var/lib/dpanel-tunnel"
    log_level = "info"
    ssh_target = "builtin"        # or "sshd": forward to this device's own OpenSSH server
    sshd_port = 22
    allow_forward_hosts = ["127.0.0.1", "::1", "localhost"]
    request_clock_skew = 120
    profile = "default"           # or "metered" (LTE: ~1 MB/month idle), "lan"
    proxy = "http://user:pass@proxy:3128"   # else the token's, else $https_proxy
    record_failure = "refuse"     # or "allow": a shell whose recording fails goes on

The token itself never goes into this file (it is a secret, and config files get copied
around): it lives in ``token_file`` (mode 0600), or comes from the command line.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Mapping, Optional, Tuple, Union

from dpanel_proto.proxy import NO_PROXY_WORDS, parse_proxy
from dpanel_proto.token import DeviceToken
from dpanel_proto.wire import DecodeError

from .profiles import PROFILES

if sys.version_info >= (3, 11):
    import tomllib
else:  # Debian bullseye (Python 3.9), where the agent is frozen
    import tomli as tomllib

__all__ = [
    "DEFAULT_PINS_DIR",
    "DEFAULT_ROOT_STATE_DIR",
    "AgentConfig",
    "ConfigError",
    "LogLevel",
    "MqttProtocol",
    "SshTarget",
    "default_state_dir",
    "load_config",
    "parse_config",
]

LogLevel = Literal["debug", "info", "warning", "error"]
SshTarget = Literal["builtin", "sshd"]
MqttProtocol = Literal["3.1.1", "5"]

_LOG_LEVELS = ("debug", "info", "warning", "error")
_TARGETS = ("builtin", "sshd")
_PROTOCOLS = ("3.1.1", "5")

DEFAULT_ROOT_STATE_DIR = Path("/var/lib/dpanel-tunnel")
#: Where ``build-image --tunnel-host-key/--manager-key`` put the image's pins.
DEFAULT_PINS_DIR = Path("/etc/dpanel/pins")


class ConfigError(ValueError):
    """Invalid configuration; the message names the file, line and field when known."""


def default_state_dir() -> Path:
    """``/var/lib/dpanel-tunnel`` as root, else ``$XDG_STATE_HOME/dpanel-tunnel``."""
    if os.geteuid() == 0:
        return DEFAULT_ROOT_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dpanel-tunnel"


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs besides the token; ``token`` may be set in code (CLI,
    tests) and is never read from a file here."""

    state_dir: Path = field(default_factory=default_state_dir)
    #: Where the token is kept (0600). Default: ``<state_dir>/token``.
    token_file: Optional[Path] = None
    #: Files checked at start for a freshly provisioned token (e.g. on the FAT boot
    #: partition, which Windows/macOS can edit). A valid one is moved into token_file.
    import_token_from: Tuple[Path, ...] = ()
    log_level: LogLevel = "info"
    ssh_target: SshTarget = "builtin"
    sshd_port: int = 22
    sshd_host_key: Path = Path("/etc/ssh/ssh_host_ed25519_key.pub")
    #: direct-tcpip destinations the built-in SSH server allows (device-local services).
    allow_forward_hosts: Tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
    #: Seconds of clock difference tolerated when checking request expiry (a Pi has no
    #: RTC; its clock may lag until NTP syncs).
    request_clock_skew: int = 120
    #: Caps on what a request may ask for, whatever the manager says.
    ttl_max: int = 7 * 86400
    idle_timeout_max: int = 86400
    mqtt_keepalive: int = 60
    mqtt_protocol: MqttProtocol = "3.1.1"
    tunnel_keepalive: int = 30
    #: Reconnect backoff (MQTT and tunnel redial): starts near reconnect_min, doubles,
    #: jittered, capped at reconnect_max seconds.
    reconnect_min: float = 1.0
    reconnect_max: float = 120.0
    #: SSH channel window of the tunnel and built-in server (bulk throughput).
    ssh_window: int = 8 * 1024 * 1024
    #: Shell for exec/PTY sessions; default: the agent user's login shell.
    shell: Optional[str] = None
    #: HTTP CONNECT proxy (``http://user:pass@host:3128``; ``"none"``: always direct).
    #: Unset: the token's proxy, else ``https_proxy``/``HTTPS_PROXY``; ``no_proxy`` applies.
    proxy: Optional[str] = field(default=None, repr=False)
    #: Link profile (see profiles.py): keepalive, reconnect policy; the keys it sets are
    #: defaults that keys given in the file override.
    profile: str = "default"
    #: Pins baked into the image: a token whose tunnel_host_key / manager_key differs
    #: from ``tunnel_host_key.pub`` / ``manager_key.pub`` here is refused.
    pins_dir: Path = DEFAULT_PINS_DIR
    token: Optional[DeviceToken] = field(default=None, repr=False)
    #: When a PTY shell's recording cannot be written: "refuse" the shell (the default:
    #: fail closed) or "allow" it unrecorded (its audit record says so).
    record_failure: str = "refuse"
    #: Agent updates: the slots folder (``slots/{a,b}``, ``current`` symlink) and the
    #: update public key (OpenSSH line); unset: ``<pins_dir>/update_key.pub``.
    update_root: Path = Path("/opt/dpanel")
    update_key: Optional[str] = None
    #: Where this config came from, for messages.
    source: str = "<defaults>"

    def __post_init__(self) -> None:
        checks: Tuple[Tuple[bool, str, str], ...] = (
            (self.log_level in _LOG_LEVELS, "log_level", f"must be one of {_LOG_LEVELS}"),
            (self.ssh_target in _TARGETS, "ssh_target", f"must be one of {_TARGETS}"),
            (1 <= self.sshd_port <= 65535, "sshd_port", "must be 1-65535"),
            (self.record_failure in ("refuse", "allow"), "record_failure",
             "must be one of ('refuse', 'allow')"),
            (self.mqtt_protocol in _PROTOCOLS, "mqtt_protocol",
             f"must be one of {_PROTOCOLS}"),
            (0 <= self.request_clock_skew <= 86400, "request_clock_skew",
             "must be 0-86400 seconds"),
            (10 <= self.ttl_max <= 7 * 86400, "ttl_max", "must be 10-604800 seconds"),
            (5 <= self.idle_timeout_max <= 7 * 86400, "idle_timeout_max",
             "must be 5-604800 seconds"),
            (10 <= self.mqtt_keepalive <= 65535, "mqtt_keepalive", "must be 10-65535 seconds"),
            (1 <= self.tunnel_keepalive <= 3600, "tunnel_keepalive", "must be 1-3600 seconds"),
            (0.05 <= self.reconnect_min <= self.reconnect_max <= 3600,
             "reconnect_min/reconnect_max", "need 0.05 <= reconnect_min <= reconnect_max <= 3600"),
            (32768 <= self.ssh_window <= 64 * 1024 * 1024, "ssh_window",
             "must be 32768-67108864 bytes"),
        )
        for ok, name, message in checks:
            if not ok:
                raise ConfigError(f"{self.source}: {name}: {message} "
                                  f"(got {getattr(self, name.split('/')[0])!r})")
        for host in self.allow_forward_hosts:
            if not host or any(c.isspace() for c in host):
                raise ConfigError(f"{self.source}: allow_forward_hosts: {host!r} is not a host")
        if self.profile not in PROFILES:
            raise ConfigError(f"{self.source}: profile: must be one of {tuple(PROFILES)} "
                              f"(got {self.profile!r})")
        if self.proxy is not None and self.proxy.strip().lower() not in NO_PROXY_WORDS:
            try:
                parse_proxy(self.proxy, "proxy")
            except DecodeError as exc:
                raise ConfigError(f"{self.source}: {exc}") from None
        if self.shell is not None and not os.path.isabs(self.shell):
            raise ConfigError(f"{self.source}: shell: {self.shell!r} must be an absolute path")

    @property
    def token_path(self) -> Path:
        return self.token_file if self.token_file is not None else self.state_dir / "token"

    @property
    def host_key_path(self) -> Path:
        return self.state_dir / "ssh_host_ed25519_key"

    def with_overrides(self, **changes: Any) -> AgentConfig:
        """A copy with command-line overrides applied (validated again)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# --------------------------------------------------------------------------- TOML loading

def _path(v: object) -> Path:
    if not isinstance(v, str) or not v:
        raise TypeError("expected a non-empty path string")
    return Path(os.path.expanduser(v))


def _opt_path(v: object) -> Optional[Path]:
    return _path(v)


def _paths(v: object) -> Tuple[Path, ...]:
    if isinstance(v, str):
        return (_path(v),)
    if not isinstance(v, list):
        raise TypeError("expected a list of path strings")
    return tuple(_path(x) for x in v)


def _strs(v: object) -> Tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError("expected a list of strings")
    return tuple(v)


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("expected an integer")
    return v


def _num(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("expected a number")
    return float(v)


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _choice(*choices: str) -> Callable[[object], str]:
    def check(v: object) -> str:
        if v not in choices:
            raise TypeError(f"expected one of {', '.join(repr(c) for c in choices)}")
        return str(v)
    return check


#: TOML key -> converter; the key is also the AgentConfig field name.
_KEYS: Dict[str, Callable[[object], Any]] = {
    "state_dir": _path,
    "token_file": _opt_path,
    "import_token_from": _paths,
    "log_level": _choice(*_LOG_LEVELS),
    "ssh_target": _choice(*_TARGETS),
    "sshd_port": _int,
    "sshd_host_key": _path,
    "allow_forward_hosts": _strs,
    "request_clock_skew": _int,
    "ttl_max": _int,
    "idle_timeout_max": _int,
    "mqtt_keepalive": _int,
    "mqtt_protocol": _choice(*_PROTOCOLS),
    "tunnel_keepalive": _int,
    "reconnect_min": _num,
    "reconnect_max": _num,
    "ssh_window": _int,
    "shell": _str,
    "pins_dir": _path,
    "proxy": _str,
    "profile": _choice(*PROFILES),
    "record_failure": _choice("refuse", "allow"),
    "update_root": _path,
    "update_key": _str,
}
assert set(_KEYS) <= {f.name for f in fields(AgentConfig)}


def _line_of(text: str, key: str) -> Optional[int]:
    """Line number of ``key = ...`` in the file, for error messages (tomllib keeps no
    positions of values)."""
    k = re.escape(key)
    pattern = re.compile(rf"^\s*((\"{k}\"|{k})\s*=|\[+\s*(\"{k}\"|{k})\s*[\].])")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return n
    return None


def _where(path: Path, text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"{path}:{line}" if line else str(path)


def _close_match(key: str) -> str:
    import difflib

    guess = difflib.get_close_matches(key, list(_KEYS), n=1)
    return f" (did you mean {guess[0]!r}?)" if guess else ""


def parse_config(text: str, path: Union[str, Path] = "<config>") -> AgentConfig:
    """Validate TOML text; raises :class:`ConfigError` naming file, line and field."""
    p = Path(path)
    try:
        data: Mapping[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    values: Dict[str, Any] = {}
    for key, raw in data.items():
        if key == "token":
            raise ConfigError(f"{_where(p, text, key)}: token: do not put the token in the "
                              "config file; write it to token_file (mode 0600) instead")
        conv = _KEYS.get(key)
        if conv is None:
            kind = "section" if isinstance(raw, dict) else "key"
            raise ConfigError(f"{_where(p, text, key)}: unknown {kind} {key!r}"
                              f"{_close_match(key)}")
        try:
            values[key] = conv(raw)
        except TypeError as exc:
            raise ConfigError(f"{_where(p, text, key)}: {key}: {exc}, got {raw!r}") from None
    # the profile's settings are defaults: keys the file names win
    for key, value in PROFILES[values.get("profile", "default")].items():
        values.setdefault(key, value)
    try:
        return AgentConfig(source=str(p), **values)
    except ConfigError as exc:
        # Point at the offending line: the message starts with "<file>: <field>: ..."
        msg = str(exc)
        name = msg[len(str(p)) + 2:].split(":", 1)[0].split("/")[0]
        raise ConfigError(f"{_where(p, text, name)}{msg[len(str(p)):]}") from None


def load_config(path: Union[str, Path]) -> AgentConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    return parse_config(text, p)
