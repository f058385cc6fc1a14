"""Unit tests of the manager's parts: request bookkeeping, presence states, config rules."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import asyncssh
import pytest

from dpanel_proto import wire
from dpanel_server.config import ManagerConfig, ServerConfig, load_config
from dpanel_server.errors import ConfigError, RequestTimeout
from dpanel_server.presence import PresenceTracker
from dpanel_server.registry import Registry
from dpanel_server.requests import Requests


class _FakeMqtt:
    """Stands in for the broker session: remembers what was published."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        self.sent.append((topic, payload))
        return True


def _requests(**kw: object) -> tuple[Requests, _FakeMqtt]:
    cfg = ServerConfig()
    cfg.manager.request_timeout = 1.0
    reqs = Requests(cfg, asyncssh.generate_private_key("ssh-ed25519"), "pw",
                    on_status=kw.pop("on_status", lambda _d, _p: None),  # type: ignore[arg-type]
                    on_broker=lambda _up: None, **kw)  # type: ignore[arg-type]
    fake = _FakeMqtt()
    reqs._mqtt = fake  # type: ignore[assignment]
    return reqs, fake


def _open(device: str = "dev-1") -> wire.OpenRequest:
    now = time.time()
    return wire.OpenRequest(device=device, id="ab" * 16, issued_at=now, expires_at=now + 6)


def _ok(req: wire.Request, device: str = "dev-1") -> bytes:
    return wire.encode(wire.Response(device=device, id=req.id, code=wire.ErrorCode.OK,
                                     port=30001))


def test_a_handler_bug_is_logged_as_a_bug(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_device: str, _payload: bytes) -> None:
        raise KeyError("oops")

    reqs, _ = _requests(on_status=broken)
    with caplog.at_level(logging.WARNING):
        reqs._dispatch(wire.status_topic("dev-1"), b"{}")
    text = caplog.text
    assert "bug: the status handler failed" in text and "KeyError" in text
    assert "unexpected topic" not in text
    assert any(r.exc_info for r in caplog.records)  # with its traceback


def test_unknown_topic_and_bad_payload_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    reqs, _ = _requests()
    with caplog.at_level(logging.WARNING):
        reqs._dispatch("dpanel/v1/dev/dev-1/req", b"{}")
        reqs._dispatch(wire.resp_topic("dev-1"), b"[" * 15000)
    assert "unexpected topic" in caplog.text and "nested too deeply" in caplog.text
    assert "bug" not in caplog.text


def test_late_ok_to_a_given_up_open_is_reported() -> None:
    late: list[str] = []
    alive: list[str] = []
    reqs, fake = _requests(on_late_open=late.append, on_alive=alive.append)

    async def go() -> None:
        req = _open()
        with pytest.raises(RequestTimeout):
            await reqs.request(req)
        assert fake.sent and reqs.abandoned_open("dev-1")
        assert not reqs.abandoned_open("dev-2")
        # another device cannot answer for it
        reqs._dispatch(wire.resp_topic("dev-2"), _ok(req, "dev-2"))
        assert late == [] and reqs.abandoned_open("dev-1")
        reqs._dispatch(wire.resp_topic("dev-1"), _ok(req))
        assert late == ["dev-1"] and alive[-1] == "dev-1"
        assert not reqs.abandoned_open("dev-1")
        reqs._dispatch(wire.resp_topic("dev-1"), _ok(req))  # a duplicate: once only
        assert late == ["dev-1"]

    asyncio.run(go())


def test_a_cancelled_caller_also_abandons_its_open() -> None:
    reqs, _ = _requests()

    async def go() -> None:
        task = asyncio.ensure_future(reqs.request(_open()))
        await asyncio.sleep(0.05)
        assert reqs.pending_open("dev-1")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not reqs.pending_open("dev-1") and reqs.abandoned_open("dev-1")
        reqs.forget_abandoned("dev-1")
        assert not reqs.abandoned_open("dev-1")

    asyncio.run(go())


