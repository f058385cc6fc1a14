"""Deploy the server appliance: preflight, install the package, configure, hand over pins.

Nothing is changed on the host until every preflight check passed, so a deploy to the
wrong host (unreachable, not Debian 12, port taken, foreign broker) leaves it untouched.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from dpanel_proto.result import parse_result
from dpanel_proto.util import atomic_write

from .debpkg import PACKAGE, DebBuild, build_deb
from .preflight import FACTS_SCRIPT, parse_facts, problems
from .target import DeployError, LocalTarget, SshTarget, Target

__all__ = ["DeployResult", "deploy", "public_host_of", "target_for", "write_handover"]

REMOTE_CACHE = "/var/cache/dpanel"

INSTALL_SCRIPT = """set -e
export DEBIAN_FRONTEND=noninteractive
need=""
for p in python3 mosquitto; do
    dpkg-query -W -f='${{Status}}' "$p" 2>/dev/null | grep -q 'ok installed' || need="$need $p"
done
if [ -n "$need" ]; then
    echo "  apt      installing$need from the host's Debian mirror"
    apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends --allow-downgrades \\
    -o Dpkg::Options::=--force-confold -o Dpkg::Use-Pty=0 {deb} 2>&1 \\
    | grep -v -e '^debconf: ' -e '^(Reading database' || true
test "$(cat /opt/dpanel/BUILD-ID 2>/dev/null)" = {build_id}
"""


@dataclass
class DeployResult:
    package_changed: bool
    changes: list[tuple[str, str]] = field(default_factory=list)
    enrolment: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    configure_seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return self.package_changed or bool(self.changes)


def public_host_of(destination: str) -> str:
    """The host part of ``user@host``, ``ssh://user@host:port`` or ``host``."""
    d = re.sub(r"^ssh://", "", destination)
    d = d.rsplit("@", 1)[-1]
    if d.startswith("["):
        return d[1:d.index("]")]
    return d.split(":", 1)[0] if d.count(":") == 1 else d


def target_for(host: str = "", local: bool = False, ssh_config: str = "",
               identity: str = "") -> Target:
    if local == bool(host):
        raise DeployError("give either --host root@HOST or --local")
    if local:
        return LocalTarget()
    return SshTarget(host, ssh_config=ssh_config or None, identity=identity or None)


def _local_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def deploy(target: Target, *, deb: Optional[DebBuild] = None, public_host: str = "",
           tunnel_public: str = "", broker_public: str = "",
           default_public_host: str = "",
           configure_args: Sequence[str] = ()) -> DeployResult:
    """``configure_args``: further dpanel-configure options (--https-listen, --edge-listen,
    --broker-auth ...); re-runs without them keep what an earlier run set."""
    t0 = time.monotonic()
    print(f"deploy: checking {target.name}", flush=True)
    facts = parse_facts(target.run(FACTS_SCRIPT, timeout=60).stdout)
    found = problems(facts, target.name, _local_arch())
    if found:
        raise DeployError("refusing to deploy, nothing was changed:\n  - " +
                          "\n  - ".join(found))
    if deb is None:
        deb = build_deb()
    package_changed = facts.get("build_id") != deb.build_id
    if package_changed:
        remote = f"{REMOTE_CACHE}/{deb.path.name}"
        print(f"deploy: installing {PACKAGE} {deb.version}", flush=True)
        target.run(f"mkdir -p {REMOTE_CACHE} && chmod 0700 {REMOTE_CACHE}")
        target.put(deb.path, remote)
        t_install = time.monotonic()
        target.run(INSTALL_SCRIPT.format(deb=shlex.quote(remote),
                                         build_id=shlex.quote(deb.build_id)),
                   stream=True, timeout=1800)
        print(f"  ok       installed in {time.monotonic() - t_install:.0f} s", flush=True)
        # keep only the package just installed (the next upgrade compares against it)
        target.run(f"find {REMOTE_CACHE} -name '{PACKAGE}_*.deb' ! -name "
                   f"{shlex.quote(deb.path.name)} -delete", check=False)
    else:
        print(f"  ok       {PACKAGE} {deb.version} is installed", flush=True)
    args = ["--json"]
    if not public_host and facts.get("has_config") != "yes" and not tunnel_public:
        public_host = default_public_host
    for flag, value in (("--public-host", public_host), ("--tunnel-public", tunnel_public),
                        ("--broker-public", broker_public)):
        if value:
            args += [flag, value]
    args += list(configure_args)
    if package_changed:
        args.append("--package-changed")
    print("deploy: configuring", flush=True)
    t_conf = time.monotonic()
    res = target.run("/usr/bin/dpanel-configure " + " ".join(shlex.quote(a) for a in args),
                     stream=True, timeout=900)
    result = DeployResult(package_changed=package_changed)
    result.configure_seconds = time.monotonic() - t_conf
    data: Optional[dict[str, Any]] = parse_result(res.stdout)
    if data is not None:
        result.changes = [(str(c[0]), str(c[1])) for c in data.get("changes", [])]
        result.enrolment = dict(data.get("enrolment") or {})
    if not result.enrolment:
        raise DeployError("dpanel-configure did not report its result:\n" + res.stdout[-2000:])
    result.seconds = time.monotonic() - t0
    if result.changed:
        n = len(result.changes) + int(package_changed)
        print(f"deploy: done in {result.seconds:.0f} s, {n} change(s)", flush=True)
    else:
        print(f"deploy: nothing changed ({target.name} was already up to date)", flush=True)
    return result


def write_handover(enrolment: dict[str, str], out: Path) -> list[Path]:
    """The files the image builder pins (``--tunnel-host-key``, ``--manager-key``)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "tunnel_host_key.pub": enrolment["tunnel_host_key"] + "\n",
        "manager_key.pub": enrolment["manager_key"] + "\n",
        "broker-ca.crt": enrolment["broker_ca"],
        "server.json": json.dumps(enrolment, indent=2, sort_keys=True) + "\n",
        # what operators pin for `dpanel login --ca-file` (the manager's own HTTPS CA)
        **({"https-ca.crt": enrolment["https_ca"]} if enrolment.get("https_ca") else {}),
    }
    written = []
    for name, text in files.items():
        p = out / name
        atomic_write(p, text, 0o644)  # public keys and pins: nothing secret
        written.append(p)
    return written
