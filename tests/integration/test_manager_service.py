"""`dpanel manager run` under a (real) systemd notify socket: READY=1 means on the broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

from conftest import Mosquitto
from dpanel_server.config import stack_config
from dpanel_server.stack import dump_config
from stackfix import BIN
from support import free_port, stop_proc, wait_for


def _recv_all(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_only_once_the_broker_is_connected(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cfg = stack_config(state, broker_port=free_port(), tunnel_port=free_port(),
                       api_port=free_port())
    conf = state / "server.toml"
    conf.write_text(dump_config(cfg))
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    log = tmp_path / "manager.log"
    proc = subprocess.Popen(
        [str(BIN / "dpanel"), "--config", str(conf), "manager", "run", "--log-level", "info"],
        env=dict(os.environ, NOTIFY_SOCKET=str(notify_path)), stdout=log.open("ab"),
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    broker: Mosquitto | None = None
    got: list[str] = []
    try:
        wait_for(lambda: got.extend(_recv_all(sock)) or any("waiting for the broker" in m
                                                           for m in got),
                 "STATUS=waiting for the broker", 30)
        # the old manager gave up waiting after 30 s and said READY anyway
        wait_for(lambda: log.read_text().count("still waiting for the broker") >= 3,
                 "three 10 s waits", 60, interval=0.5)
        got += _recv_all(sock)
        assert not any("READY=1" in m for m in got), got
        assert proc.poll() is None
        pw = Path(cfg.broker.password_file).read_text().strip()
        broker = Mosquitto(dir=tmp_path / "mosquitto", port=cfg.broker.host_port[1],
                           manager_password=pw)
        broker.start()
        wait_for(lambda: got.extend(_recv_all(sock)) or any("READY=1" in m for m in got),
                 "READY=1 once the broker is up", 60)
        broker.stop(signal.SIGKILL)
        wait_for(lambda: got.extend(_recv_all(sock)) or any("broker unreachable" in m
                                                           for m in got),
                 "STATUS says the broker is gone", 30)
        assert proc.poll() is None, "the manager keeps running without its broker"
    finally:
        stop_proc(proc)
        if broker is not None:
            broker.stop(signal.SIGKILL)
        sock.close()
    text = log.read_text()
    assert "Traceback" not in text, text
