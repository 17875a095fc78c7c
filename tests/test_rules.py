"""Rules of the bridge that other tests leave loose, each pinned so that a one-line mutant fails.

Everything goes through signed webhooks to the fake Stripe over HTTP, except the Cache, which is
driven through its own API with an injected clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import stripe
import yaml
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from bridge.stripe_api import USAGE_RECORDS_API_VERSION
from bridge.stripe_objects import CACHE_MAX_ENTRIES, CACHE_TTL_SECONDS, Cache
from tests.conftest import API_KEY, CONFIG_YAML, Billing, deliver
from tests.fake_stripe import FakeStripe, RecordedRequest
from tests.harness import PROJECT, hours_ago, iso, open_hour, report, wait_until

# Where the replay subprocess imports app from (the mutation check points it at a mutated copy).
APP_DIR = PROJECT
REPLAY = [sys.executable, "-m", "flask", "--app", "app", "replay"]

EXTRA_METERS: dict[str, Any] = {
    "peak_users": "price_1Max",  # legacy, aggregate_usage max
    "seats_now": "price_1LastPeriod",  # legacy, last_during_period
    "seats_ever": "price_1LastEver",  # legacy, last_ever
    "seats": "price_1Seat",  # licensed: not metered at all
    "milli_units": {"price": "price_1Milli", "multiplier": "0.001"},  # hourly meter, no rounding
    "raw_units": "price_1RawUnits",  # raw meter (no event_time_window)
    "far_away": "price_1Far",  # the last of sub_1Big's 121 items
}
FILLERS = 120  # items before price_1Far: 10 embedded, a page of 100, then a second page


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """The shared test config, plus this module's meters and a subscription with many items."""
    document = yaml.safe_load(CONFIG_YAML)
    document["meters"].update(EXTRA_METERS)
    document["subjects"]["big"] = "sub_1Big"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def billing(billing: Billing, stripe_fake: FakeStripe) -> Billing:
    """The shared Stripe objects, plus the prices and meters this module's rules need."""
    fake = stripe_fake
    fake.add_price("price_1Max", aggregate_usage="max")
    fake.add_price("price_1LastPeriod", aggregate_usage="last_during_period")
    fake.add_price("price_1LastEver", aggregate_usage="last_ever")
    fake.add_price("price_1Seat", usage_type="licensed", aggregate_usage=None)
    fake.add_meter("mtr_1Milli", event_name="milli_units", event_time_window="hour")
    fake.add_price("price_1Milli", aggregate_usage=None, meter="mtr_1Milli")
    fake.add_meter("mtr_1RawUnits", event_name="raw_units")
    fake.add_price("price_1RawUnits", aggregate_usage=None, meter="mtr_1RawUnits")
    for price in ("Max", "LastPeriod", "LastEver", "Seat", "Milli", "RawUnits"):
        fake.add_item(billing.customer1, f"price_1{price}")  # 9 items: all embedded
    fillers = [fake.add_price(f"price_1Fill{index:03d}") for index in range(FILLERS)]
    fake.add_price("price_1Far")
    fake.add_subscription("sub_1Big", prices=[*fillers, "price_1Far"])
    return billing


def usage_posts(fake: FakeStripe) -> list[RecordedRequest]:
    """Every usage-record request that reached the fake (answered or not)."""
    return [r for r in fake.requests if r.method == "POST" and r.path.endswith("/usage_records")]


def subscription_reads(fake: FakeStripe) -> int:
    """How many times the subscription was retrieved (its billing thresholds, read at acacia and
    cached apart, not counted)."""
    return sum(
        1
        for r in fake.requests
        if r.method == "GET"
        and r.path.startswith("/v1/subscr")
        and r.headers["stripe-version"] != USAGE_RECORDS_API_VERSION
    )


def window(
    start: datetime, end: datetime, value: Any, subject: str = "customer-1"
) -> dict[str, Any]:
    """One usage row for [start, end), timestamps to the second."""
    return {
        "subject": subject,
        "value": value,
        "groupBy": {},
        "windowStart": iso(start),
        "windowEnd": iso(end),
    }


def answer(response: Any) -> dict[str, Any]:
    """A response's JSON answer."""
    body = response.json
    assert isinstance(body, dict), response.data
    return body


