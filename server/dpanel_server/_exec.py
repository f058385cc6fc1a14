"""``dpanel exec``: one device (its output as-is) or a fan-out (prefixed lines or per-device
files, a capped copy for the table/JSON, a summary by outcome). Imported only by exec.

Every device is one streamed exec (NDJSON with heartbeats, see dpanel_proto.events): the
manager never holds a device's whole output, a quiet command is not mistaken for a dead
manager, and closing the stream (Ctrl-C, SIGTERM, --fail-fast) hangs the command up.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Optional

from .client import ApiClient, ApiError, ExecStream
from .errors import DPanelError

__all__ = ["exec_fanout", "exec_one"]

STREAMS = ("stdout", "stderr")


class _Capture:
    """Keeps at most ``limit`` bytes of each stream (counting the rest)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.keep = {k: bytearray() for k in STREAMS}
        self.seen = dict.fromkeys(STREAMS, 0)

    def add(self, kind: str, data: bytes) -> None:
        self.seen[kind] += len(data)
        room = self.limit - len(self.keep[kind])
        if room > 0:
            self.keep[kind] += data[:room]

    @property
    def truncated(self) -> bool:
        return any(n > self.limit for n in self.seen.values())

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"truncated": self.truncated}
        for k in STREAMS:
            out[k] = self.keep[k].decode(errors="replace")
            out[f"{k}_b64"] = base64.b64encode(self.keep[k]).decode()
            out[f"{k}_bytes"] = self.seen[k]
        return out


def _events(stream: ExecStream) -> Any:
    """(kind, data) pairs: ("stdout"|"stderr", bytes) then ("exit", int); raises ApiError
    for an error event or a stream that ends without an exit status."""
    for event in stream:
        if "exit" in event:
            yield "exit", int(event["exit"])
            return
        if "error" in event:
            raise ApiError(str(event["error"]), code=str(event.get("code", "")))
        for kind in STREAMS:
            if kind in event:
                yield kind, base64.b64decode(event[kind])
    raise ApiError("the exec stream ended without an exit status (manager restarted?)")


def exec_one(api: ApiClient, device: str, body: dict[str, Any], stdin: Optional[BinaryIO],
             as_json: bool, limit: int) -> int:
    """Output as it comes (or one JSON object with --json); exits with the remote status."""
    if as_json:
        r = _run_device(api, device, body, stdin, _Sink(device, limit, None, None))
        print(json.dumps({device: r}, indent=2, sort_keys=True))
        return r["exit"] if r.get("exit") is not None else 255
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    with api.exec(device, body, stdin) as stream:
        for kind, data in _events(stream):
            if kind == "exit":
                assert isinstance(data, int)
                return data
            sink = sinks[kind]
            sink.write(data)
            sink.flush()
    return 255  # not reached: _events raises first


