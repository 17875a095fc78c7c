"""Stripe Billing meters: the same guarantees as usage records, on Stripe's current usage API."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from tests.conftest import deliver
from tests.fake_stripe import FakeStripe
from tests.harness import hours_ago, iso, report

CONFIG_YAML = """\
meters:
  api_calls: price_1Hourly
  tokens: price_1Raw
  storage: price_1Daily
  events: price_1Count
  latest_seats: price_1Last
  api_requests: price_1Legacy
  switched_off: price_1Off
  rounded_calls:
    price: price_1Rounded
    multiplier: 0.5
    rounding: up
subjects:
  customer-1: sub_1Both
"""


@dataclass
class Meters:
    """The fake Stripe's meters and the customer they bill."""

    customer: str
    legacy_item: str


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_YAML)
    return path


@pytest.fixture
def billing(stripe_fake: FakeStripe) -> Meters:
    """One subscription holding meter prices of every kind and a legacy metered price."""
    fake = stripe_fake
    fake.add_meter(
        "mtr_1Hourly",
        event_name="api_calls",
        customer_key="account",
        value_key="calls",
        event_time_window="hour",
    )
    fake.add_meter("mtr_1Raw", event_name="tokens_raw")
    fake.add_meter("mtr_1Daily", event_name="storage_daily", event_time_window="day")
    fake.add_meter("mtr_1Count", event_name="events_count", formula="count")
    fake.add_meter("mtr_1Last", event_name="seats_last", formula="last", event_time_window="hour")
    fake.add_meter("mtr_1Rounded", event_name="rounded_calls", event_time_window="hour")
    fake.add_meter("mtr_1Off", event_name="switched_off", status="inactive")
    prices = {
        "price_1Hourly": "mtr_1Hourly",
        "price_1Raw": "mtr_1Raw",
        "price_1Daily": "mtr_1Daily",
        "price_1Count": "mtr_1Count",
        "price_1Last": "mtr_1Last",
        "price_1Rounded": "mtr_1Rounded",
        "price_1Off": "mtr_1Off",
    }
    for price, meter in prices.items():
        fake.add_price(price, aggregate_usage=None, meter=meter)
    fake.add_price("price_1Legacy", aggregate_usage="sum")
    fake.add_customer("cus_1Both")
    fake.add_subscription("sub_1Both", customer="cus_1Both", prices=[*prices, "price_1Legacy"])
    return Meters(customer="cus_1Both", legacy_item=fake.item_id("sub_1Both", "price_1Legacy"))


def events(fake: FakeStripe, name: str) -> list[dict[str, object]]:
    return fake.meter_events(name)


