"""Billing thresholds: Stripe takes only `increment` usage records on such a subscription.

2023 spec (stripe/openapi 63a67463), POST /v1/subscription_items/{subscription_item}/usage_records,
`action`: "If the subscription has billing thresholds, `increment` is the only allowed value." The
bridge only sets, so a legacy price there is refused before any write; a meter price is not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from bridge.stripe_api import USAGE_RECORDS_API_VERSION
from tests.conftest import API_KEY, Billing, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import report


def usage_posts(fake: FakeStripe) -> list[str]:
    """The usage-record writes the fake received."""
    return [r.path for r in fake.requests if r.path.endswith("/usage_records")]


@pytest.mark.parametrize("where", ["subscription", "item"])
def test_a_legacy_price_on_a_subscription_with_thresholds_is_422_before_any_write(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, where: str
) -> None:
    if where == "subscription":
        stripe_fake.set_billing_thresholds(billing.customer1, amount_gte=5000)
    else:
        stripe_fake.set_billing_thresholds(billing.customer1, item=billing.api, usage_gte=100)
    response = deliver(client, report([3, 4]), "msg_thresholds")
    assert response.status_code == 422, response.json
    body = response.json
    assert body is not None and body["error"] == "stripe_refused"
    assert "billing thresholds" in body["message"] and "'customer-1'" in body["message"]
    assert "Remove the billing thresholds" in body["hint"] and "Billing meter" in body["hint"]
    assert usage_posts(stripe_fake) == []
    # Read at the version that has them (basil removed them from the subscription endpoints).
    reads = [r for r in stripe_fake.requests if r.path == f"/v1/subscriptions/{billing.customer1}"]
    assert USAGE_RECORDS_API_VERSION in {r.headers["stripe-version"] for r in reads}


def test_a_meter_price_on_a_subscription_with_thresholds_is_billed(
    environment: dict[str, str], config_path: Path, stripe_fake: FakeStripe
) -> None:
    stripe_fake.add_meter("mtr_1Tokens", event_name="tokens")
    stripe_fake.add_price("price_1Meter", aggregate_usage=None, meter="mtr_1Tokens")
    stripe_fake.add_subscription("sub_1Limited", prices=["price_1Meter"])
    stripe_fake.set_billing_thresholds("sub_1Limited", amount_gte=5000)
    config_path.write_text(
        "meters:\n  api_requests: price_1Meter\nsubjects:\n  acme: sub_1Limited\n"
    )
    client = create_app(environment).test_client()
    response = deliver(client, report([3], subject="acme"), "msg_meter")
    assert response.status_code == 200, response.json
    assert [e["payload"]["value"] for e in stripe_fake.meter_events("tokens")] == ["3"]


def test_check_config_online_fails_naming_the_subject(
    tmp_path: Path,
    stripe_fake: FakeStripe,
    billing: Billing,
    app: Flask,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stripe_fake.set_billing_thresholds(billing.acme, item=billing.acme_api, usage_gte=100)
    path = tmp_path / "config.yaml"
    path.write_text(
        "meters:\n  api_requests: price_1Api\nsubjects:\n  customer-1: sub_1Customer1\n"
        "  acme: sub_1Acme\n"
    )
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", stripe_fake.url)
    result = app.test_cli_runner().invoke(args=["check-config", str(path), "--online"])
    assert result.exit_code == 1, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert "problem" in lines["subjects.acme"] and "billing thresholds" in lines["subjects.acme"]
    assert "price_1Api" in lines["subjects.acme"]
    assert "ok" in lines["subjects.customer-1"]
