"""``dpanel-configure``: turn an installed dpanel-server package into a running server.

Runs as root on the server itself (``invoke deploy-server`` calls it over SSH; an operator
may run it by hand after ``apt install ./dpanel-server_*.deb``). Every step compares what
is there with what should be there and changes only the difference, so a second run
changes nothing and says so. Keys, certificates and secrets are generated once and never
replaced: devices pinned them, and an upgrade must keep them.
"""

from __future__ import annotations

import argparse
import grp
import hashlib
import json
import os
import pwd
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from dpanel_proto.ports import API_PORT, BROKER_PORT, BROKER_TLS_PORT, TUNNEL_PORT
from dpanel_proto.result import format_result
from dpanel_proto.util import atomic_write
from dpanel_server.broker import APPLIANCE_MAX_CONNECTIONS, Listener

__all__ = ["Layout", "Options", "Report", "main", "render_mosquitto_conf"]

Owner = tuple[str, str]
Change = Literal["created", "updated", "fixed"]


@dataclass(frozen=True)
class Layout:
    """Where everything lives on the appliance (the paths the units and config name)."""

    etc: Path = Path("/etc/dpanel")
    state: Path = Path("/var/lib/dpanel")

    @property
    def keys(self) -> Path:
        return self.etc / "keys"

    @property
    def tls(self) -> Path:
        return self.etc / "tls"

    @property
    def config(self) -> Path:
        return self.etc / "server.toml"

    @property
    def mosquitto_conf(self) -> Path:
        return self.etc / "mosquitto.conf"

    @property
    def broker_dir(self) -> Path:
        return self.state / "mosquitto"

    @property
    def dynsec_dir(self) -> Path:
        """broker.auth = "dynsec": the plugin's JSON; Mosquitto's own (it saves there)."""
        return self.state / "dynsec"

    @property
    def https_dir(self) -> Path:
        """The manager's HTTPS CA and certificate (https_listener's STATE_DIR/https)."""
        return self.state / "https"

    @property
    def operator_https(self) -> Path:
        """Where an operator-supplied HTTPS certificate and key are copied to."""
        return self.etc / "https"

    @property
    def systemd(self) -> Path:
        return Path("/etc/systemd/system") if self.etc == Path("/etc/dpanel") else (
            self.etc / "systemd")


@dataclass
class Options:
    public_host: Optional[str] = None
    tunnel_public: Optional[str] = None  # HOST:PORT devices dial (default ADVERTISE:2220)
    broker_public: Optional[str] = None  # HOST:PORT devices dial (default ADVERTISE:8883)
    #: the API's HTTPS listener for operators (manager.https_listen): None keeps what the
    #: file has (default: off), "" turns it off
    https_listen: Optional[str] = None
    #: an operator-supplied certificate chain + key (PEM) for it, copied into
    #: /etc/dpanel/https; "" goes back to the manager's own CA; None keeps
    https_cert: Optional[str] = None
    https_key: Optional[str] = None
    #: the one-port TLS edge for devices (edge.listen): None keeps, "" turns it off
    edge_listen: Optional[str] = None
    #: HOST:PORT tokens name for it (default ADVERTISE:PORT of edge_listen)
    edge_public: Optional[str] = None
    #: "files" or "dynsec"; None keeps what the file has (a fresh install: dynsec when
    #: Debian's plugin is installed)
    broker_auth: Optional[str] = None
    package_changed: bool = False
    start: bool = True


@dataclass
class Report:
    """What a run changed; ``what`` keys group changes by the service they affect."""

    changes: list[tuple[str, str]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)

    def note(self, what: str, item: str, affects: Sequence[str] = ()) -> None:
        self.changes.append((what, item))
        self.touched.update(affects)
        print(f"  {what:<8} {item}", flush=True)


# Which services need a restart when a file of this kind changes.
DPANEL = ("dpanel-tunnel", "dpanel-manager", "dpanel-edge")
BROKER = ("mosquitto",)



# ---------------------------------------------------------------------------- files


def _ids(owner: Owner) -> tuple[int, int]:
    return pwd.getpwnam(owner[0]).pw_uid, grp.getgrnam(owner[1]).gr_gid


def ensure_meta(path: Path, owner: Owner, mode: int, report: Report,
                affects: Sequence[str] = ()) -> None:
    """Owner and mode exactly as given (fixes drift, e.g. a key someone chmod'ed)."""
    st = path.lstat()
    uid, gid = _ids(owner)
    if (st.st_uid, st.st_gid) != (uid, gid) or (st.st_mode & 0o7777) != mode:
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        report.note("fixed", f"{path} {owner[0]}:{owner[1]} {mode:04o}", affects)


