"""Agent self-update: verify a signed offer, fetch the binary (resumable), swap slots.

Layout (``update_root``, ``/opt/dpanel`` in images)::

    slots/a/dpanel-tunnel   slots/b/dpanel-tunnel   current -> slots/a

The unit runs ``current/dpanel-tunnel``. A bundle is either one onefile binary, or (the
images' layout, ``layout="onedir"`` in the signed manifest) a plain tar of the
PyInstaller folder, which is unpacked with :func:`.untar.unpack_tree` into a fresh
copy of the inactive slot. An update is written into the *other* slot,
then ``current`` is replaced by rename (atomic), the previous slot is kept, and the
agent exits so that its supervisor (systemd, ``Restart=always``) starts the new one.
Nothing is swapped before the download matched the manifest's size and SHA-256, its
ELF header names this machine's arch, and the manifest carries the update key's
signature: a device that fails any check keeps running the old binary and says why in
its status.

The new agent is on trial until it is back online over MQTT: then it *commits*
(removes ``<state_dir>/update/pending``). Reverting never depends on the new binary:
``dpanel-tunnel-rollback`` (a POSIX sh script, run by the unit's ``ExecStartPre`` and
by a timer) counts starts and watches the commit deadline recorded in ``pending``, and
points ``current`` back at the previous slot. The files are ``key=value`` lines so that
sh can read them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import shutil
import ssl
import stat
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from dpanel_proto.signing import ManagerKey
from dpanel_proto.token import DeviceToken
from dpanel_proto.update import (
    BINARY_NAME,
    MAX_SIZE,
    Manifest,
    elf_arch,
    machine_arch,
    verify_manifest,
)
from dpanel_proto.util import atomic_write
from dpanel_proto.wire import DecodeError, ErrorCode, Response, UpdateRequest, printable

__all__ = ["Updater", "read_kv"]

log = logging.getLogger("dpanel.agent.update")

#: attempts of one download (each resumes where the last stopped)
_ATTEMPTS = 8
_CHUNK = 64 << 10


def read_kv(path: Path) -> Dict[str, str]:
    """A ``key=value`` file (``{}`` if missing or unreadable)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out: Dict[str, str] = {}
    for line in text.splitlines()[:32]:
        k, eq, v = line.partition("=")
        if eq:
            out[k.strip()] = v.strip()
    return out


