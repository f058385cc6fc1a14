"""Issue 8, agent side, with real processes: request freshness across restarts and broker
stalls (A6), the image's pins (A9), session process groups that end with the session and
with the agent (B3), the session environment (B4), backoff of a revoked tunnel (B5) and
bounded logs under a flood of bad requests (A7)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import asyncssh
import pytest

from agentfix import AGENT, Device, Proc, World
from dpanel_agent.guard import REPLAY_CACHE_NAME
from dpanel_proto import wire
from dpanel_proto.signing import sign_request

OK = wire.ErrorCode.OK


def _gone(pid: int) -> bool:
    """No such process, or a zombie (dead, only waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after ``timeout`` (the bound only limits a hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return []
        await asyncio.sleep(0.2)
    return [p for p in pids if not _gone(p)]


def _agent_proc(dev: Device, tmp_path: Path, *extra: str, name: str = "agent.log",
                env: Optional[dict[str, str]] = None, umask: Optional[int] = None,
                preexec: Optional[Callable[[], None]] = None) -> Proc:
    argv = [*AGENT, "--state-dir", str(dev.state_dir), "--log-level", "debug", *extra, "-"]
    p = Proc.__new__(Proc)
    p.log = tmp_path / name
    p.p = subprocess.Popen(argv, stdout=p.log.open("ab"), stderr=subprocess.STDOUT,
                           stdin=subprocess.PIPE, env=env, umask=-1 if umask is None else umask,
                           preexec_fn=preexec)
    assert p.p.stdin is not None
    p.p.stdin.write((dev.token.encode() + "\n").encode())
    p.p.stdin.close()
    return p


async def _run_agent(*args: str, input: Optional[str] = None
                     ) -> subprocess.CompletedProcess[str]:
    """The agent to completion (it is expected to refuse to start), off the event loop."""
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*AGENT, *args], input=input, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "DPANEL_TOKEN": ""},
                              stdin=None if input is not None else subprocess.DEVNULL)
    return await asyncio.get_running_loop().run_in_executor(None, run)


async def _online(world: World, name: str = "dev-1") -> None:
    await world.bus.wait_status(name, lambda s: s.state == "online", "online")


async def _open(world: World, name: str = "dev-1", **kw: object) -> int:
    resp = await world.bus.open(name, **kw)
    assert resp.code == OK and resp.port, resp
    return resp.port


# --------------------------------------------------------------------------- A6 freshness


