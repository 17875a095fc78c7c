"""Billing-period edges: subscriptions that end, renew or reset, meters' periods, shared customers,
saved 5xx answers, and what "already written" means. Each against the fake Stripe over HTTP."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from tests.conftest import API_KEY, Billing, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import hours_ago, report

HOUR = 3600
MONTH = 30 * 86400


@pytest.fixture
def billing(billing: Billing, stripe_fake: FakeStripe) -> Billing:
    """The shared legacy objects, plus an hourly (pre-aggregated) meter and its price."""
    stripe_fake.add_meter("mtr_1Calls", event_name="calls", event_time_window="hour")
    stripe_fake.add_price("price_1Calls", aggregate_usage=None, meter="mtr_1Calls")
    return billing


Connect = Callable[..., FlaskClient]


@pytest.fixture
def connect(environment: dict[str, str], config_path: Path, billing: Billing) -> Connect:
    """A client for a fresh app whose config maps the given subjects (and both meters)."""

    def connect(subjects: dict[str, str], **env: str) -> FlaskClient:
        lines = [f"  {subject}: {subscription}" for subject, subscription in subjects.items()]
        config_path.write_text(
            "meters:\n  api_requests: price_1Api\n  calls: price_1Calls\n"
            "subjects:\n" + "\n".join(lines) + "\n"
        )
        return create_app(environment | env).test_client()

    return connect


def answer(response: Any) -> dict[str, Any]:
    """A response's JSON answer."""
    body = response.json
    assert isinstance(body, dict), response.data
    return body


def posts(fake: FakeStripe) -> list[Any]:
    """Every POST the bridge sent."""
    return [r for r in fake.requests if r.method == "POST"]


def event_timestamps(fake: FakeStripe) -> list[int]:
    """The timestamps of the meter events Stripe took."""
    return [int(str(e["timestamp"])) for e in fake.meter_events("calls")]


# --- a subscription that will not renew ------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel_at_period_end", "cancel_at"])
@pytest.mark.parametrize("meter", ["api_requests", "calls"])
def test_last_window_of_a_subscription_that_will_not_renew_is_written_now(
    connect: Connect, stripe_fake: FakeStripe, how: str, meter: str
) -> None:
    now = int(time.time())
    window = hours_ago(0)  # open: its end, and the period's, are still ahead
    stripe_fake.add_subscription(
        "sub_1Leaving", prices=["price_1Api", "price_1Calls"], period_end=now + 2
    )
    if how == "cancel_at":
        stripe_fake.cancel("sub_1Leaving", at=now + 2)
    else:
        stripe_fake.cancel("sub_1Leaving", at_period_end=True)
    client = connect({"leaving": "sub_1Leaving"})
    response = deliver(client, report([4], subject="leaving", meter=meter, first=window))
    assert response.status_code == 200, response.json  # no 503 waiting for a renewal
    timestamp = int(window.timestamp()) + 1  # in the final period
    if meter == "calls":
        assert event_timestamps(stripe_fake) == [timestamp]
    else:
        item = stripe_fake.item_id("sub_1Leaving", "price_1Api")
        assert stripe_fake.usage_records(item) == {timestamp: 4}


@pytest.mark.parametrize("status", ["canceled", "incomplete_expired"])
@pytest.mark.parametrize("meter", ["api_requests", "calls"])
def test_usage_for_an_ended_subscription_is_422_naming_every_window_and_nothing_is_sent(
    connect: Connect, stripe_fake: FakeStripe, status: str, meter: str
) -> None:
    stripe_fake.add_subscription("sub_1Ended", prices=["price_1Api", "price_1Calls"])
    stripe_fake.end("sub_1Ended", status)
    client = connect({"ended": "sub_1Ended"})
    event = report([1, 2], subject="ended", meter=meter, first=hours_ago(4))
    response = deliver(client, event)
    assert response.status_code == 422, response.json
    body = answer(response)
    assert status in body["message"] and body["subscription"] == "sub_1Ended"
    assert body["windows"] == [hours_ago(4).isoformat(), hours_ago(3).isoformat()]
    assert posts(stripe_fake) == []


