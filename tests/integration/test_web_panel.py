"""The fleet web panel in a real browser: Debian's chromium driven by Playwright, against a real
`dpanel stack up --https-listen` with real agents and 3,000 simulated ones.

One stack, one browser, module-scoped: the 3,000 simulated devices are added to the
registry before the stack starts (its broker sync writes their credentials at once) and
connect from one `tests.bench.simagents` process; dev-a and dev-b are real agents; `evil`
is a device whose own MQTT session reports hostile strings and whose labels and audit
carry markup. Screenshots go to the module's temp dir (and to $DPANEL_WEB_SHOTS if set).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from dpanel_proto import wire
from dpanel_proto.token import parse_token
from dpanel_server.config import load_config
from dpanel_server.registry import Registry
from dpanel_server.stack import prepare_stack
from stackfix import Stack
from support import free_port, stop_proc, wait_for
from tests.bench._util import PY, Child

CHROMIUM = "/usr/bin/chromium"
SIMULATED = 3000
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")

HOSTILE = '<img src=x onerror="window.__xss=1">'
HOSTILE_SCRIPT = "<script>alert(document.domain)</script>"  # a label key: no "="

#: Before any page script: count what must never happen (a script we did not ship ran,
#: or the page tried to run one and CSP refused it: both mean markup reached the DOM).
WATCH = """
window.__xss = 0; window.__violations = [];
document.addEventListener('securitypolicyviolation',
    e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@dataclass
class Panel:
    stack: Stack
    url: str
    admin_token: str
    ca: Path
    shots: list[Path]
    browser: Any
    agents: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)

    def shot(self, page: Any, name: str) -> None:
        path = self.shots[0] / f"{name}.png"
        page.screenshot(path=str(path))
        extra = os.environ.get("DPANEL_WEB_SHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)

    def context(self) -> Any:
        ctx = self.browser.new_context(ignore_https_errors=True,
                                       viewport={"width": 1280, "height": 900})
        ctx.add_init_script(WATCH)
        ctx.set_default_timeout(90_000)  # bounds a hang on 2 loaded cores; never asserted
        # the page's own errors, shown with a failing test's captured output
        ctx.on("console", lambda m: print(f"browser console {m.type}: {m.text}"))
        ctx.on("weberror", lambda e: print(f"browser error: {e.error}"))
        return ctx

    def login(self, token: str, dialogs: list[str] | None = None) -> tuple[Any, Any]:
        ctx = self.context()
        page = ctx.new_page()
        if dialogs is not None:  # any alert/confirm/prompt, from the first byte on
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(self.url)
        page.fill("#token", token)
        page.click("#login-button")
        page.wait_for_selector("#fleet-body tr", timeout=60_000)
        return ctx, page

    def https(self, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, method=method,
                                     headers=dict(headers or {}))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
                raw = r.read()
                js = r.headers.get("Content-Type", "").startswith("application/json")
                return r.status, r.headers, json.loads(raw) if js else raw
        except urllib.error.HTTPError as e:
            raw = e.read()
            js = e.headers.get("Content-Type", "").startswith("application/json")
            return e.code, e.headers, json.loads(raw) if js else raw


def _fake_status(stack: Stack, token: str, payloads: list[bytes]) -> Any:
    """A device's own MQTT session (its real credentials) publishing what we choose."""
    import paho.mqtt.client as mqtt

    t = parse_token(token)
    host, port = "127.0.0.1", stack.broker_port
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=t.device,
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(t.device, t.secret)
    c.will_set(wire.status_topic(t.device),
               wire.encode(wire.Status(device=t.device, state="offline")), 1, True)
    c.connect(host, port, 30)
    c.loop_start()
    for p in payloads:
        c.publish(wire.status_topic(t.device), p, 1, True).wait_for_publish(10)
    return c


@pytest.fixture(scope="module")
def panel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Panel]:
    from playwright.sync_api import sync_playwright

    vendor = Path(__file__).parents[2] / "server" / "dpanel_server" / "web" / "vendor"
    assert (vendor / "xterm.js").exists(), "xterm.js is missing: python3 tasks.py lint fetches it"
    base = tmp_path_factory.mktemp("web")
    d = base / "stack"
    https_port = free_port()
    stack = Stack(dir=d, broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), https_port=https_port, keepalive=15)
    cfg = prepare_stack(d, broker_port=stack.broker_port, tunnel_port=stack.tunnel_port,
                        api_port=stack.api_port, port_range=stack.port_range,
                        keepalive_interval=stack.keepalive,
                        https_listen=f"127.0.0.1:{https_port}")
    reg = Registry(cfg.registry_path)
    creds = []
    try:
        for i in range(SIMULATED):
            _, secret = reg.add(f"sim-{i:04d}", {"site": f"s{i % 10}", "sim": "yes"})
            creds.append((f"sim-{i:04d}", secret))
    finally:
        reg.close()
    stack.start()
    sims: Child | None = None
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    try:
        spec = {"broker": ["127.0.0.1", stack.broker_port],
                "tunnel": ["127.0.0.1", stack.tunnel_port], "devices": creds,
                "keepalive": 60, "connect_concurrency": 100, "target_port": 9}
        (base / "sims.json").write_text(json.dumps(spec))
        sims = Child([PY, "-m", "tests.bench.simagents", str(base / "sims.json")],
                     base / "sims.log")
        sims.read(60)
        cfg = load_config(stack.config)
        admin = Path(cfg.manager.admin_token_file).read_text().strip()
        p = Panel(stack, f"https://127.0.0.1:{https_port}/", admin, d / "ca.pem", [base],
                  browser)
        for name, labels in (("dev-a", ("site=a",)), ("dev-b", ("site=b",))):
            args = ["device", "add", name, "--print-token"]
            for lab in labels:
                args += ["--label", lab]
            p.tokens[name] = token = stack.cli_ok(*args).strip()
            p.agents[name] = stack.start_agent(token, base / name)
        for name, role, *scope in (("vera", "viewer"), ("otto", "operator"),
                                   ("sia", "operator", "--scope", "site=a")):
            p.users[name] = stack.cli_ok("user", "add", name, "--role", role, *scope,
                                         "--print-token").strip()
        for name in ("dev-a", "dev-b"):
            stack.wait_online(name, 60)
        wait_for(lambda: sum(1 for x in json.loads(stack.cli_ok("device", "list", "--json"))
                             if x["online"]) >= SIMULATED, "3,000 simulated devices online",
                 180, interval=3)
        yield p
    finally:
        browser.close()
        pw.stop()
        if sims is not None:
            sims.close()
        stack.close()


