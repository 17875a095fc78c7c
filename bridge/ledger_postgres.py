"""The ledger in PostgreSQL (DATABASE_URL), shared by every replica and every worker.

The critical section is a session advisory lock (pg_advisory_lock) on a pooled connection held
for the section: it holds across replicas, and dies with its holder, since the server releases a
session's advisory locks when the session ends, however it ends (PostgreSQL docs, "Advisory
Locks": "held until explicitly released or the session ends"). The schema is created and
versioned at start, under an advisory lock every process shares.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
import psycopg_pool

from bridge.budget import time_left
from bridge.errors import LedgerUnavailable
from bridge.ledger_sql import Run, SqlLedger, busy
from bridge.logs import log_event

SCHEMA_LOCK = 0x6272696467650001  # the advisory lock key under which the schema is made
CONNECT_SECONDS = 5.0  # how long a request waits for a pooled connection (or a new one)
MIN_WAIT_SECONDS = 1.0  # the shortest wait for a pooled connection, the budget spent or not
POOL_SIZE = 34  # 16 threads a worker, each holding at most one section and one query at a time


class PostgresLedger(SqlLedger):
    """The ledger in one PostgreSQL database, for several replicas."""

    NOW = "extract(epoch from clock_timestamp())::double precision"
    FOR_UPDATE = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url  # never logged: it may hold a password
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._pid = 0
        self._guard = threading.Lock()
        self._migrated = False
        try:
            self._ensure_schema()  # at start, when the database is there; else on first use
        except LedgerUnavailable as error:
            log_event("ledger unavailable at start", logging.WARNING, error=error.message)
        finally:
            self.close()  # gunicorn forks after this: each worker opens a pool of its own

    def close(self) -> None:
        """Closes this process's pool (the next use opens another)."""
        with self._guard:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None

    def _connections(self) -> psycopg_pool.ConnectionPool:
        """This process's pool, opened after gunicorn forks (a pool does not survive a fork)."""
        with self._guard:
            if self._pool is None or self._pid != os.getpid():
                self._pool = psycopg_pool.ConnectionPool(
                    self._url, min_size=1, max_size=POOL_SIZE, open=True, timeout=CONNECT_SECONDS,
                    kwargs={"autocommit": True, "connect_timeout": int(CONNECT_SECONDS)},
                )  # fmt: skip  # a connection the server dropped fails once (503), then is replaced
                self._pid = os.getpid()
            return self._pool

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection, waited for no longer than what is left of the webhook's budget
        (at least a second, as SQLite's busy wait: a record after the budget ran out still gets
        one); a database that cannot be reached is a 503."""
        wait = min(max(time_left(), MIN_WAIT_SECONDS), CONNECT_SECONDS)
        try:
            with self._connections().connection(timeout=wait) as connection:
                yield connection
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as error:
            raise unavailable(error) from error

    def _ensure_schema(self) -> None:
        """Creates or upgrades the schema once per process, one process at a time."""
        if self._migrated:
            return
        with self._connection() as connection, connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            run = _runner(connection)
            self.migrate(run, lambda table: bool(run("SELECT to_regclass(?)", (table,))[0][0]))
        self._migrated = True

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Run]:
        """One transaction on a pooled connection."""
        self._ensure_schema()
        with self._connection() as connection, connection.transaction():
            yield _runner(connection)

    def section(self, lock_key: str) -> AbstractContextManager[None]:
        """The lock key's critical section, across every replica."""
        return self._section(lock_key)

    @contextmanager
    def _section(self, lock_key: str) -> Iterator[None]:
        """Holds a session advisory lock on a connection kept for the section."""
        self._ensure_schema()
        key = int.from_bytes(hashlib.sha256(lock_key.encode()).digest()[:8], "big", signed=True)
        with self._connection() as connection:
            wait_ms = max(int(min(time_left(), 60.0) * 1000), 1)  # what the pool's wait left
            try:
                # lock_timeout bounds the wait for an advisory lock too (a "lock" wait). Both
                # numbers are ints made here: one round trip (the simple query protocol).
                connection.execute(
                    f"SET lock_timeout = {wait_ms}; SELECT pg_advisory_lock({key})".encode()
                )
            except psycopg.errors.LockNotAvailable as error:
                raise busy(lock_key) from error
            try:
                yield
            finally:
                # A broken connection has lost the lock with its session; the pool drops it.
                with contextlib.suppress(psycopg.Error):
                    unlock = f"SELECT pg_advisory_unlock({key}); RESET lock_timeout"
                    connection.execute(unlock.encode())


def _runner(connection: psycopg.Connection[Any]) -> Run:
    """A Run on connection (the shared SQL's `?` placeholders become psycopg's `%s`)."""

    def run(sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """Executes one statement; returns its rows (none for a statement without)."""
        cursor = connection.execute(sql.replace("?", "%s"), tuple(params))
        return cursor.fetchall() if cursor.description else []

    return run


def unavailable(error: BaseException) -> LedgerUnavailable:
    """The 503 for a database that cannot be reached (naming DATABASE_URL, never its value)."""
    reason = type(error).__name__
    return LedgerUnavailable(
        f"the PostgreSQL ledger (DATABASE_URL) cannot be reached: {reason}",
        "Svix retries (nothing this attempt wrote is counted twice); bring the database back.",
    )
