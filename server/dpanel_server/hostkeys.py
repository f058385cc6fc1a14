"""Device-supplied SSH host keys, parsed and re-serialised before they are trusted.

A device announces its host key on its status topic. That string reaches the registry,
the operators' ``known_hosts`` and terminals, so it is never used as sent: it must be
exactly one public key of an allowed algorithm, and what is kept is our own
serialisation of it (``<alg> <base64>``, no comment, no options, no second line).
"""

from __future__ import annotations

import asyncssh

__all__ = ["ALLOWED_HOST_KEY_ALGS", "InvalidHostKey", "fingerprint", "normalize_host_key"]

#: What the agent generates (ed25519) and what OpenSSH devices offer by default; DSA
#: and RSA/SHA-1-only keys are not accepted.
ALLOWED_HOST_KEY_ALGS = frozenset({
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "ssh-rsa",
})


class InvalidHostKey(ValueError):
    """The announced string is not exactly one allowed public key."""


def normalize_host_key(text: str) -> str:
    """``<alg> <base64>`` of the one public key in ``text``; InvalidHostKey otherwise."""
    if any(c in text for c in "\r\n\0") or not text.isprintable():
        raise InvalidHostKey("host key: contains a line break or a control character")
    fields = text.split()
    if len(fields) not in (2, 3):
        raise InvalidHostKey("host key: expected '<algorithm> <base64> [comment]'")
    if fields[0] not in ALLOWED_HOST_KEY_ALGS:
        raise InvalidHostKey(f"host key: algorithm {fields[0][:40]!r} is not allowed")
    try:
        key = asyncssh.import_public_key(f"{fields[0]} {fields[1]}")
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise InvalidHostKey(f"host key: not a public key ({exc})") from None
    alg = key.get_algorithm()
    if alg != fields[0]:
        raise InvalidHostKey(f"host key: says {fields[0]} but holds {alg}")
    size = getattr(getattr(key, "pyca_key", None), "key_size", 0)
    if alg == "ssh-rsa" and size < 2048:
        raise InvalidHostKey("host key: RSA keys under 2048 bits are not allowed")
    alg_out, blob = key.export_public_key("openssh").decode().split()[:2]
    return f"{alg_out} {blob}"


def fingerprint(key_line: str) -> str:
    try:
        return str(asyncssh.import_public_key(key_line).get_fingerprint())
    except (asyncssh.KeyImportError, ValueError):
        return "<unparseable key>"
