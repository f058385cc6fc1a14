"""Mosquitto's dynamic-security plugin: per-device credentials in O(1), over ``$CONTROL``.

With ``broker.auth = "dynsec"`` an enrolment is two commands (createRole with the device's
literal topics from :data:`dpanel_proto.wire.DEVICE_ACL`, createClient with its secret) on
the manager's own MQTT session, and a revoke is one (disableClient, which also kicks the
live connection). No file is rewritten and the broker is never reloaded.

What the API cannot do (Mosquitto 2.0.11): create a client from a stored hash. The
registry keeps only the ``$7$`` hash of a device secret, so a device that is in the
registry but missing from the broker can only be put back *offline*, into the plugin's
JSON file before the broker starts (:func:`bootstrap` / :func:`merge_missing`, which the
stack calls). The file's password/salt/iterations are exactly the fields of a ``$7$``
hash. A running broker that lacks a device is reported by :meth:`Dynsec.reconcile`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from dpanel_proto.wire import DEVICE_ACL, MANAGER_SHARE_GROUP, MANAGER_TOPICS

from ._files import atomic_write
from .errors import BrokerError

__all__ = ["CONTROL_TOPIC", "RESPONSE_TOPIC", "Dynsec", "bootstrap", "device_role",
           "find_plugin", "merge_missing"]

log = logging.getLogger("dpanel.dynsec")

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
MANAGER_ROLE = "dpanel-manager"
_ROLE_PREFIX = "dpanel-device-"
#: Where Debian (and others) install the plugin.
PLUGIN_PATHS = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                "/usr/lib/mosquitto_dynamic_security.so")
#: A control command the broker has not answered in this long failed (broker down).
COMMAND_TIMEOUT = 10.0
_ITERATIONS = 101
_PAGE = 500


def find_plugin() -> str:
    for path in PLUGIN_PATHS:
        if os.path.exists(path):
            return path
    raise BrokerError("mosquitto's dynamic-security plugin is not installed "
                      f"(looked in {', '.join(PLUGIN_PATHS)}); use broker.auth = \"files\"")


def device_role(device: str) -> str:
    return _ROLE_PREFIX + device


def device_acls(device: str) -> list[dict[str, Any]]:
    """DEVICE_ACL with ``%u`` made literal: no reliance on pattern support in the plugin,
    and the same rules the file ACL and the HTTP backend enforce."""
    out: list[dict[str, Any]] = []
    for access, pattern in DEVICE_ACL:
        topic = pattern.replace("%u", device)
        if access == "write":
            out.append({"acltype": "publishClientSend", "topic": topic, "allow": True})
        else:
            out += [{"acltype": "subscribeLiteral", "topic": topic, "allow": True},
                    {"acltype": "publishClientReceive", "topic": topic, "allow": True}]
    return out


def _manager_role() -> dict[str, Any]:
    acls = []
    for topic in (MANAGER_TOPICS, f"$share/{MANAGER_SHARE_GROUP}/{MANAGER_TOPICS}",
                  CONTROL_TOPIC + "/#"):
        acls += [{"acltype": kind, "topic": topic, "allow": True}
                 for kind in ("publishClientSend", "publishClientReceive", "subscribePattern",
                              "unsubscribePattern")]
    return {"rolename": MANAGER_ROLE, "acls": acls}


def _hash_fields(password: Optional[str] = None, stored: Optional[str] = None) -> dict[str, Any]:
    """The plugin's password/salt/iterations: PBKDF2-SHA512, i.e. a ``$7$`` hash split up."""
    if stored is not None:
        parts = stored.split("$")
        if len(parts) != 5 or parts[1] != "7":
            raise ValueError("not a $7$ hash")
        return {"password": parts[4], "salt": parts[3], "iterations": int(parts[2])}
    assert password is not None
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return {"password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": _ITERATIONS}


def _device_client(device: str, stored_hash: str) -> dict[str, Any]:
    return {"username": device, "clientid": device, **_hash_fields(stored=stored_hash),
            "roles": [{"rolename": device_role(device)}]}


