"""The ledger: what Stripe already accepted, in a SQLite file shared by the workers."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from bridge.logs import log_event
from bridge.planning import Write
from bridge.targets import Target

T = TypeVar("T")


@dataclass(frozen=True)
class Message:
    """A message as the ledger knows it: which body, and when it was first seen."""

    id: str
    digest: str
    first_seen: float


@dataclass(frozen=True)
class Seen:
    """What the ledger knows of a message before an attempt at it."""

    first_seen: float  # when its first attempt came (now, if this is the first)
    written_as: str | None  # the digest it was fully written under (Message.digest), if it was


@dataclass(frozen=True)
class Pending:
    """What the ledger says of a message's planned writes."""

    writes: list[Write]  # still to make
    superseded: int  # skipped: a message first seen later already set their windows
    kept: int  # skipped: a raw meter already holds another message's event for their windows


@dataclass(frozen=True)
class Accepted:
    """Writes Stripe accepted for a message, and the place (Target.place) whose windows they set."""

    place: str
    writes: Sequence[Write]


class Ledger:
    """The writes Stripe accepted in the last 48 hours, in a SQLite file shared by the workers.

    It lets a report too large for one attempt resume where the last one stopped, answers an
    exact redelivery without calling Stripe, and keeps a late retry of an old message from undoing
    a newer correction. It is an optimisation, never the truth: without it (deleted, unwritable,
    STATE_PATH empty) every write is still idempotent, so nothing is lost or counted twice.
    """

    KEEP_SECONDS = 48 * 3600
    EXPIRE_EVERY_SECONDS = 600.0
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS messages (
            id TEXT PRIMARY KEY, digest TEXT NOT NULL, first_seen REAL NOT NULL,
            done INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS writes (key TEXT PRIMARY KEY, at REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS windows (
            object TEXT NOT NULL, timestamp INTEGER NOT NULL, first_seen REAL NOT NULL,
            message TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (object, timestamp)
        );
        CREATE INDEX IF NOT EXISTS messages_first_seen ON messages (first_seen);
        CREATE INDEX IF NOT EXISTS writes_at ON writes (at);
        CREATE INDEX IF NOT EXISTS windows_at ON windows (at);
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._local = threading.local()
        self._expired_at = 0.0

    def _db(self) -> sqlite3.Connection | None:
        """This thread's connection (opened after gunicorn forks), or None without a ledger."""
        if not self.path:
            return None
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(self.SCHEMA)
            self._local.connection, self._local.pid = connection, os.getpid()
        return connection

    def _run(self, default: T, work: Callable[[sqlite3.Connection], T]) -> T:
        """Runs work on the ledger; a broken ledger is logged and worked around, never fatal."""
        try:
            db = self._db()
            return default if db is None else work(db)
        except (sqlite3.Error, OSError) as error:
            self._local.connection = None
            log_event("ledger unavailable", logging.WARNING, path=self.path, error=str(error))
            return default

    def begin(self, message_id: str) -> Seen:
        """When this message was first seen (now, if never), and what it was fully written as."""

        def work(db: sqlite3.Connection) -> Seen:
            row = db.execute(
                "SELECT first_seen, digest, done FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return Seen(time.time(), None)
            return Seen(float(row[0]), str(row[1]) if row[2] else None)

        self._expire()
        return self._run(Seen(time.time(), None), work)

    def pending(self, writes: Sequence[Write], target: Target, message: Message) -> Pending:
        """Which of a message's planned writes are still to make, and why the others are not."""
        place = target.place  # the same object in another account is another object

        def work(db: sqlite3.Connection) -> Pending:
            todo, superseded, kept = [], 0, 0
            for write in writes:
                written = (f"{place} {write.key}",)
                if db.execute("SELECT 1 FROM writes WHERE key = ?", written).fetchone():
                    # Only a raw meter's keys are shared between messages (one event per window).
                    other = (
                        "SELECT 1 FROM windows WHERE object = ? AND timestamp = ? AND message != ?"
                    )
                    if (
                        target.raw_meter
                        and db.execute(other, (place, write.timestamp, message.id)).fetchone()
                    ):
                        kept += 1
                    continue
                newer = db.execute(
                    "SELECT 1 FROM windows WHERE object = ? AND timestamp = ? AND first_seen > ?",
                    (place, write.timestamp, message.first_seen),
                ).fetchone()
                if newer:
                    superseded += 1
                else:
                    todo.append(write)
            return Pending(todo, superseded, kept)

        return self._run(Pending(list(writes), 0, 0), work)

    def record(self, message: Message, done: bool, accepted: Accepted | None = None) -> None:
        """Remembers, in one transaction, the message and the writes Stripe accepted for it.

        An attempt that failed before it wrote (accepted None) is remembered too: when a message
        was first seen decides which of two reports for the same windows wins.
        """
        keys = [f"{accepted.place} {w.key}" for w in accepted.writes] if accepted else []
        windows = [(accepted.place, w.timestamp) for w in accepted.writes] if accepted else []

        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                    "digest = excluded.digest, done = CASE WHEN digest = excluded.digest "
                    "THEN max(done, excluded.done) ELSE excluded.done END",
                    (message.id, message.digest, message.first_seen, int(done)),
                )
                db.executemany(
                    "INSERT OR REPLACE INTO writes VALUES (?, ?)", [(key, now) for key in keys]
                )
                db.executemany(
                    "INSERT INTO windows VALUES (?, ?, ?, ?, ?) ON CONFLICT (object, timestamp) "
                    "DO UPDATE SET first_seen = excluded.first_seen, message = excluded.message, "
                    "at = excluded.at WHERE excluded.first_seen >= windows.first_seen",
                    [(place, timestamp, message.first_seen, message.id, now)
                     for place, timestamp in windows],
                )  # fmt: skip
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        self._run(None, work)

    def _expire(self) -> None:
        """Forgets entries older than 48 hours, now and then: the ledger stays bounded."""
        if time.monotonic() - self._expired_at < self.EXPIRE_EVERY_SECONDS:
            return
        self._expired_at = time.monotonic()
        cutoff = time.time() - self.KEEP_SECONDS

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM messages WHERE first_seen < ?", (cutoff,))
            db.execute("DELETE FROM writes WHERE at < ?", (cutoff,))
            db.execute("DELETE FROM windows WHERE at < ?", (cutoff,))

        self._run(None, work)
