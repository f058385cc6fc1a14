"""Section ``web``: the fleet web panel in Debian's chromium (Playwright), 3,000 devices.

* **fleet render**: from navigation of a logged-in browser to the page's counts naming
  every device and the first page of rows drawn (``/web/fleet`` fetch time beside it);
* **presence latency**: a device's own MQTT session publishes online/offline (retained
  status, as an agent does); the time from the publish to the row's state changing,
  taken by a MutationObserver in the page (wall clocks of one machine);
* **keystroke echo**: one character typed into the browser terminal (xterm.js, an input
  event on its textarea) until the echo is drawn, against one character written to a
  `dpanel ssh` PTY until its echo is read back; both on the same real agent.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from dpanel_proto import wire
from dpanel_proto.token import parse_token
from dpanel_server.config import load_config
from dpanel_server.registry import Registry
from dpanel_server.stack import prepare_stack
from stackfix import BIN, Stack
from support import free_port, wait_for

from ._util import PY, Child
from .devstack import close_stack

__all__ = ["rows", "run_web"]

CHROMIUM = "/usr/bin/chromium"


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "median_ms": round(statistics.median(xs) * 1000, 1),
            "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1000, 1),
            "min_ms": round(xs[0] * 1000, 1)}


def run_web(work: Path, *, devices: int = 3000, reps: int = 20) -> dict[str, Any]:
    if not Path(CHROMIUM).exists():
        return {"skipped": f"{CHROMIUM} is not installed"}
    from playwright.sync_api import sync_playwright

    d = work / "web-stack"
    shutil.rmtree(d, ignore_errors=True)
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
        for i in range(devices):
            _, secret = reg.add(f"sim-{i:04d}", {"site": f"s{i % 10}"})
            creds.append((f"sim-{i:04d}", secret))
    finally:
        reg.close()
    out: dict[str, Any] = {"devices": devices}
    sims = None
    stack.start()
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    flip = None
    try:
        spec = {"broker": ["127.0.0.1", stack.broker_port],
                "tunnel": ["127.0.0.1", stack.tunnel_port], "devices": creds,
                "keepalive": 60, "connect_concurrency": 100, "target_port": 9}
        (work / "web-sims.json").write_text(json.dumps(spec))
        sims = Child([PY, "-m", "tests.bench.simagents", str(work / "web-sims.json")],
                     work / "web-sims.log")
        sims.read(60)
        token = stack.cli_ok("device", "add", "bench-a", "--print-token").strip()
        stack.start_agent(token, work / "web-agent")
        flip_token = stack.cli_ok("device", "add", "bench-flip", "--print-token").strip()
        stack.wait_online("bench-a", 60)
        wait_for(lambda: sum(1 for x in json.loads(stack.cli_ok("device", "list", "--json"))
                             if x["online"]) >= devices, f"{devices} devices online", 600,
                 interval=3)
        admin = Path(load_config(stack.config).manager.admin_token_file).read_text().strip()
        url = f"https://127.0.0.1:{https_port}/"
        ctx = browser.new_context(ignore_https_errors=True,
                                  viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(120_000)
        page = ctx.new_page()
        page.goto(url)
        page.fill("#token", admin)
        page.click("#login-button")
        page.wait_for_selector("#fleet-body tr")
        # 1. the fleet page, logged in, from navigation to every device counted and drawn
        total = devices + 2
        renders = []
        for _ in range(5):
            t0 = time.monotonic()
            page.reload()
            page.wait_for_function(f"() => (document.getElementById('counts') || {{}})"
                                   f".textContent?.startsWith('{total} devices')"
                                   " && document.getElementById('fleet-body')"
                                   ".children.length === 100")
            renders.append(time.monotonic() - t0)
        out["fleet_render"] = _stats(renders)
        out["fleet_json_ms"] = round(page.evaluate("""async () => {
            const t = performance.now(); await (await fetch('/web/fleet')).json();
            return performance.now() - t; }"""), 1)
        # 2. presence: publish on the broker, see the row change
        flip = _mqtt(stack, flip_token)
        page.fill("#filter", "bench-flip")
        page.wait_for_selector('#fleet-body tr[data-device="bench-flip"]')
        lat = []
        for i in range(reps):
            want = "online" if i % 2 == 0 else "offline"
            page.evaluate("""want => { window.__seen = null;
                const tr = document.querySelector('#fleet-body tr[data-device="bench-flip"]');
                new MutationObserver((m, o) => { if (tr.dataset.state === want) {
                    window.__seen = Date.now() / 1000; o.disconnect(); } })
                    .observe(tr, {attributes: true}); }""", want)
            t0 = time.time()
            flip.publish(wire.status_topic("bench-flip"), wire.encode(wire.Status(
                device="bench-flip", state=want, agent_version="1.0")), 1, True)
            seen = wait_for(lambda: page.evaluate("window.__seen"), "presence on the page", 60,
                            interval=0.02)
            lat.append(seen - t0)
        out["presence_latency"] = _stats(lat)
        # 3. keystroke echo: the browser terminal against dpanel ssh
        page.goto(url + "#/device/bench-a")
        page.click("#term-open")
        page.wait_for_selector('#term-box[data-state="open"]')
        page.wait_for_function("() => document.querySelector('#term .xterm-rows')"
                               ".textContent.trim() !== ''")
        time.sleep(1)
        web = page.evaluate("""async (n) => {
            const rows = document.querySelector('#term .xterm-rows');
            const ta = document.querySelector('#term .xterm-helper-textarea');
            const count = () => (rows.textContent.match(/q/g) || []).length;
            const out = [];
            for (let i = 0; i < n; i++) {
                const before = count();
                const t0 = performance.now();
                await new Promise(res => {
                    const o = new MutationObserver(() => {
                        if (count() > before) { o.disconnect(); res(); } });
                    o.observe(rows, {subtree: true, childList: true, characterData: true});
                    ta.dispatchEvent(new InputEvent('input', {data: 'q',
                        inputType: 'insertText', bubbles: true}));
                });
                out.push((performance.now() - t0) / 1000);
                await new Promise(res => setTimeout(res, 50));
            }
            return out; }""", reps)
        out["echo_browser"] = _stats(web)
        out["echo_dpanel_ssh"] = _stats(_ssh_echo(stack, "bench-a", reps))
        out["echo_ratio"] = round(out["echo_browser"]["median_ms"] /
                                  out["echo_dpanel_ssh"]["median_ms"], 2)
        ctx.close()
    finally:
        if flip is not None:
            flip.loop_stop()
            flip.disconnect()
        browser.close()
        pw.stop()
        if sims is not None:
            sims.close()
        close_stack(stack)
    return out


def rows(r: dict[str, Any]) -> Any:
    """The section's lines in the bench table."""
    from .report import Row

    if "devices" not in r:  # skipped, or failed before measuring
        return

    def ms(*path: str) -> Any:
        v: Any = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    n = r.get("devices")
    yield Row(f"web: fleet page shows {n} devices (median)", ms("fleet_render", "median_ms"),
              "ms", goal="< 1000 ms", met=None if ms("fleet_render", "median_ms") is None
              else ms("fleet_render", "median_ms") < 1000)
    yield Row("web: presence change on the broker to the page (median)",
              ms("presence_latency", "median_ms"), "ms", goal="report")
    yield Row("web: keystroke echo, browser terminal vs dpanel ssh (median)",
              ms("echo_browser", "median_ms"), "ms", ms("echo_dpanel_ssh", "median_ms"),
              r.get("echo_ratio"), goal="report")


