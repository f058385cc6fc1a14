"""A real PostgreSQL 15 (Debian's) for tests: initdb + pg_ctl in a temp dir, as non-root.

PostgreSQL refuses to run as root, and CI runs as root: then the cluster belongs to
``nobody`` in a directory it owns (under /tmp, since pytest's own temp dirs are 0700
root). It listens on a free loopback port and on a unix socket in that directory; each
test gets a fresh database (``registry_url``), and ``PG_BIN`` may point elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from support import free_port

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
#: the OS account the cluster runs as when we are root
PG_OS_USER = "nobody"
#: the cluster's superuser name (trust auth: loopback and the socket only)
PG_USER = "dpanel"

_names = itertools.count(1)


@dataclass
class Postgres:
    """One PostgreSQL cluster; ``url(db)`` connects over its unix socket."""

    dir: Path
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", PG_OS_USER, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120,
                              cwd=self.dir, stdin=subprocess.DEVNULL)

    def init(self) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_OS_USER)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", PG_USER, "-A", "trust",
                  "-E", "UTF8", "--no-sync", "--locale=C")
        with (self.data / "postgresql.conf").open("a") as f:
            # a test database: no durability, little memory, quick to start and stop
            f.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                    "synchronous_commit = off\nfull_page_writes = off\n"
                    "shared_buffers = 16MB\nmax_connections = 50\n")

    def start(self) -> None:
        out = self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l",
                        str(self.dir / "postgres.log"), "-w", "-t", "60", "start", check=False)
        if out.returncode != 0:
            log = (self.dir / "postgres.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {out.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop",
                  check=False)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@/{db}?host={self.dir}&port={self.port}"

    def new_db(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t{os.getpid()}_{next(_names)}"
        self._run(str(PG_BIN / "psql"), "-h", str(self.dir), "-p", str(self.port), "-U",
                  PG_USER, "-d", "postgres", "-qc", f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL 15 is not installed ({PG_BIN}; python3 tasks.py test "
                    "installs postgresql-15)")
    d = Path(tempfile.mkdtemp(prefix=f"dpanel-pg-{os.getpid()}-", dir="/tmp"))
    pg = Postgres(d)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.stop("immediate")
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One cluster for the whole session (started on first use)."""
    with running_postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend in turn: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'registry.db'}"
    pg: Postgres = request.getfixturevalue("postgres")
    return pg.new_db()