# --- 1. the cache: expiry and bound ----------------------------------------------------------


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fetcher:
    """Counts fetches; each fetch returns a new version of the object."""

    def __init__(self) -> None:
        self.fetched: list[str] = []

    def __call__(self, key: str) -> str:
        self.fetched.append(key)
        return f"{key}#{len(self.fetched)}"


def test_cache_entry_expires_ttl_after_it_was_fetched_not_last_read() -> None:
    clock, fetch = Clock(), Fetcher()
    cache: Cache[str] = Cache(ttl=10, max_entries=5, clock=clock)
    assert cache.get("sub", fetch) == "sub#1"
    clock.now = 1009.999
    assert cache.get("sub", fetch) == "sub#1"  # fresh, and reading it does not renew it
    clock.now = 1010.0
    assert cache.get("sub", fetch) == "sub#2"  # exactly ttl old: fetched again
    clock.now = 1019.0
    assert cache.get("sub", fetch) == "sub#2"
    assert fetch.fetched == ["sub", "sub"]


def test_cache_defaults_to_five_minutes() -> None:
    assert CACHE_TTL_SECONDS == 300
    clock, fetch = Clock(), Fetcher()
    cache: Cache[str] = Cache(clock=clock)
    cache.get("sub", fetch)
    clock.now += 299.5
    assert cache.get("sub", fetch) == "sub#1"
    clock.now += 0.5
    assert cache.get("sub", fetch) == "sub#2"


def test_cache_evicts_the_least_recently_used_entry_beyond_its_bound() -> None:
    clock, fetch = Clock(), Fetcher()
    cache: Cache[str] = Cache(ttl=100, max_entries=2, clock=clock)
    cache.get("a", fetch)
    cache.get("b", fetch)
    assert cache.get("a", fetch) == "a#1"  # a is now the most recently used
    cache.get("c", fetch)  # a third entry: b goes
    assert cache.get("a", fetch) == "a#1"
    assert cache.get("c", fetch) == "c#3"
    assert fetch.fetched == ["a", "b", "c"]
    assert cache.get("b", fetch) == "b#4"  # refetched, and a (least recent) goes
    assert cache.get("c", fetch) == "c#3"
    assert cache.get("a", fetch) == "a#5"


def test_cache_default_bound_is_ten_thousand_entries() -> None:
    assert CACHE_MAX_ENTRIES == 10_000
    fetch = Fetcher()
    cache: Cache[str] = Cache(clock=Clock())
    for index in range(CACHE_MAX_ENTRIES + 1):
        cache.get(str(index), fetch)
    assert cache.get("1", fetch) == "1#2"  # still held
    assert cache.get("0", fetch) == f"0#{CACHE_MAX_ENTRIES + 2}"  # the first one was dropped


# --- 2. idempotency keys past Stripe's 255 characters are hashed ----------------------------


@pytest.mark.parametrize("length", [255, 256])
def test_idempotency_key_longer_than_255_reaches_stripe_hashed(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, length: int
) -> None:
    start = hours_ago(3)
    timestamp = int(start.timestamp()) + 1
    suffix = f":{billing.api}:{timestamp}:7"
    message_id = "msg_" + "x" * (length - len(suffix) - 4)
    key = message_id + suffix
    assert len(key) == length
    response = deliver(client, report([7], first=start), message_id)
    assert response.status_code == 200, response.json
    [sent] = usage_posts(stripe_fake)
    expected = key if length <= 255 else "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert sent.headers["idempotency-key"] == expected
    assert stripe_fake.usage_total(billing.api) == 7


# --- 3. windows that start in the future, a moment ago, or are still open ---------------------


