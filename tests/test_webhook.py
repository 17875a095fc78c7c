"""The webhook, end to end through the real stripe client to the fake Stripe: issue 2's promises."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import stripe
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from bridge.signature import attempt_budget
from bridge.stripe_api import USAGE_RECORDS_API_VERSION
from tests.conftest import Billing, deliver
from tests.fake_stripe import FakeStripe, RecordedRequest
from tests.harness import ROTATED_SECRET, SECRET, example, hours_ago, iso, report, sign


def usage_posts(fake: FakeStripe) -> list[RecordedRequest]:
    """Every usage-record write Stripe performed."""
    return [r for r in fake.writes() if r.path.endswith("/usage_records")]


def test_three_windows_write_three_records(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    event = report([100, 107, 114])
    response = deliver(client, event)
    assert response.status_code == 200, response.json
    assert response.json is not None and response.json["outcome"] == "written"
    writes = usage_posts(stripe_fake)
    assert len(writes) == 3
    assert [int(w.params["quantity"]) for w in writes] == [100, 107, 114]
    assert {w.params["action"] for w in writes} == {"set"}
    assert len({w.headers["idempotency-key"] for w in writes}) == 3
    assert {w.headers["stripe-version"] for w in writes} == {USAGE_RECORDS_API_VERSION}
    for write, row in zip(writes, event["usage"], strict=True):
        start = datetime.fromisoformat(row["windowStart"]).timestamp()
        end = datetime.fromisoformat(row["windowEnd"]).timestamp()
        assert start < int(write.params["timestamp"]) < end
    assert stripe_fake.usage_total(billing.api) == 321


def test_stripe_version_is_pinned_on_usage_records_and_the_legacy_reads_only(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    deliver(client, report([1]))
    versions = [(r.path, r.headers["stripe-version"]) for r in stripe_fake.requests]
    assert versions == [
        (f"/v1/subscriptions/{billing.customer1}", stripe.api_version),
        ("/v1/prices/price_1Api", USAGE_RECORDS_API_VERSION),  # the last one with aggregate_usage
        # billing_thresholds, where usage records are written (basil removed them)
        (f"/v1/subscriptions/{billing.customer1}", USAGE_RECORDS_API_VERSION),
        (f"/v1/subscription_items/{billing.api}/usage_records", USAGE_RECORDS_API_VERSION),
    ]


def test_legacy_sum_price_takes_a_sum_report_at_the_clients_default_version(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    # Issue 11: read at the client's version (basil on), a price has no aggregate_usage, and
    # every report that names its aggregation was refused with 422.
    event = report([7])
    assert event["meter"]["aggregation"] == "SUM"
    response = deliver(client, event)
    assert response.status_code == 200, response.json
    assert stripe_fake.usage_total(billing.api) == 7


def test_a_warm_cache_costs_exactly_the_write_for_a_legacy_price(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    assert deliver(client, report([1], first=hours_ago(3)), "msg_cold").status_code == 200
    cold = [(r.method, r.path) for r in stripe_fake.requests]
    assert ("GET", "/v1/prices/price_1Api") in cold
    stripe_fake.requests.clear()
    assert deliver(client, report([2], first=hours_ago(4)), "msg_warm").status_code == 200
    assert [(r.method, r.path) for r in stripe_fake.requests] == [
        ("POST", f"/v1/subscription_items/{billing.api}/usage_records")
    ]


@pytest.mark.parametrize("prefix", ["svix", "webhook"])
def test_redelivery_does_not_double_count(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, prefix: str
) -> None:
    event = report([5, 6, 7])
    assert deliver(client, event, "msg_once").status_code == 200
    again = deliver(client, event, "msg_once", prefix=prefix)  # fresh timestamp and signature
    assert again.status_code == 200
    assert stripe_fake.usage_total(billing.api) == 18
    assert len(stripe_fake.usage_records(billing.api)) == 3


def test_corrected_report_changes_only_its_window(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    first = hours_ago(4)
    deliver(client, report([5, 6, 7], first=first), "msg_first")
    before = stripe_fake.usage_records(billing.api)
    deliver(client, report([5, 60, 7], first=first), "msg_correction")
    after = stripe_fake.usage_records(billing.api)
    changed = {ts for ts in after if after[ts] != before.get(ts)}
    assert len(changed) == 1 and after[changed.pop()] == 60
    assert stripe_fake.usage_total(billing.api) == 72


def test_correction_back_to_an_earlier_value_sticks(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    first = hours_ago(3)
    for message_id, value in [("msg_a", 10), ("msg_b", 12), ("msg_c", 10)]:
        assert deliver(client, report([value], first=first), message_id).status_code == 200
    assert stripe_fake.usage_total(billing.api) == 10


def test_group_by_rows_of_one_window_are_summed(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    body = example("report-grouped-daily.json", shift_to=hours_ago(48))
    response = deliver(client, body)
    assert response.status_code == 200, response.json
    assert len(usage_posts(stripe_fake)) == 1
    assert stripe_fake.usage_total(billing.tokens) == 99263  # 1250.5 + 98000 + 12, rounded


def test_daily_example_writes_24_hourly_windows(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    body = example("report-daily-hourly-windows.json", shift_to=hours_ago(30))
    assert deliver(client, body).status_code == 200
    assert len(stripe_fake.usage_records(billing.api)) == 24
    assert stripe_fake.usage_total(billing.api) == sum(100 + 7 * i for i in range(24))


def test_row_without_subject_uses_query_subject(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    body = example("report-minimal-subject-in-query.json", shift_to=hours_ago(5))
    response = deliver(client, body)
    assert response.status_code == 200, response.json
    assert stripe_fake.usage_total(billing.api) == 42


@pytest.mark.parametrize(
    ("meter", "value", "expected"),
    [
        ("api_requests", "2.5", 3),  # nearest, half up (the default)
        ("api_requests", "2.49", 2),
        ("cpu_seconds", "2.99", 2),  # down
        ("storage_gb", "1001", 2),  # x 0.001 = 1.001, up
        ("storage_gb", "1000", 1),
    ],
)
def test_fractional_values_are_rounded_as_configured(
    client: FlaskClient,
    stripe_fake: FakeStripe,
    billing: Billing,
    meter: str,
    value: str,
    expected: int,
) -> None:
    assert deliver(client, report([value], meter=meter)).status_code == 200
    item = {"api_requests": billing.api, "cpu_seconds": billing.cpu, "storage_gb": billing.storage}
    assert stripe_fake.usage_total(item[meter]) == expected


# --- signatures ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [SECRET, ROTATED_SECRET])
def test_both_rotated_secrets_verify(client: FlaskClient, billing: Billing, secret: str) -> None:
    assert deliver(client, report([1]), secret=secret).status_code == 200


def test_wrong_secret_is_401(client: FlaskClient, stripe_fake: FakeStripe) -> None:
    other = "whsec_" + "b3RoZXItc2VjcmV0LW5vdC1vdXJz"
    response = deliver(client, report([1]), secret=other)
    assert response.status_code == 401
    assert response.json is not None and response.json["error"] == "bad_signature"
    assert stripe_fake.requests == []


def test_expired_timestamp_is_401(client: FlaskClient, stripe_fake: FakeStripe) -> None:
    response = deliver(client, report([1]), at=datetime.now(UTC) - timedelta(minutes=6))
    assert response.status_code == 401
    assert stripe_fake.requests == []


def test_missing_headers_are_401(client: FlaskClient, stripe_fake: FakeStripe) -> None:
    response = client.post("/webhook", data=json.dumps(report([1])))
    assert response.status_code == 401
    assert stripe_fake.requests == []


@pytest.mark.parametrize("signature", ["v1", "v1,!!!", "garbage", "", "v1,", " ", "v1,a,b"])
def test_malformed_signature_header_is_401_not_500(
    client: FlaskClient, stripe_fake: FakeStripe, signature: str
) -> None:
    body = json.dumps(report([1]))
    headers = sign(body) | {"svix-signature": signature}
    response = client.post("/webhook", data=body, headers=headers)
    assert response.status_code == 401
    assert response.json is not None and response.json["hint"]
    assert stripe_fake.requests == []


def test_non_utf8_body_is_401(client: FlaskClient, stripe_fake: FakeStripe) -> None:
    headers = sign("x")
    response = client.post("/webhook", data=b"\xff\xfe{}", headers=headers)
    assert response.status_code == 401
    assert stripe_fake.requests == []


# --- bad payloads ----------------------------------------------------------------------------


def _with_row(**changes: object) -> str:
    event = report([1])
    event["usage"][0].update(changes)
    return json.dumps(event)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        json.dumps({"type": "report.meter", "meter": {"slug": "api_requests"}, "usage": {}}),
        json.dumps({"type": "report.meter", "query": {"subject": "customer-1"}, "usage": []}),
        _with_row(value="abc"),
        _with_row(value=-1),
        _with_row(value=True),
        _with_row(value=None),
        _with_row(windowStart="yesterday"),
        _with_row(windowStart="2026-11-22T00:00:00"),  # no zone
        _with_row(windowEnd=iso(hours_ago(10))),  # ends before it starts
        _with_row(windowStart=iso(datetime(9999, 1, 1, tzinfo=UTC))),
        '{"type": "report.meter", "type": "report.meter"}',
        '{"type": "report.meter", "usage": [{"value": NaN}]}',
    ],
)
def test_malformed_payload_is_400_and_writes_nothing(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, body: str
) -> None:
    response = deliver(client, body)
    assert response.status_code == 400, response.json
    assert response.json is not None and response.json["error"] == "bad_payload"
    assert usage_posts(stripe_fake) == []


def test_report_mixing_subjects_is_400(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    event = report([1, 2])
    event["usage"][1]["subject"] = "acme"
    assert deliver(client, event).status_code == 400
    assert usage_posts(stripe_fake) == []


def test_body_over_one_mib_is_413(client: FlaskClient, stripe_fake: FakeStripe) -> None:
    body = json.dumps(report([1])) + " " * (1024 * 1024)
    response = deliver(client, body)
    assert response.status_code == 413
    assert response.json is not None and response.json["error"] == "payload_too_large"
    assert stripe_fake.requests == []


# --- mapping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("subject", "meter"), [("stranger", "api_requests"), ("acme", "bytes")])
def test_unmapped_subject_or_meter_is_422_and_writes_nothing(
    client: FlaskClient, stripe_fake: FakeStripe, subject: str, meter: str
) -> None:
    response = deliver(client, report([1], subject=subject, meter=meter))
    assert response.status_code == 422
    assert response.json is not None and "config.yaml" in response.json["message"]
    assert stripe_fake.requests == []


def test_other_event_types_are_ignored_with_200(
    client: FlaskClient, stripe_fake: FakeStripe
) -> None:
    response = deliver(client, example("notification-entitlement-threshold.json"))
    assert response.status_code == 200
    assert response.json == {
        "outcome": "ignored",
        "type": "entitlements.balance.threshold",
        "message_id": "msg_test1",
    }
    assert stripe_fake.requests == []


def test_price_missing_from_subscription_is_422(
    client: FlaskClient, stripe_fake: FakeStripe
) -> None:
    response = deliver(client, report([1], subject="acme", meter="storage_gb"))
    assert response.status_code == 422
    assert response.json is not None and "price_1Storage" in response.json["message"]
    assert usage_posts(stripe_fake) == []


def test_unknown_subscription_is_422(client: FlaskClient, stripe_fake: FakeStripe) -> None:
    response = deliver(client, report([1], subject="unbilled"))
    assert response.status_code == 422
    assert usage_posts(stripe_fake) == []


def test_warm_cache_costs_one_stripe_call_per_window(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    deliver(client, report([1], first=hours_ago(3)), "msg_cold")
    calls = len(stripe_fake.requests)
    deliver(client, report([2], first=hours_ago(4)), "msg_warm")
    assert len(stripe_fake.requests) == calls + 1


def test_price_added_to_subscription_later_is_found(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    assert deliver(client, report([1], subject="acme"), "msg_1").status_code == 200
    assert deliver(client, report([1], subject="acme", meter="cpu_seconds")).status_code == 422
    item = stripe_fake.add_item("sub_1Acme", "price_1Cpu")
    response = deliver(client, report([4], subject="acme", meter="cpu_seconds"), "msg_2")
    assert response.status_code == 200
    assert stripe_fake.usage_total(item) == 4


# --- Stripe failures -------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "429_rate", "429_lock", "drop"])
def test_transient_stripe_failure_is_503_then_redelivery_is_exact(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, fault: str
) -> None:
    event = report([3, 4])
    deliver(client, report([1], first=hours_ago(10)), "msg_warmup")  # cache the items
    stripe_fake.inject(fault, path="/usage_records", count=None, probability=1.0)
    response = deliver(client, event, "msg_faulty")
    assert response.status_code == 503, response.json
    assert response.json is not None and response.json["error"] == "stripe_unavailable"
    stripe_fake.clear_faults()
    assert deliver(client, event, "msg_faulty").status_code == 200
    assert stripe_fake.usage_total(billing.api) == 1 + 3 + 4


def test_lost_response_is_retried_with_the_same_key(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    deliver(client, report([1], first=hours_ago(10)), "msg_warmup")
    stripe_fake.inject("lost_response", path="/usage_records", count=1)
    assert deliver(client, report([9]), "msg_lost").status_code == 200
    assert stripe_fake.usage_total(billing.api) == 10
    assert any(r.idempotent_replay for r in stripe_fake.requests)


def test_window_before_the_billing_period_is_422_naming_it(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    old = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=40)
    event = report([5], first=old)
    event["usage"] += report([6])["usage"]
    response = deliver(client, event)
    assert response.status_code == 422
    assert response.json is not None
    assert iso(old).replace("Z", "") in json.dumps(response.json)
    assert stripe_fake.usage_total(billing.api) == 6  # the good window was still written


def test_time_budget_bounds_the_answer_and_the_next_attempt_resumes(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    client = create_app(environment | {"TIME_BUDGET_SECONDS": "1"}).test_client()
    deliver(client, report([1], first=hours_ago(30)), "msg_warmup")
    stripe_fake.latency = 0.3
    started = time.monotonic()
    response = deliver(client, report([1] * 10), "msg_slow")
    assert time.monotonic() - started < 1.5
    assert response.status_code == 503
    assert response.json is not None and 1 <= response.json["written"] < 10
    written = response.json["written"]
    stripe_fake.latency = 0
    time.sleep(0.5)  # the abandoned request finishes in Stripe before Svix's next attempt
    again = deliver(client, report([1] * 10), "msg_slow")
    assert again.status_code == 200
    assert again.json is not None and again.json["skipped"] >= written
    assert stripe_fake.usage_total(billing.api) == 11


def test_time_queued_since_svix_sent_the_attempt_counts_against_the_budget(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    client = create_app(environment | {"TIME_BUDGET_SECONDS": "4"}).test_client()
    deliver(client, report([1], first=hours_ago(30)), "msg_warmup")
    stripe_fake.latency = 0.3
    sent = datetime.now(UTC) - timedelta(seconds=3)  # waited in a busy worker's queue
    started = time.monotonic()
    response = deliver(client, report([1] * 20), "msg_queued", at=sent)
    assert 1.5 < time.monotonic() - started < 3.0  # 4 s, less the 2 s beyond Svix's rounding
    assert response.status_code == 503


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 12.0),  # replay, or no timestamp: the whole budget
        ({"svix-timestamp": "1000"}, 12.0),  # within the timestamp's rounding
        ({"svix-timestamp": "997"}, 9.5),
        ({"webhook-timestamp": "997"}, 9.5),
        ({"svix-timestamp": "1"}, 6.0),  # a clock far behind costs at most half
        ({"svix-timestamp": "1100"}, 12.0),  # a clock ahead gains nothing
        ({"svix-timestamp": "-5"}, 12.0),
        ({"svix-timestamp": "99\u00b2"}, 12.0),  # a superscript digit is no digit here
    ],
)
def test_attempt_budget(headers: dict[str, str], expected: float) -> None:
    assert attempt_budget(12.0, headers, 1000.5) == expected


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200


def test_wrong_path_and_method_answer_json(client: FlaskClient) -> None:
    assert client.get("/webhook").status_code == 405
    response = client.get("/nope")
    assert response.status_code == 404 and response.json is not None


def test_app_factory_reads_config_path(app: Flask, config_path: Path) -> None:
    assert app.extensions["bridge"].settings.config_path == str(config_path)


def test_a_window_split_by_a_renewal_is_billed_in_the_new_period(
    config_path: Path, environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    window = hours_ago(3)
    renewal = int(window.timestamp()) + 1234  # subscriptions renew at the second they began
    stripe_fake.add_subscription("sub_1Renewed", prices=["price_1Api"], period_start=renewal)
    config_path.write_text(config_path.read_text() + "  renewed: sub_1Renewed\n")
    client = create_app(environment).test_client()
    assert deliver(client, report([7], subject="renewed", first=window)).status_code == 200
    item = stripe_fake.item_id("sub_1Renewed", "price_1Api")
    assert stripe_fake.usage_records(item) == {renewal: 7}
    later = report([8], subject="renewed", first=window + timedelta(hours=1))
    assert deliver(client, later, "msg_next").status_code == 200  # later windows: start + 1 s
    assert stripe_fake.usage_records(item)[int(window.timestamp()) + 3601] == 8


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_timestamps_beyond_what_utc_can_hold_are_400(
    client: FlaskClient, stripe_fake: FakeStripe, moment: str
) -> None:
    event = report([1])
    event["usage"][0]["windowStart"] = moment
    response = deliver(client, event)
    assert response.status_code == 400
    assert response.json is not None and "windowStart" in response.json["message"]
    assert not stripe_fake.writes()


def test_no_stripe_telemetry_so_nothing_is_written_under_home(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    deliver(client, report([1, 2]))
    for request in stripe_fake.requests:
        assert "x-stripe-client-telemetry" not in request.headers
        assert "telemetry_id" not in request.headers["x-stripe-client-user-agent"]


def test_an_open_window_spanning_the_renewal_waits_for_the_new_period(
    config_path: Path, environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    now = int(time.time())
    window = hours_ago(0)  # open: it ends within the hour
    stripe_fake.add_subscription(
        "sub_1Renewing",
        prices=["price_1Api"],
        period_start=now - 30 * 86400,
        period_end=now + 2,  # the renewal falls inside the open window
    )
    config_path.write_text(config_path.read_text() + "  renewing: sub_1Renewing\n")
    client = create_app(environment).test_client()
    earlier = report([4, 5], subject="renewing", first=window - timedelta(hours=1))
    response = deliver(client, earlier, "msg_before")
    assert response.status_code == 503
    assert response.json is not None and response.json["error"] == "windows_waiting"
    assert "renewal" in response.json["message"] and response.json["written"] == 1
    item = stripe_fake.item_id("sub_1Renewing", "price_1Api")
    assert list(stripe_fake.usage_records(item).values()) == [4]  # only the closed window
    time.sleep(2.5)
    stripe_fake.renew("sub_1Renewing", period_end=now + 86400)
    again = deliver(client, report([5], subject="renewing", first=window), "msg_after")
    assert again.status_code == 200, again.json  # the cached copy was stale: fetched again
    assert stripe_fake.usage_records(item)[now + 2] == 5  # in full, in the new period


def test_a_calendar_month_across_a_dst_change_is_one_window(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    event = report([5])
    event["usage"][0]["windowStart"] = "2026-10-01T00:00:00+02:00"  # 31 days and an hour
    event["usage"][0]["windowEnd"] = "2026-11-01T00:00:00+01:00"
    response = deliver(client, event)
    assert response.status_code != 400, response.json