def _mqtt(stack: Stack, token: str) -> Any:
    import paho.mqtt.client as mqtt

    t = parse_token(token)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=t.device,
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(t.device, t.secret)
    c.connect("127.0.0.1", stack.broker_port, 30)
    c.loop_start()
    return c


def _ssh_echo(stack: Stack, device: str, reps: int) -> list[float]:
    """One byte into `dpanel ssh DEVICE`'s PTY until its echo comes back, ``reps`` times."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: dpanel ssh on our PTY
        os.execve(str(BIN / "dpanel"), [str(BIN / "dpanel"), "ssh", device], stack.env)
    try:
        buf = b""
        deadline = time.monotonic() + 60
        while not buf.rstrip().endswith((b"$", b"#")) and time.monotonic() < deadline:
            if select.select([fd], [], [], 1)[0]:
                buf += os.read(fd, 65536)
        time.sleep(1)
        while select.select([fd], [], [], 0.2)[0]:
            os.read(fd, 65536)
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            os.write(fd, b"q")
            got = b""
            while b"q" not in got:
                if not select.select([fd], [], [], 30)[0]:
                    raise TimeoutError("dpanel ssh: no echo in 30 s")
                got += os.read(fd, 65536)
            out.append(time.perf_counter() - t0)
            time.sleep(0.05)
        os.write(fd, b"\x15exit\r")
        return out
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)
