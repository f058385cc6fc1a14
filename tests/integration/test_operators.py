"""Operators, roles and scopes on a real stack, and the CLI as a remote client over HTTPS.

One stack (real Mosquitto, two real agents: dev-a with site=a, dev-b with site=b) serves
plain HTTP on loopback and HTTPS (``stack up --https-listen``). Operator CLIs run with
HOME pointed at a fresh directory holding no server file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from stackfix import BIN, Stack
from support import free_port, wait_for

#: every operator token made here, for the last test's look at the log
OPERATOR_TOKENS: list[str] = []


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp(f"ops{os.getpid()}")
    s = Stack(dir=base / "stack", broker_port=free_port(), tunnel_port=free_port(),
              api_port=free_port(), https_port=free_port())
    s.start()
    try:
        for name, site in (("dev-a", "a"), ("dev-b", "b")):
            token = s.cli_ok("device", "add", name, "--label", f"site={site}",
                             "--print-token").strip()
            s.tokens[name] = token
            s.start_agent(token, base / name)
        for name in ("dev-a", "dev-b"):
            s.wait_online(name)
        yield s
    finally:
        s.close()


def _call(stack: Stack, method: str, path: str, token: str | None,
          body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{stack.api_port}{path}", data=data,
                                 method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _user(stack: Stack, name: str, role: str, *scope: str) -> str:
    args = ["user", "add", name, "--role", role, "--print-token"]
    for sel in scope:
        args += ["--scope", sel]
    token = stack.cli_ok(*args).strip()
    OPERATOR_TOKENS.append(token)
    assert re.fullmatch(rf"dpo1\.{name}\.[A-Za-z0-9_-]{{43}}", token), token
    return token


def _remote_env(home: Path) -> dict[str, str]:
    """An operator laptop: a fresh HOME, no DPANEL_CONFIG, no server file anywhere."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}


def _remote(home: Path, *args: str, stdin: Any = subprocess.DEVNULL
            ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / "dpanel"), *args], env=_remote_env(home), stdin=stdin,
                          capture_output=True, timeout=120, cwd=home)


def _url(stack: Stack) -> str:
    return f"https://127.0.0.1:{stack.https_port}"


def _server_fingerprint(stack: Stack) -> str:
    pem = (stack.dir / "https" / "server.crt").read_text()
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def test_user_add_list_revoke_and_whoami(world: Stack) -> None:
    token = _user(world, "alice", "viewer")
    assert _call(world, "GET", "/v1/whoami", token) == (
        200, {"name": "alice", "role": "viewer", "scope": []})
    users = json.loads(world.cli_ok("user", "list", "--json"))
    assert [(u["name"], u["revoked"]) for u in users if u["name"] == "alice"] == [
        ("alice", False)]
    out = world.cli("user", "add", "alice", "--role", "admin")
    assert out.returncode == 1 and b"operator alice exists" in out.stderr
    out = world.cli("user", "add", "admin", "--role", "admin")
    assert out.returncode == 1 and b"reserved" in out.stderr
    out = world.cli("user", "add", "bob", "--role", "operator", "--scope", "site")
    assert out.returncode == 2 and b"--scope: 'site' is not a label selector" in out.stderr
    # a non-admin manages no one
    assert _call(world, "POST", "/v1/users", token, {"name": "eve", "role": "admin"})[0] == 403
    assert _call(world, "GET", "/v1/users", token)[0] == 403
    # revoked: refused at the very next request, and the name is never reused
    world.cli_ok("user", "revoke", "alice")
    status, body = _call(world, "GET", "/v1/whoami", token)
    assert status == 401 and body["error"] == "unknown or revoked operator token"
    assert _call(world, "GET", "/v1/devices", token)[0] == 401
    out = world.cli("user", "add", "alice", "--role", "viewer")
    assert out.returncode == 1 and b"revoked: names are never reused" in out.stderr
    # a made-up secret for an existing name, and a token for no one
    for bad in (token[:-2] + "AA", "dpo1.nobody." + "A" * 43, "dpo1.", "dpo1.x.y"):
        assert _call(world, "GET", "/v1/whoami", bad)[0] == 401
    # a token in the query string is not a credential
    assert _call(world, "GET", f"/v1/devices?token={token}", None)[0] == 401


