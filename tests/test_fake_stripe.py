"""The fake Stripe keeps Stripe's rules: checked with the real stripe client over real HTTP."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests.fake_stripe import (
    DUPLICATE_METER_EVENT_MESSAGE,
    FIXTURE_KEYS,
    TIMESTAMP_OUT_OF_RANGE_MESSAGE,
    FakeStripe,
    decode_form,
)
from tests.harness import wait_until

API_KEY = "sk_test_fakestripe0123456789"
ACACIA = "2025-02-24.acacia"
HOUR = 3_600
NOW = 1_790_000_000  # the fake clock's start, on an hour boundary + 800 s
PROJECT = Path(__file__).resolve().parent.parent
EXAMPLE_FIXTURES = PROJECT / "docs" / "fake-stripe-fixtures.json"


class Clock:
    """A settable clock for the fake."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeStripe]:
    fake = FakeStripe(API_KEY, now=clock)
    fake.start()
    yield fake
    fake.stop()


def connect(fake: FakeStripe, *, key: str = API_KEY, timeout: float = 5.0) -> stripe.StripeClient:
    """The real client, pointed at the fake, without hidden retries."""
    return stripe.StripeClient(
        key,
        base_addresses={"api": fake.url},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    return connect(fake)


@pytest.fixture
def item(fake: FakeStripe) -> str:
    """A legacy metered item whose period started 30 days before the fake's now."""
    fake.add_price("price_legacy")
    fake.add_subscription("sub_1", customer="cus_1", prices=["price_legacy"])
    return fake.item_id("sub_1", "price_legacy")


def record_usage(
    client: stripe.StripeClient,
    item: str,
    quantity: int | str,
    timestamp: int | str,
    *,
    action: str = "set",
    version: str | None = ACACIA,
    key: str | None = None,
) -> dict[str, Any]:
    """One legacy usage record, sent the way the bridge sends it."""
    response = client.raw_request(
        "post",
        f"/v1/subscription_items/{item}/usage_records",
        quantity=quantity,
        timestamp=timestamp,
        action=action,
        stripe_version=version,
        idempotency_key=key,
    )
    record: dict[str, Any] = client.deserialize(response, api_mode="V1").to_dict()
    return record


def control(fake: FakeStripe, path: str, body: object = None) -> Any:
    """Calls the fake's /_fake/ control API like a separate process would."""
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(f"{fake.url}/_fake/{path}", data=data, timeout=5) as response:
        return json.load(response)


def fake_get(fake: FakeStripe, path: str, headers: dict[str, str]) -> Any:
    """A GET with exactly these headers (the stripe client always sends a Stripe-Version)."""
    request = urllib.request.Request(f"{fake.url}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def meters(fake: FakeStripe) -> None:
    """A raw sum meter, an hourly pre-aggregated one and a count meter, for customer cus_1."""
    fake.add_customer("cus_1")
    fake.add_meter("mtr_raw", event_name="api_requests")
    fake.add_meter("mtr_hourly", event_name="tokens", event_time_window="hour")
    fake.add_meter("mtr_count", event_name="logins", formula="count")


def meter_event(
    client: stripe.StripeClient, event_name: str, value: str, identifier: str, **extra: Any
) -> dict[str, Any]:
    """Sends one meter event for cus_1."""
    params: dict[str, Any] = {
        "event_name": event_name,
        "payload": {"stripe_customer_id": "cus_1", "value": value},
        "identifier": identifier,
        "timestamp": NOW - 10,
        **extra,
    }
    event: dict[str, Any] = client.v1.billing.meter_events.create(params=params).to_dict()  # type: ignore[arg-type]
    return event


# --- reads ------------------------------------------------------------------------------------


def test_subscription_embeds_items_with_full_prices(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    fake.add_meter("mtr_1", event_name="tokens")
    fake.add_price("price_meter", meter="mtr_1")
    fake.add_price("price_legacy", aggregate_usage="max")
    fake.add_subscription("sub_1", prices=["price_meter", "price_legacy"])
    found = client.v1.subscriptions.retrieve("sub_1").to_dict()
    items = found["items"]["data"]
    assert [i["price"]["id"] for i in items] == ["price_meter", "price_legacy"]
    assert items[0]["price"]["recurring"]["meter"] == "mtr_1"
    # basil removed aggregate_usage "from all API endpoints": not even a legacy price shows it
    assert "aggregate_usage" not in items[1]["price"]["recurring"]
    assert items[1]["current_period_start"] == NOW - 30 * 86_400
    assert "current_period_start" not in found  # basil moved it to the items
    assert fake.requests[-1].headers["stripe-version"] == stripe.api_version


def test_pre_basil_versions_see_the_period_on_the_subscription(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    options: Any = {"stripe_version": ACACIA}
    found = client.v1.subscriptions.retrieve("sub_1", options=options).to_dict()
    assert found["current_period_start"] == NOW - 30 * 86_400
    assert "current_period_start" not in found["items"]["data"][0]  # not on items before basil
    assert found["items"]["data"][0]["price"]["recurring"]["aggregate_usage"] == "sum"
    assert fake.requests[-1].headers["stripe-version"] == ACACIA
    listed = client.v1.subscription_items.list(params={"subscription": "sub_1"}, options=options)
    assert "current_period_start" not in listed.to_dict()["data"][0]


@pytest.mark.parametrize(
    ("version", "aggregate_usage"),
    [(ACACIA, "max"), ("2025-03-31.basil", None), (None, None)],
    ids=["acacia", "basil", "client_default"],
)
def test_price_get_shows_aggregate_usage_only_before_basil(
    fake: FakeStripe, client: stripe.StripeClient, version: str | None, aggregate_usage: str | None
) -> None:
    fake.add_price("price_legacy", aggregate_usage="max")
    options: Any = {"stripe_version": version} if version else {}
    recurring = client.v1.prices.retrieve("price_legacy", options=options).to_dict()["recurring"]
    assert recurring.get("aggregate_usage") == aggregate_usage
    assert ("aggregate_usage" in recurring) == (aggregate_usage is not None)
    assert recurring["usage_type"] == "metered" and recurring["meter"] is None


def test_requests_without_a_version_get_the_accounts_default(fake: FakeStripe) -> None:
    fake.add_price("price_legacy", aggregate_usage="sum")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    fake.default_version = ACACIA
    recurring = fake_get(fake, "/v1/prices/price_legacy", headers)["recurring"]
    assert recurring["aggregate_usage"] == "sum"
    fake.default_version = "2026-10-28.endive"
    assert "aggregate_usage" not in fake_get(fake, "/v1/prices/price_legacy", headers)["recurring"]


def test_more_than_ten_items_are_paged(fake: FakeStripe, client: stripe.StripeClient) -> None:
    prices = [fake.add_price(f"price_{n:02}") for n in range(12)]
    fake.add_subscription("sub_1", prices=prices)
    embedded = client.v1.subscriptions.retrieve("sub_1").to_dict()["items"]
    assert len(embedded["data"]) == 10 and embedded["has_more"]
    rest = client.v1.subscription_items.list(
        params={"subscription": "sub_1", "limit": 100, "starting_after": embedded["data"][-1]["id"]}
    ).to_dict()
    assert [i["price"]["id"] for i in rest["data"]] == ["price_10", "price_11"]
    assert rest["has_more"] is False


def test_unknown_ids_are_404_resource_missing(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.prices.retrieve("price_x")
    assert caught.value.http_status == 404
    assert caught.value.code == "resource_missing" and caught.value.param == "id"
    assert caught.value.user_message == "No such price: 'price_x'"


def test_unknown_path_is_unrecognized_url(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError, match="Unrecognized request URL"):
        client.raw_request("get", "/v1/nothing_here")


def test_wrong_key_is_401_and_the_key_is_masked(fake: FakeStripe) -> None:
    with pytest.raises(stripe.AuthenticationError) as caught:
        connect(fake, key="sk_test_wrong0123456789abcd").v1.customers.retrieve("cus_1")
    assert caught.value.http_status == 401
    assert "sk_test_" in str(caught.value) and "abcd" in str(caught.value)
    assert "0123456789" not in str(caught.value)


def test_unknown_parameters_are_refused(client: stripe.StripeClient, item: str) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.raw_request(
            "post",
            f"/v1/subscription_items/{item}/usage_records",
            quantity=1,
            colour="red",
            stripe_version=ACACIA,
        )
    assert caught.value.code == "parameter_unknown" and caught.value.param == "colour"


def test_form_bodies_decode_to_nested_dicts_and_lists() -> None:
    assert decode_form("a=1&payload[x]=2&expand[0]=b&expand[1]=c&cancel[identifier]=d") == {
        "a": "1",
        "payload": {"x": "2"},
        "expand": ["b", "c"],
        "cancel": {"identifier": "d"},
    }


# --- usage records ----------------------------------------------------------------------------


def test_set_overwrites_a_timestamp_and_increment_adds(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    record = record_usage(client, item, 5, NOW - HOUR)
    assert record["object"] == "usage_record" and record["id"].startswith("mbur_")
    assert record["quantity"] == 5 and record["subscription_item"] == item
    record_usage(client, item, 7, NOW - HOUR)
    record_usage(client, item, 2, NOW - 2 * HOUR, action="increment")
    record_usage(client, item, 3, NOW - 2 * HOUR, action="increment")
    assert fake.usage_records(item) == {NOW - HOUR: 7, NOW - 2 * HOUR: 5}
    assert fake.usage_total(item) == 12


def test_timestamp_now_means_the_fake_clock(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    assert record_usage(client, item, 1, "now")["timestamp"] == NOW
    assert fake.usage_records(item) == {NOW: 1}


def test_usage_records_need_a_pre_basil_version(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    with pytest.raises(stripe.InvalidRequestError, match=r"removed in API version 2025-03-31"):
        record_usage(client, item, 5, NOW - HOUR, version=None)
    assert fake.requests[-1].headers["stripe-version"] == "2026-10-28.endive"
    assert fake.writes() == []
    record_usage(client, item, 5, NOW - HOUR, version="2024-06-20")
    assert fake.usage_total(item) == 5


@pytest.mark.parametrize(
    ("timestamp", "message"),
    [
        (NOW - 31 * 86_400, TIMESTAMP_OUT_OF_RANGE_MESSAGE),
        (NOW + 60, "must not be in the future"),
    ],
    ids=["before_period_start", "future"],
)
def test_timestamps_outside_the_period_are_refused(
    fake: FakeStripe, client: stripe.StripeClient, item: str, timestamp: int, message: str
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        record_usage(client, item, 5, timestamp)
    assert caught.value.http_status == 400 and caught.value.param == "timestamp"
    assert message in str(caught.value.user_message)
    assert fake.usage_records(item) == {}


def test_period_start_itself_is_accepted(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    record_usage(client, item, 4, NOW - 30 * 86_400)
    assert fake.usage_total(item) == 4


@pytest.mark.parametrize(
    ("price", "message"),
    [("meter", "not on the legacy metered billing system"), ("licensed", "not metered")],
)
def test_only_legacy_metered_prices_take_usage_records(
    fake: FakeStripe, client: stripe.StripeClient, price: str, message: str
) -> None:
    fake.add_meter("mtr_1", event_name="tokens")
    fake.add_price("price_meter", meter="mtr_1")
    fake.add_price("price_licensed", usage_type="licensed")
    fake.add_subscription("sub_1", prices=[f"price_{price}"])
    with pytest.raises(stripe.InvalidRequestError, match=message):
        record_usage(client, fake.item_id("sub_1", f"price_{price}"), 1, NOW - HOUR)


def test_canceled_subscription_refuses_usage(fake: FakeStripe, client: stripe.StripeClient) -> None:
    fake.add_price("price_legacy")
    fake.add_subscription("sub_1", prices=["price_legacy"], status="canceled")
    with pytest.raises(stripe.InvalidRequestError, match="canceled"):
        record_usage(client, fake.item_id("sub_1", "price_legacy"), 1, NOW - HOUR)


@pytest.mark.parametrize("where", ["subscription", "item"])
def test_billing_thresholds_allow_increment_only(
    fake: FakeStripe, client: stripe.StripeClient, item: str, where: str
) -> None:
    # 2023 spec, POST /v1/subscription_items/{subscription_item}/usage_records, `action`: "If the
    # subscription has billing thresholds, `increment` is the only allowed value."
    if where == "subscription":
        fake.set_billing_thresholds("sub_1", amount_gte=5000)
    else:
        fake.set_billing_thresholds("sub_1", item=item, usage_gte=1000)
    with pytest.raises(stripe.InvalidRequestError, match="billing thresholds") as caught:
        record_usage(client, item, 5, NOW - HOUR)
    assert caught.value.http_status == 400 and caught.value.param == "action"
    record_usage(client, item, 2, NOW - HOUR, action="increment")
    assert fake.usage_records(item) == {NOW - HOUR: 2}


def test_unknown_item_is_404(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        record_usage(client, "si_missing", 1, NOW - HOUR)
    assert caught.value.http_status == 404 and caught.value.code == "resource_missing"


# --- idempotency ------------------------------------------------------------------------------


def test_same_key_same_params_is_replayed_not_performed(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    first = record_usage(client, item, 5, NOW - HOUR, action="increment", key="k1")
    second = record_usage(client, item, 5, NOW - HOUR, action="increment", key="k1")
    assert second == first
    assert fake.usage_total(item) == 5
    assert len(fake.writes()) == 1
    assert fake.requests[-1].idempotent_replay


def test_same_key_other_params_is_an_idempotency_error(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    record_usage(client, item, 5, NOW - HOUR, key="k1")
    with pytest.raises(stripe.IdempotencyError, match="Try using a key other than 'k1'"):
        record_usage(client, item, 6, NOW - HOUR, key="k1")
    assert fake.usage_total(item) == 5


def test_endpoint_errors_are_replayed_but_validation_errors_are_not(
    fake: FakeStripe, client: stripe.StripeClient, item: str, clock: Clock
) -> None:
    with pytest.raises(stripe.InvalidRequestError):
        record_usage(client, item, 5, NOW + 60, key="k_soon")
    clock.now += 120
    with pytest.raises(stripe.InvalidRequestError):  # the saved 400, though it would pass now
        record_usage(client, item, 5, NOW + 60, key="k_soon")
    assert fake.requests[-1].idempotent_replay
    with pytest.raises(stripe.InvalidRequestError) as caught:
        record_usage(client, item, "five", NOW - HOUR, key="k_bad")
    assert caught.value.code == "parameter_invalid_integer"
    record_usage(client, item, 5, NOW - HOUR, key="k_bad")  # validation did not spend the key
    assert fake.usage_total(item) == 5


def test_overlong_idempotency_key_is_refused(client: stripe.StripeClient, item: str) -> None:
    with pytest.raises(stripe.InvalidRequestError, match="at most 255"):
        record_usage(client, item, 5, NOW - HOUR, key="k" * 256)


def test_key_in_use_is_409(fake: FakeStripe, client: stripe.StripeClient, item: str) -> None:
    fake.latency = 1.5  # the second call comes well inside the first's time
    first = threading.Thread(
        target=record_usage, args=(client, item, 5, NOW - HOUR), kwargs={"key": "k1"}
    )
    first.start()
    wait_until(lambda: any(key == "k1" for _, key in fake._idempotency))  # the first holds it
    with pytest.raises(stripe.APIError) as caught:
        record_usage(connect(fake), item, 5, NOW - HOUR, key="k1")
    first.join()
    assert caught.value.http_status == 409
    assert caught.value.error is not None and caught.value.error.code == "idempotency_key_in_use"
    assert fake.usage_total(item) == 5


def test_concurrent_writes_to_one_item_hit_its_lock(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    fake.latency, fake.lock_wait = 1.5, 0.1  # the second comes well inside the first's hold
    errors: list[Exception] = []

    def write(n: int) -> None:
        try:
            record_usage(connect(fake), item, n, NOW - n * HOUR)
        except stripe.StripeError as error:
            errors.append(error)

    writers = [threading.Thread(target=write, args=(n,)) for n in (1, 2)]
    writers[0].start()
    wait_until(lambda: any(lock.locked() for lock in fake._object_locks.values()))
    writers[1].start()  # while the first holds the item
    for writer in writers:
        writer.join()
    assert len(errors) == 1 and isinstance(errors[0], stripe.RateLimitError)
    assert errors[0].error is not None and errors[0].error.code == "lock_timeout"
    assert (errors[0].headers or {}).get("stripe-should-retry") == "true"
    assert len(fake.usage_records(item)) == 1


# --- meter events -----------------------------------------------------------------------------


@pytest.mark.usefixtures("meters")
def test_raw_meter_sums_every_event(fake: FakeStripe, client: stripe.StripeClient) -> None:
    event = meter_event(client, "api_requests", "2.5", "e1")
    assert event["object"] == "billing.meter_event" and event["identifier"] == "e1"
    assert event["payload"] == {"stripe_customer_id": "cus_1", "value": "2.5"}
    meter_event(client, "api_requests", "4", "e2")
    assert fake.meter_value("mtr_raw", "cus_1") == Decimal("6.5")
    assert [e["identifier"] for e in fake.meter_events("api_requests")] == ["e1", "e2"]


@pytest.mark.usefixtures("meters")
def test_duplicate_identifier_is_refused(fake: FakeStripe, client: stripe.StripeClient) -> None:
    meter_event(client, "api_requests", "1", "e1")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        meter_event(client, "api_requests", "1", "e1")
    assert caught.value.user_message == DUPLICATE_METER_EVENT_MESSAGE.format(identifier="e1")
    assert fake.meter_value("mtr_raw", "cus_1") == 1


@pytest.mark.usefixtures("meters")
def test_pre_aggregated_bucket_keeps_the_newest_received(
    fake: FakeStripe, client: stripe.StripeClient
) -> None:
    hour = NOW - NOW % HOUR
    meter_event(client, "tokens", "10", "a", timestamp=hour + 5)
    meter_event(client, "tokens", "3", "b", timestamp=hour + 1)  # older timestamp, newer receipt
    meter_event(client, "tokens", "7", "c", timestamp=hour - 5)
    assert fake.meter_buckets("mtr_hourly", "cus_1") == {hour - HOUR: 7, hour: 3}
    assert fake.meter_value("mtr_hourly", "cus_1") == 10
    buckets = control(fake, "state")["meter_buckets"]["mtr_hourly"]
    assert buckets == {"cus_1": {str(hour - HOUR): "7", str(hour): "3"}}


@pytest.mark.usefixtures("meters")
def test_count_meter_counts_events(fake: FakeStripe, client: stripe.StripeClient) -> None:
    for _ in range(3):
        client.v1.billing.meter_events.create(
            params={"event_name": "logins", "payload": {"stripe_customer_id": "cus_1"}}
        )
    assert fake.meter_value("mtr_count", "cus_1") == 3


@pytest.mark.usefixtures("meters")
def test_cancel_within_24_hours(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock
) -> None:
    meter_event(client, "api_requests", "5", "e1")
    meter_event(client, "api_requests", "2", "e2")
    adjustment = client.v1.billing.meter_event_adjustments.create(
        params={"event_name": "api_requests", "type": "cancel", "cancel": {"identifier": "e1"}}
    ).to_dict()
    assert adjustment["object"] == "billing.meter_event_adjustment"
    assert adjustment["cancel"] == {"identifier": "e1"}
    assert fake.meter_value("mtr_raw", "cus_1") == 2
    clock.now += 86_400
    with pytest.raises(stripe.InvalidRequestError, match="within 24 hours"):
        client.v1.billing.meter_event_adjustments.create(
            params={"event_name": "api_requests", "type": "cancel", "cancel": {"identifier": "e2"}}
        )
    with pytest.raises(stripe.InvalidRequestError, match="No meter event"):
        client.v1.billing.meter_event_adjustments.create(
            params={"event_name": "api_requests", "type": "cancel", "cancel": {"identifier": "x"}}
        )


@pytest.mark.usefixtures("meters")
@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"event_name": "unknown"}, "event_name"),
        ({"payload": {"stripe_customer_id": "cus_x", "value": "1"}}, "payload[stripe_customer_id]"),
        ({"payload": {"stripe_customer_id": "cus_1"}}, "payload[value]"),
        ({"payload": {"stripe_customer_id": "cus_1", "value": "1e3"}}, "payload[value]"),
        (
            {"payload": {"stripe_customer_id": "cus_1", "value": "1234567890.123456"}},
            "payload[value]",
        ),
        ({"timestamp": NOW - 36 * 86_400}, "timestamp"),
        ({"timestamp": NOW + 301}, "timestamp"),
        ({"identifier": "x" * 101}, "identifier"),
    ],
)
def test_invalid_meter_events_are_refused(
    fake: FakeStripe, client: stripe.StripeClient, change: dict[str, Any], param: str
) -> None:
    params = {
        "event_name": "api_requests",
        "payload": {"stripe_customer_id": "cus_1", "value": "1"},
        "timestamp": NOW,
        **change,
    }
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.billing.meter_events.create(params=params)  # type: ignore[arg-type]
    assert caught.value.http_status == 400 and caught.value.param == param
    assert fake.meter_events() == []


# --- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "error", "should_retry"),
    [
        ("500", stripe.APIError, None),
        ("429_lock", stripe.RateLimitError, "true"),
        ("429_rate", stripe.RateLimitError, None),
        ("drop", stripe.APIConnectionError, None),
    ],
)
def test_refusing_faults_do_not_perform(
    fake: FakeStripe,
    client: stripe.StripeClient,
    item: str,
    kind: str,
    error: type[stripe.StripeError],
    should_retry: str | None,
) -> None:
    fake.inject(kind, method="POST", path="/usage_records")
    with pytest.raises(error) as caught:
        record_usage(client, item, 5, NOW - HOUR, key="k1")
    assert (caught.value.headers or {}).get("stripe-should-retry") == should_retry
    assert fake.usage_total(item) == 0 and fake.writes() == []
    assert fake.faults_injected[kind] == 1
    if kind == "500":  # Stripe saves a 500 under its key: every retry with it replays the 500
        with pytest.raises(stripe.APIError):
            record_usage(client, item, 5, NOW - HOUR, key="k1")
        assert fake.requests[-1].idempotent_replay and fake.usage_total(item) == 0
        record_usage(client, item, 5, NOW - HOUR, key="k2")  # a fresh key writes
    else:
        record_usage(client, item, 5, NOW - HOUR, key="k1")  # the key was not spent
    assert fake.usage_total(item) == 5


def test_lost_response_is_performed_and_replayed_on_retry(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    fake.inject("lost_response", path="/usage_records")
    with pytest.raises(stripe.APIConnectionError):
        record_usage(client, item, 5, NOW - HOUR, action="increment", key="k1")
    assert fake.usage_total(item) == 5
    record_usage(client, item, 5, NOW - HOUR, action="increment", key="k1")
    assert fake.usage_total(item) == 5
    assert fake.requests[-1].idempotent_replay and len(fake.writes()) == 1


def test_late_response_outlives_a_short_client_timeout(fake: FakeStripe, item: str) -> None:
    fake.inject("late_response", path="/usage_records", delay=1.0)
    with pytest.raises(stripe.APIConnectionError):
        record_usage(connect(fake, timeout=0.3), item, 5, NOW - HOUR, key="k1")
    wait_until(lambda: len(fake.writes()) == 1)  # performed and saved; its answer comes late
    assert fake.usage_total(item) == 5
    record_usage(connect(fake), item, 5, NOW - HOUR, key="k1")
    assert fake.requests[-1].idempotent_replay


def test_probability_faults_are_seeded(fake: FakeStripe, client: stripe.StripeClient) -> None:
    fake.add_customer("cus_1")

    def failures() -> list[bool]:
        fake.clear_faults()
        fake.inject("500", method="GET", probability=0.5, seed=7)
        outcomes = []
        for _ in range(12):
            try:
                client.v1.customers.retrieve("cus_1")
                outcomes.append(False)
            except stripe.APIError:
                outcomes.append(True)
        return outcomes

    first = failures()
    assert failures() == first and 0 < sum(first) < 12
    assert fake.faults_injected["500"] == 2 * sum(first)


def test_latency_is_added_to_answers(fake: FakeStripe, client: stripe.StripeClient) -> None:
    fake.add_customer("cus_1")
    fake.latency = 0.2
    started = time.monotonic()
    client.v1.customers.retrieve("cus_1")
    assert time.monotonic() - started >= 0.2


# --- the control API and the command line -------------------------------------------------------


def test_control_api_drives_a_fake_from_another_process(fake: FakeStripe, item: str) -> None:
    fixtures = {
        "customers": ["cus_9"],
        "meters": [{"id": "mtr_9", "event_name": "jobs", "formula": "count"}],
        "prices": [{"id": "price_9", "meter": "mtr_9"}],
        "subscriptions": [{"id": "sub_9", "customer": "cus_9", "prices": ["price_9"]}],
    }
    assert control(fake, "fixtures", fixtures) == {"ok": True}
    control(fake, "faults", [{"kind": "500", "path": "/usage_records", "count": 2}])
    control(fake, "latency", {"seconds": 0.01})
    client = connect(fake)
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            record_usage(client, item, 1, NOW - HOUR)
    record_usage(client, item, 1, NOW - HOUR)
    state = control(fake, "state")
    assert state["subscriptions"]["sub_9"]["items"]["data"][0]["price"]["id"] == "price_9"
    assert state["usage_totals"] == {item: 1, fake.item_id("sub_9", "price_9"): 0}
    assert state["faults_injected"] == {"500": 2} and fake.latency == 0.01
    control(fake, "reset", {})
    assert control(fake, "state")["subscriptions"] == {} and fake.requests == []


def test_command_line_serves_until_terminated(tmp_path: Any) -> None:
    fixtures = tmp_path / "fixtures.json"
    fixtures.write_text(json.dumps({"customers": ["cus_cli"]}))
    command = [sys.executable, "-m", "tests.fake_stripe", "--port", "0", "--api-key", API_KEY]
    process = subprocess.Popen(
        [*command, "--fixtures", str(fixtures)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        customer = stripe.StripeClient(API_KEY, base_addresses={"api": url}).v1.customers.retrieve(
            "cus_cli"
        )
        assert customer.id == "cus_cli"
    finally:
        process.terminate()
    assert process.wait(timeout=5) == 0


def run_fake(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m tests.fake_stripe` with args, for a run that exits by itself."""
    command = [sys.executable, "-m", "tests.fake_stripe", *args]
    return subprocess.run(
        command, check=False, cwd=PROJECT, capture_output=True, text=True, timeout=30
    )


def test_help_names_the_fixtures_keys_the_fake_reads() -> None:
    run = run_fake("--help")
    assert run.returncode == 0, run.stderr
    assert re.search(r"customers,\s+meters,\s+prices,\s+subscriptions", run.stdout), run.stdout
    assert "subs " not in run.stdout and "subs," not in run.stdout


@pytest.mark.parametrize(
    ("fixtures", "refusal"),
    [
        ({"subs": []}, "unknown key 'subs'; the keys are customers, meters, prices, subscriptions"),
        (
            {"subscriptions": [{"prices": [], "period": 3}]},
            "subscriptions[0] has unknown key 'period'; a subscription takes id, customer, prices",
        ),
        (
            {"meters": [{"event_name": "jobs", "aggregation": "sum"}]},
            "meters[0] has unknown key 'aggregation'; a meter takes id, event_name, customer_key",
        ),
        (
            {"prices": [{"id": "price_1"}, {"id": "price_2", "currency": "eur"}]},
            "prices[1] has unknown key 'currency'; a price takes id, usage_type, aggregate_usage",
        ),
        ({"customers": [{"id": "cus_1"}]}, "customers[0] must be a customer id (a string)"),
        ({"subscriptions": [{"id": "sub_1"}]}, "subscriptions[0] is missing the required key"),
        ({"subscriptions": [{"prices": [], "cancel_at": "soon"}]}, "cancel_at must be Unix"),
        ({"prices": {"id": "price_1"}}, "prices must be a list"),
    ],
    ids=["top_level", "subscription", "meter", "price", "customer", "required", "type", "list"],
)
def test_fixtures_with_an_unknown_key_are_refused_naming_it(
    fixtures: dict[str, Any], refusal: str
) -> None:
    fake = FakeStripe(API_KEY)
    fake.add_customer("cus_1")
    with pytest.raises(ValueError, match=re.escape(refusal)):
        fake.add_fixtures(fixtures)
    assert fake.state()["prices"] == {} and fake.state()["subscriptions"] == {}  # nothing added


def test_the_command_line_refuses_a_fixtures_file_with_an_unknown_key(tmp_path: Path) -> None:
    fixtures = tmp_path / "fixtures.json"
    fixtures.write_text(json.dumps({"customers": ["cus_1"], "subs": []}))
    run = run_fake("--port", "0", "--fixtures", str(fixtures))
    assert run.returncode == 2 and run.stdout == ""  # it never started serving
    assert "unknown key 'subs'; the keys are customers, meters, prices, subscriptions" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_control_api_refuses_fixtures_with_an_unknown_key(fake: FakeStripe) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        control(fake, "fixtures", {"subscriptions": [{"prices": [], "plan": "x"}]})
    assert refused.value.code == 400
    assert "unknown key 'plan'" in json.load(refused.value)["error"]


def test_the_example_fixtures_file_loads_and_serves() -> None:
    command = [sys.executable, "-m", "tests.fake_stripe", "--port", "0", "--api-key", API_KEY]
    process = subprocess.Popen(
        [*command, "--fixtures", str(EXAMPLE_FIXTURES)],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        client = stripe.StripeClient(API_KEY, base_addresses={"api": url})
        found = client.v1.subscriptions.retrieve("sub_1ExampleCustomer1").to_dict()
    finally:
        process.terminate()
    assert process.wait(timeout=5) == 0
    assert found["customer"] == "cus_1ExampleCustomer1"
    prices = [item["price"]["id"] for item in found["items"]["data"]]
    assert prices == ["price_1ExampleApiRequests", "price_1ExampleStorage"]


def test_fixtures_set_every_subscription_field_they_take(fake: FakeStripe, clock: Clock) -> None:
    fake.add_fixtures(
        {
            "meters": [{"id": "mtr_1", "event_name": "jobs", "event_time_window": "hour"}],
            "prices": [{"id": "price_m", "meter": "mtr_1"}],
            "subscriptions": [
                {
                    "id": "sub_f", "customer": "cus_f", "prices": ["price_m"],
                    "status": "past_due", "period_start": NOW - HOUR, "period_end": NOW + HOUR,
                    "start_date": NOW - 90 * 86_400, "cancel_at": NOW + 2 * HOUR,
                },
                {"id": "sub_g", "prices": [], "cancel_at_period_end": True},
            ],
        }
    )  # fmt: skip
    found = connect(fake).v1.subscriptions.retrieve("sub_f").to_dict()
    assert (found["status"], found["customer"], found["start_date"]) == (
        "past_due", "cus_f", NOW - 90 * 86_400,
    )  # fmt: skip
    assert found["cancel_at"] == NOW + 2 * HOUR and found["cancel_at_period_end"] is False
    item = found["items"]["data"][0]
    assert (item["current_period_start"], item["current_period_end"]) == (NOW - HOUR, NOW + HOUR)
    other = fake.state()["subscriptions"]["sub_g"]
    assert other["cancel_at_period_end"] is True and other["cancel_at"] is None


def test_the_fixtures_format_is_the_methods_arguments_and_is_documented() -> None:
    def arguments(method: Any) -> tuple[str, ...]:
        return tuple(name for name in inspect.signature(method).parameters if name != "self")

    assert FIXTURE_KEYS["meters"] == arguments(FakeStripe.add_meter)
    assert FIXTURE_KEYS["prices"] == arguments(FakeStripe.add_price)
    assert FIXTURE_KEYS["subscriptions"] == (
        *arguments(FakeStripe.add_subscription), "cancel_at", "cancel_at_period_end",
    )  # fmt: skip
    docs = (PROJECT / "docs" / "development.md").read_text()
    section = docs.split("## The fake Stripe on its own", 1)[1].split("\n## ", 1)[0]
    for kind, keys in FIXTURE_KEYS.items():
        documented = section.split(f"- `{kind}`", 1)[1].split("\n- `", 1)[0]
        missing = [key for key in keys if f"`{key}`" not in documented]
        assert missing == [], f"docs/development.md does not describe the {kind} keys {missing}"


# --- billing periods: what Stripe takes but never bills ----------------------------------------


def test_subscription_shows_its_start_and_cancellation(
    fake: FakeStripe, client: stripe.StripeClient, item: str
) -> None:
    found = client.v1.subscriptions.retrieve("sub_1").to_dict()
    assert found["start_date"] == NOW - 30 * 86_400 and found["cancel_at_period_end"] is False
    assert found["cancel_at"] is None and found["ended_at"] is None
    fake.cancel("sub_1", at=NOW + HOUR)
    assert client.v1.subscriptions.retrieve("sub_1").to_dict()["cancel_at"] == NOW + HOUR
    fake.end("sub_1", "incomplete_expired")
    ended = client.v1.subscriptions.retrieve("sub_1").to_dict()
    assert (ended["status"], ended["ended_at"]) == ("incomplete_expired", NOW)


def test_meter_events_outside_an_open_period_are_taken_but_unbilled(
    fake: FakeStripe, client: stripe.StripeClient, clock: Clock, meters: None
) -> None:
    fake.add_price("price_tokens", aggregate_usage=None, meter="mtr_hourly")
    renewal = NOW - 2 * HOUR
    fake.add_subscription(
        "sub_t", customer="cus_1", prices=["price_tokens"], period_start=renewal - 86_400,
        period_end=renewal, start_date=renewal - 86_400,
    )  # fmt: skip
    fake.renew("sub_t", period_end=renewal + 30 * 86_400)
    meter_event(client, "tokens", "1", "current", timestamp=NOW - 10)
    meter_event(client, "tokens", "2", "late", timestamp=renewal - 10)  # invoice finalized
    meter_event(client, "tokens", "3", "early", timestamp=renewal - 2 * 86_400)  # before start
    assert [e["identifier"] for e in fake.unbilled_events()] == ["late", "early"]
    fake.invoice_grace = 3 * HOUR  # an account with a longer grace period
    fake.renew("sub_t", period_end=renewal + 60 * 86_400)  # the period just ended: its invoice
    clock.now = renewal + 30 * 86_400 + 10  # is a draft, so late usage is still billed
    meter_event(client, "tokens", "4", "in-grace", timestamp=renewal + 30 * 86_400 - 10)
    assert "in-grace" not in [e["identifier"] for e in fake.unbilled_events()]