def ensure_dir(path: Path, owner: Owner, mode: int, report: Report) -> None:
    if not path.is_dir():
        path.mkdir(parents=True)
        os.chown(path, *_ids(owner))
        os.chmod(path, mode)
        report.note("created", f"{path}/")
        return
    ensure_meta(path, owner, mode, report)


def write_atomic(path: Path, data: bytes, owner: Owner, mode: int) -> None:
    """The protocol package's atomic write, owner and mode set before the name appears."""
    atomic_write(path, data, mode, owner=_ids(owner))


def ensure_content(path: Path, data: bytes, owner: Owner, mode: int, report: Report,
                   affects: Sequence[str]) -> None:
    if path.exists() and path.read_bytes() == data:
        ensure_meta(path, owner, mode, report, affects)
        return
    what: Change = "updated" if path.exists() else "created"
    write_atomic(path, data, owner, mode)
    report.note(what, str(path), affects)


def ensure_once(path: Path, make: Callable[[], bytes], owner: Owner, mode: int,
                report: Report, affects: Sequence[str]) -> None:
    """Generate the content only if the file does not exist yet (keys, secrets)."""
    if path.exists():
        ensure_meta(path, owner, mode, report, affects)
        return
    write_atomic(path, make(), owner, mode)
    report.note("created", str(path), affects)


# ---------------------------------------------------------------------------- keys


def _ssh_keypair(path: Path, comment: str, report: Report) -> None:
    import asyncssh

    dpanel: Owner = ("dpanel", "dpanel")
    pub = path.with_name(path.name + ".pub")
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        write_atomic(path, key.export_private_key(), dpanel, 0o600)
        report.note("created", str(path), DPANEL)
        pub.unlink(missing_ok=True)
    ensure_meta(path, dpanel, 0o600, report, DPANEL)
    line = asyncssh.read_private_key(str(path)).export_public_key()
    ensure_content(pub, line, dpanel, 0o644, report, DPANEL)


def _secret() -> bytes:
    return (secrets.token_urlsafe(32) + "\n").encode()


def _cert_names(broker_host: str) -> list[str]:
    return list(dict.fromkeys([broker_host, "localhost", "127.0.0.1"]))


#: Who owns each TLS file on the appliance: the broker reads its own key and nobody else
#: needs it; the CA key is dpanel's (nothing runs as root).
TLS_OWNERS: dict[str, tuple[Owner, int]] = {
    "ca.key": (("dpanel", "dpanel"), 0o600),
    "ca.crt": (("root", "root"), 0o644),
    "server.key": (("mosquitto", "mosquitto"), 0o600),
    "server.crt": (("root", "root"), 0o644),
    # the edge's own key: it runs as dpanel, not as the broker
    "edge.key": (("dpanel", "dpanel"), 0o600),
    "edge.crt": (("root", "root"), 0o644),
}


def _ensure_tls(layout: Layout, broker_host: str, report: Report,
                edge_host: Optional[str] = None) -> None:
    """The broker CA and the server certificate for the name devices dial, by the one
    set of rules in :mod:`dpanel_server.pki` (the CA is kept; the certificate is
    re-issued when that name changes or expiry is near)."""
    from dpanel_server.errors import ConfigError
    from dpanel_server.pki import ensure_broker_tls

    def write(path: Path, data: bytes, kind: str) -> None:
        owner, mode = TLS_OWNERS[kind]
        write_atomic(path, data, owner, mode)

    try:
        changes = ensure_broker_tls(layout.tls, _cert_names(broker_host), writer=write)
    except ConfigError as exc:
        raise SystemExit(f"dpanel-configure: {exc}") from None
    if edge_host is not None:
        # the edge's certificate: the broker CA's, which device tokens pin already
        try:
            changes += ensure_broker_tls(layout.tls, _cert_names(edge_host), writer=write,
                                         leaf="edge")
        except ConfigError as exc:
            raise SystemExit(f"dpanel-configure: {exc}") from None
    for ch in changes:
        detail = " (broker CA)" if ch.path.name == "ca.crt" else (
            f" ({ch.reason})" if ch.reason else "")
        report.note(ch.what, f"{ch.path}{detail}",
                    BROKER + DPANEL if ch.path.name == "ca.crt" else
                    ("dpanel-edge",) if ch.path.name.startswith("edge.") else BROKER)
    for name, (owner, mode) in TLS_OWNERS.items():
        if (layout.tls / name).exists() or not name.startswith("edge."):
            ensure_meta(layout.tls / name, owner, mode, report, BROKER)


