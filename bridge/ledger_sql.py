"""The ledger's tables and queries, shared by its SQLite and PostgreSQL backends.

A backend supplies a transaction (`_transaction`, yielding a Run that executes one statement
with `?` placeholders), the SQL for "now" on the ledger's clock, a row-lock suffix, and its
critical section. Everything a write means is decided here, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

from bridge.errors import StripeUnavailable
from bridge.ledger import Elsewhere, Message, Pending, Seen
from bridge.planning import Write
from bridge.targets import Claim

SCHEMA_VERSION = 2
# Version 1 (before the ledger was shared) kept messages, writes and windows under other
# columns and account-hashed places that mean nothing now: it is dropped, not migrated.
OLD_TABLES = ("messages", "writes", "windows")
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS ledger_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS messages (
        id TEXT PRIMARY KEY, digest TEXT NOT NULL, first_seen DOUBLE PRECISION NOT NULL,
        first_sent DOUBLE PRECISION, done INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS writes (
        place TEXT NOT NULL, key TEXT NOT NULL, message TEXT NOT NULL, timestamp BIGINT NOT NULL,
        at DOUBLE PRECISION NOT NULL, PRIMARY KEY (place, key))""",
    """CREATE TABLE IF NOT EXISTS windows (
        place TEXT NOT NULL, timestamp BIGINT NOT NULL, first_seen DOUBLE PRECISION NOT NULL,
        message TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (place, timestamp))""",
    """CREATE TABLE IF NOT EXISTS fresh_keys (
        key TEXT PRIMARY KEY, fresh TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS claims (
        customer TEXT NOT NULL, meter TEXT NOT NULL, subject TEXT NOT NULL,
        subscription TEXT NOT NULL, slug TEXT NOT NULL, PRIMARY KEY (customer, meter))""",
    "CREATE INDEX IF NOT EXISTS messages_first_seen ON messages (first_seen)",
    "CREATE INDEX IF NOT EXISTS writes_message ON writes (message)",
    "CREATE INDEX IF NOT EXISTS writes_at ON writes (at)",
    "CREATE INDEX IF NOT EXISTS windows_at ON windows (at)",
    "CREATE INDEX IF NOT EXISTS fresh_keys_at ON fresh_keys (at)",
]
CHUNK = 500  # placeholders per IN list: well under either database's limit


