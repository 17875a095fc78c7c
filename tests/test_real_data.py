"""Real OpenMeter data and real operators' edits: partial windows, float noise, rounding, torn
config files (issue 12). Each test here fails against the bridge before that issue was fixed."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from bridge.config import Config, parse_config_file
from bridge.config_source import ConfigSource
from bridge.logs import metrics_text
from tests.conftest import API_KEY, CONFIG_YAML, Billing, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import PROJECT, hours_ago, iso, report
from tests.test_operations import metric

EXTRA_METERS = {"tokens": "price_1Raw", "api_calls": "price_1Hourly"}
NOISE = "5.551115123125783e-17"  # 0.1 + 0.2 - 0.3 in float64


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """The shared test config, plus a raw and an hourly meter on customer-1's subscription."""
    document = yaml.safe_load(CONFIG_YAML)
    document["meters"].update(EXTRA_METERS)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def billing(billing: Billing, stripe_fake: FakeStripe) -> Billing:
    """The shared Stripe objects, plus a raw meter and an hourly one billing customer-1."""
    stripe_fake.add_meter("mtr_1Raw", event_name="tokens_raw")
    stripe_fake.add_price("price_1Raw", aggregate_usage=None, meter="mtr_1Raw")
    stripe_fake.add_meter("mtr_1Hourly", event_name="api_calls", event_time_window="hour")
    stripe_fake.add_price("price_1Hourly", aggregate_usage=None, meter="mtr_1Hourly")
    for price in ("price_1Raw", "price_1Hourly"):
        stripe_fake.add_item(billing.customer1, price)
    return billing


def customer_of(fake: FakeStripe, billing: Billing) -> str:
    """customer-1's Stripe customer."""
    return str(fake.state()["subscriptions"][billing.customer1]["customer"])


def ranged(event: dict[str, Any], start: datetime, end: datetime | None) -> dict[str, Any]:
    """The report with the query range OpenMeter ran it over."""
    event["query"]["from"] = iso(start)
    if end is not None:
        event["query"]["to"] = iso(end)
    return event


# --- 1. a window's completeness comes from the report, never from the clock at retry time ------


