"""The ledger in a SQLite file (STATE_PATH), shared by every worker on one host.

The critical section is a byte-range lock (fcntl) on a lock file beside the database, one byte
per lock key, so it holds across worker processes and dies with its holder: the kernel drops a
process's locks when it exits, however it exits. Those locks belong to the process, so threads
of one process also take a lock per byte among themselves.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from bridge.budget import time_left
from bridge.errors import LedgerUnavailable
from bridge.ledger_sql import SCHEMA_VERSION, Run, SqlLedger, busy

LOCK_BYTES = 1 << 31  # lock keys hash onto this many bytes: a collision only serializes two keys
SETUP_LOCK_KEY = "ledger setup"  # held while a connection makes the file WAL and its schema


class FileLocks:
    """One exclusive lock per key, across the processes that open one lock file."""

    POLL_SECONDS = 0.005

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0
        self._guard = threading.Lock()
        self._threads: dict[int, tuple[threading.Lock, int]] = {}  # byte -> lock, how many want it

    def _file(self) -> int:
        """This process's descriptor of the lock file, opened once and never closed: closing any
        descriptor of a file drops every lock the process holds on it (POSIX record locks)."""
        with self._guard:
            if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._pid = os.getpid()
            return self._fd

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Holds key's lock until the block ends; StripeUnavailable if the budget runs out first."""
        byte = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % LOCK_BYTES
        fd = self._file()
        with self._guard:
            lock, users = self._threads.get(byte, (threading.Lock(), 0))
            self._threads[byte] = lock, users + 1
        try:
            deadline = time.monotonic() + max(min(time_left(), 60.0), 0.0)
            if not lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise busy(key)
            try:
                while not _try_lock(fd, byte):
                    if time.monotonic() >= deadline:
                        raise busy(key)
                    time.sleep(self.POLL_SECONDS)  # the kernel has no timed wait for fcntl locks
                try:
                    yield
                finally:
                    fcntl.lockf(fd, fcntl.LOCK_UN, 1, byte)
            finally:
                lock.release()
        finally:
            with self._guard:  # the last user drops the thread lock: the table stays small
                lock, users = self._threads[byte]
                if users == 1:
                    del self._threads[byte]
                else:
                    self._threads[byte] = lock, users - 1


def _try_lock(fd: int, byte: int) -> bool:
    """Takes the byte's exclusive lock if no other process holds it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
        return True
    except (BlockingIOError, PermissionError):
        return False


class SqliteLedger(SqlLedger):
    """The ledger in one SQLite file (WAL mode), for the workers of one host."""

    NOW = "((julianday('now') - 2440587.5) * 86400.0)"
    # A wait for SQLite's write lock: what is left of the webhook's budget, at least a second (a
    # record after the budget ran out still gets one) and at most 10 s. Transactions are short;
    # only a starved CPU makes them wait long.
    MIN_BUSY_SECONDS, MAX_BUSY_SECONDS = 1.0, 10.0

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._local = threading.local()
        self._locks = FileLocks(path + ".lock")
        self._migrated_pid = 0  # the process that last checked the schema
        self._migrating = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (opened after gunicorn forks), the schema made on first use."""
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            # Setting up may wait for another process that makes a fresh file WAL or its schema.
            connection = sqlite3.connect(
                self.path,
                timeout=self.MAX_BUSY_SECONDS,
                isolation_level=None,
                check_same_thread=False,
            )
            # One connection of the host at a time: two that make a fresh file WAL at once
            # deadlock, and SQLite answers one 'database is locked' without waiting.
            with self._migrating, self._locks.hold(SETUP_LOCK_KEY):
                connection.execute("PRAGMA journal_mode=WAL")
                if self._migrated_pid != os.getpid():
                    self._migrate(connection)
                    self._migrated_pid = os.getpid()
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection, self._local.pid = connection, os.getpid()
            self._local.busy_seconds = -1  # the first transaction sets its own wait
        return connection

    def _migrate(self, connection: sqlite3.Connection) -> None:
        """Creates or upgrades the schema (under the setup lock, then SQLite's write lock); a
        current schema needs no write lock, so a worker starting beside busy ones never waits."""
        current = "SELECT 1 FROM sqlite_master WHERE name = 'ledger_schema'"
        if connection.execute(current).fetchone():
            version = connection.execute("SELECT version FROM ledger_schema").fetchone()
            if version and version[0] == SCHEMA_VERSION:
                return
        connection.execute("BEGIN IMMEDIATE")
        try:
            run = _runner(connection)
            exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
            self.migrate(run, lambda table: bool(run(exists, (table,))))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Run]:
        """One transaction (a write takes SQLite's write lock at once: no upgrade deadlocks);
        a ledger that cannot be opened or written is a 503."""
        try:
            db = self._db()
            wait = min(max(time_left(), self.MIN_BUSY_SECONDS), self.MAX_BUSY_SECONDS)
            if int(wait) != self._local.busy_seconds:  # whole seconds: rarely a statement more
                db.execute(f"PRAGMA busy_timeout = {int(wait) * 1000}")
                self._local.busy_seconds = int(wait)
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except (sqlite3.Error, OSError) as error:
            self._local.connection = None
            raise unavailable(self.path, error) from error
        try:
            yield _runner(db)
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as error:
            _rollback(db)
            self._local.connection = None
            raise unavailable(self.path, error) from error
        except BaseException:
            _rollback(db)
            raise

    def section(self, lock_key: str) -> AbstractContextManager[None]:
        """The lock key's critical section, across the host's workers."""
        try:
            self._db()  # a lock beside a ledger that cannot be opened protects nothing
        except (sqlite3.Error, OSError) as error:
            raise unavailable(self.path, error) from error
        return self._locks.hold(lock_key)


def _runner(db: sqlite3.Connection) -> Run:
    """A Run on db."""

    def run(sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """Executes one statement; returns its rows."""
        return db.execute(sql, tuple(params)).fetchall()

    return run


def _rollback(db: sqlite3.Connection) -> None:
    """Rolls back, if a transaction is still open."""
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def unavailable(where: str, error: BaseException) -> LedgerUnavailable:
    """The 503 for a ledger that cannot be reached (never quoting a secret: a path, an error)."""
    return LedgerUnavailable(
        f"the ledger at {where} cannot be used: {error}",
        "Svix retries (nothing this attempt wrote is counted twice); make the ledger "
        "reachable and writable again.",
    )
