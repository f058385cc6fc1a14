"""build-agent --update-key: the bundle of a frozen agent, for both layouts, as the
manager's `dpanel agent import` takes it (the freeze itself is faked here; the qemu
system test rolls a really frozen arm64 onedir bundle out)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest
from imagefix import fake_agent

from dpanel_image.errors import ImageError
from dpanel_image.freeze import FreezeMode, FreezeResult, bundle_agent
from dpanel_server.updates import BundleStore

ROOT = Path(__file__).resolve().parents[3]


def _frozen(dist: Path, mode: FreezeMode) -> FreezeResult:
    if mode == "onefile":
        (dist / "arm64").mkdir(parents=True)
        exe = fake_agent(dist / "arm64" / "dpanel-tunnel", "arm64")
    else:
        top = dist / "arm64" / "dpanel-tunnel.d"
        (top / "_internal").mkdir(parents=True)
        exe = fake_agent(top / "dpanel-tunnel", "arm64")
        (top / "_internal" / "libpython3.9.so.1.0").write_bytes(b"\0" * 1000)
    return FreezeResult("arm64", mode, exe, True, 0.0, dist / "root")


@pytest.mark.parametrize("mode", ["onedir", "onefile"])
def test_bundle_of_a_frozen_agent_is_imported_by_the_manager(tmp_path: Path,
                                                             mode: FreezeMode) -> None:
    store = BundleStore(tmp_path / "state")
    store.key()
    r = _frozen(tmp_path / "dist", mode)
    out = bundle_agent(r, tmp_path / "state" / "update_key", "0.9.0")
    assert out == tmp_path / "dist" / "arm64" / "update" / "0.9.0"  # beside, never inside
    m = store.add(out)
    assert (m.version, m.arch, m.layout) == ("0.9.0", "arm64", mode)
    payload = "dpanel-tunnel.tar" if mode == "onedir" else "dpanel-tunnel"
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", payload])


def test_bundle_with_another_key_is_refused_by_import(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    other = tmp_path / "other_key"
    other.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    out = bundle_agent(_frozen(tmp_path / "dist", "onedir"), other, "0.9.0")
    with pytest.raises(Exception, match="not signed by this manager's update key"):
        store.add(out)
    with pytest.raises(ImageError, match=r"^--update-key: .*missing"):
        bundle_agent(_frozen(tmp_path / "d2", "onedir"), tmp_path / "missing", "1")


def test_build_agent_task_names_the_bad_update_key(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "tasks.py", "build-agent", "--arch", "arm64",
                        "--mode", "zip", "--update-key", str(tmp_path / "k")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == \
        "error: --mode: 'zip' is not onefile or onedir", p.stderr
