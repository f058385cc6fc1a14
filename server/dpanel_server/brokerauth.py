"""The broker asks the manager: RabbitMQ's ``rabbitmq_auth_backend_http``, answered live.

With ``broker.auth = "http"`` nothing about a device is ever written to the broker: it
asks on every login (user path), vhost access, resource (exchange/queue) and topic use,
and the registry answers. Enrolment is one INSERT, revocation one UPDATE plus closing the
device's live connection (:func:`kick_broker_user`; RabbitMQ has no way to push a
revocation into an open connection, and caches topic decisions per connection).

Protection: the routes are on their own listener (``broker.auth_listen``, loopback by
default, never the API's), under a secret path segment (``keys/broker-auth.secret``, 0600)
that only the broker's config knows: a local process that is not the broker gets 404.

The same answers map onto EMQX's HTTP authn/authz (POST username/password/clientid ->
``{"result": "allow"}``; authz with action publish|subscribe and the MQTT topic) and
VerneMQ's webhooks (auth_on_register / auth_on_publish / auth_on_subscribe): see
:func:`device_may` for the one rule all of them use. Only RabbitMQ's is served here.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Literal, Optional
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from dpanel_proto.wire import DEVICE_ACL, MANAGER_TOPICS, validate_device_id

from .config import ServerConfig
from .errors import BrokerError
from .metrics import BROKER_AUTH

__all__ = ["broker_auth_secret_path", "create_auth_app", "device_may", "kick_broker_user",
           "mqtt_to_amqp"]

log = logging.getLogger("dpanel.brokerauth")

#: What one rabbitmqctl call may take (it boots an Erlang VM: a second or two).
_CTL_TIMEOUT = 30.0
#: the broker's questions are a few hundred bytes
_MAX_BODY = 16 * 1024


def broker_auth_secret_path(cfg: ServerConfig) -> Path:
    """Next to the manager's broker password (0600, generated once)."""
    return Path(cfg.broker.password_file).with_name("broker-auth.secret")


def mqtt_to_amqp(topic: str) -> str:
    """RabbitMQ's MQTT plugin maps ``/`` to ``.`` and ``+`` to ``*`` in routing keys."""
    return ".".join("*" if part == "+" else part for part in topic.split("/"))


def device_may(device: str, access: Literal["read", "write"], topic: str) -> bool:
    """The protocol's ACL (:data:`DEVICE_ACL`, ``%u`` = the device) for a literal MQTT topic;
    a wildcard filter never matches a literal rule, so a device cannot subscribe wide."""
    return any(a == access and topic == pattern.replace("%u", device)
               for a, pattern in DEVICE_ACL)


def _manager_may(routing_key: str) -> bool:
    root = mqtt_to_amqp(MANAGER_TOPICS.rstrip("#").rstrip("/"))
    return routing_key == root or routing_key.startswith(root + ".")


def _decide(ok: bool) -> PlainTextResponse:
    return PlainTextResponse("allow" if ok else "deny")