# ---------------------------------------------------------------------------- config


def _split_hostport(value: str, what: str, default_port: int) -> tuple[str, int]:
    from dpanel_proto.util import parse_hostport
    from dpanel_proto.wire import DecodeError

    try:
        return parse_hostport(value, what, default_port)
    except DecodeError as exc:
        raise SystemExit(f"dpanel-configure: {exc}") from None


def _fmt_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _desired_config(layout: Layout, opts: Options) -> str:
    """server.toml: the public addresses come from the options, else from the existing
    file (so a re-run without options keeps them); everything else is the appliance
    layout. Hand edits to other settings are overwritten: say so in the header."""
    from dpanel_server.config import ServerConfig, check_advertised, dump_config, load_config
    from dpanel_server.errors import ConfigError

    old: Optional[ServerConfig] = None
    if layout.config.exists():
        try:
            old = load_config(layout.config)
        except ConfigError as exc:
            print(f"  warning  {layout.config} is invalid ({exc}); rewriting it", flush=True)
    tunnel_pub = opts.tunnel_public
    broker_pub = opts.broker_public
    if opts.public_host:
        tunnel_pub = tunnel_pub or _fmt_hostport(opts.public_host, TUNNEL_PORT)
        broker_pub = broker_pub or _fmt_hostport(opts.public_host, BROKER_TLS_PORT)
    if old is not None:
        tunnel_pub = tunnel_pub or old.tunnel.public_address
        broker_pub = broker_pub or old.broker.public_url.split("://", 1)[1]
    if not tunnel_pub or not broker_pub:
        raise SystemExit("dpanel-configure: --public-host is required on the first run "
                         "(--advertise HOST: the name or address devices dial)")
    th, tp = _split_hostport(tunnel_pub, "--tunnel-public", TUNNEL_PORT)
    bh, bp = _split_hostport(broker_pub, "--broker-public", BROKER_TLS_PORT)
    for host, flag, given in ((th, "--tunnel-public", opts.tunnel_public),
                              (bh, "--broker-public", opts.broker_public)):
        try:  # name the option the bad address came from
            check_advertised(host, "--advertise" if opts.public_host and not given else flag)
        except ConfigError as exc:
            raise SystemExit(f"dpanel-configure: {exc}") from None
    cfg = ServerConfig(state_dir=str(layout.state))
    cfg.tunnel.listen = f"0.0.0.0:{TUNNEL_PORT}"
    cfg.tunnel.public_address = _fmt_hostport(th, tp)
    cfg.tunnel.host_key = str(layout.keys / "tunnel_host_key")
    cfg.broker.url = f"mqtt://127.0.0.1:{BROKER_PORT}"
    cfg.broker.public_url = f"mqtts://{_fmt_hostport(bh, bp)}"
    cfg.broker.ca_file = str(layout.tls / "ca.crt")
    cfg.broker.password_file = str(layout.etc / "broker-manager.secret")
    cfg.broker.passwd_path = str(layout.broker_dir / "passwd")
    cfg.broker.acl_path = str(layout.broker_dir / "acl")
    cfg.broker.reload = "none"  # dpanel-broker-reload.path does it
    cfg.manager.api_listen = f"127.0.0.1:{API_PORT}"
    cfg.manager.admin_token_file = str(layout.etc / "admin.token")
    cfg.manager.ssh_key = str(layout.keys / "manager_key")
    if old is not None:
        # the operator's choices, not the layout's: a re-run keeps them
        cfg.registry = old.registry
        cfg.tunnel.metrics_listen = old.tunnel.metrics_listen
    # HTTPS for operators: off unless asked for; a re-run keeps it, and keeps an
    # operator-supplied certificate (manager.https_cert/https_key, set by hand)
    if old is not None:
        cfg.manager.https_listen = old.manager.https_listen
        cfg.manager.https_cert, cfg.manager.https_key = (old.manager.https_cert,
                                                         old.manager.https_key)
    if opts.https_listen is not None:
        cfg.manager.https_listen = opts.https_listen or None
        if cfg.manager.https_listen is None:
            cfg.manager.https_cert = cfg.manager.https_key = None
    if (opts.https_cert is None) != (opts.https_key is None):
        raise SystemExit("dpanel-configure: --https-cert, --https-key: give both or neither")
    if opts.https_cert == "" or opts.https_key == "":
        cfg.manager.https_cert = cfg.manager.https_key = None  # back to our own CA
    elif opts.https_cert is not None:
        # configure() copies them there (readable by the manager, whatever their source)
        cfg.manager.https_cert = str(layout.operator_https / "server.crt")
        cfg.manager.https_key = str(layout.operator_https / "server.key")
    _edge_config(cfg, old, opts, layout, bh)
    # where devices fetch agent updates: the HTTPS listener at the host they already
    # dial for the broker (its certificate is from the same CA); without the listener,
    # rollouts name a URL with --url
    if cfg.manager.https_listen:
        hp = _split_hostport(cfg.manager.https_listen, "--https-listen", 443)[1]
        cfg.manager.update_url = "https://" + _fmt_hostport(bh, hp)
    cfg.broker.auth = opts.broker_auth or (old.broker.auth if old is not None
                                           else _default_broker_auth())
    if cfg.broker.auth not in ("files", "dynsec"):
        raise SystemExit(f"dpanel-configure: --broker-auth: {cfg.broker.auth!r} is not "
                         "'files' or 'dynsec' (the appliance runs Mosquitto)")
    cfg.broker.dynsec_path = str(layout.dynsec_dir / "dynamic-security.json")
    try:
        cfg.validate()
    except ConfigError as exc:
        why = (str(exc).replace("manager.https_listen", "--https-listen")
               .replace("edge.listen", "--edge-listen")
               .replace("edge.public_address", "--edge-public"))
        raise SystemExit(f"dpanel-configure: {why}") from None
    text = dump_config(cfg).split("\n", 1)[1]
    return ("# dPanel Edge server configuration, written by dpanel-configure.\n"
            "# Re-running it (invoke deploy-server) rewrites this file; change the public\n"
            "# addresses with --advertise / --tunnel-public / --broker-public; [registry]\n"
            "# url and tunnel.metrics_listen are kept as you set them.\n" + text)


