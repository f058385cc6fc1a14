"""Agent updates with real processes: a running frozen amd64 agent updated to a newer
frozen one over MQTT + HTTP (resumed with Range), rollbacks (a binary that exits at
once; one that runs but cannot reach the broker), refused bundles (bad signature, wrong
architecture, truncated download) with the old binary still running, a halted staged
rollout, and the broker ACL keeping offers from other devices.

The device runs under tests/updfix.Supervisor, a restart loop mirroring the systemd
unit, its slots drop-in and the rollback timer (no systemd in the test machines)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import asyncssh
import paho.mqtt.client as mqtt
import pytest

from dpanel_image.synthetic import fake_elf
from dpanel_proto import __version__ as OLD
from dpanel_proto.token import parse_token
from dpanel_proto.update import Manifest, sign_manifest, write_bundle
from stackfix import Stack
from support import free_port, wait_for
from updfix import NEW_VERSION, SlotDevice, Supervisor, frozen_agents


class World:
    def __init__(self, stack: Stack, tmp: Path, agents: dict[str, Path]) -> None:
        self.stack, self.tmp, self.agents = stack, tmp, agents
        self.key = asyncssh.read_private_key(str(stack.dir / "update_key"))
        self.pub = " ".join((stack.dir / "update_key.pub").read_text().split()[:2])
        self.sups: list[Supervisor] = []

    def bundle(self, binary: Path, version: str, arch: str = "amd64",
               key: Any = None) -> Path:
        out = self.tmp / "bundles" / f"{version}-{arch}"
        write_bundle(out, binary, version, arch, key or self.key)
        return out

    def store(self, version: str) -> Path:
        """The manager's copy of an imported bundle (tests tamper with it)."""
        return self.stack.dir / "updates" / "amd64" / version

    def rollout(self, *args: str) -> str:
        return str(json.loads(self.stack.cli_ok("agent", "update", "--json", *args))["id"])

    def show(self, rid: str) -> dict[str, Any]:
        return dict(json.loads(self.stack.cli_ok("agent", "update", "status", rid, "--json")))

    def part(self, rid: str, device: str) -> dict[str, Any]:
        return next(p for p in self.show(rid)["parts"] if p["device"] == device)

    def wait_part(self, rid: str, device: str, state: str, timeout: float = 120
                  ) -> dict[str, Any]:
        def done() -> Any:
            p = self.part(rid, device)
            assert p["state"] not in {"updated", "failed", "rolled_back", "skipped"} - {
                state}, p  # a wrong end fails at once
            return p if p["state"] == state else None
        return dict(wait_for(done, f"{device} {state} in rollout {rid}", timeout))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("upd")
    agents = frozen_agents(Path.home() / ".cache" / "dpanel" / "test-dist-upd")
    s = Stack(dir=root / "stack", broker_port=free_port(), tunnel_port=free_port(),
              api_port=free_port())
    s.start()
    w = World(s, root, agents)
    try:
        wait_for(lambda: (s.dir / "update_key.pub").exists(), "the update key", 30)
        yield w
    finally:
        for sup in w.sups:
            sup.stop()
        s.close()


@pytest.fixture(scope="module")
def device(world: World) -> Iterator[tuple[SlotDevice, Supervisor]]:
    token = world.stack.enrol("upd-1")
    dev = SlotDevice(world.tmp / "upd-1", token, world.agents[OLD], world.pub)
    sup = Supervisor(dev, world.tmp / "upd-1" / "agent.log")
    world.sups.append(sup)
    sup.start()
    wait_for(lambda: world.stack.device("upd-1")["agent_version"] == OLD and
             world.stack.device("upd-1")["online"], "upd-1 online with the old agent", 60)
    yield dev, sup


def _log(dev: SlotDevice) -> str:
    return (dev.base / "agent.log").read_text(errors="replace")


def test_a_running_frozen_agent_updates_to_a_newer_one(world: World, device: Any) -> None:
    dev, sup = device
    new = world.agents[NEW_VERSION]
    world.stack.cli_ok("agent", "import", str(world.bundle(new, NEW_VERSION)))
    assert NEW_VERSION in world.stack.cli_ok("agent", "bundles")
    # a slow link dropped an earlier attempt after 1 MiB: the fetch resumes (Range)
    upd = dev.state / "update"
    upd.mkdir(exist_ok=True)
    (upd / "download.part").write_bytes(new.read_bytes()[:1 << 20])
    sha = json.loads((world.store(NEW_VERSION) / "manifest.json").read_text())["sha256"]
    (upd / "download.sha256").write_text(f"sha256={sha}\n")
    old_pid = sup.pid()
    rid = world.rollout("upd-1", "--version", NEW_VERSION, "--canary", "1")
    world.wait_part(rid, "upd-1", "updated")
    assert "update download: resuming at 1048576 bytes" in _log(dev)
    assert dev.current() == "slots/b" and sup.pid() != old_pid
    assert dev.slot_binary("a").read_bytes() == world.agents[OLD].read_bytes()  # kept
    assert dev.slot_binary("b").read_bytes() == new.read_bytes()
    assert not (upd / "pending").exists()  # committed
    listing = world.stack.cli_ok("device", "list")
    assert any(line.split()[0] == "upd-1" and NEW_VERSION in line
               for line in listing.splitlines()), listing
    status = world.stack.cli_ok("agent", "update", "status", rid)
    assert "summary: 1 updated" in status, status
    assert world.show(rid)["state"] == "finished"
    assert any(line.startswith(rid) and "finished" in line and "1 updated" in line
               for line in world.stack.cli_ok("agent", "update", "list").splitlines())


