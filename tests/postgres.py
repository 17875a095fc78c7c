"""A throw-away PostgreSQL for the tests: initdb in a temporary folder, one server per session.

`make test` installs Debian's postgresql (`make postgres`); this module only runs it. The server
listens on 127.0.0.1 at a port the OS picked, with trust authentication, and belongs to the user
running the tests, or to `postgres` when that is root (PostgreSQL refuses to run as root). Each
test that asks for `postgres_url` gets a database of its own; `postgres_server` can be stopped and
started again, for the tests of a ledger that cannot be reached.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.harness import free_port, wait_until

# Debian installs the server's programs here, off the PATH (postgresql-common wraps a few of them).
BIN_GLOB = "/usr/lib/postgresql/*/bin"


def server_bin() -> Path | None:
    """The folder of the newest installed server's programs, or None without a server."""
    found = sorted(glob.glob(BIN_GLOB), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in [os.environ.get("PG_BIN", ""), *found]:
        if folder and (Path(folder) / "initdb").exists() and (Path(folder) / "postgres").exists():
            return Path(folder)
    return None


def why_not() -> str | None:
    """Why no PostgreSQL can run here (the tests that need one skip with it), or None."""
    if server_bin() is None:
        return "PostgreSQL is not installed (make postgres installs it as root with apt-get)"
    return None


class PostgresServer:
    """One PostgreSQL server in a temporary folder, run as a user allowed to run it."""

    def __init__(self) -> None:
        self.bin = server_bin()
        assert self.bin is not None, why_not()
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
        self.data = self.folder / "data"
        self.process: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:  # the postgres user owns the folder it runs in
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8"])

    @staticmethod
    def _as_owner() -> dict[str, Any]:
        """subprocess's arguments that run a program as `postgres` when the tests run as root."""
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _run(self, argv: Sequence[str]) -> None:
        """Runs one of the server's programs to completion, its output kept for a failure."""
        assert self.bin is not None
        command = [str(self.bin / argv[0]), *argv[1:]]
        subprocess.run(
            command, check=True, capture_output=True, cwd=self.folder, **self._as_owner()
        )

    @property
    def url(self) -> str:
        """The server's maintenance database, as a DATABASE_URL."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        """A DATABASE_URL for one database of this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        """Starts the server and waits until it takes connections."""
        assert self.bin is not None and self.process is None
        argv = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}",
                "-c", "fsync=off", "-c", "max_connections=200"]  # fmt: skip
        log = (self.folder / "server.log").open("ab")
        self.process = subprocess.Popen(
            argv, stdout=log, stderr=log, cwd=self.folder, **self._as_owner()
        )
        wait_until(self.ready, timeout=60)

    def ready(self) -> bool:
        """Whether the server answers a connection."""
        assert self.bin is not None
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError((self.folder / "server.log").read_text())
        argv = [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]
        return subprocess.run(argv, check=False).returncode == 0

    def stop(self) -> None:
        """Stops the server at once (a fast shutdown: open connections are dropped)."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # "fast" shutdown; SIGTERM would wait for clients
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def create_database(self) -> str:
        """A new, empty database on this server; returns its DATABASE_URL."""
        import psycopg  # noqa: PLC0415 - only the tests that use PostgreSQL need it

        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def remove(self) -> None:
        """Stops the server and deletes its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
