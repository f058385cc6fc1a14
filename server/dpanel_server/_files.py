"""Small file helpers: atomic writes with modes, and key material generated once."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Union

import asyncssh

from dpanel_proto.util import atomic_write as _atomic_write

__all__ = ["atomic_write", "ensure_private_key", "ensure_secret"]


def atomic_write(path: Union[str, Path], data: Union[str, bytes], mode: int = 0o600) -> None:
    """The protocol package's atomic write (tmp + fsync + rename), creating parents."""
    _atomic_write(path, data, mode, make_parents=True)


def _create_once(p: Path, data: Union[str, bytes], mode: int = 0o600) -> None:
    """Write ``p`` unless it exists, first writer wins: manager replicas (or a manager and
    its tunnel) starting at once on one state directory must end up with one key, not
    each with its own (the loser's rename would replace the winner's file, and the
    winner would sign with a key nobody trusts). The complete file is hard-linked into
    place, which fails if the name exists; the loser's copy is thrown away."""
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.new")
    atomic_write(tmp, data, mode)
    try:
        os.link(tmp, p)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def ensure_private_key(path: Union[str, Path]) -> asyncssh.SSHKey:
    """Load an ed25519 key, generating it (mode 0600) the first time."""
    p = Path(path)
    if not p.exists():
        _create_once(p, asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    key = asyncssh.read_private_key(str(p))
    pub = p.with_name(p.name + ".pub")
    if not pub.exists():
        atomic_write(pub, key.export_public_key(), 0o644)
    return key


def ensure_secret(path: Union[str, Path]) -> str:
    """Read a one-line secret, generating it (mode 0600) the first time."""
    p = Path(path)
    if not p.exists():
        _create_once(p, secrets.token_urlsafe(32) + "\n")
    return p.read_text().strip()
