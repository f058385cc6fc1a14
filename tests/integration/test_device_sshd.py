"""The `ssh_target = "sshd"` option: the tunnel leads to the device's own OpenSSH sshd."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stackfix import Stack
from tests.bench.openssh import Sshd


@pytest.mark.root
def test_exec_through_the_devices_own_sshd(stack: Stack, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("sshd runs as root only (CI runs as root)")
    sshd = Sshd().start()
    try:
        # the operator's part of this mode: authorise the manager key in the device's sshd
        shutil.copy(stack.dir / "keys" / "manager_key.pub", sshd.dir / "authorized_keys")
        state = tmp_path / "dev-s"
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
    finally:
        sshd.close()
