"""The rollback hook (systemd/dpanel-tunnel-rollback, POSIX sh) judges the commit deadline
by time since boot, so a board without an RTC neither reverts a good update when NTP
moves its clock nor keeps a bad one; after a reboot the trial gets a fresh window."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

HOOK = Path(__file__).resolve().parents[3] / "systemd" / "dpanel-tunnel-rollback"
BOOT = "6f0a8f9e-0000-4000-8000-00000000aaaa"


def _kv(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    (tmp_path / "state/update").mkdir(parents=True)
    for s in ("a", "b"):
        (tmp_path / f"root/slots/{s}").mkdir(parents=True)
    (tmp_path / "root/current").symlink_to("slots/b")
    (tmp_path / "proc/sys/kernel/random").mkdir(parents=True)
    return tmp_path


def _run(dev: Path, mode: str, *, uptime: float, boot: str = BOOT, wall_deadline: int = 0,
         record: dict[str, str] | None = None) -> int:
    (dev / "proc/uptime").write_text(f"{uptime:.2f} 1.00\n")
    (dev / "proc/sys/kernel/random/boot_id").write_text(boot + "\n")
    if record is not None:
        body = {"version": "0.3.0", "slot": "b", "previous": "a", "starts": "0",
                "deadline": str(wall_deadline), "from_version": "0.2.0", **record}
        (dev / "state/update/pending").write_text(
            "".join(f"{k}={v}\n" for k, v in body.items()))
    return subprocess.run(["sh", str(HOOK), mode, str(dev / "state"), str(dev / "root")],
                          env={"PATH": "/usr/bin:/bin", "DPANEL_PROC": str(dev / "proc")},
                          capture_output=True, text=True, timeout=30).returncode


def _trial(up_deadline: int) -> dict[str, str]:
    return {"boot_id": BOOT, "deadline_up": str(up_deadline), "window": "300"}


def test_within_the_window_nothing_happens_even_if_the_wall_clock_jumped(dev: Path) -> None:
    # NTP moved the clock far past the wall deadline: irrelevant, 100 s of 400 are gone
    assert _run(dev, "check", uptime=100, wall_deadline=1, record=_trial(400)) == 1
    assert (dev / "root/current").readlink() == Path("slots/b")
    assert _kv(dev / "state/update/pending")["deadline_up"] == "400"


def test_past_the_window_it_reverts(dev: Path) -> None:
    assert _run(dev, "check", uptime=401, wall_deadline=2**40, record=_trial(400)) == 0
    assert (dev / "root/current").readlink() == Path("slots/a")
    assert not (dev / "state/update/pending").exists()
    last = _kv(dev / "state/update/last")
    assert last["state"] == "rolled_back" and "commit deadline" in last["reason"]


def test_a_reboot_restarts_the_window_but_not_the_start_count(dev: Path) -> None:
    other = "6f0a8f9e-0000-4000-8000-00000000bbbb"
    # the old boot's deadline (400) means nothing after a reboot: 300 s from now (20 s up)
    assert _run(dev, "pre", uptime=20, boot=other, record={**_trial(400), "starts": "1"}) == 1
    rec = _kv(dev / "state/update/pending")
    assert (rec["boot_id"], rec["deadline_up"], rec["starts"]) == (other, "320", "2")
    assert _run(dev, "pre", uptime=30, boot=other) == 1  # start 3 of 3
    assert _run(dev, "pre", uptime=40, boot=other) == 0  # the 4th start reverts
    assert "in 3 starts" in _kv(dev / "state/update/last")["reason"]


def test_an_old_record_without_boot_id_uses_the_wall_clock(dev: Path) -> None:
    assert _run(dev, "check", uptime=5, wall_deadline=2**40, record={}) == 1
    assert _run(dev, "check", uptime=5, wall_deadline=1, record={}) == 0
