"""The layers run one way: proto, then agent, then server/image/deploy, then tasks."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "dpanel_proto": ROOT / "agent" / "dpanel_proto",
    "dpanel_agent": ROOT / "agent" / "dpanel_agent",
    "dpanel_server": ROOT / "server" / "dpanel_server",
    "dpanel_image": ROOT / "image" / "dpanel_image",
    "dpanel_deploy": ROOT / "server" / "dpanel_deploy",
}
#: What each package may import of ours (any import, also inside functions).
ALLOWED = {
    "dpanel_proto": set(),
    "dpanel_agent": {"dpanel_proto"},
    "dpanel_server": {"dpanel_proto"},
    "dpanel_image": {"dpanel_proto", "dpanel_agent"},
    "dpanel_deploy": {"dpanel_proto", "dpanel_server"},
}


def _our_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {n.split(".")[0] for n in names if n.startswith("dpanel_")}
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_runs_upward(package: str) -> None:
    bad = {}
    for path in sorted(PACKAGES[package].rglob("*.py")):
        wrong = _our_imports(path) - ALLOWED[package] - {package}
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"{package} imports what it may not: {bad}"


def test_proto_and_idle_agent_modules_load_without_asyncssh() -> None:
    code = ("import sys, dpanel_proto.wire, dpanel_proto.codes, dpanel_proto.token, "
            "dpanel_proto.signing, dpanel_proto.events, dpanel_proto.result, "
            "dpanel_proto.util, dpanel_proto.ports, dpanel_agent.agent; "
            "bad = [m for m in ('asyncssh', 'dpanel_server', 'fastapi') if m in sys.modules]; "
            "print(bad); raise SystemExit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
