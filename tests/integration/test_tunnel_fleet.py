"""Two tunnel servers apart from the manager (``dpanel tunnel serve``, each on its own
loopback address, its device ports bound there only) with one stack's manager: placement
spreads and sticks, the manager's SSH channel to a server reaches only that server's own
device ports, a device's credentials open no such channel, revoke is pushed to the remote
server at once, and a killed server's devices land on the other one, which is named."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import asyncssh
import pytest

from dpanel_proto.token import parse_token
from dpanel_server.config import load_config
from dpanel_server.tunnel import MANAGER_USER
from stackfix import Stack
from support import free_port, wait_for

#: ``stack up --tunnel-servers 2``: each server on its own loopback address (devices dial
#: it; its device ports are bound there), each a real ``dpanel tunnel serve`` process
HOSTS = {"ts-1": "127.0.0.2", "ts-2": "127.0.0.3"}


class Fleet:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def pid(self, name: str) -> int:
        return int((self.stack.dir / "tunnel-servers" / name / "pid").read_text())

    def kill(self, name: str) -> None:
        pid = self.pid(name)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pid}").exists()
                 or "zombie" in Path(f"/proc/{pid}/status").read_text(), f"{name} dead", 10)

    def servers(self) -> dict[str, dict[str, Any]]:
        out = json.loads(self.stack.cli_ok("tunnel-server", "list", "--json"))
        return {s["name"]: s for s in out}

    def wait_up(self, name: str) -> dict[str, Any]:
        def up() -> Any:
            s = self.servers().get(name)
            return s if s and s["state"] == "up" else None
        return dict(wait_for(up, f"tunnel server {name} up", 60))

    def holder(self, device: str) -> str:
        """Which server holds the device's tunnel (its heartbeats say)."""
        def find() -> Any:
            return next((n for n, s in self.servers().items() if device in s["devices"]),
                        None)
        return str(wait_for(find, f"{device}'s tunnel in a heartbeat", 30))

    def log(self, name: str) -> str:
        return (self.stack.dir / "tunnel-servers" / name / "tunnel.log").read_text(
            errors="replace")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    # the 30 s safety poll is pushed out of reach: only the manager's push can cut off
    os.environ["DPANEL_TUNNEL_SAFETY_POLL"] = "3600"
    stack = Stack(dir=tmp / "st", broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), extra=("--tunnel-servers", "2"))
    try:
        stack.start()
    finally:
        del os.environ["DPANEL_TUNNEL_SAFETY_POLL"]
    f = Fleet(stack)
    try:
        for name in HOSTS:
            f.wait_up(name)
        for dev in ("fl-1", "fl-2", "fl-3"):
            stack.start_agent(stack.enrol(dev), tmp / dev)
        for dev in ("fl-1", "fl-2", "fl-3"):
            stack.wait_online(dev)
        yield f
    finally:
        stack.close()


