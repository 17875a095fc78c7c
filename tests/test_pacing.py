"""The Stripe rate budget end to end: the fake's rate limit, writes paced under it and shared by
the workers, an early 503 when the budget cannot serve an attempt, 429s counted and slowing."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import stripe
from flask import Flask
from prometheus_client import REGISTRY

from app import create_app
from bridge.pacing import PostgresStore, pacing_path, reserve
from tests.conftest import API_KEY, Billing, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import PROJECT, hours_ago, report


def answer(response: Any) -> dict[str, Any]:
    """A test client response's JSON body."""
    body = response.json
    assert isinstance(body, dict)
    return body


def minutes(values: list[int], hours: int = 30) -> dict[str, Any]:
    """A report of one-minute windows, far enough back to be in the current period."""
    return report(values, first=hours_ago(hours), size=timedelta(minutes=1))


def refused(fake: FakeStripe) -> int:
    """How many requests the fake's rate limit answered 429."""
    return fake.rate_limit.refused if fake.rate_limit else 0


def count_429(reason: str) -> float:
    """This process's bridge_stripe_429_total for a reason."""
    return REGISTRY.get_sample_value("bridge_stripe_429_total", {"reason": reason}) or 0.0


def pacing_app(environment: dict[str, str], rate: str, **extra: str) -> Flask:
    """The service with a given STRIPE_MAX_RATE."""
    return create_app(environment | {"STRIPE_MAX_RATE": rate, **extra})


# --- the fake's rate limit ----------------------------------------------------------------------


def test_the_fake_answers_stripes_429_with_the_reason_beyond_its_rate(
    stripe_fake: FakeStripe, billing: Billing
) -> None:
    stripe_fake.limit_rate(5, burst=5)
    client = stripe.StripeClient(API_KEY, base_addresses={"api": stripe_fake.url})
    errors: list[stripe.RateLimitError] = []
    for _ in range(12):
        try:
            client.v1.prices.retrieve("price_1Api")
        except stripe.RateLimitError as error:
            errors.append(error)
    assert len(errors) >= 6 and refused(stripe_fake) == len(errors)
    first = errors[0]
    assert first.http_status == 429 and first.error is not None
    assert first.error.code == "rate_limit"
    assert (first.headers or {}).get("Stripe-Rate-Limited-Reason") == "global-rate"


def test_a_rate_limited_write_is_not_saved_under_its_idempotency_key(
    stripe_fake: FakeStripe, billing: Billing
) -> None:
    stripe_fake.limit_rate(1, burst=1)
    client = stripe.StripeClient(API_KEY, base_addresses={"api": stripe_fake.url})
    client.v1.prices.retrieve("price_1Api")  # the one token
    path = f"/v1/subscription_items/{billing.api}/usage_records"
    timestamp = int(hours_ago(2).timestamp())
    params: dict[str, Any] = {"quantity": 3, "timestamp": timestamp, "action": "set"}

    def write() -> Any:
        return client.raw_request(
            "post", path, **params, idempotency_key="k1", stripe_version="2025-02-24.acacia"
        )

    with pytest.raises(stripe.RateLimitError):
        write()
    stripe_fake.limit_rate(None)
    write()
    assert stripe_fake.usage_total(billing.api) == 3


# --- writes wait for the budget ------------------------------------------------------------------