def _default_broker_auth() -> str:
    """A fresh appliance: dynamic security (O(1) per enrol/revoke, no file rewrite, no
    reload) when Debian's mosquitto ships the plugin, which Debian 12's does."""
    from dpanel_server.dynsec import find_plugin
    from dpanel_server.errors import BrokerError

    try:
        find_plugin()
    except BrokerError:
        return "files"
    return "dynsec"


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _edge_config(cfg: Any, old: Any, opts: Options, layout: Layout, advertise: str) -> None:
    """edge.*: off unless asked for, kept on re-runs; devices dial ``--edge-public`` (or
    the advertised host at the listen port). Operators' HTTPS cannot share its port: the
    edge hands ALPN http/1.1 to an upstream, but the dpanel CLI offers no ALPN, so it
    would be refused there."""
    from dpanel_server.config import EdgeConfig

    if old is not None:
        cfg.edge = old.edge
    listen = opts.edge_listen
    if listen is not None and listen.lower() in ("", "off"):
        cfg.edge = EdgeConfig()
        return
    if listen is None and not cfg.edge.listen:
        if opts.edge_public:
            raise SystemExit("dpanel-configure: --edge-public needs --edge-listen HOST:PORT")
        return
    old_listen = cfg.edge.listen
    if listen is not None:
        h, p = _split_hostport(listen, "--edge-listen", 443)
        cfg.edge.listen = _fmt_hostport(h, p)
    assert cfg.edge.listen is not None
    eh, ep = _split_hostport(cfg.edge.listen, "--edge-listen", 443)
    if opts.edge_public:
        ph, pp = _split_hostport(opts.edge_public, "--edge-public", ep)
        cfg.edge.public_address = _fmt_hostport(ph, pp)
    elif opts.public_host or not cfg.edge.public_address or cfg.edge.listen != old_listen:
        cfg.edge.public_address = _fmt_hostport(opts.public_host or advertise, ep)
    cfg.edge.cert_file = str(layout.tls / "edge.crt")
    cfg.edge.key_file = str(layout.tls / "edge.key")
    # the broker's device listener (its limits), not the manager's loopback one
    cfg.edge.broker_upstream = f"mqtts://127.0.0.1:{BROKER_TLS_PORT}"
    cfg.edge.http_upstream = None
    if cfg.manager.https_listen:
        hh, hp = _split_hostport(cfg.manager.https_listen, "--https-listen", 443)
        if hp == ep and (hh == eh or "0.0.0.0" in (hh, eh) or "::" in (hh, eh)):
            raise SystemExit(
                f"dpanel-configure: --edge-listen {cfg.edge.listen} and --https-listen "
                f"{cfg.manager.https_listen} share port {ep}: not supported (the edge tells "
                "HTTPS apart by ALPN, which the dpanel CLI does not send); give one of "
                "them another port")


