"""The Stripe rate budget: how many requests a second every worker and replica may send, together.

Stripe's basic rate limiter allows an account 100 operations a second in live mode and 25 in a
sandbox, shared with everything else the account does, and answers 429 beyond
(docs.stripe.com/rate-limits, "Rate limiter"). At month-end OpenMeter sends every subject's report
in the same minute: without a budget the workers fire as fast as Stripe answers and most of the
burst comes back 429. With it, each request takes the next free slot of one schedule; a request
whose slot falls after the attempt's time budget is not sent at all (503, progress kept by the
ledger), and a 429 pushes the schedule back for everyone.

The schedule is one number per Stripe account, "the next free slot", advanced atomically in a
shared store: SQLite next to the ledger for the workers of one host, a PostgreSQL row for replicas
(the same `advance` in one transaction, SELECT ... FOR UPDATE).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

from bridge.errors import StripeUnavailable
from bridge.logs import RATE_BUDGET_REFUSED, log_event

if TYPE_CHECKING:  # settings imports the transport, which imports this
    from bridge.settings import Settings

T = TypeVar("T")

# Below Stripe's documented limits (docs.stripe.com/rate-limits: 100/s live, 25/s in a sandbox),
# leaving a fifth for everything else the account does (the dashboard, other integrations).
DEFAULT_LIVE_RATE = 80.0
DEFAULT_TEST_RATE = 20.0
# A request's slot must leave this much of the attempt's time for the request itself.
SEND_MARGIN_SECONDS = 0.5
# After a 429 for a rate limit, nobody sends for this long: Stripe documents no Retry-After, and
# asks clients to back off ("Handling limiting gracefully").
RATE_LIMITED_PAUSE_SECONDS = 1.0
# A slot further ahead than this cannot come from the schedule (nobody reserves past an attempt's
# 12 s): the wall clock stepped back, so the schedule starts again from now.
MAX_AHEAD_SECONDS = 60.0


class PaceStore(Protocol):
    """Where the schedule lives: one float per account, updated atomically."""

    def advance(self, step: Callable[[float], tuple[float, T]]) -> T:
        """Reads the next free slot (0 if none), stores step's new slot, returns step's result,
        all in one transaction against every other worker and replica."""


class MemoryStore:
    """The schedule in this process only (no STATE_PATH): each worker paces its own share."""

    def __init__(self) -> None:
        self._slot = 0.0
        self._lock = threading.Lock()

    def advance(self, step: Callable[[float], tuple[float, T]]) -> T:
        """Advances the schedule under a lock."""
        with self._lock:
            self._slot, result = step(self._slot)
            return result


@contextmanager
def setup_lock(path: str) -> Iterator[None]:
    """Holds the host's lock for setting up a connection: two connections that make a fresh file
    WAL at once deadlock, and SQLite answers one 'database is locked' without waiting. (A
    whole-file flock, unlike the ledger's FileLocks: one short wait, no webhook budget to keep.)"""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


class SQLiteStore:
    """The schedule in a SQLite file shared by the host's workers (next to the ledger)."""

    SCHEMA = "CREATE TABLE IF NOT EXISTS pacing (account TEXT PRIMARY KEY, slot REAL NOT NULL)"

    def __init__(self, path: str, account: str) -> None:
        self.path = path
        self.account = account
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened after gunicorn forks."""
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=2.0, isolation_level=None)
            with setup_lock(self.path + ".lock"):
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute(self.SCHEMA)
            # Losing the last slots in a power cut costs nothing: no fsync per request.
            connection.execute("PRAGMA synchronous=OFF")
            self._local.connection, self._local.pid = connection, os.getpid()
        return connection

    def advance(self, step: Callable[[float], tuple[float, T]]) -> T:
        """Advances the schedule in one BEGIN IMMEDIATE transaction (one writer at a time)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            query = "SELECT slot FROM pacing WHERE account = ?"
            row = db.execute(query, (self.account,)).fetchone()
            slot, result = step(float(row[0]) if row else 0.0)
            db.execute(
                "INSERT INTO pacing VALUES (?, ?) ON CONFLICT (account) DO UPDATE SET slot = ?",
                (self.account, slot, slot),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result


class PostgresStore:
    """The schedule in a PostgreSQL row shared by every replica (DATABASE_URL, as the ledger).

    The replicas' wall clocks set the slots: NTP keeps them within milliseconds, far less than
    a slot at Stripe's rates; a clock that steps back is caught by MAX_AHEAD_SECONDS.
    """

    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS pacing "
        "(account TEXT PRIMARY KEY, slot DOUBLE PRECISION NOT NULL)"
    )

    def __init__(self, url: str, account: str) -> None:
        self.url = url
        self.account = account
        self._pool: ConnectionPool | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _connections(self) -> ConnectionPool:
        """This process's pool, opened after gunicorn forks (a pool does not survive a fork)."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                pool = ConnectionPool(self.url, min_size=1, max_size=4, timeout=2.0, open=True)
                with pool.connection() as db:
                    db.execute(self.SCHEMA)
                    db.execute(
                        "INSERT INTO pacing VALUES (%s, 0) ON CONFLICT (account) DO NOTHING",
                        (self.account,),
                    )
                self._pool, self._pid = pool, os.getpid()
            return self._pool

    def advance(self, step: Callable[[float], tuple[float, T]]) -> T:
        """Advances the schedule under the row lock (SELECT ... FOR UPDATE), in one transaction."""
        with self._connections().connection() as db, db.transaction():
            query = "SELECT slot FROM pacing WHERE account = %s FOR UPDATE"
            row = db.execute(query, (self.account,)).fetchone()
            slot, result = step(float(row[0]) if row else 0.0)
            db.execute("UPDATE pacing SET slot = %s WHERE account = %s", (slot, self.account))
        return result

    def close(self) -> None:
        """Closes this process's pool."""
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None


def reserve(slot: float, now: float, rate: float, max_wait: float) -> tuple[float, float | None]:
    """One request's turn: (the new next free slot, seconds to wait), or (slot, None) when the
    turn would come after max_wait, in which case nothing is taken."""
    if slot > now + MAX_AHEAD_SECONDS:
        slot = now
    start = max(slot, now)
    if start > now and start - now > max_wait:  # a turn due now is the attempt's own to judge
        return slot, None
    return start + 1.0 / rate, start - now


def pause(slot: float, now: float) -> tuple[float, None]:
    """The schedule after a 429: no slot before the pause has passed."""
    return max(slot, now + RATE_LIMITED_PAUSE_SECONDS), None


class Pacer:
    """The rate budget: every Stripe request waits for its turn, within the attempt's time."""

    def __init__(self, store: PaceStore, rate: float, workers: int = 1) -> None:
        self.store = store
        self.rate = rate
        # If the shared store fails, each of the host's workers paces its own share.
        self._fallback = MemoryStore()
        self._fallback_rate = rate / max(workers, 1)

    def wait_turn(self, time_left: float) -> None:
        """Waits for this request's turn; raises StripeUnavailable (503) at once if the turn comes
        too late for the attempt, so that Svix retries instead of Stripe answering 429."""
        max_wait = time_left - SEND_MARGIN_SECONDS
        wait = self._advance(lambda slot, rate: reserve(slot, time.time(), rate, max_wait))
        if wait is None:
            RATE_BUDGET_REFUSED.inc()
            raise StripeUnavailable(
                f"the Stripe rate budget ({self.rate:g} requests/s, STRIPE_MAX_RATE) has no "
                "room for this write before the attempt's time runs out",
                "Nothing is lost: Svix retries, and windows already written are not sent "
                "again. If this is frequent, set Svix endpoint throttling as "
                "docs/performance.md#sizing-for-svixs-fan-out says.",
            )
        if wait > 0:
            time.sleep(wait)

    def slow_down(self) -> None:
        """After a 429 for a rate limit: pushes the schedule back for every worker."""
        self._advance(lambda slot, _rate: pause(slot, time.time()))

    def _advance(self, step: Callable[[float, float], tuple[float, T]]) -> T:
        """Advances the shared schedule at the whole rate; if its store fails, this process's own
        at its share."""
        try:
            return self.store.advance(lambda slot: step(slot, self.rate))
        except (sqlite3.Error, psycopg.Error, OSError) as error:
            log_event("rate budget store unavailable", logging.WARNING, error=str(error))
            return self._fallback.advance(lambda slot: step(slot, self._fallback_rate))


def default_rate(api_key: str) -> float:
    """The budget for a key's mode when STRIPE_MAX_RATE is not set."""
    live = api_key.startswith(("sk_live_", "rk_live_"))
    return DEFAULT_LIVE_RATE if live else DEFAULT_TEST_RATE


def budget_account(api_key: str) -> str:
    """Whose schedule it is: a hash of the key, never the key. A rotated key of the same account
    starts a schedule of its own, for as long as workers with the old key run."""
    return hashlib.sha256(b"stripe-rate-budget\n" + api_key.encode()).hexdigest()[:24]


def pacing_path(state_path: str) -> str:
    """Where the host's schedule lives: beside the ledger."""
    return os.path.join(os.path.dirname(os.path.abspath(state_path)), "pacing.sqlite3")


def make_pacer(settings: Settings) -> Pacer:
    """The budget shared where the ledger is: a PostgreSQL row for replicas (DATABASE_URL), else a
    SQLite file beside the ledger for the host's workers; one schedule per account (a hash of
    the key)."""
    account = budget_account(settings.stripe_api_key)
    store: PaceStore
    if settings.database_url:
        store = PostgresStore(settings.database_url, account)
    else:
        store = SQLiteStore(pacing_path(settings.state_path), account)
    return Pacer(store, settings.stripe_max_rate, settings.workers)