def test_rollback_when_the_new_binary_exits_at_once(world: World, device: Any) -> None:
    """A 'new agent' that exits at start (/bin/false, an amd64 ELF, signed and correct):
    the hook reverts after 3 starts; the previous agent comes back and says why. The
    rollout's canary failed, so the second device is never offered anything."""
    dev, sup = device
    token2 = world.stack.enrol("upd-2")
    other = world.stack.start_agent(token2, world.tmp / "upd-2")  # the plain Python agent
    world.stack.wait_online("upd-2", 60)
    world.stack.cli_ok("agent", "import", str(world.bundle(Path("/bin/false"), "0.3.0-crash")))
    starts = len(sup.starts)
    rid = world.rollout("upd-1", "upd-2", "--version", "0.3.0-crash", "--canary", "1",
                        "--max-failures", "0")
    part = world.wait_part(rid, "upd-1", "rolled_back")
    assert "did not come online in 3 starts" in part["reason"], part
    # three starts of the new slot, then the hook's revert to the previous one
    assert sup.starts[starts:starts + 4] == ["slots/a"] * 3 + ["slots/b"], sup.starts
    assert dev.current() == "slots/b"
    wait_for(lambda: world.show(rid)["state"] == "halted", "the rollout halted", 30)
    p2 = world.part(rid, "upd-2")
    assert p2["state"] == "skipped" and "halted" in p2["reason"], p2
    assert world.stack.device("upd-1")["agent_version"] == NEW_VERSION
    assert "1 rolled back, 1 skipped" in world.stack.cli_ok("agent", "update", "status", rid)
    other.send_signal(signal.SIGTERM)


def test_rollback_when_the_new_binary_cannot_reach_the_broker(world: World,
                                                               device: Any) -> None:
    """The 'new' agent (here the older frozen binary, as a downgrade) starts while the
    broker is frozen (SIGSTOP: TCP connects, no CONNACK): it never commits, the timer's
    deadline check reverts it, and the previous agent reports it once the broker is back."""
    dev, sup = device
    world.stack.cli_ok("agent", "import", str(world.bundle(world.agents[OLD], OLD)))
    broker = world.stack.broker_pid()
    stopped = threading.Event()
    trial: list[str] = []

    def freeze_broker() -> None:
        pending = dev.state / "update" / "pending"
        if pending.exists() and f"version={OLD}" in pending.read_text() and not stopped.is_set():
            trial.append(pending.read_text())
            os.kill(broker, signal.SIGSTOP)
            stopped.set()

    sup.before_start = freeze_broker
    try:
        rid = world.rollout("upd-1", "--version", OLD, "--commit-timeout", "15s")
        assert stopped.wait(120), "the new agent never started"
        wait_for(lambda: not (dev.state / "update" / "pending").exists(),
                 "the deadline revert", 60)
        assert dev.current() == "slots/b"
        # judged by time since this boot, not the wall clock (boards without an RTC)
        assert "\nboot_id=" in trial[0] and "\ndeadline_up=" in trial[0], trial
    finally:
        sup.before_start = None
        os.kill(broker, signal.SIGCONT)
    part = world.wait_part(rid, "upd-1", "rolled_back", 120)
    assert "before its commit deadline" in part["reason"], part
    assert world.stack.device("upd-1")["agent_version"] == NEW_VERSION


def _tamper(world: World, version: str, manifest: Manifest, sig: str, binary: bytes) -> None:
    d = world.store(version)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "dpanel-tunnel").write_bytes(binary)
    (d / "manifest.json").write_text(json.dumps(dict(manifest.__dict__, sig=sig)))


@pytest.mark.parametrize("case", ["bad-signature", "wrong-arch-manifest", "wrong-arch-binary",
                                  "truncated"])
