"""The server appliance, checked with testinfra on a real booted Debian 12 host.

By default this boots a throwaway Debian 12 guest, deploys onto it with the real
``deploy-server`` code and checks it. Against your own deployed server::

    .venv/bin/python -m pytest tests/system/test_appliance.py --hosts=ssh://root@SERVER

(add DPANEL_APPLIANCE_DISRUPTIVE=1 to also kill services and reboot it; those tests
carry the ``destructive`` marker, so ``-m 'not destructive'`` leaves them out). No test
depends on the order: a refused deploy must leave the host as it was, deployed or not,
and the ``tls_port_squatter`` fixture takes port 8883 from whoever has it (our own broker
included, restarted afterwards).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from appliance_fixtures import (
    Appliance,
    Device,
    disruptive_ok,
    enrol,
    repack,
    wait_online,
    wait_until,
)
from appliance_vm import Guest
from paho.mqtt.enums import CallbackAPIVersion

from dpanel_deploy.deploy import deploy
from dpanel_deploy.target import DeployError, SshTarget
from support import free_port

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.root, pytest.mark.timeout(1200)]

SERVICES = ["mosquitto.service", "dpanel-tunnel.service", "dpanel-manager.service"]
EDGE = "dpanel-edge.service"
OUR_UNITS = ["dpanel-tunnel.service", "dpanel-manager.service", "dpanel-broker-reload.path",
             "dpanel-broker-reload.service", EDGE]
#: CAP_NET_BIND_SERVICE in /proc/PID/status's CapEff bit mask
CAP_NET_BIND_SERVICE = 1 << 10
#: systemd-analyze security "exposure" (0 = locked down, 10 = none). Ours score ~1;
#: Debian's stock units score 9.6 (mosquitto) and 9.6 (sshd).
MAX_EXPOSURE = 2.0
#: the unprivileged operator (nobody:nogroup on Debian)
NOBODY = 65534
#: paho's name for CONNACK 5 (MQTT 3.1.1) / 135 (MQTT 5)
NOT_AUTHORIZED = "Not authorized"


def _untouched(guest: Guest) -> str:
    """What a refused deploy must not have created."""
    return guest.ssh("ls -d /opt/dpanel /etc/dpanel /var/lib/dpanel /var/cache/dpanel "
                     "2>/dev/null; dpkg-query -W -f='${Status}' dpanel-server mosquitto "
                     "2>/dev/null; true").stdout


# ---------------------------------------------------------------------------- refusals


def test_deploy_refuses_an_unreachable_host() -> None:
    port = free_port()  # nothing listens there
    target = SshTarget(f"ssh://root@127.0.0.1:{port}", connect_timeout=5)
    try:
        with pytest.raises(DeployError, match=r"cannot reach ssh://root@127\.0\.0\.1"):
            deploy(target, tunnel_public="127.0.0.1:2220")
    finally:
        target.close()


def test_deploy_refuses_a_host_that_is_not_debian_12(fresh_guest: Guest) -> None:
    before = _untouched(fresh_guest)
    fresh_guest.ssh("printf 'ID=alpine\\nVERSION_ID=3.19\\nPRETTY_NAME=\"Alpine Linux v3.19\"\\n'"
                    " > /run/fake-os-release && mount --bind /run/fake-os-release "
                    "/etc/os-release")
    target = SshTarget(fresh_guest.alias, ssh_config=str(fresh_guest.ssh_config))
    try:
        with pytest.raises(DeployError, match=r"runs Alpine Linux v3\.19; .* Debian 12"):
            deploy(target, tunnel_public="127.0.0.1:2220")
    finally:
        target.close()
        fresh_guest.ssh("umount /etc/os-release")
    assert _untouched(fresh_guest) == before


def test_deploy_refuses_a_taken_port(tls_port_squatter: Guest) -> None:
    fresh_guest = tls_port_squatter
    before = _untouched(fresh_guest)
    target = SshTarget(fresh_guest.alias, ssh_config=str(fresh_guest.ssh_config))
    try:
        with pytest.raises(DeployError, match=r"(?s)nothing was changed.*port 8883 "
                           r"\(MQTT over TLS\) is already in use on 0\.0\.0\.0"):
            deploy(target, tunnel_public="127.0.0.1:2220")
    finally:
        target.close()
    assert _untouched(fresh_guest) == before


# ---------------------------------------------------------------------------- deploy


def test_second_deploy_changes_nothing(appliance: Appliance) -> None:
    if appliance.operator_mode:
        pytest.skip("deploys only onto the test guest")
    assert appliance.deploys[0].package_changed and appliance.deploys[0].changes, (
        "the first deploy installed nothing?")
    first = appliance.deploys[-1]  # the latest: a refusal test may have redeployed
    pids = {u: appliance.main_pid(u) for u in _services(appliance)}
    keys = appliance.key_digests()
    second = appliance.deploy()  # no options: HTTPS, the edge and dynsec are kept
    appliance.timings["second_deploy_s"] = second.seconds
    assert not second.changed, f"second run changed {second.changes}"
    assert {u: appliance.main_pid(u) for u in _services(appliance)} == pids, (
        "a service was restarted")
    assert appliance.key_digests() == keys
    assert second.enrolment == first.enrolment


def _edge_on(app: Appliance) -> bool:
    return app.edge_public is not None


def _port(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])


def _guest_port(app: Appliance, what: str) -> int | None:
    """The port a listener of server.toml binds on the server (not the forwarded one)."""
    import tomllib

    conf = tomllib.loads(app.check("cat /etc/dpanel/server.toml"))
    value = conf["manager"].get("https_listen") if what == "https" else (
        conf.get("edge", {}).get("listen"))
    return _port(value) if value else None


def _services(app: Appliance) -> list[str]:
    return [*SERVICES, *([EDGE] if _edge_on(app) else [])]


@pytest.mark.parametrize("unit", [*SERVICES, "dpanel-broker-reload.path", EDGE])
def test_services_enabled_and_running(appliance: Appliance, unit: str) -> None:
    if unit == EDGE and not _edge_on(appliance):
        pytest.skip("the edge is off on this server")
    svc = appliance.host.service(unit)
    assert svc.is_enabled
    assert svc.is_running


def test_systemd_analyze_verify_is_clean(appliance: Appliance) -> None:
    res = appliance.run("systemd-analyze verify " + " ".join(OUR_UNITS))
    assert res.rc == 0 and not res.stderr.strip(), res.stderr
    # Debian's own unit names man pages; whether man-db is installed is not our business
    res = appliance.run("systemd-analyze verify --man=no mosquitto.service")
    assert res.rc == 0 and not res.stderr.strip(), res.stderr


def test_systemd_analyze_security_scores(appliance: Appliance) -> None:
    scores = {}
    for unit in [*_services(appliance), "dpanel-broker-reload.service"]:
        out = appliance.check(f"systemd-analyze security --no-pager {unit} | tail -1")
        m = re.search(r"exposure level for \S+: ([\d.]+) (\w+)", out)
        assert m, out
        scores[unit] = (float(m.group(1)), m.group(2))
    print("systemd-analyze security:", json.dumps(scores))
    appliance.timings.update({f"exposure {u}": s for u, (s, _) in scores.items()})
    worst = {u: s for u, (s, _) in scores.items() if s > MAX_EXPOSURE}
    assert not worst, f"units above exposure {MAX_EXPOSURE}: {worst}"


def test_dpanel_user(appliance: Appliance) -> None:
    user = appliance.host.user("dpanel")
    assert user.exists
    assert user.uid < 1000, "not a system user"
    assert user.shell in ("/usr/sbin/nologin", "/bin/false")
    assert user.home == "/var/lib/dpanel"
    assert appliance.host.group("dpanel").exists


@pytest.mark.parametrize("unit,user", [("dpanel-tunnel.service", "dpanel"),
                                       ("dpanel-manager.service", "dpanel"),
                                       ("mosquitto.service", "mosquitto"),
                                       (EDGE, "dpanel")])
def test_no_service_runs_as_root(appliance: Appliance, unit: str, user: str) -> None:
    """No root, and no capability but CAP_NET_BIND_SERVICE where a listener is below
    port 1024 (operators' HTTPS on 443 in the manager; the edge's, were it on 443)."""
    if unit == EDGE and not _edge_on(appliance):
        pytest.skip("the edge is off on this server")
    port = _guest_port(appliance, "https" if unit == "dpanel-manager.service" else "edge"
                       ) if unit in ("dpanel-manager.service", EDGE) else None
    want_caps = CAP_NET_BIND_SERVICE if port is not None and port < 1024 else 0
    cgroup = appliance.check(f"systemctl show -p ControlGroup --value {unit}").strip()
    pids = appliance.check(f"cat /sys/fs/cgroup{cgroup}/cgroup.procs").split()
    assert pids, f"{unit} has no processes"
    for pid in pids:
        status = appliance.check(f"cat /proc/{pid}/status")
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        assert uids and all(u != "0" for u in uids.group(1).split()), f"{unit} pid {pid}: {uids}"
        caps = re.search(r"^CapEff:\s+(\w+)$", status, re.M)
        assert caps and int(caps.group(1), 16) == want_caps, (
            f"{unit} pid {pid} has capabilities {caps.group(1) if caps else '?'}, "
            f"want {want_caps:#x}")
        bound = re.search(r"^CapBnd:\s+(\w+)$", status, re.M)
        assert bound and int(bound.group(1), 16) == want_caps, f"{unit} pid {pid}: {bound}"
    owner = appliance.check(f"ps -o user= -p {pids[0]}").strip()
    assert owner == user


@pytest.mark.parametrize("path,user,group,mode", [
    ("/etc/dpanel/keys", "dpanel", "dpanel", 0o700),
    ("/etc/dpanel/keys/tunnel_host_key", "dpanel", "dpanel", 0o600),
    ("/etc/dpanel/keys/manager_key", "dpanel", "dpanel", 0o600),
    ("/etc/dpanel/admin.token", "dpanel", "dpanel", 0o600),
    ("/etc/dpanel/broker-manager.secret", "dpanel", "dpanel", 0o600),
    ("/etc/dpanel/tls/ca.key", "dpanel", "dpanel", 0o600),
    ("/etc/dpanel/tls/server.key", "mosquitto", "mosquitto", 0o600),
    ("/etc/dpanel/tls/ca.crt", "root", "root", 0o644),
    ("/etc/dpanel/server.toml", "root", "dpanel", 0o640),
    ("/etc/dpanel/mosquitto.conf", "root", "mosquitto", 0o640),
    ("/var/lib/dpanel", "dpanel", "mosquitto", 0o710),
    ("/var/lib/dpanel/mosquitto", "dpanel", "mosquitto", 0o2750),
    ("/var/lib/dpanel/mosquitto/passwd", "dpanel", "mosquitto", 0o640),
    ("/var/lib/dpanel/mosquitto/acl", "dpanel", "mosquitto", 0o640),
])
def test_file_modes_and_owners(appliance: Appliance, path: str, user: str, group: str,
                               mode: int) -> None:
    f = appliance.host.file(path)
    assert f.exists
    assert (f.user, f.group, oct(f.mode)) == (user, group, oct(mode))


@pytest.mark.parametrize("path,user,group,mode", [
    ("/etc/dpanel/tls/edge.key", "dpanel", "dpanel", 0o600),
    ("/var/lib/dpanel/https", "dpanel", "dpanel", 0o700),
    ("/var/lib/dpanel/https/ca.key", "dpanel", "dpanel", 0o600),
    ("/var/lib/dpanel/https/server.key", "dpanel", "dpanel", 0o600),
    ("/var/lib/dpanel/dynsec", "mosquitto", "mosquitto", 0o700),
    ("/var/lib/dpanel/dynsec/dynamic-security.json", "mosquitto", "mosquitto", 0o600),
])
def test_file_modes_of_the_optional_parts(appliance: Appliance, path: str, user: str,
                                          group: str, mode: int) -> None:
    f = appliance.host.file(path)
    if not f.exists and appliance.operator_mode:
        pytest.skip(f"{path}: that part is off on this server")
    assert f.exists
    assert (f.user, f.group, oct(f.mode)) == (user, group, oct(mode))


def test_registry_is_private(appliance: Appliance) -> None:
    f = appliance.host.file("/var/lib/dpanel/registry.db")
    assert f.user == "dpanel"
    assert f.mode & 0o077 == 0, oct(f.mode)


def _listeners(app: Appliance) -> list[tuple[str, int, str, str]]:
    """(proto, port, address, process) for every listening socket on the host."""
    out = []
    for line in app.check("ss -Hlntup").splitlines():
        cols = line.split()
        local = cols[4]
        addr, _, port = local.rpartition(":")
        proc = re.search(r'\(\("([^"]+)"', line)
        out.append((cols[0], int(port), addr.strip("[]").split("%")[0],
                    proc.group(1) if proc else "?"))
    return out


def _public(addr: str) -> bool:
    return addr not in ("127.0.0.1", "::1") and not addr.startswith("127.")


def test_only_tunnel_and_broker_listen_publicly(appliance: Appliance) -> None:
    """... and operators' HTTPS and the device edge, where configured (the test guest:
    443 and 8443)."""
    socks = _listeners(appliance)
    ours = [s for s in socks if s[3] in ("dpanel", "mosquitto")]
    public = {(proto, port) for proto, port, addr, _ in ours if _public(addr)}
    optional = {("tcp", p) for p in (_guest_port(appliance, "https"),
                                      _guest_port(appliance, "edge")) if p is not None}
    assert public == {("tcp", 2220), ("tcp", 8883)} | optional, ours
    loop = {port for proto, port, addr, _ in ours if not _public(addr)}
    assert {1883, 8780} <= loop, ours
    if not appliance.operator_mode:  # our guest runs nothing else but sshd
        others = {(proto, port, proc) for proto, port, addr, proc in socks
                  if proto == "tcp" and _public(addr) and proc not in ("dpanel", "mosquitto")}
        assert others <= {("tcp", 22, "sshd")}, others


def _mqtt_connect(host: str, port: int, ca: Path | None, user: str | None = None,
                  password: str | None = None) -> Any:
    """The CONNACK reason code the broker gives (None if nothing came back)."""
    done = threading.Event()
    result: list[Any] = [None]

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result[0] = reason
        done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user or "anon-probe")
    client.on_connect = on_connect
    if ca is not None:
        client.tls_set(ca_certs=str(ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if user is not None:
        client.username_pw_set(user, password)
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        done.wait(60)
    finally:
        client.disconnect()
        client.loop_stop()
    return result[0]


def test_mosquitto_refuses_anonymous_clients(appliance: Appliance, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text(appliance.check("cat /etc/dpanel/tls/ca.crt"))
    host, _, port = appliance.broker_public.rpartition(":")
    anon = _mqtt_connect(host, int(port), ca)
    assert str(anon) == NOT_AUTHORIZED, anon
    wrong = _mqtt_connect(host, int(port), ca, "appl-nobody", "x" * 43)
    assert str(wrong) == NOT_AUTHORIZED, wrong
    # the loopback listener refuses anonymous clients too
    probe = (
        "import paho.mqtt.client as m, threading\n"
        "e = threading.Event(); r = []\n"
        "c = m.Client(m.CallbackAPIVersion.VERSION2)\n"
        "c.on_connect = lambda *a: (r.append(str(a[3])), e.set())\n"
        "c.connect('127.0.0.1', 1883); c.loop_start(); e.wait(30); print(r)\n")
    out = appliance.check(f"/opt/dpanel/bin/python -c {shlex.quote(probe)}")
    assert out.strip() == repr([NOT_AUTHORIZED]), out


def test_enrol_and_revoke_reach_the_broker(appliance: Appliance, tmp_path: Path) -> None:
    """Enrol/revoke rewrite the broker's files and dpanel-broker-reload.path has Mosquitto
    re-read them: a new device's credentials start working, a revoked one's stop."""
    dynsec = appliance.broker_auth == "dynsec"
    files = "/var/lib/dpanel/mosquitto/passwd /var/lib/dpanel/mosquitto/acl"
    stamp = f"stat -c '%n %i %Y %s' {files}"
    before = appliance.check(stamp)
    broker_pid = appliance.main_pid("mosquitto.service")
    dev = enrol(appliance, "appl-probe", tmp_path)
    host, _, port = appliance.broker_public.rpartition(":")
    ca = tmp_path / "ca.crt"
    ca.write_text(appliance.check("cat /etc/dpanel/tls/ca.crt"))

    def connack() -> Any:
        return _mqtt_connect(host, int(port), ca, dev.name, dev.token.secret)

    try:
        accepted = wait_until("the broker to accept the new device",
                              lambda: (r := connack()) is not None and not r.is_failure and r,
                              timeout=60)
        assert not accepted.is_failure
    finally:
        assert appliance.dpanel("device", "revoke", dev.name).rc == 0
    refused = wait_until("the broker to refuse the revoked device",
                         lambda: (r := connack()) is not None and r.is_failure and r,
                         timeout=60)
    assert str(refused) == NOT_AUTHORIZED
    if dynsec:
        # O(1) over $CONTROL: the files were not rewritten, the broker not restarted,
        # and the device is in the plugin's own state, disabled
        assert "plugin " in appliance.check("cat /etc/dpanel/mosquitto.conf")
        assert appliance.check(stamp) == before, "dynsec mode rewrote the broker files"
        assert appliance.main_pid("mosquitto.service") == broker_pid
        state = json.loads(appliance.check(
            "cat /var/lib/dpanel/dynsec/dynamic-security.json"))
        client = [c for c in state["clients"] if c.get("username") == dev.name]
        assert client and client[0].get("disabled") is True, client


def test_round_trip_exec_on_a_device(appliance: Appliance, device: Device) -> None:
    res = appliance.dpanel("exec", device.name, "--", "sh", "-c",
                           "echo hello from $(uname -s); exit 3")
    assert res.stdout.strip() == "hello from Linux", res.stderr
    assert res.rc == 3, "the device's exit code must come through"


def test_tunnel_ports_listen_on_loopback_only(appliance: Appliance, device: Device) -> None:
    res = appliance.dpanel("tunnel", "open", device.name)
    assert res.rc == 0, res.stderr
    port = wait_until("the device's tunnel port",
                      lambda: appliance.devices()[device.name].get("port"), timeout=120)
    socks = [s for s in _listeners(appliance) if s[1] == int(port)]
    assert socks, f"tunnel port {port} is not listening"
    assert all(not _public(addr) for _, _, addr, _ in socks), socks


# ---------------------------------------------------------------------------- operators, edge


def _https(app: Appliance) -> tuple[str, int]:
    if app.https_public is None:
        pytest.skip("operators' HTTPS is off on this server")
    if app.https_ca is None:
        pytest.skip("the server has an operator-supplied certificate (its CA is yours)")
    host, _, port = app.https_public.rpartition(":")
    return host, int(port)


def test_https_listener_verifies_against_the_operators_ca(appliance: Appliance,
                                                          tmp_path: Path) -> None:
    """The HTTPS port: its chain verifies against the CA handed to operators (the same
    as the manager's own), it speaks TLS only (no plain HTTP answer on it), and it is
    the whole API."""
    host, port = _https(appliance)
    assert appliance.https_ca is not None
    assert appliance.check("cat /var/lib/dpanel/https/ca.crt") == appliance.https_ca
    ctx = ssl.create_default_context(cadata=appliance.https_ca)
    with socket.create_connection((host, port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = _read_all(tls)
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    # another CA (the broker's, which devices pin) does not verify it
    other = ssl.create_default_context(cadata=appliance.check("cat /etc/dpanel/tls/ca.crt"))
    with socket.create_connection((host, port), timeout=30) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        other.wrap_socket(raw, server_hostname=host)
    # plain HTTP on the HTTPS port: no HTTP answer, whatever comes back
    with socket.create_connection((host, port), timeout=30) as raw:
        raw.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        plain = _read_all(raw)
    assert not plain.startswith(b"HTTP/"), plain[:200]


def _read_all(sock: Any) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (OSError, ssl.SSLError):
        pass
    return out


def test_operator_needs_no_root_and_no_server_file(appliance: Appliance, device: Device,
                                                   ) -> None:
    """An operator on another host (this machine: the guest's outside), as an unprivileged
    user whose HOME holds only the CA it was given, with the URL and a token: login,
    device list, exec, `dpanel ssh`, and plain ssh through the generated ProxyCommand,
    all through the HTTPS port."""
    host, port = _https(appliance)
    name = f"appl-op-{os.getpid()}"
    token = appliance.check(f"dpanel user add {name} --role operator --print-token").strip()
    top = Path(tempfile.mkdtemp(prefix="appl-operator-"))  # not under root's 0700 tmp
    home = top / "home"
    try:
        home.mkdir()
        (home / "ca.pem").write_text(str(appliance.https_ca))
        os.chown(home, NOBODY, NOBODY)
        os.chown(home / "ca.pem", NOBODY, NOBODY)
        env = {"HOME": str(home), "PATH": f"{_operator_cli(top)}:/usr/bin:/bin",
               "LANG": "C.UTF-8"}

        def op(*argv: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv],
                input=input, capture_output=True, timeout=240, cwd=home,
                stdin=None if input is not None else subprocess.DEVNULL)

        def ok(*argv: str, input: bytes | None = None) -> bytes:
            res = op(*argv, input=input)
            assert res.returncode == 0, (argv, res)
            return res.stdout

        assert op("id", "-u").stdout.strip() == str(NOBODY).encode()
        ok("dpanel", "login", f"https://{host}:{port}", "--token", token,
           "--ca-file", str(home / "ca.pem"))
        assert json.loads(ok("dpanel", "whoami", "--json"))["name"] == name
        assert device.name in ok("dpanel", "device", "list").decode()
        res = op("dpanel", "exec", "-i", device.name, "--", "sh", "-c", "tr a-z A-Z; exit 5",
                 input=b"from an operator\n")
        assert (res.returncode, res.stdout) == (5, b"FROM AN OPERATOR\n"), res
        # `dpanel ssh` with a PTY (-tt: the test has no terminal of its own)
        res = op("dpanel", "ssh", "-tt", device.name, input=b"echo ssh-$((6*7)); exit 3\n")
        assert res.returncode == 3 and b"ssh-42" in res.stdout, res
        conf = home / "ssh_config"
        conf.write_bytes(ok("dpanel", "ssh-config"))
        assert b"Linux" in ok("ssh", "-F", str(conf), "-o", "BatchMode=yes", device.name,
                              "uname -s")
        # what it holds: its login file, its own key (and certificate), the CA it was given
        held = {p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()}
        assert not any(h.endswith((".toml", ".token")) and "config/dpanel" not in h
                       for h in held), held
    finally:
        shutil.rmtree(top, ignore_errors=True)
        appliance.dpanel("user", "revoke", name)


def _operator_cli(top: Path) -> Path:
    """A bin directory with a `dpanel` that an unprivileged user can run: the test venv's
    interpreter may live under root's 0700 home, so this is Debian's python3 (3.11, the
    same ABI) with the test venv's site-packages, which are world-readable."""
    venv = top / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    dev_site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    (site / "dpanel-dev.pth").write_text(f"import site; site.addsitedir({str(dev_site)!r})\n")
    script = venv / "bin" / "dpanel"
    script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\n"
                      "from dpanel_server.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    top.chmod(0o755)
    subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
    return venv / "bin"


def test_device_with_an_edge_token_comes_online_through_the_edge(
        appliance: Appliance, tmp_path: Path) -> None:
    """Tokens issued once the edge is on name it; the agent then speaks MQTT and SSH
    inside TLS to that one port (ALPN), and the device is online and reachable."""
    if appliance.edge_public is None:
        pytest.skip("the edge is off on this server")
    dev = enrol(appliance, f"appl-edge-{os.getpid()}", tmp_path)
    assert dev.token.edge == appliance.edge_public
    dev.start()
    try:
        wait_online(appliance, dev.name)
        log = dev.log.read_text()
        assert f"broker {appliance.edge_public} (edge, ALPN dpanel-mqtt)" in log, log[-2000:]
        edge_port = _guest_port(appliance, "edge")
        # the server end: the device's MQTT is a connection into the edge's port
        conns = appliance.check(f"ss -Htn state established '( sport = :{edge_port} )'")
        assert conns.strip(), "no connection on the edge port"
        res = appliance.dpanel("exec", dev.name, "--", "sh", "-c", "echo via-edge; exit 4")
        assert (res.rc, res.stdout.strip()) == (4, "via-edge"), res.stderr
        # ... and its tunnel (open now, for the exec) is a second one there (ALPN dpanel-ssh)
        conns = appliance.check(f"ss -Htn state established '( sport = :{edge_port} )'")
        assert len(conns.strip().splitlines()) >= 2, conns
    finally:
        dev.stop()
        appliance.dpanel("device", "revoke", dev.name)


# ---------------------------------------------------------------------------- faults


@pytest.mark.destructive
@pytest.mark.parametrize("unit", ["dpanel-tunnel.service", "dpanel-manager.service",
                                  "mosquitto.service"])
def test_killed_service_is_restarted_and_device_returns(appliance: Appliance, device: Device,
                                                        unit: str) -> None:
    disruptive_ok(appliance)
    old = appliance.main_pid(unit)
    assert old > 0
    appliance.check(f"kill -KILL {old}")
    new = wait_until(f"systemd to restart {unit}", lambda: (
        p := appliance.main_pid(unit)) not in (0, old) and appliance.host.service(unit)
        .is_running and p, timeout=120)
    assert new != old
    wait_online(appliance, device.name)
    res = wait_until("exec after the restart", lambda: (
        r := appliance.dpanel("exec", device.name, "--", "echo", "back")).rc == 0 and r,
        timeout=180, interval=5)
    assert res.stdout.strip() == "back"


def test_upgrade_keeps_registry_and_keys(appliance: Appliance, device: Device) -> None:
    if appliance.operator_mode:
        pytest.skip("deploys only onto the test guest")
    keys = appliance.key_digests()
    before = set(appliance.devices())
    assert appliance.deb is not None
    newer = repack(appliance.deb, "upgradetest", appliance.workdir)
    result = appliance.deploy(newer)
    appliance.timings["upgrade_deploy_s"] = result.seconds
    assert result.package_changed
    installed = appliance.check("dpkg-query -W -f='${Version}' dpanel-server")
    assert installed == newer.version
    assert appliance.key_digests() == keys
    assert set(appliance.devices()) == before
    wait_online(appliance, device.name)
    assert appliance.dpanel("exec", device.name, "--", "true").rc == 0


@pytest.mark.destructive
def test_reboot_brings_everything_back(appliance: Appliance, device: Device) -> None:
    disruptive_ok(appliance)
    keys = appliance.key_digests()
    devices = appliance.devices()
    if appliance.guest is not None:
        took = appliance.guest.reboot()
        appliance.timings["reboot_s"] = took
    else:
        boot = appliance.check("cat /proc/sys/kernel/random/boot_id")
        appliance.run("systemctl reboot", timeout=10)
        wait_until("the server to come back", lambda: appliance.check(
            "cat /proc/sys/kernel/random/boot_id") != boot, timeout=600, interval=5)
    for unit in [*_services(appliance), "dpanel-broker-reload.path"]:
        wait_until(f"{unit} after the reboot", lambda u=unit: appliance.host.service(u)
                   .is_running, timeout=180)
    assert appliance.key_digests() == keys
    after = appliance.devices()
    assert set(after) == set(devices), "the registry lost devices"
    assert all(after[d]["revoked"] == devices[d]["revoked"] for d in devices)
    wait_online(appliance, device.name)
    res = wait_until("exec after the reboot", lambda: (
        r := appliance.dpanel("exec", device.name, "--", "echo", "rebooted")).rc == 0 and r,
        timeout=180, interval=5)
    assert res.stdout.strip() == "rebooted"


def test_journal_has_the_service_logs(appliance: Appliance) -> None:
    """Logs go to the journal (the units have no log files of their own)."""
    out = appliance.check("journalctl -u dpanel-tunnel -u dpanel-manager --no-pager -o cat "
                          "| tail -300")
    assert "tunnel listening on" in out
    assert "manager API on" in out
