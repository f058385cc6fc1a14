"""Small file helpers: atomic writes with modes, and key material generated once."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Union

import asyncssh

from dpanel_proto.util import atomic_write as _atomic_write

__all__ = ["atomic_write", "ensure_private_key", "ensure_secret"]


def atomic_write(path: Union[str, Path], data: Union[str, bytes], mode: int = 0o600) -> None:
    """The protocol package's atomic write (tmp + fsync + rename), creating parents."""
    _atomic_write(path, data, mode, make_parents=True)


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
