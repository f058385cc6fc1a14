"""Attacks on the broker ACL: a device may touch only its own topics (real Mosquitto)."""

from __future__ import annotations

import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from conftest import Mosquitto
from dpanel_proto import wire


def _client(broker: Mosquitto, user: str, password: str, client_id: str = "") -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user)
    c.username_pw_set(user, password)
    c.received = []  # type: ignore[attr-defined]
    c.disconnected = threading.Event()  # type: ignore[attr-defined]
    c.on_message = lambda cl, u, m: cl.received.append((m.topic, m.payload))
    c.on_disconnect = lambda cl, u, f, rc, p: cl.disconnected.set()
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def _settle() -> None:
    time.sleep(0.5)


@pytest.fixture
def two_devices(mosquitto: Mosquitto):  # type: ignore[no-untyped-def]
    mosquitto.add_user("dev-a", "secret-a-" + "x" * 30)
    mosquitto.add_user("dev-b", "secret-b-" + "x" * 30)
    a = _client(mosquitto, "dev-a", "secret-a-" + "x" * 30)
    b = _client(mosquitto, "dev-b", "secret-b-" + "x" * 30)
    mgr = _client(mosquitto, mosquitto.manager_user, mosquitto.manager_password)
    yield a, b, mgr
    for c in (a, b, mgr):
        c.loop_stop()
        c.disconnect()


def test_device_cannot_read_other_devices_requests(two_devices) -> None:  # type: ignore[no-untyped-def]
    a, b, mgr = two_devices
    a.subscribe("dpanel/#", qos=1)
    a.subscribe(wire.req_topic("dev-b"), qos=1)
    b.subscribe(wire.req_topic("dev-b"), qos=1)
    _settle()
    mgr.publish(wire.req_topic("dev-b"), b"for-b", qos=1).wait_for_publish(5)
    mgr.publish(wire.req_topic("dev-a"), b"for-a", qos=1).wait_for_publish(5)
    _settle()
    assert (wire.req_topic("dev-b"), b"for-b") in b.received
    assert all(t != wire.req_topic("dev-b") for t, _ in a.received)
    assert (wire.req_topic("dev-a"), b"for-a") in a.received


def test_device_cannot_publish_on_other_devices_topics(two_devices) -> None:  # type: ignore[no-untyped-def]
    a, b, mgr = two_devices
    mgr.subscribe("dpanel/v1/#", qos=1)
    b.subscribe(wire.req_topic("dev-b"), qos=1)
    _settle()
    for topic in (wire.status_topic("dev-b"), wire.resp_topic("dev-b"), wire.req_topic("dev-b"),
                  wire.req_topic("dev-a")):
        a.publish(topic, b"forged", qos=1).wait_for_publish(5)
    a.publish(wire.resp_topic("dev-a"), b"genuine", qos=1).wait_for_publish(5)
    _settle()
    assert (wire.resp_topic("dev-a"), b"genuine") in mgr.received
    assert not [m for m in mgr.received if m[1] == b"forged"]
    assert not [m for m in b.received if m[1] == b"forged"]


def test_device_cannot_take_over_another_client_id(two_devices, mosquitto: Mosquitto) -> None:  # type: ignore[no-untyped-def]
    a, _b, _ = two_devices
    # B logs in with its own credentials but A's client id: without
    # use_username_as_clientid this would kick A off the broker.
    evil = _client(mosquitto, "dev-b", "secret-b-" + "x" * 30, client_id="dev-a")
    _settle()
    assert not a.disconnected.is_set()
    evil.loop_stop()
    evil.disconnect()


def test_anonymous_and_wrong_password_refused(mosquitto: Mosquitto) -> None:
    mosquitto.add_user("dev-a", "right-" + "x" * 30)
    for user, pw in ((None, None), ("dev-a", "wrong"), ("nobody", "x")):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
        if user:
            c.username_pw_set(user, pw)
        answered = threading.Event()
        codes: list[object] = []

        def on_connect(cl, u, f, rc, p, codes=codes, answered=answered) -> None:  # type: ignore[no-untyped-def]
            codes.append(rc)
            answered.set()

        c.on_connect = on_connect
        c.connect("127.0.0.1", mosquitto.port)
        c.loop_start()
        assert answered.wait(5), "broker never answered CONNECT"
        c.loop_stop()
        assert codes[0].is_failure, f"{user} was let in"  # type: ignore[attr-defined]
        assert not c.is_connected()


def test_revoked_user_is_disconnected_at_once(mosquitto: Mosquitto) -> None:
    mosquitto.add_user("dev-a", "right-" + "x" * 30)
    a = _client(mosquitto, "dev-a", "right-" + "x" * 30)
    _settle()
    assert a.is_connected()
    mosquitto.remove_user("dev-a")
    assert a.disconnected.wait(5)
    a.loop_stop()

