"""End to end: enrol -> dpanel-tunnel -> open -> exec / shell / scp / forward, all real."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pytest

from stackfix import Stack
from support import wait_for


def _ssh_base(stack: Stack) -> list[str]:
    """OpenSSH with the manager's identity and pinned host keys, via `dpanel proxy`."""
    stack.cli_ok("ssh-config")  # refreshes known_hosts
    keys = stack.dir / "keys"
    return ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
            "-o", f"ProxyCommand={stack.proxy_command()}",
            "-i", str(keys / "manager_key"), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={stack.dir / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]


@pytest.fixture
def device(stack: Stack, tmp_path: Path) -> str:
    token = stack.enrol("dev-1")
    stack.start_agent(token, tmp_path / "dev-1")
    stack.wait_online("dev-1")
    return "dev-1"


def test_exec_streams_and_keeps_exit_code(stack: Stack, device: str) -> None:
    out = stack.cli("exec", device, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert out.returncode == 7
    assert out.stdout == b"out\n"
    assert out.stderr == b"err\n"
    # second command reuses the tunnel (and the pooled connection)
    port = stack.device(device)["port"]
    assert port and 30000 <= port <= 30999
    out = stack.cli("exec", device, "--", "echo", "a b", "$HOME")
    assert out.returncode == 0 and out.stdout == b"a b $HOME\n"  # argv is quoted, not re-split
    assert stack.device(device)["port"] == port


def test_exec_stdin(stack: Stack, device: str) -> None:
    out = stack.cli("exec", device, "-i", "--", "wc", "-c", input=b"x" * 100000)
    assert out.returncode == 0 and out.stdout.strip() == b"100000", out


def test_interactive_shell_has_a_pty(stack: Stack, device: str) -> None:
    cmd = [*_ssh_base(stack), "-tt", device]
    out = subprocess.run(cmd, input=b"tty; echo $((6*7)); exit 3\n", capture_output=True,
                         timeout=120)
    assert out.returncode == 3, out
    assert b"/dev/pts/" in out.stdout and b"42" in out.stdout


def test_openssh_proxycommand_exec_and_scp(stack: Stack, device: str, tmp_path: Path) -> None:
    base = _ssh_base(stack)
    out = subprocess.run([*base, device, "echo via-openssh; exit 5"], capture_output=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 5 and out.stdout == b"via-openssh\n", out
    src = tmp_path / "payload.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    dst = tmp_path / "uploaded.bin"
    # modern scp speaks SFTP, so this exercises the agent's SFTP server
    scp = ["scp", *base[1:], str(src), f"{device}:{dst}"]
    res = subprocess.run(scp, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res
    assert dst.read_bytes() == src.read_bytes()


def test_ssh_config_block_makes_plain_ssh_work(stack: Stack, device: str,
                                              tmp_path: Path) -> None:
    conf = tmp_path / "ssh_config"
    conf.write_text(stack.cli_ok("ssh-config"))
    out = subprocess.run(["ssh", "-F", str(conf), "-o", "BatchMode=yes", f"{device}.dpanel",
                          "uname -s"], capture_output=True, timeout=120, env=stack.env,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and out.stdout.strip() == b"Linux", out


def test_forward_to_a_device_port(stack: Stack, device: str) -> None:
    # a "web UI" on the device's loopback: echo one line back, upper-cased
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    threading.Thread(target=serve, daemon=True).start()
    out = subprocess.run([*_ssh_base(stack), "-W", f"127.0.0.1:{port}", device],
                         input=b"hello device port\n", capture_output=True, timeout=120)
    srv.close()
    assert out.stdout == b"HELLO DEVICE PORT\n", out


def test_tunnel_open_close_list(stack: Stack, device: str) -> None:
    assert "127.0.0.1:" in stack.cli_ok("tunnel", "open", device)
    assert device in stack.cli_ok("tunnel", "list")
    assert "closed" in stack.cli_ok("tunnel", "close", device)
    wait_for(lambda: not stack.device(device)["port"], "port cleared", 15)
    # and it opens again on demand
    assert stack.cli("exec", device, "--", "true").returncode == 0


def test_fan_out_over_20_agents(stack: Stack, tmp_path: Path) -> None:
    names = [f"fleet-{i:02d}" for i in range(20)]
    for name in names:
        stack.start_agent(stack.enrol(name), tmp_path / name)
    stack.enrol("fleet-zz-offline")  # enrolled, never started: reported, not fatal
    for name in names:
        stack.wait_online(name, timeout=90)
    out = stack.cli("exec", "--filter", "fleet-*", "-j", "8", "--", "sh", "-c",
                    "echo $((40+2))")
    text = out.stdout.decode()
    assert out.returncode == 1  # the offline one failed
    assert "20/21 succeeded" in text
    for name in names:
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        assert line.split()[1] == "0" and line.endswith("42")
    assert "offline" in next(ln for ln in text.splitlines() if ln.startswith("fleet-zz"))
    assert b"21/21" in out.stderr  # progress reached the end


def test_exec_errors_are_clear(stack: Stack) -> None:
    stack.enrol("never-started")
    out = stack.cli("exec", "never-started", "--", "true")
    assert out.returncode == 255 and b"device never-started is offline" in out.stderr
    out = stack.cli("exec", "ghost", "--", "true")
    assert out.returncode == 255 and b"unknown device 'ghost'" in out.stderr



def test_ssh_config_answers_bare_names_too(stack: Stack, device: str, tmp_path: Path) -> None:
    """B8: `ssh NAME` and `ssh NAME.dpanel` both work with the generated block (real
    OpenSSH), and `dpanel ssh DEV CMD -FLAGS` passes the command on."""
    stack.start_agent(stack.enrol("dev-2"), tmp_path / "dev-2")
    stack.wait_online("dev-2")
    conf = tmp_path / "ssh_config"
    conf.write_text(stack.cli_ok("ssh-config"))
    for host in (device, f"{device}.dpanel", "dev-2", "dev-2.dpanel"):
        out = subprocess.run(["ssh", "-F", str(conf), "-o", "BatchMode=yes", host,
                              "uname -s"], capture_output=True, timeout=120, env=stack.env,
                             stdin=subprocess.DEVNULL)
        assert out.returncode == 0 and out.stdout.strip() == b"Linux", (host, out)
    assert "Host *.dpanel dev-1 dev-2\n" in conf.read_text()
    out = stack.cli("ssh", device, "uname", "-s")
    assert out.returncode == 0 and out.stdout.strip() == b"Linux", out
    # ssh options before DEVICE are ssh's; everything after it is the remote command
    out = stack.cli("ssh", "-o", "LogLevel=ERROR", "-T", device, "sh", "-c", "'exit 4'")
    assert out.returncode == 4, out