def test_partial_raw_window_is_never_sent_and_the_full_report_bills_it(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    # Report A was made at 10:30 for [09:00, 10:30): [10:00, 11:00) holds 5 of its 8.
    nine = hours_ago(4)
    report_a = ranged(report([2, 5], meter="tokens", first=nine), nine, nine + timedelta(hours=1.5))
    stripe_fake.inject("500", path="/meter_events", count=3)  # Svix must retry A, later
    assert deliver(client, report_a, "msg_A").status_code == 503
    retry = deliver(client, report_a, "msg_A")  # hours later by the clock: both windows ended
    assert retry.status_code == 200, retry.json
    assert retry.json is not None and retry.json["sent"] == 1
    [left_out] = retry.json["incomplete"]
    assert left_out["window_start"] == (nine + timedelta(hours=1)).isoformat()
    report_b = ranged(
        report([8], meter="tokens", first=nine + timedelta(hours=1)),
        nine + timedelta(hours=1),
        nine + timedelta(hours=2),
    )
    assert deliver(client, report_b, "msg_B").status_code == 200
    assert stripe_fake.meter_value("mtr_1Raw", customer_of(stripe_fake, billing)) == 2 + 8


def test_without_query_to_the_first_attempt_dates_the_report(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    while time.time() % 1 > 0.5:  # the open window ends 2.5 s or more after the first attempt
        time.sleep(0.01)
    now = datetime.fromtimestamp(int(time.time()), UTC)
    rows = [
        {"value": 4, "windowStart": iso(now - timedelta(seconds=3)), "windowEnd": iso(now)},
        {"value": 1, "windowStart": iso(now), "windowEnd": iso(now + timedelta(seconds=3))},
    ]
    event = report(rows=rows, meter="tokens")
    stripe_fake.inject("500", path="/meter_events", count=3)
    first = deliver(client, event, "msg_open")
    assert first.status_code == 503, first.json
    time.sleep(max(0.0, now.timestamp() + 3.2 - time.time()))  # the open window has now ended
    retry = deliver(client, event, "msg_open")  # a fresh svix-timestamp, after the window's end
    assert retry.status_code == 200, retry.json
    assert retry.json is not None and retry.json["incomplete"][0]["window_start"] == now.isoformat()
    assert [e["payload"]["value"] for e in stripe_fake.meter_events("tokens_raw")] == ["4"]


def test_complete_windows_of_a_ranged_report_are_written_and_the_query_range_is_checked(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    start = hours_ago(6)
    event = ranged(report([1, 2, 3], meter="tokens", first=start), start + timedelta(hours=1), None)
    event["query"]["to"] = iso(start + timedelta(hours=3))
    response = deliver(client, event, "msg_range")
    assert response.status_code == 200, response.json
    assert response.json is not None
    assert [w["window_start"] for w in response.json["incomplete"]] == [start.isoformat()]
    assert stripe_fake.meter_value("mtr_1Raw", customer_of(stripe_fake, billing)) == 2 + 3
    bad = ranged(report([1], meter="tokens", first=start), start, None)
    bad["query"]["to"] = "yesterday"
    assert deliver(client, bad, "msg_bad_to").status_code == 400


# --- 2. float noise is a number, not a bad payload --------------------------------------------


def test_float_noise_is_zero_and_the_reports_other_windows_are_written(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    first = hours_ago(8)
    event = report([5, float(NOISE), -float(NOISE), f"{'-' + NOISE}", 7], first=first)
    response = deliver(client, event, "msg_noise")
    assert response.status_code == 200, response.json
    records = stripe_fake.usage_records(billing.api)
    assert list(records.values()) == [5, 0, 0, 0, 7]
    rounded_up = report([NOISE, "1e-400"], meter="storage_gb", first=first)  # x 0.001, up
    assert deliver(client, rounded_up, "msg_noise_up").status_code == 200
    assert stripe_fake.usage_total(billing.storage) == 0  # noise never rounds up to a unit
    hourly = report([NOISE, -float(NOISE), "0.25"], meter="api_calls", first=first)
    assert deliver(client, hourly, "msg_noise_meter").status_code == 200
    assert [e["payload"]["value"] for e in stripe_fake.meter_events("api_calls")] == [
        "0",
        "0",
        "0.25",
    ]


@pytest.mark.parametrize(
    "literal", ["1e-400", "1e-99999999999999999999999999", '"1e-99999999999999999999999999"']
)
def test_values_below_decimals_reach_are_zero(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, literal: str
) -> None:
    body = json.dumps(report([5, 6])).replace('"value": 5', f'"value": {literal}', 1)
    response = deliver(client, body, "msg_tiny")
    assert response.status_code == 200, response.json
    assert list(stripe_fake.usage_records(billing.api).values()) == [0, 6]


@pytest.mark.parametrize(
    ("meter", "value"),
    [
        ("api_requests", "-0.5"),
        ("api_requests", -3),
        ("api_calls", "-0.5"),
        ("storage_gb", "-500"),  # x 0.001
    ],
)
def test_a_report_of_nothing_but_negative_usage_is_400_before_stripe_is_asked(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, meter: str, value: Any
) -> None:
    response = deliver(client, report([value, value], meter=meter), "msg_negative")
    assert response.status_code == 400, response.json
    assert stripe_fake.requests == []


def test_huge_usage_is_still_400_before_stripe_is_asked(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    response = deliver(client, report([1, "1e31"]), "msg_huge")
    assert response.status_code == 400, response.json
    assert stripe_fake.requests == []


@pytest.mark.parametrize(("meter", "value"), [("api_requests", -3), ("api_calls", "-0.5")])
def test_a_negative_window_is_refused_on_its_own_and_the_others_are_written(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, meter: str, value: Any
) -> None:
    first = hours_ago(4)
    response = deliver(client, report([1, value, 4], meter=meter, first=first), "msg_neg1")
    assert response.status_code == 422, response.json
    assert response.json is not None
    refused = response.json["refused"]
    assert [r["window_start"] for r in refused] == [(first + timedelta(hours=1)).isoformat()]
    assert "cannot be negative" in refused[0]["message"]
    if meter == "api_requests":
        assert list(stripe_fake.usage_records(billing.api).values()) == [1, 4]
    else:
        assert [e["payload"]["value"] for e in stripe_fake.meter_events("api_calls")] == ["1", "4"]


def test_negative_noise_is_zero_and_a_meter_refuses_what_a_usage_record_cannot_carry(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    first = hours_ago(5)
    # A usage record cannot carry less than half a unit: -0.49 is zero there.
    assert deliver(client, report(["-0.49", 2], first=first), "msg_l").status_code == 200
    assert list(stripe_fake.usage_records(billing.api).values()) == [0, 2]
    # A meter event carries decimals: -0.49 is negative usage, float noise is zero.
    hourly = report(["-0.49", 3], meter="api_calls", first=first)
    assert deliver(client, hourly, "msg_m").status_code == 422  # its other window is written
    assert [e["payload"]["value"] for e in stripe_fake.meter_events("api_calls")] == ["3"]
    noise = report(["-5.551115123125783e-17", 3], meter="api_calls", first=first)
    assert deliver(client, noise, "msg_n").status_code == 200
    sent = [e["payload"]["value"] for e in stripe_fake.meter_events("api_calls")]
    assert sent == ["3", "0", "3"]


def test_a_window_is_its_sum_a_negative_group_row_included(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    event = report([500])
    event["usage"][0]["groupBy"] = {"kind": "api"}
    event["usage"].append(dict(event["usage"][0], value=-3, groupBy={"kind": "credit"}))
    response = deliver(client, event, "msg_neg_row")
    assert response.status_code == 200, response.json
    assert list(stripe_fake.usage_records(billing.api).values()) == [497]


# --- 3. rounding must not grow with the number of windows -------------------------------------

# What docs/windows.md ("Units and rounding") tells an operator to set on the price of the shipped
# fractional example.
DIVIDE_BY = 1000


def shipped_fractional_example() -> tuple[str, dict[str, Any]]:
    """The long-form meter entry of the shipped config.yaml."""
    meters = yaml.safe_load((PROJECT / "config.yaml").read_text())["meters"]
    [(slug, entry)] = [(slug, entry) for slug, entry in meters.items() if isinstance(entry, dict)]
    return slug, entry


def test_a_month_of_fractional_hours_is_billed_within_a_unit(
    tmp_path: Path, environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    slug, entry = shipped_fractional_example()
    now = int(time.time())
    stripe_fake.add_subscription(
        "sub_1Month", prices=["price_1Storage"], period_start=now - 86400 * 40
    )
    config = tmp_path / "shipped.yaml"
    mapping = {
        "meters": {slug: entry | {"price": "price_1Storage"}},
        "subjects": {"m": "sub_1Month"},
    }
    config.write_text(yaml.safe_dump(mapping))
    client = create_app(environment | {"CONFIG_PATH": str(config)}).test_client()
    hours = 720  # 30 days of hourly windows, 0.4 each: 288 in the meter's unit
    first = hours_ago(hours + 1)
    for day in range(30):
        event = report([0.4] * 24, subject="m", meter=slug, first=first + timedelta(days=day))
        response = deliver(client, event, f"msg_day{day}")
        assert response.status_code == 200, response.json
    multiplier = Decimal(str(entry.get("multiplier", 1)))
    exact = Decimal("0.4") * hours * multiplier
    reported = stripe_fake.usage_total(stripe_fake.item_id("sub_1Month", "price_1Storage"))
    assert reported == exact  # whole small units: no rounding per window at all
    billed = math.ceil(Decimal(reported) / DIVIDE_BY)  # transform_quantity: divide_by, round up
    assert abs(billed - exact / DIVIDE_BY) < 1  # one rounding per period, whatever the windows


def test_check_config_warns_when_a_mapping_coarsens_each_window(tmp_path: Path, app: Flask) -> None:
    path = tmp_path / "coarse.yaml"
    path.write_text(
        "meters:\n  gb: {price: price_1A, multiplier: 0.001, rounding: up}\n"
        "  rounded: {price: price_1B, rounding: down}\n"
        "  fine: {price: price_1C, multiplier: 1000}\n  plain: price_1D\nsubjects:\n  c: sub_1C\n"
    )
    result = app.test_cli_runner().invoke(args=["check-config", str(path)])
    assert result.exit_code == 0, result.output  # a warning, not a problem
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert [line.split()[0] for line in warnings] == ["meters.gb:", "meters.rounded:"]
    assert all("transform_quantity" in line for line in warnings)
    shipped = app.test_cli_runner().invoke(args=["check-config", str(PROJECT / "config.yaml")])
    assert shipped.exit_code == 0 and "warning" not in shipped.output, shipped.output


# --- 4. a reload never takes a half-written file ----------------------------------------------


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_torn_write_is_never_served(config_path: Path) -> None:
    clock = Clock()
    source = ConfigSource(str(config_path), clock=clock)
    good = CONFIG_YAML.replace("  acme: sub_1Acme\n", "  acme: sub_1Acme\n  newcomer: sub_1New\n")
    torn = good[: good.index("    multiplier: 0.001")]  # valid YAML: storage_gb without multiplier
    assert load_config_text(torn).meters["storage_gb"].multiplier == 1  # 1,000x the bill
    served = []
    for text in [torn, good[: len(good) // 2], good]:  # an edit in place, read at each stage
        config_path.write_text(text)
        clock.now += 1.01
        served.append(source.current())
    assert all(c.meters["storage_gb"].multiplier == Decimal("0.001") for c in served)
    assert "newcomer" not in served[-1].subjects
    clock.now += 1.01
    assert source.current().subjects["newcomer"] == "sub_1New"  # stable for a second: taken
    assert source.current().meters["storage_gb"].multiplier == Decimal("0.001")


def load_config_text(text: str) -> Config:
    """A config from its text, as a reload would parse it."""
    return parse_config_file(text.encode())


@pytest.mark.parametrize(
    ("text", "dropped"),
    [
        ("", "every subject and every meter"),
        ("meters:\n  api_requests: price_1Api\n", "every subject"),
        ("subjects:\n  c: sub_1C\n", "every meter"),
    ],
)
def test_a_reload_that_drops_every_subject_or_meter_is_refused(
    app: Flask,
    config_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    dropped: str,
) -> None:
    monkeypatch.setattr(ConfigSource, "CHECK_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(ConfigSource, "STABLE_SECONDS", 0.0, raising=False)
    client = app.test_client()
    config_path.write_text(text)
    assert deliver(client, report([3]), "msg_kept").status_code == 200  # the old mapping serves
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json is not None and dropped in ready.json["config"]["last_reload_error"]
    assert any(r.getMessage() == "config reload failed" for r in caplog.records)
    config_path.write_text(CONFIG_YAML)
    assert client.get("/readyz").json["config"]["last_reload_error"] is None  # type: ignore[index]


def test_the_stability_rule_keeps_the_readme_s_five_seconds(config_path: Path) -> None:
    clock = Clock()
    source = ConfigSource(str(config_path), clock=clock)
    config_path.write_text(CONFIG_YAML + "  newcomer: sub_1New\n")
    edited = clock.now
    while "newcomer" not in source.current().subjects:  # a request every 0.1 s
        clock.now += 0.1
        assert clock.now - edited < 5
    assert clock.now - edited < 2.2  # a check a second, then a second of stability


def test_a_file_unmodified_for_two_seconds_is_taken_at_its_first_read(config_path: Path) -> None:
    clock = Clock()
    source = ConfigSource(str(config_path), clock=clock)
    config_path.write_text(CONFIG_YAML + "  newcomer: sub_1New\n")
    clock.now += 1.01
    assert "newcomer" not in source.current().subjects  # just written: read again first
    config_path.write_text(CONFIG_YAML + "  other: sub_1Other\n")
    os.utime(config_path, (time.time() - 2.5, time.time() - 2.5))  # say, `mv` of an older file
    clock.now += 1.01
    assert source.current().subjects["other"] == "sub_1Other"


def window_count(outcome: str, kind: str = "meter_events") -> float:
    """bridge_windows_total for one outcome, in this process (tests compare before and after)."""
    return metric(metrics_text().decode(), "bridge_windows_total", kind=kind, outcome=outcome)


def test_windows_a_200_leaves_out_are_counted_by_outcome_and_logged(
    client: FlaskClient,
    stripe_fake: FakeStripe,
    billing: Billing,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = {o: window_count(o) for o in ("written", "incomplete", "kept", "refused")}
    start = hours_ago(6)
    event = ranged(report([1, 2, 3], meter="tokens", first=start), start + timedelta(hours=1), None)
    event["query"]["to"] = iso(start + timedelta(hours=3))
    assert deliver(client, event, "msg_out1").status_code == 200  # its first window: incomplete
    assert deliver(client, event, "msg_out2").status_code == 200  # a raw meter keeps the first
    negative = report([-4], meter="tokens", first=start + timedelta(hours=3))
    negative["usage"].append(
        report([5], meter="tokens", first=start + timedelta(hours=4))["usage"][0]
    )
    assert deliver(client, negative, "msg_out3").status_code == 422
    after = {o: window_count(o) for o in before}
    assert {o: after[o] - before[o] for o in before} == {
        "written": 2 + 1,
        "incomplete": 2,
        "kept": 2,
        "refused": 1,
    }
    warnings = [r for r in caplog.records if r.getMessage() == "answered 200 with windows left out"]
    assert [r.fields["left_out"] for r in warnings] == [1, 3]  # type: ignore[attr-defined]


# --- late events: what a raw meter loses, and the setting that bills them ---------------------


def test_late_usage_is_lost_on_a_raw_meter_and_billed_on_a_pre_aggregated_one(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing
) -> None:
    customer = customer_of(stripe_fake, billing)
    start = hours_ago(6)
    for meter in ("tokens", "api_calls"):
        first = ranged(report([5], meter=meter, first=start), start, start + timedelta(hours=1))
        assert deliver(client, first, f"msg_{meter}_1").status_code == 200
        # 3 more units, dated in the first window, reach OpenMeter after its report ran: the next
        # report overlaps it by one window and carries them.
        late = ranged(report([8, 2], meter=meter, first=start), start, start + timedelta(hours=2))
        assert deliver(client, late, f"msg_{meter}_2").status_code == 200
    assert stripe_fake.meter_value("mtr_1Raw", customer) == 5 + 2  # the late 3 are never billed
    assert stripe_fake.meter_value("mtr_1Hourly", customer) == 8 + 2


def test_check_config_online_warns_that_a_raw_meter_loses_late_usage(
    tmp_path: Path,
    stripe_fake: FakeStripe,
    billing: Billing,
    app: Flask,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "late.yaml"
    path.write_text(
        "meters:\n  tokens: price_1Raw\n  api_calls: price_1Hourly\n"
        "subjects:\n  customer-1: sub_1Customer1\n"
    )
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", stripe_fake.url)
    result = app.test_cli_runner().invoke(args=["check-config", str(path), "--online"])
    assert result.exit_code == 0, result.output  # a warning, not a problem
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert "warning" in lines["meters.tokens"] and "late events" in lines["meters.tokens"]
    assert "event_time_window hour or day" in lines["meters.tokens"]
    assert "ok" in lines["meters.api_calls"] and "late" not in lines["meters.api_calls"]
