"""An operator's laptop that can reach only the manager's HTTPS port, and holds no server file.

Topology: the stack on the host serves HTTPS on a veth address; the laptop is a network
namespace whose nftables let nothing out but TCP to that address's port 443. Everything
an operator does goes through it: login, device list, exec with stdin and exit codes,
`dpanel ssh` under a PTY, and plain `ssh`, `scp`, `rsync`, Ansible and testinfra through
the block `dpanel ssh-config` writes. Then the audit holds each of them under the
operator's own name.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from test_fieldnet import Net, _subnets, net  # noqa: F401  (the fixture)

from dpanel_server.opssh import cert_info
from stackfix import BIN, Stack
from support import free_port, wait_for

pytestmark = [pytest.mark.root]


class Laptop:
    """Runs commands in the laptop netns, as a user whose HOME holds only what they made."""

    def __init__(self, ns: str, home: Path) -> None:
        self.ns, self.home = ns, home
        home.mkdir(parents=True)
        self.env = {"HOME": str(home), "PATH": f"{BIN}:/usr/bin:/bin",
                    "LANG": "C.UTF-8", "DPANEL_SSH_KEY": str(home / ".ssh" / "id_ed25519")}

    def run(self, *argv: str, input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ip", "netns", "exec", self.ns, "env", "-i",
                               *(f"{k}={v}" for k, v in self.env.items()), *argv],
                              input=input, capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def ok(self, *argv: str, input: bytes | None = None) -> bytes:
        out = self.run(*argv, input=input)
        assert out.returncode == 0, (argv, out)
        return out.stdout


def _tunnel_conns(port: int) -> int:
    """Established TCP connections into 127.0.0.1:port (the device's tunnel port)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, check=True, timeout=30).stdout
    return len([ln for ln in out.decode().splitlines() if ln.strip()])


def _child_named(pid: int, name: str) -> int | None:
    """A descendant of ``pid`` whose command is ``name`` (through ip netns exec / env)."""
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            try:
                if Path(f"/proc/{k}/comm").read_text().strip() == name:
                    return k
            except OSError:
                continue
            todo.append(k)
    return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def site(net: Net, tmp_path: Path) -> Iterator[tuple[Stack, Laptop, str]]:  # noqa: F811
    host_net, _ = _subnets()
    host_ip, laptop_ip = f"{host_net}1", f"{host_net}2"
    ns = net.ns("lap")
    net.veth(None, "lh", host_ip, ns, "eth0", laptop_ip)
    net.only_443_to(ns, host_ip)
    stack = Stack(dir=tmp_path / "stack", broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), extra=("--https-listen", f"{host_ip}:443"))
    stack.start()
    try:
        stack.start_agent(stack.enrol("kiosk-17"), tmp_path / "kiosk-17")
        stack.wait_online("kiosk-17")
        yield stack, Laptop(ns, tmp_path / "alice"), host_ip
    finally:
        stack.close()


