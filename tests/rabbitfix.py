"""Real RabbitMQ nodes from Debian's rabbitmq-server, clustered on loopback, for tests.

Each node has its own name (``a-PID@localhost``), AMQP/MQTT/distribution ports, Mnesia and
log directories and config in a temp dir, and the cluster has its own epmd port and
Erlang cookie, so that nothing is shared with another run (or a system RabbitMQ). The
node scripts are run directly (Debian's /usr/sbin wrappers switch to the rabbitmq user).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from support import free_port, stop_proc, wait_for


def _ports(n: int) -> list[int]:
    """n distinct free ports (support.free_port keeps below the ephemeral range)."""
    out: list[int] = []
    while len(out) < n:
        port = free_port()
        if port not in out:
            out.append(port)
    return out


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_backend_http")


def available() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists() and shutil.which("erl") is not None


@dataclass
class Node:
    name: str
    dir: Path
    amqp_port: int
    mqtt_port: int
    dist_port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)

    def ctl_ok(self, *args: str) -> str:
        out = self.ctl(*args)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.stdout

    def start(self) -> None:
        self.launch()
        self.wait_up()

    def launch(self) -> None:
        log = (self.dir / "node.log").open("ab")
        self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_up(self) -> None:
        proc = self.proc
        assert proc is not None

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"rabbitmq node {self.name} exited:\n" + self.log()[-3000:])
            return _accepts(self.mqtt_port)

        wait_for(up, f"rabbitmq {self.name} MQTT listener", 120, interval=0.5)

    def kill(self) -> None:
        """SIGKILL the whole node (beam and its epmd-less children): a crash, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.ctl("stop", timeout=60)
            stop_proc(self.proc, signal.SIGTERM)
        self.kill()

    def log(self) -> str:
        parts = [p.read_text(errors="replace") for p in sorted(self.dir.glob("**/*.log"))]
        return "\n".join(parts)


@dataclass
class Cluster:
    dir: Path
    auth_port: int
    auth_secret: str
    epmd_port: int = field(default_factory=lambda: _ports(1)[0])
    nodes: list[Node] = field(default_factory=list)

    def conf(self, node: Node, peers: list[str]) -> str:
        base = f"http://127.0.0.1:{self.auth_port}/brokerauth/{self.auth_secret}"
        # peers known up front: the nodes form the cluster by themselves as they boot
        # (no stop_app / join_cluster round trips, each a slow rabbitmqctl)
        discovery = ["cluster_formation.peer_discovery_backend = classic_config",
                     *(f"cluster_formation.classic_config.nodes.{i} = {p}"
                       for i, p in enumerate(peers, 1))]
        return "\n".join([*discovery,
            f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}",
            "mqtt.allow_anonymous = false",
            "mqtt.vhost = /",
            "mqtt.exchange = amq.topic",
            "loopback_users = none",
            "auth_backends.1 = http",
            "auth_http.http_method = post",
            f"auth_http.user_path = {base}/user",
            f"auth_http.vhost_path = {base}/vhost",
            f"auth_http.resource_path = {base}/resource",
            f"auth_http.topic_path = {base}/topic",
            "log.console = true",
            "log.console.level = warning",
            "log.file = false",
            "",
        ])

    def add_nodes(self, *shorts: str) -> list[Node]:
        nodes = [self.add_node(s) for s in shorts]
        for node in nodes:
            (node.dir / "rabbitmq.conf").write_text(self.conf(node, [n.name for n in nodes]))
        return nodes

    def start(self) -> None:
        """Boot every node at once (each takes 10-30 s on a loaded machine), then wait
        until they see each other."""
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_up()
        want = {n.name for n in self.nodes}
        wait_for(lambda: want <= set(self.running()), "cluster formed", 120, interval=1)

    def running(self) -> list[str]:
        out = self.nodes[0].ctl("eval", "rabbit_nodes:all_running().")
        return [t.strip(" '[]\n") for t in out.stdout.split(",")] if out.returncode == 0 else []

    def add_node(self, short: str) -> Node:
        ndir = self.dir / short
        ndir.mkdir(parents=True)
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)
        name = f"{short}{os.getpid()}@localhost"
        # distinct from each other, the epmd port and every other node's ports
        used = {self.epmd_port, *(p for n in self.nodes
                                  for p in (n.amqp_port, n.mqtt_port, n.dist_port))}
        amqp, mqtt_port, dist = next(ps for ps in iter(lambda: _ports(3), None)
                                     if not used & set(ps))
        node = Node(name=name, dir=ndir, amqp_port=amqp, mqtt_port=mqtt_port, dist_port=dist,
                    env={})
        (ndir / "enabled_plugins").write_text("[" + ",".join(PLUGINS) + "].\n")
        node.env = dict(
            os.environ, HOME=str(home), RABBITMQ_NODENAME=name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(node.amqp_port),
            RABBITMQ_DIST_PORT=str(node.dist_port), ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(ndir / "mnesia"), RABBITMQ_LOG_BASE=str(ndir / "log"),
            RABBITMQ_CONFIG_FILE=str(ndir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(ndir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(ndir / "pid"), ERL_CRASH_DUMP=str(ndir / "erl_crash.dump"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(ndir / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(ndir / "rabbitmq-env.conf"),
        )
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        # the cluster's own epmd, started by the first node with our ERL_EPMD_PORT
        mark = f"ERL_EPMD_PORT={self.epmd_port}".encode()
        for proc in Path("/proc").iterdir():
            try:
                if (b"epmd" in (proc / "cmdline").read_bytes()
                        and mark in (proc / "environ").read_bytes().split(b"\0")):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue
