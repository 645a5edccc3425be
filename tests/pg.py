"""A throw-away PostgreSQL cluster for tests: initdb in a temp dir, loopback only, non-root."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`url` for SQLAlchemy."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _bin("initdb"), _bin("pg_ctl")
        self.dir = Path(tempfile.mkdtemp(prefix="shieldml-pg-"))
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            for candidate in ("postgres", "nobody"):
                try:
                    pwd.getpwnam(candidate)
                    self.user = candidate
                    break
                except KeyError:
                    continue

    @property
    def available(self) -> str | None:
        """None if usable, else the reason to skip."""
        if not self.initdb or not self.pg_ctl:
            return "PostgreSQL server binaries (initdb, pg_ctl) not found"
        if os.geteuid() == 0 and self.user is None:
            return "running as root and no unprivileged user to run PostgreSQL"
        return None

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if self.user:
            shutil.chown(self.dir, self.user)
        data, sock = self.dir / "data", self.dir / "sock"
        sock.mkdir()
        if self.user:
            shutil.chown(sock, self.user)
        self._run(
            str(self.initdb),
            "-D",
            str(data),
            "-U",
            "shieldml",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._opts = opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {sock} -c fsync=off -c synchronous_commit=off -c max_connections=300 -c full_page_writes=off"
        )
        self._run(
            str(self.pg_ctl),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def halt(self) -> None:
        """Stop the server, keeping its data (fault tests)."""
        self._run(str(self.pg_ctl), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start it again after :meth:`halt`, with the same options."""
        self._run(
            str(self.pg_ctl),
            "-D",
            str(self.dir / "data"),
            "-o",
            self._opts,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def restart(self) -> None:
        """Stop and start again (used by fault tests)."""
        data = self.dir / "data"
        # -l: the restarted server must not inherit (and hold open) our captured stdout
        self._run(
            str(self.pg_ctl),
            "-D",
            str(data),
            "-l",
            str(self.dir / "log"),
            "-m",
            "fast",
            "-w",
            "restart",
        )

    def stop(self) -> None:
        if (self.dir / "data" / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self._run(
                    str(self.pg_ctl), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop"
                )
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://shieldml@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        engine.dispose()
        return self.url(name)