def _http(stack: Stack, method: str, path: str, token: str,
          body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{stack.api_port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_who_may_see_and_enrol_tunnel_servers(fleet: Fleet) -> None:
    s = fleet.stack
    _exec(s, "fl-1")
    assert "(ts-" in s.cli_ok("tunnel", "list")  # the server holding it is named
    admin = Path(load_config(s.config).manager.admin_token_file).read_text().strip()
    code, out = _http(s, "POST", "/v1/users", admin,
                      {"name": "far-viewer", "role": "viewer", "scope": ["site=elsewhere"]})
    assert code == 201, out
    viewer = out["token"]
    code, servers = _http(s, "GET", "/v1/tunnel-servers", viewer)
    assert code == 200 and {x["name"] for x in servers} == set(HOSTS)
    # no device of another scope is named to a scoped caller
    assert all(x["devices"] == [] for x in servers), servers
    assert _http(s, "POST", "/v1/tunnel-servers", viewer, {"name": "ts-9"})[0] == 403
    assert _http(s, "DELETE", "/v1/tunnel-servers/ts-1", viewer)[0] == 403
    # a heartbeat needs the server's own secret: not an operator's, not the admin token
    beat = {"public": "127.0.0.9:2220", "host_key": servers[0]["host_key"],
            "bind_host": "127.0.0.9", "capacity": 1, "load": 0, "devices": {}}
    for token in (viewer, admin, "x" * 43):
        code, out = _http(s, "POST", "/v1/tunnel-servers/ts-1/heartbeat", token, beat)
        assert code == 401 and out["code"] == "unauthorized", out
        # a body that would not validate changes nothing: the secret is checked first
        code, out = _http(s, "POST", "/v1/tunnel-servers/ts-1/heartbeat", token, {"x": 1})
        assert code == 401 and out["code"] == "unauthorized", out
    # with its own secret, a bad field is named (a newline in the loopback address)
    secret = (s.dir / "tunnel-servers" / "ts-1" / "secret").read_text().strip()
    code, out = _http(s, "POST", "/v1/tunnel-servers/ts-1/heartbeat", secret,
                      {**beat, "bind_host": "127.0.0.9\n"})
    assert code == 422 and "bind_host" in out["error"], out
    assert fleet.servers()["ts-1"]["public"].startswith(HOSTS["ts-1"])


def _exec(stack: Stack, device: str) -> str:
    return stack.cli_ok("exec", device, "--", "sh", "-c", "echo hi-$((6*7))").strip()


def test_devices_are_placed_on_both_servers_and_stay(fleet: Fleet) -> None:
    s = fleet.stack
    assert _exec(s, "fl-1") == "hi-42"
    assert _exec(s, "fl-2") == "hi-42"
    first, second = fleet.holder("fl-1"), fleet.holder("fl-2")
    assert {first, second} == set(HOSTS), "least-loaded placement uses both servers"
    # sticky: the next opens (tunnel still up) go to the same server
    for _ in range(2):
        out = s.cli_ok("tunnel", "open", "fl-1")
        assert out.strip().endswith(f"of tunnel server {first}"), out
        assert out.split(" on ")[1].startswith(HOSTS[first] + ":"), out
        assert _exec(s, "fl-1") == "hi-42"
        assert fleet.holder("fl-1") == first
    # ssh through `dpanel proxy` on the manager's host: the port is on another host's
    # loopback, so it goes through the API's WebSocket and the manager's channel
    out = subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o",
         f"ProxyCommand={s.proxy_command()}", "-i", str(s.dir / "keys" / "manager_key"),
         "-o", "IdentitiesOnly=yes", "-l", load_config(s.config).manager.ssh_user,
         "fl-2", "echo via-proxy"],
        env=s.env, capture_output=True, timeout=60)
    assert out.stdout.decode().strip() == "via-proxy", out.stderr.decode()[-2000:]
    # each server's own /metrics counts its own tunnels
    for name, host in HOSTS.items():
        port = int((s.dir / "tunnel-servers" / name / "metrics_port").read_text())
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        line = next(x for x in text.splitlines() if x.startswith("dpanel_tunnel_ports_in_use"))
        assert float(line.split()[1]) >= 1, line
    # the device ports stay on each server's own loopback address
    for name, st in fleet.servers().items():
        assert st["public"].startswith(HOSTS[name] + ":")


async def _manager_channel(fleet: Fleet, name: str) -> asyncssh.SSHClientConnection:
    cfg = load_config(fleet.stack.config)
    st = fleet.servers()[name]
    host, port = st["public"].rsplit(":", 1)
    return await asyncssh.connect(
        host, int(port), username=MANAGER_USER, client_keys=[cfg.manager.ssh_key],
        known_hosts=([asyncssh.import_public_key(st["host_key"])], [], []),
        agent_path=None, config=None, connect_timeout=10)


async def _banner(conn: asyncssh.SSHClientConnection, host: str, port: int) -> bytes:
    reader, writer = await conn.open_connection(host, port, encoding=None)
    try:
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


