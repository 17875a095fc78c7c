"""The ledger's interface, the same tests against both backends: SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from bridge.budget import time_budget
from bridge.errors import LedgerUnavailable, StripeUnavailable
from bridge.ledger import Ledger, Message
from bridge.ledger_postgres import CONNECT_SECONDS, POOL_SIZE, PostgresLedger
from bridge.ledger_sqlite import SqliteLedger
from bridge.planning import Write
from bridge.quantities import Quantity
from bridge.report import Window
from bridge.targets import Claim
from tests.harness import PROJECT, failures_at_once

PLACE = "usage_records/si_1"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(kind, where): a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "ledger.sqlite3")
    else:
        yield "postgres", request.getfixturevalue("postgres_url")


def open_backend(kind: str, where: str) -> Ledger:
    """A ledger of that kind."""
    return SqliteLedger(where) if kind == "sqlite" else PostgresLedger(where)


@pytest.fixture
def ledger(backend: tuple[str, str]) -> Iterator[Ledger]:
    """A fresh ledger of each kind."""
    ledger = open_backend(*backend)
    yield ledger
    if isinstance(ledger, PostgresLedger):
        ledger.close()  # its pool's threads end here, not in a garbage collection


def write(hour: int, value: int, message: str = "msg") -> Write:
    """A usage record for the hour-long window starting `hour` hours after 2026-11-01."""
    start = datetime(2026, 11, 1, hour, tzinfo=UTC)
    window = Window(start, start.replace(hour=hour + 1), Decimal(value))
    stamp = int(start.timestamp()) + 1
    return Write(window, stamp, Quantity(value), f"{message}:si_1:{stamp}:{value}")


def test_first_sight_is_recorded_once_with_the_senders_first_timestamp(ledger: Ledger) -> None:
    first = ledger.begin("msg_1", 1000.0)
    again = ledger.begin("msg_1", 2000.0)
    assert again.first_seen == first.first_seen and again.first_sent == 1000.0
    assert first.first_attempt and not again.first_attempt  # only the first has written nowhere
    assert again.written_as is None
    ledger.record(Message("msg_1", "d1", first.first_seen), True, PLACE, [write(0, 5, "msg_1")])
    assert ledger.begin("msg_1", 3000.0).written_as == "d1"
    ledger.record(Message("msg_1", "d2", first.first_seen), False, PLACE, [])  # another body
    assert ledger.begin("msg_1", None).written_as is None


def test_a_newer_message_wins_whichever_order_they_write_in(ledger: Ledger) -> None:
    old = Message("msg_old", "d", ledger.begin("msg_old", None).first_seen)
    time.sleep(0.01)
    new = Message("msg_new", "d", ledger.begin("msg_new", None).first_seen)
    assert new.first_seen > old.first_seen
    ledger.record(new, True, PLACE, [write(0, 7, "msg_new"), write(1, 7, "msg_new")])
    pending = ledger.pending([write(0, 5, "msg_old"), write(2, 5, "msg_old")], PLACE, False, old)
    assert [w.timestamp for w in pending.writes] == [write(2, 5).timestamp]
    assert pending.superseded == 1
    # In the other order the newer one overwrites: the older one's record does not stop it.
    ledger.record(old, True, PLACE, [write(3, 5, "msg_old")])
    assert ledger.pending([write(3, 7, "msg_new")], PLACE, False, new).writes == [
        write(3, 7, "msg_new")
    ]


def test_done_writes_are_skipped_and_a_raw_meters_window_kept(ledger: Ledger) -> None:
    first = Message("msg_a", "d", ledger.begin("msg_a", None).first_seen)
    ledger.record(first, False, PLACE, [write(0, 5, "same")])
    second = Message("msg_b", "d", ledger.begin("msg_b", None).first_seen)
    assert ledger.pending([write(0, 5, "same")], PLACE, False, first).writes == []
    assert ledger.pending([write(0, 5, "same")], PLACE, True, second).kept == 1


def test_a_fresh_key_after_a_5xx_is_used_by_every_later_attempt(ledger: Ledger) -> None:
    message = Message("msg_5xx", "d", ledger.begin("msg_5xx", None).first_seen)
    ledger.replace_key(write(0, 5).key, "fresh-1")
    ledger.replace_key(write(0, 5).key, "fresh-2")
    [pending] = ledger.pending([write(0, 5)], PLACE, False, message).writes
    assert pending.fresh == "fresh-2" and pending.key == write(0, 5).key


def test_a_message_names_the_windows_it_wrote_to_another_place(ledger: Ledger) -> None:
    message = Message("msg_m", "d", ledger.begin("msg_m", None).first_seen)
    ledger.record(message, True, "usage_records/si_old", [write(0, 5, "msg_m")])
    [elsewhere] = ledger.written_elsewhere("msg_m", PLACE)
    assert elsewhere.place == "usage_records/si_old"
    assert elsewhere.timestamp == write(0, 5).timestamp
    assert ledger.written_elsewhere("msg_m", "usage_records/si_old") == []


def test_the_first_claim_holds_until_it_is_mapped_away(ledger: Ledger) -> None:
    a = Claim("cus_1", "mtr_1", "team-a", "sub_a", "calls")
    b = Claim("cus_1", "mtr_1", "team-b", "sub_b", "calls")
    assert ledger.claim(a, lambda held: True) == a
    assert ledger.claim(b, lambda held: True) == a  # b sees a's claim
    assert ledger.claim(a, lambda held: True) == a
    assert ledger.claim(b, lambda held: held != a) == b  # a was mapped away: b takes over
    assert ledger.claim(a, lambda held: True) == b


HOLDER = """
import sys, time
from bridge.ledger_sqlite import SqliteLedger
from bridge.ledger_postgres import CONNECT_SECONDS, POOL_SIZE, PostgresLedger
kind, where = sys.argv[1], sys.argv[2]
ledger = SqliteLedger(where) if kind == "sqlite" else PostgresLedger(where)
with ledger.section("cus_1/mtr_1"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_critical_section_holds_across_processes_and_dies_with_its_holder(
    backend: tuple[str, str], ledger: Ledger
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *backend], cwd=PROJECT, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        with time_budget(0.5), pytest.raises(StripeUnavailable), ledger.section("cus_1/mtr_1"):
            pass  # another process holds it: the wait ends with the budget
        with time_budget(5), ledger.section("cus_1/mtr_2"):
            pass  # another object's section is free
    finally:
        holder.send_signal(signal.SIGKILL)  # killed while holding it
        holder.wait(timeout=30)
    with time_budget(10), ledger.section("cus_1/mtr_1"):
        pass  # the kernel (or the server) let go of the dead holder's lock


def test_a_wait_for_a_pooled_connection_ends_with_the_time_budget(postgres_url: str) -> None:
    ledger = PostgresLedger(postgres_url)
    try:
        with ExitStack() as sections:
            for n in range(POOL_SIZE):  # every connection of the pool held by a section
                sections.enter_context(ledger.section(f"cus_{n}/mtr_1"))
            started = time.monotonic()
            with time_budget(0.1), pytest.raises(LedgerUnavailable):
                ledger.begin("msg_waits", None)
            # Not the pool's own CONNECT_SECONDS: the webhook's answer must reach Svix in time.
            assert time.monotonic() - started < CONNECT_SECONDS
    finally:
        ledger.close()


def test_a_worker_starting_beside_a_busy_sqlite_ledger_reads_without_its_write_lock(
    tmp_path: Path,
) -> None:
    """A worker's first connection checks the schema by reading: while another worker holds
    SQLite's write lock (for longer than the one-second wait a connection starts with), a fresh
    ledger still answers a read. It once took the write lock for every thread's first connection,
    and a fresh start's 32 threads answered 'database is locked'."""
    path = str(tmp_path / "ledger.sqlite3")
    SqliteLedger(path).begin("msg_a", None)  # the schema exists
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another worker's transaction
    try:
        assert SqliteLedger(path).written_elsewhere("msg_a", PLACE) == []
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def first_sights(path: str, threads: int) -> int:
    """A fresh worker: `threads` threads whose first ledger call comes at once; how many failed."""
    ledger = SqliteLedger(path)
    return failures_at_once(
        lambda n: ledger.begin(f"msg_{os.getpid()}_{n}", None), threads, LedgerUnavailable
    )


def test_a_fresh_start_of_two_workers_with_16_threads_each_opens_the_sqlite_ledger(
    tmp_path: Path,
) -> None:
    """Every first connection of a fresh start, on a file no one made yet, gets through: making the
    file WAL and its schema waits for the one that does it. 'database is locked' came back to some
    of 32 threads before (seen in make bench's ledger_cost), even with a long busy timeout: two
    connections that make a fresh file WAL at once deadlock, and SQLite does not wait then."""
    # Spawned, not forked: a fork of the test process could copy a lock another thread holds.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for trial in range(10):
            path = str(tmp_path / f"ledger{trial}.sqlite3")
            assert pool.starmap(first_sights, [(path, 16), (path, 16)], chunksize=1) == [0, 0]
