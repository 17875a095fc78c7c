"""The rate budget's schedule: turns, refusals, pauses, and one schedule shared by processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from bridge.pacing import (
    DEFAULT_LIVE_RATE,
    DEFAULT_TEST_RATE,
    MAX_AHEAD_SECONDS,
    RATE_LIMITED_PAUSE_SECONDS,
    MemoryStore,
    SQLiteStore,
    default_rate,
    pause,
    reserve,
)
from bridge.settings import settings_from_env
from tests.harness import failures_at_once

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_turns_are_one_over_the_rate_apart() -> None:
    slot, waits = 0.0, []
    for _ in range(5):
        slot, wait = reserve(slot, 100.0, 4.0, 10.0)
        waits.append(wait)
    assert waits == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert slot == 101.25


def test_an_idle_schedule_gives_the_next_request_its_turn_at_once() -> None:
    assert reserve(50.0, 100.0, 4.0, 10.0) == (100.25, 0.0)


def test_a_turn_after_max_wait_is_refused_and_takes_nothing() -> None:
    assert reserve(103.0, 100.0, 4.0, 2.9) == (103.0, None)
    assert reserve(103.0, 100.0, 4.0, 3.0) == (103.25, 3.0)


def test_a_turn_due_now_is_given_however_little_time_is_left() -> None:
    # call_stripe decides whether a request still fits; the budget only refuses to wait.
    assert reserve(50.0, 100.0, 4.0, -0.3) == (100.25, 0.0)


def test_a_slot_too_far_ahead_means_the_clock_stepped_back() -> None:
    assert reserve(100.0 + MAX_AHEAD_SECONDS + 1, 100.0, 4.0, 1.0) == (100.25, 0.0)


def test_a_rate_limited_answer_pauses_the_schedule_once() -> None:
    slot, _ = pause(0.0, 100.0)
    assert slot == 100.0 + RATE_LIMITED_PAUSE_SECONDS
    assert pause(slot, 100.0)[0] == slot  # several 429s at once do not add up
    assert reserve(slot, 100.0, 4.0, 10.0)[1] == RATE_LIMITED_PAUSE_SECONDS


@pytest.mark.parametrize(
    ("key", "rate"),
    [
        ("sk_live_abc", DEFAULT_LIVE_RATE),
        ("rk_live_abc", DEFAULT_LIVE_RATE),
        ("sk_test_abc", DEFAULT_TEST_RATE),
        ("rk_test_abc", DEFAULT_TEST_RATE),
    ],
)
def test_the_default_budget_is_below_stripes_limit_for_the_keys_mode(key: str, rate: float) -> None:
    assert default_rate(key) == rate
    settings = settings_from_env({"STRIPE_API_KEY": key, "OPENMETER_WEBHOOK_SECRET": SECRET})
    assert settings.stripe_max_rate == rate
    assert rate < (100 if "live" in key else 25)  # docs.stripe.com/rate-limits


def test_stripe_max_rate_overrides_the_default() -> None:
    env = {"STRIPE_API_KEY": "sk_live_a", "OPENMETER_WEBHOOK_SECRET": SECRET}
    assert settings_from_env(env | {"STRIPE_MAX_RATE": "250.5"}).stripe_max_rate == 250.5


@pytest.mark.parametrize("value", ["0", "-1", "fast", "1e3", "0.05"])
def test_a_bad_stripe_max_rate_is_refused_by_name(value: str) -> None:
    env = {"STRIPE_API_KEY": "sk_test_a", "OPENMETER_WEBHOOK_SECRET": SECRET}
    with pytest.raises(Exception, match="STRIPE_MAX_RATE must be"):
        settings_from_env(env | {"STRIPE_MAX_RATE": value})


def _take(path: str, count: int, queue: multiprocessing.Queue[float]) -> None:
    """Takes `count` turns from the shared file at a fixed clock, reporting each wait."""
    store = SQLiteStore(path, "acct")
    for _ in range(count):
        wait = store.advance(lambda slot: reserve(slot, 1000.0, 10.0, 1e9))
        assert wait is not None
        queue.put(wait)


def test_processes_sharing_the_file_never_get_the_same_turn(tmp_path: Path) -> None:
    path = str(tmp_path / "pacing.sqlite3")
    queue: multiprocessing.Queue[float] = multiprocessing.Queue()
    workers = [
        multiprocessing.get_context("fork").Process(target=_take, args=(path, 25, queue))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    waits = sorted(round(queue.get(timeout=60), 6) for _ in range(100))
    for worker in workers:
        worker.join(timeout=60)
    assert waits == [round(n / 10.0, 6) for n in range(100)]


def _first_turns(path: str, threads: int) -> int:
    """A fresh worker: `threads` threads whose first turn comes at once; how many failed."""
    store = SQLiteStore(path, "acct")
    return failures_at_once(
        lambda _: store.advance(lambda slot: reserve(slot, 1000.0, 10.0, 1e9)),
        threads,
        sqlite3.Error,
    )


def test_a_fresh_start_of_four_workers_opens_the_shared_file_without_locked_errors(
    tmp_path: Path,
) -> None:
    """Making a fresh file WAL waits for whoever does it: without the setup lock about a quarter
    of these trials had a thread answered 'database is locked' at once (and the test above
    lost a worker about once in 200 runs)."""
    # Spawned, not forked: a fork of the test process could copy a lock another thread holds.
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        for trial in range(100):
            path = str(tmp_path / f"pacing{trial}.sqlite3")
            assert pool.starmap(_first_turns, [(path, 4)] * 4, chunksize=1) == [0] * 4, trial


def test_each_account_has_its_own_schedule(tmp_path: Path) -> None:
    path = str(tmp_path / "pacing.sqlite3")
    one, other = SQLiteStore(path, "one"), SQLiteStore(path, "other")
    assert one.advance(lambda slot: reserve(slot, 5.0, 1.0, 9.0)) == 0.0
    assert one.advance(lambda slot: reserve(slot, 5.0, 1.0, 9.0)) == 1.0
    assert other.advance(lambda slot: reserve(slot, 5.0, 1.0, 9.0)) == 0.0


def test_the_memory_store_keeps_one_schedule() -> None:
    store = MemoryStore()
    assert [store.advance(lambda slot: reserve(slot, 0.0, 2.0, 9.0)) for _ in range(3)] == [
        0.0,
        0.5,
        1.0,
    ]