def test_writes_wait_for_the_budget_and_stay_under_stripes_limit(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    stripe_fake.limit_rate(10)
    client = pacing_app(environment, "8").test_client()
    started = time.monotonic()
    response = deliver(client, minutes(list(range(1, 25))), "msg_paced")
    assert response.status_code == 200, response.json
    assert refused(stripe_fake) == 0
    assert stripe_fake.usage_total(billing.api) == sum(range(1, 25))
    assert time.monotonic() - started >= 23 / 8  # 24 writes, one every 1/8 s


def test_the_budget_is_shared_by_every_worker(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    # Two apps are two workers: each has its own Stripe client, pacer and SQLite connections,
    # and only the file beside the ledger in common (tests/unit/test_pacing.py forks processes).
    stripe_fake.limit_rate(12)
    workers = [pacing_app(environment, "10") for _ in range(2)]
    subjects = ["customer-1", "acme"]

    def send(number: int) -> int:
        event = report(
            list(range(1, 9)), subject=subjects[number % 2], first=hours_ago(20 + number),
            size=timedelta(minutes=1),
        )  # fmt: skip
        client = workers[number // 4].test_client()
        return deliver(client, event, f"msg_shared_{number}").status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, range(8)))
    assert statuses == [200] * 8
    assert refused(stripe_fake) == 0
    assert stripe_fake.usage_total(billing.api) + stripe_fake.usage_total(billing.acme_api) == (
        8 * sum(range(1, 9))
    )


# --- an attempt the budget cannot serve ----------------------------------------------------------


def test_a_report_the_budget_cannot_serve_in_time_answers_503_early_and_resumes(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    stripe_fake.limit_rate(5)
    client = pacing_app(environment, "4", TIME_BUDGET_SECONDS="3").test_client()
    event = minutes(list(range(1, 21)))
    first = deliver(client, event, "msg_early")
    assert first.status_code == 503
    body = answer(first)
    assert body["error"] == "stripe_unavailable" and "STRIPE_MAX_RATE" in body["message"]
    assert body["written"] >= 1 and body["written"] + body["remaining"] == 20
    statuses = [503]
    while statuses[-1] != 200 and len(statuses) < 10:
        statuses.append(deliver(client, event, "msg_early").status_code)
    assert statuses[-1] == 200
    assert refused(stripe_fake) == 0
    assert stripe_fake.usage_total(billing.api) == sum(range(1, 21))
    writes = [r for r in stripe_fake.requests if r.path.endswith("/usage_records")]
    # Each window sent once, progress kept between attempts; only a write whose answer an
    # attempt's end cut off (a stall of over SEND_MARGIN_SECONDS) may go again, under its key.
    assert 20 <= len(writes) < 20 + len(statuses), len(writes)


# --- Stripe's 429s -------------------------------------------------------------------------------


def test_a_rate_limited_answer_is_counted_retried_and_pauses_the_budget(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    client = pacing_app(environment, "1000").test_client()
    assert deliver(client, minutes([1]), "msg_warm").status_code == 200  # subscription cached
    before = count_429("global-rate")
    stripe_fake.inject("429_rate", path="usage_records", count=1)
    started = time.monotonic()
    response = deliver(client, minutes([5], hours=10), "msg_limited")
    assert response.status_code == 200, response.json
    assert time.monotonic() - started >= 1.0  # the budget's pause, not only call_stripe's 0.5 s
    assert count_429("global-rate") == before + 1
    assert stripe_fake.usage_total(billing.api) == 6


def test_a_lock_timeout_is_counted_without_a_reason(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    client = pacing_app(environment, "1000").test_client()
    before = count_429("none")
    stripe_fake.inject("429_lock", path="usage_records", count=1)
    assert deliver(client, minutes([2]), "msg_locked").status_code == 200
    assert count_429("none") == before + 1


# --- sizing ---------------------------------------------------------------------------------------


def test_check_config_prints_the_sizing_for_the_config_and_stripe_max_rate(
    app: Flask, config_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRIPE_MAX_RATE", "50")
    runner = app.test_cli_runner()
    result = runner.invoke(args=["check-config", str(config_path), "--windows", "24"])
    assert result.exit_code == 0, result.output
    # The tests' config: 3 subjects x 4 meters, each reporting 24 windows at once.
    assert "STRIPE_MAX_RATE 50/s, 12 reports (subjects x meters) of 24 windows" in result.output
    assert "one wave of attempts writes at most 575 windows" in result.output
    assert "Svix endpoint throttle: 1.88 messages/s" in result.output


def test_the_fanout_bench_smoke_run_loses_and_doubles_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.fanout", "--smoke"],
        cwd=PROJECT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("0/0") == 2, result.stdout  # lost/doubled, both scenarios


def test_replicas_sharing_a_postgresql_row_never_get_the_same_turn(postgres_url: str) -> None:
    # Two replicas, two pools; and another account's row beside theirs.
    stores = [PostgresStore(postgres_url, "acct") for _ in range(2)]
    other = PostgresStore(postgres_url, "other")
    try:
        other.advance(lambda s: reserve(s, 1000.0, 10.0, 1e9))

        def take(store: PostgresStore) -> list[float | None]:
            return [store.advance(lambda s: reserve(s, 1000.0, 10.0, 1e9)) for _ in range(20)]

        with ThreadPoolExecutor(4) as threads:
            waits = [w for found in threads.map(take, stores * 2) for w in found]
        assert sorted(round(w or 0.0, 6) for w in waits) == [round(n / 10, 6) for n in range(80)]
    finally:
        for store in [*stores, other]:
            store.close()


def test_writes_are_paced_through_the_postgresql_ledgers_database(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing, postgres_url: str
) -> None:
    stripe_fake.limit_rate(10)
    replicas = [pacing_app(environment, "8", DATABASE_URL=postgres_url) for _ in range(2)]

    def send(number: int) -> int:
        event = minutes(list(range(1, 13)), hours=20 + number)
        client = replicas[number % 2].test_client()
        return deliver(client, event, f"msg_pg_{number}").status_code

    with ThreadPoolExecutor(2) as threads:
        assert list(threads.map(send, range(2))) == [200, 200]
    assert refused(stripe_fake) == 0
    assert stripe_fake.usage_total(billing.api) == 2 * sum(range(1, 13))


class Records(logging.Handler):
    """Keeps the bridge's log records (whatever handlers configure_logging left)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keeps the message."""
        self.messages.append(record.getMessage())


def test_a_broken_budget_store_falls_back_to_the_process_own(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    # A folder where the budget's file should be: the ledger beside it works, the budget cannot.
    Path(pacing_path(environment["STATE_PATH"])).mkdir(parents=True)
    app = pacing_app(environment, "1000")
    records = Records()
    logging.getLogger("bridge").addHandler(records)
    try:
        assert deliver(app.test_client(), minutes([4]), "msg_nostore").status_code == 200
    finally:
        logging.getLogger("bridge").removeHandler(records)
    assert stripe_fake.usage_total(billing.api) == 4
    assert "rate budget store unavailable" in records.messages