def test_operator_laptop_over_https_only(site: tuple[Stack, Laptop, str],
                                         tmp_path: Path) -> None:
    stack, lap, host_ip = site
    token = stack.cli_ok("user", "add", "alice", "--role", "operator", "--print-token").strip()
    # what alice gets from the admin: the URL, her token and the CA (not a server file)
    ca = lap.home / "dpanel-ca.pem"
    shutil.copy(stack.dir / "ca.pem", ca)
    # the API's own port is not reachable from the laptop, only 443
    assert lap.run("python3", "-c", f"import socket; socket.create_connection(('{host_ip}', "
                   f"{stack.api_port}), timeout=3)").returncode != 0
    lap.ok("dpanel", "login", f"https://{host_ip}:443", "--token", token, "--ca-file", str(ca))
    assert json.loads(lap.ok("dpanel", "whoami", "--json"))["name"] == "alice"
    assert "kiosk-17" in lap.ok("dpanel", "device", "list").decode()
    # every command takes the login context, the job commands too
    assert json.loads(lap.ok("dpanel", "job", "list", "--json")) == []

    # exec: stdin in, output and the exit code out
    out = lap.run("dpanel", "exec", "-i", "kiosk-17", "--", "sh", "-c", "tr a-z A-Z; exit 5",
                  input=b"hello from the laptop\n")
    assert out.returncode == 5 and out.stdout == b"HELLO FROM THE LAPTOP\n", out

    # `dpanel ssh` with a PTY (-tt: the test has no terminal of its own)
    out = lap.run("dpanel", "ssh", "-tt", "kiosk-17", input=b"echo pty-$((6*7)); exit 3\n")
    assert out.returncode == 3 and b"pty-42" in out.stdout, out

    # plain OpenSSH tools through the generated block
    conf = lap.home / ".ssh" / "config"
    conf.write_bytes(lap.ok("dpanel", "ssh-config"))
    assert b"Linux" in lap.ok("ssh", "-F", str(conf), "-o", "BatchMode=yes", "kiosk-17",
                              "uname -s")
    src = lap.home / "payload.bin"
    src.write_bytes(os.urandom(300_000))
    dst = tmp_path / "kiosk-17" / "got.bin"
    lap.ok("scp", "-F", str(conf), "-o", "BatchMode=yes", str(src), f"kiosk-17:{dst}")
    assert dst.read_bytes() == src.read_bytes()
    rdst = tmp_path / "kiosk-17" / "rsynced.bin"
    lap.ok("rsync", "-e", f"ssh -F {conf} -o BatchMode=yes", str(src), f"kiosk-17:{rdst}")
    assert rdst.read_bytes() == src.read_bytes()

    inventory = lap.home / "hosts"
    inventory.write_text("kiosk-17\n")
    lap.env.update({"ANSIBLE_SSH_ARGS": f"-F {conf} -o BatchMode=yes",
                    "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_LOCAL_TEMP":
                    str(lap.home / ".ansible-tmp"), "ANSIBLE_PYTHON_INTERPRETER": "python3",
                    # ssh's ConnectTimeout (10 s) also bounds the banner exchange, which
                    # includes the ProxyCommand's start: generous on loaded CI cores
                    "ANSIBLE_TIMEOUT": "60"})
    ans = lap.ok(str(BIN / "ansible"), "all", "-i", str(inventory), "-m", "command",
                 "-a", "uname -s")
    assert b"kiosk-17 | CHANGED" in ans and b"Linux" in ans, ans

    script = ("import testinfra; h = testinfra.get_host('ssh://kiosk-17', ssh_config="
              f"{str(conf)!r}); print(h.run('uname -s').stdout.strip(), "
              "h.file('/etc/os-release').exists)")
    assert lap.ok(str(BIN / "python"), "-c", script).split() == [b"Linux", b"True"]

    # ssh killed in the middle of a transfer through the WebSocket path: its proxy ends,
    # the manager drops the stream to the tunnel port, and the next ssh works
    port = int(json.loads(stack.cli_ok("tunnel", "list", "--json"))["kiosk-17"])
    baseline = _tunnel_conns(port)
    big = lap.home / "big.bin"
    big.write_bytes(os.urandom(64 << 20))
    part = tmp_path / "kiosk-17" / "partial.bin"
    scp = subprocess.Popen(["ip", "netns", "exec", lap.ns, "env", "-i",
                            *(f"{k}={v}" for k, v in lap.env.items()), "scp", "-F",
                            str(conf), "-o", "BatchMode=yes", "-l", "8000", str(big),
                            f"kiosk-17:{part}"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        wait_for(lambda: part.exists() and part.stat().st_size > 0, "the transfer started",
                 120)
        assert _tunnel_conns(port) > baseline  # the stream is on the tunnel port
        ssh_pid = wait_for(lambda: _child_named(scp.pid, "ssh"), "scp's ssh", 30)
        os.kill(ssh_pid, 9)
        scp.wait(60)
        # nothing of that session is left: no `dpanel proxy`, no connection to the port
        wait_for(lambda: not _group_alive(scp.pid), "the killed session's processes", 60)
        wait_for(lambda: _tunnel_conns(port) <= baseline, "the stream's tunnel connection",
                 60)
    finally:
        if scp.poll() is None:
            os.killpg(scp.pid, 9)
            scp.wait()
    assert part.stat().st_size < big.stat().st_size
    assert lap.ok("ssh", "-F", str(conf), "-o", "BatchMode=yes", "kiosk-17",
                  "echo after-kill") == b"after-kill\n"

    # ssh-agent: a key that is only in the agent (no key file, no DPANEL_SSH_KEY) gets
    # the certificate, for `dpanel ssh` and for the ssh-config block
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, "ssh-agent's socket", 30)
        kf = tmp_path / "only-in-agent"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(kf)],
                       check=True)
        subprocess.run(["ssh-add", "-q", str(kf)], check=True, capture_output=True,
                       env=dict(os.environ, SSH_AUTH_SOCK=str(sock)))
        agent_pub = Path(f"{kf}.pub").read_text().split()[1]
        kf.unlink()
        Path(f"{kf}.pub").unlink()
        lap.env.pop("DPANEL_SSH_KEY")
        lap.env["SSH_AUTH_SOCK"] = str(sock)
        out = lap.run("dpanel", "ssh", "kiosk-17", "echo via-agent; exit 6")
        assert out.returncode == 6 and out.stdout == b"via-agent\n", out
        dconf = lap.home / ".config" / "dpanel"
        certs = list(dconf.glob("agent-*.pub-dpanel-*-cert.pub"))
        assert len(certs) == 1, list(dconf.iterdir())
        info = cert_info(certs[0].read_text())
        assert info is not None and base64.b64encode(info.key_blob).decode() == agent_pub
        assert not (dconf / "id_ed25519").exists()  # no key was generated instead
        # (and the agent's key won over the ~/.ssh/id_ed25519 made above)
        assert (lap.home / ".ssh" / "id_ed25519").exists()
        aconf = lap.home / ".ssh" / "config-agent"
        aconf.write_bytes(lap.ok("dpanel", "ssh-config"))
        assert f"IdentityFile {dconf}/agent-".encode() in aconf.read_bytes()
        assert lap.ok("ssh", "-F", str(aconf), "-o", "BatchMode=yes", "kiosk-17",
                      "echo agent-config") == b"agent-config\n"
    finally:
        agent.kill()
        agent.wait()

    # the audit: alice's exec and her SSH sessions, under her own name
    def rows() -> Any:
        got = json.loads(lap.ok("dpanel", "audit", "--device", "kiosk-17", "--json"))
        mine = [r for r in got if r["user"] == "alice"]
        return mine if {"exec", "shell"} <= {r["kind"] for r in mine} else None

    mine = wait_for(rows, "alice's audit rows", 60)
    assert any(r["kind"] == "exec" and r["exit"] == 5 for r in mine), mine
    assert any(r["kind"] == "shell" and r["exit"] == 3 and r["via"] == "cert"
               for r in mine), mine
    # the source is the laptop's own address as the manager saw it: for the API exec
    # (the API's row and the device's "for" it), and for a certificate session that
    # went straight to the device through the WebSocket proxy
    laptop_ip = host_ip[:-1] + "2"
    api_exec = next(r for r in mine if r["kind"] == "exec" and r["exit"] == 5)
    assert api_exec["api"]["source"] == laptop_ip, api_exec
    assert api_exec["source"].endswith(f" for {laptop_ip}"), api_exec
    agent_row = wait_for(lambda: next((r for r in json.loads(lap.ok(
        "dpanel", "audit", "--device", "kiosk-17", "--json"))
        if r["command"] == "echo via-agent; exit 6"), None), "the agent-key session", 60)
    assert agent_row["via"] == "cert" and agent_row["exit"] == 6, agent_row
    assert agent_row["source"].startswith(f"{laptop_ip}:"), agent_row
    assert "(proxy, tunnel 127.0.0.1:" in agent_row["source"], agent_row
    # no server file was ever needed, and the token file is the user's alone
    cfg = lap.home / ".config" / "dpanel" / "config.toml"
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    assert not any(p.name in ("server.toml", "manager_key", "admin_token")
                   for p in lap.home.rglob("*"))