# --- meter events get the period rules of usage records --------------------------------------


def test_meter_window_spanning_a_renewal_waits_then_goes_to_the_new_period(
    connect: Connect, stripe_fake: FakeStripe
) -> None:
    now = int(time.time())
    window = hours_ago(0)
    stripe_fake.add_subscription("sub_1Renewing", prices=["price_1Calls"], period_end=now + 2)
    client = connect({"renewing": "sub_1Renewing"})
    event = report([5], subject="renewing", meter="calls", first=window)
    response = deliver(client, event, "msg_before")
    assert response.status_code == 503 and answer(response)["error"] == "windows_waiting"
    assert posts(stripe_fake) == []
    time.sleep(2.5)
    stripe_fake.renew("sub_1Renewing", period_end=now + MONTH)
    again = deliver(client, event, "msg_before")
    assert again.status_code == 200, again.json
    assert event_timestamps(stripe_fake) == [now + 2]  # in the new period, in full
    assert stripe_fake.unbilled_events() == []


def renewed_at(fake: FakeStripe, subscription: str, moment: datetime) -> None:
    """A subscription (meter price) whose previous period ended at moment."""
    start = int(moment.timestamp())
    fake.add_subscription(
        subscription, prices=["price_1Calls"], period_start=start - MONTH, period_end=start
    )
    fake.renew(subscription, period_end=start + MONTH)


def test_meter_window_whose_invoice_has_finalized_is_422_and_the_others_are_written(
    connect: Connect, stripe_fake: FakeStripe
) -> None:
    renewal = hours_ago(2)  # the previous period's invoice finalized an hour after it
    renewed_at(stripe_fake, "sub_1Late", renewal)
    client = connect({"late": "sub_1Late"})
    event = report([3, 4], subject="late", meter="calls", first=renewal - timedelta(hours=1))
    response = deliver(client, event)
    assert response.status_code == 422, response.json
    body = answer(response)
    assert body["refused"][0]["window_start"] == (renewal - timedelta(hours=1)).isoformat()
    assert "INVOICE_GRACE_SECONDS" in body["refused"][0]["message"]
    assert event_timestamps(stripe_fake) == [int(renewal.timestamp()) + 1]  # the current window
    assert stripe_fake.unbilled_events() == []


@pytest.mark.parametrize(("renewal_hours_ago", "grace"), [(0, None), (2, "10800")])
def test_meter_window_of_the_previous_period_is_written_within_the_grace_period(
    connect: Connect, stripe_fake: FakeStripe, renewal_hours_ago: int, grace: str | None
) -> None:
    renewal = hours_ago(renewal_hours_ago)
    if grace:
        stripe_fake.invoice_grace = int(grace)  # the account's setting, and the bridge's
    renewed_at(stripe_fake, "sub_1Grace", renewal)
    client = connect({"grace": "sub_1Grace"}, **({"INVOICE_GRACE_SECONDS": grace} if grace else {}))
    event = report([3], subject="grace", meter="calls", first=renewal - timedelta(hours=1))
    response = deliver(client, event)
    assert response.status_code == 200, response.json
    assert event_timestamps(stripe_fake) == [int(renewal.timestamp()) - HOUR + 1]
    assert stripe_fake.unbilled_events() == []  # billed in the previous period's open invoice


def test_meter_window_before_the_subscription_began_is_refused_and_one_it_splits_starts_with_it(
    connect: Connect, stripe_fake: FakeStripe
) -> None:
    began = hours_ago(1) + timedelta(minutes=30)
    start = int(began.timestamp())
    stripe_fake.add_subscription(
        "sub_1New", prices=["price_1Calls"], period_start=start, period_end=start + MONTH
    )
    client = connect({"new": "sub_1New"})
    event = report([3, 4], subject="new", meter="calls", first=hours_ago(2))
    response = deliver(client, event)
    assert response.status_code == 422, response.json
    refused = answer(response)["refused"]
    assert [r["window_start"] for r in refused] == [hours_ago(2).isoformat()]
    assert "began" in refused[0]["message"]
    assert event_timestamps(stripe_fake) == [start]  # never before the subscription
    assert stripe_fake.unbilled_events() == []