def bootstrap(path: Union[str, Path], manager_user: str, manager_password: str,
              devices: Iterable[tuple[str, str]]) -> bool:
    """Write the plugin's initial file (the manager as its admin, the registry's active
    devices) if there is none; True if written. Atomic and 0600: it holds hashes. An
    existing file is the broker's own state and is left alone (see merge_missing)."""
    p = Path(path)
    if p.exists():
        return False
    devs = sorted(devices)
    doc = {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": [{"username": manager_user, "textname": "dPanel manager",
                     **_hash_fields(password=manager_password),
                     "roles": [{"rolename": MANAGER_ROLE}]},
                    *(_device_client(d, h) for d, h in devs)],
        "groups": [],
        "roles": [_manager_role(),
                  *({"rolename": device_role(d), "acls": device_acls(d)} for d, _ in devs)],
    }
    atomic_write(p, json.dumps(doc, indent=1), 0o600)
    return True


def merge_missing(path: Union[str, Path], manager_user: str, manager_password: str,
                  devices: Iterable[tuple[str, str]], revoked: Iterable[str] = ()) -> list[str]:
    """Offline repair, only while the broker is stopped (the plugin rewrites its file on
    every change): add the active devices the file lacks, mark revoked ones disabled,
    and make sure the manager client has the current password. Returns what changed;
    writes nothing when nothing did."""
    p = Path(path)
    if bootstrap(p, manager_user, manager_password, devices):
        return ["created"]
    try:
        doc = json.loads(p.read_text())
        clients: list[dict[str, Any]] = doc.setdefault("clients", [])
        roles: list[dict[str, Any]] = doc.setdefault("roles", [])
    except (ValueError, AttributeError) as exc:
        raise BrokerError(f"{p}: not a dynamic-security file ({exc})") from None
    by_name = {c.get("username"): c for c in clients}
    role_names = {r.get("rolename") for r in roles}
    changed: list[str] = []
    mgr = by_name.get(manager_user)
    if mgr is None or not _matches(mgr, manager_password):
        if mgr is not None:
            clients.remove(mgr)
        clients.append({"username": manager_user, **_hash_fields(password=manager_password),
                        "roles": [{"rolename": MANAGER_ROLE}]})
        changed.append(manager_user)
    if MANAGER_ROLE not in role_names:
        roles.append(_manager_role())
    else:
        # a file from an older dPanel: the manager's role gains what this one needs
        # (the replicas' shared subscription)
        for role in roles:
            if role.get("rolename") == MANAGER_ROLE and role.get("acls") != \
                    _manager_role()["acls"]:
                role["acls"] = _manager_role()["acls"]
                changed.append(MANAGER_ROLE)
    for device, stored in sorted(devices):
        if device not in by_name:
            clients.append(_device_client(device, stored))
            changed.append(device)
        if device_role(device) not in role_names:
            roles.append({"rolename": device_role(device), "acls": device_acls(device)})
    for device in revoked:
        client = by_name.get(device)
        if client is not None and not client.get("disabled"):
            client["disabled"] = True
            changed.append(device)
    if changed:
        atomic_write(p, json.dumps(doc, indent=1), 0o600)
    return changed


def _matches(client: dict[str, Any], password: str) -> bool:
    try:
        salt = base64.b64decode(client["salt"])
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt,
                                     int(client["iterations"]))
        return bool(base64.b64encode(digest).decode() == client["password"])
    except (KeyError, ValueError, TypeError):
        return False


