"""The key end-to-end promises on both registry engines (SQLite and a real PostgreSQL 15):
enrol, exec, revoke cuts off at once, delete and re-enrol, in the one-process stack and
in the appliance layout, where the tunnel is its own process reading the same database."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Iterator

import pytest
import test_api_cli
import test_attacks
import test_e2e
import test_tunnel_layouts
from test_tunnel_layouts import Appliance, login

from dpanel_proto.token import parse_token
from dpanel_server.config import load_config
from dpanel_server.registry import Registry
from stackfix import Stack
from support import free_port


def _make(cls: type[Stack], tmp_path: Path, url: str) -> Stack:
    return cls(dir=tmp_path / "st", broker_port=free_port(), tunnel_port=free_port(),
               api_port=free_port(), registry=url)


@pytest.fixture
def engine_stack(tmp_path: Path, registry_url: str) -> Iterator[Stack]:
    s = _make(Stack, tmp_path, registry_url)
    s.start()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def engine_appliance(tmp_path: Path, registry_url: str) -> Iterator[Appliance]:
    s = _make(Appliance, tmp_path, registry_url)
    assert isinstance(s, Appliance)
    s.start()
    try:
        yield s
    finally:
        s.close()


def test_enrol_exec_and_revoke_cuts_off(engine_stack: Stack, tmp_path: Path,
                                        registry_url: str) -> None:
    assert load_config(engine_stack.config).registry_url == registry_url
    token = engine_stack.enrol("dev-1")
    engine_stack.start_agent(token, tmp_path / "dev-1")
    engine_stack.wait_online("dev-1")
    test_e2e.test_exec_streams_and_keeps_exit_code(engine_stack, "dev-1")
    test_attacks.test_revoked_device_is_cut_off_at_once(engine_stack, tmp_path)
    test_api_cli.test_delete_frees_a_revoked_name_and_keeps_a_record(engine_stack)


def test_separate_tunnel_learns_a_revoke_from_the_database(
        engine_appliance: Appliance, registry_url: str) -> None:
    """The tunnel process authenticates from the database, is told of a revoke pushed
    by the manager, and, with no push at all, notices one by polling the revision."""
    test_tunnel_layouts.test_revoke_drops_a_logged_in_device_that_has_no_forward_yet(
        engine_appliance)
    secret = parse_token(engine_appliance.enrol("dev-p")).secret
    tunnel = engine_appliance.tunnel
    assert tunnel is not None
    registry = Registry(registry_url)

    async def scenario() -> None:
        conn = await login(engine_appliance, "dev-p", secret)
        tunnel.send_signal(signal.SIGSTOP)  # revoke behind its back: no push reaches it
        try:
            await asyncio.to_thread(registry.revoke, "dev-p")
        finally:
            tunnel.send_signal(signal.SIGCONT)
        # no forward asked for: only the revision poll can end this session
        await asyncio.wait_for(conn.wait_closed(), 20)

    try:
        asyncio.run(scenario())
    finally:
        registry.close()


def test_stack_up_names_a_bad_registry_url(tmp_path: Path) -> None:
    import subprocess

    from stackfix import BIN

    out = subprocess.run([str(BIN / "dpanel"), "stack", "up", "--dir", str(tmp_path / "s"),
                          "--registry", "mysql://u:pw@h/db"], capture_output=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert b"--registry" in out.stderr and b"Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count(b"\n") == 0, out.stderr  # one line
    assert b"pw" not in out.stderr  # the password is never echoed
