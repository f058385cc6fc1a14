"""`dpanel exec` and the exec API on a real stack with a real agent: big outputs that must
not freeze the manager, silent commands, stdin, hang-ups, fan-out for a tired operator."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from stackfix import BIN, Stack
from support import free_port, wait_for


@pytest.fixture
def hb_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A stack whose exec heartbeat is 1 s, with a CLI that takes 4 s of silence for a
    dead manager: the 15 s / 60 s defaults, scaled down so the test runs in seconds."""
    monkeypatch.setenv("DPANEL_EXEC_HEARTBEAT", "1")
    monkeypatch.setenv("DPANEL_STREAM_TIMEOUT", "4")
    s = Stack(dir=tmp_path / "stack", broker_port=free_port(), tunnel_port=free_port(),
              api_port=free_port())
    s.start()
    try:
        yield s
    finally:
        s.close()


def _device(stack: Stack, tmp_path: Path, name: str = "dev-1") -> str:
    stack.start_agent(stack.enrol(name), tmp_path / name)
    stack.wait_online(name)
    return name


def _token(stack: Stack) -> str:
    return (stack.dir / "keys" / "admin.token").read_text().strip()


def _post(stack: Stack, path: str, body: object,
          timeout: float = 120) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://127.0.0.1:{stack.api_port}{path}",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {_token(stack)}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _pids_of(argv: list[str]) -> list[int]:
    """Processes on this host (the agent runs here) whose command line is ``argv``."""
    want = "\0".join(argv).encode() + b"\0"
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes() == want:
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def test_huge_output_never_stalls_the_manager(stack: Stack, tmp_path: Path) -> None:
    """A2: 150 MB through a fan-out (and the non-stream API) while /v1/health answers."""
    dev = _device(stack, tmp_path)
    health: list[tuple[float, float]] = []  # (sent, answered)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{stack.api_port}/v1/health",
                                        timeout=120) as r:
                r.read()
            health.append((t0, time.monotonic()))
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out_dir = tmp_path / "out"
    t_start = time.monotonic()
    out = stack.cli("exec", "--all", "--out-dir", str(out_dir), "--",
                    "head", "-c", "150M", "/dev/zero", timeout=300)
    t_end = time.monotonic()
    stop.set()
    poller.join(130)
    assert out.returncode == 0, out
    text = out.stdout.decode()
    assert "1/1 succeeded: 1 ok" in text
    assert f"output truncated at 1 MB on 1 device(s) ({dev}); full output in {out_dir}" in text
    assert (out_dir / f"{dev}.stdout").stat().st_size == 150 << 20
    assert (out_dir / f"{dev}.exit").read_text() == "0\n"
    # at least one health call was sent after the transfer began and answered before it
    # ended (the old code froze the API for the whole rebuild of the output)
    during = [(a, b) for a, b in health if a > t_start + 0.5 and b < t_end - 0.2]
    assert during, (health, t_start, t_end)

    # the one-shot API keeps max_output bytes, says so, and still reports the exit status
    status, r = _post(stack, f"/v1/devices/{dev}/exec",
                      {"command": "head -c 120M /dev/zero; exit 3", "stream": False,
                       "max_output": 1 << 20})
    assert status == 200, r
    assert r["exit"] == 3 and r["truncated"] is True and r["stdout_bytes"] == 120 << 20
    assert base64.b64decode(str(r["stdout_b64"])) == b"\0" * (1 << 20)


def test_binary_output_and_bad_exec_requests(stack: Stack, tmp_path: Path) -> None:
    """B9 (binary intact in the non-stream answer) and B10 (422 naming the field)."""
    dev = _device(stack, tmp_path)
    status, r = _post(stack, f"/v1/devices/{dev}/exec",
                      {"command": ["printf", r"\377\376ok"], "stream": False})
    assert status == 200 and base64.b64decode(str(r["stdout_b64"])) == b"\xff\xfeok", r
    assert r["truncated"] is False and r["exit"] == 0
    for body, field in (({"command": "cat", "stdin": "!!not base64!!"}, "stdin"),
                        ({"command": []}, "command"),
                        ({"command": "true", "timeout": -1}, "timeout"),
                        ({"command": "true", "max_output": -5}, "max_output")):
        status, r = _post(stack, f"/v1/devices/{dev}/exec", body)
        assert status == 422 and r["code"] == "invalid", (body, r)
        assert str(r["error"]).startswith(field), r
    # --json for one device: the same shape as a fan-out, output byte-exact
    out = stack.cli("exec", "--json", dev, "--", "printf", r"\377\376ok")
    assert out.returncode == 0, out
    res = json.loads(out.stdout)[dev]
    assert res["exit"] == 0 and base64.b64decode(res["stdout_b64"]) == b"\xff\xfeok"


