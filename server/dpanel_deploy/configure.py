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
from typing import Callable, Literal, Optional, Sequence

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


@dataclass
class Options:
    public_host: Optional[str] = None
    tunnel_public: Optional[str] = None  # HOST:PORT devices dial (default ADVERTISE:2220)
    broker_public: Optional[str] = None  # HOST:PORT devices dial (default ADVERTISE:8883)
    #: the API's HTTPS listener for operators (manager.https_listen): None keeps what the
    #: file has (default: off), "" turns it off
    https_listen: Optional[str] = None
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
DPANEL = ("dpanel-tunnel", "dpanel-manager")
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
}


def _ensure_tls(layout: Layout, broker_host: str, report: Report) -> None:
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
    for ch in changes:
        detail = " (broker CA)" if ch.path.name == "ca.crt" else (
            f" ({ch.reason})" if ch.reason else "")
        report.note(ch.what, f"{ch.path}{detail}",
                    BROKER + DPANEL if ch.path.name == "ca.crt" else BROKER)
    for name, (owner, mode) in TLS_OWNERS.items():
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
    try:
        cfg.validate()
    except ConfigError as exc:
        why = str(exc).replace("manager.https_listen", "--https-listen")
        raise SystemExit(f"dpanel-configure: {why}") from None
    text = dump_config(cfg).split("\n", 1)[1]
    return ("# dPanel Edge server configuration, written by dpanel-configure.\n"
            "# Re-running it (invoke deploy-server) rewrites this file; change the public\n"
            "# addresses with --advertise / --tunnel-public / --broker-public; [registry]\n"
            "# url and tunnel.metrics_listen are kept as you set them.\n" + text)


def render_mosquitto_conf(layout: Layout) -> str:
    """Plain MQTT on loopback for the manager, TLS on 8883 for devices (the shared
    renderer, :func:`dpanel_server.broker.render_mosquitto_conf`, with the appliance's
    listeners)."""
    from dpanel_server.broker import render_mosquitto_conf as render

    return render(
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


def _systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=check)


def _journal_tail(unit: str) -> str:
    out = subprocess.run(["journalctl", "-u", unit, "-n", "25", "--no-pager", "-o", "cat"],
                         capture_output=True, text=True)
    return out.stdout


def _ensure_services(opts: Options, report: Report) -> None:
    if not Path("/run/systemd/system").is_dir():
        raise SystemExit("dpanel-configure: systemd is not running on this host")
    if opts.package_changed:
        _systemctl("daemon-reload")
    for unit in UNITS:
        if _systemctl("is-enabled", "--quiet", unit, check=False).returncode != 0:
            _systemctl("enable", "--quiet", unit)
            report.note("enabled", unit)
    if not opts.start:
        return
    for unit in UNITS:
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
    }


# ---------------------------------------------------------------------------- main


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
    config_text = _desired_config(layout, opts)
    ensure_content(layout.config, config_text.encode(), ("root", "dpanel"), 0o640, report,
                   DPANEL)
    from dpanel_server.config import load_config

    broker_host = load_config(layout.config).broker.public_url.split("://", 1)[1]
    broker_host = _split_hostport(broker_host, "broker.public_url", BROKER_TLS_PORT)[0]
    _ensure_tls(layout, broker_host, report)
    ensure_content(layout.mosquitto_conf, render_mosquitto_conf(layout).encode(),
                   ("root", "mosquitto"), 0o640, report, BROKER)
    _ensure_broker_files(layout, report)
    _ensure_services(opts, report)
    return report


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
