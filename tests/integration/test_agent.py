"""The agent in process against a real Mosquitto, the real public tunnel and real SSH
clients (asyncssh and OpenSSH): open → port → exec/PTY/SFTP/forward, close paths, faults."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from pathlib import Path

import asyncssh
import pytest
from dpanel_agent import wire
from test_agent_harness import World, echo_server, manager_key, world

__all__ = ["echo_server", "manager_key", "world"]  # fixtures re-exported for pytest

OK = wire.ErrorCode.OK


async def _open_tunnel(world: World, name: str = "dev-1", **agent_kw: object
                       ) -> tuple[int, wire.Status]:
    dev = world.device(name)
    await dev.start(**agent_kw)
    await world.bus.wait_status(name, lambda s: s.state == "online", "online")
    resp = await world.bus.open(name)
    assert resp.code == OK, resp
    assert resp.port is not None
    status = await world.bus.wait_status(name, lambda s: s.port == resp.port, "port announced")
    return resp.port, status


async def test_open_reports_port_and_exec_keeps_streams_and_exit_code(world: World) -> None:
    port, status = await _open_tunnel(world)
    assert status.host_key.startswith("ssh-ed25519 ")
    assert status.agent_version
    # the port is the tunnel server's, bound on its loopback side
    assert world.tunnel.sessions() == {"dev-1": port}
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        r = await conn.run("echo hi; echo oops >&2; exit 3", check=False)
        assert (r.stdout, r.stderr, r.exit_status) == ("hi\n", "oops\n", 3)
        r = await conn.run("cat; echo done", input="from stdin\n", check=False)
        assert (r.stdout, r.exit_status) == ("from stdin\ndone\n", 0)
        r = await conn.run("kill -TERM $$", check=False)
        assert r.exit_signal is not None and r.exit_signal[0] == "TERM"


async def test_pty_shell_is_interactive_and_resizes(world: World) -> None:
    port, _ = await _open_tunnel(world)
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24))
        proc.stdin.write("tty; echo TERM=$TERM; stty size\n")
        out = ""
        while "24 80" not in out:
            out += await asyncio.wait_for(proc.stdout.read(4096), 15)
        assert "/dev/pts/" in out and "TERM=xterm" in out
        proc.change_terminal_size(132, 50)
        proc.stdin.write("stty size; exit 5\n")
        while "50 132" not in out:
            out += await asyncio.wait_for(proc.stdout.read(4096), 15)
        result = await asyncio.wait_for(proc.wait(check=False), 15)
        assert result.exit_status == 5


async def test_pty_ctrl_c_interrupts_foreground_command(world: World) -> None:
    port, _ = await _open_tunnel(world)
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        proc = await conn.create_process(term_type="xterm")
        proc.stdin.write("sleep 60\n")
        await asyncio.sleep(0.5)
        proc.stdin.write("\x03")  # ^C through the line discipline of a real pty
        proc.stdin.write("echo after=$?\n")
        out = ""
        while "after=130" not in out:
            out += await asyncio.wait_for(proc.stdout.read(4096), 15)
        proc.stdin.write("exit\n")
        assert (await asyncio.wait_for(proc.wait(check=False), 15)).exit_status == 0


async def test_sftp_put_and_get(world: World, tmp_path: Path) -> None:
    port, _ = await _open_tunnel(world)
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(300_000))
    dest = tmp_path / "on-device" / "payload.bin"
    dest.parent.mkdir()
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        async with conn.start_sftp_client() as sftp:
            await sftp.put(str(src), str(dest))
            assert dest.read_bytes() == src.read_bytes()
            back = tmp_path / "back.bin"
            await sftp.get(str(dest), str(back))
            assert back.read_bytes() == src.read_bytes()


async def test_direct_tcpip_only_to_allowed_hosts(world: World, echo_server: int) -> None:
    port, _ = await _open_tunnel(world)
    async with await world.connect_ssh(port, world.devices[0]) as conn:
        reader, writer = await conn.open_connection("127.0.0.1", echo_server)
        writer.write(b"x" * 100_000)
        writer.write_eof()
        got = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 15):
            got += chunk
        assert got == b"x" * 100_000
        writer.close()
        # a LAN address (here: the device's non-loopback name) is not in allow_forward_hosts
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("192.0.2.1", 80)
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection(socket.gethostname() + ".invalid", echo_server)


async def test_builtin_sshd_refuses_unpinned_client_key(world: World) -> None:
    port, _ = await _open_tunnel(world)
    intruder = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await world.connect_ssh(port, world.devices[0], key=intruder)
    # and no password auth either, even with the device secret
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect("127.0.0.1", port, username="dpanel",
                               password=world.devices[0].secret, client_keys=None,
                               known_hosts=None, agent_path=None, config=None)


async def test_builtin_sshd_listens_on_loopback_only(world: World) -> None:
    await _open_tunnel(world)
    sshd = world.devices[0].agents[0].sshd
    assert sshd is not None
    addrs = [s.getsockname()[0] for s in sshd._acceptor.sockets]  # type: ignore[union-attr]
    assert addrs == ["127.0.0.1"]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_openssh_client_exec_through_the_tunnel(world: World, tmp_path: Path) -> None:
    port, status = await _open_tunnel(world)
    key = tmp_path / "manager_key"
    key.write_bytes(world.manager_key.export_private_key())
    key.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {status.host_key}\n")
    argv = ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(port),
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "dpanel@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(
        *argv, "echo out; echo err >&2; exit 4", stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out, err.endswith(b"err\n")) == (4, b"out\n", True), err