def test_hourly_meter_gets_one_event_per_window_with_its_own_keys(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    event = report([5, 6, 7], meter="api_calls")
    response = deliver(client, event, "msg_m1")
    assert response.status_code == 200, response.json
    assert response.json is not None and response.json["kind"] == "meter_events"
    sent = events(stripe_fake, "api_calls")
    assert [e["payload"] for e in sent] == [
        {"account": billing.customer, "calls": value} for value in ("5", "6", "7")
    ]
    for sent_event, row in zip(sent, event["usage"], strict=True):
        start = datetime.fromisoformat(row["windowStart"]).timestamp()
        end = datetime.fromisoformat(row["windowEnd"]).timestamp()
        assert start < int(str(sent_event["timestamp"])) < end
    assert stripe_fake.meter_value("mtr_1Hourly", billing.customer) == 18


def test_hourly_meter_redelivery_changes_nothing_and_correction_replaces(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    first = hours_ago(5)
    assert (
        deliver(client, report([5, 6, 7], meter="api_calls", first=first), "msg_a").status_code
        == 200
    )
    assert (
        deliver(client, report([5, 6, 7], meter="api_calls", first=first), "msg_a").status_code
        == 200
    )
    assert stripe_fake.meter_value("mtr_1Hourly", billing.customer) == 18
    correction = report([5, 60, 7], meter="api_calls", first=first)
    assert deliver(client, correction, "msg_b").status_code == 200
    assert stripe_fake.meter_value("mtr_1Hourly", billing.customer) == 72
    back = report([5, 6, 7], meter="api_calls", first=first)
    assert deliver(client, back, "msg_c").status_code == 200  # back to an earlier value
    assert stripe_fake.meter_value("mtr_1Hourly", billing.customer) == 18
    assert deliver(client, correction, "msg_b").status_code == 200  # a late redelivery is a no-op
    assert stripe_fake.meter_value("mtr_1Hourly", billing.customer) == 18


def test_raw_meter_never_counts_a_window_twice(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    first = hours_ago(6)
    assert (
        deliver(client, report([10, 20], meter="tokens", first=first), "msg_r1").status_code == 200
    )
    assert (
        deliver(client, report([10, 20], meter="tokens", first=first), "msg_r1").status_code == 200
    )
    corrected = report([10, 25], meter="tokens", first=first)
    assert deliver(client, corrected, "msg_r2").status_code == 200
    assert stripe_fake.meter_value("mtr_1Raw", billing.customer) == 30
    assert len(events(stripe_fake, "tokens_raw")) == 2


def test_raw_meter_lost_response_is_not_added_twice(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    deliver(client, report([1], meter="tokens", first=hours_ago(9)), "msg_warm")
    stripe_fake.inject("lost_response", path="/meter_events", count=1)
    assert deliver(client, report([4], meter="tokens"), "msg_lost").status_code == 200
    assert stripe_fake.meter_value("mtr_1Raw", billing.customer) == 5


def midnight(days_ago: int) -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_ago)


def test_daily_windows_fill_a_daily_meter(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    event = report([3, 4], meter="storage", first=midnight(3), size=timedelta(days=1))
    assert deliver(client, event).status_code == 200
    assert stripe_fake.meter_value("mtr_1Daily", billing.customer) == 7


@pytest.mark.parametrize(
    ("meter", "first", "size"),
    [
        ("storage", midnight(2), timedelta(hours=1)),  # hourly windows into a daily meter
        ("api_calls", hours_ago(5) + timedelta(minutes=30), timedelta(hours=1)),  # unaligned
        ("api_calls", midnight(3), timedelta(days=1)),  # a day into an hourly meter
    ],
)
def test_windows_that_would_share_a_bucket_are_422_before_any_write(
    client: FlaskClient, stripe_fake: FakeStripe, meter: str, first: datetime, size: timedelta
) -> None:
    response = deliver(client, report([1, 2], meter=meter, first=first, size=size))
    assert response.status_code == 422
    assert response.json is not None and "windowSize" in response.json["hint"]
    assert stripe_fake.meter_events() == []


@pytest.mark.parametrize(
    ("meter", "aggregation"),
    [
        ("api_calls", "AVG"),
        ("api_calls", "MAX"),
        ("api_calls", "UNIQUE_COUNT"),
        ("latest_seats", "SUM"),
    ],
)
def test_mismatched_aggregation_is_422_naming_both_sides(
    client: FlaskClient, stripe_fake: FakeStripe, meter: str, aggregation: str
) -> None:
    event = report([1], meter=meter)
    event["meter"]["aggregation"] = aggregation
    response = deliver(client, event)
    assert response.status_code == 422
    assert response.json is not None
    assert response.json["openmeter_aggregation"] == aggregation
    assert stripe_fake.meter_events() == []


def test_latest_fits_a_last_meter(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    event = report([3, 9], meter="latest_seats")
    event["meter"]["aggregation"] = "LATEST"
    assert deliver(client, event).status_code == 200
    assert stripe_fake.meter_value("mtr_1Last", billing.customer) == 9


def test_values_to_a_count_meter_are_422(client: FlaskClient, stripe_fake: FakeStripe) -> None:
    response = deliver(client, report([4], meter="events"))
    assert response.status_code == 422
    assert response.json is not None and "counts events" in response.json["message"]
    assert stripe_fake.meter_events() == []


def test_decimal_reaches_a_meter_unrounded_and_a_legacy_price_whole(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    assert deliver(client, report(["2.5"], meter="api_calls"), "msg_d1").status_code == 200
    assert events(stripe_fake, "api_calls")[0]["payload"] == {
        "account": billing.customer,
        "calls": "2.5",
    }
    assert deliver(client, report(["2.5"], meter="api_requests"), "msg_d2").status_code == 200
    assert stripe_fake.usage_total(billing.legacy_item) == 3


def test_configured_rounding_still_applies_to_meters(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    assert deliver(client, report(["5"], meter="rounded_calls")).status_code == 200  # x 0.5, up
    assert events(stripe_fake, "rounded_calls")[0]["payload"]["value"] == "3"  # type: ignore[index]


def test_meter_values_keep_at_most_15_significant_digits(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    assert deliver(client, report([0.30000000000000004], meter="api_calls")).status_code == 200
    assert events(stripe_fake, "api_calls")[0]["payload"]["calls"] == "0.3"  # type: ignore[index]
    assert stripe_fake.meter_value("mtr_1Hourly", billing.customer) == Decimal("0.3")


def test_one_subscription_two_kinds_each_goes_its_way(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    legacy = deliver(client, report([8], meter="api_requests"), "msg_legacy")
    metered = deliver(client, report([9], meter="api_calls"), "msg_meter")
    assert legacy.json is not None and legacy.json["kind"] == "usage_records"
    assert metered.json is not None and metered.json["kind"] == "meter_events"
    assert stripe_fake.usage_total(billing.legacy_item) == 8
    assert stripe_fake.meter_value("mtr_1Hourly", billing.customer) == 9
    assert [r.path for r in stripe_fake.writes()] == [
        f"/v1/subscription_items/{billing.legacy_item}/usage_records",
        "/v1/billing/meter_events",
    ]


def test_warm_cache_costs_exactly_one_stripe_request(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    assert (
        deliver(client, report([1], meter="api_calls", first=hours_ago(3)), "msg_cold").status_code
        == 200
    )
    before = len(stripe_fake.requests)
    assert (
        deliver(client, report([2], meter="api_calls", first=hours_ago(4)), "msg_warm").status_code
        == 200
    )
    assert len(stripe_fake.requests) == before + 1


def test_window_older_than_35_days_is_422_naming_it(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    old = midnight(40)
    response = deliver(client, report([1], meter="api_calls", first=old))
    assert response.status_code == 422
    assert response.json is not None and old.isoformat() in response.json["message"]
    assert stripe_fake.meter_events() == []


def test_inactive_meter_is_422(client: FlaskClient, stripe_fake: FakeStripe) -> None:
    response = deliver(client, report([1], meter="switched_off"))
    assert response.status_code == 422
    assert response.json is not None and "not active" in response.json["message"]
    assert stripe_fake.meter_events() == []


def test_concurrent_reports_to_one_meter_are_written_one_at_a_time(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    deliver(client, report([1], meter="api_calls", first=hours_ago(20)), "msg_warm")
    stripe_fake.latency = 0.2
    stripe_fake.lock_wait = 0.05  # Stripe answers lock_timeout to any overlap
    statuses: list[int] = []

    def send(index: int) -> None:
        event = report([index, index], meter="api_calls", first=hours_ago(10 - 2 * index))
        statuses.append(
            deliver(client.application.test_client(), event, f"msg_c{index}").status_code
        )

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200, 200, 200]
    assert not [r for r in stripe_fake.requests if r.status == 429]
    ledger = client.application.extensions["bridge"].ledger
    assert ledger._locks._threads == {}  # the last writer drops an object's thread lock


def test_raw_meter_leaves_out_a_window_open_when_the_report_was_made(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    closed_and_open = report([2, 3], meter="tokens", first=hours_ago(1))  # the last one is open
    response = deliver(client, closed_and_open, "msg_open")
    assert response.status_code == 200, response.json  # no retry of this body can complete it
    assert response.json is not None and response.json["sent"] == 1
    [left_out] = response.json["incomplete"]
    assert left_out["window_start"] == hours_ago(0).isoformat()
    assert "had not ended when the report was made" in left_out["reason"]
    assert [e["payload"] for e in events(stripe_fake, "tokens_raw")] == [
        {"stripe_customer_id": billing.customer, "value": "2"}
    ]
    hourly = report([3], meter="api_calls", first=hours_ago(0))  # a bucket is overwritten later
    assert deliver(client, hourly, "msg_open_hourly").status_code == 200


def test_raw_meter_correction_skipped_by_the_ledger_is_logged(
    client: FlaskClient,
    stripe_fake: FakeStripe,
    billing: Meters,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = hours_ago(4)
    assert deliver(client, report([10], meter="tokens", first=first), "msg_k1").status_code == 200
    corrected = deliver(client, report([12], meter="tokens", first=first), "msg_k2")
    assert corrected.status_code == 200
    assert corrected.json is not None and corrected.json["skipped"] == 1
    assert any(r.getMessage() == "raw meter kept the window's first event" for r in caplog.records)
    assert events(stripe_fake, "tokens_raw")[-1]["payload"] == {
        "stripe_customer_id": billing.customer,
        "value": "10",
    }


def test_a_slow_host_clock_does_not_make_a_raw_meters_last_window_incomplete(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Meters
) -> None:
    """Completeness is judged by the sender's clock (the first attempt's svix-timestamp): a host
    90 s behind the sender must not leave out a window the sender saw end before it sent."""
    host_now = datetime.now(UTC).replace(microsecond=0)
    sender_now = host_now + timedelta(seconds=90)  # the host's clock is 90 s slow
    end = host_now + timedelta(seconds=75)  # ended 15 s before the sender sent the report
    start = end - timedelta(minutes=2)
    event = report([6], meter="tokens", first=start, size=timedelta(minutes=2))
    event["query"] |= {"from": iso(start), "to": iso(end)}
    response = deliver(client, event, "msg_skewed", at=sender_now)
    assert response.status_code == 200, response.json
    assert response.json is not None and "incomplete" not in response.json, response.json
    assert [e["payload"]["value"] for e in stripe_fake.meter_events()] == ["6"]
