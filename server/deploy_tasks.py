"""invoke tasks for the server appliance: ``deploy`` (deploy-server) and ``build-deb``.

A top-level module beside the product packages, not inside ``dpanel_deploy``: the .deb
ships that package, and invoke is a dev-only dependency the server never needs.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task

from dpanel_proto.ports import BROKER_TLS_PORT, TUNNEL_PORT

__all__ = ["server_ns"]


@task(name="build-deb", help={"out": "directory for the .deb (default dist/)"})
def build_deb_task(c: Context, out: str = "dist") -> None:
    """Build the dpanel-server Debian package (venv in /opt/dpanel + systemd units)."""
    from dpanel_deploy.debpkg import build_deb

    try:
        print(build_deb(Path(out)).path)
    except RuntimeError as exc:
        sys.exit(f"build-deb: {exc}")


@task(help={
    "host": "ssh destination: root@HOST, ssh://root@HOST:PORT or a Host from ssh_config",
    "local": "deploy onto this machine instead (run as root)",
    "public_host": "name or address devices dial (default: the host of --host; kept "
                   "from the last deploy if omitted)",
    "tunnel_public": f"HOST:PORT devices dial for the tunnel, if not PUBLIC_HOST:{TUNNEL_PORT}",
    "broker_public": f"HOST:PORT devices dial for MQTT/TLS, if not PUBLIC_HOST:{BROKER_TLS_PORT}",
    "ssh_config": "ssh_config file to use (ssh -F)",
    "identity": "ssh private key to use (ssh -i)",
    "deb": "install this dpanel-server .deb instead of building one",
    "out": "where to write the server's pins for build-image (default out/server-HOST)",
    "https_listen": "operators' HTTPS (e.g. 0.0.0.0:443; \"off\": off; kept if omitted)",
    "edge_listen": "devices' one-port TLS edge (e.g. 0.0.0.0:8443; \"off\": off; kept)",
    "edge_public": "HOST:PORT device tokens name for the edge (default PUBLIC_HOST:PORT)",
    "broker_auth": "dynsec or files (default: dynsec on a fresh install, else kept)",
})
def deploy(c: Context, host: str = "", local: bool = False, public_host: str = "",
           tunnel_public: str = "", broker_public: str = "", ssh_config: str = "",
           identity: str = "", deb: str = "", out: str = "", https_listen: str = "",
           edge_listen: str = "", edge_public: str = "", broker_auth: str = "") -> None:
    """Turn a fresh Debian 12 host into a dPanel server (idempotent; upgrades keep state)."""
    from dpanel_deploy.debpkg import read_deb
    from dpanel_deploy.deploy import deploy as run_deploy
    from dpanel_deploy.deploy import public_host_of, target_for, write_handover
    from dpanel_deploy.target import DeployError

    try:
        target = target_for(host, local, ssh_config, identity)
    except DeployError as exc:
        sys.exit(f"deploy: {exc}")
    default_public = socket.getfqdn() if local else public_host_of(host)
    try:
        # built only after the preflight passed (deploy() does it): fail early
        build = read_deb(Path(deb)) if deb else None
        result = run_deploy(target, deb=build, public_host=public_host,
                            tunnel_public=tunnel_public, broker_public=broker_public,
                            default_public_host=default_public,
                            configure_args=[a for flag, v in (
                                ("--https-listen", https_listen),
                                ("--edge-listen", edge_listen), ("--edge-public", edge_public),
                                ("--broker-auth", broker_auth)) if v
                                for a in (flag, "" if v == "off" else v)])
    except (DeployError, RuntimeError) as exc:
        sys.exit(f"deploy: {exc}")
    finally:
        target.close()
    e = result.enrolment
    outdir = Path(out or f"out/server-{'local' if local else public_host_of(host)}")
    write_handover(e, outdir)
    print(f"""
dPanel server on {target.name}
  tunnel            {e['tunnel']}
  tunnel host key   {e['tunnel_host_key_fingerprint']}
  broker            {e['broker']}
  broker CA SHA256  {e['broker_ca_sha256']}
  manager key       {e['manager_key']}
  broker auth       {e.get('broker_auth', 'files')}
  edge              {e.get('edge', 'off')}
  operators' HTTPS  {e.get('https_listen', 'off')}{(
      '  (CA SHA256 ' + e['https_ca_sha256'] + ', ' + str(outdir) + '/https-ca.crt)')
      if e.get('https_ca_sha256') else ''}
Pins for images written to {outdir}/ (tunnel_host_key.pub, manager_key.pub, broker-ca.crt,
server.json): invoke build-image --tunnel-host-key {outdir}/tunnel_host_key.pub \\
    --manager-key {outdir}/manager_key.pub
Enrol a device on the server: ssh {host or 'root@localhost'} dpanel device add NAME""")


server_ns = Collection("server")
server_ns.add_task(deploy)
server_ns.add_task(build_deb_task, name="build-deb")
