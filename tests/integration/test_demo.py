"""The README's first command, ``python3 tasks.py demo``, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "tests.demo", "--dir", str(tmp_path / "d")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    # both the cold and the warm exec printed the device's uname
    assert out.stdout.count("Linux") >= 2, out.stdout
    assert "step timings:" in out.stdout