def _boot_clock(proc: str = "/proc") -> Optional[Tuple[str, int]]:
    """(boot id, whole seconds since boot), read as dpanel-tunnel-rollback reads them;
    None where /proc lacks them (the hook then keeps the wall-clock deadline)."""
    try:
        with open(f"{proc}/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"{proc}/uptime") as f:
            up = int(f.read().split(".", 1)[0])
    except (OSError, ValueError):
        return None
    return (boot, up) if boot else None


def _kv(d: Dict[str, str]) -> bytes:
    # values are single-line (versions, slot names, escaped reasons): sh reads them back
    return "".join(f"{k}={printable(v).replace(chr(10), ' ')}\n" for k, v in d.items()).encode()


class _Refused(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Updater:
    """One per agent. ``offer`` is the dispatcher's handler for update requests."""

    def __init__(self, *, state_dir: Path, update_root: Path, update_key: Optional[str],
                 token: DeviceToken, version: str, publish_status: Callable[[], None],
                 restart: Callable[[], None]) -> None:
        self.dir = state_dir / "update"
        self.root = update_root
        self.key_line = update_key
        self.token = token
        self.version = version
        self.arch = machine_arch()
        self._publish = publish_status
        self._restart = restart
        self._task: Optional[asyncio.Task[None]] = None
        #: set at shutdown: a download in its worker thread stops at the next chunk (the
        #: default executor's threads would otherwise hold the agent's exit for minutes)
        self._stopping = threading.Event()
        self.trial = False
        #: what the status says of the last update (state, version, reason)
        self.last: Dict[str, str] = {}

    # ------------------------------------------------------------------ start / commit

    def startup(self) -> None:
        """Called once at start: are we a new agent on trial, or back after a revert?"""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.last = read_kv(self.dir / "last")
        pending = read_kv(self.dir / "pending")
        if pending and pending.get("version") == self.version:
            self.trial = True
            log.info("agent %s is on trial (slot %s, previous %s): commits once online",
                     self.version, pending.get("slot"), pending.get("previous"))
        elif self.last.get("state") == "downloading":
            # the previous run stopped mid-download; the part file is kept for a resume
            self._set_last("failed", self.last.get("version", ""),
                           "interrupted by an agent restart (offer it again to resume)")
        if pending and pending.get("version") != self.version:
            # pending names another version, yet we run: the swap did not take
            self._set_last("rolled_back", pending.get("version", ""),
                           f"agent {self.version} is running, not the new one")
            (self.dir / "pending").unlink(missing_ok=True)

    def on_online(self) -> None:
        """Back on the broker: a new agent on trial commits (no revert from now on)."""
        if not self.trial:
            return
        self.trial = False
        (self.dir / "pending").unlink(missing_ok=True)
        self._set_last("committed", self.version, "")
        log.info("agent update to %s committed", self.version)
        self._publish()

    def stop(self) -> None:
        """The agent is stopping: abandon a download (its part file stays, to resume)."""
        self._stopping.set()

    def status_fields(self) -> Dict[str, Optional[str]]:
        return {"arch": self.arch,
                "update_state": self.last.get("state") or None,
                "update_version": self.last.get("version") or None,
                "update_reason": self.last.get("reason") or None}

    def _set_last(self, state: str, version: str, reason: str) -> None:
        self.last = {"state": state, "version": version, "reason": reason[:250]}
        try:
            atomic_write(self.dir / "last", _kv(self.last), 0o600)
        except OSError as exc:
            log.error("cannot record the update state: %s", exc)

    # ------------------------------------------------------------------ the offer

    async def offer(self, req: UpdateRequest) -> Response:
        try:
            manifest = self._check_offer(req)
        except _Refused as exc:
            log.warning("update offer %s (%s) refused: %s", req.id, req.version, exc)
            if exc.code != ErrorCode.OK:
                self._set_last("failed", req.version, str(exc))
                self._publish()
            return Response(device=req.device, id=req.id, code=exc.code, message=str(exc),
                            ts=time.time())
        self._set_last("downloading", req.version, "")
        self._publish()
        self._task = asyncio.ensure_future(self._apply(req, manifest))
        return Response(device=req.device, id=req.id, code=ErrorCode.OK,
                        message=f"fetching {req.version} ({req.size} bytes)", ts=time.time())

    def _check_offer(self, req: UpdateRequest) -> Manifest:
        if self._task is not None and not self._task.done():
            raise _Refused(ErrorCode.TOO_MANY, "an update is already in progress")
        if not self.key_line:
            raise _Refused(ErrorCode.INVALID, "no update key is pinned on this device "
                           "(pins_dir/update_key.pub or update_key)")
        try:
            m = Manifest(version=req.version, arch=req.arch, size=req.size,
                         sha256=req.sha256, layout=req.layout or "onefile")
            key = ManagerKey(self.key_line)
        except DecodeError as exc:
            raise _Refused(ErrorCode.INVALID, f"bad offer: {exc}") from None
        if not verify_manifest(m, req.manifest_sig, key):
            raise _Refused(ErrorCode.BAD_SIGNATURE,
                           "manifest signature does not verify with the pinned update key")
        if m.arch != self.arch:
            raise _Refused(ErrorCode.INVALID, f"wrong architecture: the bundle is for "
                           f"{m.arch}, this device is {self.arch}")
        if m.version == self.version:
            self._set_last("committed", m.version, "")
            self._publish()
            raise _Refused(ErrorCode.OK, f"already running {m.version}")
        cur = self._current_slot()
        if cur is None:
            raise _Refused(ErrorCode.INVALID, f"not installed in update slots: "
                           f"{self.root}/current is not a symlink to slots/a or slots/b")
        return m

    def _current_slot(self) -> Optional[str]:
        try:
            target = os.readlink(self.root / "current")
        except OSError:
            return None
        slot = target.rstrip("/").rsplit("/", 1)[-1]
        return slot if slot in ("a", "b") and target.rstrip("/").endswith(
            f"slots/{slot}") else None

    async def _apply(self, req: UpdateRequest, m: Manifest) -> None:
        try:
            part = await asyncio.get_running_loop().run_in_executor(
                None, self._download, req, m)
            await asyncio.get_running_loop().run_in_executor(
                None, self._install, part, m, req.commit_timeout)
        except _Refused as exc:
            log.error("update to %s failed, keeping %s: %s", m.version, self.version, exc)
            self._set_last("failed", m.version, str(exc))
            self._publish()
            return
        except Exception as exc:  # never take the running agent down
            log.exception("update to %s failed", m.version)
            self._set_last("failed", m.version, f"agent error: {exc}")
            self._publish()
            return
        self._set_last("installing", m.version, "")
        self._publish()
        log.info("update %s installed; restarting into it", m.version)
        await asyncio.sleep(0.5)  # let the status go out
        self._restart()

    # ------------------------------------------------------------------ download

    def _download(self, req: UpdateRequest, m: Manifest) -> Path:
        """Fetch into ``update/download.part``, resuming a previous attempt of the same
        SHA-256 with a Range request; then check size, hash and ELF arch."""
        part = self.dir / "download.part"
        tag = self.dir / "download.sha256"
        if read_kv(tag).get("sha256") != m.sha256:
            part.unlink(missing_ok=True)
            atomic_write(tag, _kv({"sha256": m.sha256}), 0o600)
        cred = base64.b64encode(f"{self.token.device}:{self.token.secret}".encode()).decode()
        ctx = self._tls()
        last_error = ""
        for attempt in range(_ATTEMPTS):
            if self._stopping.is_set():
                raise _Refused(ErrorCode.INTERNAL, "interrupted by an agent restart (offer "
                               "it again to resume)")
            have = part.stat().st_size if part.exists() else 0
            if have >= m.size:
                break
            # the URL is http(s) only (wire refuses any other scheme) and signed
            r = urllib.request.Request(req.url, headers={  # noqa: S310
                "Authorization": f"Basic {cred}", "User-Agent": "dpanel-tunnel"})
            if have:
                r.add_header("Range", f"bytes={have}-")
            try:
                with urllib.request.urlopen(r, timeout=30, context=ctx) as resp:  # noqa: S310
                    mode = "ab" if have and resp.status == 206 else "wb"
                    if have and resp.status != 206:
                        log.info("server ignored the range; fetching from the start")
                    elif have:
                        log.info("update download: resuming at %d bytes", have)
                    with part.open(mode) as f:
                        os.fchmod(f.fileno(), 0o600)
                        while not self._stopping.is_set():
                            chunk = resp.read(_CHUNK)
                            if not chunk:
                                break
                            f.write(chunk)
                            if f.tell() > m.size:
                                raise _Refused(ErrorCode.INVALID, "download is larger than "
                                               f"the manifest's {m.size} bytes")
                if (part.stat().st_size if part.exists() else 0) == have:
                    break  # the server has nothing more for us
            except urllib.error.HTTPError as exc:
                if exc.code == 416:
                    break
                if 400 <= exc.code < 500:
                    raise _Refused(ErrorCode.INVALID, f"download refused: HTTP {exc.code} "
                                   f"{exc.reason}") from None
                last_error = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:  # URLError, timeouts, resets
                last_error = str(getattr(exc, "reason", exc))
            got = part.stat().st_size if part.exists() else 0
            log.info("update download: %d of %d bytes (attempt %d)%s", got, m.size,
                     attempt + 1, f": {last_error}" if last_error else "")
            self._stopping.wait(min(30.0, 0.5 * 2 ** attempt))
        if self._stopping.is_set():
            raise _Refused(ErrorCode.INTERNAL, "interrupted by an agent restart (offer it "
                           "again to resume)")
        got = part.stat().st_size if part.exists() else 0
        if got != m.size:
            raise _Refused(ErrorCode.INVALID, f"truncated download: got {got} of {m.size} "
                           f"bytes{f' ({last_error})' if last_error else ''}")
        h = hashlib.sha256()
        with part.open("rb") as f:
            head = f.read(64)
            h.update(head)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != m.sha256:
            part.unlink(missing_ok=True)
            raise _Refused(ErrorCode.INVALID, "sha256 of the download does not match the "
                           "signed manifest")
        if m.layout == "onefile":  # a onedir's binary is checked once unpacked
            self._check_elf(head)
        return part

    def _check_elf(self, head: bytes) -> None:
        arch = elf_arch(head)
        if arch != self.arch:
            raise _Refused(ErrorCode.INVALID, f"wrong architecture: the binary is "
                           f"{arch or 'not an ELF executable'}, this device is {self.arch}")

    def _tls(self) -> Optional[ssl.SSLContext]:
        ctx = ssl.create_default_context()
        if self.token.broker_ca:
            # the manager's private CA when it has one (it signs the broker's and the
            # HTTPS listener's certificates alike)
            ctx.load_verify_locations(cadata=self.token.broker_ca)
        return ctx

    # ------------------------------------------------------------------ install

    def _install(self, part: Path, m: Manifest, commit_timeout: int) -> None:
        cur = self._current_slot()
        if cur is None:
            raise _Refused(ErrorCode.INVALID, f"{self.root}/current is not a slot symlink")
        new = "b" if cur == "a" else "a"
        slot = self.root / "slots" / new
        if m.layout == "onedir":
            self._install_tree(part, slot)
        else:
            slot.mkdir(parents=True, exist_ok=True)
            tmp = slot / ".dpanel-tunnel.new"
            shutil.copyfile(part, tmp)
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            tmp.chmod(0o755)
            os.replace(tmp, slot / "dpanel-tunnel")
        # the trial record first: from the swap on, the rollback hook can revert
        # (the hook judges the deadline by time since boot when it knows this boot: a
        # board without an RTC has a wall clock that jumps at NTP sync)
        boot = _boot_clock()
        atomic_write(self.dir / "pending", _kv({
            "version": m.version, "slot": new, "previous": cur, "starts": "0",
            "deadline": str(int(time.time() + commit_timeout)),
            "from_version": self.version,
            **({"boot_id": boot[0], "deadline_up": str(boot[1] + commit_timeout),
                "window": str(commit_timeout)} if boot else {})}), 0o600)
        link = self.root / ".current.new"
        link.unlink(missing_ok=True)
        os.symlink(f"slots/{new}", link)
        os.replace(link, self.root / "current")
        part.unlink(missing_ok=True)
        log.info("slot %s now holds %s; current -> slots/%s (previous slot %s kept)",
                 new, m.version, new, cur)

    def _install_tree(self, part: Path, slot: Path) -> None:
        """Unpack the onedir tar beside the inactive slot, check its binary, then put it
        in that slot's place. The active slot is never touched."""
        from .untar import UnpackError, unpack_tree  # only when updating: off the idle path

        stage = slot.with_name(f".{slot.name}.new")
        shutil.rmtree(stage, ignore_errors=True)
        stage.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                unpack_tree(part, stage, MAX_SIZE)
            except UnpackError as exc:
                raise _Refused(ErrorCode.INVALID, f"bundle refused: {exc}") from None
            binary = stage / BINARY_NAME
            st = os.lstat(binary) if os.path.lexists(binary) else None
            if st is None or not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o100:
                raise _Refused(ErrorCode.INVALID, f"bundle refused: no executable "
                               f"{BINARY_NAME} at the top of the tar")
            with binary.open("rb") as f:
                self._check_elf(f.read(64))
            os.sync()  # the tree is on disk before current may point at it
            shutil.rmtree(slot, ignore_errors=True)
            os.replace(stage, slot)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
