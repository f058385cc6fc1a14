"""`dpanel stack up`: what it binds versus what tokens name, a broker that cannot start,
flags on an existing --dir, and the broker's log file (real stack, real Mosquitto)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import tomllib

from dpanel_proto.token import parse_token
from stackfix import BIN, Stack
from support import free_port, read_pid, wait_for


def _stack(tmp_path: Path, name: str = "stack", **kw: object) -> Stack:
    return Stack(tmp_path / name, free_port(), free_port(), free_port(), **kw)  # type: ignore[arg-type]


def _up(d: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`stack up` expected to stop by itself (a refusal)."""
    return subprocess.run([str(BIN / "dpanel"), "stack", "up", "--dir", str(d), *args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _listening(port: int) -> set[str]:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines()}


def test_advertise_names_the_tokens_and_binds_nothing_new(tmp_path: Path) -> None:
    """qemu's guests reach the host's loopback as 10.0.2.2: tokens say so, the stack
    still listens on 127.0.0.1 only (nothing ever dials 10.0.2.2 here)."""
    stack = _stack(tmp_path, advertise="10.0.2.2", extra=("--tls",))
    stack.start()
    try:
        tok = parse_token(stack.enrol("adv-dev"))
        assert tok.tunnel == f"10.0.2.2:{stack.tunnel_port}"
        assert tok.broker == f"mqtts://10.0.2.2:{stack.broker_port}"
        assert _listening(stack.broker_port) == {"127.0.0.1"}
        assert _listening(stack.tunnel_port) == {"127.0.0.1"}
        # the broker certificate carries the advertised name, so devices can verify it
        from cryptography import x509

        crt = x509.load_pem_x509_certificate((stack.dir / "tls" / "server.crt").read_bytes())
        san = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "10.0.2.2" in {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    finally:
        stack.close()


def test_public_host_that_is_not_local_is_refused_and_says_advertise(tmp_path: Path) -> None:
    res = _up(tmp_path / "s", "--public-host", "10.0.2.2", "--broker-port", str(free_port()))
    assert res.returncode == 2, res
    assert "--public-host 10.0.2.2: not an address of this machine" in res.stderr
    assert "--advertise 10.0.2.2" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args", [("--public-host", "0.0.0.0"), ("--advertise", "0.0.0.0"),
                                  ("--advertise", "::")])
def test_wildcard_is_never_advertised(tmp_path: Path, args: tuple[str, str]) -> None:
    res = _up(tmp_path / "s", *args, "--broker-port", str(free_port()))
    assert res.returncode == 2, res
    assert "no device can dial" in res.stderr and "--advertise" in res.stderr, res.stderr
    assert not (tmp_path / "s" / "server.toml").exists()


def test_listen_everywhere_advertise_one_name(tmp_path: Path) -> None:
    """--public-host 0.0.0.0 used to add a second Mosquitto listener on the same port
    (a crash loop) and write 0.0.0.0 into tokens."""
    stack = _stack(tmp_path, public_host="0.0.0.0", advertise="127.0.0.1")
    stack.start()
    try:
        assert _listening(stack.broker_port) == {"0.0.0.0"}
        assert _listening(stack.tunnel_port) == {"0.0.0.0"}
        token = stack.enrol("wild-dev")
        assert parse_token(token).tunnel == f"127.0.0.1:{stack.tunnel_port}"
        stack.start_agent(token, tmp_path / "wild-dev")
        stack.wait_online("wild-dev")
        assert stack.cli_ok("exec", "wild-dev", "--", "echo", "ok").strip() == "ok"
        pid = stack.broker_pid()
        time.sleep(2)
        assert stack.broker_pid() == pid, "the broker restarted"
        assert "mosquitto exited" not in stack.log()
    finally:
        stack.close()


def test_edited_public_url_changes_tokens_not_the_broker(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    stack.start()
    stack.stop()
    conf = stack.config.read_text()
    # TEST-NET-1: documentation only; nothing here ever dials it
    edited = conf.replace('public_url = "mqtt://127.0.0.1', 'public_url = "mqtt://192.0.2.7')
    assert edited != conf
    stack.config.write_text(edited)
    stack.start()
    try:
        assert parse_token(stack.enrol("edit-dev")).broker.startswith("mqtt://192.0.2.7:")
        assert _listening(stack.broker_port) == {"127.0.0.1"}
        pid = stack.broker_pid()
        time.sleep(2)
        assert stack.broker_pid() == pid and "mosquitto exited" not in stack.log()
    finally:
        stack.close()


def test_broker_that_cannot_start_stops_the_stack_with_its_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        t0 = time.monotonic()
        res = _up(tmp_path / "s", "--broker-port", str(port), "--tunnel-port",
                  str(free_port()), "--api-port", str(free_port()))
    assert res.returncode == 2, res
    assert "mosquitto exited with" in res.stderr
    assert "Address already in use" in res.stderr, res.stderr  # Mosquitto's own words
    assert time.monotonic() - t0 < 30


def test_broker_that_cannot_come_back_stops_the_stack(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    stack.start()
    try:
        assert stack.proc is not None
        os.kill(stack.broker_pid(), signal.SIGKILL)
        # take its port before the supervisor restarts it (it waits >= 0.5 s)
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            wait_for(lambda: _try_bind(squatter, stack.broker_port), "the broker's port", 5,
                     interval=0.01)
            squatter.listen()
            rc = stack.proc.wait(60)
        assert rc != 0
        log = stack.log()
        assert "Address already in use" in log, log[-2000:]
        assert "dpanel: mosquitto" in log
    finally:
        stack.close()


def _try_bind(s: socket.socket, port: int) -> bool:
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def test_flags_on_an_existing_dir_are_applied(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    stack.start()
    stack.stop()
    stack.advertise = "127.0.0.9"
    stack.keepalive = 4.0
    stack.start()
    try:
        cfg = tomllib.loads(stack.config.read_text())
        assert cfg["tunnel"]["public_address"] == f"127.0.0.9:{stack.tunnel_port}"
        assert cfg["tunnel"]["keepalive_interval"] == 4.0
        assert parse_token(stack.enrol("flag-dev")).tunnel == f"127.0.0.9:{stack.tunnel_port}"
        log = stack.log()
        assert "applying to" in log and "advertise 127.0.0.1 -> 127.0.0.9" in log, log
        assert "keepalive_interval 15.0 -> 4.0" in log
    finally:
        stack.close()
    # no flags: nothing changes
    before = stack.config.read_text()
    res = subprocess.Popen([str(BIN / "dpanel"), "stack", "up", "--dir", str(stack.dir)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: stack.cli("device", "list").returncode == 0, "stack up", 60)
    finally:
        res.send_signal(signal.SIGTERM)
        out = res.communicate(30)[0].decode()
    assert stack.config.read_text() == before
    assert "applying" not in out


def test_broker_restarts_do_not_leak_the_log_file(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    stack.start()
    try:
        assert stack.proc is not None
        for _ in range(3):
            pid = stack.broker_pid()
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda p=pid: read_pid(stack.dir / "mosquitto" / "mosquitto.pid")
                     not in (None, p) and stack.cli("device", "list").returncode == 0,
                     "broker restarted", 30)
        fd_dir = Path(f"/proc/{stack.proc.pid}/fd")
        logs = [fd for fd in fd_dir.iterdir()
                if os.readlink(fd).endswith("mosquitto.log")]
        assert logs == [], "the stack keeps the broker's log file open"
        assert stack.proc.poll() is None
    finally:
        stack.close()