def test_silent_command_outlives_the_read_timeout(hb_stack: Stack, tmp_path: Path) -> None:
    """B1: 8 s of silence, twice the CLI's 4 s read timeout: heartbeats keep it alive."""
    dev = _device(hb_stack, tmp_path)
    out = hb_stack.cli("exec", dev, "--", "sh", "-c", "sleep 8; echo done")
    assert out.returncode == 0 and out.stdout == b"done\n", out
    # --timeout is the server's, end to end, and it stops the command
    t0 = time.monotonic()
    out = hb_stack.cli("exec", "--timeout", "2", dev, "--", "sleep", "30.4242")
    assert out.returncode == 255 and b"timed out after 2 s" in out.stderr, out
    assert time.monotonic() - t0 < 20
    wait_for(lambda: not _pids_of(["sleep", "30.4242"]), "timed-out command gone", 10)
    # a manager that stops answering is still noticed (no heartbeat for 4 s)
    proc = subprocess.Popen([str(BIN / "dpanel"), "exec", dev, "--", "sleep", "30"],
                            env=hb_stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    time.sleep(3)
    assert hb_stack.proc is not None
    hb_stack.proc.send_signal(signal.SIGSTOP)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        hb_stack.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 255 and b"stopped answering" in err, err


def test_stdin_eof_and_streamed_stdin(stack: Stack, tmp_path: Path) -> None:
    """B2: no -i = EOF at once, even with our stdin open; -i streams it, then EOF."""
    dev = _device(stack, tmp_path)
    proc = subprocess.Popen([str(BIN / "dpanel"), "exec", dev, "--", "cat"], env=stack.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.wait(30)  # our stdin stays open: the remote cat must see EOF anyway
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else None
    out2 = stack.cli("exec", "-i", dev, "--", "cat", input=b"hi\n")
    assert out2.returncode == 0 and out2.stdout == b"hi\n", out2
    out2 = stack.cli("exec", dev, "-i", "cat", input=b"no dashes\n")  # ssh-like order
    assert out2.returncode == 0 and out2.stdout == b"no dashes\n", out2


def test_big_streamed_stdin_arrives_intact(stack: Stack, tmp_path: Path) -> None:
    dev = _device(stack, tmp_path)
    data = os.urandom(50 << 20)
    target = tmp_path / "received.bin"
    out2 = stack.cli("exec", "-i", dev, "--", "sh", "-c", f"cat > {target}", input=data,
                     timeout=300)
    assert out2.returncode == 0, out2
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_big_stdin_to_a_slow_reader(stack: Stack, tmp_path: Path) -> None:
    dev = _device(stack, tmp_path)
    data = os.urandom(50 << 20)
    out = stack.cli("exec", "-i", dev, "--", "sha256sum", input=data, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[0].decode() == \
        hashlib.sha256(data).hexdigest(), out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_killing_dpanel_exec_ends_the_remote_command(stack: Stack, tmp_path: Path,
                                                     sig: signal.Signals) -> None:
    """B3: the remote command goes when `dpanel exec` goes, however it goes."""
    dev = _device(stack, tmp_path)
    for fan_out in (False, True):
        marker = ["sleep", f"600.{os.getpid()}{int(sig)}{int(fan_out)}"]
        argv = [str(BIN / "dpanel"), "exec", *(["--all"] if fan_out else [dev]), "--",
                *marker]
        # SIGINT at its default, as for a command in a terminal's foreground: a suite run
        # in the background (`cmd &`) has it ignored, and ignoring it is then right
        proc = subprocess.Popen(argv, env=stack.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        wait_for(lambda m=marker: _pids_of(m), "remote sleep started", 30)  # type: ignore[misc]
        proc.send_signal(sig)
        proc.wait(30)
        if sig != signal.SIGKILL:
            assert proc.returncode == 128 + int(sig), (proc.returncode, proc.stderr)
            assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
        wait_for(lambda m=marker: not _pids_of(m),  # type: ignore[misc]
                 f"remote {marker} gone after {sig.name}", 15)


def test_fan_out_for_an_operator(stack: Stack, tmp_path: Path) -> None:
    """B9: prefixed whole lines, per-device files, outcome breakdown, --fail-fast."""
    names = [_device(stack, tmp_path, f"fo-{i}") for i in range(3)]
    stack.enrol("fo-zz-offline")
    script = ('for i in 1 2 3; do printf "line$i "; sleep 0.1; echo end$i; done; '
              'echo oops >&2; exit 0')
    out = stack.cli("exec", "--filter", "fo-*", "-p", "--", "sh", "-c", script)
    assert out.returncode == 1, out  # the offline one
    lines = out.stdout.decode().splitlines()
    for name in names:
        got = [ln for ln in lines if ln.startswith(f"{name}: ")]
        assert got == [f"{name}: line{i} end{i}" for i in (1, 2, 3)], lines
        assert f"{name}: oops".encode() in out.stderr
    assert "3/4 succeeded: 3 ok, 1 offline" in out.stdout.decode()

    out_dir = tmp_path / "results"
    out = stack.cli("exec", "--filter", "fo-*", "--out-dir", str(out_dir), "--", "sh", "-c",
                    'echo "$0"; exit 2', "x")
    assert "0/4 succeeded: 3 exit 2, 1 offline" in out.stdout.decode(), out
    for name in names:
        assert (out_dir / f"{name}.stdout").read_text() == "x\n"
        assert (out_dir / f"{name}.stderr").read_text() == ""
        assert (out_dir / f"{name}.exit").read_text() == "2\n"
    assert (out_dir / "fo-zz-offline.exit").read_text().startswith("error offline: ")
    assert not list(out_dir.glob(".*"))  # no temporaries left behind

    out = stack.cli("exec", "--filter", "fo-*", "-j", "1", "--fail-fast", "--json", "--",
                    "false")
    res = json.loads(out.stdout)
    assert out.returncode == 1
    assert sum(1 for r in res.values() if r.get("code") == "not_run") == 3, res


def test_streamed_stdin_may_take_longer_than_the_request_deadline(stack: Stack,
                                                                   tmp_path: Path) -> None:
    """-i with a slow producer: the API's 30 s request deadline (slowloris guard) must not
    cut a request body that is an exec's stdin, once the exec is answering."""
    dev = _device(stack, tmp_path)
    out = subprocess.run(f"(echo a; sleep 35; echo b) | {BIN / 'dpanel'} exec -i {dev} -- cat",
                         shell=True, env=stack.env, capture_output=True, timeout=120)
    assert out.returncode == 0 and out.stdout == b"a\nb\n", out
