"""Two tunnel servers apart from the manager, as on other hosts: each ``dpanel tunnel
serve`` in its own network namespace (device ports bound on that namespace's loopback
only), each agent in its own namespace (a site), the manager on the host, all joined by
one switch (a bridge in a namespace of its own), so that every hop is over the network:
the servers reach the manager's API over HTTPS and the registry on PostgreSQL over TCP.

Placement spreads and sticks, the manager's SSH channel to a server reaches only that
server's own device ports, a device's credentials open no such channel, revoke is pushed
to the remote server at once, a site that cannot reach one server (nftables drops its
packets) gets its tunnel on the other within the same request, and a killed server's
devices land on the other one, which is named."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import asyncssh
import pytest
from pgfix import PG_USER, Postgres

from dpanel_proto.token import parse_token
from dpanel_server.config import load_config
from dpanel_server.tunnel import MANAGER_USER
from stackfix import BIN, Stack
from support import free_port, stop_proc, wait_for

#: where each server binds its device ports: its own namespace's loopback (a distinct
#: address each, so that "127.0.0.1 instead of the bind address" stays a refused case)
BIND = {"ts-1": "127.0.0.2", "ts-2": "127.0.0.3"}
HOSTS = BIND  # (the names the assertions below use)
DEVICES = ("fl-1", "fl-2", "fl-3")
#: inside each server's namespace: nothing else listens there, so fixed ports are safe
SSH_PORT, METRICS_PORT = 2220, 9100
PORTS = {"ts-1": "31000-31499", "ts-2": "31500-31999"}


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


class Net:
    """The switch, the manager host's link to it, and one namespace per server and site."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100):02d}"
        self.tag = tag
        self.switch = f"dpfw{tag}"
        self.host_veth = f"dpf{tag}h"
        net = f"10.{160 + os.getpid() % 40}.{random.randrange(256)}"
        self.subnet = f"{net}.0/24"
        self.host_ip = f"{net}.1"
        self.ns = {name: f"dpft{tag}{i}" for i, name in enumerate(BIND, 1)}
        self.ns.update({dev: f"dpfd{tag}{i}" for i, dev in enumerate(DEVICES, 1)})
        self.ip = {name: f"{net}.{10 + i}" for i, name in enumerate(BIND, 1)}
        self.ip.update({dev: f"{net}.{20 + i}" for i, dev in enumerate(DEVICES, 1)})
        self.made: list[str] = []

    def up(self) -> None:
        sw = self.switch
        _run("ip", "netns", "add", sw)
        self.made.append(sw)
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        _run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", "p0",
             "netns", sw)
        _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_veth)
        _run("ip", "link", "set", self.host_veth, "up")
        _run("ip", "-n", sw, "link", "set", "p0", "master", "br0", "up")
        for i, (who, ns) in enumerate(self.ns.items(), 1):
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            _run("ip", "link", "add", f"p{i}", "netns", sw, "type", "veth", "peer", "name",
                 "eth0", "netns", ns)
            _run("ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip[who]}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_veth], capture_output=True)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def block(self, site: str, server: str) -> None:
        """The site's firewall drops every packet to ``server`` (which stays up for the
        manager: a partial partition)."""
        ns = self.ns[site]
        # "add" is idempotent for the table and chain: a second block adds one rule
        rules = ("add table inet dpfpart\n"
                 "add chain inet dpfpart out { type filter hook output priority 0; }\n"
                 f"add rule inet dpfpart out ip daddr {self.ip[server]} drop\n")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules.encode(),
                       check=True, capture_output=True, timeout=30)

    def unblock(self, site: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns[site], "nft", "delete", "table",
                        "inet", "dpfpart"], capture_output=True, timeout=30)

    def connects(self, where: str | None, host: str, port: int) -> bool:
        """Whether a TCP connection to host:port succeeds from ``where``'s namespace
        (None: the manager's host)."""
        code = ("import socket,sys\n"
                "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)\n"
                "except OSError:\n sys.exit(1)\n")
        argv = [sys.executable, "-c", code, host, str(port)]
        if where is not None:
            argv = ["ip", "netns", "exec", self.ns[where], *argv]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


