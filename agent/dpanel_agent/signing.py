"""Ed25519 signatures on manager requests, so that only the pinned manager key can make a
device dial out; a broker compromise alone cannot."""

from __future__ import annotations

from dataclasses import replace

import asyncssh

from .wire import DecodeError, Request, b64, canonical_bytes, unb64

__all__ = ["load_public_key", "sign_request", "verify_request"]


def load_public_key(line: str) -> asyncssh.SSHKey:
    try:
        return asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise DecodeError(f"public key: {exc}") from None


def sign_request(req: Request, key: asyncssh.SSHKey) -> Request:
    sig = key.sign(canonical_bytes(req), b"ssh-ed25519")
    return replace(req, sig=b64(sig))


def verify_request(req: Request, key: asyncssh.SSHKey) -> bool:
    if not req.sig:
        return False
    try:
        sig = unb64(req.sig, "sig")
    except DecodeError:
        return False
    return bool(key.verify(canonical_bytes(req), sig))
