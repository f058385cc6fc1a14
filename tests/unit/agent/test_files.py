"""Host key generated on the device (0600, atomic, reused), backoff, atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import asyncssh
import pytest

from dpanel_agent.errors import AgentError
from dpanel_agent.files import (
    atomic_write,
    ensure_private_dir,
    load_or_create_host_key,
    read_public_key_line,
)
from dpanel_proto.util import Backoff


def test_host_key_generated_once_private_and_loadable_by_asyncssh(tmp_path: Path) -> None:
    d = ensure_private_dir(tmp_path / "state")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    path = d / "ssh_host_ed25519_key"
    line = load_or_create_host_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert line.startswith("ssh-ed25519 ") and len(line.split()) == 2
    key = asyncssh.read_private_key(str(path))
    assert key.export_public_key().decode().strip() == line
    assert load_or_create_host_key(path) == line  # reused, not regenerated
    # two devices flashed from one image never share a key: each generates its own
    assert load_or_create_host_key(tmp_path / "other_key") != line
    assert sorted(p.name for p in d.iterdir()) == [path.name, path.name + ".pub"]  # no temps


def test_lost_pub_file_is_rederived_and_garbage_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "key"
    line = load_or_create_host_key(path)
    pub = tmp_path / "key.pub"
    pub.unlink()
    os.chmod(path, 0o644)
    assert load_or_create_host_key(path) == line
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # loose mode tightened
    assert pub.read_text().strip() == line
    pub.write_text("junk\n")
    assert load_or_create_host_key(path) == line
    pub.unlink()
    path.write_text("not a key")
    with pytest.raises(AgentError, match="unreadable"):
        load_or_create_host_key(path)


def test_read_public_key_line_strips_the_comment(tmp_path: Path) -> None:
    p = tmp_path / "k.pub"
    p.write_text("ssh-ed25519 AAAAC3Nza root@somehost\n")
    assert read_public_key_line(p) == "ssh-ed25519 AAAAC3Nza"
    p.write_text("hello\n")
    with pytest.raises(AgentError, match="not an OpenSSH public key"):
        read_public_key_line(p)
    with pytest.raises(AgentError, match="cannot read"):
        read_public_key_line(tmp_path / "missing.pub")


def test_atomic_write_replaces_with_mode(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_text("old")
    atomic_write(p, "new", 0o640)
    assert p.read_text() == "new" and stat.S_IMODE(p.stat().st_mode) == 0o640


def test_backoff_grows_is_jittered_capped_and_resets() -> None:
    b = Backoff(1.0, 8.0)
    delays = [b.next() for _ in range(8)]
    caps = [1, 2, 4, 8, 8, 8, 8, 8]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps))  # full jitter: [0, cap]
    assert len({round(d, 6) for d in delays}) > 1  # jittered, not a fixed schedule
    b.reset()
    assert b.next() <= 1.0