class Fleet:
    def __init__(self, stack: Stack, net: Net) -> None:
        self.stack, self.net = stack, net
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def public(self) -> dict[str, str]:
        return {name: f"{self.net.ip[name]}:{SSH_PORT}" for name in BIND}

    def dir(self, name: str) -> Path:
        return self.stack.dir / "tunnel-servers" / name

    def start_server(self, name: str) -> None:
        """``dpanel tunnel serve`` in the server's own namespace: it reaches the manager
        over HTTPS and the registry (PostgreSQL) on the host's address."""
        s, d = self.stack, self.dir(name)
        d.mkdir(parents=True, exist_ok=True)
        s.cli_ok("tunnel-server", "add", name, "--secret-file", str(d / "secret"))
        cfg = load_config(s.config)
        argv = ["ip", "netns", "exec", self.net.ns[name], str(BIN / "dpanel"), "tunnel",
                "serve", "--manager", f"https://{cfg.manager.https_listen}",
                "--manager-ca", str(s.dir / "https" / "ca.crt"), "--name", name,
                "--secret-file", str(d / "secret"), "--registry", cfg.registry_url,
                "--listen", self.public[name], "--bind-host", BIND[name],
                "--ports", PORTS[name], "--state-dir", str(d),
                "--metrics-listen", f"{self.net.ip[name]}:{METRICS_PORT}"]
        # the 30 s safety poll is pushed out of reach: only the manager's push can cut off
        env = dict(os.environ, DPANEL_TUNNEL_SAFETY_POLL="3600")
        with (d / "tunnel.log").open("ab") as out:
            self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)  # ip netns exec execs: this is the server itself
        proc.wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            stop_proc(proc, signal.SIGKILL)

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
        return (self.dir(name) / "tunnel.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    tmp = tmp_path_factory.mktemp("fleet")
    net = Net()
    pg = Postgres(Path(tempfile.mkdtemp(prefix=f"dpanel-pg-{os.getpid()}-", dir="/tmp")))
    stack: Stack | None = None
    f: Fleet | None = None
    try:
        net.up()
        # the registry on PostgreSQL on the host, reached by the manager and every tunnel
        # server over the network (no shared file)
        pg.init()
        with (pg.data / "postgresql.conf").open("a") as conf_file:
            conf_file.write(f"listen_addresses = '127.0.0.1,{net.host_ip}'\n")
        with (pg.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {net.subnet} trust\n")  # the test's own switch only
        pg.start()
        # broker, built-in tunnel and HTTPS API on the host's address on the switch
        stack = Stack(dir=tmp / "st", broker_port=free_port(), tunnel_port=free_port(),
                      api_port=free_port(), public_host=net.host_ip,
                      registry=f"postgresql://{PG_USER}@{net.host_ip}:{pg.port}/postgres",
                      extra=("--https-listen", f"{net.host_ip}:{free_port()}"))
        stack.start()
        f = Fleet(stack, net)
        for name in BIND:
            f.start_server(name)
        for name in BIND:
            f.wait_up(name)
        conf = tmp / "agent.toml"
        conf.write_text('proxy = "none"\n')
        for dev in DEVICES:
            stack.start_agent(stack.enrol(dev), tmp / dev, netns=net.ns[dev],
                              extra=("--config", str(conf)))
        for dev in DEVICES:
            stack.wait_online(dev, 60)
        yield f
    finally:
        if f is not None:
            f.close()
        if stack is not None:
            stack.close()
        pg.stop("immediate")
        shutil.rmtree(pg.dir, ignore_errors=True)
        net.down()


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
    assert fleet.servers()["ts-1"]["public"] == fleet.public["ts-1"]


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
    # each server's own /metrics counts its own tunnels (fetched over the network)
    for name in HOSTS:
        url = f"http://{fleet.net.ip[name]}:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        line = next(x for x in text.splitlines() if x.startswith("dpanel_tunnel_ports_in_use"))
        assert float(line.split()[1]) >= 1, line
    # the device ports stay on each server's own loopback address
    for name, st in fleet.servers().items():
        assert st["public"] == fleet.public[name] and st["bind_host"] == HOSTS[name], st


def test_device_ports_are_reachable_only_inside_their_servers_namespace(
        fleet: Fleet) -> None:
    s, net = fleet.stack, fleet.net
    _exec(s, "fl-1")
    _exec(s, "fl-2")
    tunnels = json.loads(s.cli_ok("tunnel", "list", "--json"))
    checked = 0
    for dev in ("fl-1", "fl-2"):
        name, port = fleet.holder(dev), tunnels[dev]
        # the port is there: inside the server's namespace, on its bind address
        assert net.connects(name, HOSTS[name], port), (dev, name, port)
        # and nowhere else: not from the manager's host, not from a device's site,
        # neither at the server's address nor at the bind address
        for where in (None, "fl-3"):
            for host in (net.ip[name], HOSTS[name]):
                assert not net.connects(where, host, port), (where, host, port)
        # nor at the server's own address from inside (bound on loopback only)
        assert not net.connects(name, net.ip[name], port), (name, port)
        checked += 1
    assert checked == 2


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
                (fleet.net.host_ip, s.api_port),  # ... over the network
                (fleet.net.ip[b], port_b),     # B's device at B's network address
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


def test_a_site_that_cannot_reach_one_server_gets_the_other(fleet: Fleet) -> None:
    """A partial partition: server A is up (the manager hears it), but fl-2's site drops
    every packet to it. The open placed on A comes back naming A, and the same request is
    placed on B; with B blocked too, the error names both and why."""
    s, net, dev = fleet.stack, fleet.net, "fl-2"
    # a fresh open: the device's tunnel is on A now, and its placement is sticky there
    out = s.cli_ok("tunnel", "open", dev)
    a = out.strip().rsplit(" ", 1)[1]
    b = next(n for n in HOSTS if n != a)
    s.cli_ok("tunnel", "close", dev)
    net.block(dev, a)
    try:
        assert not net.connects(dev, net.ip[a], SSH_PORT)  # the rule holds
        assert net.connects(dev, net.ip[b], SSH_PORT)
        assert _exec(s, dev) == "hi-42"  # the operator's exec succeeds
        st = fleet.servers()
        assert st[a]["state"] == "up" and st[b]["state"] == "up", st
        # A was tried first, and is marked unreachable for this device only
        assert list(st[a]["unreachable_from"]) == [dev], st[a]
        assert "no TCP answer" in st[a]["unreachable_from"][dev], st[a]
        assert st[b]["unreachable_from"] == {}, st[b]
        # a caller of another scope is not told of this device's network
        admin = Path(load_config(s.config).manager.admin_token_file).read_text().strip()
        code, user = _http(s, "POST", "/v1/users", admin, {
            "name": "far-viewer-2", "role": "viewer", "scope": ["site=elsewhere"]})
        assert code == 201, user
        code, seen = _http(s, "GET", "/v1/tunnel-servers", user["token"])
        assert code == 200 and all(x["unreachable_from"] == {} for x in seen), seen
        assert s.cli_ok("tunnel", "open", dev).strip().endswith(f"of tunnel server {b}")
        agent_log = (s.dir.parent / dev / "agent.log").read_text(errors="replace")
        assert f"cannot reach tunnel server {fleet.public[a]}" in agent_log
        # another site still uses A
        assert _exec(s, "fl-1") == "hi-42"
        # both blocked: one line naming each server and why
        net.block(dev, b)
        s.cli_ok("tunnel", "close", dev)
        out2 = s.cli("exec", dev, "--", "true")
        err = out2.stderr.decode()
        assert out2.returncode != 0, err
        assert f"{dev} cannot reach any tunnel server" in err, err
        for name in (a, b):
            assert f"{name} ({fleet.public[name]}): up, but not reachable" in err, err
        assert err.count("no TCP answer") >= 2, err
    finally:
        net.unblock(dev)


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
