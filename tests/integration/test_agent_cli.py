"""``dpanel-tunnel`` as a process: token sources, exit codes, signals, last will, memory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from agentfix import AGENT, Proc, World
from dpanel_proto import __version__, wire


def _run(*args: str, input: Optional[str] = None,
         env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=60,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          env=env if env is not None else {**os.environ, "DPANEL_TOKEN": ""})


def test_version() -> None:
    r = _run("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"dpanel-tunnel {__version__}")


@pytest.mark.parametrize(("args", "stdin", "expected"), [
    (["dpt1.AAAA.00000000"], None, "token: argument: token: checksum mismatch"),
    (["not-a-token"], None, "token: argument: token: expected 'dpt1.<body>.<checksum>'"),
    (["-"], "\n# only a comment\n", "token: no token on stdin"),
    ([], None, "token: no token: "),
])
def test_bad_or_missing_token_exits_2_without_traceback(
        tmp_path: Path, args: list[str], stdin: Optional[str], expected: str) -> None:
    r = _run("--state-dir", str(tmp_path), *args, input=stdin)
    assert r.returncode == 2, r
    assert r.stderr.startswith("dpanel-tunnel: ") and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_config_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state_dir = "/tmp/x"\nsshd_port = "ssh"\n')
    r = _run("--config", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}:2: sshd_port: expected an integer" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_token_file_exits_2(tmp_path: Path) -> None:
    tf = tmp_path / "token"
    tf.write_text("dpt1.garbage.12345678\n")
    r = _run("--token-file", str(tf), "--state-dir", str(tmp_path))
    assert r.returncode == 2 and f"token file {tf}: token:" in r.stderr, r.stderr


async def test_token_on_stdin_runs_and_sigterm_goes_offline(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    p = Proc([*AGENT, "--state-dir", str(dev.state_dir), "-"], tmp_path / "agent.log",
             stdin=dev.token.encode() + "\n")
    procs.append(p)
    status = await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    assert status.host_key.startswith("ssh-ed25519 ")
    assert dev.token.secret not in p.cmdline()
    p.p.send_signal(signal.SIGTERM)
    assert await p.wait() == 0
    await world.bus.wait_status("dev-1", lambda s: s.state == "offline", "offline")
    assert dev.token.secret not in p.log.read_text()  # never logged


async def test_env_token_is_not_passed_to_shell_sessions(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    env = {**os.environ, "DPANEL_TOKEN": dev.token.encode()}
    procs.append(Proc([*AGENT, "--state-dir", str(dev.state_dir)], tmp_path / "agent.log",
                      env=env))
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    resp = await world.bus.open("dev-1")
    assert resp.code == wire.ErrorCode.OK and resp.port
    async with await world.connect_ssh(resp.port, dev) as conn:
        out = (await conn.run("env", check=False)).stdout
    assert isinstance(out, str) and "HOME=" in out
    assert "DPANEL_TOKEN" not in out and dev.token.secret not in out


async def test_config_imports_token_from_boot_partition(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    boot = tmp_path / "boot"
    boot.mkdir()
    fat = boot / "dpanel-token.txt"
    fat.write_text("# dPanel token\n" + dev.token.encode() + "\n")
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state}"\nimport_token_from = ["{boot}/none.txt", "{fat}"]\n'
                   'log_level = "debug"\n')
    procs.append(Proc([*AGENT, "--config", str(cfg)], tmp_path / "agent.log"))
    await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    assert dev.token.secret not in fat.read_text()
    assert (state / "token").read_text().strip() == dev.token.encode()
    assert (state / "token").stat().st_mode & 0o777 == 0o600


async def test_kill_9_leaves_last_will_and_restart_comes_back(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    dev.state_dir.mkdir(parents=True)
    (dev.state_dir / "token").write_text(dev.token.encode() + "\n")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{dev.state_dir}"\nmqtt_keepalive = 10\n')
    p = Proc([*AGENT, "--config", str(cfg)], tmp_path / "agent.log")
    procs.append(p)
    first = await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    p.p.kill()
    # the broker publishes the will after 1.5 keepalives without a packet
    await world.bus.wait_status("dev-1", lambda s: s.state == "offline", "last will", 60)
    procs.append(Proc([*AGENT, "--config", str(cfg)], tmp_path / "agent.log"))
    again = await world.bus.wait_status("dev-1", lambda s: s.state == "online", "back", 30)
    assert again.host_key == first.host_key  # the device keeps its own key across restarts


async def test_idle_agent_memory(world: World, procs: list[Proc], tmp_path: Path) -> None:
    """An idle agent (connected, no tunnel) stays under 40 MB resident: asyncssh and
    cryptography are only loaded when a request arrives (or, on the very first start, to
    generate the host key)."""
    dev = world.device()
    rss: list[int] = []
    for _ in range(2):  # first start (generates the host key), then a normal start
        p = Proc([*AGENT, "--state-dir", str(dev.state_dir), "-"], tmp_path / "agent.log",
                 stdin=dev.token.encode())
        procs.append(p)
        await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
        await asyncio.sleep(1)
        rss.append(p.rss_kb())
        if len(rss) == 1:
            p.p.send_signal(signal.SIGTERM)
            assert await p.wait() == 0
            await world.bus.wait_status("dev-1", lambda s: s.state == "offline", "offline")
    assert max(rss) < 40 * 1024, f"idle agent RSS {rss} kB"
    resp = await world.bus.open("dev-1")
    assert resp.code == wire.ErrorCode.OK
    print(f"agent RSS idle: first start {rss[0]} kB, later starts {rss[1]} kB; "
          f"with a tunnel open {p.rss_kb()} kB")