# --- two subjects, one customer, one meter ----------------------------------------------------


def shared_customer(fake: FakeStripe) -> None:
    """Two subscriptions of one customer, both with the meter price."""
    fake.add_customer("cus_1Shared")
    fake.add_subscription("sub_1TeamA", customer="cus_1Shared", prices=["price_1Calls"])
    fake.add_subscription("sub_1TeamB", customer="cus_1Shared", prices=["price_1Calls"])


def test_two_subjects_on_one_customer_and_meter_are_422_once_both_are_known(
    connect: Connect, stripe_fake: FakeStripe
) -> None:
    shared_customer(stripe_fake)
    client = connect({"team-a": "sub_1TeamA", "team-b": "sub_1TeamB"})
    first = hours_ago(3)
    first_subject = deliver(client, report([1], subject="team-a", meter="calls", first=first))
    assert first_subject.status_code == 200, first_subject.json
    sent = len(stripe_fake.meter_events())
    response = deliver(client, report([2], subject="team-b", meter="calls", first=first), "msg_b")
    assert response.status_code == 422, response.json
    body = answer(response)
    assert body["error"] == "shared_customer" and body["subjects"] == ["team-a", "team-b"]
    assert body["customer"] == "cus_1Shared"
    assert len(stripe_fake.meter_events()) == sent  # team-a's bucket is not overwritten


def test_a_claim_mapped_away_gives_the_customers_meter_to_the_next_subject(
    connect: Connect, stripe_fake: FakeStripe
) -> None:
    shared_customer(stripe_fake)
    first = hours_ago(3)
    both = connect({"team-a": "sub_1TeamA", "team-b": "sub_1TeamB"})
    assert (
        deliver(both, report([1], subject="team-a", meter="calls", first=first)).status_code == 200
    )
    b_event = report([2], subject="team-b", meter="calls", first=first - timedelta(hours=1))
    assert deliver(both, b_event, "msg_b").status_code == 422
    only_b = connect({"team-b": "sub_1TeamB"})  # the operator moved team-a off this customer
    response = deliver(only_b, b_event, "msg_b")
    assert response.status_code == 200, response.json
    again = connect({"team-a": "sub_1TeamA", "team-b": "sub_1TeamB"})  # team-a mapped back
    refused = deliver(again, report([3], subject="team-a", meter="calls", first=first), "msg_a2")
    assert refused.status_code == 422 and answer(refused)["subjects"] == ["team-a", "team-b"]


def test_two_subjects_on_one_customer_with_usage_records_are_fine(
    connect: Connect, stripe_fake: FakeStripe
) -> None:
    shared_customer(stripe_fake)
    stripe_fake.add_item("sub_1TeamA", "price_1Api")
    stripe_fake.add_item("sub_1TeamB", "price_1Api")
    client = connect({"team-a": "sub_1TeamA", "team-b": "sub_1TeamB"})
    for subject in ("team-a", "team-b"):
        response = deliver(client, report([1], subject=subject), f"msg_{subject}")
        assert response.status_code == 200, response.json  # one item each: no overwriting


