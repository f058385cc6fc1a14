"""An operator's laptop that can reach only the manager's HTTPS port, and holds no server file.

Topology: the stack on the host serves HTTPS on a veth address; the laptop is a network
namespace whose nftables let nothing out but TCP to that address's port 443. Everything
an operator does goes through it: login, device list, exec with stdin and exit codes,
`dpanel ssh` under a PTY, and plain `ssh`, `scp`, `rsync`, Ansible and testinfra through
the block `dpanel ssh-config` writes. Then the audit holds each of them under the
operator's own name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from test_fieldnet import Net, _subnets, net  # noqa: F401  (the fixture)

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

    # the audit: alice's exec and her SSH sessions, under her own name
    def rows() -> Any:
        got = json.loads(lap.ok("dpanel", "audit", "--device", "kiosk-17", "--json"))
        mine = [r for r in got if r["user"] == "alice"]
        return mine if {"exec", "shell"} <= {r["kind"] for r in mine} else None

    mine = wait_for(rows, "alice's audit rows", 60)
    assert any(r["kind"] == "exec" and r["exit"] == 5 for r in mine), mine
    assert any(r["kind"] == "shell" and r["exit"] == 3 and r["via"] == "cert"
               for r in mine), mine
    # no server file was ever needed, and the token file is the user's alone
    cfg = lap.home / ".config" / "dpanel" / "config.toml"
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    assert not any(p.name in ("server.toml", "manager_key", "admin_token")
                   for p in lap.home.rglob("*"))