def test_presence_states(tmp_path: Path) -> None:
    offline: list[str] = []
    tracker = PresenceTracker(Registry(tmp_path / "r.db"), on_offline=offline.append,
                              on_pinned=lambda: None)

    def status(state: str) -> bytes:
        return wire.encode(wire.Status(device="dev-1", state=state))  # type: ignore[arg-type]

    async def go() -> None:
        tracker.mark_not_answering("dev-1")  # unknown: nothing to mark
        assert tracker.get("dev-1") is None
        tracker.on_status("dev-1", status("online"))
        p = tracker.get("dev-1")
        assert p is not None and p.state == "online"
        tracker.mark_not_answering("dev-1")
        assert p.state == "not_answering" and p.not_answering_since
        tracker.alive("dev-1")
        assert p.state == "online"
        tracker.mark_not_answering("dev-1")
        tracker.on_status("dev-1", status("online"))  # any status is a sign of life
        assert p.state == "online"
        tracker.on_status("dev-1", status("offline"))
        assert p.state == "offline" and offline == ["dev-1"]
        tracker.mark_not_answering("dev-1")  # offline stays offline
        assert p.state == "offline"
        await tracker.drain()

    asyncio.run(go())


def test_request_lifetime_defaults_to_a_few_seconds_past_the_timeout() -> None:
    m = ManagerConfig()
    m.validate()
    assert m.lifetime == m.request_timeout + 5
    m = ManagerConfig(request_timeout=40.0)
    m.validate()
    assert m.lifetime == 45.0


@pytest.mark.parametrize("text", [
    "[manager]\nrequest_lifetime = 60\n",             # > request_timeout + 30
    "[manager]\nrequest_lifetime = 5\n",              # < request_timeout
    "[manager]\nrequest_timeout = 290\nrequest_lifetime = 310\n",  # > MAX_REQUEST_LIFETIME
])
def test_request_lifetime_is_bounded(tmp_path: Path, text: str) -> None:
    p = tmp_path / "server.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert "manager.request_lifetime" in str(err.value)


def test_request_lifetime_within_bounds(tmp_path: Path) -> None:
    p = tmp_path / "server.toml"
    p.write_text("[manager]\nrequest_timeout = 20\nrequest_lifetime = 50\n")
    assert load_config(p).manager.lifetime == 50


def test_manager_keepalive_is_bounded(tmp_path: Path) -> None:
    p = tmp_path / "server.toml"
    p.write_text("[manager]\nmqtt_keepalive = 1\n")
    with pytest.raises(ConfigError, match=r"manager\.mqtt_keepalive"):
        load_config(p)


def test_presence_cleared_mid_request_is_no_500(tmp_path: Path) -> None:
    """A broker reconnect clears presence while a request waits: the answer still counts
    (open/close hold their Presence), and nothing raises KeyError."""
    from dpanel_server.config import stack_config
    from dpanel_server.manager import Manager
    from dpanel_server.presence import Presence

    cfg = stack_config(tmp_path, broker_port=1, tunnel_port=2, api_port=3)
    manager = Manager(cfg)

    class _Cleared:
        def connected(self) -> bool:
            return True

        async def request(self, req: wire.Request) -> wire.Response:
            manager._presence.clear()
            return wire.Response(device=req.device, id=req.id, code=wire.ErrorCode.OK,
                                 port=30001)

        def forget_abandoned(self, _device: str) -> None:
            pass

    async def go() -> None:
        manager.registry.add("dev-1")
        manager._requests = _Cleared()  # type: ignore[assignment]
        manager._presence.devices["dev-1"] = Presence(online=True)
        assert await manager.open_tunnel("dev-1") == 30001
        manager._presence.devices["dev-1"] = Presence(online=True)
        assert await manager.close_tunnel("dev-1")

    try:
        asyncio.run(go())
    finally:
        manager.registry.close()