def test_failed_verification_keeps_the_old_binary_running(world: World, device: Any,
                                                          case: str) -> None:
    dev, sup = device
    wait_for(lambda: world.stack.device("upd-1")["online"], "upd-1 online", 60)
    pid, slot = sup.pid(), dev.current()
    good = Path("/bin/true").read_bytes()
    version = f"0.9.{len(case)}-{case}"
    body, arch, key = good, "amd64", world.key
    if case == "bad-signature":
        key = asyncssh.generate_private_key("ssh-ed25519")  # not the pinned update key
    elif case == "wrong-arch-manifest":
        arch = "arm64"
    elif case == "wrong-arch-binary":
        body = fake_elf("arm64") + good[64:]
    import hashlib

    m = Manifest(version=version, arch=arch, size=len(body),
                 sha256=hashlib.sha256(body).hexdigest())
    served = body[:len(body) // 2] if case == "truncated" else body
    # the manager's store is tampered with (a compromised or broken server): import
    # would have refused these
    _tamper(world, version, m, sign_manifest(m, key), served)
    rid = world.rollout("upd-1", "--version", version)
    part = world.wait_part(rid, "upd-1", "failed", 90)
    want = {"bad-signature": "signature does not verify with the pinned update key",
            "wrong-arch-manifest": "the bundle is for arm64, this device is amd64",
            "wrong-arch-binary": "the binary is arm64, this device is amd64",
            "truncated": f"truncated download: got {len(served)} of {len(body)} bytes"}[case]
    if case in ("wrong-arch-binary", "truncated"):
        # fetched and refused: the device's status says why
        def reason() -> Any:
            return want in (world.part(rid, "upd-1")["reason"] or "")
        wait_for(reason, f"the reason {want!r}", 30)
    else:
        assert want in part["reason"], part
    assert sup.pid() == pid and dev.current() == slot  # the old binary never stopped
    assert world.stack.device("upd-1")["agent_version"] == NEW_VERSION


def test_import_refuses_a_bundle_signed_by_another_key(world: World) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519")
    out = world.stack.cli("agent", "import",
                          str(world.bundle(Path("/bin/true"), "0.5.0", key=other)))
    assert out.returncode != 0 and b"not signed by this manager's update key" in out.stderr


def test_a_hostile_device_sees_no_other_devices_offer_and_cannot_fetch_without_secret(
        world: World, device: Any) -> None:
    import urllib.error
    import urllib.request

    token = parse_token(world.stack.enrol("upd-evil"))
    seen: list[str] = []
    got_sub = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="upd-evil")
    c.username_pw_set("upd-evil", token.secret)
    c.on_message = lambda _c, _u, msg: seen.append(msg.topic)
    c.on_subscribe = lambda *_a: got_sub.set()
    host, port = token.broker.split("://")[1].rsplit(":", 1)
    c.connect(host, int(port))
    c.loop_start()
    try:
        c.subscribe([("dpanel/v1/dev/upd-1/req", 1), ("dpanel/v1/dev/upd-1/resp", 1),
                     ("dpanel/v1/dev/+/req", 1), ("#", 1)])
        assert got_sub.wait(10)
        # an offer upd-1 refuses at once (the bundle the verification test left with a
        # foreign signature): offer and answer both crossed the broker once it failed
        rid = world.rollout("upd-1", "--version", "0.9.13-bad-signature")
        world.wait_part(rid, "upd-1", "failed", 60)
        # and a job on upd-1 (its open request, status with the port, the output)
        job = json.loads(world.stack.cli_ok("job", "run", "upd-1", "--json", "--",
                                            "echo", "upd-1-secret-output"))["id"]
        wait_for(lambda: json.loads(world.stack.cli_ok("job", "show", job, "--json"))[
            "parts"][0]["state"] == "succeeded", "the job on upd-1", 60)
        assert "upd-1-secret-output" in world.stack.cli_ok("job", "logs", job)
        assert not [t for t in seen if "/upd-1/" in t], seen
    finally:
        c.disconnect()
        c.loop_stop()
    url = (f"http://127.0.0.1:{world.stack.api_port}/v1/agent/bundles/amd64/"
           f"{NEW_VERSION}/dpanel-tunnel")
    for auth in (None, "Basic " + __import__("base64").b64encode(b"upd-1:wrong").decode()):
        req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=10)
        assert exc.value.code == 401


def test_an_offline_device_is_pending_then_updated_when_it_comes_online(
        world: World) -> None:
    token = world.stack.enrol("upd-late")
    # (again: a re-import of the same bundle is harmless, and this test stands alone)
    world.stack.cli_ok("agent", "import",
                       str(world.bundle(world.agents[NEW_VERSION], NEW_VERSION)))
    rid = world.rollout("upd-late", "--version", NEW_VERSION, "--canary", "0")
    status = world.stack.cli_ok("agent", "update", "status", rid)
    assert "summary: 1 pending (1 offline)" in status, status
    assert world.part(rid, "upd-late")["state"] == "pending"
    dev = SlotDevice(world.tmp / "upd-late", token, world.agents[OLD], world.pub)
    sup = Supervisor(dev, world.tmp / "upd-late" / "agent.log")
    world.sups.append(sup)
    sup.start()  # it comes online with the old agent and gets its offer then
    world.wait_part(rid, "upd-late", "updated")
    assert dev.current() == "slots/b"
    assert world.stack.device("upd-late")["agent_version"] == NEW_VERSION
