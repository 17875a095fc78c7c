"""Several OpenMeter subjects on one Stripe subscription (two projects of one customer).

Where Stripe adds up what it is sent (a legacy `sum` price, a raw `sum` meter) each subject's
windows are written at a second of its own, so that the bill is their sum, and corrections and
redeliveries of either stay exact. Where it keeps one value (a pre-aggregated meter's bucket,
`last`, legacy `max`), the pair is refused with a 422 naming both, and `check-config --online` says
so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from bridge.sharing import subject_offset
from tests.conftest import API_KEY, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import hours_ago, report

SHARED = "subjects:\n  team-a: sub_1Shared\n  team-b: sub_1Shared\n"


def connect(environment: dict[str, str], config_path: Path, meters: str) -> FlaskClient:
    """The service with both subjects on sub_1Shared."""
    config_path.write_text(f"meters:\n{meters}{SHARED}")
    return create_app(environment).test_client()


def legacy(fake: FakeStripe, aggregate_usage: str = "sum") -> str:
    """sub_1Shared with a legacy price; returns its item."""
    fake.add_price("price_1Api", aggregate_usage=aggregate_usage)
    fake.add_subscription("sub_1Shared", customer="cus_1Shared", prices=["price_1Api"])
    return fake.item_id("sub_1Shared", "price_1Api")


def metered(fake: FakeStripe, window: str | None = None, formula: str = "sum") -> None:
    """sub_1Shared with a Billing meter price (raw unless window is hour or day)."""
    fake.add_meter("mtr_1Tokens", event_name="tokens", event_time_window=window, formula=formula)
    fake.add_price("price_1Meter", aggregate_usage=None, meter="mtr_1Tokens")
    fake.add_subscription("sub_1Shared", customer="cus_1Shared", prices=["price_1Meter"])


def test_two_subjects_on_one_legacy_sum_item_are_billed_their_sum_exactly(
    environment: dict[str, str], config_path: Path, stripe_fake: FakeStripe
) -> None:
    item = legacy(stripe_fake)
    client = connect(environment, config_path, "  api_requests: price_1Api\n")
    first = hours_ago(4)
    a = report([3, 4], subject="team-a", first=first)
    b = report([10, 20], subject="team-b", first=first)
    assert deliver(client, a, "msg_a").status_code == 200
    assert deliver(client, b, "msg_b").status_code == 200
    assert stripe_fake.usage_total(item) == 37
    start = int(first.timestamp())
    assert sorted(stripe_fake.usage_records(item)) == sorted(
        start + hour * 3600 + 1 + subject_offset(subject)
        for hour in (0, 1)
        for subject in ("team-a", "team-b")
    )
    # A redelivery, a correction of one subject and a late retry of its old report stay exact.
    assert deliver(client, b, "msg_b").status_code == 200
    corrected = report([5, 4], subject="team-a", first=first)
    assert deliver(client, corrected, "msg_a2").status_code == 200
    assert deliver(client, a, "msg_a").status_code == 200
    assert stripe_fake.usage_total(item) == 5 + 4 + 10 + 20


def test_two_subjects_on_one_raw_sum_meter_are_billed_their_sum_exactly(
    environment: dict[str, str], config_path: Path, stripe_fake: FakeStripe
) -> None:
    metered(stripe_fake)
    client = connect(environment, config_path, "  api_requests: price_1Meter\n")
    first = hours_ago(4)
    a = report([3, 4], subject="team-a", first=first)
    b = report([10, 20], subject="team-b", first=first)
    for event, message in ((a, "msg_a"), (b, "msg_b"), (a, "msg_a"), (b, "msg_b2")):
        response = deliver(client, event, message)  # msg_b2: the same report sent again
        assert response.status_code == 200, response.json
    assert stripe_fake.meter_value("mtr_1Tokens", "cus_1Shared") == 37
    assert len({e["identifier"] for e in stripe_fake.meter_events("tokens")}) == 4


@pytest.mark.parametrize(
    ("setup", "meters"),
    [
        (lambda fake: metered(fake, window="hour"), "  api_requests: price_1Meter\n"),
        (lambda fake: metered(fake, formula="last"), "  api_requests: price_1Meter\n"),
        (lambda fake: legacy(fake, aggregate_usage="max"), "  api_requests: price_1Api\n"),
    ],
    ids=["pre-aggregated", "last", "legacy-max"],
)
def test_two_subjects_where_stripe_keeps_one_value_are_422_naming_both(
    environment: dict[str, str],
    config_path: Path,
    stripe_fake: FakeStripe,
    setup: Callable[[FakeStripe], object],
    meters: str,
) -> None:
    setup(stripe_fake)
    client = connect(environment, config_path, meters)
    event = report([3], subject="team-b")
    event["meter"]["aggregation"] = "MAX" if "Api" in meters else "SUM"
    response = deliver(client, event, "msg_b")
    assert response.status_code == 422, response.json
    body = response.json
    assert body is not None and body["subjects"] == ["team-a", "team-b"]
    assert "does not add up" in body["message"]
    assert stripe_fake.writes() == []


@pytest.mark.parametrize(("window", "verdict"), [(None, "ok"), ("hour", "problem")])
def test_check_config_online_tells_a_shared_meter_stripe_adds_from_one_it_does_not(
    tmp_path: Path,
    stripe_fake: FakeStripe,
    app: Flask,
    monkeypatch: pytest.MonkeyPatch,
    window: str | None,
    verdict: str,
) -> None:
    metered(stripe_fake, window=window)
    path = tmp_path / "shared.yaml"
    path.write_text(f"meters:\n  api_requests: price_1Meter\n{SHARED}")
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", stripe_fake.url)
    result = app.test_cli_runner().invoke(args=["check-config", str(path), "--online"])
    assert result.exit_code == (0 if verdict == "ok" else 1), result.output
    problems = [line for line in result.output.splitlines() if "problem" in line]
    if verdict == "ok":
        assert problems == []
    else:
        [line] = problems
        assert "subjects.team-b" in line and "subjects.team-a" in line and "price_1Meter" in line
