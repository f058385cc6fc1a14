"""Audit on the device: what its SSH server served, spooled on disk and shipped over MQTT.

Every exec, shell, SFTP session and direct-tcpip forward becomes one
:class:`~dpanel_proto.wire.AuditRecord`; a PTY shell's output also becomes an asciicast
v2 recording, sent in :class:`~dpanel_proto.wire.RecordingChunk` parts. Why the device
and not the manager: SSH is end to end, so only the device sees what a certificate holder
ran, and nothing that reaches the device's port can bypass it.

Why over MQTT (and not fetched by the manager afterwards over SSH): the device may go
offline right after the session, and a fetch would need the tunnel open again; MQTT is
always up, QoS 1, and the broker's ACL already pins a device to its own topics.

Delivery: every message is first written to a small bounded spool under ``state_dir``
(one file each, atomic, 0600), then published; its file is removed only once the broker
acknowledged it (PUBACK). A broker outage or an agent restart therefore loses nothing,
and a session never waits for the broker. Duplicates (a PUBACK lost with the connection)
are harmless: the manager keeps the first copy of each record id / chunk.

Only ``json``, ``os`` and the protocol package are used: this is imported on the idle
path (to ship what a previous run left in the spool).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from dpanel_proto import wire
from dpanel_proto.ratelog import RateLimitedLog
from dpanel_proto.util import atomic_write

__all__ = ["AuditShipper", "Recorder", "RecordingFailed", "SessionAudit", "Spool",
           "cap_command"]

log = logging.getLogger("dpanel.agent.audit")
_rl = RateLimitedLog(log)

#: The records spool: at most this many records (each well under 8 KiB).
MAX_RECORDS = 5000
#: The recordings spool: at most this many bytes; a shell whose recording would go
#: beyond is a recording failure (record_failure decides).
MAX_RECORDING_BYTES = 32 << 20
#: Messages published and not yet acknowledged, at most.
_IN_FLIGHT = 20
#: A recording is flushed to the spool at least this often (seconds) and in parts of at
#: most wire.MAX_RECORDING_CHUNK bytes.
_FLUSH_EVERY = 2.0


#: Connections the tunnel forwarded to this device's built-in SSH server: the agent's own
#: local address ("127.0.0.1:PORT", which the server sees as its peer) -> the origin the
#: tunnel reported for it (the manager-side "host:port" that connected to the tunnel
#: port). The server takes its entry at connect; bounded in case it never does (target
#: "sshd": OpenSSH serves those connections and never asks).
_ORIGINS: Dict[str, str] = {}
_MAX_ORIGINS = 1024


def note_origin(local: str, origin: str) -> None:
    while len(_ORIGINS) >= _MAX_ORIGINS:
        _ORIGINS.pop(next(iter(_ORIGINS)))
    _ORIGINS[local] = origin


def take_origin(peer: str) -> Optional[str]:
    return _ORIGINS.pop(peer, None)


def cap_command(command: str, limit: int = wire.MAX_AUDIT_COMMAND) -> str:
    """A command line cut to ``limit`` characters, saying how much was cut."""
    if len(command) <= limit:
        return command
    keep = limit - 40
    return command[:keep] + f"... [{len(command) - keep} more characters]"


class RecordingFailed(OSError):
    """A recording could not be written (spool unwritable or full)."""


class Spool:
    """A directory of pending messages, oldest first; bounded by count and bytes."""

    def __init__(self, directory: Path, *, max_files: int, max_bytes: int) -> None:
        self.dir = directory
        self.max_files, self.max_bytes = max_files, max_bytes
        self._bytes = 0
        self._count = 0
        self._seq = 0
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for p in self.dir.iterdir():
                if p.name.startswith("."):
                    p.unlink(missing_ok=True)  # a write interrupted by a crash
                    continue
                self._bytes += p.stat().st_size
                self._count += 1
        except OSError as exc:
            log.error("audit spool %s is not usable: %s", self.dir, exc)

    def put(self, payload: bytes) -> Path:
        """Write one message; raises OSError (RecordingFailed when full)."""
        if self._count >= self.max_files or self._bytes + len(payload) > self.max_bytes:
            raise RecordingFailed(f"spool {self.dir} is full")
        self._seq += 1
        # sortable by time, unique within this run and across restarts
        path = self.dir / f"{time.time_ns():020d}-{os.getpid()}-{self._seq:08d}.json"
        atomic_write(path, payload, 0o600)
        self._bytes += len(payload)
        self._count += 1
        return path

    def pending(self) -> List[Path]:
        try:
            return sorted(p for p in self.dir.iterdir() if not p.name.startswith("."))
        except OSError:
            return []

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            return
        self._bytes = max(0, self._bytes - size)
        self._count = max(0, self._count - 1)


#: publish(topic, payload) -> something with is_published(), or None if not sent now
Publish = Callable[[str, bytes], Any]


class AuditShipper:
    """Spools messages and publishes them when the broker is there (see module doc)."""

    def __init__(self, device: str, state_dir: Path, publish: Publish,
                 connected: Callable[[], bool]) -> None:
        self.device = device
        self.topic = wire.audit_topic(device)
        self.records = Spool(state_dir / "audit", max_files=MAX_RECORDS,
                             max_bytes=MAX_RECORDS * 8192)
        self.recordings = Spool(state_dir / "recordings", max_files=100000,
                                max_bytes=MAX_RECORDING_BYTES)
        self._publish = publish
        self._connected = connected
        self._inflight: Dict[Path, Tuple[Spool, Any]] = {}
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def kick(self) -> None:
        """Something new to send, or the broker is back."""
        if self._wake is not None:
            self._wake.set()

    def record(self, rec: wire.AuditRecord) -> None:
        """Spool and send one record; never raises (a session must not fail on it)."""
        payload = wire.encode_audit(rec)
        try:
            self.records.put(payload)
        except OSError as exc:
            # the spool is full or broken: send it straight away, once, at least
            _rl.error("audit spool", "audit record %s not spooled (%s); sent unspooled",
                      rec.id, exc)
            if self._connected():
                self._publish(self.topic, payload)
        self.kick()

    def chunk(self, chunk: wire.RecordingChunk) -> None:
        """Spool one recording part; raises OSError when it cannot be written."""
        self.recordings.put(wire.encode_audit(chunk))
        self.kick()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 0.5 if self._inflight else 5)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                self._pump()
            except Exception:  # never let the shipper die: the spool keeps the messages
                log.exception("bug: audit shipper")

    def _pump(self) -> None:
        for path, (spool, info) in list(self._inflight.items()):
            if info is None or info.is_published():
                spool.remove(path)
                del self._inflight[path]
        if not self._connected():
            # whatever was in flight is sent again after the reconnect
            self._inflight.clear()
            return
        for spool in (self.records, self.recordings):  # records first: they are small
            for path in spool.pending():
                if len(self._inflight) >= _IN_FLIGHT:
                    return
                if path in self._inflight:
                    continue
                try:
                    payload = path.read_bytes()
                except OSError:
                    continue
                try:
                    wire.decode_audit(payload)
                except wire.DecodeError as exc:  # a corrupted file: never block the queue
                    log.error("dropping unreadable audit spool file %s: %s", path, exc)
                    spool.remove(path)
                    continue
                info = self._publish(self.topic, payload)
                if info is None:
                    return
                self._inflight[path] = (spool, info)


class Recorder:
    """The asciicast v2 recording of one PTY session's output, flushed to the shipper in
    parts. Raises :class:`RecordingFailed` (from :meth:`start`, :meth:`output` or
    :meth:`close`) when a part cannot be written."""

    def __init__(self, shipper: AuditShipper, session_id: str, width: int, height: int,
                 term: str) -> None:
        self._shipper = shipper
        self.id = session_id
        self._t0 = time.monotonic()
        self._started = time.time()
        self._width, self._height, self._term = width or 80, height or 24, term
        self._buf: List[str] = []
        self._size = 0
        self._seq = 0
        self._last_flush = self._t0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._hash = hashlib.sha256()
        self.failed = False

    @property
    def sha256(self) -> str:
        """Of everything written so far (all of it, after :meth:`close`)."""
        return self._hash.hexdigest()

    def start(self) -> None:
        header = {"version": 2, "width": self._width, "height": self._height,
                  "timestamp": int(self._started),
                  "env": {"TERM": self._term[:64], "SHELL": ""}}
        self._add(json.dumps(header) + "\n")
        self._flush(last=False)  # proves the spool is writable before the shell starts

    def output(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self._add(json.dumps([round(time.monotonic() - self._t0, 6), "o", text]) + "\n")
        now = time.monotonic()
        if self._size >= wire.MAX_RECORDING_CHUNK // 2 or now - self._last_flush > _FLUSH_EVERY:
            self._flush(last=False)

    def close(self) -> None:
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._add(json.dumps([round(time.monotonic() - self._t0, 6), "o", tail]) + "\n")
        self._flush(last=True)

    def _add(self, line: str) -> None:
        self._buf.append(line)
        self._size += len(line.encode())

    def _flush(self, last: bool) -> None:
        if self.failed:
            return
        data = "".join(self._buf).encode()
        self._buf, self._size = [], 0
        self._hash.update(data)
        self._last_flush = time.monotonic()
        limit = wire.MAX_RECORDING_CHUNK
        parts = [data[i:i + limit] for i in range(0, len(data), limit)] or [b""]
        try:
            for n, part in enumerate(parts):
                self._shipper.chunk(wire.RecordingChunk(
                    device=self._shipper.device, id=self.id, seq=self._seq,
                    data=base64.b64encode(part).decode(),
                    last=last and n == len(parts) - 1))
                self._seq += 1
        except OSError as exc:
            self.failed = True
            raise RecordingFailed(str(exc)) from None


class SessionAudit:
    """One session's audit record under construction; :meth:`finish` ships it once."""

    def __init__(self, shipper: Optional[AuditShipper], device: str, kind: str, *,
                 operator: str, via: str, source: str, command: str,
                 correlation: str = "") -> None:
        self.shipper = shipper
        self.device = device
        self.id = secrets.token_hex(16)
        self.kind = kind
        self.operator, self.via, self.source = operator, via, source
        self.command = cap_command(command)
        self.correlation = correlation
        self.started = time.time()
        self.bytes_in = 0
        self.bytes_out = 0
        self.exit: Optional[int] = None
        self.signal = ""
        self.recording = ""
        self.recording_sha256 = ""
        self.note = ""
        self._done = False

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        rec = wire.AuditRecord(
            device=self.device, id=self.id, kind=self.kind, operator=self.operator[:64],
            via=self.via, source=self.source[:256], command=self.command, exit=self.exit,
            signal=self.signal[:32], started=self.started, ended=time.time(),
            bytes_in=self.bytes_in, bytes_out=self.bytes_out,
            correlation=self.correlation, recording=self.recording, note=self.note[:256],
            recording_sha256=self.recording_sha256 if self.recording == "ok" else "")
        log.info("audit: %s %s by %s (%s) exit=%s sig=%s in=%d out=%d", rec.kind,
                 wire.printable(rec.command[:200]), wire.printable(rec.operator), rec.via,
                 rec.exit, rec.signal or "-", rec.bytes_in, rec.bytes_out)
        if self.shipper is not None:
            self.shipper.record(rec)
