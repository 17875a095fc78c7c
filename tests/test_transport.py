"""The Stripe transport: urllib3's pool under stripe's client, proxies from the environment as
requests reads them, each request bounded by the webhook's budget, stripe's error semantics."""

from __future__ import annotations

import base64
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import stripe
from stripe import _api_requestor as stripe_requestor
from stripe import _util as stripe_util

from app import create_app
from bridge.budget import time_budget
from bridge.transport import BudgetHTTPClient, egress_proxy
from tests.conftest import Billing, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import free_port, hours_ago, report
from tests.tunnel import Certificates, ConnectProxy, TlsFront, clear_proxies, make_certificates

CREDENTIALS = "Basic " + base64.b64encode(b"bridge:p@ss").decode()


@pytest.fixture(autouse=True)
def no_proxy_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever proxy this machine has set, each test sets its own."""
    clear_proxies(monkeypatch)


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    """A test CA and a certificate for stripe.test and localhost."""
    try:
        return make_certificates(tmp_path / "tls")
    except FileNotFoundError:
        pytest.skip("openssl is not installed: the https tests need it to make a certificate")


@pytest.fixture
def stripe_tls(stripe_fake: FakeStripe, certificates: Certificates) -> Iterator[int]:
    """The fake Stripe behind TLS on 127.0.0.1; yields the port."""
    address = urllib.parse.urlsplit(stripe_fake.url)
    front = TlsFront(certificates, (address.hostname or "", address.port or 0))
    yield front.port
    front.stop()


@pytest.fixture
def trusted(certificates: Certificates, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge trusts the test CA (stripe.ca_bundle_path: stripe's public setting)."""
    monkeypatch.setattr(stripe, "ca_bundle_path", str(certificates.ca))


@pytest.fixture
def proxy() -> Iterator[ConnectProxy]:
    """An egress CONNECT proxy that wants bridge:p@ss and resolves stripe.test to 127.0.0.1."""
    running = ConnectProxy({"stripe.test": "127.0.0.1"}, authorization=CREDENTIALS)
    yield running
    running.stop()


def test_https_proxy_tunnels_with_its_credentials_except_for_no_proxy(
    environment: dict[str, str],
    billing: Billing,
    stripe_fake: FakeStripe,
    stripe_tls: int,
    trusted: None,
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://bridge:p%40ss@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "localhost")
    # stripe.test resolves only in the proxy: a write that lands went through the tunnel.
    base = f"https://stripe.test:{stripe_tls}"
    tunnelled = create_app(environment | {"STRIPE_API_BASE": base}).test_client()
    assert deliver(tunnelled, report([5])).status_code == 200
    assert stripe_fake.usage_total(billing.api) == 5
    assert proxy.tunnels
    assert set(proxy.tunnels) == {(f"stripe.test:{stripe_tls}", CREDENTIALS)}
    tunnels = len(proxy.tunnels)
    base = f"https://localhost:{stripe_tls}"
    direct = create_app(environment | {"STRIPE_API_BASE": base}).test_client()
    assert deliver(direct, report([6], first=hours_ago(5)), "msg_direct").status_code == 200
    assert stripe_fake.usage_total(billing.api) == 11
    assert len(proxy.tunnels) == tunnels  # NO_PROXY: straight to Stripe


def test_lowercase_https_proxy_wins_over_uppercase(
    environment: dict[str, str],
    billing: Billing,
    stripe_fake: FakeStripe,
    stripe_tls: int,
    trusted: None,
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("https_proxy", f"http://bridge:p%40ss@127.0.0.1:{proxy.port}")
    base = f"https://stripe.test:{stripe_tls}"
    client = create_app(environment | {"STRIPE_API_BASE": base}).test_client()
    assert deliver(client, report([5])).status_code == 200
    assert stripe_fake.usage_total(billing.api) == 5
    assert proxy.tunnels


def test_wrong_proxy_credentials_are_a_retry_not_a_refusal(
    environment: dict[str, str],
    billing: Billing,
    stripe_fake: FakeStripe,
    stripe_tls: int,
    trusted: None,
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://bridge:wrong@127.0.0.1:{proxy.port}")
    base = f"https://stripe.test:{stripe_tls}"
    client = create_app(environment | {"STRIPE_API_BASE": base}).test_client()
    response = deliver(client, report([5]))
    assert response.status_code == 503, response.json
    assert "wrong" not in response.get_data(as_text=True)
    assert stripe_fake.usage_total(billing.api) == 0


def test_egress_proxy_is_what_requests_would_take(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")  # no scheme: http, as requests reads it
    assert egress_proxy("https://api.stripe.com") == "http://proxy.corp:3128"
    monkeypatch.setenv("NO_PROXY", ".stripe.com")
    assert egress_proxy("https://api.stripe.com") is None
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("https_proxy", "")  # an empty lowercase one turns the uppercase one off
    assert egress_proxy("https://api.stripe.com") is None


def test_a_stalled_stripe_call_gives_up_when_the_webhook_budget_runs_out(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing
) -> None:
    client = create_app(environment | {"TIME_BUDGET_SECONDS": "1"}).test_client()
    # Stripe answers after 6 s: within the transport's 8 s read timeout, beyond the budget.
    stripe_fake.inject("late_response", path="/usage_records", count=None, delay=6.0)
    started = time.monotonic()
    response = deliver(client, report([5]))
    assert response.status_code == 503, response.json
    assert time.monotonic() - started < 4.0  # the 1 s budget, and what a loaded machine adds


def test_each_request_times_out_with_the_budget_and_may_be_retried() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1/prices"
        started = time.monotonic()
        with time_budget(0.5), pytest.raises(stripe.APIConnectionError) as caught:
            BudgetHTTPClient().request("get", url, {})
    assert 0.4 < time.monotonic() - started < 4.0  # 0.5 s; not the 8 s read timeout
    assert caught.value.should_retry


def test_a_refused_connection_may_be_retried() -> None:
    with pytest.raises(stripe.APIConnectionError) as caught:
        BudgetHTTPClient().request("get", f"http://127.0.0.1:{free_port()}/v1/prices", {})
    assert caught.value.should_retry


def test_a_certificate_that_does_not_verify_is_not_retried(stripe_tls: int) -> None:
    # stripe's CA bundle does not know the test CA: like a network that intercepts TLS.
    with pytest.raises(stripe.APIConnectionError) as caught:
        BudgetHTTPClient().request("get", f"https://localhost:{stripe_tls}/v1/prices", {})
    assert not caught.value.should_retry


def test_stripe_logs_through_its_own_unpatched_functions(
    environment: dict[str, str], billing: Billing, caplog: pytest.LogCaptureFixture
) -> None:
    client = create_app(environment).test_client()
    assert vars(stripe_requestor)["log_info"] is stripe_util.log_info
    assert vars(stripe_requestor)["log_debug"] is stripe_util.log_debug
    with caplog.at_level("DEBUG", logger="stripe"):
        assert deliver(client, report([2])).status_code == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "stripe"]
    assert any(m.startswith("message='Request to Stripe api'") for m in messages)
    assert any("API response body" in m for m in messages)
