"""The `ssh_target = "sshd"` option: the tunnel leads to the device's own OpenSSH sshd."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from stackfix import Stack
from tests.bench.openssh import Sshd


@pytest.mark.root
def test_exec_through_the_devices_own_sshd(stack: Stack, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("sshd runs as root only (CI runs as root)")
    state = tmp_path / "dev-s"
    # what agent/README.md tells the operator to add for certificates (the paths are
    # the agent's state dir; StrictModes is off in this sshd, see the README for why)
    sshd = Sshd(extra_config=f"TrustedUserCAKeys {state}/sshd/user_ca.pub\n"
                f"AuthorizedPrincipalsFile {state}/sshd/principals\n"
                "LogLevel VERBOSE\n").start()
    try:
        # the operator's part of this mode: authorise the manager key in the device's sshd
        shutil.copy(stack.dir / "keys" / "manager_key.pub", sshd.dir / "authorized_keys")
        state.mkdir()
        conf = state / "agent.toml"
        conf.write_text(f'state_dir = "{state}"\nssh_target = "sshd"\n'
                        f'sshd_port = {sshd.port}\nsshd_host_key = "{sshd.dir / "host_key.pub"}"\n')
        stack.start_agent(stack.enrol("dev-s"), state, extra=("--config", str(conf)))
        device = stack.wait_online("dev-s")
        # the pinned key is sshd's own host key, not the agent's
        assert device["host_key"].split()[1] == (sshd.dir / "host_key.pub").read_text().split()[1]
        out = stack.cli("exec", "dev-s", "--", "sh", "-c", "echo $SSH_CONNECTION; exit 6")
        assert out.returncode == 6, out
        assert out.stdout.split()[2:4] == [b"127.0.0.1", str(sshd.port).encode()]

        # an operator's short-lived certificate gets into the device's own OpenSSH: the
        # agent wrote the user CA and the principals it accepts where sshd reads them
        assert (state / "sshd" / "principals").read_text() == "dpanel:*\ndpanel:dev-s\n"
        key = tmp_path / "op"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        token = (stack.dir / "keys" / "admin.token").read_text().strip()
        req = urllib.request.Request(
            f"http://127.0.0.1:{stack.api_port}/v1/certs", method="POST",
            data=json.dumps({"public_key": Path(f"{key}.pub").read_text().strip(),
                             "ttl": 300}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            Path(f"{key}-cert.pub").write_text(json.loads(r.read())["certificate"] + "\n")
        stack.cli_ok("ssh-config")  # known_hosts
        base = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o",
                f"ProxyCommand={stack.proxy_command()}", "-i", str(key),
                "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={stack.dir / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-l", "root"]
        out = subprocess.run([*base, "dev-s", "echo cert-via-sshd"], capture_output=True,
                             timeout=120, stdin=subprocess.DEVNULL)
        assert out.returncode == 0 and out.stdout == b"cert-via-sshd\n", out
        # sshd logs the certificate's key id (the operator), as its own audit
        assert "ID admin (serial" in (sshd.dir / "sshd.log").read_text(errors="replace")
        # a certificate from another CA is refused by sshd
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(tmp_path / "evil_ca")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "evil_ca"), "-I", "mallory",
                        "-n", "dpanel:*", "-V", "+5m", f"{key}.pub"], check=True)
        out = subprocess.run([*base, "dev-s", "true"], capture_output=True, timeout=120,
                             stdin=subprocess.DEVNULL)
        assert out.returncode == 255, out
    finally:
        sshd.close()