class Run(Protocol):
    """Executes one statement (`?` placeholders) in the current transaction; returns its rows."""

    def __call__(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


def chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """items in runs of CHUNK."""
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def marks(count: int) -> str:
    """count placeholders, for an IN list."""
    return ", ".join("?" * count)


def busy(lock_key: str) -> StripeUnavailable:
    """The 503 for a section another webhook held until the time budget ran out."""
    return StripeUnavailable(
        f"another webhook kept {lock_key} busy until the time budget ran out", "Svix will retry."
    )


class SqlLedger:
    """The ledger's logic over any SQL backend (see the module's docstring)."""

    KEEP_SECONDS = 48 * 3600
    EXPIRE_EVERY_SECONDS = 600.0
    NOW = ""  # SQL for the ledger's clock, in Unix seconds
    FOR_UPDATE = ""  # the suffix that locks a selected row until the transaction ends

    def __init__(self) -> None:
        self._expired_at = 0.0

    def _transaction(self, write: bool = True) -> AbstractContextManager[Run]:
        """One transaction, reading only unless write (LedgerUnavailable if unreachable)."""
        raise NotImplementedError

    def section(self, lock_key: str) -> AbstractContextManager[None]:
        """The lock key's critical section."""
        raise NotImplementedError

    def migrate(self, run: Run, has_table: Callable[[str], bool]) -> None:
        """Creates the schema, or replaces version 1's tables; run under a lock all share."""
        if not has_table("ledger_schema"):
            for table in OLD_TABLES:
                run(f"DROP TABLE IF EXISTS {table}")
        for statement in SCHEMA:
            run(statement)
        version = run("SELECT version FROM ledger_schema")
        if not version:
            run("INSERT INTO ledger_schema VALUES (?)", (SCHEMA_VERSION,))
        elif version[0][0] != SCHEMA_VERSION:
            raise RuntimeError(f"ledger schema {version[0][0]} is newer than {SCHEMA_VERSION}")

    def begin(self, message_id: str, sent_at: float | None) -> Seen:
        """Records the message's first sight (once) and says what is known of it."""
        self._expire()
        with self._transaction() as run:
            # RETURNING gives a row only if this attempt inserted it (SQLite 3.35+, PostgreSQL).
            first_sight = (
                "INSERT INTO messages (id, digest, first_seen, first_sent, done) "  # noqa: S608
                f"VALUES (?, '', {self.NOW}, ?, 0) ON CONFLICT (id) DO NOTHING "
                "RETURNING first_seen, first_sent, digest, done"
            )  # NOW is the backend's constant
            rows = run(first_sight, (message_id, sent_at))
            first_attempt = bool(rows)
            rows = rows or run(
                "SELECT first_seen, first_sent, digest, done FROM messages WHERE id = ?",
                (message_id,),
            )
        first_seen, first_sent, digest, done = rows[0]
        sent = None if first_sent is None else float(first_sent)
        return Seen(float(first_seen), sent, str(digest) if done else None, first_attempt)

    def pending(self, writes: Sequence[Write], place: str, raw: bool, message: Message) -> Pending:
        """Which of a message's planned writes are still to make, and why the others are not."""
        done: set[str] = set()
        holders: dict[int, tuple[float, str]] = {}
        fresh: dict[str, str] = {}
        with self._transaction(write=False) as run:
            for part in chunks([w.key for w in writes]):
                # Only placeholders are formatted in, never a value.
                sql = f"SELECT key FROM writes WHERE place = ? AND key IN ({marks(len(part))})"  # noqa: S608
                done.update(str(row[0]) for row in run(sql, (place, *part)))
                sql = f"SELECT key, fresh FROM fresh_keys WHERE key IN ({marks(len(part))})"  # noqa: S608
                fresh.update((str(k), str(f)) for k, f in run(sql, part))
            for part in chunks(sorted({w.timestamp for w in writes})):
                sql = (
                    "SELECT timestamp, first_seen, message FROM windows "  # noqa: S608
                    f"WHERE place = ? AND timestamp IN ({marks(len(part))})"
                )
                holders.update((int(t), (float(f), str(m))) for t, f, m in run(sql, (place, *part)))
        todo, superseded, kept = [], 0, 0
        for write in writes:
            holder = holders.get(write.timestamp)
            if write.key in done:
                # Only a raw meter's keys are shared between messages (one event per window).
                kept += bool(raw and holder and holder[1] != message.id)
            elif holder and holder[0] > message.first_seen:
                superseded += 1
            else:
                todo.append(replace(write, fresh=fresh[write.key]) if write.key in fresh else write)
        return Pending(todo, superseded, kept)

    def record(self, message: Message, done: bool, place: str, writes: Sequence[Write]) -> None:
        """Remembers, in one transaction, writes Stripe accepted and whether the message is done."""
        now = time.time()
        with self._transaction() as run:
            run(
                "INSERT INTO messages (id, digest, first_seen, first_sent, done) "
                "VALUES (?, ?, ?, NULL, ?) ON CONFLICT (id) DO UPDATE SET "
                "digest = excluded.digest, done = CASE WHEN messages.digest = excluded.digest "
                "AND messages.done > excluded.done THEN messages.done ELSE excluded.done END",
                (message.id, message.digest, message.first_seen, int(done)),
            )
            for write in writes:
                run(
                    "INSERT INTO writes VALUES (?, ?, ?, ?, ?) ON CONFLICT (place, key) "
                    "DO UPDATE SET message = excluded.message, at = excluded.at",
                    (place, write.key, message.id, write.timestamp, now),
                )
                run(
                    "INSERT INTO windows VALUES (?, ?, ?, ?, ?) ON CONFLICT (place, timestamp) "
                    "DO UPDATE SET first_seen = excluded.first_seen, message = excluded.message, "
                    "at = excluded.at WHERE excluded.first_seen >= windows.first_seen",
                    (place, write.timestamp, message.first_seen, message.id, now),
                )

    def written_elsewhere(self, message_id: str, place: str) -> list[Elsewhere]:
        """The windows this message wrote to places other than this one."""
        with self._transaction(write=False) as run:
            rows = run(
                "SELECT place, timestamp FROM writes WHERE message = ? AND place != ? "
                "ORDER BY place, timestamp",
                (message_id, place),
            )
        return [Elsewhere(str(p), int(t)) for p, t in rows]

    def replace_key(self, key: str, fresh: str) -> None:
        """Remembers the key that replaces one Stripe answered with a 5xx, for every delivery."""
        with self._transaction() as run:
            run(
                "INSERT INTO fresh_keys VALUES (?, ?, ?) ON CONFLICT (key) "
                "DO UPDATE SET fresh = excluded.fresh, at = excluded.at",
                (key, fresh, time.time()),
            )

    def claim(self, new: Claim, still_valid: Callable[[Claim], bool]) -> Claim:
        """The claim held on new's customer meter: the first made, unless no longer valid."""
        where = (new.customer, new.meter)
        with self._transaction() as run:
            run(
                "INSERT INTO claims VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (customer, meter) DO NOTHING",
                (*where, new.subject, new.subscription, new.slug),
            )
            row = run(
                "SELECT subject, subscription, slug FROM claims WHERE customer = ? AND meter = ?"  # noqa: S608
                + self.FOR_UPDATE,
                where,
            )[0]
            held = Claim(new.customer, new.meter, str(row[0]), str(row[1]), str(row[2]))
            if held == new or still_valid(held):
                return held
            run(
                "UPDATE claims SET subject = ?, subscription = ?, slug = ? "
                "WHERE customer = ? AND meter = ?",
                (new.subject, new.subscription, new.slug, *where),
            )
            return new

    def _expire(self) -> None:
        """Forgets entries older than 48 hours, now and then: the ledger stays bounded."""
        if time.monotonic() - self._expired_at < self.EXPIRE_EVERY_SECONDS:
            return
        self._expired_at = time.monotonic()
        cutoff = time.time() - self.KEEP_SECONDS
        with self._transaction() as run:
            run("DELETE FROM messages WHERE first_seen < ?", (cutoff,))
            for table in ("writes", "windows", "fresh_keys"):
                run(f"DELETE FROM {table} WHERE at < ?", (cutoff,))  # noqa: S608  # fixed names
