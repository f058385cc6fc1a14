"""Fixtures for the appliance suite: a deployed Debian 12 host, and a device agent on it.

Two modes:
- default: boot a throwaway Debian 12 guest (appliance_vm), deploy onto it with the real
  ``deploy-server`` code over ssh, and test it;
- operator: ``pytest tests/system/test_appliance.py --hosts=ssh://root@SERVER`` tests an
  already deployed server (nothing is deployed; the guest-only tests skip; restarts and
  reboot run only with DPANEL_APPLIANCE_DISRUPTIVE=1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import testinfra
from appliance_vm import EDGE_GUEST_PORT, HTTPS_GUEST_PORT, Guest, build_base_image, kvm_works

from dpanel_deploy.debpkg import DebBuild, build_deb
from dpanel_deploy.deploy import DeployResult, deploy
from dpanel_deploy.target import SshTarget
from dpanel_proto.token import DeviceToken, parse_token
from dpanel_proto.util import parse_hostport

__all__ = [
    "KEY_FILES",
    "Appliance",
    "Device",
    "appliance",
    "device",
    "disruptive_ok",
    "enrol",
    "fresh_guest",
    "repack",
    "tls_port_squatter",
    "wait_online",
    "wait_until",
]

#: Key material that must survive re-deploys, upgrades and reboots unchanged.
KEY_FILES = [
    "/etc/dpanel/keys/tunnel_host_key", "/etc/dpanel/keys/manager_key",
    "/etc/dpanel/admin.token", "/etc/dpanel/broker-manager.secret",
    "/etc/dpanel/tls/ca.key", "/etc/dpanel/tls/ca.crt",
]
#: ... and those of the optional parts, where they are on (the HTTPS CA operators pinned,
#: the edge's key)
OPTIONAL_KEY_FILES = ["/var/lib/dpanel/https/ca.key", "/var/lib/dpanel/https/ca.crt",
                      "/etc/dpanel/tls/edge.key"]
#: dpanel-configure options of the test guest's first deploy; later deploys give none
#: (re-runs keep them)
GUEST_CONFIGURE = ["--https-listen", f"0.0.0.0:{HTTPS_GUEST_PORT}",
                   "--edge-listen", f"0.0.0.0:{EDGE_GUEST_PORT}"]


def wait_until(what: str, fn: Any, timeout: float = 180, interval: float = 2) -> Any:
    """Poll ``fn`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # the host may be restarting; keep polling
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@dataclass
class Appliance:
    """A deployed server and how the test machine reaches it."""

    host: Any  # testinfra.host.Host
    tunnel_public: str  # what a device on this machine dials
    broker_public: str
    guest: Optional[Guest] = None
    #: HOST:PORT operators dial for HTTPS, and the edge devices dial (None: off)
    https_public: Optional[str] = None
    edge_public: Optional[str] = None
    #: the HTTPS CA operators pin (the hand-over's https-ca.crt), when it is our own
    https_ca: Optional[str] = None
    broker_auth: str = "files"
    deb: Optional[DebBuild] = None
    deploys: list[DeployResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="appl-")))

    @property
    def operator_mode(self) -> bool:
        return self.guest is None

    def run(self, command: str, timeout: float = 180) -> Any:
        # testinfra has no per-command timeout; `timeout` on the host bounds a wedged call
        return self.host.run(f"timeout {int(timeout)} sh -c {shlex.quote(command)}")

    def check(self, command: str, timeout: float = 180) -> str:
        res = self.run(command, timeout)
        assert res.rc == 0, f"{command!r} failed ({res.rc}): {res.stderr or res.stdout}"
        return str(res.stdout)

    def dpanel(self, *args: str, timeout: float = 180) -> Any:
        return self.run("dpanel " + " ".join(shlex.quote(a) for a in args), timeout)

    def devices(self) -> dict[str, dict[str, Any]]:
        out = self.check("dpanel device list --json")
        return {d["id"]: d for d in json.loads(out)}

    def key_digests(self) -> dict[str, str]:
        optional = [f for f in OPTIONAL_KEY_FILES if self.host.file(f).exists]
        out = self.check("sha256sum " + " ".join(KEY_FILES + optional))
        return {line.split()[1]: line.split()[0] for line in out.splitlines()}

    def main_pid(self, unit: str) -> int:
        return int(self.check(f"systemctl show -p MainPID --value {unit}").strip() or 0)

    def ssh_target(self) -> SshTarget:
        assert self.guest is not None
        return SshTarget(self.guest.alias, ssh_config=str(self.guest.ssh_config))

    def deploy(self, deb: Optional[DebBuild] = None,
               configure_args: tuple[str, ...] = ()) -> DeployResult:
        assert self.guest is not None, "deploys only run against the test guest"
        target = self.ssh_target()
        try:
            result = deploy(target, deb=deb or self.deb, tunnel_public=self.tunnel_public,
                            broker_public=self.broker_public, configure_args=configure_args)
        finally:
            target.close()
        self.deploys.append(result)
        self.deb = deb or self.deb  # what is installed now (a later deploy compares to it)
        return result


def repack(deb: DebBuild, suffix: str, workdir: Path) -> DebBuild:
    """The same package as a newer version with another build id: what an upgrade looks
    like to the server (dpkg replaces every file, services restart), without paying for
    a second build."""
    tree = workdir / f"repack-{suffix}"
    subprocess.run(["dpkg-deb", "-R", str(deb.path), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    version = f"{deb.version}.{suffix}"
    control.write_text(control.read_text().replace(f"Version: {deb.version}\n",
                                                   f"Version: {version}\n"))
    build_id = hashlib.sha256((deb.build_id + suffix).encode()).hexdigest()
    (tree / "opt/dpanel/BUILD-ID").write_text(build_id + "\n")
    out = workdir / deb.path.name.replace(deb.version, version)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zzstd", "--build", str(tree),
                    str(out)], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    return DebBuild(path=out, version=version, build_id=build_id)


def disruptive_ok(app: Appliance) -> None:
    if app.operator_mode and os.environ.get("DPANEL_APPLIANCE_DISRUPTIVE") != "1":
        pytest.skip("restarts/reboots a server: set DPANEL_APPLIANCE_DISRUPTIVE=1 to allow")


def _host(spec: str, controlpath: str, ssh_config: Optional[str] = None,
          identity: Optional[str] = None) -> Any:
    return testinfra.get_host(spec, ssh_config=ssh_config, ssh_identity_file=identity,
                              controlpath=controlpath)


@pytest.fixture(scope="module")  # the VM stops when its tests are done
def fresh_guest(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """A booted, not yet deployed Debian 12 guest (default mode only)."""
    if request.config.getoption("hosts", None):
        pytest.skip("needs the test guest; --hosts points at an existing server")
    if os.geteuid() != 0:
        pytest.skip("building the guest image needs root (mmdebstrap)")
    t0 = time.monotonic()
    image = build_base_image()
    t_image = time.monotonic() - t0
    guest = Guest(image, tmp_path_factory.mktemp("guest"), kvm=kvm_works(image))
    guest.start()
    try:
        boot = guest.wait_ssh()
        guest.timings.update(base_image_s=t_image, first_boot_s=boot)
        print(f"appliance guest up in {boot:.0f} s ({'KVM' if guest.kvm else 'TCG'})")
        yield guest
    finally:
        guest.stop()


@pytest.fixture
def tls_port_squatter(fresh_guest: Guest) -> Iterator[Guest]:
    """The guest with something that is not Mosquitto listening on 0.0.0.0:8883, whether
    or not it was deployed before (our own broker is stopped meanwhile and started again
    afterwards), so that the refusal test does not depend on running first."""
    ours = fresh_guest.ssh("systemctl is-active --quiet mosquitto", check=False).returncode == 0
    if ours:
        fresh_guest.ssh("systemctl stop mosquitto")
    fresh_guest.ssh("systemd-run --unit=squatter -p Type=exec python3 -m http.server "
                    "--bind 0.0.0.0 8883")
    try:
        wait_until("the squatter on 8883", lambda: ":8883 " in fresh_guest.ssh(
            "ss -Hltn").stdout, timeout=60, interval=1)
        yield fresh_guest
    finally:
        fresh_guest.ssh("systemctl stop squatter", check=False)
        if ours:
            fresh_guest.ssh("systemctl start mosquitto")


@pytest.fixture(scope="module")  # the VM stops when its tests are done
def appliance(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[Appliance]:
    """A deployed server: the test guest after ``deploy-server``, or --hosts."""
    hosts = request.config.getoption("hosts", None)
    ctl = str(tmp_path_factory.mktemp("ssh") / "cm")
    if hosts:
        spec = str(hosts).split(",")[0].strip()
        host = _host(spec, ctl, request.config.getoption("ssh_config", None),
                     request.config.getoption("ssh_identity_file", None))
        cfg = host.run("cat /etc/dpanel/server.toml")
        if cfg.rc != 0:
            pytest.fail(f"{hosts}: no /etc/dpanel/server.toml; deploy it first "
                        "(invoke deploy-server --host root@SERVER)")
        import tomllib

        conf = tomllib.loads(cfg.stdout)
        app = Appliance(host=host, tunnel_public=conf["tunnel"]["public_address"],
                        broker_public=conf["broker"]["public_url"].split("://", 1)[1],
                        broker_auth=conf["broker"].get("auth", "files"),
                        edge_public=conf.get("edge", {}).get("public_address")
                        if conf.get("edge", {}).get("listen") else None)
        https = conf["manager"].get("https_listen")
        if https:
            server = parse_hostport(app.tunnel_public, "tunnel", 2220)[0]
            app.https_public = f"{server}:{parse_hostport(https, 'https', 443)[1]}"
            if not conf["manager"].get("https_cert"):
                app.https_ca = host.run("cat /var/lib/dpanel/https/ca.crt").stdout
        yield app
        subprocess.run(["ssh", "-o", f"ControlPath={ctl}", "-O", "exit", "x"],
                       capture_output=True)
        return
    guest: Guest = request.getfixturevalue("fresh_guest")
    t0 = time.monotonic()
    deb = build_deb()
    t_deb = time.monotonic() - t0
    app = Appliance(host=_host(f"ssh://{guest.alias}", ctl, str(guest.ssh_config)),
                    tunnel_public=f"127.0.0.1:{guest.tunnel_port}",
                    broker_public=f"127.0.0.1:{guest.broker_port}", guest=guest, deb=deb,
                    https_public=f"127.0.0.1:{guest.https_port}",
                    edge_public=f"127.0.0.1:{guest.edge_port}")
    first = app.deploy(configure_args=(*GUEST_CONFIGURE, "--edge-public",
                                       str(app.edge_public)))
    app.https_ca = first.enrolment.get("https_ca")
    app.broker_auth = first.enrolment.get("broker_auth", "files")
    app.timings.update(guest.timings)
    app.timings.update(build_deb_s=t_deb, first_deploy_s=first.seconds,
                       first_configure_s=first.configure_seconds)
    yield app
    summary = tmp_path_factory.getbasetemp() / "appliance-timings.json"
    summary.write_text(json.dumps(app.timings, indent=2))
    print(f"appliance timings: {json.dumps({k: round(v, 1) for k, v in app.timings.items()})}")


@dataclass
class Device:
    name: str
    token: DeviceToken
    token_file: Path
    state_dir: Path
    log: Path
    proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dpanel_agent", "--token-file", str(self.token_file),
             "--state-dir", str(self.state_dir), "--log-level", "info"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def enrol(app: Appliance, name: str, workdir: Path, plain: bool = False) -> Device:
    """``plain``: the device dials the broker and tunnel ports, not the edge its token
    names (what an agent from before the edge does), so both paths stay covered."""
    res = app.dpanel("device", "add", name, "--print-token")
    assert res.rc == 0, f"dpanel device add {name} failed: {res.stderr}"
    text = res.stdout.strip()
    if plain:
        text = dataclasses.replace(parse_token(text), edge=None).encode()
    workdir.mkdir(parents=True, exist_ok=True)
    token_file = workdir / "token"
    token_file.write_text(text + "\n")
    token_file.chmod(0o600)
    return Device(name=name, token=parse_token(text), token_file=token_file,
                  state_dir=workdir / "state", log=workdir / "agent.log")


def wait_online(app: Appliance, name: str, timeout: float = 240) -> dict[str, Any]:
    return dict(wait_until(f"{name} online", lambda: (d := app.devices().get(name))
                           and d["online"] and d, timeout))


@pytest.fixture(scope="module")  # the VM stops when its tests are done
def device(appliance: Appliance, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Device]:
    """A device agent on this machine, enrolled on the appliance and online."""
    suffix = hashlib.sha256(os.urandom(8)).hexdigest()[:6]
    dev = enrol(appliance, f"appl-test-{suffix}", tmp_path_factory.mktemp("device"),
                plain=True)
    dev.start()
    try:
        wait_online(appliance, dev.name)
        yield dev
    finally:
        dev.stop()
        appliance.dpanel("device", "revoke", dev.name)
