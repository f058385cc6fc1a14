"""Shared fixtures: free loopback ports and a real Mosquitto broker per test."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from dpanel_server.broker import mosquitto_hash, render_acl, render_mosquitto_conf, render_passwd
from stackfix import Stack
from support import free_port, wait_port

#: fixture modules shared by several directories, loaded once under the name their users
#: import (``agent_arm64`` from imagefix; ``world``, ``manager_key``, ``echo_server``,
#: ``procs`` from agentfix), instead of re-exporting fixtures through test modules
pytest_plugins = ["imagefix", "agentfix", "pgfix"]


@dataclass
class Mosquitto:
    """A real mosquitto process with a password file and the dpanel pattern ACL."""

    dir: Path
    port: int
    manager_user: str = "dpanel-manager"
    manager_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    users: dict[str, str] = field(default_factory=dict)  # name -> $7$ hash
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def passwd(self) -> Path:
        return self.dir / "passwd"

    @property
    def log(self) -> Path:
        return self.dir / "mosquitto.log"

    def _write(self) -> None:
        entries = [*self.users.items(), (self.manager_user, mosquitto_hash(self.manager_password))]
        self.passwd.write_text(render_passwd(entries))
        (self.dir / "acl").write_text(render_acl(self.manager_user))

    def add_user(self, name: str, secret: str) -> None:
        self.users[name] = mosquitto_hash(secret)
        self._write()
        self.reload()

    def remove_user(self, name: str) -> None:
        self.users.pop(name, None)
        self._write()
        self.reload()

    def reload(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()
        conf = self.dir / "mosquitto.conf"
        conf.write_text(render_mosquitto_conf(port=self.port, passwd=self.passwd,
                                              acl=self.dir / "acl",
                                              pid_file=self.dir / "mosquitto.pid"))
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)],
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (python3 tasks.py test installs it)")
    broker = Mosquitto(dir=tmp_path / "mosquitto", port=free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(signal.SIGKILL if os.environ.get("DPANEL_FAST_KILL") else signal.SIGTERM)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A real `dpanel stack up` on free loopback ports; agents started from it die with it."""
    s = Stack(dir=tmp_path / "stack", broker_port=free_port(), tunnel_port=free_port(),
              api_port=free_port())
    s.start()
    try:
        yield s
    finally:
        s.close()
