"""Test helpers that run the real thing: ``dpanel stack up`` and ``dpanel-tunnel`` agents."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import read_pid, stop_proc, wait_for

BIN = Path(sys.executable).parent


@dataclass
class Stack:
    """A real stack (mosquitto + tunnel + manager + API) in ``dir`` on free ports."""

    dir: Path
    broker_port: int
    tunnel_port: int
    api_port: int
    port_range: str = "30000-30999"
    public_host: str | None = None
    #: what tokens name, if not where the stack listens (``stack up --advertise``)
    advertise: str | None = None
    keepalive: float = 15.0
    #: also serve the API over HTTPS on 127.0.0.1:https_port (``--https-listen``)
    https_port: int | None = None
    extra: tuple[str, ...] = ()
    #: ``stack up --registry URL`` (None: the SQLite file in dir)
    registry: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.dir / "server.toml"

    @property
    def env(self) -> dict[str, str]:
        # the operator's SSH key of `dpanel ssh`/`ssh-config` (certificates) lives in the
        # stack dir, never in the real ~/.ssh or ~/.config of whoever runs the tests
        return dict(os.environ, DPANEL_CONFIG=str(self.config),
                    DPANEL_SSH_KEY=str(self.dir / "operator" / "id_ed25519"))

    def proxy_command(self) -> str:
        exe, conf = shlex.quote(str(BIN / "dpanel")), shlex.quote(str(self.config))
        return f"{exe} --config {conf} proxy %n"

    def start(self) -> None:
        argv = [str(BIN / "dpanel"), "stack", "up", "--dir", str(self.dir),
                "--broker-port", str(self.broker_port), "--tunnel-port", str(self.tunnel_port),
                "--api-port", str(self.api_port), "--port-range", self.port_range,
                "--log-level", "info", "--keepalive-interval", str(self.keepalive)]
        if self.public_host:
            argv += ["--public-host", self.public_host]
        if self.advertise:
            argv += ["--advertise", self.advertise]
        if self.https_port:
            argv += ["--https-listen", f"127.0.0.1:{self.https_port}"]
        if self.registry:
            argv += ["--registry", self.registry]
        argv += self.extra
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir.parent / f"{self.dir.name}-stack.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:  # say why at once instead of waiting out the timeout
                raise RuntimeError(f"dpanel stack up exited with {proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            return self.config.exists() and self.cli("device", "list").returncode == 0

        wait_for(up, "stack API up", 60)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc:
            stop_proc(self.proc, sig)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        p = self.dir.parent / f"{self.dir.name}-stack.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def cli(self, *args: str, input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(BIN / "dpanel"), *args], env=self.env, capture_output=True,
                              input=input, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def cli_ok(self, *args: str) -> str:
        out = self.cli(*args)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.stdout.decode()

    def enrol(self, name: str) -> str:
        self.tokens[name] = self.cli_ok("device", "add", name, "--print-token").strip()
        return self.tokens[name]

    def device(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cli_ok("device", "show", name)))

    def start_agent(self, token: str, state: Path, *, netns: str | None = None,
                    extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        state.mkdir(parents=True, exist_ok=True)
        argv = [str(BIN / "dpanel-tunnel"), "--state-dir", str(state), "--log-level", "debug",
                *extra, token]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        log = (state / "agent.log").open("ab")
        # own process group, so that close() also reaches what a launcher (ip netns exec,
        # a frozen onefile binary) started beneath it
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.agents.append(proc)
        return proc

    def wait_online(self, name: str, timeout: float = 30) -> dict[str, Any]:
        return dict(wait_for(lambda: (d := self.device(name))["online"] and d,
                             f"{name} online", timeout))

    def wait_offline(self, name: str, timeout: float = 60) -> None:
        wait_for(lambda: not self.device(name)["online"], f"{name} offline", timeout)

    def health(self) -> dict[str, Any]:
        """GET /v1/health, or {} while the API does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/v1/health",
                                        timeout=5) as r:
                return dict(json.loads(r.read()))
        except OSError:
            return {}

    def broker_pid(self) -> int:
        """The running Mosquitto's pid, waiting out a restart's empty pid file."""
        pid: int = wait_for(lambda: read_pid(self.dir / "mosquitto" / "mosquitto.pid"),
                            "mosquitto's pid file", 30)
        return pid

    def ports_in_use(self) -> int:
        return int(self.health().get("tunnel", {}).get("ports_in_use", -1))

    def close(self) -> None:
        for a in self.agents:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(a.pid, signal.SIGKILL)
            stop_proc(a, signal.SIGKILL)
        self.stop()
