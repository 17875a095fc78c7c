"""The one Stripe client, its retries, and what a Stripe error means for Svix."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import stripe

from bridge.budget import time_left
from bridge.errors import BridgeError, StripeRefused, StripeUnavailable
from bridge.logs import STRIPE_ERRORS, STRIPE_SECONDS
from bridge.pacing import make_pacer
from bridge.settings import Settings
from bridge.stripe_health import KeyHealth
from bridge.transport import BudgetHTTPClient, egress_proxy

# Stripe removed usage records in 2025-03-31.basil; this is the last API version that has them.
# Unpinned calls go at stripe-python 16.1's 2026-10-28.endive. "endive spec" below: stripe/openapi
# latest/openapi.spec3.json at 18fa2cc7 (2026-09-30.endive), trimmed into tests/stripe_openapi.json.
USAGE_RECORDS_API_VERSION = "2025-02-24.acacia"
STRIPE_MAX_ATTEMPTS = 3

# Process-wide stripe settings, set once here at import. Telemetry would write an id under $HOME
# (unwritable, or unset, in a locked-down container).
stripe.enable_telemetry = False

T = TypeVar("T")


def make_stripe_client(settings: Settings, health: KeyHealth | None = None) -> stripe.StripeClient:
    """The one Stripe client: bounded timeouts, and no hidden retries (call_stripe retries);
    health records whether Stripe takes the key (for /readyz)."""
    api_base = settings.stripe_api_base or stripe.DEFAULT_API_BASE
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses={"api": api_base},
        max_network_retries=0,
        # Every call the bridge makes goes to the API base: the proxy settings_from_env checked.
        http_client=BudgetHTTPClient(egress_proxy(api_base), make_pacer(settings), health),
    )


def call_stripe(operation: str, send: Callable[[], T]) -> T:
    """Runs one Stripe request, retrying what Stripe says is safe to retry while time is left."""
    # stripe's own retries (max_network_retries) sleep up to 5 s whatever is left of the budget.
    for attempt in range(1, STRIPE_MAX_ATTEMPTS + 1):
        if time_left() <= 0.1:
            raise StripeUnavailable(
                "time budget ran out before every window was written",
                "Svix will retry; writes already made are idempotent and will not count twice.",
            )
        try:
            with STRIPE_SECONDS.labels(operation).time():
                return send()
        except stripe.StripeError as error:
            STRIPE_ERRORS.labels(type(error).__name__).inc()
            delay = 0.25 * 2**attempt
            if attempt == STRIPE_MAX_ATTEMPTS or not _retryable(error) or time_left() < delay + 1:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def _retryable(error: stripe.StripeError) -> bool:
    """Stripe's retry rule: connection errors, 409 and 5xx, unless Stripe-Should-Retry says else;
    and a 429 for a rate limit, whose retry waits for the rate budget's next free slot."""
    # Restated: stripe's own copy is HTTPClient._should_retry, private and tied to its retry loop.
    if isinstance(error, stripe.APIConnectionError):
        return bool(error.should_retry)
    headers = {key.lower(): value for key, value in (error.headers or {}).items()}
    if "stripe-should-retry" in headers:
        return headers["stripe-should-retry"] == "true"
    status = error.http_status or 0
    # A rate-limited request never reached the endpoint, so nothing is saved under its
    # idempotency key ("Results are only saved if an API endpoint started executing",
    # docs.stripe.com/api/idempotent_requests): the retry runs afresh.
    rate_limited = status == 429 and "stripe-rate-limited-reason" in headers
    return rate_limited or status == 409 or status >= 500


def classify(error: stripe.StripeError, **details: Any) -> BridgeError:
    """Turns a Stripe error into a retry (503) or a refusal (422), by its class and status."""
    stripe_code = getattr(error.error, "code", None) or error.code
    request_id = error.request_id
    if isinstance(error, stripe.AuthenticationError | stripe.PermissionError):
        return StripeUnavailable(
            "Stripe rejected the API key",
            "Fix STRIPE_API_KEY (it needs write access to usage); Svix will retry.",
            stripe_request_id=request_id,
            **details,
        )
    if isinstance(error, stripe.InvalidRequestError | stripe.IdempotencyError):
        return StripeRefused(
            f"Stripe refused the write: {error.user_message or error}",
            "Fix the subscription or price in Stripe, or the mapping in config.yaml; "
            "Svix retries for about a day.",
            stripe_code=stripe_code,
            stripe_request_id=request_id,
            **details,
        )
    return StripeUnavailable(
        f"Stripe is unavailable ({type(error).__name__}, status {error.http_status})",
        "Svix will retry; writes already made are idempotent and will not count twice.",
        stripe_request_id=request_id,
        **details,
    )