class Dynsec:
    """The ``$CONTROL`` API over the manager's session. ``publish(topic, payload)``
    sends QoS 1; :meth:`on_response` is fed the response topic's messages (on the
    loop). Commands carry a correlationData, so answers match their command whatever
    the order."""

    def __init__(self, publish: Callable[[str, bytes], bool]) -> None:
        self._publish = publish
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def on_response(self, _topic: str, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
            responses = doc["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("dropped a malformed dynamic-security response")
            return
        for resp in responses if isinstance(responses, list) else []:
            if not isinstance(resp, dict):
                continue
            fut = self._pending.pop(str(resp.get("correlationData", "")), None)
            if fut is not None and not fut.done():
                fut.set_result(resp)

    async def run(self, commands: Sequence[dict[str, Any]],
                  timeout: float = COMMAND_TIMEOUT) -> list[dict[str, Any]]:
        """Send the commands in one message; their responses, in order."""
        loop = asyncio.get_running_loop()
        futs = []
        cmds = []
        for cmd in commands:
            corr = secrets.token_hex(8)
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._pending[corr] = fut
            futs.append((corr, fut))
            cmds.append({**cmd, "correlationData": corr})
        try:
            if not self._publish(CONTROL_TOPIC, json.dumps({"commands": cmds}).encode()):
                raise BrokerError("dynamic-security: the command could not be sent")
            try:
                return list(await asyncio.wait_for(asyncio.gather(*(f for _, f in futs)),
                                                   timeout))
            except asyncio.TimeoutError:
                raise BrokerError(f"dynamic-security: the broker did not answer within "
                                  f"{timeout:g} s") from None
        finally:
            for corr, _ in futs:
                self._pending.pop(corr, None)

    async def _ok(self, commands: Sequence[dict[str, Any]],
                  tolerate: Sequence[str] = ()) -> None:
        for cmd, resp in zip(commands, await self.run(commands)):
            err = resp.get("error")
            if err and not any(t in str(err) for t in tolerate):
                raise BrokerError(f"dynamic-security {cmd['command']} "
                                  f"{cmd.get('username') or cmd.get('rolename')}: {err}")

    async def create_device(self, device: str, password: str) -> None:
        # A leftover of a failed enrolment may exist: the role is recreated, the client
        # replaced, so the new secret is the one that works.
        await self._ok([{"command": "deleteClient", "username": device},
                        {"command": "deleteRole", "rolename": device_role(device)}],
                       tolerate=("not found",))
        await self._ok([
            {"command": "createRole", "rolename": device_role(device),
             "acls": device_acls(device)},
            {"command": "createClient", "username": device, "password": password,
             "clientid": device, "roles": [{"rolename": device_role(device)}]},
        ])

    async def disable_device(self, device: str) -> None:
        """Refuse its logins from now on and kick its live connection."""
        await self._ok([{"command": "disableClient", "username": device}],
                       tolerate=("not found",))

    async def delete_device(self, device: str) -> None:
        await self._ok([{"command": "deleteClient", "username": device},
                        {"command": "deleteRole", "rolename": device_role(device)}],
                       tolerate=("not found",))

    async def clients(self) -> dict[str, bool]:
        """username -> disabled, for every client the broker has."""
        out: dict[str, bool] = {}
        while True:  # in pages: one answer for a whole fleet would be megabytes
            (resp,) = await self.run([{"command": "listClients", "verbose": True,
                                       "count": _PAGE, "offset": len(out)}])
            if resp.get("error"):
                raise BrokerError(f"dynamic-security listClients: {resp['error']}")
            page = resp.get("data", {}).get("clients", [])
            out.update({str(c.get("username")): bool(c.get("disabled")) for c in page})
            if len(page) < _PAGE:
                return out

    async def reconcile(self, active: set[str], manager_user: str) -> dict[str, list[str]]:
        """Bring the broker in line with the registry, touching only what differs:
        revoked (or unknown) devices are disabled, and active devices the broker lacks
        are reported (their secret is not kept anywhere; see the module doc)."""
        have = await self.clients()
        to_disable = sorted(n for n, disabled in have.items()
                            if not disabled and n != manager_user and n not in active)
        for name in to_disable:
            await self.disable_device(name)
        missing = sorted(active - set(have))
        enabled_again = sorted(n for n in active if have.get(n) is True)
        for name in enabled_again:
            await self._ok([{"command": "enableClient", "username": name}])
        if missing:
            log.error("the broker has no credentials for %d enrolled device(s): %s; they "
                      "cannot connect until the broker's dynamic-security file is repaired "
                      "(stopped broker: dpanel stack up does it) or they are re-enrolled",
                      len(missing), ", ".join(missing[:20]))
        return {"disabled": to_disable, "missing": missing, "enabled": enabled_again}
