"""A stateful fake Stripe API on 127.0.0.1 that enforces the rules the bridge depends on.

One concern per module: `rules` (Stripe's versions, limits and messages), `params` (form bodies and
parameters), `state` (what it holds, and queries), `fixtures` (adding objects; the fixtures
format), `render` (objects per Stripe-Version), `handlers` (the endpoints), `faults` (fault
injection and latency), `api` (one request: auth, idempotency, locks), `server` (FakeStripe on a
socket, and its control API), `__main__` (`python -m tests.fake_stripe`).
"""

from tests.fake_stripe.faults import FAULT_KINDS
from tests.fake_stripe.fixtures import FIXTURE_KEYS, check_fixtures
from tests.fake_stripe.params import decode_form
from tests.fake_stripe.rules import (
    ADJUSTMENT_WINDOW,
    BASIL_DATE,
    DAY,
    DEFAULT_API_VERSION,
    DEFAULT_INVOICE_GRACE,
    DUPLICATE_METER_EVENT_CODE,
    DUPLICATE_METER_EVENT_MESSAGE,
    EMBEDDED_ITEMS,
    IDEMPOTENCY_MISMATCH_MESSAGE,
    LAST_USAGE_RECORDS_DATE,
    LOCK_TIMEOUT_MESSAGE,
    MAX_IDEMPOTENCY_KEY,
    MAX_IDENTIFIER,
    MAX_SIGNIFICANT_DIGITS,
    METER_EVENT_MAX_AGE,
    METER_EVENT_MAX_AHEAD,
    METER_PRICE_MESSAGE,
    RATE_LIMIT_MESSAGE,
    TIMESTAMP_IN_FUTURE_MESSAGE,
    TIMESTAMP_OUT_OF_RANGE_CODE,
    TIMESTAMP_OUT_OF_RANGE_MESSAGE,
    USAGE_RECORDS_REMOVED_MESSAGE,
    WINDOW_SECONDS,
    StripeError,
)
from tests.fake_stripe.server import FakeStripe
from tests.fake_stripe.state import RecordedRequest

__all__ = [
    "ADJUSTMENT_WINDOW",
    "BASIL_DATE",
    "DAY",
    "DEFAULT_API_VERSION",
    "DEFAULT_INVOICE_GRACE",
    "DUPLICATE_METER_EVENT_CODE",
    "DUPLICATE_METER_EVENT_MESSAGE",
    "EMBEDDED_ITEMS",
    "FAULT_KINDS",
    "FIXTURE_KEYS",
    "IDEMPOTENCY_MISMATCH_MESSAGE",
    "LAST_USAGE_RECORDS_DATE",
    "LOCK_TIMEOUT_MESSAGE",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_IDENTIFIER",
    "MAX_SIGNIFICANT_DIGITS",
    "METER_EVENT_MAX_AGE",
    "METER_EVENT_MAX_AHEAD",
    "METER_PRICE_MESSAGE",
    "RATE_LIMIT_MESSAGE",
    "TIMESTAMP_IN_FUTURE_MESSAGE",
    "TIMESTAMP_OUT_OF_RANGE_CODE",
    "TIMESTAMP_OUT_OF_RANGE_MESSAGE",
    "USAGE_RECORDS_REMOVED_MESSAGE",
    "WINDOW_SECONDS",
    "FakeStripe",
    "RecordedRequest",
    "StripeError",
    "check_fixtures",
    "decode_form",
]
