"""The ledger of accepted writes: resumption, cheap redeliveries, ordering; never the truth."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from app import create_app
from bridge.ledger import Message
from bridge.ledger_sqlite import SqliteLedger
from tests.conftest import Billing, Service, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import hours_ago, report


@pytest.fixture
def service_env() -> dict[str, str]:
    """A short budget, so that a large report needs several attempts."""
    return {"TIME_BUDGET_SECONDS": "2"}


def test_exact_redelivery_of_a_written_message_costs_no_stripe_call(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    event = report([4, 5])
    assert deliver(client, event, "msg_done").status_code == 200
    calls = len(stripe_fake.requests)
    again = deliver(client, event, "msg_done")
    assert again.status_code == 200
    assert again.json is not None and again.json["outcome"] == "already_written"
    assert len(stripe_fake.requests) == calls


def test_same_id_with_another_body_is_not_taken_as_written(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    first = hours_ago(5)
    assert deliver(client, report([4], first=first), "msg_reused").status_code == 200
    again = deliver(client, report([7], first=first), "msg_reused")
    assert again.json is not None and again.json["outcome"] == "written"
    assert stripe_fake.usage_total(billing.api) == 7


def test_late_retry_of_an_old_report_does_not_undo_a_newer_correction(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    first = hours_ago(6)
    deliver(client, report([1], first=hours_ago(20)), "msg_warm")
    stripe_fake.inject("500", path="/usage_records", count=None, probability=1.0)
    assert deliver(client, report([10], first=first), "msg_old").status_code == 503
    stripe_fake.clear_faults()
    assert deliver(client, report([12], first=first), "msg_new").status_code == 200
    late = deliver(client, report([10], first=first), "msg_old")  # Svix's retry of the old one
    assert late.status_code == 200
    assert late.json is not None and late.json["skipped"] == 1
    assert stripe_fake.usage_total(billing.api) == 1 + 12


def test_deleting_the_ledger_keeps_everything_correct(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    state = Path(environment["STATE_PATH"])
    client = create_app(environment | {"TIME_BUDGET_SECONDS": "1"}).test_client()
    deliver(client, report([1], first=hours_ago(40)), "msg_warm")
    stripe_fake.latency = 0.3
    assert deliver(client, report([2] * 8), "msg_cut").status_code == 503
    stripe_fake.latency = 0
    time.sleep(0.5)
    for leftover in state.parent.glob(state.name + "*"):
        leftover.unlink()
    fresh = create_app(environment).test_client()  # as after a restart, with no ledger left
    assert deliver(fresh, report([2] * 8), "msg_cut").status_code == 200
    assert deliver(fresh, report([2] * 8), "msg_cut").status_code == 200
    assert stripe_fake.usage_total(billing.api) == 1 + 16


def test_an_unwritable_ledger_answers_503_writes_nothing_and_once_back_writes_once(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing, tmp_path: Path
) -> None:
    blocker = tmp_path / "state-volume"
    blocker.write_text("")  # where the ledger's folder should be: it cannot be made
    env = environment | {"STATE_PATH": str(blocker / "bridge.sqlite3")}
    client = create_app(env).test_client()
    for _ in range(2):
        refused = deliver(client, report([3]), "msg_a")
        assert refused.status_code == 503 and refused.json is not None
        assert refused.json["error"] == "ledger_unavailable", refused.json
        assert "Svix retries" in refused.json["hint"]
    assert not [r for r in stripe_fake.requests if r.method == "POST"]  # nothing written
    blocker.unlink()  # the volume is back
    assert deliver(client, report([3]), "msg_a").status_code == 200
    again = deliver(client, report([3]), "msg_a")
    assert again.json is not None and again.json["outcome"] == "already_written"
    assert len([r for r in stripe_fake.requests if r.method == "POST"]) == 1
    assert stripe_fake.usage_total(billing.api) == 3


def test_an_empty_state_path_is_refused_at_start(environment: dict[str, str]) -> None:
    app = create_app(environment | {"STATE_PATH": ""})
    [problem] = app.extensions["problems"]
    assert problem.startswith("STATE_PATH is empty") and "DATABASE_URL" in problem


def test_entries_expire_after_48_hours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = SqliteLedger(str(tmp_path / "ledger.sqlite3"))
    seen = ledger.begin("msg_old", None)
    ledger.record(Message("msg_old", "digest", seen.first_seen), True, "usage_records/si_1", ())
    seen = ledger.begin("msg_old", None)
    assert seen.written_as == "digest" and abs(seen.first_seen - time.time()) < 5
    later = time.time() + SqliteLedger.KEEP_SECONDS + 60
    monkeypatch.setattr(time, "time", lambda: later)
    ledger._expired_at = -SqliteLedger.EXPIRE_EVERY_SECONDS  # due now
    seen = ledger.begin("msg_old", None)
    assert seen.written_as is None  # forgotten, and seen afresh


def test_large_report_completes_across_attempts_and_a_killed_worker(
    service: Service, stripe_fake: FakeStripe, billing: Billing
) -> None:
    service.deliver(report([1], first=hours_ago(200)), "msg_warm")
    stripe_fake.latency = 0.05
    event = report([3] * 100, first=hours_ago(180))
    attempts = []
    for _ in range(8):
        status, answer = service.deliver(event, "msg_large")
        attempts.append((status, answer.get("written") or answer.get("sent")))
        if status == 200:
            break
        worker = [line["pid"] for line in service.logs() if line["message"] == "webhook"][-1]
        os.kill(worker, signal.SIGKILL)  # the worker that handled the attempt dies
        time.sleep(1.0)
    assert attempts[-1][0] == 200, attempts
    assert attempts[0][0] == 503 and len(attempts) >= 2
    assert stripe_fake.usage_total(billing.api) == 1 + 3 * 100


def test_a_reused_id_whose_new_body_failed_is_not_taken_as_written(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    first = hours_ago(5)
    assert deliver(client, report([4], first=first), "msg_reused").status_code == 200
    stripe_fake.inject("500", path="/usage_records", count=None, probability=1.0)
    assert deliver(client, report([7], first=first), "msg_reused").status_code == 503
    stripe_fake.clear_faults()
    again = deliver(client, report([7], first=first), "msg_reused")
    assert again.json is not None and again.json["outcome"] == "written"
    assert stripe_fake.usage_total(billing.api) == 7


def test_no_raw_meter_warning_for_usage_records(
    client: FlaskClient,
    stripe_fake: FakeStripe,
    billing: Billing,
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = report([10, 20, 30])
    # With this seed the third write is rate limited in all three of its tries (a rate limit is
    # retried twice): msg_A writes two windows, then 503.
    stripe_fake.inject("429_rate", path="/usage_records", probability=0.5, seed=6)
    first = deliver(client, body, "msg_A")
    assert first.status_code == 503 and first.json is not None and first.json["written"] == 2
    stripe_fake.clear_faults()
    assert deliver(client, body, "msg_B").status_code == 200  # the same windows, a new message
    bridge_log = logging.getLogger("bridge")
    bridge_log.addHandler(caplog.handler)  # the bridge's logger does not propagate
    try:
        assert deliver(client, body, "msg_A").status_code == 200  # Svix's retry of msg_A
    finally:
        bridge_log.removeHandler(caplog.handler)
    assert stripe_fake.usage_total(billing.api) == 60
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "raw meter kept the window's first event" not in warnings, warnings
    assert any(r.getMessage() == "stripe write" for r in caplog.records)  # the capture works
