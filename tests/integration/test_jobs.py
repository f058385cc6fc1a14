"""Jobs on a real stack with six real agents: parts for offline devices run when they come
online, each exactly once, across a manager restart and an agent reconnecting mid-command;
max-errors, cancel and expiry."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from stackfix import Stack
from support import free_port, wait_for

N = 6
NAMES = [f"job-{i}" for i in range(N)]

#: finds the agent's --state-dir among the shell's ancestors (the agent's own process),
#: so that one job command writes to each device's own directory
_STATE_DIR = ('p=$$; sd=; while [ "$p" -gt 1 ]; do '
              "sd=$(tr '\\0' '\\n' < /proc/$p/cmdline | sed -n '/^--state-dir$/{n;p;q}'); "
              '[ -n "$sd" ] && break; p=$(cut -d" " -f4 /proc/$p/stat); done; ')


def _count_cmd(tag: str, then: str = "") -> str:
    return (_STATE_DIR + f'[ -e "$sd/fail-{tag}" ] && exit 3; echo run >> "$sd/runs-{tag}"; '
            + then)


class Fleet:
    def __init__(self, stack: Stack, root: Path) -> None:
        self.stack, self.root = stack, root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def state(self, name: str) -> Path:
        return self.root / name

    def start(self, name: str) -> None:
        self.procs[name] = self.stack.start_agent(self.stack.tokens[name], self.state(name))

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def runs(self, name: str, tag: str) -> int:
        f = self.state(name) / f"runs-{tag}"
        return len(f.read_text().splitlines()) if f.exists() else 0

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(json.loads(self.stack.cli_ok("job", "show", job_id, "--json")))

    def parts(self, job_id: str) -> dict[str, dict[str, Any]]:
        return {p["device"]: p for p in self.job(job_id)["parts"]}

    def run(self, *args: str) -> str:
        out = self.stack.cli_ok("job", "run", "--json", *args)
        return str(json.loads(out)["id"])

    def wait_parts(self, job_id: str, want: dict[str, str], timeout: float = 90) -> None:
        def done() -> bool:
            parts = self.parts(job_id)
            return all(parts[d]["state"] == s for d, s in want.items())
        wait_for(done, f"job {job_id} parts {want}", timeout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("jobs")
    s = Stack(dir=root / "stack", broker_port=free_port(), tunnel_port=free_port(),
              api_port=free_port())
    s.start()
    try:
        for name in NAMES:
            s.tokens[name] = s.cli_ok("device", "add", name, "--label", "site=jt",
                                      "--print-token").strip()
        yield Fleet(s, root)
    finally:
        s.close()


def test_offline_devices_run_once_across_a_manager_restart(fleet: Fleet) -> None:
    """Half the fleet is offline at the start; the manager restarts mid-job (one part
    running, cut: failed, not re-run); the rest still run, each exactly once."""
    online, later = NAMES[:3], NAMES[3:]
    for name in online:
        fleet.start(name)
    for name in online:
        fleet.stack.wait_online(name)
    job = fleet.run("--filter", "site=jt", "--max-concurrency", "2", "--max-errors", "0",
                    "--expires", "1h", "--", _count_cmd("a"))
    fleet.wait_parts(job, {d: "succeeded" for d in online})
    assert {p["state"] for d, p in fleet.parts(job).items() if d in later} == {"pending"}
    # a second job whose part is running when the manager goes down
    cut = fleet.run(NAMES[0], "--", _count_cmd("cut", "sleep 60"))
    wait_for(lambda: fleet.runs(NAMES[0], "cut") == 1, "the long part started", 60)
    fleet.stack.restart()
    for name in later:
        fleet.start(name)
    fleet.wait_parts(job, {d: "succeeded" for d in NAMES})
    assert fleet.job(job)["state"] == "finished"
    cut_part = fleet.parts(cut)[NAMES[0]]
    assert cut_part["state"] == "failed" and "restarted" in cut_part["reason"], cut_part
    for name in NAMES:
        fleet.stack.wait_online(name)
    # a later job on the same device runs: the pool and the scheduler are fine; and no
    # part ran twice, whatever reconnected
    probe = fleet.run(NAMES[0], "--", _count_cmd("probe"))
    fleet.wait_parts(probe, {NAMES[0]: "succeeded"})
    assert [fleet.runs(d, "a") for d in NAMES] == [1] * N
    assert fleet.runs(NAMES[0], "cut") == 1
    out = fleet.stack.cli_ok("job", "logs", job, "--device", NAMES[0])
    assert "succeeded (exit 0)" in out
    listed = json.loads(fleet.stack.cli_ok("job", "list", "--json"))
    assert {job, cut, probe} <= {j["id"] for j in listed}
    assert all(j["created_by"] == "admin" for j in listed)


def test_max_errors_stops_the_job(fleet: Fleet) -> None:
    for name in NAMES[:2]:
        (fleet.state(name) / "fail-b").touch()
    for name in NAMES:
        fleet.stack.wait_online(name)
    job = fleet.run("--all", "--max-concurrency", "1", "--max-errors", "1", "--",
                    _count_cmd("b"))
    wait_for(lambda: fleet.job(job)["state"] == "stopped", "job stopped", 90)
    parts = fleet.parts(job)
    assert [parts[d]["state"] for d in NAMES] == ["failed"] * 2 + ["cancelled"] * 4, parts
    assert [parts[d]["exit"] for d in NAMES[:2]] == [3, 3]
    assert {parts[d]["reason"] for d in NAMES[2:]} == {"max-errors reached"}
    assert sum(fleet.runs(d, "b") for d in NAMES) == 0


def test_cancel_hangs_up_running_parts(fleet: Fleet) -> None:
    for name in NAMES:
        fleet.stack.wait_online(name)
    job = fleet.run("--all", "--max-concurrency", "1", "--", _count_cmd("c", "sleep 60"))
    wait_for(lambda: sum(fleet.runs(d, "c") for d in NAMES) == 1, "one part running", 60)
    fleet.stack.cli_ok("job", "cancel", job)
    shown = fleet.job(job)
    assert shown["state"] == "cancelled"
    assert {p["state"] for p in shown["parts"]} == {"cancelled"}, shown["parts"]
    assert sum(fleet.runs(d, "c") for d in NAMES) == 1


def test_reconnect_mid_command_runs_nothing_twice(fleet: Fleet) -> None:
    dev = NAMES[4]
    fleet.stack.wait_online(dev)
    job = fleet.run(dev, "--", _count_cmd("d", "sleep 60"))
    wait_for(lambda: fleet.runs(dev, "d") == 1, "the part started", 60)
    fleet.kill(dev)
    fleet.start(dev)
    fleet.wait_parts(job, {dev: "failed"})
    fleet.stack.wait_online(dev)
    probe = fleet.run(dev, "--", _count_cmd("probe2"))
    fleet.wait_parts(probe, {dev: "succeeded"})
    assert fleet.runs(dev, "d") == 1
    assert "at most once" in fleet.parts(job)[dev]["reason"]


def test_expiry_of_an_offline_device(fleet: Fleet) -> None:
    dev = NAMES[5]
    fleet.kill(dev)
    fleet.stack.wait_offline(dev)
    job = fleet.run(dev, "--expires", "5s", "--", _count_cmd("e"))
    fleet.wait_parts(job, {dev: "expired"}, 60)
    assert fleet.job(job)["state"] == "expired"
    fleet.start(dev)
    fleet.stack.wait_online(dev)
    probe = fleet.run(dev, "--", _count_cmd("probe3"))
    fleet.wait_parts(probe, {dev: "succeeded"})  # it was online long enough to run it
    assert fleet.runs(dev, "e") == 0


def test_bad_input_names_the_flag(fleet: Fleet) -> None:
    for args, flag in ((["nope-device"], "nope-device"),
                       (["--all", "--expires", "7x"], "--expires"),
                       (["--all", "--max-errors", "150%"], "--max-errors"),
                       (["--all", "--max-concurrency", "0"], "--max-concurrency")):
        out = fleet.stack.cli("job", "run", *args, "--", "true")
        err = out.stderr.decode().strip()
        assert out.returncode != 0 and flag in err and len(err.splitlines()) == 1, err
    out = fleet.stack.cli("job", "show", "0123456789abcdef")
    assert out.returncode == 1 and "unknown job" in out.stderr.decode()
    for path in ("/v1/jobs", "/v1/jobs/0123456789abcdef"):  # no token: nothing
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{fleet.stack.api_port}{path}",
                                   timeout=30)
        assert err.value.code == 401


def test_output_is_capped_and_escaped(fleet: Fleet) -> None:
    """A huge output keeps 64 KiB of each stream (truncated: true); a device's escape
    sequences never reach the operator's terminal through `job logs`."""
    dev = NAMES[1]
    fleet.stack.wait_online(dev)
    job = fleet.run(dev, "--", "head -c 300000 /dev/zero | tr '\\0' x; "
                    "printf 'evil\\033]0;pwned\\007\\n' >&2")
    fleet.wait_parts(job, {dev: "succeeded"})
    part = fleet.parts(job)[dev]
    assert part["truncated"] is True
    logs = fleet.stack.cli_ok("job", "logs", job, "--device", dev)
    assert "x" * 65536 in logs and "x" * 65537 not in logs
    assert "evil" in logs and "\x1b" not in logs and "\x07" not in logs


def test_timeout_marks_the_part_timed_out(fleet: Fleet) -> None:
    dev = NAMES[2]
    fleet.stack.wait_online(dev)
    job = fleet.run(dev, "--timeout", "2s", "--", _count_cmd("t", "sleep 60"))
    fleet.wait_parts(job, {dev: "timed_out"})
    part = fleet.parts(job)[dev]
    assert part["exit"] is None and "timed out" in part["reason"], part
    assert fleet.runs(dev, "t") == 1