def test_manager_channel_reaches_only_its_own_allocated_ports(fleet: Fleet) -> None:
    s = fleet.stack
    _exec(s, "fl-1")
    _exec(s, "fl-2")
    on = {fleet.holder(d): d for d in ("fl-1", "fl-2")}
    a, b = "ts-1", "ts-2"
    tunnels = json.loads(s.cli_ok("tunnel", "list", "--json"))
    port_a, port_b = tunnels[on[a]], tunnels[on[b]]

    async def go() -> None:
        conn = await _manager_channel(fleet, b)
        try:
            # B's own device: reachable (the device's SSH server answers)
            assert (await _banner(conn, HOSTS[b], port_b)).startswith(b"SSH-2.0")
            refused = [
                (HOSTS[a], port_a),            # A's device, asked of B
                ("127.0.0.1", port_a),         # ... under another loopback spelling
                (HOSTS[b], port_a),            # a port B never allocated
                (HOSTS[b], 30999 if port_b != 30999 else 30998),
                ("127.0.0.1", s.api_port),     # the manager's API
                ("127.0.0.1", port_b),         # B's device, but not on B's bind address
                ("localhost", port_b),
                ("10.255.255.1", port_b),      # anything off loopback
            ]
            for host, port in refused:
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection(host, port)
            # a malformed control command gets a one-line error; the server carries on
            for bad in ("not json", '{"op": "kick", "device": "A\\n"}', '{"op": "rm"}'):
                answer = json.loads(str((await conn.run(bad)).stdout))
                assert answer["ok"] is False and answer["error"], (bad, answer)
            assert "sessions" in json.loads(str((await conn.run('{"op": "sessions"}')).stdout))
            # and the channel gives no port forward of its own
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("", 0, "127.0.0.1", 22)
        finally:
            conn.close()
    asyncio.run(go())


def test_device_credentials_open_no_manager_channel(fleet: Fleet) -> None:
    tok = parse_token(fleet.stack.tokens["fl-3"])
    st = fleet.servers()["ts-1"]
    host, port = st["public"].rsplit(":", 1)
    known = ([asyncssh.import_public_key(st["host_key"])], [], [])
    port_dev = json.loads(fleet.stack.cli_ok("tunnel", "list", "--json")).get("fl-1")

    async def go() -> None:
        # the device secret as the manager's user name: refused
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(host, int(port), username=MANAGER_USER,
                                   password=tok.secret, known_hosts=known, client_keys=None,
                                   agent_path=None, config=None, preferred_auth="password")
        # an unknown key as the manager: refused
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(host, int(port), username=MANAGER_USER,
                                   client_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                                   known_hosts=known, agent_path=None, config=None)
        # logged in as the device itself: no direct-tcpip, no session
        conn = await asyncssh.connect(host, int(port), username=tok.device,
                                      password=tok.secret, known_hosts=known,
                                      client_keys=None, agent_path=None, config=None)
        try:
            for h in (HOSTS["ts-1"], "127.0.0.1"):
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection(h, port_dev or 30000)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run('{"op": "sessions"}')
        finally:
            conn.close()
    asyncio.run(go())


def test_revoke_is_pushed_to_the_remote_server(fleet: Fleet) -> None:
    s = fleet.stack
    assert _exec(s, "fl-3") == "hi-42"
    where = fleet.holder("fl-3")
    s.cli_ok("device", "revoke", "fl-3")
    # the server's own log says the manager kicked it (its registry poll is 1 h away)
    wait_for(lambda: "manager kicked device fl-3" in fleet.log(where),
             "the pushed kick on the remote server", 15)

    async def gone() -> bool:
        conn = await _manager_channel(fleet, where)
        try:
            out = await conn.run('{"op": "devices"}')
            return "fl-3" not in json.loads(str(out.stdout))["devices"]
        finally:
            conn.close()
    assert asyncio.run(gone())


def test_a_dead_server_is_named_and_its_devices_move(fleet: Fleet) -> None:
    s = fleet.stack
    assert _exec(s, "fl-1") == "hi-42"
    dead = fleet.holder("fl-1")
    other = next(n for n in HOSTS if n != dead)
    fleet.kill(dead)

    def named() -> Any:
        st = fleet.servers()[dead]
        return st if st["state"] == "down" else None
    st = wait_for(named, f"{dead} shown down", 30)
    assert st["reason"], st
    table = s.cli_ok("tunnel-server", "list")
    assert dead in table and "down" in table
    # the next open lands on the other server
    assert _exec(s, "fl-1") == "hi-42"
    assert fleet.holder("fl-1") == other
    # with both gone, the error names each server and why
    fleet.kill(other)
    wait_for(lambda: fleet.servers()[other]["state"] == "down", f"{other} down", 30)
    s.cli_ok("tunnel", "close", "fl-2")
    out = s.cli("exec", "fl-2", "--", "true")
    err = out.stderr.decode()
    assert out.returncode != 0 and dead in err and other in err, err