def test_registry_is_never_called_on_the_event_loop(tmp_path: Path) -> None:
    """Presence, the pool's pin look-up and the facade's checks run SQLite in threads."""
    import threading

    from dpanel_server.config import stack_config
    from dpanel_server.manager import Manager
    from dpanel_server.presence import Presence

    cfg = stack_config(tmp_path, broker_port=1, tunnel_port=2, api_port=3)
    manager = Manager(cfg)
    manager.registry.add("dev-1")
    on_loop: list[str] = []
    calls: list[str] = []
    loop_thread: list[threading.Thread] = []
    for name in ("get", "devices", "pin_host_key", "touch", "reset_host_key"):
        real = getattr(manager.registry, name)

        def spy(*a: object, _real: object = real, _name: str = name) -> object:
            calls.append(_name)
            if loop_thread and threading.current_thread() is loop_thread[0]:
                on_loop.append(_name)
            return _real(*a)  # type: ignore[operator]

        setattr(manager.registry, name, spy)
    key = " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key()
                   .decode().split()[:2])

    class _Ok:
        def connected(self) -> bool:
            return True

        async def request(self, req: wire.Request) -> wire.Response:
            return wire.Response(device=req.device, id=req.id, code=wire.ErrorCode.OK,
                                 port=30001)

        def forget_abandoned(self, _device: str) -> None:
            pass

        def abandoned_open(self, _device: str) -> bool:
            return False

    async def go() -> None:
        loop_thread.append(threading.current_thread())
        manager._requests = _Ok()  # type: ignore[assignment]
        manager._on_status("dev-1", wire.encode(wire.Status(
            device="dev-1", state="online", host_key=key)))
        await manager._presence.drain()
        assert manager.presence["dev-1"] == Presence(
            online=True, since=manager.presence["dev-1"].since, host_key=key)
        assert await manager._pinned_key("dev-1") == key
        assert await manager.open_tunnel("dev-1") == 30001
        await manager.reset_host_key("dev-1")
        await manager.write_known_hosts()
        if manager._known_hosts_due is not None:
            manager._known_hosts_due.cancel()

    try:
        asyncio.run(go())
    finally:
        manager.registry.close()
    assert on_loop == []
    assert {"get", "devices", "pin_host_key", "touch", "reset_host_key"} <= set(calls)


def test_known_hosts_rechecks_old_pins(tmp_path: Path) -> None:
    """A key pinned verbatim by an older manager cannot add lines to known_hosts."""
    from dpanel_server.config import stack_config
    from dpanel_server.manager import Manager

    cfg = stack_config(tmp_path, broker_port=1, tunnel_port=2, api_port=3)
    manager = Manager(cfg)
    good = " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key()
                    .decode().split()[:2])
    manager.registry.add("dev-a")
    manager.registry.add("dev-b")
    manager.registry.pin_host_key("dev-a", good + " comment")
    manager.registry.pin_host_key("dev-b", "ssh-ed25519 AAAA\n@revoked * " + good)
    try:
        text = asyncio.run(manager.known_hosts_text())
    finally:
        manager.registry.close()
    assert text == f"dev-a,dev-a.dpanel {good}\n"


def test_a_registry_failure_in_presence_is_logged_with_its_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry(tmp_path / "r.db")
    registry.add("dev-1")

    def broken(*_a: object) -> None:
        raise OSError("disk I/O error")

    registry.touch = broken  # type: ignore[method-assign]
    tracker = PresenceTracker(registry, on_offline=lambda _d: None, on_pinned=lambda: None)

    async def go() -> None:
        tracker.on_status("dev-1", wire.encode(wire.Status(device="dev-1", state="online")))
        await tracker.drain()
        await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR):
        asyncio.run(go())
    registry.close()
    assert "registry update failed" in caplog.text and "disk I/O error" in caplog.text
    assert any(r.exc_info for r in caplog.records)