def test_window_starting_in_the_future_is_400_before_asking_stripe(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    start = open_hour() + timedelta(hours=1)
    response = deliver(client, report(rows=[window(start, start + timedelta(hours=1), 1)]))
    assert response.status_code == 400, response.json
    assert "future" in answer(response)["message"]
    assert stripe_fake.requests == []


def test_window_started_less_than_a_second_ago_is_503_until_its_timestamp_is_past(
    app: Flask, stripe_fake: FakeStripe, billing: Billing
) -> None:
    client = app.test_client()
    assert deliver(client, report([1], first=hours_ago(5)), "msg_warm").status_code == 200
    start = datetime.fromtimestamp(int(time.time()) - 60, UTC)
    bridge = app.extensions["bridge"]
    bridge.clock = lambda: start.timestamp() + 0.5  # the bridge's clock, half a second in
    event = report(rows=[window(start, start + timedelta(minutes=1), 4)])
    response = deliver(client, event, "msg_now")
    assert response.status_code == 503, response.json
    assert answer(response)["error"] == "stripe_unavailable"
    assert "less than a second ago" in answer(response)["message"]
    assert len(usage_posts(stripe_fake)) == 1  # the warm-up's only: nothing sent for this one
    bridge.clock = lambda: start.timestamp() + 1  # Svix's next attempt, a moment later
    assert deliver(client, event, "msg_now").status_code == 200
    assert stripe_fake.usage_records(billing.api)[int(start.timestamp()) + 1] == 4


def test_open_window_is_written_as_it_stands_and_a_later_report_corrects_it(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    # What app.py does: only a window that started under a second ago waits; one that is still
    # open (ends in the future) is written now, and the next report's value replaces it.
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    end = start + timedelta(hours=1)
    assert end > datetime.now(UTC)
    first = deliver(client, report(rows=[window(start, end, 3)]), "msg_open_1")
    assert first.status_code == 200, first.json
    later = deliver(client, report(rows=[window(start, end, 8)]), "msg_open_2")
    assert later.status_code == 200, later.json
    assert stripe_fake.usage_records(billing.api) == {int(start.timestamp()) + 1: 8}


def test_open_window_to_a_raw_meter_is_left_out_and_listed(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    # A raw meter keeps a window's first event for good: a partial value would stick.
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    event = report(rows=[window(start, start + timedelta(hours=1), 3)], meter="raw_units")
    response = deliver(client, event, "msg_raw_open")
    assert response.status_code == 200, response.json
    assert answer(response)["incomplete"][0]["window_start"] == start.isoformat()
    assert stripe_fake.meter_events("raw_units") == []
    closed = report(rows=[window(start - timedelta(hours=1), start, 3)], meter="raw_units")
    assert deliver(client, closed, "msg_raw_closed").status_code == 200
    assert len(stripe_fake.meter_events("raw_units")) == 1


# --- 4. which Stripe failures are retried within one delivery --------------------------------


def statuses(fake: FakeStripe) -> list[int]:
    """The statuses of the usage-record requests the bridge sent (0: connection dropped)."""
    return [
        r.status for r in usage_posts(fake) if r.headers.get("user-agent", "").startswith("Stripe")
    ]


@pytest.mark.parametrize(("fault", "first_status"), [("429_lock", 429), ("500", 500), ("drop", 0)])
def test_retryable_failure_is_retried_within_the_delivery(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, fault: str, first_status: int
) -> None:
    stripe_fake.inject(fault, path="/usage_records", count=1)
    response = deliver(client, report([5]))
    assert response.status_code == 200, response.json
    assert statuses(stripe_fake) == [first_status, 200]
    assert stripe_fake.usage_total(billing.api) == 5


def test_rate_limit_is_retried_after_the_budgets_pause_three_tries_at_most(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    # A 429 with Stripe-Rate-Limited-Reason was never executed: its retry runs afresh.
    stripe_fake.inject("429_rate", path="/usage_records", count=3)
    response = deliver(client, report([5]), "msg_rate")
    assert response.status_code == 503, response.json
    assert answer(response)["error"] == "stripe_unavailable"
    assert statuses(stripe_fake) == [429, 429, 429]
    stripe_fake.inject("429_rate", path="/usage_records", count=1)
    assert deliver(client, report([5]), "msg_rate").status_code == 200  # Svix's next attempt
    assert statuses(stripe_fake)[3:] == [429, 200]


def test_500_is_tried_three_times_at_most(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    stripe_fake.inject("500", path="/usage_records", count=3)
    response = deliver(client, report([5]))
    assert response.status_code == 503, response.json
    assert statuses(stripe_fake) == [500, 500, 500]
    assert stripe_fake.usage_total(billing.api) == 0


def test_no_retry_when_the_backoff_would_outlast_the_time_budget(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    client = create_app(environment | {"TIME_BUDGET_SECONDS": "1"}).test_client()
    stripe_fake.inject("500", path="/usage_records", count=1)
    response = deliver(client, report([5]))
    assert response.status_code == 503, response.json
    assert statuses(stripe_fake) == [500]


def test_idempotency_key_in_use_409_is_retried(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    assert deliver(client, report([1], first=hours_ago(8)), "msg_warm").status_code == 200
    start = hours_ago(3)
    timestamp = int(start.timestamp()) + 1
    key = f"msg_409:{billing.api}:{timestamp}:6"
    # Another request with the same key is still running in Stripe when the bridge sends, and
    # for a second: the bridge's first send needs no luck to land in it, and its last retry
    # (0.5 + 1 s of backoff later) lands after it.
    stripe_fake.latency = 1.0
    other = urllib.request.Request(
        f"{stripe_fake.url}/v1/subscription_items/{billing.api}/usage_records",
        data=urllib.parse.urlencode(
            {"quantity": 6, "timestamp": timestamp, "action": "set"}
        ).encode(),
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "Idempotency-Key": key,
            "Stripe-Version": USAGE_RECORDS_API_VERSION,
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "other-client",
        },
    )
    thread = threading.Thread(target=lambda: urllib.request.urlopen(other, timeout=5).read())
    thread.start()
    wait_until(lambda: any(k == key for _, k in stripe_fake._idempotency), timeout=5)
    response = deliver(client, report([6], first=start), "msg_409")
    thread.join()
    assert response.status_code == 200, response.json
    codes = statuses(stripe_fake)  # the warm-up's, the 409 (one or two) and the retry's replay
    assert codes[0] == 200 and set(codes[1:-1]) == {409} and codes[-1] == 200, codes
    assert usage_posts(stripe_fake)[-1].idempotent_replay
    assert stripe_fake.usage_total(billing.api) == 1 + 6


def test_400_is_not_retried(client: FlaskClient, stripe_fake: FakeStripe, billing: Billing) -> None:
    old = hours_ago(24 * 40)  # before the subscription's billing period: Stripe says 400
    response = deliver(client, report([5], first=old))
    assert response.status_code == 422, response.json
    assert statuses(stripe_fake) == [400]


# --- 5. a key Stripe rejects is the operator's to fix: 503, not 422 -------------------------


def test_wrong_api_key_is_503_naming_stripe_api_key(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    client = create_app(environment | {"STRIPE_API_KEY": "sk_test_revoked000000"}).test_client()
    response = deliver(client, report([5]))
    assert response.status_code == 503, response.json
    body = answer(response)
    assert body["error"] == "stripe_unavailable"
    assert body["message"] == "Stripe rejected the API key"
    assert "STRIPE_API_KEY" in body["hint"]
    assert [r.status for r in stripe_fake.requests] == [401]  # not retried


def test_key_rejected_on_a_write_is_503_not_a_refusal(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    assert deliver(client, report([1], first=hours_ago(8)), "msg_warm").status_code == 200
    stripe_fake.api_key = "sk_test_rolled_key_0000"  # the key is rolled in the dashboard
    response = deliver(client, report([5]), "msg_rolled")
    assert response.status_code == 503, response.json
    assert answer(response)["message"] == "Stripe rejected the API key"
    assert "STRIPE_API_KEY" in answer(response)["hint"]
    assert statuses(stripe_fake) == [200, 401]


# --- 6. overlapping windows ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second_start", "second_end"),
    [(30, 90), (0, 30), (15, 45)],  # minutes after the first window's start; it lasts 60
)
def test_overlapping_windows_are_400_before_asking_stripe(
    client: FlaskClient, stripe_fake: FakeStripe, second_start: int, second_end: int
) -> None:
    base = hours_ago(5)
    rows = [
        window(base, base + timedelta(minutes=60), 1),
        window(base + timedelta(minutes=second_start), base + timedelta(minutes=second_end), 2),
    ]
    response = deliver(client, report(rows=rows))
    assert response.status_code == 400, response.json
    assert "overlap" in answer(response)["message"]
    assert stripe_fake.requests == []


def test_adjacent_windows_do_not_overlap(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    base = hours_ago(5)
    rows = [window(base + timedelta(hours=1), base + timedelta(hours=2), 2)]
    rows.append(window(base, base + timedelta(hours=1), 1))
    assert deliver(client, report(rows=rows)).status_code == 200
    assert stripe_fake.usage_total(billing.api) == 3


# --- 7. subscriptions with more items than one page ------------------------------------------


def test_price_beyond_the_embedded_items_and_the_first_page_is_found(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    response = deliver(client, report([9], subject="big", meter="far_away"))
    assert response.status_code == 200, response.json
    assert stripe_fake.usage_total(stripe_fake.item_id("sub_1Big", "price_1Far")) == 9
    pages = [r for r in stripe_fake.requests if r.path == "/v1/subscription_items"]
    # Paged at the client's version, and again at acacia for the items' billing thresholds.
    by_version = sorted((r.headers["stripe-version"], r.params["limit"]) for r in pages)
    assert by_version == sorted(
        [(stripe.api_version, "100")] * 2 + [(USAGE_RECORDS_API_VERSION, "100")] * 2
    )


# --- 8. OpenMeter's aggregation against a legacy price's aggregate_usage ---------------------


@pytest.mark.parametrize(
    ("meter", "aggregation", "price"),
    [
        ("api_requests", "SUM", "price_1Api"),
        ("api_requests", "COUNT", "price_1Api"),
        ("api_requests", None, "price_1Api"),  # no aggregation given: nothing to compare
        ("peak_users", "MAX", "price_1Max"),
        ("seats_now", "LATEST", "price_1LastPeriod"),
        ("seats_now", "latest", "price_1LastPeriod"),
        ("seats_ever", "LATEST", "price_1LastEver"),
    ],
)
def test_matching_aggregation_is_written(
    client: FlaskClient,
    stripe_fake: FakeStripe,
    billing: Billing,
    meter: str,
    aggregation: str | None,
    price: str,
) -> None:
    event = report([4], meter=meter)
    event["meter"]["aggregation"] = aggregation
    if aggregation is None:
        del event["meter"]["aggregation"]
    response = deliver(client, event)
    assert response.status_code == 200, response.json
    assert stripe_fake.usage_total(stripe_fake.item_id(billing.customer1, price)) == 4


def test_a_max_window_is_the_largest_of_its_group_rows_not_their_sum(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    first = hours_ago(3)
    event = report([10], meter="peak_users", first=first)
    event["meter"]["aggregation"] = "MAX"
    row = dict(event["usage"][0], value=8, groupBy={"region": "eu"})  # the window, another group
    event["usage"].append(row)
    response = deliver(client, event)
    assert response.status_code == 200, response.json
    # The meter's MAX over the window is the peak of every group: 10, not 10 + 8.
    assert stripe_fake.usage_total(stripe_fake.item_id(billing.customer1, "price_1Max")) == 10


@pytest.mark.parametrize(
    ("meter", "aggregation", "stripe_side"),
    [
        ("api_requests", "MAX", "sum"),
        ("api_requests", "LATEST", "sum"),
        ("api_requests", "AVG", "sum"),
        ("api_requests", "MIN", "sum"),
        ("api_requests", "UNIQUE_COUNT", "sum"),
        ("peak_users", "SUM", "max"),
        ("peak_users", "LATEST", "max"),
        ("seats_now", "SUM", "last_during_period"),
        ("seats_ever", "MAX", "last_ever"),
    ],
)
def test_mismatched_aggregation_on_a_legacy_price_is_422_before_any_write(
    client: FlaskClient, stripe_fake: FakeStripe, meter: str, aggregation: str, stripe_side: str
) -> None:
    event = report([4], meter=meter)
    event["meter"]["aggregation"] = aggregation
    response = deliver(client, event)
    assert response.status_code == 422, response.json
    body = answer(response)
    assert (body["openmeter_aggregation"], body["stripe_aggregation"]) == (aggregation, stripe_side)
    assert usage_posts(stripe_fake) == []


# --- 9. a licensed price cannot take usage ---------------------------------------------------


def test_licensed_price_is_422_without_a_write(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    response = deliver(client, report([4], meter="seats"))
    assert response.status_code == 422, response.json
    body = answer(response)
    assert body["error"] == "stripe_refused"
    assert "not metered" in body["message"] and body["price"] == "price_1Seat"
    assert usage_posts(stripe_fake) == []


# --- 10. a refused write drops the cached subscription -----------------------------------------


def test_refused_write_refetches_the_subscription_and_a_transient_failure_does_not(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    assert deliver(client, report([1], first=hours_ago(8)), "msg_1").status_code == 200
    assert subscription_reads(stripe_fake) == 1
    stripe_fake.inject("429_rate", path="/usage_records", count=None)  # every try
    assert deliver(client, report([1], first=hours_ago(7)), "msg_2").status_code == 503
    stripe_fake.clear_faults()
    assert deliver(client, report([1], first=hours_ago(6)), "msg_3").status_code == 200
    assert subscription_reads(stripe_fake) == 1  # Stripe was down: what it said still holds
    refused = deliver(client, report([1], first=hours_ago(24 * 40)), "msg_4")
    assert refused.status_code == 422, refused.json
    assert subscription_reads(stripe_fake) == 1
    assert deliver(client, report([1], first=hours_ago(5)), "msg_5").status_code == 200
    assert subscription_reads(stripe_fake) == 2  # Stripe refused: the subscription is re-read


# --- 11. a multiplier on a meter keeps the exact decimal ------------------------------------


def test_multiplier_reaches_a_meter_as_an_exact_plain_decimal(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    values = [1, 1234567, 1000000, "2.5", 0]
    response = deliver(client, report(values, meter="milli_units"))
    assert response.status_code == 200, response.json
    sent = [event["payload"]["value"] for event in stripe_fake.meter_events("milli_units")]
    assert sent == ["0.001", "1234.567", "1000", "0.0025", "0"]


# --- 12. a window needs a whole second inside it after its start -------------------------------


def test_one_second_window_is_400_and_nothing_of_the_report_is_written(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    start = hours_ago(3)
    rows = [
        window(start, start + timedelta(seconds=2), 1),
        window(start + timedelta(seconds=2), start + timedelta(seconds=3), 2),
    ]
    response = deliver(client, report(rows=rows))
    assert response.status_code == 400, response.json
    assert "shorter than two seconds" in answer(response)["message"]
    assert usage_posts(stripe_fake) == []


def test_two_second_window_is_written_inside_itself(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    start = hours_ago(3)
    response = deliver(client, report(rows=[window(start, start + timedelta(seconds=2), 5)]))
    assert response.status_code == 200, response.json
    assert stripe_fake.usage_records(billing.api) == {int(start.timestamp()) + 1: 5}


# --- 13. the ledger is written every 50 writes, so a killed worker redoes at most 50 ---------


def test_killed_mid_report_the_next_attempt_skips_every_recorded_batch_of_50(
    client: FlaskClient,
    stripe_fake: FakeStripe,
    billing: Billing,
    environment: dict[str, str],
    tmp_path: Path,
) -> None:
    windows = 150
    event = report([2] * windows, first=hours_ago(windows + 20))
    body = tmp_path / "report.json"
    body.write_text(json.dumps(event))
    env = {**os.environ, **environment}
    env.pop("OPENMETER_WEBHOOK_SECRET")
    stripe_fake.latency = 0.01
    log = tmp_path / "replay.log"
    with log.open("wb") as output:
        # A worker running the webhook's path (replay has no signature to check), killed hard.
        process = subprocess.Popen(
            [*REPLAY, str(body), "--message-id", "msg_killed"],
            cwd=APP_DIR,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: len(usage_posts(stripe_fake)) >= 70 or process.poll() is not None, 20
            )
        finally:
            process.kill()
            process.wait()
    stripe_fake.latency = 0
    wait_until(lambda: stripe_fake.in_flight == 0)  # what the dead worker sent ends in Stripe
    before = len(usage_posts(stripe_fake))
    assert 70 <= before < windows, log.read_text()
    response = deliver(client, event, "msg_killed")
    assert response.status_code == 200, response.json
    skipped = answer(response)["skipped"]
    assert skipped >= 50 and skipped % 50 == 0 and before - skipped <= 50, (before, skipped)
    assert answer(response)["sent"] == windows - skipped
    first_start = datetime.fromisoformat(event["usage"][0]["windowStart"]).timestamp()
    first_unrecorded = int(first_start) + skipped * 3600 + 1
    resent = [int(r.params["timestamp"]) for r in usage_posts(stripe_fake)[before:]]
    assert min(resent) == first_unrecorded  # nothing the ledger recorded was sent again
    assert stripe_fake.usage_total(billing.api) == 2 * windows