class _Prefixer:
    """``DEVICE: line`` on our stdout/stderr, whole lines only (one lock for all
    devices), so that lines from different devices never interleave mid-line."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def write(self, kind: str, data: bytes) -> None:
        out = (sys.stdout if kind == "stdout" else sys.stderr).buffer
        with self.lock:
            out.write(data)
            out.flush()


class _Sink:
    """Where one device's output goes: the capped capture, the prefixed stream, and
    ``--out-dir`` files (written to temporaries, renamed into place when done)."""

    def __init__(self, device: str, limit: int, prefix: Optional[_Prefixer],
                 out_dir: Optional[Path]) -> None:
        self.device, self.capture, self.prefix = device, _Capture(limit), prefix
        self.partial = {k: b"" for k in STREAMS}
        self.tag = device.encode() + b": "
        self.files: dict[str, tuple[Path, Path, BinaryIO]] = {}
        self.out_dir = out_dir
        if out_dir is not None:
            for kind in STREAMS:
                final = out_dir / f"{device}.{kind}"
                tmp = out_dir / f".{device}.{kind}.tmp"
                self.files[kind] = (tmp, final, tmp.open("wb"))

    def add(self, kind: str, data: bytes) -> None:
        self.capture.add(kind, data)
        if kind in self.files:
            self.files[kind][2].write(data)
        if self.prefix is not None:
            text = self.partial[kind] + data
            cut = text.rfind(b"\n") + 1
            self.partial[kind] = text[cut:]
            if cut:
                lines = text[:cut].split(b"\n")[:-1]
                self.prefix.write(kind, b"".join(self.tag + ln + b"\n" for ln in lines))

    def finish(self, outcome: str) -> None:
        if self.prefix is not None:
            for kind in STREAMS:
                if self.partial[kind]:
                    self.prefix.write(kind, self.tag + self.partial[kind] + b"\n")
        for tmp, final, f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, final)
        if self.out_dir is not None:
            from dpanel_proto.util import atomic_write

            atomic_write(self.out_dir / f"{self.device}.exit", outcome + "\n", 0o644)


def _run_device(api: ApiClient, device: str, body: dict[str, Any],
                stdin: Optional[BinaryIO], sink: _Sink,
                streams: Optional[set[ExecStream]] = None) -> dict[str, Any]:
    start = time.monotonic()
    r: dict[str, Any] = {"exit": None}
    try:
        stream = api.exec(device, body, stdin)
        if streams is not None:
            streams.add(stream)
        try:
            for kind, data in _events(stream):
                if kind == "exit":
                    r["exit"] = data
                else:
                    sink.add(kind, data)
        finally:
            stream.close()
            if streams is not None:
                streams.discard(stream)
    except DPanelError as exc:
        r["error"] = str(exc)
        r["code"] = getattr(exc, "wire_code", "") or exc.code.value
    except OSError as exc:
        r["error"] = f"lost the manager API: {exc}"
        r["code"] = "api_unreachable"
    r.update(sink.capture.result())
    r["seconds"] = round(time.monotonic() - start, 3)
    sink.finish(str(r["exit"]) if r["exit"] is not None else f"error {r['code']}: {r['error']}")
    return r


def _outcome(r: dict[str, Any]) -> str:
    if r.get("exit") == 0:
        return "ok"
    if r.get("exit") is not None:
        return f"exit {r['exit']}"
    return str(r.get("code") or "error")


def _breakdown(results: dict[str, dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in results.values():
        counts[_outcome(r)] = counts.get(_outcome(r), 0) + 1

    def order(k: str) -> tuple[int, int, str]:
        if k == "ok":
            return (0, 0, k)
        if k.startswith("exit "):
            return (1, int(k[5:]), k)
        return (2, 0, k)

    return ", ".join(f"{counts[k]} {k}" for k in sorted(counts, key=order))


def _printable(text: str) -> str:
    # the table is for a terminal: a device's output may hold ESC and friends
    return "".join(c if c.isprintable() else "?" for c in text)


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.enabled = enabled
        self._tty = sys.stderr.isatty()
        self._lock = threading.Lock()

    def step(self, ok: bool) -> None:
        with self._lock:
            self.done += 1
            self.failed += not ok
            if not self.enabled:
                return
            width = 30
            fill = width * self.done // max(self.total, 1)
            line = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total}"
                    f"  failed {self.failed}")
            if self._tty:
                sys.stderr.write("\r" + line + ("\n" if self.done == self.total else ""))
            elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()


def exec_fanout(api: ApiClient, devices: list[str], body: dict[str, Any], *, parallel: int,
                as_json: bool, prefix: bool, out_dir: Optional[Path], fail_fast: bool,
                limit: int) -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    prefixer = _Prefixer() if prefix else None
    progress = _Progress(len(devices), enabled=not prefix)
    results: dict[str, dict[str, Any]] = {}
    streams: set[ExecStream] = set()
    failed = threading.Event()

    def run(device: str) -> tuple[str, dict[str, Any]]:
        if fail_fast and failed.is_set():
            return device, {"exit": None, "error": "not run (--fail-fast)", "code": "not_run",
                            "seconds": 0.0, **_Capture(0).result()}
        r = _run_device(api, device, body, None, _Sink(device, limit, prefixer, out_dir),
                        streams)
        if r.get("exit") != 0:
            failed.set()
        return device, r

    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        for fut in as_completed([pool.submit(run, d) for d in devices]):
            device, r = fut.result()
            results[device] = r
            progress.step(r.get("exit") == 0)
    except BaseException:
        # Ctrl-C / SIGTERM: hang every running command up (their threads then finish)
        pool.shutdown(wait=False, cancel_futures=True)
        for stream in list(streams):
            stream.close()
        raise
    pool.shutdown()
    if as_json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print(f"{'DEVICE':<24} {'EXIT':>4} {'SECONDS':>8}  OUTPUT")
        for device in sorted(results):
            r = results[device]
            text = r.get("error") or (r["stdout"] or r["stderr"]).strip()
            first = _printable(text.splitlines()[0]) if text else ""
            code = "ERR" if r.get("exit") is None else str(r["exit"])
            print(f"{device:<24} {code:>4} {r['seconds']:>8.2f}  {first[:80]}")
        ok = sum(1 for r in results.values() if r.get("exit") == 0)
        print(f"\n{ok}/{len(results)} succeeded: {_breakdown(results)}")
        cut = sorted(d for d, r in results.items() if r.get("truncated"))
        if cut:
            where = f"full output in {out_dir}" if out_dir else "use --out-dir DIR for all of it"
            print(f"output truncated at {limit / (1 << 20):g} MB on {len(cut)} device(s) "
                  f"({', '.join(cut[:5])}{', ...' if len(cut) > 5 else ''}); {where}")
    return 0 if all(r.get("exit") == 0 for r in results.values()) else 1
