"""Token import from the FAT boot partition: move, blank, 0600; bad tokens left alone."""

from __future__ import annotations

import logging
import re
import stat
from pathlib import Path

import asyncssh
import pytest

from dpanel_agent.config import AgentConfig
from dpanel_agent.tokensrc import TokenError, import_token, read_token_text, resolve_token
from dpanel_proto.token import DeviceToken

_KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def _token(device: str = "dev-1") -> DeviceToken:
    return DeviceToken(device=device, secret="s" * 43, broker="mqtt://127.0.0.1:1883",
                       tunnel="127.0.0.1:2220", tunnel_host_key=_KEY, manager_key=_KEY)


def _cfg(tmp_path: Path, *sources: Path) -> AgentConfig:
    return AgentConfig(state_dir=tmp_path / "state", import_token_from=sources)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_valid_token_is_moved_0600_and_fat_copy_blanked(tmp_path: Path) -> None:
    fat = tmp_path / "boot" / "dpanel-token.txt"
    fat.parent.mkdir()
    tok = _token()
    fat.write_text(f"# paste your dPanel token below\n\n  {tok.encode()}  \r\n")
    cfg = _cfg(tmp_path, tmp_path / "missing.txt", fat)
    assert import_token(cfg) == tok
    dest = cfg.token_path
    assert read_token_text(dest.read_text()) == tok.encode()
    assert _mode(dest) == 0o600 and _mode(dest.parent) == 0o700
    blanked = fat.read_text()
    assert tok.encode() not in blanked and tok.secret not in blanked
    assert blanked.startswith("#") and "imported" in blanked
    # nothing left to import: a second start is a no-op and resolve uses token_file
    assert import_token(cfg) is None
    assert resolve_token(cfg) == tok


def test_new_token_on_fat_replaces_the_old_one(tmp_path: Path) -> None:
    fat = tmp_path / "token.txt"
    cfg = _cfg(tmp_path, fat)
    fat.write_text(_token("dev-1").encode())
    assert resolve_token(cfg).device == "dev-1"
    fat.write_text(_token("dev-2").encode())  # re-provisioned by editing the card
    assert resolve_token(cfg).device == "dev-2"


def test_invalid_token_is_logged_left_in_place_and_old_one_kept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fat = tmp_path / "token.txt"
    cfg = _cfg(tmp_path, fat)
    fat.write_text(_token("dev-1").encode())
    resolve_token(cfg)
    broken = _token("dev-2").encode()[:-3] + "xyz"
    fat.write_text(broken + "\n")
    with caplog.at_level(logging.ERROR, logger="dpanel.agent"):
        assert resolve_token(cfg).device == "dev-1"
    assert fat.read_text() == broken + "\n"
    assert any("does not hold a valid token" in r.getMessage() and "checksum" in r.getMessage()
               for r in caplog.records)


def test_invalid_token_and_no_token_file_is_an_error(tmp_path: Path) -> None:
    fat = tmp_path / "token.txt"
    fat.write_text("dpt1.garbage.0000\n")
    with pytest.raises(TokenError, match="no token"):
        resolve_token(_cfg(tmp_path, fat))


def test_token_file_problems_are_named(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(TokenError, match=r"does not exist.*DPANEL_TOKEN"):
        resolve_token(cfg)
    cfg.token_path.parent.mkdir(parents=True)
    cfg.token_path.write_text("# nothing\n")
    with pytest.raises(TokenError, match="is empty"):
        resolve_token(cfg)
    cfg.token_path.write_text("dpt1.AAAA.00000000\n")
    with pytest.raises(TokenError, match=re.escape(f"{cfg.token_path}: token: checksum")):
        resolve_token(cfg)


def test_explicit_token_wins(tmp_path: Path) -> None:
    fat = tmp_path / "token.txt"
    fat.write_text(_token("dev-2").encode())
    cfg = AgentConfig(state_dir=tmp_path, import_token_from=(fat,), token=_token("dev-1"))
    assert resolve_token(cfg).device == "dev-1"
    assert fat.read_text() == _token("dev-2").encode()  # not consumed


def test_shared_token_dir_keeps_its_mode_but_the_token_is_private(tmp_path: Path) -> None:
    etc = tmp_path / "etc-dpanel"
    etc.mkdir(mode=0o755)
    etc.chmod(0o755)
    fat = tmp_path / "token.txt"
    fat.write_text(_token().encode())
    cfg = AgentConfig(state_dir=tmp_path / "state", token_file=etc / "token",
                      import_token_from=(fat,))
    assert resolve_token(cfg).device == "dev-1"
    assert _mode(etc) == 0o755 and _mode(etc / "token") == 0o600


# --------------------------------------------------------------------------- image pins (A9)

_OTHER = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


@pytest.mark.parametrize(("files", "error"), [
    ({}, None),  # no pins: nothing pinned
    ({"tunnel_host_key.pub": _KEY + " root@server\n", "manager_key.pub": _KEY}, None),
    ({"tunnel_host_key.pub": _OTHER + "\n"}, r"token tunnel_host_key does not match the key "
                                             r"pinned in .*/pins/tunnel_host_key\.pub"),
    ({"manager_key.pub": "# pin\n" + _OTHER}, r"token manager_key does not match .*manager_key"),
    ({"manager_key.pub": ""}, r"pin file .*manager_key\.pub holds no OpenSSH public key"),
    ({"manager_key.pub": "garbage"}, r"holds no OpenSSH public key"),
])
def test_pins(tmp_path: Path, files: dict[str, str], error: str) -> None:
    from dpanel_agent.tokensrc import check_pins

    pins = tmp_path / "pins"
    pins.mkdir()
    for name, text in files.items():
        (pins / name).write_text(text)
    if error is None:
        check_pins(_token(), pins)
        assert resolve_token(AgentConfig(state_dir=tmp_path, token=_token(),
                                         pins_dir=pins)) == _token()
    else:
        with pytest.raises(TokenError, match=error):
            check_pins(_token(), pins)
        with pytest.raises(TokenError, match=error):
            resolve_token(AgentConfig(state_dir=tmp_path, token=_token(), pins_dir=pins))
