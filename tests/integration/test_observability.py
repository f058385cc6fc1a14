"""Prometheus metrics and readiness, with real processes: the stack, and the appliance
layout (its own tunnel process with a metrics listener) on a PostgreSQL we can stop."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import asyncssh
import pytest
from pgfix import running_postgres
from prometheus_client.parser import text_string_to_metric_families
from test_tunnel_layouts import Appliance, login

from dpanel_server._files import atomic_write
from dpanel_server.config import dump_config, load_config
from dpanel_server.stack import start_mosquitto
from stackfix import Stack
from support import free_port, stop_proc, wait_for

Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(url: str) -> Sample:
    status, body = _get(url)
    assert status == 200, body
    out: Sample = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(sample: Sample, name: str, **labels: str) -> float:
    return sample.get((name, frozenset(labels.items())), 0.0)


def ready(url: str) -> tuple[int, dict[str, object]]:
    status, body = _get(url)
    return status, dict(json.loads(body))


async def _bad_login(port: int, device: str) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect("127.0.0.1", port, username=device, password="wrong",
                               known_hosts=None, client_keys=None, agent_path=None,
                               preferred_auth="password")


def test_manager_metrics_move_after_enrol_exec_and_auth_failures(
        stack: Stack, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{stack.api_port}/metrics"
    before = scrape(url)  # no token needed: aggregates only (see metrics.py)
    assert value(before, "dpanel_devices_online") == 0
    assert value(before, "dpanel_broker_connected") == 1

    stack.start_agent(stack.enrol("dev-m"), tmp_path / "dev-m")
    stack.wait_online("dev-m")
    assert stack.cli("exec", "dev-m", "--", "true").returncode == 0
    status, _ = _get(f"http://127.0.0.1:{stack.api_port}/v1/devices",
                     {"Authorization": "Bearer wrong"})
    assert status == 401
    asyncio.run(_bad_login(stack.tunnel_port, "dev-m"))

    after = scrape(url)
    assert value(after, "dpanel_devices_online") == 1
    assert value(after, "dpanel_tunnels_open") == 1
    assert value(after, "dpanel_tunnel_ports_in_use") == 1
    assert value(after, "dpanel_ssh_pool_connections") == 1
    assert value(after, "dpanel_exec_total", result="ok") == value(
        before, "dpanel_exec_total", result="ok") + 1
    assert value(after, "dpanel_exec_start_seconds_count") == value(
        before, "dpanel_exec_start_seconds_count") + 1
    assert value(after, "dpanel_device_requests_total", type="open", result="ok") >= 1
    assert value(after, "dpanel_api_requests_total", status="401") == value(
        before, "dpanel_api_requests_total", status="401") + 1
    assert value(after, "dpanel_api_requests_total", status="200") > value(
        before, "dpanel_api_requests_total", status="200")
    for where in ("api", "tunnel"):
        assert value(after, "dpanel_auth_failures_total", where=where) == value(
            before, "dpanel_auth_failures_total", where=where) + 1
    # an exec that fails is counted by its code
    assert stack.cli("exec", "nobody-here", "--", "true").returncode != 0
    assert value(scrape(url), "dpanel_exec_total", result="unknown_device") == 1
    # and no metric names a device
    assert b"dev-m" not in _get(url)[1]


def test_readiness_flips_when_the_sqlite_file_goes(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.api_port}/v1/ready"
    assert ready(url) == (200, {"database": True, "broker": True, "ready": True})
    db = stack.dir / "registry.db"
    db.rename(stack.dir / "registry.moved")
    try:
        status, doc = ready(url)
        assert status == 503 and doc["database"] is False and doc["broker"] is True
        assert "registry.db" in str(doc["database_error"])
    finally:
        (stack.dir / "registry.moved").rename(db)
    assert ready(url)[0] == 200


@dataclass
class MetricsAppliance(Appliance):
    """The appliance layout with the tunnel's metrics listener on a free port."""

    metrics_port: int = field(default_factory=free_port)

    def start_tunnel(self) -> None:
        cfg = load_config(self.config)
        cfg.tunnel.metrics_listen = f"127.0.0.1:{self.metrics_port}"
        atomic_write(self.config, dump_config(cfg), 0o600)
        super().start_tunnel()