def _routes(stack: Stack) -> list[tuple[str, str]]:
    _, spec = _call(stack, "GET", "/openapi.json", None)
    out = []
    for path, methods in spec["paths"].items():
        for method in methods:
            out.append((method.upper(), path.replace("{device}", "dev-a")
                        .replace("{name}", "nobody")))
    return out


#: routes that take a credential of their own instead of an operator's (path ids filled in)
OTHER_CREDENTIAL = re.compile(r"^/v1/tunnel-servers/[^/]+/heartbeat\Z")


def test_every_route_wants_a_token_and_a_viewer_only_reads(world: Stack) -> None:
    viewer = _user(world, "vera", "viewer")
    routes = _routes(world)
    assert len(routes) >= 14, routes
    body = {"command": "true", "stream": False, "name": "x-new", "role": "viewer"}
    for method, path in routes:
        if path == "/v1/health":
            continue
        status, _ = _call(world, method, path, None, body if method == "POST" else None)
        assert status == 401, (method, path, status)
        status, answer = _call(world, method, path, viewer,
                               body if method == "POST" else None)
        if OTHER_CREDENTIAL.match(path):
            # a tunnel server's own secret, never an operator's: refused before the body
            assert status == 401 and answer["code"] == "unauthorized", (path, answer)
        elif method == "GET" and path != "/v1/users":
            # reads are a viewer's: 200, or 404 for an id that is not there ({job})
            assert status == 200 or (status == 404 and "{" in path), (method, path, status,
                                                                     answer)
        elif status == 404 and "{" in path:
            assert answer["code"] != "forbidden"  # an id that is not there ({job})
        else:
            assert status == 403, (method, path, status, answer)
            assert answer["code"] == "forbidden"
            assert re.match(r"vera is a viewer: \w+ needs the (operator|admin) role",
                            answer["error"]), answer
    # the two the issue names, word for word
    status, answer = _call(world, "POST", "/v1/devices/dev-a/exec", viewer,
                           {"command": "true", "stream": False})
    assert (status, answer["error"]) == (403, "vera is a viewer: exec needs the operator role")
    status, answer = _call(world, "POST", "/v1/devices/dev-a/tunnel", viewer, {})
    assert (status, answer["error"]) == (403,
                                         "vera is a viewer: tunnel needs the operator role")
    # and the tunnel was not opened on the way
    assert "dev-a" not in _call(world, "GET", "/v1/tunnels", viewer)[1]


def test_an_operator_scoped_to_site_a_never_reaches_site_b(world: Stack) -> None:
    op = _user(world, "olga", "operator", "site=a")
    status, out = _call(world, "POST", "/v1/devices/dev-a/exec", op,
                        {"command": "echo hi", "stream": False})
    assert status == 200 and out["exit"] == 0 and out["stdout"] == "hi\n"
    outside = "device dev-b is outside olga's scope (site=a)"
    for method, path, body in (
            ("POST", "/v1/devices/dev-b/exec", {"command": "true", "stream": False}),
            ("POST", "/v1/devices/dev-b/tunnel", {}),
            ("DELETE", "/v1/devices/dev-b/tunnel", None),
            ("GET", "/v1/devices/dev-b", None)):
        status, answer = _call(world, method, path, op, body)
        assert (status, answer["error"]) == (403, outside), (method, path)
    # a device that does not exist looks the same as one outside the scope
    status, answer = _call(world, "GET", "/v1/devices/ghost", op)
    assert (status, answer["error"]) == (403, outside.replace("dev-b", "ghost"))
    # reset and revoke need admin, whatever the device
    for method, path in (("POST", "/v1/devices/dev-b/reset-hostkey"),
                         ("DELETE", "/v1/devices/dev-b")):
        status, answer = _call(world, method, path, op)
        assert status == 403 and "needs the admin role" in answer["error"], (path, answer)
    assert [d["id"] for d in _call(world, "GET", "/v1/devices", op)[1]] == ["dev-a"]
    # the admin opens dev-b's tunnel: a scoped operator's list still omits it
    assert _call(world, "POST", "/v1/devices/dev-b/tunnel", _admin(world), {})[0] == 200
    assert "dev-b" not in _call(world, "GET", "/v1/tunnels", op)[1]
    assert "dev-b" in _call(world, "GET", "/v1/tunnels", _admin(world))[1]
    kh = _call(world, "GET", "/v1/known_hosts", op)[1]["known_hosts"]
    assert "dev-a" in kh and "dev-b" not in kh