def test_security_headers_and_nothing_from_elsewhere(panel: Panel) -> None:
    status, headers, _ = panel.https("GET", "/")
    assert status == 200
    csp = headers["Content-Security-Policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split("; ")}
    assert directives["default-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]  # no 'unsafe-inline', no eval
    assert directives["frame-ancestors"] == ["'none'"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/web/static/app.js", "/web/static/vendor/xterm.js"):
        status, headers, _ = panel.https("GET", path)
        assert status == 200 and headers["Content-Type"].startswith("text/javascript"), path
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert panel.https("GET", "/web/static/../server.toml")[0] == 404
    # the page itself: no inline script, everything from our own origin
    status, _, html = panel.https("GET", "/")
    assert b"<script>" not in html and b"onload=" not in html
    ctx = panel.context()
    page = ctx.new_page()
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url))
    page.goto(panel.url)
    page.wait_for_selector("#token")
    assert seen and all(u.startswith(panel.url) for u in seen), seen
    assert page.evaluate("window.__violations") == []
    ctx.close()


def test_wrong_token_is_refused_with_a_clear_error(panel: Panel) -> None:
    ctx = panel.context()
    page = ctx.new_page()
    page.goto(panel.url)
    for wrong in ("dpo1.nobody.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "not-the-admin-token"):
        page.fill("#token", wrong)
        page.click("#login-button")
        page.wait_for_function("() => document.getElementById('login-error').textContent !== ''")
        assert page.text_content("#login-error") == "Wrong or revoked token."
        page.evaluate("document.getElementById('login-error').textContent = ''")
    assert not ctx.cookies()
    assert page.query_selector("#fleet") is None
    ctx.close()


def test_login_sets_a_strict_session_cookie_and_logout_ends_it(panel: Panel) -> None:
    # the panel's own routes (outside the OpenAPI list that test_operators walks) want a
    # session too; a bearer token is not a session
    bearer = {"Authorization": f"Bearer {panel.admin_token}"}
    for method, path in (("GET", "/web/session"), ("GET", "/web/fleet"),
                         ("GET", "/web/events"), ("GET", "/web/devices/dev-a"),
                         ("POST", "/web/logout")):
        for headers in ({}, bearer, {"Cookie": "__Host-dpanel_session=forged"}):
            assert panel.https(method, path, {} if method == "POST" else None,
                               headers)[0] == 401, (method, path, headers)
    ctx, page = panel.login(panel.admin_token)
    cookies = {c["name"]: c for c in ctx.cookies()}
    session = cookies["__Host-dpanel_session"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    assert cookies["__Host-dpanel_csrf"]["secure"]
    assert not cookies["__Host-dpanel_csrf"]["httpOnly"]  # the page reads it (double submit)
    assert page.evaluate("document.cookie").count("dpanel_session") == 0
    cookie = f"__Host-dpanel_session={session['value']}"
    csrf = cookies["__Host-dpanel_csrf"]["value"]
    assert panel.https("GET", "/v1/whoami", headers={"Cookie": cookie})[2]["name"] == "admin"
    # a state change without the CSRF header, or from another origin, is refused
    status, _, out = panel.https("POST", "/v1/devices/dev-a/tunnel", {},
                                 headers={"Cookie": cookie})
    assert status == 403 and "CSRF" in out["error"]
    status, _, out = panel.https("POST", "/v1/devices/dev-a/tunnel", {},
                                 headers={"Cookie": cookie, "X-CSRF-Token": csrf,
                                          "Origin": "https://evil.example"})
    assert status == 403 and "cross-origin" in out["error"]
    status, _, out = panel.https("DELETE", "/v1/devices/dev-a/tunnel",
                                 headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert status == 200, out
    page.click("#logout")
    page.wait_for_selector("#token")
    assert "Logged out" in page.text_content("#login-error")
    assert page.query_selector("#fleet") is None
    # the session is gone server-side, not only in this browser
    assert panel.https("GET", "/v1/whoami", headers={"Cookie": cookie})[0] == 401
    ctx.close()


def test_3000_devices_render_filter_and_page(panel: Panel) -> None:
    ctx, page = panel.login(panel.admin_token)
    page.wait_for_function(
        "() => /^300[0-9] devices/.test(document.getElementById('counts')?.textContent)")
    counts = page.text_content("#counts") or ""
    total, online = int(counts.split()[0]), int(counts.split(": ")[1].split()[0])
    assert total >= SIMULATED + 2 and online >= SIMULATED, counts
    assert page.locator("#fleet-body tr").count() == 100  # one page, not 3,000 rows
    t0 = time.monotonic()
    page.fill("#filter", "site=s7")
    page.wait_for_function("() => document.getElementById('page').textContent"
                           ".includes('(300 shown)')")
    filter_s = time.monotonic() - t0
    assert page.locator("#fleet-body tr").count() == 100
    page.click("#next")
    assert "page 2 of 3" in (page.text_content("#page") or "")
    page.fill("#filter", "sim-0042")
    page.wait_for_function("() => document.getElementById('page').textContent"
                           ".includes('(1 shown)')")
    assert page.text_content("#fleet-body tr td:nth-child(4)") == "online"
    page.fill("#filter", "")
    page.wait_for_function("() => document.getElementById('fleet-body').children.length"
                           " === 100")
    panel.shot(page, "web-fleet")
    # still responsive: a filter over 3,000 rows is a keystroke, not a hang (bounded loosely)
    assert filter_s < 30, filter_s
    ctx.close()


def _device_page(panel: Panel, page: Any, device: str) -> None:
    """Go to a device's page and wait until it is drawn (the route renders after a fetch,
    and the previous page's controls are there until then)."""
    page.goto(panel.url + "#/device/" + device)
    page.wait_for_function("d => document.getElementById('device-name')?.textContent === d",
                           arg=device)


def _row_state(page: Any, device: str) -> str:
    return str(page.text_content(f'#fleet-body tr[data-device="{device}"] td:nth-child(4)'))


def test_presence_flips_live_when_an_agent_stops_and_starts(panel: Panel) -> None:
    ctx, page = panel.login(panel.admin_token)
    page.fill("#filter", "dev-")
    page.wait_for_selector('#fleet-body tr[data-device="dev-b"][data-state="online"]')
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "favicon" not in r.url else None)
    proc = panel.agents["dev-b"]
    stop_proc(proc, signal.SIGTERM)
    page.wait_for_selector('#fleet-body tr[data-device="dev-b"][data-state="offline"]',
                           timeout=90_000)
    assert _row_state(page, "dev-a") == "online"
    panel.agents["dev-b"] = panel.stack.start_agent(panel.tokens["dev-b"],
                                                    panel.shots[0] / "dev-b")
    page.wait_for_selector('#fleet-body tr[data-device="dev-b"][data-state="online"]',
                           timeout=90_000)
    # no reload and no polling: the page made no request while presence changed twice
    assert requests == [], requests
    ctx.close()


def test_exec_output_exit_codes_and_a_fanout_summary(panel: Panel) -> None:
    ctx, page = panel.login(panel.users["otto"])
    _device_page(panel, page, "dev-b")
    assert (page.text_content("#hostkey") or "").startswith("SHA256:")
    assert page.text_content("#pin-state") == "pinned"
    page.click("#tunnel-open")
    page.wait_for_function("() => document.getElementById('tunnel-msg').textContent"
                           ".startsWith('open on port')")
    port = int((page.text_content("#tunnel-msg") or "").split()[-1])
    assert json.loads(panel.stack.cli_ok("tunnel", "list", "--json")).get("dev-b") == port
    page.click("#tunnel-close")
    page.wait_for_function("() => document.getElementById('tunnel-msg').textContent"
                           " === 'closed'")
    _device_page(panel, page, "dev-a")
    page.fill("#exec-command", "echo hello-from-web; echo oops >&2; exit 3")
    page.click("#exec-run")
    page.wait_for_function("() => document.getElementById('exec-summary').textContent"
                           " === '1 exit 3'")
    out = page.text_content('pre.out[data-device="dev-a"]') or ""
    assert "hello-from-web" in out and "oops" in out
    assert page.text_content('span.status[data-device="dev-a"]') == "exit 3"
    # 3 MB of output: the pane keeps the first MiB, says so, and the exit still arrives
    page.fill("#exec-command", "head -c 3000000 /dev/zero | tr '\\0' a; exit 4")
    page.click("#exec-run")
    page.wait_for_function("() => document.getElementById('exec-summary').textContent"
                           " === '1 exit 4'")
    size = page.evaluate("document.querySelector('pre.out[data-device=\"dev-a\"]')"
                         ".textContent.length")
    assert (1 << 20) < size < (1 << 20) + 200, size
    assert "[output cut at 1 MiB" in (page.text_content('pre.out[data-device="dev-a"]') or "")
    # a selection: both real devices and one simulated device that cannot run anything
    page.goto(panel.url + "#/")
    page.fill("#filter", "dev-")
    page.wait_for_selector('#fleet-body tr[data-device="dev-a"]')
    for dev in ("dev-a", "dev-b"):
        page.check(f'#fleet-body tr[data-device="{dev}"] input[type=checkbox]')
    page.click("#run-selected")
    page.fill("#exec-command", "uname -m")
    page.click("#exec-run")
    page.wait_for_function("() => document.getElementById('exec-summary').textContent === '2 ok'",
                           timeout=60_000)
    for dev in ("dev-a", "dev-b"):
        assert (page.text_content(f'pre.out[data-device="{dev}"]') or "").strip() == \
            platform.machine()
    ctx.close()


def _screen(page: Any) -> list[str]:
    text = page.locator("#term .xterm-rows").inner_text()
    return [line.replace("\xa0", " ").rstrip() for line in text.split("\n")]


def test_terminal_runs_resizes_and_is_recorded(panel: Panel) -> None:
    ctx, page = panel.login(panel.users["otto"])
    _device_page(panel, page, "dev-a")
    page.click("#term-open")
    page.wait_for_selector('#term-box[data-state="open"]')
    page.wait_for_function("() => document.querySelector('#term .xterm-rows').textContent.trim()"
                           " !== ''", timeout=30_000)  # the prompt
    page.keyboard.type("uname -m")
    page.keyboard.press("Enter")
    wait_for(lambda: platform.machine() in _screen(page), "uname -m answered", 30)
    panel.shot(page, "web-terminal")
    # resize: a smaller window refits the terminal, and the PTY learns it
    before = page.text_content("#term-size")
    page.set_viewport_size({"width": 900, "height": 700})
    page.wait_for_function(f"() => document.getElementById('term-size').textContent !== '{before}'")
    cols = int(page.get_attribute("#term-size", "data-cols") or 0)
    rows = int(page.get_attribute("#term-size", "data-rows") or 0)
    page.keyboard.type("clear; stty size")
    page.keyboard.press("Enter")
    wait_for(lambda: f"{rows} {cols}" in _screen(page), f"stty size says {rows} {cols}", 30)
    page.keyboard.type("exit")
    page.keyboard.press("Enter")
    page.wait_for_selector('#term-box[data-state="closed"]', timeout=30_000)
    # the device recorded the shell under otto; the device page offers its replay
    def recorded() -> Any:
        rec = [r for r in json.loads(panel.stack.cli_ok("audit", "--device", "dev-a", "--json"))
               if r.get("kind") == "shell" and r.get("user") == "otto"
               and r.get("recording") == "ok"]
        return rec[-1] if rec else None
    rec = wait_for(recorded, "otto's web shell in the audit", 60)
    # its parts travel outside the chained record: wait until all of them are in
    auth = {"Authorization": f"Bearer {panel.admin_token}"}
    wait_for(lambda: panel.https("GET", f"/v1/audit/{rec['id']}/recording", headers=auth)[1]
             .get("X-Dpanel-Recording") == "verified", "the whole recording", 60, interval=1)
    page.goto(panel.url + "#/")
    _device_page(panel, page, "dev-a")
    page.click(f'button.replay[data-id="{rec["id"]}"]')
    page.wait_for_selector("#replay-box[data-done]", timeout=60_000)
    # what the screen showed last: stty's answer (the clear wiped what came before)
    replayed = lambda: page.locator("#replay-box .xterm-rows").inner_text().replace(  # noqa: E731
        "\xa0", " ")
    try:
        wait_for(lambda: f"{rows} {cols}" in replayed(), "the replay shows the session", 30)
    except TimeoutError:
        cast = panel.https("GET", f"/v1/audit/{rec['id']}/recording", headers=auth)[2]
        html = page.evaluate("document.getElementById('replay-box').outerHTML")
        raise AssertionError(f"replay of {cast!r}: {replayed()!r} {html[:3000]}") from None
    ctx.close()


def test_a_viewer_sees_no_controls_and_the_server_refuses_them(panel: Panel) -> None:
    ctx, page = panel.login(panel.users["vera"])
    assert page.query_selector("#run-selected") is None
    assert page.query_selector("#fleet-body input[type=checkbox]") is None
    assert page.query_selector("#enrol-open") is None
    _device_page(panel, page, "dev-a")
    page.wait_for_selector("#audit")
    for sel in ("#exec-command", "#term-open", "#tunnel-open", "#tunnel-close", "#revoke"):
        assert page.query_selector(sel) is None, sel
    # the controls' calls, made from the viewer's own page with its session and CSRF token
    answers = page.evaluate("""async () => {
        const csrf = decodeURIComponent(document.cookie.match(/__Host-dpanel_csrf=([^;]*)/)[1]);
        const h = {'Content-Type': 'application/json', 'X-CSRF-Token': csrf};
        const out = [];
        for (const [m, p, b] of [['POST', '/v1/devices/dev-a/exec', {command: 'id'}],
                                 ['POST', '/v1/devices/dev-a/tunnel', {}],
                                 ['POST', '/v1/devices', {name: 'vera-dev'}]]) {
            const r = await fetch(p, {method: m, headers: h, body: JSON.stringify(b)});
            out.push([r.status, (await r.json()).error]);
        }
        const opened = await new Promise(res => {
            const ws = new WebSocket('wss://' + location.host + '/web/devices/dev-a/terminal');
            ws.onopen = () => res(true); ws.onclose = () => res(false);
        });
        return {out, opened};
    }""")
    assert answers["opened"] is False
    assert [a[0] for a in answers["out"]] == [403, 403, 403], answers
    assert answers["out"][0][1] == "vera is a viewer: exec needs the operator role"
    # and straight at the WebSocket, with her cookie and our own Origin: 403
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    cookie = next(c for c in ctx.cookies() if c["name"] == "__Host-dpanel_session")
    origin = panel.url.rstrip("/")
    tls = ssl.create_default_context(cafile=str(panel.ca))
    for headers, want in (({"Cookie": f"{cookie['name']}={cookie['value']}", "Origin": origin},
                           403),
                          ({"Cookie": f"{cookie['name']}={cookie['value']}",
                            "Origin": "https://evil.example"}, 403),
                          ({"Origin": origin}, 401)):
        with pytest.raises(InvalidStatus) as err:
            connect(origin.replace("https", "wss") + "/web/devices/dev-a/terminal", ssl=tls,
                    additional_headers=headers, open_timeout=30).close()
        assert err.value.response.status_code == want, headers
    ctx.close()


def test_a_hostile_device_runs_no_script(panel: Panel) -> None:
    # enrolled with markup in its labels (printable, so the API takes them)
    status, _, out = panel.https("POST", "/v1/devices", {
        "name": "evil", "labels": {"note": HOSTILE, HOSTILE_SCRIPT: "x"}},
        headers={"Authorization": f"Bearer {panel.admin_token}"})
    assert status == 201, out
    token = out["token"]
    # its audit: an exec the API records with the command as given (offline: fails fast)
    panel.https("POST", "/v1/devices/evil/exec", {"command": HOSTILE, "stream": False},
                headers={"Authorization": f"Bearer {panel.admin_token}"})
    # its own MQTT session reports markup as its version and host key (the manager drops
    # that status), then a well-formed one
    hostile = json.loads(wire.encode(wire.Status(device="evil", state="online")))
    hostile.update(agent_version=HOSTILE, host_key=f"ssh-ed25519 {HOSTILE_SCRIPT}")
    fine = wire.encode(wire.Status(device="evil", state="online", agent_version="1.0"))
    client = _fake_status(panel.stack, token, [json.dumps(hostile).encode(), fine])
    try:
        dialogs: list[str] = []
        ctx, page = panel.login(panel.admin_token, dialogs)
        page.fill("#filter", "evil")
        page.wait_for_selector('#fleet-body tr[data-device="evil"][data-state="online"]')
        row = page.text_content('#fleet-body tr[data-device="evil"]') or ""
        assert HOSTILE in row and HOSTILE_SCRIPT in row and "1.0" in row, row
        _device_page(panel, page, "evil")
        page.wait_for_selector("#audit")
        assert HOSTILE in (page.text_content("#audit") or "")
        page.goto(panel.url + "#/")
        page.fill("#filter", "evil")
        page.wait_for_selector('#fleet-body tr[data-device="evil"]')
        assert page.evaluate("document.querySelectorAll('main img, main script').length") == 0
        # nothing ran, and nothing even tried (CSP would have reported a blocked attempt)
        assert page.evaluate("window.__xss") == 0
        assert page.evaluate("window.__violations") == []
        assert dialogs == []
        ctx.close()
    finally:
        client.loop_stop()
        client.disconnect()


def test_an_admin_enrols_with_the_token_shown_once_and_revokes(panel: Panel) -> None:
    ctx, page = panel.login(panel.admin_token)
    page.click("#enrol-open")
    page.fill("#enrol-name", "web-new")
    page.fill("#enrol-labels", "site=web")
    page.click("#enrol-submit")
    page.wait_for_selector("#enrol-token")
    token = page.text_content("#enrol-token") or ""
    assert parse_token(token).device == "web-new"
    page.on("dialog", lambda d: d.accept())
    _device_page(panel, page, "web-new")
    page.click("#revoke")
    page.wait_for_function("() => document.querySelector('#device-state')?.textContent"
                           ".startsWith('revoked')", timeout=30_000)
    assert panel.stack.device("web-new")["revoked"]
    ctx.close()


def test_a_scoped_operator_sees_and_reaches_only_its_devices(panel: Panel) -> None:
    status, headers, me = panel.https("POST", "/web/login", {"token": panel.users["sia"]},
                                      {"Origin": panel.url.rstrip("/")})
    assert status == 200 and me["scope"] == ["site=a"], me
    cookie = next(c.split(";")[0] for c in headers.get_all("Set-Cookie")
                  if c.startswith("__Host-dpanel_session="))
    fleet = panel.https("GET", "/web/fleet", headers={"Cookie": cookie})[2]
    assert [d["id"] for d in fleet["devices"]] == ["dev-a"]
    status, _, out = panel.https("GET", "/web/devices/dev-b", headers={"Cookie": cookie})
    assert status == 403 and "outside sia's scope" in out["error"]
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    tls = ssl.create_default_context(cafile=str(panel.ca))
    origin = panel.url.rstrip("/")
    with pytest.raises(InvalidStatus) as err:
        connect(origin.replace("https", "wss") + "/web/devices/dev-b/terminal", ssl=tls,
                additional_headers={"Cookie": cookie, "Origin": origin},
                open_timeout=30).close()
    assert err.value.response.status_code == 403
    # in scope, but without the session's CSRF token in the first message: no shell
    from websockets.exceptions import ConnectionClosed

    with connect(origin.replace("https", "wss") + "/web/devices/dev-a/terminal", ssl=tls,
                 additional_headers={"Cookie": cookie, "Origin": origin},
                 open_timeout=60) as ws:
        ws.send(json.dumps({"csrf": "guessed", "cols": 80, "rows": 24}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    # in scope: the terminal opens (first message: the CSRF token and the size)
    with connect(origin.replace("https", "wss") + "/web/devices/dev-a/terminal", ssl=tls,
                 additional_headers={"Cookie": cookie, "Origin": origin},
                 open_timeout=60) as ws:
        ws.send(json.dumps({"csrf": me["csrf"], "cols": 80, "rows": 24}))
        ws.send(b"echo scoped-$((6*7))\rexit\r")
        got = b""
        for msg in ws:
            got += msg if isinstance(msg, bytes) else b""
            if isinstance(msg, str) and "exit" in json.loads(msg):
                break
        assert b"scoped-42" in got