@pytest.fixture
def pg_appliance(tmp_path: Path) -> Iterator[tuple[MetricsAppliance, object]]:
    with running_postgres() as pg:  # its own cluster: this test stops it
        s = MetricsAppliance(dir=tmp_path / "st", broker_port=free_port(),
                             tunnel_port=free_port(), api_port=free_port(),
                             registry=pg.new_db())
        s.start()
        try:
            yield s, pg
        finally:
            s.close()


def test_readiness_and_tunnel_metrics_on_postgresql(
        pg_appliance: tuple[MetricsAppliance, object], tmp_path: Path) -> None:
    app, pg = pg_appliance
    manager_ready = f"http://127.0.0.1:{app.api_port}/v1/ready"
    tunnel_base = f"http://127.0.0.1:{app.metrics_port}"
    assert ready(manager_ready)[0] == 200
    assert ready(f"{tunnel_base}/ready") == (200, {"database": True, "ready": True})

    # the tunnel process's own metrics move: a refused login, a device, its tunnel
    before = scrape(f"{tunnel_base}/metrics")
    app.start_agent(app.enrol("dev-t"), tmp_path / "dev-t")
    app.wait_online("dev-t")
    asyncio.run(_bad_login(app.tunnel_port, "dev-t"))
    app.cli_ok("tunnel", "open", "dev-t")
    after = scrape(f"{tunnel_base}/metrics")
    assert value(after, "dpanel_auth_failures_total", where="tunnel") == value(
        before, "dpanel_auth_failures_total", where="tunnel") + 1
    assert value(after, "dpanel_tunnel_ports_in_use") == 1
    assert value(after, "dpanel_tunnel_devices") == 1
    assert value(scrape(f"http://127.0.0.1:{app.api_port}/metrics"),
                 "dpanel_tunnels_open") == 1  # the manager asks the tunnel process

    # PostgreSQL stops: both processes say so; it comes back: both recover by themselves
    pg.stop()  # type: ignore[attr-defined]
    try:
        for url in (manager_ready, f"{tunnel_base}/ready"):
            status, doc = ready(url)
            assert status == 503 and doc["database"] is False, (url, doc)
    finally:
        pg.start()  # type: ignore[attr-defined]
    wait_for(lambda: ready(manager_ready)[0] == 200, "manager ready again", 30)
    wait_for(lambda: ready(f"{tunnel_base}/ready")[0] == 200, "tunnel ready again", 30)

    # the broker stops: the manager is not ready (the tunnel does not use the broker)
    reconnects = value(scrape(f"http://127.0.0.1:{app.api_port}/metrics"),
                       "dpanel_broker_reconnects_total")
    assert app.broker is not None
    stop_proc(app.broker, signal.SIGKILL)
    status_doc = wait_for(lambda: (r := ready(manager_ready))[0] == 503 and r,
                          "manager not ready without its broker", 30)
    assert status_doc[1]["broker"] is False and status_doc[1]["database"] is True
    assert ready(f"{tunnel_base}/ready")[0] == 200
    app.broker = start_mosquitto(load_config(app.config))
    wait_for(lambda: ready(manager_ready)[0] == 200, "manager ready after the broker", 60)
    assert value(scrape(f"http://127.0.0.1:{app.api_port}/metrics"),
                 "dpanel_broker_reconnects_total") == reconnects + 1
    # a device login still works against the restarted database
    secret = app.tokens["dev-t"]
    assert secret
    asyncio.run(_relogin(app))


async def _relogin(app: Appliance) -> None:
    from dpanel_proto.token import parse_token

    conn = await login(app, "dev-t", parse_token(app.tokens["dev-t"]).secret)
    conn.close()
    await conn.wait_closed()
