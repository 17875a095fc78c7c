"""One truth for every worker and replica: gunicorn's two workers on one SQLite ledger, and two
gunicorn "replicas" on one PostgreSQL, each as production runs it (the Dockerfile's CMD)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app import create_app
from tests.conftest import Billing, Service, deliver, serving
from tests.fake_stripe import FakeStripe
from tests.harness import hours_ago, report
from tests.harness import wait_until as wait
from tests.postgres import PostgresServer

CONFIG = """\
meters:
  api_requests: price_1Api
  calls: price_1Calls
subjects:
  customer-1: sub_1Customer1
  customer-5a: sub_1Team5a
  customer-5b: sub_1Team5b
"""
TRIALS = 8


@pytest.fixture
def shared(stripe_fake: FakeStripe, billing: Billing, config_path: Path) -> Billing:
    """Two subjects' subscriptions on one customer, with an hourly (pre-aggregated) meter."""
    stripe_fake.add_meter("mtr_1Calls", event_name="calls", event_time_window="hour")
    stripe_fake.add_price("price_1Calls", aggregate_usage=None, meter="mtr_1Calls")
    stripe_fake.add_customer("cus_5")
    for team in ("sub_1Team5a", "sub_1Team5b"):
        stripe_fake.add_subscription(team, customer="cus_5", prices=["price_1Calls"])
    config_path.write_text(CONFIG)
    return billing