def render_mosquitto_conf(layout: Layout, dynsec: bool = False) -> str:
    """Plain MQTT on loopback for the manager, TLS on 8883 for devices (the shared
    renderer, :func:`dpanel_server.broker.render_mosquitto_conf`, with the appliance's
    listeners); ``dynsec``: credentials in the dynamic-security plugin, not the files."""
    from dpanel_server.broker import render_mosquitto_conf as render
    from dpanel_server.dynsec import find_plugin

    return render(
        dynsec=(find_plugin(), layout.dynsec_dir / "dynamic-security.json") if dynsec
        else None,
        passwd=layout.broker_dir / "passwd", acl=layout.broker_dir / "acl",
        pid_file=Path("/run/mosquitto/mosquitto.pid"),
        listeners=[Listener(BROKER_PORT, "127.0.0.1"),  # the manager, on this host only
                   Listener(BROKER_TLS_PORT, None, tls_dir=layout.tls, public=True,
                            max_connections=APPLIANCE_MAX_CONNECTIONS)],
        as_current_user=False,  # the unit starts it as 'mosquitto'
        log_timestamp=False,  # the journal stamps lines
        header="dpanel-configure")


def _ensure_broker_files(layout: Layout, report: Report) -> None:
    """Mosquitto refuses to start without its password file: seed it with the manager's
    own account. After that the manager owns both files and rewrites them on changes."""
    from dpanel_server.broker import mosquitto_hash, render_acl, render_passwd
    from dpanel_server.config import load_config

    cfg = load_config(layout.config)
    owner: Owner = ("dpanel", "mosquitto")
    passwd, acl = Path(cfg.broker.passwd_path), Path(cfg.broker.acl_path)
    password = Path(cfg.broker.password_file).read_text().strip()
    seeds = ((passwd, render_passwd([(cfg.broker.username, mosquitto_hash(password))])),
             (acl, render_acl(cfg.broker.username)))
    for path, text in seeds:
        if not path.exists():
            write_atomic(path, text.encode(), owner, 0o640)
            report.note("created", str(path), BROKER)
        ensure_meta(path, owner, 0o640, report, BROKER)


# ---------------------------------------------------------------------------- systemd

UNITS = ("dpanel-broker-reload.path", "mosquitto.service", "dpanel-tunnel.service",
         "dpanel-manager.service")
#: enabled only while edge.listen is set
EDGE_UNIT = "dpanel-edge.service"
DROPIN = "50-dpanel-listen.conf"


def _systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=check)


def _journal_tail(unit: str) -> str:
    out = subprocess.run(["journalctl", "-u", unit, "-n", "25", "--no-pager", "-o", "cat"],
                         capture_output=True, text=True)
    return out.stdout