async def test_replay_is_refused_after_the_agent_is_killed_and_restarted(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    p = _agent_proc(dev, tmp_path)
    procs.append(p)
    await _online(world)
    req = sign_request(world.bus.make_close("dev-1"), world.bus.key)
    assert (await world.bus.send(req, sign=False)).code == wire.ErrorCode.NOT_OPEN
    assert (dev.state_dir / REPLAY_CACHE_NAME).stat().st_mode & 0o777 == 0o600
    p.p.kill()  # no clean shutdown: the cache was on disk before the request was acted on
    p.p.wait()
    world.bus.status.clear()
    procs.append(_agent_proc(dev, tmp_path, name="agent2.log"))
    await _online(world)
    world.bus.responses.pop(req.id)
    resp = await world.bus.send(req, sign=False)  # the same request, seconds old
    assert resp.code == wire.ErrorCode.REPLAYED, resp


async def test_future_dated_request_is_refused(world: World) -> None:
    dev = world.device()
    agent = await dev.start()  # request_clock_skew = 5 in the harness
    await _online(world)
    now = time.time()
    resp = await world.bus.send(world.bus.make_open("dev-1", issued_at=now + 3600,
                                                    expires_at=now + 3600 + 60))
    assert resp.code == wire.ErrorCode.EXPIRED and "future" in resp.message, resp
    assert agent.link is None and world.tunnel.sessions() == {}


async def test_request_delivered_after_its_expiry_by_a_stalled_broker_is_not_acted_on(
        world: World) -> None:
    dev = world.device()
    agent = await dev.start()
    await _online(world)
    broker = world.broker.proc
    assert broker is not None
    now = time.time()
    # expires in 2 s; delivered about 2 s after that, still within the 5 s clock skew
    # (which used to stretch the expiry)
    req = sign_request(world.bus.make_open("dev-1", issued_at=now, expires_at=now + 2,
                                           ttl=3600), world.bus.key)
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        world.bus.client.publish(wire.req_topic("dev-1"), wire.encode(req), qos=1)
        await asyncio.sleep(4)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    resp = await world.bus.wait(lambda: world.bus.responses.get(req.id), "answer")
    assert resp.code == wire.ErrorCode.EXPIRED, resp
    assert agent.link is None and agent.tunnel_port is None
    assert world.tunnel.sessions() == {}


# --------------------------------------------------------------------------- A9 pins


def _pins(tmp_path: Path, tunnel: str, manager: str) -> Path:
    d = tmp_path / "pins"
    d.mkdir(parents=True, exist_ok=True)
    (d / "tunnel_host_key.pub").write_text(tunnel + "\n")
    (d / "manager_key.pub").write_text(manager + "\n")
    return d


async def test_token_not_matching_the_images_pins_is_refused_at_start(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    for field, pins in (
            ("tunnel_host_key", _pins(tmp_path / "a", other, dev.token.manager_key)),
            ("manager_key", _pins(tmp_path / "b", dev.token.tunnel_host_key, other))):
        cfg = pins.parent / "agent.toml"
        cfg.write_text(f'state_dir = "{dev.state_dir}"\npins_dir = "{pins}"\n')
        r = await _run_agent("--config", str(cfg), "-", input=dev.token.encode())
        assert r.returncode == 2, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"token {field} does not match" in lines[0], lines
        assert str(pins / f"{field}.pub") in lines[0], lines
    # the same keys with other comments are the same pins: it runs
    good = _pins(tmp_path / "c", dev.token.tunnel_host_key.split()[0] + " "
                 + dev.token.tunnel_host_key.split()[1] + " root@server",
                 " ".join(dev.token.manager_key.split()[:2]) + " dpanel-manager")
    cfg = good.parent / "agent.toml"
    cfg.write_text(f'state_dir = "{dev.state_dir}"\npins_dir = "{good}"\n')
    p = Proc([*AGENT, "--config", str(cfg), "-"], tmp_path / "agent.log",
             stdin=dev.token.encode() + "\n")
    procs.append(p)
    await _online(world)
    assert p.p.poll() is None


async def test_token_file_and_import_are_checked_against_pins_too(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    pins = _pins(tmp_path, dev.token.tunnel_host_key, other)
    fat = tmp_path / "dpanel-token.txt"
    fat.write_text(dev.token.encode() + "\n")
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state}"\npins_dir = "{pins}"\n'
                   f'import_token_from = ["{fat}"]\n')
    r = await _run_agent("--config", str(cfg))
    # not imported (the FAT copy is left as it was), and nothing else to run with
    assert r.returncode == 2, r
    assert fat.read_text().strip() == dev.token.encode()
    assert "does not match the key pinned in" in r.stderr and "manager_key" in r.stderr
    # a token file that does not match is refused as well
    state.mkdir(exist_ok=True)
    (state / "token").write_text(dev.token.encode() + "\n")
    fat.unlink()
    r = await _run_agent("--config", str(cfg))
    assert r.returncode == 2 and "token manager_key does not match" in r.stderr, r.stderr
    assert str(pins / "manager_key.pub") in r.stderr


# --------------------------------------------------------------------------- B3 orphans


async def _pids_of(proc: asyncssh.SSHClientProcess[str], n: int) -> list[int]:
    pids = []
    for _ in range(n):
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        pids.append(int(line))
    return pids


# the shell, a child that ignores SIGHUP (needs the SIGKILL after the grace period) and a
# plain one; the shell waits, as `dpanel exec` of a long job would
_TREE = ("echo $$; (trap '' HUP; exec sleep 600) & echo $!; sleep 600 & echo $!; wait")


async def test_closing_the_client_ends_the_sessions_process_group(world: World) -> None:
    dev = world.device()
    await dev.start()
    await _online(world)
    port = await _open(world)
    conn = await world.connect_ssh(port, dev)
    proc = await conn.create_process(_TREE)
    pids = await _pids_of(proc, 3)
    assert not any(_gone(p) for p in pids)
    conn.close()  # the client goes away mid-command
    assert await _wait_gone(pids, 20) == []


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
async def test_killing_the_openssh_client_ends_the_remote_command(
        world: World, tmp_path: Path) -> None:
    dev = world.device()
    await dev.start()
    status = await world.bus.wait_status("dev-1", lambda s: s.state == "online", "online")
    port = await _open(world)
    key = tmp_path / "manager_key"
    key.write_bytes(world.manager_key.export_private_key())
    key.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {status.host_key}\n")
    ssh = await asyncio.create_subprocess_exec(
        "ssh", "-F", "/dev/null", "-i", str(key), "-p", str(port),
        "-o", f"UserKnownHostsFile={known}", "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes", "dpanel@127.0.0.1", _TREE,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert ssh.stdout is not None
    pids = [int(await asyncio.wait_for(ssh.stdout.readline(), 15)) for _ in range(3)]
    ssh.send_signal(signal.SIGKILL)  # like ^C/kill of `dpanel exec`: the channel just ends
    await ssh.wait()
    assert await _wait_gone(pids, 20) == []


async def test_a_sigkilled_agent_leaves_no_commands_behind(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    p = _agent_proc(dev, tmp_path)
    procs.append(p)
    await _online(world)
    port = await _open(world)
    conn = await world.connect_ssh(port, dev)
    pipes = await conn.create_process(_TREE)
    pty = await conn.create_process(_TREE, term_type="xterm")
    pids = await _pids_of(pipes, 3)
    # a PTY echoes with \r\n; the pids are the lines that are numbers
    out = ""
    while out.count("\n") < 3:
        out += await asyncio.wait_for(pty.stdout.read(1024), 15)
    pids += [int(x) for x in out.split() if x.isdigit()][:3]
    assert len(pids) == 6 and not any(_gone(x) for x in pids)
    p.p.kill()
    p.p.wait()
    assert await _wait_gone(pids, 20) == []
    conn.abort()


async def test_a_command_that_exits_takes_its_background_jobs_with_its_session(
        world: World) -> None:
    dev = world.device()
    await dev.start()
    await _online(world)
    port = await _open(world)
    async with await world.connect_ssh(port, dev) as conn:
        r = await conn.run("sleep 600 >/dev/null 2>&1 & echo $!", check=False)
        bg = int(str(r.stdout))
        # a job started in a session of its own is the way to keep it on purpose (the
        # pid printed is the sleep's, whether setsid forked or not)
        r = await conn.run("setsid sh -c 'echo $$; exec sleep 600 </dev/null >/dev/null 2>&1' &",
                           check=False)
        kept = int(str(r.stdout))
    try:
        assert await _wait_gone([bg], 20) == [], f"background job {bg} still running"
        assert not _gone(kept), f"setsid job {kept} was killed too"
    finally:
        try:
            os.kill(kept, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- B4 environment


async def test_sessions_get_sshds_environment_not_the_agents(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    env = {k: v for k, v in os.environ.items() if k not in ("LANG", "TERM")}
    env.update(PATH="/nonexistent", DPANEL_TOKEN="")
    # /bin/sh: bash would read ~/.bashrc (it does for sshd sessions too, seeing SSH_CLIENT),
    # and this machine's may change PATH; what is checked here is what the agent gives
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{dev.state_dir}"\nshell = "/bin/sh"\n')
    def as_from_a_background_script() -> None:
        # `./dpanel-tunnel TOKEN &` from a script: SIGINT and SIGQUIT ignored, and (from
        # some supervisors) signals blocked; neither may reach a session
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    procs.append(_agent_proc(dev, tmp_path, "--config", str(cfg), env=env, umask=0o077,
                             preexec=as_from_a_background_script))
    await _online(world)
    port = await _open(world)
    work = tmp_path / "files"
    work.mkdir()
    work.chmod(0o777)
    expected_path = ("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                     if os.geteuid() == 0 else "/usr/local/bin:/usr/bin:/bin:/usr/games")
    async with await world.connect_ssh(port, dev) as conn:
        r = await conn.run(f'echo "PATH=$PATH"; umask; touch {work}/made; mkdir {work}/dir; '
                           f'stat -c %a {work}/made {work}/dir; echo "C=$SSH_CONNECTION"; '
                           'echo "CL=$SSH_CLIENT"; echo "TTY=${SSH_TTY-unset}"; '
                           'echo "U=$USER $LOGNAME $HOME $SHELL"', check=False)
        lines = str(r.stdout).splitlines()
        assert lines[0] == f"PATH={expected_path}", r
        assert lines[1] == "0022" and lines[2:4] == ["644", "755"], r
        conn_f = lines[4][2:].split()
        assert len(conn_f) == 4 and conn_f[0] == conn_f[2] == "127.0.0.1", lines
        assert lines[5][3:].split() == [conn_f[0], conn_f[1], conn_f[3]], lines
        assert lines[6] == "TTY=unset"
        assert lines[7].split()[0] == "U=" + lines[7].split()[1], lines
        assert lines[7].split()[3] == "/bin/sh", lines
        sig = await conn.run("grep -E '^Sig(Ign|Blk)' /proc/self/status", check=False)
        assert str(sig.stdout).split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16], sig
        # with a PTY: SSH_TTY is the terminal and TERM comes from the PTY request
        proc = await conn.create_process('echo "T=$SSH_TTY $(tty) $TERM"; exit',
                                         term_type="vt220")
        out = str((await asyncio.wait_for(proc.wait(check=False), 15)).stdout)
        t = out.strip().split("T=", 1)[1].split()
        assert t[0].startswith("/dev/pts/") and t[0] == t[1] and t[2] == "vt220", out
        # SFTP uploads get the session umask too, not the agent's 077
        async with conn.start_sftp_client() as sftp:
            async with sftp.open(str(work / "up.txt"), "w") as f:
                await f.write("x")
            await sftp.mkdir(str(work / "updir"))
    assert (work / "up.txt").stat().st_mode & 0o777 == 0o644
    assert (work / "updir").stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------- B5 backoff


async def test_revoked_tunnel_backs_off_and_stops_at_the_ttl(world: World) -> None:
    dev = world.device()
    agent = await dev.start()  # reconnect_min 0.2 s in the harness
    await _online(world)
    await _open(world, ttl=20)  # room for the 4 s below on a loaded machine
    link = agent.link
    assert link is not None and link.dials == 1
    world.secrets["dev-1"] = "revoked"  # as the registry would answer now
    world.tunnel.call(lambda: world.tunnel.server.kick("dev-1"))
    await world.bus.wait_status("dev-1", lambda s: s.port is None, "port withdrawn")
    await asyncio.sleep(4)
    # one immediate redial (it could have been a blip), then the refusal backs off
    # by 2.5-5 s; it used to be ~150 dials a second
    assert link.dials <= 3, link.dials
    assert link.wanted
    # the tunnel's TTL ends all redialling
    await world.bus.wait(lambda: not link.wanted, "TTL passed", 40)
    dials = link.dials
    await asyncio.sleep(3)
    assert link.dials == dials and world.tunnel.sessions() == {}


# --------------------------------------------------------------------------- A7 log flood


async def test_a_flood_of_bad_requests_gives_bounded_logs(
        world: World, procs: list[Proc], tmp_path: Path) -> None:
    dev = world.device()
    p = _agent_proc(dev, tmp_path)
    procs.append(p)
    await _online(world)
    for i in range(300):
        world.bus.client.publish(wire.req_topic("dev-1"), b"garbage %d" % i, qos=0)
        world.bus.client.publish(wire.req_topic("dev-1"), wire.encode(
            world.bus.make_close("dev-1")), qos=0)  # unsigned
    resp = await world.bus.close("dev-1")  # still serving, in order after the flood
    assert resp.code == wire.ErrorCode.NOT_OPEN
    wanted = ("malformed requests: suppressed", "bad_signature refusals: suppressed")
    for _ in range(60):  # the counts are reported when each 10 s window ends
        if all(w in p.log.read_text() for w in wanted):
            break
        await asyncio.sleep(0.5)
    text = p.log.read_text()
    assert text.count("ignored a malformed request") <= 10, text[-2000:]
    assert text.count("refused close request") <= 10
    assert all(w in text for w in wanted), text[-2000:]
    assert len(text.splitlines()) < 200, len(text.splitlines())  # for 600 bad requests
