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


def test_openapi_declares_bearer_auth_and_error_codes(stack: Stack) -> None:
    """B14: a bearer security scheme on every route but health; errors are ErrorOut with
    the ErrorCode enum."""
    from dpanel_proto.codes import ErrorCode

    status, spec = _get(stack, "/openapi.json", None)
    assert status == 200
    schemes = spec["components"]["securitySchemes"]  # type: ignore[index]
    assert any(s == {"type": "http", "scheme": "bearer", "description": s.get("description")}
               for s in schemes.values()), schemes
    for path, ops in spec["paths"].items():  # type: ignore[attr-defined]
        for method, op in ops.items():
            assert bool(op.get("security")) == (path != "/v1/health"), (path, method)
            for code in ("401", "422", "503"):
                if path == "/v1/health":
                    continue
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorOut"), (path, method, code)
    schemas = spec["components"]["schemas"]  # type: ignore[index]
    code_ref = schemas["ErrorOut"]["properties"]["code"]["$ref"].rsplit("/", 1)[1]
    assert schemas[code_ref]["enum"] == [c.value for c in ErrorCode]
    # and the answers match what is declared
    status, body = _get(stack, "/v1/devices", None)
    assert status == 401 and body == {"error": "missing or wrong admin token",
                                      "code": "unauthorized"}


def test_new_user_mistakes_get_one_line(stack: Stack) -> None:
    """B10: wrong flags and inputs as a new user types them: one line, no traceback."""
    cases = [
        (("device", "add", "lab", "--label", "bad"), 2, b"--label 'bad': expected KEY=VALUE"),
        (("device", "add", "lab", "--label", "=x"), 2, b"expected KEY=VALUE"),
        (("device", "show", "Bad/Name"), 2, b"is not a device id"),
        (("device", "show", "ghost"), 1, b"unknown device 'ghost'"),
        (("exec", "ghost.dpanel", "true"), 255, b"unknown device 'ghost'"),
        (("exec", "-j", "0", "--all", "--", "true"), 255, b"-j/--parallel must be at least 1"),
        (("exec", "--timeout", "0", "x", "--", "true"), 255, b"--timeout must be more than 0"),
        (("exec", "--filter", "nothing-*", "--", "true"), 255,
         b"no enrolled, unrevoked device matches --filter nothing-*"),
        (("exec", "--all", "-i", "--", "cat"), 255, b"-i/--stdin is for one device"),
        (("exec", "x", "--out-dir", "/tmp/x", "--", "true"), 255, b"are for --all/--filter"),
        (("tunnel", "open", "ghost"), 1, b"unknown device 'ghost'"),
        (("device", "delete", "ghost"), 1, b"unknown device 'ghost'"),
    ]
    for argv, code, needle in cases:
        out = stack.cli(*argv)
        assert out.returncode == code and needle in out.stderr, (argv, out)
        assert b"Traceback" not in out.stderr and out.stderr.count(b"\n") == 1, (argv, out)


def test_delete_frees_a_revoked_name_and_keeps_a_record(stack: Stack) -> None:
    """B11: a revoked name can be enrolled again once deleted; the record is kept."""
    first = stack.enrol("reuse-me")
    out = stack.cli("device", "delete", "reuse-me")
    assert out.returncode == 1 and b"not revoked; revoke it first" in out.stderr, out
    stack.cli_ok("device", "revoke", "reuse-me")
    out = stack.cli("device", "add", "reuse-me")
    assert out.returncode == 1 and b"dpanel device delete reuse-me" in out.stderr, out
    assert b"revoke it" not in out.stderr
    assert "the name is free" in stack.cli_ok("device", "delete", "reuse-me")
    second = stack.enrol("reuse-me")
    assert second != first and not stack.device("reuse-me")["revoked"]
    # --force revokes, then deletes; both deletions are on record
    stack.cli_ok("device", "delete", "--force", "reuse-me")
    gone = json.loads(stack.cli_ok("device", "list", "--deleted", "--json"))
    assert [g["id"] for g in gone] == ["reuse-me", "reuse-me"]
    assert all(g["revoked_at"] and g["deleted_at"] >= g["revoked_at"] for g in gone)
    assert "reuse-me" in stack.cli_ok("device", "list", "--deleted")
    out = stack.cli("device", "show", "reuse-me")
    assert out.returncode == 1 and b"unknown device" in out.stderr