def listen_dropin(listen: Optional[str], what: str) -> Optional[str]:
    """What a unit needs on top of its shipped sandbox to serve ``listen``, and nothing
    more: IPAddressAllow=any only for a non-loopback address, CAP_NET_BIND_SERVICE (in
    the bounding and the ambient set: the service runs as dpanel) only below port 1024.
    None: the shipped unit is enough."""
    if not listen:
        return None
    host, port = _split_hostport(listen, what, 443)
    lines = []
    if not _loopback(host):
        lines += ["# peers from anywhere, not only loopback", "IPAddressAllow=any"]
    if port < 1024:
        lines += [f"# port {port} < 1024: this one capability, nothing else",
                  "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                  "AmbientCapabilities=CAP_NET_BIND_SERVICE"]
    if not lines:
        return None
    return (f"# Written by dpanel-configure for {what} {listen}; re-runs rewrite or remove it.\n"
            "[Service]\n" + "\n".join(lines) + "\n")


def _ensure_dropins(layout: Layout, report: Report) -> bool:
    """The listen drop-ins of the manager (operators' HTTPS) and the edge; True if any
    changed (systemd must re-read its units)."""
    from dpanel_server.config import load_config

    cfg = load_config(layout.config)
    changed = False
    for unit, listen, what in (("dpanel-manager", cfg.manager.https_listen, "--https-listen"),
                               ("dpanel-edge", cfg.edge.listen, "--edge-listen")):
        path = layout.systemd / f"{unit}.service.d" / DROPIN
        text = listen_dropin(listen, what)
        if text is None:
            if path.exists():
                path.unlink()
                report.note("removed", str(path), (unit,))
                changed = True
            continue
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            ensure_content(path, text.encode(), ("root", "root"), 0o644, report, (unit,))
            changed = True
    return changed


def _units(layout: Layout) -> tuple[str, ...]:
    from dpanel_server.config import load_config

    return UNITS + ((EDGE_UNIT,) if load_config(layout.config).edge.listen else ())


def _ensure_services(opts: Options, report: Report, units: Sequence[str] = UNITS,
                     reload: bool = False) -> None:
    if not Path("/run/systemd/system").is_dir():
        raise SystemExit("dpanel-configure: systemd is not running on this host")
    if opts.package_changed or reload:
        _systemctl("daemon-reload")
    if EDGE_UNIT not in units and _systemctl("is-enabled", "--quiet", EDGE_UNIT,
                                             check=False).returncode == 0:
        _systemctl("disable", "--now", "--quiet", EDGE_UNIT)
        report.note("disabled", EDGE_UNIT)
    for unit in units:
        if _systemctl("is-enabled", "--quiet", unit, check=False).returncode != 0:
            _systemctl("enable", "--quiet", unit)
            report.note("enabled", unit)
    if not opts.start:
        return
    for unit in units:
        base = unit.rsplit(".", 1)[0]
        active = _systemctl("is-active", "--quiet", unit, check=False).returncode == 0
        action = ("start" if not active else
                  "restart" if base in report.touched or (
                      opts.package_changed and base in DPANEL + BROKER) else "")
        if not action:
            continue
        # Type=notify: this returns once the service said READY=1 (or failed).
        res = _systemctl(action, unit, check=False)
        if res.returncode != 0:
            raise SystemExit(f"dpanel-configure: {action} {unit} failed: "
                             f"{res.stderr.strip()}\n{_journal_tail(unit)}")
        report.note(f"{action}ed" if action == "start" else "restarted", unit)


# ---------------------------------------------------------------------------- enrolment


def enrolment(layout: Layout) -> dict[str, str]:
    """What images and operators pin: the tunnel host key, the manager key, the CA."""
    import asyncssh
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from dpanel_server.config import load_config

    cfg = load_config(layout.config)
    host_key = Path(cfg.tunnel.host_key + ".pub").read_text().strip()
    ca_pem = (layout.tls / "ca.crt").read_text()
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    return {
        "tunnel": cfg.tunnel.public_address,
        "tunnel_host_key": host_key,
        "tunnel_host_key_fingerprint": str(asyncssh.import_public_key(host_key)
                                           .get_fingerprint()),
        "manager_key": Path(cfg.manager.ssh_key + ".pub").read_text().strip(),
        "broker": cfg.broker.public_url,
        "broker_ca": ca_pem,
        "broker_ca_sha256": ca.fingerprint(hashes.SHA256()).hex(":").upper(),
        "broker_auth": cfg.broker.auth,
        **({"edge": cfg.edge.public_address} if cfg.edge.listen and cfg.edge.public_address
           else {}),
        **_https_info(layout, cfg),
    }


def _https_info(layout: Layout, cfg: Any) -> dict[str, str]:
    """What operators need to log in: the HTTPS port and, for our own CA, the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    if not cfg.manager.https_listen:
        return {}
    info = {"https_listen": str(cfg.manager.https_listen)}
    ca_p = layout.https_dir / "ca.crt"
    if cfg.manager.https_cert is None and ca_p.exists():
        pem = ca_p.read_text()
        ca = x509.load_pem_x509_certificate(pem.encode())
        info.update(https_ca=pem, https_ca_sha256=ca.fingerprint(hashes.SHA256()).hex(":")
                    .upper())
    return info


# ---------------------------------------------------------------------------- main


def _previous_auth(layout: Layout) -> Optional[str]:
    from dpanel_server.config import load_config
    from dpanel_server.errors import ConfigError

    try:
        return load_config(layout.config).broker.auth if layout.config.exists() else None
    except ConfigError:
        return None


def configure(opts: Options, layout: Layout = Layout()) -> Report:
    report = Report()
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        raise SystemExit("dpanel-configure: user 'mosquitto' is missing "
                         "(apt-get install mosquitto)") from None
    try:
        pwd.getpwnam("dpanel")
    except KeyError:
        subprocess.run(["systemd-sysusers", "dpanel.conf"], check=True)
        report.note("created", "user dpanel")
    root: Owner = ("root", "root")
    dpanel: Owner = ("dpanel", "dpanel")
    # /var/lib/dpanel: group mosquitto may only traverse (to its passwd/acl dir).
    for path, owner, mode in ((layout.etc, root, 0o755), (layout.keys, dpanel, 0o700),
                              (layout.tls, root, 0o755),
                              (layout.state, ("dpanel", "mosquitto"), 0o710),
                              (layout.broker_dir, ("dpanel", "mosquitto"), 0o2750)):
        ensure_dir(path, owner, mode, report)
    ensure_once(layout.etc / "admin.token", _secret, dpanel, 0o600, report, DPANEL)
    ensure_once(layout.etc / "broker-manager.secret", _secret, dpanel, 0o600, report, DPANEL)
    _ssh_keypair(layout.keys / "tunnel_host_key", "dpanel-tunnel-host", report)
    _ssh_keypair(layout.keys / "manager_key", "dpanel-manager", report)
    previous_auth = _previous_auth(layout)
    config_text = _desired_config(layout, opts)
    ensure_content(layout.config, config_text.encode(), ("root", "dpanel"), 0o640, report,
                   DPANEL)
    from dpanel_server.config import load_config

    cfg = load_config(layout.config)
    broker_host = cfg.broker.public_url.split("://", 1)[1]
    broker_host = _split_hostport(broker_host, "broker.public_url", BROKER_TLS_PORT)[0]
    edge_host = (_split_hostport(cfg.edge.public_address, "--edge-public", 443)[0]
                 if cfg.edge.listen and cfg.edge.public_address else None)
    _ensure_tls(layout, broker_host, report, edge_host)
    _ensure_https(layout, opts, report)
    dynsec = cfg.broker.auth == "dynsec"
    ensure_content(layout.mosquitto_conf, render_mosquitto_conf(layout, dynsec).encode(),
                   ("root", "mosquitto"), 0o640, report, BROKER)
    _ensure_broker_files(layout, report)
    if dynsec:
        _ensure_dynsec(layout, report, switched=previous_auth not in (None, "dynsec"))
    reload = _ensure_dropins(layout, report)
    _ensure_services(opts, report, _units(layout), reload)
    return report


def _ensure_https(layout: Layout, opts: Options, report: Report) -> None:
    """Operators' HTTPS: an operator-supplied certificate is checked and copied where the
    manager can read it; otherwise the manager's own CA and certificate are made here
    (https_listener's rules, so the manager finds them current), so that the CA operators
    pin is in the hand-over from the first run."""
    import ssl

    from dpanel_server.config import load_config
    from dpanel_server.errors import ConfigError
    from dpanel_server.https_listener import HTTPS_CA_NAME, https_names
    from dpanel_server.pki import ensure_broker_tls

    cfg = load_config(layout.config)
    if not cfg.manager.https_listen:
        return
    dpanel: Owner = ("dpanel", "dpanel")
    if opts.https_cert and opts.https_key:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                opts.https_cert, opts.https_key)
        except (OSError, ssl.SSLError) as exc:
            raise SystemExit(f"dpanel-configure: --https-cert/--https-key: {opts.https_cert}, "
                             f"{opts.https_key}: not a certificate chain and its key "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
        ensure_dir(layout.operator_https, ("root", "dpanel"), 0o750, report)
        for src, name, owner, mode in ((opts.https_cert, "server.crt", ("root", "dpanel"), 0o644),
                                       (opts.https_key, "server.key", dpanel, 0o600)):
            ensure_content(layout.operator_https / name, Path(src).read_bytes(), owner, mode,
                           report, ("dpanel-manager",))
    if cfg.manager.https_cert is not None:
        return
    ensure_dir(layout.https_dir, dpanel, 0o700, report)

    def write(path: Path, data: bytes, kind: str) -> None:
        write_atomic(path, data, dpanel, 0o600 if kind.endswith(".key") else 0o644)

    try:
        changes = ensure_broker_tls(layout.https_dir, https_names(cfg), writer=write,
                                    ca_name=HTTPS_CA_NAME)
    except ConfigError as exc:
        raise SystemExit(f"dpanel-configure: {exc}") from None
    for ch in changes:
        pin = " (operators pin this CA)" if ch.path.name == "ca.crt" else ""
        report.note(ch.what, f"{ch.path}{pin}", ("dpanel-manager",))


def _registry_view(cfg: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """(device, $7$ hash) of the active devices and the revoked ids, read as dpanel: the
    registry is the manager's (a SQLite file opened by root would leave root-owned WAL
    files behind it)."""
    code = ("import json, sys\nfrom dpanel_server.registry import Registry\n"
            "r = Registry(sys.argv[1])\n"
            "print(json.dumps([r.broker_entries(), sorted(r.revoked_ids())]))\n")
    res = subprocess.run([sys.executable, "-c", code, cfg.registry_url], user="dpanel",
                         group="dpanel", extra_groups=[], capture_output=True, text=True,
                         cwd="/", umask=0o077)
    if res.returncode != 0:
        raise SystemExit(f"dpanel-configure: cannot read the registry for the broker: "
                         f"{res.stderr.strip().splitlines()[-1:]}")
    entries, revoked = json.loads(res.stdout)
    return [(str(d), str(h)) for d, h in entries], [str(d) for d in revoked]


def _ensure_dynsec(layout: Layout, report: Report, switched: bool) -> None:
    """The plugin's JSON, from the registry, written only while Mosquitto is stopped (the
    plugin saves its own state over it on every change): on the first dynsec run, and on
    a switch from files (devices enrolled meanwhile are added, revoked ones disabled)."""
    from dpanel_server.config import load_config
    from dpanel_server.dynsec import merge_missing

    cfg = load_config(layout.config)
    mosq: Owner = ("mosquitto", "mosquitto")
    ensure_dir(layout.dynsec_dir, mosq, 0o700, report)
    path = Path(cfg.broker.dynsec_path)
    if path.exists() and not switched:
        ensure_meta(path, mosq, 0o600, report, BROKER)
        return
    if _systemctl("is-active", "--quiet", "mosquitto.service", check=False).returncode == 0:
        _systemctl("stop", "mosquitto.service")
        report.note("stopped", "mosquitto.service (to write its dynamic-security file)",
                    BROKER)
    entries, revoked = _registry_view(cfg)
    password = Path(cfg.broker.password_file).read_text().strip()
    changed = merge_missing(path, cfg.broker.username, password, entries, revoked)
    os.chown(path, *_ids(mosq))
    if changed:
        report.note("created" if changed == ["created"] else "updated",
                    f"{path} ({len(entries)} device(s))", BROKER)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpanel-configure", description=__doc__.splitlines()[0])
    # What device tokens name (the services always listen on every address): the same
    # setting as `dpanel stack up --advertise`; --public-host is its older spelling.
    p.add_argument("--advertise", "--public-host", dest="public_host", metavar="HOST",
                   help="name or address devices dial (first run: required; not 0.0.0.0)")
    p.add_argument("--tunnel-public", help="HOST:PORT devices dial for the tunnel "
                   f"(default ADVERTISE:{TUNNEL_PORT}; e.g. behind port forwarding)")
    p.add_argument("--broker-public", help="HOST:PORT devices dial for MQTT over TLS "
                   f"(default ADVERTISE:{BROKER_TLS_PORT})")
    p.add_argument("--https-listen", metavar="HOST:PORT", help="serve the API over HTTPS "
                   "for operators here (e.g. 0.0.0.0:443; \"\": off; default: off, or what "
                   "the last run set)")
    p.add_argument("--https-cert", metavar="FILE", help="your own certificate chain (PEM) "
                   "for --https-listen, with --https-key (copied; \"\": the manager's own CA "
                   "again; default: the manager's own CA, or what the last run set)")
    p.add_argument("--https-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--edge-listen", metavar="HOST:PORT", help="serve devices MQTT and SSH on "
                   "this one TLS port (e.g. 0.0.0.0:443; not the --https-listen port; "
                   "\"\": off; default: off, or what the last run set)")
    p.add_argument("--edge-public", metavar="HOST:PORT", help="HOST:PORT device tokens "
                   "name for the edge (default ADVERTISE and the --edge-listen port)")
    p.add_argument("--broker-auth", choices=("files", "dynsec"), help="device credentials "
                   "in Mosquitto's dynamic-security plugin (O(1) per change) or in "
                   "password/ACL files (default: dynsec on a fresh install, else kept)")
    p.add_argument("--package-changed", action="store_true",
                   help="the package was just installed or upgraded: reload and restart")
    p.add_argument("--no-start", action="store_true", help="configure but start nothing")
    p.add_argument("--json", action="store_true", help="end with a machine-readable line")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("dpanel-configure: must run as root", file=sys.stderr)
        return 2
    opts = Options(public_host=args.public_host, tunnel_public=args.tunnel_public,
                   broker_public=args.broker_public, https_listen=args.https_listen,
                   https_cert=args.https_cert, https_key=args.https_key,
                   edge_listen=args.edge_listen, edge_public=args.edge_public,
                   broker_auth=args.broker_auth,
                   package_changed=args.package_changed,
                   start=not args.no_start)
    report = configure(opts)
    info = enrolment(Layout())
    if not report.changes:
        print("  nothing changed", flush=True)
    if args.json:
        digest = hashlib.sha256(json.dumps(report.changes).encode()).hexdigest()[:12]
        print(format_result({"changes": report.changes, "digest": digest,
                             "enrolment": info}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
