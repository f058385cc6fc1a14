"""Operator accounts, login contexts, client choice and completion, one module at a time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from dpanel_server import login
from dpanel_server.authz import Principal
from dpanel_server.client import make_client
from dpanel_server.errors import DPanelError
from dpanel_server.operators import Operators, UnknownUser, UserExists, parse_operator_token
from dpanel_server.registry import Registry


@pytest.fixture
def ops(registry_url: str) -> Iterator[Operators]:
    """On each engine (pgfix: a real PostgreSQL)."""
    reg = Registry(registry_url)
    try:
        yield Operators(reg)
    finally:
        reg.close()


def test_tokens_authenticate_until_revoked(ops: Operators, tmp_path: Path) -> None:
    db = ops._registry.path
    op, token = ops.add("alice", "operator", ["site=a", "site=a", "site=b"])
    assert op.scope == ("site=a", "site=b")
    assert ops.authenticate(token) == Principal("alice", "operator", ("site=a", "site=b"))
    name, secret = parse_operator_token(token) or ("", "")
    assert name == "alice" and len(secret) == 43
    if db is not None:  # SQLite: only the hash is stored (the WAL holds the new rows)
        stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        assert op.name.encode() in stored and secret.encode() not in stored
    _, other = ops.add("bob", "viewer")
    assert ops.authenticate(f"dpo1.alice.{parse_operator_token(other)[1]}") is None  # type: ignore[index]
    ops.revoke("alice")
    assert ops.authenticate(token) is None
    assert ops.get("alice").revoked and not ops.get("bob").revoked
    with pytest.raises(UserExists, match="names are never reused"):
        ops.add("alice", "viewer")
    with pytest.raises(UnknownUser):
        ops.revoke("carol")


@pytest.mark.parametrize("token", ["", "admin", "dpo1.", "dpo1.alice", "dpo1.alice.",
                                   "dpo1.Alice." + "A" * 43, "dpo1.alice." + "A" * 42,
                                   "dpo1.alice." + "A" * 43 + "\n", "dpo2.alice." + "A" * 43])
def test_malformed_tokens_are_refused(ops: Operators, token: str) -> None:
    ops.add("alice", "admin")
    assert ops.authenticate(token) is None


@pytest.mark.parametrize("name,role,scope,needle", [
    ("admin", "admin", [], "reserved"),
    ("a.b", "viewer", [], "not an operator name"),
    ("Alice", "viewer", [], "not an operator name"),
    ("x" * 64, "viewer", [], "not an operator name"),
    ("ok", "root", [], "role: 'root' is not one of viewer, operator, admin"),
    ("ok", "viewer", ["site"], "not a label selector"),
    ("ok", "viewer", ["a=b\nc=d"], "not a label selector"),
    ("ok", "viewer", ["site=\x1b[31mred"], "printable"),
    ("ok", "viewer", [f"s=v{i}" for i in range(65)], "at most 64 selectors"),
])
def test_bad_accounts_name_the_field(ops: Operators, name: str, role: str,
                                     scope: list[str], needle: str) -> None:
    with pytest.raises(DPanelError, match=needle):
        ops.add(name, role, scope)


def test_an_edited_role_never_widens(ops: Operators) -> None:
    _, token = ops.add("alice", "viewer")
    with ops._registry._tx() as cur:
        cur.execute("UPDATE operators SET role = 'superuser' WHERE name = 'alice'")
    p = ops.authenticate(token)
    assert p is not None and p.role == "viewer"


def test_urls_and_fingerprints() -> None:
    assert login.parse_url("https://m.example") == ("https", "m.example", 443)
    assert login.parse_url("https://[::1]:8443/") == ("https", "::1", 8443)
    assert login.parse_url("http://127.0.0.1:8780") == ("http", "127.0.0.1", 8780)
    for bad, needle in (("http://m.example", "only for loopback"),
                        ("ftp://x", "expected https"), ("https://x/v1?t=1", "no path"),
                        ("https://u:p@x", "no path"), ("https://x:99999", "URL")):
        with pytest.raises(login.LoginError, match=needle):
            login.parse_url(bad)
    fp = "ab" * 32
    assert login.parse_fingerprint(login.format_fingerprint(fp)) == fp
    assert login.parse_fingerprint(fp.upper()) == fp
    with pytest.raises(login.LoginError, match="--fingerprint"):
        login.parse_fingerprint("ab" * 31)


def test_login_file_is_0600_and_honours_xdg(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DPANEL_CONFIG", raising=False)
    monkeypatch.delenv("DPANEL_CONTEXT", raising=False)
    assert login.config_path() == tmp_path / "xdg" / "dpanel" / "config.toml"
    assert login.pick_context(None, required=False) is None
    data = {"current-context": "m", "contexts": {"m": {
        "server": "https://m.example:8443", "token": "dpo1.a." + "A" * 43,
        "fingerprint": "0" * 64}}}
    path = login.save_file(data)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    api = make_client()
    assert api.remote and api.url == "https://m.example:8443"
    with pytest.raises(login.LoginError, match="context 'n' is not in"):
        make_client(context="n")
    with pytest.raises(login.LoginError, match="give one"):
        make_client(config="x.toml", context="m")
    # DPANEL_CONFIG wins over the login file (the manager host)
    monkeypatch.setenv("DPANEL_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(DPanelError, match=r"missing\.toml"):
        make_client()
    # ... but an explicit context wins over DPANEL_CONFIG
    monkeypatch.setenv("DPANEL_CONTEXT", "m")
    assert make_client().remote
    (tmp_path / "xdg" / "dpanel" / "config.toml").write_text("[contexts\n")
    with pytest.raises(login.LoginError, match="not valid TOML"):
        make_client()


def _bin() -> str:
    return str(Path(sys.executable).parent / "dpanel")


def test_help_does_not_import_the_server_stack() -> None:
    code = ("import sys\nfrom dpanel_server import cli\ntry:\n    cli.main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "bad = [m for m in ('fastapi', 'uvicorn', 'asyncssh', 'cryptography', 'paho', "
            "'pydantic') if m in sys.modules]\nassert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_bash_completion_covers_commands_flags_and_devices(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DPANEL_CONFIG", raising=False)
    monkeypatch.delenv("DPANEL_CONTEXT", raising=False)
    script = subprocess.run([_bin(), "completion", "bash"], capture_output=True, check=True,
                            timeout=60).stdout.decode()
    # a fake dpanel on PATH answers the device-name query and counts its calls
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dpanel").write_text("#!/bin/sh\necho call >> \"$CALLS\"\n"
                                 "[ \"$*\" = 'device list --names' ] && printf 'kiosk-1\\n"
                                 "kiosk-2\\nlab\\n'\n")
    (fake / "dpanel").chmod(0o755)

    def complete(*words: str) -> list[str]:
        line = " ".join(["dpanel", *words])
        probe = (f"{script}\nCOMP_WORDS=(dpanel {' '.join(words)})\n"
                 f"COMP_CWORD={len(words)}\n_dpanel\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
        env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}",
                   XDG_CACHE_HOME=str(tmp_path / "cache"), CALLS=str(tmp_path / "calls"))
        out = subprocess.run(["bash", "-c", probe], capture_output=True, env=env, timeout=30)
        assert out.returncode == 0, (line, out.stderr)
        return out.stdout.decode().split()

    assert {"device", "exec", "login", "user", "completion"} <= set(complete(""))
    assert complete("dev") == ["device"]
    assert set(complete("device", "")) >= {"add", "list", "show", "revoke"}
    assert "--print-token" in complete("user", "add", "--")
    assert "--https-listen" in complete("stack", "up", "--")
    assert complete("exec", "kio") == ["kiosk-1", "kiosk-2"]
    assert complete("device", "show", "l") == ["lab"]
    assert complete("exec", "--all", "la") == ["lab"]
    # cached: the second device completion did not ask again
    assert (tmp_path / "calls").read_text().count("call") == 1
    # keyed by the resolved context: after `context use b` the names are b's, not a's
    # (the key once was $DPANEL_CONTEXT alone, so both shared the "current" cache)
    (fake / "dpanel").write_text("#!/bin/sh\necho \"$*\" >> \"$CALLS\"\n"
                                 "case \"$*\" in\n"
                                 "'--context a device list --names') echo alpha-1 ;;\n"
                                 "'--context b device list --names') echo beta-1 ;;\n"
                                 "esac\n")
    conf = tmp_path / "xdg" / "dpanel" / "config.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text('current-context = "a"\n\n[contexts.a]\nserver = "x"\n')
    assert complete("exec", "") == ["alpha-1"]
    conf.write_text('current-context = "b"\n\n[contexts.b]\nserver = "x"\n')
    assert complete("exec", "") == ["beta-1"]
    assert complete("--context", "a", "ssh", "") == ["alpha-1"]
    monkeypatch.setenv("DPANEL_CONTEXT", "a")
    assert complete("ssh", "") == ["alpha-1"]
    zsh = subprocess.run([_bin(), "completion", "zsh"], capture_output=True, check=True,
                         timeout=60).stdout.decode()
    assert zsh.startswith("#compdef dpanel") and "bashcompinit" in zsh


@pytest.mark.parametrize("text,needle", [
    ("[manager]\nhttps_listen = 'x:99999'\n", "manager.https_listen: port"),
    ("[manager]\nhttps_listen = ':443'\n", "manager.https_listen: no host"),
    ("[manager]\nhttps_listen = '0.0.0.0:443'\nhttps_cert = '/c.pem'\n",
     "manager.https_cert, manager.https_key: give both or neither"),
    ("[manager]\nhttps_cert = '/c.pem'\nhttps_key = '/k.pem'\n",
     "manager.https_cert: set manager.https_listen too"),
    ("[manager]\nhttps_listen = 443\n", "manager.https_listen: expected str"),
])
def test_https_settings_are_checked_by_name(tmp_path: Path, text: str, needle: str) -> None:
    from dpanel_server.config import load_config

    (tmp_path / "server.toml").write_text(text)
    with pytest.raises(DPanelError, match=needle):
        load_config(tmp_path / "server.toml")


def test_https_certificate_covers_the_listen_host(tmp_path: Path) -> None:
    from cryptography import x509

    from dpanel_server.config import load_config
    from dpanel_server.https_listener import https_ca_path, https_files

    (tmp_path / "server.toml").write_text(
        f"state_dir = '{tmp_path}'\n[manager]\nhttps_listen = '192.0.2.7:8443'\n")
    cfg = load_config(tmp_path / "server.toml")
    cert, key = https_files(cfg)
    crt = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    san = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v) for v in san.get_values_for_type(x509.IPAddress)} == {"192.0.2.7",
                                                                         "127.0.0.1"}
    assert Path(key).stat().st_mode & 0o777 == 0o600
    ca = https_ca_path(cfg).read_bytes()
    assert https_files(cfg) == (cert, key) and https_ca_path(cfg).read_bytes() == ca  # kept
    # an operator-supplied pair that is not there is named
    (tmp_path / "server.toml").write_text(
        f"state_dir = '{tmp_path}'\n[manager]\nhttps_listen = '0.0.0.0:443'\n"
        f"https_cert = '{tmp_path}/no.crt'\nhttps_key = '{tmp_path}/no.key'\n")
    with pytest.raises(DPanelError, match=r"manager\.https_cert: .*no\.crt is missing"):
        https_files(load_config(tmp_path / "server.toml"))
