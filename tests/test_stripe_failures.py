"""Stripe failures say what happened: one warning line naming what was tried and why it failed,
and a rejected API key keeps /readyz at 503 until a call succeeds, in every worker."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import create_app
from bridge.stripe_health import KeyHealth
from tests.conftest import Billing, Service, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import free_port, report


@pytest.fixture(autouse=True)
def bridge_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The bridge's log lines, in caplog (the bridge's logger does not propagate to the root)."""
    bridge = logging.getLogger("bridge")
    bridge.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="bridge"):
            yield
    finally:
        bridge.removeHandler(caplog.handler)


def failures(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The fields of every `stripe request failed` line, each checked to be a warning."""
    # The same record twice when the logger propagates to the root as well: count it once.
    records = list({id(r): r for r in caplog.records}.values())
    lines = [r for r in records if r.getMessage() == "stripe request failed"]
    assert all(r.levelno == logging.WARNING for r in lines)
    return [r.fields for r in lines]  # type: ignore[attr-defined]


def readyz(base_or_client: Any) -> tuple[int, dict[str, Any]]:
    """/readyz's status and body, from a test client or over a socket."""
    if isinstance(base_or_client, str):
        try:
            with urllib.request.urlopen(f"{base_or_client}/readyz", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
    response = base_or_client.get("/readyz")
    return response.status_code, response.json


def test_an_unreachable_address_is_named(
    environment: dict[str, str], billing: Billing, caplog: pytest.LogCaptureFixture
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    client = create_app(environment | {"STRIPE_API_BASE": nowhere}).test_client()
    response = deliver(client, report([5]))
    assert response.status_code == 503, response.json
    (first, *_) = failures(caplog)
    assert first["address"] == nowhere
    assert first["method"] == "GET" and first["path"].startswith("/v1/subscriptions/")
    assert first["reason"].startswith("unreachable: NewConnectionError")
    assert "Connection refused" in first["reason"]
    assert readyz(client)[0] == 200  # an outage is not the operator's key to fix


def test_a_rejected_key_is_named_and_keeps_readyz_503_until_a_call_succeeds(
    client: Any, stripe_fake: FakeStripe, billing: Billing, caplog: pytest.LogCaptureFixture
) -> None:
    assert readyz(client)[0] == 200
    key = stripe_fake.api_key
    stripe_fake.api_key = "sk_test_rolled_key_0000"  # the key is rolled in the dashboard
    assert deliver(client, report([5]), "msg_rolled").status_code == 503
    (line,) = failures(caplog)
    assert line["address"] == stripe_fake.url and line["method"] == "GET"
    assert line["reason"] == "Stripe rejected the API key (401)"
    assert "STRIPE_API_KEY" in line["hint"]
    status, body = readyz(client)
    assert status == 503 and body["status"] == "not_ready", body
    assert body["problems"] == [
        "Stripe rejected the API key (401): set STRIPE_API_KEY to a valid key, then restart"
    ]
    assert readyz(client)[0] == 503  # it stays so, without calls
    stripe_fake.api_key = key  # e.g. a transient rejection: the next call succeeds
    assert deliver(client, report([5]), "msg_back").status_code == 200
    status, body = readyz(client)
    assert status == 200 and body["status"] == "ready", body


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("429_rate", "rate limited (429, global-rate)"),  # Stripe-Rate-Limited-Reason
        ("429_lock", "another request holds the object (429, lock_timeout)"),
        ("500", "Stripe server error (500)"),
    ],
)
def test_rate_limits_locks_and_server_errors_are_named(
    client: Any,
    stripe_fake: FakeStripe,
    billing: Billing,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    reason: str,
) -> None:
    stripe_fake.inject(kind, method="POST", path="/usage_records", count=1)
    deliver(client, report([5]))
    (line,) = failures(caplog)
    assert line["method"] == "POST" and line["path"].endswith("/usage_records")
    assert line["reason"] == reason and line["address"] == stripe_fake.url
    assert readyz(client)[0] == 200


def test_the_proxy_is_named_without_its_password(
    environment: dict[str, str],
    billing: Billing,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("HTTPS_PROXY", f"http://bridge:s3cret-pw@127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "")
    base = "https://api.stripe.com"
    client = create_app(environment | {"STRIPE_API_BASE": base}).test_client()
    response = deliver(client, report([5]))
    assert response.status_code == 503
    (first, *_) = failures(caplog)
    assert first["address"] == base and first["proxy"] == f"http://127.0.0.1:{port}"
    assert "unreachable" in first["reason"]
    assert "s3cret-pw" not in caplog.text and "s3cret-pw" not in response.get_data(as_text=True)


def test_the_verdict_is_shared_by_the_workers_of_one_start(tmp_path: Path) -> None:
    one, other = KeyHealth(str(tmp_path)), KeyHealth(str(tmp_path))
    one.rejected("Stripe rejected the API key (401): ...")
    assert other.problem() == "Stripe rejected the API key (401): ..."
    other.accepted()
    assert one.problem() is None
    assert KeyHealth().problem() is None
    assert KeyHealth(str(tmp_path / "elsewhere")).problem() is None


def test_every_gunicorn_worker_answers_readyz_503_after_a_rejection(
    service: Service, stripe_fake: FakeStripe, billing: Billing
) -> None:
    key = stripe_fake.api_key
    stripe_fake.api_key = "sk_test_rolled_key_0000"
    status, _ = service.deliver(report([5]), "msg_rolled")
    assert status == 503
    # Probes reach either worker; each answers from the shared verdict.
    answers = [readyz(service.base) for _ in range(20)]
    assert {status for status, _ in answers} == {503}, answers
    warnings = [line for line in service.logs() if line["message"] == "stripe request failed"]
    assert warnings and warnings[0]["level"] == "warning"
    stripe_fake.api_key = key
    assert service.deliver(report([5]), "msg_back")[0] == 200
    assert {readyz(service.base)[0] for _ in range(20)} == {200}
