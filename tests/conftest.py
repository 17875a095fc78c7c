"""Fixtures: a fake Stripe on 127.0.0.1, the app wired to it, and genuinely signed webhooks."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import create_app
from tests.fake_stripe import FakeStripe
from tests.harness import (
    ROTATED_SECRET,
    SECRET,
    free_port,
    healthy,
    pinned_hour,
    post,
    sign,
    start_service,
    wait_until,
)
from tests.postgres import PostgresServer
from tests.postgres import why_not as postgres_unavailable

API_KEY = "sk_test_bridge0123456789"

CONFIG_YAML = """\
meters:
  api_requests: price_1Api
  ai_tokens: price_1Tokens
  storage_gb:
    price: price_1Storage
    multiplier: 0.001
    rounding: up
  cpu_seconds:
    price: price_1Cpu
    rounding: down
subjects:
  customer-1: sub_1Customer1
  acme: sub_1Acme
  unbilled: sub_1Missing
"""


@dataclass
class Billing:
    """The Stripe objects the tests' config.yaml points at."""

    customer1: str
    acme: str
    api: str  # customer-1's item for api_requests
    storage: str
    cpu: str
    tokens: str  # acme's item for ai_tokens
    acme_api: str


@pytest.fixture(autouse=True)
def one_hour_per_test() -> Iterator[None]:
    """Every hours_ago() of a test counts back from the hour the test began in."""
    with pinned_hour():
        yield


@pytest.fixture
def stripe_fake() -> Iterator[FakeStripe]:
    """A stateful fake Stripe speaking the real wire format on 127.0.0.1."""
    fake = FakeStripe(api_key=API_KEY)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def billing(stripe_fake: FakeStripe) -> Billing:
    """Legacy metered prices on two subscriptions, in their current billing period."""
    for price in ("price_1Api", "price_1Tokens", "price_1Storage", "price_1Cpu"):
        stripe_fake.add_price(price, usage_type="metered", aggregate_usage="sum")
    prices = ["price_1Api", "price_1Storage", "price_1Cpu"]
    stripe_fake.add_subscription("sub_1Customer1", prices=prices)
    stripe_fake.add_subscription("sub_1Acme", prices=["price_1Tokens", "price_1Api"])
    stripe_fake.add_subscription("sub_1Newcomer", prices=["price_1Api"])  # onboarded by tests
    return Billing(
        customer1="sub_1Customer1",
        acme="sub_1Acme",
        api=stripe_fake.item_id("sub_1Customer1", "price_1Api"),
        storage=stripe_fake.item_id("sub_1Customer1", "price_1Storage"),
        cpu=stripe_fake.item_id("sub_1Customer1", "price_1Cpu"),
        tokens=stripe_fake.item_id("sub_1Acme", "price_1Tokens"),
        acme_api=stripe_fake.item_id("sub_1Acme", "price_1Api"),
    )


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """The tests' config.yaml."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_YAML)
    return path


@pytest.fixture
def environment(stripe_fake: FakeStripe, config_path: Path, tmp_path: Path) -> dict[str, str]:
    """The environment variables production would set, pointed at the fake."""
    return {
        "STRIPE_API_KEY": API_KEY,
        "OPENMETER_WEBHOOK_SECRET": f"{SECRET} {ROTATED_SECRET}",
        "CONFIG_PATH": str(config_path),
        "STRIPE_API_BASE": stripe_fake.url,
        "STATE_PATH": str(tmp_path / "state" / "bridge.sqlite3"),
        # The fake has no rate limit unless a test sets one (tests/test_pacing.py): the budget
        # stays out of the way of the other tests' timing.
        "STRIPE_MAX_RATE": "1000",
    }


@pytest.fixture
def app(environment: dict[str, str], billing: Billing) -> Flask:
    """A fresh service per test."""
    return create_app(environment)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """The app's test client."""
    return app.test_client()


def deliver(
    client: FlaskClient, payload: dict[str, Any] | str, message_id: str = "msg_test1", **kw: Any
) -> TestResponse:
    """POSTs a signed webhook, as one Svix delivery attempt."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return client.post("/webhook", data=body, headers=sign(body, message_id, **kw))


@dataclass
class Service:
    """The service as production runs it: the Dockerfile's CMD under gunicorn, over a socket."""

    base: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def deliver(self, payload: dict[str, Any] | str, message_id: str, **kw: Any) -> tuple[int, Any]:
        """One signed delivery attempt."""
        body = payload if isinstance(payload, str) else json.dumps(payload)
        return post(f"{self.base}/webhook", body, sign(body, message_id, **kw))

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log line so far."""
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def webhook_pids(self, message_id: str = "") -> set[int]:
        """The workers that answered the webhooks whose message id starts with message_id."""
        lines = [line for line in self.logs() if line["message"] == "webhook"]
        return {line["pid"] for line in lines if line.get("message_id", "").startswith(message_id)}


@pytest.fixture
def service_env() -> dict[str, str]:
    """Extra environment for the gunicorn service (a test module may override this)."""
    return {}


@pytest.fixture
def service(
    environment: dict[str, str], service_env: dict[str, str], billing: Billing, tmp_path: Path
) -> Iterator[Service]:
    """The service under gunicorn (two workers) against the fake Stripe."""
    with serving(environment | service_env, tmp_path / "gunicorn.log") as running:
        yield running


@contextmanager
def serving(env: dict[str, str], log_path: Path) -> Iterator[Service]:
    """The Dockerfile's CMD (two workers) with env, until the block ends."""
    port = free_port()
    process = start_service(env | {"PORT": str(port)}, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(base) or process.poll() is not None, timeout=30)
        assert process.poll() is None, log_path.read_text()
        yield Service(base, process, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL for the session; skips where none can run (tests/postgres.py)."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A DATABASE_URL for an empty database of its own, on a running server."""
    if postgres_server.process is None:  # a test that stopped the server left it stopped
        postgres_server.start()
    return postgres_server.create_database()
