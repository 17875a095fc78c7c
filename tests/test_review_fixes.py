"""Rules a review of the assembled bridge found missing, each against the fake Stripe."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient

from app import create_app
from tests.conftest import Billing, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import hours_ago, report

METERS = "meters:\n  api_calls:\n    price: price_1Hourly\n    multiplier: {multiplier}\n"


def connect(environment: dict[str, str], config_path: Path, text: str) -> FlaskClient:
    """A fresh service (a restart, or a reload) serving this config."""
    config_path.write_text(text)
    return create_app(environment).test_client()


def answer(response: Any) -> dict[str, Any]:
    """The JSON body."""
    assert response.json is not None
    return dict(response.json)


def hourly_meter(fake: FakeStripe, customer: str = "cus_1Both") -> None:
    """An hourly pre-aggregated meter on its own price, on a subscription of its own."""
    fake.add_meter("mtr_1Hourly", event_name="api_calls", event_time_window="hour")
    fake.add_price("price_1Hourly", aggregate_usage=None, meter="mtr_1Hourly")
    fake.add_customer(customer)
    fake.add_subscription("sub_1Both", customer=customer, prices=["price_1Hourly"])


def test_a_resend_after_a_multiplier_fix_is_written_again_to_usage_records(
    environment: dict[str, str], config_path: Path, billing: Billing, stripe_fake: FakeStripe
) -> None:
    mapping = "meters:\n  api_requests:\n    price: price_1Api\n    multiplier: {m}\n"
    subjects = f"subjects:\n  customer-1: {billing.customer1}\n"
    event = report([4])
    wrong = connect(environment, config_path, mapping.format(m=1000) + subjects)
    assert deliver(wrong, event, "msg_mult").status_code == 200
    assert stripe_fake.usage_total(billing.api) == 4000
    fixed = connect(environment, config_path, mapping.format(m=1) + subjects)
    response = deliver(fixed, event, "msg_mult")  # the operator's resend from Svix
    assert response.status_code == 200 and answer(response)["outcome"] == "written"
    assert stripe_fake.usage_total(billing.api) == 4


def test_a_resend_after_a_multiplier_fix_replaces_a_pre_aggregated_bucket(
    environment: dict[str, str], config_path: Path, stripe_fake: FakeStripe
) -> None:
    hourly_meter(stripe_fake)
    subjects = "subjects:\n  customer-1: sub_1Both\n"
    event = report([4], meter="api_calls")
    wrong = connect(environment, config_path, METERS.format(multiplier=1000) + subjects)
    assert deliver(wrong, event, "msg_mult").status_code == 200
    fixed = connect(environment, config_path, METERS.format(multiplier=1) + subjects)
    assert answer(deliver(fixed, event, "msg_mult"))["outcome"] == "written"
    assert list(stripe_fake.meter_buckets("mtr_1Hourly", "cus_1Both").values()) == [Decimal(4)]


def test_a_meter_window_older_than_35_days_is_refused_alone(
    environment: dict[str, str], config_path: Path, stripe_fake: FakeStripe
) -> None:
    stripe_fake.add_meter("mtr_1Daily", event_name="storage", event_time_window="day")
    stripe_fake.add_price("price_1Daily", aggregate_usage=None, meter="mtr_1Daily")
    stripe_fake.add_customer("cus_1Old")
    # A subscription that began long ago: only Stripe's 35 days stand in the old window's way.
    began = int(hours_ago(24 * 60).timestamp())
    stripe_fake.add_subscription(
        "sub_1Old", customer="cus_1Old", prices=["price_1Daily"], period_start=began
    )
    text = "meters:\n  storage: price_1Daily\nsubjects:\n  customer-1: sub_1Old\n"
    client = connect(environment, config_path, text)
    today = hours_ago(0).replace(hour=0)
    old, fresh = today - timedelta(days=40), today - timedelta(days=1)
    event = report(rows=[row(old, 7), row(fresh, 5)], meter="storage")
    response = deliver(client, event, "msg_backfill")
    assert response.status_code == 422
    [refused] = answer(response)["refused"]
    assert "35 days" in refused["message"] and refused["window_start"] == old.isoformat()
    buckets = stripe_fake.meter_buckets("mtr_1Daily", "cus_1Old")
    assert buckets == {int(fresh.timestamp()): Decimal(5)}  # the fresh window is billed


def row(start: Any, value: int, size: timedelta = timedelta(days=1)) -> dict[str, Any]:
    """One usage row of the given window size (a day by default)."""
    return {"subject": "customer-1", "value": value, "groupBy": {},
            "windowStart": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "windowEnd": (start + size).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip


def test_two_mapped_meters_on_one_stripe_meter_are_refused_before_any_event(
    environment: dict[str, str], config_path: Path, stripe_fake: FakeStripe
) -> None:
    stripe_fake.add_meter("mtr_1Raw", event_name="tokens")
    for price in ("price_1In", "price_1Out"):
        stripe_fake.add_price(price, aggregate_usage=None, meter="mtr_1Raw")
    stripe_fake.add_customer("cus_1Tok")
    stripe_fake.add_subscription(
        "sub_1Tok", customer="cus_1Tok", prices=["price_1In", "price_1Out"]
    )
    text = (
        "meters:\n  tokens_in: price_1In\n  tokens_out: price_1Out\n"
        "subjects:\n  customer-1: sub_1Tok\n"
    )
    client = connect(environment, config_path, text)
    response = deliver(client, report([3], meter="tokens_out"), "msg_tok")
    assert response.status_code == 422
    assert "meters.tokens_out and meters.tokens_in both go to" in answer(response)["message"]
    assert stripe_fake.meter_events("tokens") == []


def test_negative_usage_to_a_meter_is_refused_and_only_its_window_is_not_sent(
    environment: dict[str, str], config_path: Path, stripe_fake: FakeStripe
) -> None:
    hourly_meter(stripe_fake)
    client = connect(environment, config_path, METERS.format(multiplier=1) + "subjects:\n"
                     "  customer-1: sub_1Both\n")  # fmt: skip
    response = deliver(client, report([2, -0.3], meter="api_calls"), "msg_neg")
    assert response.status_code == 422
    assert "cannot be negative" in answer(response)["refused"][0]["message"]
    assert [e["payload"]["value"] for e in stripe_fake.meter_events("api_calls")] == ["2"]


def test_a_refusal_also_names_the_windows_that_wait(
    environment: dict[str, str], config_path: Path, billing: Billing, stripe_fake: FakeStripe
) -> None:
    now = hours_ago(0)
    stripe_fake.add_subscription(
        "sub_1Edge",
        prices=["price_1Api"],
        period_start=int((now - timedelta(days=30)).timestamp()),
        period_end=int((now - timedelta(minutes=30)).timestamp()),  # renewal due, not yet come
    )
    text = "meters:\n  api_requests: price_1Api\nsubjects:\n  customer-1: sub_1Edge\n"
    client = connect(environment, config_path, text)
    before_period, spanning = now - timedelta(days=31), now - timedelta(hours=1)
    hour = timedelta(hours=1)
    rows = [row(before_period, 3, hour), row(spanning, 4, hour)]
    response = deliver(client, report(rows=rows), "msg_edge")
    assert response.status_code == 422
    body = answer(response)
    assert [w["window_start"] for w in body["refused"]] == [before_period.isoformat()]
    assert [w["window_start"] for w in body["waiting"]] == [spanning.isoformat()]


def test_a_meter_window_two_periods_back_is_refused_even_within_the_grace(
    environment: dict[str, str], config_path: Path, stripe_fake: FakeStripe
) -> None:
    stripe_fake.add_meter("mtr_1Daily", event_name="storage", event_time_window="day")
    stripe_fake.add_price("price_1Daily", aggregate_usage=None, meter="mtr_1Daily")
    stripe_fake.add_customer("cus_1Renewed")
    now = datetime.now(UTC)
    renewed = int((now - timedelta(minutes=10)).timestamp())  # within the hour's grace
    stripe_fake.add_subscription(
        "sub_1Renewed",
        customer="cus_1Renewed",
        prices=["price_1Daily"],  # monthly, as every price of the fake
        period_start=renewed,
        start_date=renewed - 90 * 86400,
    )
    text = "meters:\n  storage: price_1Daily\nsubjects:\n  customer-1: sub_1Renewed\n"
    client = connect(environment, config_path, text)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    long_ago, last_period = today - timedelta(days=33), today - timedelta(days=2)
    event = report(rows=[row(long_ago, 7), row(last_period, 5)], meter="storage")
    response = deliver(client, event, "msg_back")
    assert response.status_code == 422
    [refused] = answer(response)["refused"]
    assert "before the previous one" in refused["message"]
    buckets = stripe_fake.meter_buckets("mtr_1Daily", "cus_1Renewed")
    assert buckets == {int(last_period.timestamp()): Decimal(5)}  # still in its invoice's grace
