"""Where the agent's token comes from: argv, stdin, a file, the environment, or an import.

Images ship without a token; whoever flashes the SD card drops it in a text file on the
FAT boot partition (editable from any OS). On start the agent moves a valid token from
there into ``token_file`` (0600, in a 0700 directory) and blanks the FAT copy, the way
rpi-preseed treats secrets: a token on a FAT partition is readable by anyone holding the
card and by every local user.

An image may also carry pins (``build-image --tunnel-host-key/--manager-key`` writes them
to ``pins_dir``): a token whose keys differ from them is refused, wherever it comes from,
and is never imported over the token in use.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path
from typing import Optional

from dpanel_proto.token import DeviceToken, parse_token
from dpanel_proto.wire import DecodeError

from .config import AgentConfig
from .files import atomic_write, ensure_private_dir

__all__ = ["IMPORTED_MARKER", "PIN_FILES", "TokenError", "check_pins", "import_token",
           "read_token_text", "resolve_token"]

log = logging.getLogger("dpanel.agent")

#: What an imported FAT copy is overwritten with (a comment: importing it again is a no-op).
IMPORTED_MARKER = "# dpanel token imported into {dest} at {when}; this file no longer holds it\n"


class TokenError(ValueError):
    """No usable token; the message says where we looked and what was wrong."""


def read_token_text(text: str) -> str:
    """The token in a text file: first non-blank line that is not a ``#`` comment."""
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            return s
    return ""


#: pin file name in ``pins_dir`` -> the token field it pins
PIN_FILES = (("tunnel_host_key.pub", "tunnel_host_key"), ("manager_key.pub", "manager_key"))


def _key_of(line: str) -> str:
    """Key type + base64 only: comments (user@host) are not part of a key."""
    return " ".join(line.split()[:2])


def check_pins(token: DeviceToken, pins_dir: Path) -> None:
    """Raise :class:`TokenError` naming the pin file and the token field if ``token``
    does not carry the keys pinned in ``pins_dir``. A missing pin file pins nothing; an
    unreadable or malformed one refuses every token (a pin must fail closed)."""
    for name, fld in PIN_FILES:
        path = pins_dir / name
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise TokenError(f"pin file {path} is unreadable ({exc.strerror}); refusing "
                             f"to run unpinned") from None
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        pinned = _key_of(lines[0]) if lines else ""
        if len(pinned.split()) != 2 or not pinned.startswith(("ssh-", "ecdsa-")):
            raise TokenError(f"pin file {path} holds no OpenSSH public key; refusing to run "
                             f"unpinned")
        if _key_of(getattr(token, fld)) != pinned:
            raise TokenError(f"token {fld} does not match the key pinned in {path} "
                             f"(token for another server?)")


def _blank(src: Path, dest: Path) -> None:
    """Overwrite in place, not by rename: FAT has no modes to preserve and a rename
    dance there buys nothing; truncate + write + fsync is what survives a power cut best."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(src, "w", encoding="utf-8") as f:
        f.write(IMPORTED_MARKER.format(dest=dest, when=when))
        f.flush()
        os.fsync(f.fileno())


def import_token(config: AgentConfig) -> Optional[DeviceToken]:
    """Move the first valid token found in ``config.import_token_from`` into
    ``config.token_path``; returns it, or None when there was nothing to import.

    An invalid token there is logged and left alone (the operator must see and fix it),
    and the existing token_file, if any, stays in use.
    """
    dest = config.token_path
    for src in config.import_token_from:
        try:
            text = src.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("token import: cannot read %s: %s", src, exc.strerror)
            continue
        raw = read_token_text(text)
        if not raw:
            continue  # blank, or already imported
        try:
            token = parse_token(raw)
        except DecodeError as exc:
            log.error("token import: %s does not hold a valid token (%s); not imported, "
                      "left in place%s", src, exc,
                      f"; still using {dest}" if dest.exists() else "")
            continue
        try:
            check_pins(token, config.pins_dir)
        except TokenError as exc:
            log.error("token import: %s: %s; not imported, left in place%s", src, exc,
                      f"; still using {dest}" if dest.exists() else "")
            continue
        try:
            ensure_private_dir(dest.parent, tighten=False)
            current = dest.read_text() if dest.exists() else ""
            if read_token_text(current) != token.encode():
                atomic_write(dest, token.encode() + "\n", 0o600)
        except OSError as exc:
            raise TokenError(f"token import: cannot write {dest}: {exc.strerror}") from None
        try:
            _blank(src, dest)
        except OSError as exc:
            log.warning("token import: imported %s but could not blank it (%s); remove "
                        "the token from it by hand", src, exc.strerror)
        log.info("imported the token for %s from %s into %s", token.redacted(), src, dest)
        return token
    return None


def resolve_token(config: AgentConfig) -> DeviceToken:
    """The token to run with: ``config.token`` if set, else an import, else token_file;
    in every case checked against the image's pins."""
    token = _find_token(config)
    check_pins(token, config.pins_dir)
    return token


def _find_token(config: AgentConfig) -> DeviceToken:
    if config.token is not None:
        return config.token
    imported = import_token(config)
    if imported is not None:
        return imported
    path = config.token_path
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise TokenError(
            f"no token: {path} does not exist. Pass the token as an argument, '-' to read "
            "it from stdin, --token-file FILE, the DPANEL_TOKEN environment variable, or "
            "set token_file / import_token_from in --config"
        ) from None
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror}") from None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("token file %s is readable by others (mode %o); chmod 600 it", path, mode)
    raw = read_token_text(text)
    if not raw:
        raise TokenError(f"token file {path} is empty")
    try:
        return parse_token(raw)
    except DecodeError as exc:
        raise TokenError(f"token file {path}: {exc}") from None
