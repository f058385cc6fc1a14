"""The HTTP API and CLI on a real stack: auth, OpenAPI, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from stackfix import BIN, Stack


def _get(stack: Stack, path: str, token: str | None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://127.0.0.1:{stack.api_port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_requires_the_admin_token(stack: Stack) -> None:
    token = (stack.dir / "keys" / "admin.token").read_text().strip()
    assert _get(stack, "/v1/devices", token)[0] == 200
    for bad in (None, "", token + "x", token[:-1]):
        assert _get(stack, "/v1/devices", bad)[0] == 401
    assert _get(stack, "/v1/health", None)[0] == 200


def test_openapi_documents_devices_tunnels_exec(stack: Stack) -> None:
    status, spec = _get(stack, "/openapi.json", None)
    assert status == 200
    paths = set(spec["paths"])  # type: ignore[arg-type]
    assert {"/v1/devices", "/v1/devices/{device}/tunnel", "/v1/devices/{device}/exec",
            "/v1/tunnels"} <= paths


def test_bad_requests_name_the_problem(stack: Stack) -> None:
    out = stack.cli("device", "add", "Not Valid")
    assert out.returncode == 1 and b"device name" in out.stderr
    stack.enrol("dup")
    out = stack.cli("device", "add", "dup")
    assert out.returncode == 1 and b"already exists" in out.stderr
    out = stack.cli("device", "revoke", "ghost")
    assert out.returncode == 1 and b"unknown device 'ghost'" in out.stderr
    out = stack.cli("exec", "dup")
    assert out.returncode == 255 and b"no command" in out.stderr


@pytest.mark.parametrize("text,needle", [
    ("[manager]\napi_listen = 'nope:99999'\n", b"manager.api_listen"),
    ("[tunnel\n", b"not valid TOML"),
    ("[broker]\nreload = 'sometimes'\n", b"broker.reload"),
])
def test_bad_server_config_is_a_clear_error(tmp_path: Path, text: str, needle: bytes) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text(text)
    for argv in (["device", "list"], ["tunnel", "run"], ["manager", "run"]):
        out = subprocess.run([str(BIN / "dpanel"), "--config", str(conf), *argv],
                             capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert out.returncode == 2, (argv, out)
        assert needle in out.stderr and b"Traceback" not in out.stderr


def test_manager_unreachable_is_a_clear_error(stack: Stack) -> None:
    stack.stop()
    out = stack.cli("device", "list")
    assert out.returncode == 1 and b"unreachable" in out.stderr