def at_once(*calls: Callable[[], tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Runs the calls together (each in its thread); their results, in order."""
    results: list[tuple[int, Any]] = [(0, None)] * len(calls)
    go = threading.Barrier(len(calls))

    def run(index: int) -> None:
        """One call, released with the others."""
        go.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def old_retry_and_new_correction(
    stripe_fake: FakeStripe, item: str, first: Service, second: Service, trial: int
) -> None:
    """OLD (5 a window) is seen and fails; NEW (7) arrives with OLD's retry: 7 stands."""
    start = hours_ago(400 - 7 * trial)
    old, new = report([5] * 6, first=start), report([7] * 6, first=start)
    stripe_fake.inject("500", path="/usage_records", count=None, probability=1.0)
    status, answer = first.deliver(old, f"msg_old{trial}")
    assert status == 503, answer
    stripe_fake.clear_faults()
    results = at_once(
        lambda: first.deliver(new, f"msg_new{trial}"),
        lambda: second.deliver(old, f"msg_old{trial}"),
    )
    assert [status for status, _ in results] == [200, 200], results
    stamps = [int((start + timedelta(hours=h)).timestamp()) + 1 for h in range(6)]
    records = stripe_fake.usage_records(item)
    assert [records.get(stamp) for stamp in stamps] == [7] * 6, (trial, results)


def test_old_retry_and_new_correction_at_once_in_two_workers(
    environment: dict[str, str], stripe_fake: FakeStripe, shared: Billing, tmp_path: Path
) -> None:
    with serving(environment, tmp_path / "gunicorn.log") as service:
        service.deliver(report([1], first=hours_ago(500)), "msg_warm")
        stripe_fake.latency = 0.02  # each attempt's six writes overlap the other's
        apart = trial = 0  # apart: trials whose two messages two different workers took
        while trial < TRIALS or (apart < 3 and trial < 5 * TRIALS):
            old_retry_and_new_correction(stripe_fake, shared.api, service, service, trial)
            both = service.webhook_pids(f"msg_new{trial}") | service.webhook_pids(f"msg_old{trial}")
            apart += len(both) == 2
            trial += 1
        assert apart >= 3, f"only {apart} of {trial} trials ran in two workers"


def two_subjects_on_one_customers_meter(first: Service, second: Service) -> None:
    """Once customer-5a is written, every delivery of customer-5b, anywhere, is 422."""
    start = hours_ago(5)
    event = report([3], subject="customer-5a", meter="calls", first=start)
    status, answer = first.deliver(event, "msg_5a")
    assert status == 200, answer
    other = report([4], subject="customer-5b", meter="calls", first=start)
    attempt = 0  # at least 12 deliveries, and until both workers have answered (at most 100)
    while attempt < 12 or (
        first is second and len(first.webhook_pids("msg_5b")) < 2 and attempt < 100
    ):
        status, answer = (first, second)[attempt % 2].deliver(other, "msg_5b")
        assert status == 422 and answer["error"] == "shared_customer", answer
        assert answer["subjects"] == ["customer-5a", "customer-5b"]
        attempt += 1


def test_two_subjects_on_one_customers_meter_are_422_in_every_worker(
    environment: dict[str, str], stripe_fake: FakeStripe, shared: Billing, tmp_path: Path
) -> None:
    with serving(environment, tmp_path / "gunicorn.log") as service:
        two_subjects_on_one_customers_meter(service, service)
        assert len(service.webhook_pids("msg_5b")) == 2  # both workers refused it
    assert [e["payload"]["value"] for e in stripe_fake.meter_events()] == ["3"]


@pytest.fixture
def replicas(
    environment: dict[str, str], shared: Billing, postgres_url: str, tmp_path: Path
) -> Iterator[tuple[Service, Service]]:
    """Two replicas (two gunicorn masters, two workers each) on one PostgreSQL ledger."""
    env = environment | {"DATABASE_URL": postgres_url}
    with (
        serving(env | {"STATE_PATH": str(tmp_path / "a.sqlite3")}, tmp_path / "a.log") as a,
        serving(env | {"STATE_PATH": str(tmp_path / "b.sqlite3")}, tmp_path / "b.log") as b,
    ):
        yield a, b
    assert not list(tmp_path.glob("*.sqlite3"))  # neither replica kept a ledger of its own


def test_old_retry_and_new_correction_at_once_in_two_replicas_on_postgresql(
    replicas: tuple[Service, Service], stripe_fake: FakeStripe, shared: Billing
) -> None:
    a, b = replicas
    a.deliver(report([1], first=hours_ago(500)), "msg_warm")
    b.deliver(report([1], first=hours_ago(500)), "msg_warm")
    stripe_fake.latency = 0.02
    for trial in range(TRIALS):
        first, second = (a, b) if trial % 2 else (b, a)
        old_retry_and_new_correction(stripe_fake, shared.api, first, second, trial)


def test_two_subjects_on_one_customers_meter_are_422_in_every_replica(
    replicas: tuple[Service, Service], stripe_fake: FakeStripe
) -> None:
    two_subjects_on_one_customers_meter(*replicas)
    assert [e["payload"]["value"] for e in stripe_fake.meter_events()] == ["3"]


def test_a_redelivery_to_the_other_replica_is_already_written(
    replicas: tuple[Service, Service], stripe_fake: FakeStripe, shared: Billing
) -> None:
    a, b = replicas
    event = report([2, 3])
    assert a.deliver(event, "msg_moved")[0] == 200
    posted = len([r for r in stripe_fake.requests if r.method == "POST"])
    status, answer = b.deliver(event, "msg_moved")
    assert status == 200 and answer["outcome"] == "already_written"
    assert len([r for r in stripe_fake.requests if r.method == "POST"]) == posted


def test_postgresql_stopped_is_503_and_nothing_written_then_written_once(
    environment: dict[str, str],
    stripe_fake: FakeStripe,
    billing: Billing,
    postgres_url: str,
    postgres_server: PostgresServer,
) -> None:
    url = postgres_url.replace("postgres@", "postgres:s3cret-pw@")  # trust: any password works
    client = create_app(environment | {"DATABASE_URL": url}).test_client()
    assert deliver(client, report([1], first=hours_ago(30)), "msg_warm").status_code == 200
    posted = len([r for r in stripe_fake.requests if r.method == "POST"])
    postgres_server.stop()
    try:
        for _ in range(2):
            response = deliver(client, report([4]), "msg_down")
            assert response.status_code == 503 and response.json is not None
            assert response.json["error"] == "ledger_unavailable", response.json
            assert "s3cret-pw" not in json.dumps(response.json)
        assert len([r for r in stripe_fake.requests if r.method == "POST"]) == posted
    finally:
        postgres_server.start()
    answers: list[int] = []  # Svix's next attempts: 503 until the pool reconnects, then 200

    def retried() -> bool:
        """One more attempt; True once it is written."""
        response = deliver(client, report([4]), "msg_down")
        answers.append(response.status_code)
        assert response.status_code in (200, 503), response.json
        return response.status_code == 200

    wait(retried, timeout=60)
    again = deliver(client, report([4]), "msg_down")
    assert again.json is not None and again.json["outcome"] == "already_written"
    assert len([r for r in stripe_fake.requests if r.method == "POST"]) == posted + 1
    assert stripe_fake.usage_total(billing.api) == 1 + 4