def _admin(stack: Stack) -> str:
    return (stack.dir / "keys" / "admin.token").read_text().strip()


def test_login_over_https_then_no_server_file_is_needed(world: Stack, tmp_path: Path) -> None:
    token = _user(world, "lena", "operator", "site=a")
    url, ca = _url(world), world.dir / "ca.pem"
    assert ca.stat().st_mode & 0o777 == 0o644
    home = tmp_path / "laptop"
    home.mkdir()
    conf = home / ".config" / "dpanel" / "config.toml"

    # TOFU with no terminal: refused, with the fingerprint and what to pass instead
    out = _remote(home, "login", url, "--token", token)
    err = out.stderr.decode()
    assert out.returncode == 2 and "--ca-file" in err and "--fingerprint" in err, err
    assert _server_fingerprint(world) in err
    # a wrong fingerprint, a CA that did not sign it, a wrong token: nothing written
    out = _remote(home, "login", url, "--token", token, "--fingerprint", "ab" * 32)
    assert out.returncode != 0 and b"is not the pinned" in out.stderr, out.stderr
    other_ca = tmp_path / "other"
    subprocess.run([str(BIN / "python"), "-c", "import sys; from pathlib import Path; "
                    "from dpanel_server.pki import ensure_broker_tls; "
                    "ensure_broker_tls(Path(sys.argv[1]), ['127.0.0.1'])", str(other_ca)],
                   check=True)
    out = _remote(home, "login", url, "--token", token, "--ca-file", str(other_ca / "ca.crt"))
    assert out.returncode != 0 and b"does not verify against the pinned CA" in out.stderr
    out = _remote(home, "login", url, "--token", token[:-1] + "x", "--ca-file", str(ca))
    assert out.returncode == 1 and b"unknown or revoked operator token" in out.stderr
    assert not conf.exists()

    # --ca-file: logged in, 0600, and the CLI needs nothing else
    out = _remote(home, "login", url, "--token", token, "--ca-file", str(ca))
    assert out.returncode == 0, out.stderr
    assert conf.stat().st_mode & 0o777 == 0o600
    out = _remote(home, "device", "list", "--names")
    assert out.returncode == 0 and out.stdout.split() == [b"dev-a"], out
    out = _remote(home, "exec", "dev-a", "--", "sh", "-c", "exit 3")
    assert out.returncode == 3, out.stderr
    out = subprocess.run([str(BIN / "dpanel"), "exec", "-i", "dev-a", "--", "wc", "-c"],
                         env=_remote_env(home), input=b"x" * 100_000, capture_output=True,
                         timeout=120, cwd=home)
    assert out.returncode == 0 and out.stdout.strip() == b"100000", out
    out = _remote(home, "exec", "dev-b", "--", "true")
    assert out.returncode == 255 and b"outside lena's scope" in out.stderr
    out = _remote(home, "exec", "--all", "--json", "--", "true")  # the fan-out: her scope
    assert out.returncode == 0 and set(json.loads(out.stdout)) == {"dev-a"}, out
    out = _remote(home, "whoami")
    assert out.returncode == 0 and out.stdout.startswith(b"lena (operator; scope: site=a)")

    # --fingerprint, as a second context; `context use` switches between them
    fp = _server_fingerprint(world)
    colons = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    out = _remote(home, "--context", "pinned", "login", url, "--token", token,
                  "--fingerprint", f"SHA256:{colons}")
    assert out.returncode == 0, out.stderr
    listed = _remote(home, "context", "list").stdout.decode()
    assert re.search(r"^\* pinned\s+lena\s+https://127\.0\.0\.1", listed, re.M), listed
    assert re.search(r"^  127\.0\.0\.1\s+lena", listed, re.M), listed
    assert _remote(home, "device", "list", "--names").stdout.split() == [b"dev-a"]
    assert _remote(home, "context", "use", "127.0.0.1").returncode == 0
    assert _remote(home, "--context", "pinned", "whoami").returncode == 0
    out = _remote(home, "--context", "nope", "whoami")
    assert out.returncode == 2 and b"context 'nope' is not in" in out.stderr
    data = conf.read_text()
    assert "fingerprint" in data and "BEGIN CERTIFICATE" in data

    # revoked: the remote CLI is refused at once
    world.cli_ok("user", "revoke", "lena")
    out = _remote(home, "device", "list")
    assert out.returncode == 1 and b"unknown or revoked operator token" in out.stderr


