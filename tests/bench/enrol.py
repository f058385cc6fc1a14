"""Enrolment rate on SQLite and on PostgreSQL: the registry alone, and through a real
stack's API one at a time and in bulk (N devices from 16 concurrent clients), so the
registry's share of an enrolment is visible next to the rest (token, broker files)."""

from __future__ import annotations

import contextlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from pgfix import running_postgres

from dpanel_server.client import ApiClient
from dpanel_server.config import load_config
from dpanel_server.registry import Registry
from stackfix import Stack
from support import free_port

from .devstack import close_stack

__all__ = ["run_enrol"]

BULK_CLIENTS = 16


@contextlib.contextmanager
def _stack(workdir: Path, name: str, registry: str) -> Iterator[Stack]:
    d = workdir / name
    shutil.rmtree(d, ignore_errors=True)
    stack = Stack(dir=d, broker_port=free_port(), tunnel_port=free_port(),
                  api_port=free_port(), registry=registry)
    try:
        stack.start()
        yield stack
    finally:
        close_stack(stack)


def _rate(n: int, seconds: float) -> dict[str, float]:
    return {"devices": n, "seconds": round(seconds, 3), "per_s": round(n / seconds, 1)}


def _engine(workdir: Path, engine: str, urls: Iterator[str], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    reg = Registry(next(urls))
    t0 = time.perf_counter()
    for i in range(n):
        reg.add(f"reg-{i}")
    out["registry_one_at_a_time"] = _rate(n, time.perf_counter() - t0)
    reg.close()

    with _stack(workdir, f"enrol-{engine}", next(urls)) as stack:
        api = ApiClient(load_config(stack.config))
        t0 = time.perf_counter()
        for i in range(n):
            api.call("POST", "/v1/devices", {"name": f"one-{i}"})
        out["api_one_at_a_time"] = _rate(n, time.perf_counter() - t0)

        def add(i: int) -> None:
            ApiClient(load_config(stack.config)).call("POST", "/v1/devices",
                                                      {"name": f"bulk-{i}"})

        t0 = time.perf_counter()
        with ThreadPoolExecutor(BULK_CLIENTS) as pool:
            list(pool.map(add, range(n)))
        out["api_bulk"] = dict(_rate(n, time.perf_counter() - t0), clients=BULK_CLIENTS,
                               fleet_before=n)
    return out


def run_enrol(workdir: Path, n: int = 1000) -> dict[str, Any]:
    results: dict[str, Any] = {}
    sqlite_urls = (f"sqlite://{workdir / f'enrol-{i}.db'}" for i in range(10))
    results["sqlite"] = _engine(workdir, "sqlite", sqlite_urls, n)
    with running_postgres() as pg:
        results["postgresql"] = _engine(workdir, "postgresql",
                                        (pg.new_db() for _ in range(10)), n)
    return results