def test_check_config_online_refuses_two_subjects_on_one_customer_and_meter(
    tmp_path: Path, stripe_fake: FakeStripe, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared_customer(stripe_fake)
    path = tmp_path / "shared.yaml"
    path.write_text(
        "meters:\n  calls: price_1Calls\nsubjects:\n  team-a: sub_1TeamA\n  team-b: sub_1TeamB\n"
    )
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", stripe_fake.url)
    result = app.test_cli_runner().invoke(args=["check-config", str(path), "--online"])
    assert result.exit_code == 1, result.output
    problems = [line for line in result.output.splitlines() if "problem" in line]
    assert len(problems) == 1, result.output
    assert "subjects.team-b" in problems[0] and "subjects.team-a" in problems[0]
    assert "cus_1Shared" in problems[0] and "mtr_1Calls" in problems[0]


# --- a 5xx saved under an idempotency key -----------------------------------------------------


def usage_keys(fake: FakeStripe) -> list[tuple[str, int, bool]]:
    """Each usage-record request's idempotency key, status, and whether it was a replay."""
    return [
        (r.headers["idempotency-key"], r.status, r.idempotent_replay)
        for r in fake.requests
        if r.method == "POST" and r.path.endswith("/usage_records")
    ]


def test_after_a_500_the_retry_takes_a_fresh_key_and_writes(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    stripe_fake.inject("500", path="/usage_records", count=1)
    response = deliver(client, report([5]))
    assert response.status_code == 200, response.json
    (first, status, _), (second, ok, replay) = usage_keys(stripe_fake)
    assert (status, ok, replay) == (500, 200, False) and first != second
    assert second.startswith("sha256:") or second.startswith(first)
    assert stripe_fake.usage_total(billing.api) == 5


def test_a_saved_500_does_not_block_the_next_delivery_nor_count_twice(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    stripe_fake.inject("500", path="/usage_records", count=3)
    event = report([5, 6])
    assert deliver(client, event, "msg_500").status_code == 503
    response = deliver(client, event, "msg_500")  # Svix's next attempt
    assert response.status_code == 200, response.json
    first, later = usage_keys(stripe_fake)[:3], usage_keys(stripe_fake)[3:]
    assert [status for _, status, _ in first] == [500, 500, 500]
    # The ledger remembers the fresh key: no key whose answer was a 500 is sent again, so
    # Stripe's saved 500 is never replayed, in this worker or any other.
    assert [(status, replay) for _, status, replay in later] == [(200, False), (200, False)]
    assert not {key for key, _, _ in first} & {key for key, _, _ in later}
    assert stripe_fake.usage_total(billing.api) == 11
    again = deliver(client, report([5, 7], first=hours_ago(3)), "msg_fix")  # a correction
    assert again.status_code == 200 and stripe_fake.usage_total(billing.api) == 12


# --- "already written" means written to the same place ---------------------------------------


def test_resend_after_a_mapping_fix_writes_to_the_new_subscription(
    connect: Connect, stripe_fake: FakeStripe, billing: Billing
) -> None:
    event = report([4])
    wrong = connect({"customer-1": billing.customer1})
    assert deliver(wrong, event, "msg_map").status_code == 200
    fixed = connect({"customer-1": "sub_1Newcomer"})
    response = deliver(fixed, event, "msg_map")  # the operator's resend from Svix
    assert response.status_code == 200 and answer(response)["outcome"] == "written"
    assert stripe_fake.usage_total(stripe_fake.item_id("sub_1Newcomer", "price_1Api")) == 4
    assert answer(deliver(fixed, event, "msg_map"))["outcome"] == "already_written"


def test_a_key_rotation_changes_nothing_a_redelivery_is_already_written(
    connect: Connect, stripe_fake: FakeStripe, billing: Billing
) -> None:
    event = report([4])
    old_key = connect({"customer-1": billing.customer1})
    assert deliver(old_key, event, "msg_key").status_code == 200
    posted = len(posts(stripe_fake))
    # The same account, its key rolled to a restricted one: the objects (and their ids) stay.
    stripe_fake.api_key = "rk_test_bridge0123456789rotated"
    new_key = connect({"customer-1": billing.customer1}, STRIPE_API_KEY=stripe_fake.api_key)
    response = deliver(new_key, event, "msg_key")
    assert response.status_code == 200 and answer(response)["outcome"] == "already_written"
    assert len(posts(stripe_fake)) == posted  # nothing sent
    assert stripe_fake.usage_total(billing.api) == 4


def test_the_ledger_file_never_holds_the_stripe_key(
    client: FlaskClient, environment: dict[str, str], billing: Billing
) -> None:
    assert deliver(client, report([4]), "msg_secret").status_code == 200
    state = Path(environment["STATE_PATH"]).parent
    ledger = b"".join(path.read_bytes() for path in state.iterdir())  # the WAL too
    assert API_KEY.encode() not in ledger and API_KEY[-8:].encode() not in ledger


# --- a billing-cycle reset in the middle of an open window (a known limit) ---------------------


def test_billing_cycle_reset_inside_an_open_window_bills_its_earlier_value_twice(
    connect: Connect, stripe_fake: FakeStripe
) -> None:
    """README, known limits: the value written before the reset stays on the old invoice, and
    the window's full value goes to the new period. Closed windows are not written again."""
    stripe_fake.add_subscription("sub_1Upgrade", prices=["price_1Api"])
    item = stripe_fake.item_id("sub_1Upgrade", "price_1Api")
    client = connect({"upgrade": "sub_1Upgrade"})
    window = hours_ago(0)
    earlier = report([2, 3], subject="upgrade", first=window - timedelta(hours=1))
    assert deliver(client, earlier, "msg_open").status_code == 200  # the open window as it stood
    time.sleep(1.1)
    stripe_fake.reset_billing_cycle("sub_1Upgrade", period_end=int(time.time()) + MONTH)
    reset = stripe_fake.state()["subscriptions"]["sub_1Upgrade"]["items"]["data"][0][
        "current_period_start"
    ]
    assert answer(deliver(client, earlier, "msg_open"))["outcome"] == "already_written"
    later = report([2, 5], subject="upgrade", first=window - timedelta(hours=1))
    response = deliver(client, later, "msg_later")
    # The closed window belongs to the invoiced period: Stripe refuses it, it is not billed again.
    assert response.status_code == 422, response.json
    assert (
        answer(response)["refused"][0]["window_start"] == (window - timedelta(hours=1)).isoformat()
    )
    again = deliver(client, later, "msg_later")  # the subscription was read again
    assert again.status_code == 422
    start = int(window.timestamp()) + 1
    records = stripe_fake.usage_records(item)
    assert records[start] == 3  # on the old period's invoice
    assert records[reset] == 5  # and the whole window again in the new period: 3 billed twice
    assert datetime.fromtimestamp(reset, UTC) > window  # the reset fell inside the window


def test_a_remap_between_attempts_names_the_windows_written_to_the_old_place(
    connect: Connect,
    stripe_fake: FakeStripe,
    billing: Billing,
    caplog: pytest.LogCaptureFixture,
) -> None:
    event = report([10, 20, 30])
    before = connect({"customer-1": billing.customer1})
    # With this seed the third write is rate limited in all three of its tries (a rate limit is
    # retried twice): the first attempt writes two windows.
    stripe_fake.inject("429_rate", path="/usage_records", probability=0.5, seed=6)
    first = deliver(before, event, "msg_remap")
    assert first.status_code == 503 and answer(first)["written"] == 2
    stripe_fake.clear_faults()
    after = connect({"customer-1": "sub_1Newcomer"})  # the operator remaps the subject
    bridge_log = logging.getLogger("bridge")
    bridge_log.addHandler(caplog.handler)  # the bridge's logger does not propagate
    try:
        response = deliver(after, event, "msg_remap")  # Svix's next attempt
    finally:
        bridge_log.removeHandler(caplog.handler)
    assert response.status_code == 200 and answer(response)["sent"] == 3
    stamps = [
        datetime.fromtimestamp(t, UTC).isoformat() for t in stripe_fake.usage_records(billing.api)
    ]
    old_place = f"usage_records/{billing.api}"
    assert answer(response)["written_elsewhere"] == [
        {"place": old_place, "timestamp": stamp} for stamp in sorted(stamps)
    ]
    [warning] = [
        r for r in caplog.records if r.getMessage() == "message already wrote to another place"
    ]
    assert warning.levelno == logging.WARNING
    assert stripe_fake.usage_total(stripe_fake.item_id("sub_1Newcomer", "price_1Api")) == 60
