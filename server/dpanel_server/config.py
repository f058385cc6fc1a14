"""Server configuration: one TOML file, validated once at load with errors naming the field."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_args, get_type_hints

import tomli_w
import tomllib

from dpanel_proto.ports import API_PORT, BROKER_PORT, STACK_BROKER_PORT, TUNNEL_PORT
from dpanel_proto.util import parse_hostport
from dpanel_proto.wire import MAX_REQUEST_LIFETIME, DecodeError

from .db import parse_url
from .errors import ConfigError

__all__ = [
    "BrokerConfig",
    "EdgeConfig",
    "ManagerConfig",
    "RegistryConfig",
    "ServerConfig",
    "TunnelConfig",
    "check_advertised",
    "dump_config",
    "load_config",
    "stack_config",
]


#: The HTTPS listener's default port (manager.https_listen without one).
HTTPS_PORT = 443
#: the tunnel process's metrics/readiness listener (the manager's are on its API)
TUNNEL_METRICS_PORT = 9781


def check_advertised(host: str, what: str) -> None:
    """An address written into device tokens must be one a device can dial: the wildcard
    (0.0.0.0, ::) only means "every local address" to a listener."""
    try:
        wildcard = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:
        raise ConfigError(
            f"{what}: {host} is the wildcard address, which no device can dial; advertise "
            "the name or address devices reach this server at (e.g. dpanel stack up "
            "--advertise HOST, dpanel-configure --advertise HOST)")


@dataclass
class TunnelConfig:
    listen: str = f"0.0.0.0:{TUNNEL_PORT}"
    #: what device tokens name (never bound: a public name, a NAT address, qemu's 10.0.2.2)
    public_address: str = f"127.0.0.1:{TUNNEL_PORT}"
    host_key: str = "/etc/dpanel/keys/tunnel_host_key"
    port_range: str = "20000-29999"
    keepalive_interval: float = 15.0
    #: ``dpanel tunnel run`` only: where GET /metrics and /ready answer (HOST:PORT; ""
    #: = off). No token: aggregates only, so keep it on loopback or a private network.
    metrics_listen: str = f"127.0.0.1:{TUNNEL_METRICS_PORT}"

    @property
    def ports(self) -> tuple[int, int]:
        lo, _, hi = self.port_range.partition("-")
        return int(lo), int(hi)

    def validate(self) -> None:
        _hostport(self.listen, "tunnel.listen", TUNNEL_PORT)
        host, _ = _hostport(self.public_address, "tunnel.public_address", TUNNEL_PORT)
        check_advertised(host, "tunnel.public_address")
        try:
            lo, hi = self.ports
        except ValueError:
            raise ConfigError(f"tunnel.port_range: {self.port_range!r} is not LOW-HIGH") from None
        if not 1024 <= lo <= hi <= 65535:
            raise ConfigError(f"tunnel.port_range: {self.port_range!r} must be within 1024-65535")
        if self.metrics_listen:
            _hostport(self.metrics_listen, "tunnel.metrics_listen", TUNNEL_METRICS_PORT)
        if self.keepalive_interval <= 0:
            raise ConfigError("tunnel.keepalive_interval: must be > 0 (dead peers hold ports)")


@dataclass
class BrokerConfig:
    #: what the manager dials (loopback)
    url: str = f"mqtt://127.0.0.1:{BROKER_PORT}"
    #: what device tokens name; never bound (see ``listen``)
    public_url: str = f"mqtt://127.0.0.1:{BROKER_PORT}"
    #: ``dpanel stack up`` only: a further HOST:PORT its broker listens on for devices
    #: (--public-host). The appliance's listeners are in the mosquitto.conf that
    #: dpanel-configure writes.
    listen: Optional[str] = None
    ca_file: Optional[str] = None
    username: str = "dpanel-manager"
    password_file: str = "/etc/dpanel/broker-manager.secret"
    passwd_path: str = "/var/lib/dpanel/mosquitto/passwd"
    acl_path: str = "/var/lib/dpanel/mosquitto/acl"
    reload: str = "none"
    #: how device credentials reach the broker: "files" (password + ACL files, SIGHUP),
    #: "dynsec" (Mosquitto's dynamic-security plugin, O(1) per change; its JSON at
    #: ``dynsec_path``) or "http" (the broker asks the manager: RabbitMQ's HTTP backend)
    auth: str = "files"
    dynsec_path: str = "/var/lib/dpanel/mosquitto/dynamic-security.json"
    #: auth = "http": HOST:PORT of the manager's broker-auth listener (loopback)
    auth_listen: str = "127.0.0.1:8884"
    #: auth = "http": how a revoke closes the device's live connection:
    #: "rabbitmqctl[:NODE]" or "none"
    kick: str = "none"

    def validate(self) -> None:
        if self.auth not in ("files", "dynsec", "http"):
            raise ConfigError(f"broker.auth: {self.auth!r} is not 'files', 'dynsec' or 'http'")
        if self.kick != "none" and not self.kick.startswith("rabbitmqctl"):
            raise ConfigError(f"broker.kick: {self.kick!r} is not 'none' or 'rabbitmqctl[:NODE]'")
        _hostport(self.auth_listen, "broker.auth_listen", 8884)
        for name in ("url", "public_url"):
            # a broker cluster: several URLs, comma-separated, tried in turn
            for value in getattr(self, name).split(","):
                if not value.startswith(("mqtt://", "mqtts://")):
                    raise ConfigError(f"broker.{name}: {value!r} is not mqtt://HOST:PORT or "
                                      "mqtts://")
                host, _ = _hostport(value.split("://", 1)[1], f"broker.{name}", BROKER_PORT)
                if name == "public_url":
                    check_advertised(host, "broker.public_url")
        if self.listen is not None:
            _hostport(self.listen, "broker.listen", BROKER_PORT)
        if self.reload != "none" and not self.reload.startswith("pidfile:"):
            raise ConfigError(f"broker.reload: {self.reload!r} is not 'none' or 'pidfile:PATH'")

    @property
    def host_port(self) -> tuple[str, int]:
        return self.host_ports[0]

    @property
    def host_ports(self) -> list[tuple[str, int]]:
        return [parse_hostport(u.split("://", 1)[1], "broker.url", BROKER_PORT)
                for u in self.url.split(",")]


#: default request lifetime = request_timeout + this; the most allowed = + _LIFETIME_SLACK
_DEFAULT_LIFETIME_MARGIN = 5.0
_LIFETIME_SLACK = 30.0


_REPLICA = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


@dataclass
class ManagerConfig:
    api_listen: str = f"127.0.0.1:{API_PORT}"
    admin_token_file: str = "/etc/dpanel/admin.token"
    ssh_key: str = "/etc/dpanel/keys/manager_key"
    #: login name on devices: the built-in server ignores it, a device's own sshd
    #: (agent ssh_target = "sshd") needs a real account that trusts the manager key
    ssh_user: str = "root"
    #: how long a caller waits for a device's answer to an open/close request
    request_timeout: float = 15.0
    #: how long a request stays valid; by default request_timeout + 5 s, so that a
    #: request queued during a broker stall cannot be acted on long after its caller
    #: gave up (at most request_timeout + 30 s, and wire.MAX_REQUEST_LIFETIME)
    request_lifetime: Optional[float] = None
    #: MQTT keepalive of the manager's own broker session: a stalled broker is noticed
    #: after at most two of these (health says broker=false, requests fail at once)
    mqtt_keepalive: int = 10
    tunnel_ttl: int = 3600
    tunnel_idle_timeout: int = 600
    #: Pooled SSH connections to devices are closed after this long unused, so the
    #: device's own idle timer can close the tunnel.
    connection_idle: float = 120.0
    allow_public_api: bool = False
    #: longest operator SSH certificate (POST /v1/certs ttl), seconds; 60-43200
    cert_ttl_max: int = 43200
    #: HTTPS listener for operators anywhere (same API; operator tokens), e.g.
    #: "0.0.0.0:443". Unset: off (the plain API stays on loopback either way).
    https_listen: Optional[str] = None
    #: An operator-supplied certificate chain and key (PEM) for it; unset: one issued by
    #: the manager's own CA in STATE_DIR/https (CA certificate: STATE_DIR/https/ca.crt).
    https_cert: Optional[str] = None
    https_key: Optional[str] = None
    #: this manager's name among replicas sharing one database and broker (see
    #: docs/scale.md): "" for a lone manager. Its broker client id becomes
    #: "<broker.username>-<replica>" (one id each, or the broker kicks the other), and the
    #: job parts it runs are tagged with it (a replica restarting cuts only its own).
    replica: str = ""
    #: audit messages through an MQTT shared subscription ($share/...), so each lands on
    #: one replica: "auto" (on for replicas on one Mosquitto, off on a cluster: RabbitMQ
    #: 3.10 has none), "on" or "off" (every replica takes every record; the database's
    #: unique key keeps one). Statuses and answers always reach every replica.
    shared_subscriptions: str = "auto"
    #: the base URL devices download agent updates from (the HTTPS listener's or the
    #: edge's public name, e.g. "https://dpanel.example.com"). Unset: the URL the
    #: operator's API call came in on, refused when that is loopback and the devices'
    #: tunnel address is not (a rollout every device would fail to download).
    update_url: Optional[str] = None

    def validate(self) -> None:
        if self.update_url is not None and (
                not self.update_url.startswith(("http://", "https://"))
                or any(c.isspace() for c in self.update_url)):
            raise ConfigError(f"manager.update_url: {self.update_url[:80]!r} is not an "
                              "http:// or https:// URL")
        if self.replica and not _REPLICA.fullmatch(self.replica):
            raise ConfigError(f"manager.replica: {self.replica!r} is not 1-32 of a-z 0-9 -")
        if self.shared_subscriptions not in ("auto", "on", "off"):
            raise ConfigError(f"manager.shared_subscriptions: {self.shared_subscriptions!r} "
                              "is not 'auto', 'on' or 'off'")
        if self.https_listen is not None:
            _hostport(self.https_listen, "manager.https_listen", HTTPS_PORT)
        if (self.https_cert is None) != (self.https_key is None):
            raise ConfigError("manager.https_cert, manager.https_key: give both or neither")
        if self.https_cert is not None and self.https_listen is None:
            raise ConfigError("manager.https_cert: set manager.https_listen too (the HTTPS "
                              "listener is off without it)")
        host, _ = _hostport(self.api_listen, "manager.api_listen", API_PORT)
        if host not in ("127.0.0.1", "::1", "localhost") and not self.allow_public_api:
            raise ConfigError(
                f"manager.api_listen: {host} is not loopback; put a TLS proxy in front and set "
                "manager.allow_public_api = true if you really mean it"
            )
        if not 1 <= self.request_timeout <= MAX_REQUEST_LIFETIME:
            raise ConfigError(f"manager.request_timeout: must be 1-{MAX_REQUEST_LIFETIME} s")
        hi = min(self.request_timeout + _LIFETIME_SLACK, MAX_REQUEST_LIFETIME)
        if not self.request_timeout <= self.lifetime <= hi:
            raise ConfigError(
                f"manager.request_lifetime: {self.lifetime:g} s must be between "
                f"manager.request_timeout ({self.request_timeout:g} s) and {hi:g} s "
                f"(request_timeout + {_LIFETIME_SLACK:g} s, at most {MAX_REQUEST_LIFETIME} s): "
                "a request must not outlive its caller by more than seconds")
        if not 5 <= self.mqtt_keepalive <= 300:
            raise ConfigError("manager.mqtt_keepalive: must be 5-300 s")
        if not 60 <= self.cert_ttl_max <= 43200:
            raise ConfigError("manager.cert_ttl_max: must be 60-43200 s")

    @property
    def lifetime(self) -> float:
        """The validity of a request the manager signs (request_lifetime or its default)."""
        if self.request_lifetime is not None:
            return self.request_lifetime
        return min(self.request_timeout + _DEFAULT_LIFETIME_MARGIN, MAX_REQUEST_LIFETIME)


@dataclass
class EdgeConfig:
    """The one-port TLS front for devices (edge.py); off while ``listen`` is unset."""

    listen: Optional[str] = None
    #: what device tokens name (HOST:PORT), like tunnel.public_address
    public_address: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    #: HOST:PORT that ALPN http/1.1 is spliced to (the API: operators' HTTPS on 443)
    http_upstream: Optional[str] = None
    handshake_timeout: float = 10.0
    max_pending: int = 256
    #: what ALPN dpanel-mqtt is spliced to (mqtt:// or mqtts://HOST:PORT); unset: broker.url.
    #: The appliance names the broker's device listener (8883: its limits), not the
    #: manager's loopback one.
    broker_upstream: Optional[str] = None

    def validate(self) -> None:
        if self.listen is None:
            return
        if self.broker_upstream is not None:
            if not self.broker_upstream.startswith(("mqtt://", "mqtts://")):
                raise ConfigError(f"edge.broker_upstream: {self.broker_upstream!r} is not "
                                  "mqtt://HOST:PORT or mqtts://HOST:PORT")
            _hostport(self.broker_upstream.split("://", 1)[1], "edge.broker_upstream",
                      BROKER_PORT)
        _hostport(self.listen, "edge.listen", 443)
        if self.public_address is None or not self.cert_file or not self.key_file:
            raise ConfigError("edge: listen needs public_address, cert_file and key_file")
        host, _ = _hostport(self.public_address, "edge.public_address", 443)
        check_advertised(host, "edge.public_address")
        if self.http_upstream is not None:
            _hostport(self.http_upstream, "edge.http_upstream", 80)
        if not 1 <= self.handshake_timeout <= 120:
            raise ConfigError("edge.handshake_timeout: must be 1-120 s")
        if not 1 <= self.max_pending <= 100000:
            raise ConfigError("edge.max_pending: must be 1-100000")


@dataclass
class RegistryConfig:
    #: sqlite:///ABSOLUTE/PATH or postgresql://USER@HOST/DB (libpq URL; keep a password
    #: out of it with ?passfile=PATH); unset = sqlite under state_dir (registry.db)
    url: Optional[str] = None

    def validate(self) -> None:
        if self.url is not None:
            parse_url(self.url, "registry.url")
            if not self.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
                raise ConfigError(f"registry.url: {self.url!r} is not sqlite:///PATH or "
                                  "postgresql://...")


@dataclass
class ServerConfig:
    state_dir: str = "/var/lib/dpanel"
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    source: str = "<defaults>"

    def validate(self) -> None:
        self.tunnel.validate()
        self.broker.validate()
        self.manager.validate()
        if self.manager.replica and self.broker.auth == "files":
            raise ConfigError("manager.replica: replicas need broker.auth = 'dynsec' or "
                              "'http' (with files, Mosquitto sets every client id to its "
                              "username, so two replicas would kick each other off)")
        self.edge.validate()
        self.registry.validate()

    @property
    def registry_path(self) -> Path:
        return Path(self.state_dir) / "registry.db"

    @property
    def registry_url(self) -> str:
        """What every process opens the registry by (:mod:`.db`)."""
        return self.registry.url or f"sqlite://{Path(self.registry_path).resolve()}"

    @property
    def known_hosts_path(self) -> Path:
        return Path(self.state_dir) / "known_hosts"


def _hostport(value: str, what: str, default: int) -> tuple[str, int]:
    try:
        return parse_hostport(value, what, default)
    except DecodeError as exc:
        raise ConfigError(str(exc)) from None


def _fill(obj: Any, data: dict[str, Any], prefix: str, source: str) -> None:
    hints = get_type_hints(type(obj))
    known = {f.name: f for f in fields(obj) if f.name != "source"}
    for key, value in data.items():
        where = f"{source}: {prefix}{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown setting (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a [{prefix}{key}] table")
            _fill(current, value, f"{prefix}{key}.", source)
            continue
        want = tuple(t for t in get_args(hints[key]) if t is not type(None)) or (hints[key],)
        if float in want and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
            names = "/".join(t.__name__ for t in want)
            raise ConfigError(f"{where}: expected {names}, got {type(value).__name__}")
        setattr(obj, key, value)


def _as_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name == "source" or value is None:
            continue  # TOML has no null: an absent key is the default
        out[f.name] = _as_dict(value) if is_dataclass(value) else value
    return out


def dump_config(cfg: ServerConfig) -> str:
    """TOML text for ``cfg`` (tomli-w: strings are escaped, so any path or name is safe)."""
    return "# dPanel configuration (generated; safe to edit)\n" + tomli_w.dumps(_as_dict(cfg))


def load_config(path: Optional[str | Path]) -> ServerConfig:
    """Load and validate; ``None`` gives the defaults (appliance paths)."""
    cfg = ServerConfig()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from None
        cfg.source = str(p)
        _fill(cfg, data, "", str(p))
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{cfg.source}: {exc}") from None
    return cfg


def stack_config(state_dir: Path, *, broker_port: int = STACK_BROKER_PORT,
                 tunnel_port: int = TUNNEL_PORT, api_port: int = API_PORT,
                 port_range: str = "20000-29999") -> ServerConfig:
    """A self-contained loopback configuration whose files all live in ``state_dir``."""
    d = state_dir.resolve()
    cfg = ServerConfig(
        state_dir=str(d),
        tunnel=TunnelConfig(
            listen=f"127.0.0.1:{tunnel_port}", public_address=f"127.0.0.1:{tunnel_port}",
            host_key=str(d / "keys" / "tunnel_host_key"), port_range=port_range,
            # the stack runs the tunnel inside the manager: its metrics are on the API
            metrics_listen="",
        ),
        broker=BrokerConfig(
            url=f"mqtt://127.0.0.1:{broker_port}", public_url=f"mqtt://127.0.0.1:{broker_port}",
            password_file=str(d / "keys" / "broker-manager.secret"),
            passwd_path=str(d / "mosquitto" / "passwd"), acl_path=str(d / "mosquitto" / "acl"),
            reload=f"pidfile:{d / 'mosquitto' / 'mosquitto.pid'}",
            dynsec_path=str(d / "mosquitto" / "dynamic-security.json"),
        ),
        manager=ManagerConfig(
            api_listen=f"127.0.0.1:{api_port}", admin_token_file=str(d / "keys" / "admin.token"),
            ssh_key=str(d / "keys" / "manager_key"),
        ),
        source=str(d / "server.toml"),
    )
    cfg.validate()
    return cfg
