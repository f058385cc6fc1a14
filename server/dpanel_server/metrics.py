"""Prometheus metrics and readiness for the manager and the tunnel server.

Counters are incremented where things happen (one line at each site); gauges are read
at scrape time from what the process already knows (presence, the tunnel's sessions,
the SSH pool), so they can never drift. No metric carries a device id or a label value
of a customer's: the scrape is aggregate-only (bounded cardinality, nothing to leak).

The manager serves ``/metrics`` and ``/v1/ready`` on its API; the tunnel server, a
process of its own, on a small listener (``tunnel.metrics_listen``, loopback by default)
at ``/metrics`` and ``/ready``. Readiness is 200 only when each dependency answers now
(the database: a query; the broker: the manager's live session), else 503 with which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from starlette.responses import JSONResponse, Response
from starlette.types import Message

from ._asgi import OnResponseStart
from .db import Database

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .manager import Manager
    from .tunnel import TunnelServer

__all__ = [
    "AUTH_FAILURES",
    "BROKER_RECONNECTS",
    "CONTENT_TYPE_LATEST",
    "DEVICE_REQUESTS",
    "EXEC_RESULTS",
    "EXEC_START",
    "exec_timer",
    "gauge",
    "readiness",
    "render",
    "serve_metrics",
]

log = logging.getLogger("dpanel.metrics")

DEVICE_REQUESTS = Counter("dpanel_device_requests", "Signed requests to devices (open/close)"
                          " by type and result code", ["type", "result"])
API_REQUESTS = Counter("dpanel_api_requests", "API answers by HTTP status", ["status"])
EXEC_START = Histogram("dpanel_exec_start_seconds", "From an exec call to the command "
                       "running on the device (tunnel open + SSH channel included)",
                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
EXEC_RESULTS = Counter("dpanel_exec", "Exec starts by result code", ["result"])
BROKER_RECONNECTS = Counter("dpanel_broker_reconnects", "Times the manager's broker session "
                            "came back after a loss")
AUTH_FAILURES = Counter("dpanel_auth_failures", "Refused logins, by where: api (admin "
                        "token) or tunnel (device secret)", ["where"])
BROKER_AUTH = Counter("dpanel_broker_auth_requests", "Questions from the broker's HTTP auth "
                      "backend (RabbitMQ auth_http), by check: user, vhost, resource, topic",
                      ["check"])

#: name -> (help, read) of every scrape-time gauge; the latest process part to register
#: a name wins (a test may build several managers in one process).
_GAUGES: dict[str, tuple[str, Callable[[], float]]] = {}


class _Gauges(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (doc, read) in sorted(_GAUGES.items()):
            try:
                value = float(read())
            except Exception:  # a scrape must never fail for one source
                log.debug("gauge %s unavailable", name, exc_info=True)
                continue
            yield GaugeMetricFamily(name, doc, value=value)


REGISTRY.register(_Gauges())


def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
    _GAUGES[name] = (doc, read)


@contextlib.contextmanager
def exec_timer() -> Iterator[None]:
    """Time an exec start into EXEC_START and count its result (the error's code)."""
    t0 = time.monotonic()
    try:
        yield
    except BaseException as exc:
        EXEC_RESULTS.labels(label(getattr(exc, "code", "cancelled" if isinstance(
            exc, asyncio.CancelledError) else "internal"))).inc()
        raise
    EXEC_START.observe(time.monotonic() - t0)
    EXEC_RESULTS.labels("ok").inc()


def label(value: object) -> str:
    """An enum's value (MsgType, ErrorCode) or the text, as a label value."""
    return str(getattr(value, "value", value))


def register_manager_metrics(manager: Manager) -> None:
    presence, pool = manager.presence, manager.pool
    gauge("dpanel_devices_online", "Devices whose presence is online",
          lambda: sum(1 for p in list(presence.values()) if p.online))
    gauge("dpanel_tunnels_open", "Devices with an open tunnel (the tunnel's allocation)",
          lambda: len(manager.tunnels()))
    gauge("dpanel_ssh_pool_connections", "Pooled SSH connections to devices",
          lambda: len(pool._pool))
    gauge("dpanel_ssh_pool_busy", "Commands running over pooled connections",
          lambda: sum(p.busy for p in list(pool._pool.values())))
    gauge("dpanel_broker_connected", "1 while the manager's broker session is up",
          lambda: float(manager.broker_connected()))


def register_tunnel_metrics(tunnel: TunnelServer) -> None:
    for key, doc in (("connections", "SSH connections to the tunnel (any state)"),
                     ("unauthenticated", "Connections still authenticating"),
                     ("devices", "Authenticated devices"),
                     ("ports_in_use", "Device ports bound (tunnels open)"),
                     ("pool_free", "Device ports free")):
        gauge(f"dpanel_tunnel_{key}", doc, lambda key=key: tunnel.stats()[key])  # type: ignore[misc]


def install_observability(app: FastAPI, manager: Manager) -> None:
    """GET /metrics and GET /v1/ready on the manager's API, without the admin token:
    a scraper or a load balancer must not hold a credential that can exec on every
    device, and neither answer names a device (aggregates and booleans only). The API
    listens on loopback unless allow_public_api; a proxy in front decides who scrapes."""

    app.add_middleware(OnResponseStart, hook=_count_status)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # in a thread: the appliance's tunnel gauges ask the tunnel over its socket
        return Response(await asyncio.to_thread(render), media_type=CONTENT_TYPE_LATEST)

    # out of the OpenAPI document, as /metrics: it lists the token-protected API
    @app.get("/v1/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        """200 when the database answers and the broker session is up; 503 names which
        is not (for a load balancer or systemd's watchdog script)."""
        status, doc = await readiness(manager.registry.db, manager.broker_connected)
        return JSONResponse(doc, status_code=status)


def _count_status(message: Message) -> None:
    """Count each answer's status (the status line only)."""
    API_REQUESTS.labels(str(message["status"])).inc()


def render() -> bytes:
    return bytes(generate_latest(REGISTRY))


async def readiness(db: Optional[Database],
                    broker: Optional[Callable[[], bool]] = None,
                    timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 when the database answers and (if this process uses
    one) the broker session is up; else 503 naming what is not."""
    out: dict[str, Any] = {}
    if db is not None:
        try:
            await asyncio.wait_for(asyncio.to_thread(db.ping), timeout)
            out["database"] = True
        except asyncio.TimeoutError:
            out["database"], out["database_error"] = False, f"no answer in {timeout:g} s"
        except Exception as exc:
            out["database"], out["database_error"] = False, str(exc)[:300]
    if broker is not None:
        out["broker"] = bool(broker())
    ok = all(v for k, v in out.items() if k in ("database", "broker"))
    out["ready"] = ok
    return (200 if ok else 503), out


#: the tunnel's metrics listener: a request line + headers must fit and arrive in time
_MAX_HEAD = 8192
_HEAD_TIMEOUT = 5.0


async def serve_metrics(host: str, port: int, db: Optional[Database]) -> asyncio.Server:
    """The tunnel process's tiny HTTP/1.0 listener: GET /metrics and GET /ready."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method != "GET":
                status, ctype, body = 405, "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, render()
            elif path in ("/ready", "/health"):
                status, doc = await readiness(db)
                ctype, body = "application/json", json.dumps(doc).encode() + b"\n"
            else:
                status, ctype, body = 404, "text/plain", b"/metrics or /ready\n"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                      503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                         .encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, UnicodeDecodeError, ValueError):
            pass  # a slow, huge or broken request just loses its connection
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=_MAX_HEAD)