def create_auth_app(secret: str, manager_user: str, manager_password: str,
                    verify: Callable[[str, str], bool], vhost: str = "/") -> FastAPI:
    """``verify(device, secret)`` is the registry's check (False when revoked)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    async def form(request: Request, key: str) -> Optional[dict[str, str]]:
        if not hmac.compare_digest(key.encode(), secret.encode()):
            return None
        # each a round trip the broker waits for (a login, a publish's first topic check):
        # this counter is what sizes the auth backend
        BROKER_AUTH.labels(request.url.path.rsplit("/", 1)[-1]).inc()
        data = dict(request.query_params)
        if request.method == "POST":  # urlencoded, parsed here (no python-multipart)
            body = await request.body()
            data.update(parse_qsl(body[:_MAX_BODY].decode(errors="replace")))
        return data

    def is_device(name: str) -> bool:
        try:
            validate_device_id(name)
            return name != manager_user
        except ValueError:
            return False

    @app.api_route("/brokerauth/{key}/user", methods=["GET", "POST"])
    async def user(request: Request, key: str) -> PlainTextResponse:
        f = await form(request, key)
        if f is None:
            return PlainTextResponse("not found", 404)
        name, password = f.get("username", ""), f.get("password", "")
        if name == manager_user:
            return _decide(hmac.compare_digest(password.encode(), manager_password.encode()))
        client_id = f.get("client_id")
        if not is_device(name) or (client_id is not None and client_id != name):
            # a device may only use its own client id: another's would take its session over
            return _decide(False)
        ok = await asyncio.to_thread(verify, name, password)
        if not ok:
            log.info("broker login refused for %s", name)
        return _decide(ok)

    @app.api_route("/brokerauth/{key}/vhost", methods=["GET", "POST"])
    async def vhost_(request: Request, key: str) -> PlainTextResponse:
        f = await form(request, key)
        if f is None:
            return PlainTextResponse("not found", 404)
        return _decide(f.get("vhost") == vhost)

    @app.api_route("/brokerauth/{key}/resource", methods=["GET", "POST"])
    async def resource(request: Request, key: str) -> PlainTextResponse:
        f = await form(request, key)
        if f is None:
            return PlainTextResponse("not found", 404)
        name, kind, res = f.get("username", ""), f.get("resource"), f.get("name", "")
        if f.get("vhost") != vhost:
            return _decide(False)
        if name == manager_user:
            return _decide(kind in ("exchange", "queue", "topic"))
        if kind == "exchange":
            return _decide(res == "amq.topic" and f.get("permission") in ("read", "write"))
        if kind == "queue":  # the MQTT plugin's per-client subscription queues
            return _decide(res.startswith(f"mqtt-subscription-{name}qos"))
        return _decide(kind == "topic")  # decided per routing key by /topic

    @app.api_route("/brokerauth/{key}/topic", methods=["GET", "POST"])
    async def topic(request: Request, key: str) -> PlainTextResponse:
        f = await form(request, key)
        if f is None:
            return PlainTextResponse("not found", 404)
        name, perm, rk = f.get("username", ""), f.get("permission"), f.get("routing_key", "")
        if f.get("vhost") != vhost or f.get("name") != "amq.topic":
            return _decide(False)
        if name == manager_user:
            return _decide(_manager_may(rk))
        if perm not in ("read", "write") or not is_device(name):
            return _decide(False)
        access: Literal["read", "write"] = "read" if perm == "read" else "write"
        return _decide(any(a == access and rk == mqtt_to_amqp(p.replace("%u", name))
                           for a, p in DEVICE_ACL))

    return app


def kick_broker_user(how: str, user: str) -> None:
    """Close every live connection of ``user`` (a revoked device) on the broker, on every
    node of the cluster: ``rabbitmqctl[:NODE]`` asks NODE (any node of it). Needs the
    cluster's Erlang cookie in the manager's $HOME. ``none``: do nothing."""
    if how == "none":
        return
    # the real script, not Debian's /usr/sbin wrapper (which refuses anyone but root and
    # rabbitmq, and switches to the rabbitmq user, whose Erlang cookie we may not share)
    direct = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
    exe = str(direct) if direct.exists() else shutil.which("rabbitmqctl")
    if exe is None:
        raise BrokerError("broker.kick: rabbitmqctl is not installed")
    cmd = [exe]
    if ":" in how:
        cmd += ["-n", how.split(":", 1)[1]]
    validate_device_id(user)  # it goes into an Erlang expression below
    # RabbitMQ 3.10's MQTT connections are not in list_connections (so not reached by
    # close_all_user_connections): the plugin's cluster-wide client-id registry names
    # their processes (ids held as strings in 3.10). Client id == username (the user
    # path enforces it).
    expr = (f'[rabbit_mqtt_reader:close_connection(P, "device revoked") || {{C, P}} <- '
            f'rabbit_mqtt_collector:list(), lists:member(C, ["{user}", <<"{user}">>])], ok.')
    for args in (["close_all_user_connections", user, "device revoked"], ["eval", expr]):
        try:
            proc = subprocess.run(cmd + args, capture_output=True, text=True,
                                  timeout=_CTL_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise BrokerError(f"rabbitmqctl did not answer within {_CTL_TIMEOUT:g} s") from None
        if proc.returncode != 0:
            raise BrokerError(f"rabbitmqctl {args[0]} {user}: "
                              f"{(proc.stderr or proc.stdout).strip()[:300]}")
