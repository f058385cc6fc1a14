"""Small file helpers: atomic writes with modes, and key material generated once."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Union

import asyncssh

__all__ = ["atomic_write", "ensure_private_key", "ensure_secret"]


def atomic_write(path: Union[str, Path], data: Union[str, bytes], mode: int = 0o600) -> None:
    """Write via a temp file in the same directory + fsync + rename, so readers (and a
    crash) only ever see the old or the new content, never half of it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_private_key(path: Union[str, Path]) -> asyncssh.SSHKey:
    """Load an ed25519 key, generating it (mode 0600) the first time."""
    p = Path(path)
    if not p.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        atomic_write(p, key.export_private_key())
        atomic_write(p.with_name(p.name + ".pub"), key.export_public_key(), 0o644)
        return key
    return asyncssh.read_private_key(str(p))


def ensure_secret(path: Union[str, Path]) -> str:
    """Read a one-line secret, generating it (mode 0600) the first time."""
    p = Path(path)
    if not p.exists():
        atomic_write(p, secrets.token_urlsafe(32) + "\n")
    return p.read_text().strip()