def test_on_the_manager_host_server_toml_still_wins(world: Stack, tmp_path: Path) -> None:
    """DPANEL_CONFIG (or --config) is today's zero-setup use, even with a login file."""
    home = tmp_path / "host"
    (home / ".config" / "dpanel").mkdir(parents=True)
    (home / ".config" / "dpanel" / "config.toml").write_text(
        'current-context = "x"\n[contexts.x]\nserver = "https://127.0.0.1:1"\n'
        'token = "dpo1.x.' + "A" * 43 + '"\nfingerprint = "' + "0" * 64 + '"\n')
    env = dict(_remote_env(home), DPANEL_CONFIG=str(world.config))
    out = subprocess.run([str(BIN / "dpanel"), "whoami"], env=env, capture_output=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(b"admin (admin"), out
    out = _remote(home, "--config", str(world.config), "whoami")
    assert out.returncode == 0 and out.stdout.startswith(b"admin (admin"), out
    out = _remote(home, "whoami")  # the login file's context: an unreachable server
    assert out.returncode == 1 and b"unreachable" in out.stderr


def _login_on_a_terminal(home: Path, url: str, token: str, answer: bytes) -> tuple[int, str]:
    """`dpanel login` without a pin, on a real pseudo-terminal: answers the question."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([str(BIN / "dpanel"), "login", url, "--token", token],
                            env=_remote_env(home), stdin=slave, stdout=slave, stderr=slave,
                            cwd=home, start_new_session=True)
    os.close(slave)
    seen = b""
    answered = False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                raise AssertionError(f"no prompt: {seen!r}")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if not answered and b"[y/N]" in seen:
                os.write(master, answer)
                answered = True
        return proc.wait(60), seen.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_trust_on_first_use_shows_the_fingerprint_and_asks(world: Stack,
                                                          tmp_path: Path) -> None:
    token = _user(world, "tofu", "viewer")
    home = tmp_path / "tofu"
    home.mkdir()
    conf = home / ".config" / "dpanel" / "config.toml"
    fp = _server_fingerprint(world)
    shown = "SHA256:" + ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    code, text = _login_on_a_terminal(home, _url(world), token, b"n\n")
    assert code == 1 and shown in text and "nothing was written" in text, text
    assert not conf.exists()
    code, text = _login_on_a_terminal(home, _url(world), token, b"y\n")
    assert code == 0 and "logged in" in text, text
    assert f'fingerprint = "{fp}"' in conf.read_text()
    out = _remote(home, "whoami")
    assert out.returncode == 0 and out.stdout.startswith(b"tofu (viewer"), out


def _login(world: Stack, home: Path, name: str, role: str = "operator") -> None:
    home.mkdir()
    out = _remote(home, "login", _url(world), "--token", _user(world, name, role),
                  "--fingerprint", _server_fingerprint(world))
    assert out.returncode == 0, out.stderr


def _still_open(socks: list[socket.socket]) -> list[socket.socket]:
    alive = []
    for s in socks:
        try:
            if s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK):
                alive.append(s)  # (a TLS server never speaks first; not expected)
        except BlockingIOError:
            alive.append(s)
        except OSError:
            pass  # reset: closed by the server
    return alive


def test_a_tls_handshake_flood_does_not_starve_operators(world: Stack, tmp_path: Path) -> None:
    """Connections that never send a ClientHello, from 12 addresses (loopback answers for
    all of 127/8): the listener holds at most its cap, closes them at the handshake
    deadline (not asyncio's 60 s), and an operator's `device list` meanwhile works."""
    from dpanel_server._tlsgate import HANDSHAKE_TIMEOUT, MAX_PENDING, PER_SOURCE

    home = tmp_path / "flo"
    _login(world, home, "flo", "viewer")
    assert world.https_port is not None
    flood: list[socket.socket] = []
    try:
        for i in range(12):
            for _ in range(40):
                s = socket.socket()
                s.bind((f"127.0.0.{i + 2}", 0))
                s.settimeout(10)
                s.connect(("127.0.0.1", world.https_port))
                flood.append(s)
        started = time.monotonic()
        # the per-source and global caps: the rest were closed at accept, not kept
        wait_for(lambda: len(_still_open(flood)) <= MAX_PENDING, timeout=60,
                 what=f"at most {MAX_PENDING} pre-handshake connections held")
        held = _still_open(flood)
        per_source: dict[str, int] = {}
        for s in held:
            per_source[s.getsockname()[0]] = per_source.get(s.getsockname()[0], 0) + 1
        assert max(per_source.values(), default=0) <= PER_SOURCE.full, per_source
        # an operator gets through while they are held
        out = _remote(home, "device", "list", "--names")
        assert out.returncode == 0 and set(out.stdout.split()) == {b"dev-a", b"dev-b"}, out
        # and the held ones end at the deadline
        wait_for(lambda: not _still_open(flood), timeout=60,
                 what="the flood closed at the handshake deadline")
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 30  # far below asyncio's 60 s
    finally:
        for s in flood:
            s.close()
    out = _remote(home, "device", "list", "--names")
    assert out.returncode == 0, out


def test_a_forwarded_for_header_cannot_forge_the_audit_source(world: Stack) -> None:
    """uvicorn trusts X-Forwarded-For from loopback by default; the API must not: the
    audit's source is the socket's peer."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{world.api_port}/v1/devices/dev-a/exec", method="POST",
        data=json.dumps({"command": "echo forged-source", "stream": False}).encode(),
        headers={"Authorization": f"Bearer {_admin(world)}",
                 "Content-Type": "application/json", "X-Forwarded-For": "203.0.113.7",
                 "X-Real-IP": "203.0.113.8", "Forwarded": "for=203.0.113.9"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["exit"] == 0

    def row() -> Any:
        rows = json.loads(world.cli_ok("audit", "--json", "--device", "dev-a"))
        return next((x for x in rows if x["command"] == "echo forged-source"
                     and x.get("api")), None)

    found = wait_for(row, "the exec's audit row", 60)
    assert found["api"]["source"] == "127.0.0.1", found
    assert "203.0.113" not in json.dumps(found), found


def test_a_wrong_pin_is_refused_on_the_relay_paths(world: Stack, tmp_path: Path) -> None:
    """`exec -i` and `proxy` go through the TLS relay thread; a pin that does not match
    must stop them before the token is sent, with the same clear error as the rest."""
    home = tmp_path / "pin"
    _login(world, home, "pinny")
    conf = home / ".config" / "dpanel" / "config.toml"
    conf.write_text(conf.read_text().replace(_server_fingerprint(world), "ab" * 32))
    for argv in (("exec", "-i", "dev-a", "--", "cat"), ("proxy", "dev-a")):
        out = subprocess.run([str(BIN / "dpanel"), *argv], env=_remote_env(home),
                             input=b"hello\n", capture_output=True, timeout=120, cwd=home)
        err = out.stderr.decode()
        assert out.returncode != 0 and "is not the pinned" in err, (argv, out)
        assert b"hello" not in out.stdout
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback


def test_no_operator_token_in_the_stack_log(world: Stack) -> None:
    """Runs last in this module: every token made above was used, some refused."""
    token = _user(world, "last", "operator")
    assert _call(world, "GET", "/v1/whoami", token)[0] == 200
    assert _call(world, "GET", "/v1/whoami", token + "x")[0] == 401
    world.cli_ok("user", "revoke", "last")
    assert _call(world, "GET", "/v1/whoami", token)[0] == 401
    log = world.log()
    assert "manager API over HTTPS on https://127.0.0.1" in log
    assert "revoked operator last" in log  # the log is the one the stack writes
    assert "dpo1." not in log
    for token in [*OPERATOR_TOKENS, *world.tokens.values(), _admin(world)]:
        assert token.rsplit(".", 1)[-1] not in log
