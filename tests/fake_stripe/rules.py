"""Stripe's rules as the fake keeps them: API versions, limits, error messages and error answers."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_API_VERSION = "2026-10-28.endive"  # what stripe-python 16 sends, and this account's default
LAST_USAGE_RECORDS_DATE = "2025-02-24"  # 2025-02-24.acacia: the last version with usage records
BASIL_DATE = "2025-03-31"  # from basil on, billing periods live on subscription items only
DAY = 86_400
METER_EVENT_MAX_AGE = 35 * DAY
METER_EVENT_MAX_AHEAD = 5 * 60
ADJUSTMENT_WINDOW = DAY
MAX_IDEMPOTENCY_KEY = 255
MAX_IDENTIFIER = 100
MAX_SIGNIFICANT_DIGITS = 15
EMBEDDED_ITEMS = 10  # a subscription embeds at most 10 items; the rest are listed
WINDOW_SECONDS = {"hour": 3_600, "day": DAY}

# Stripe sends no `code` for these two, only the message (and param): clients match the message.
TIMESTAMP_OUT_OF_RANGE_CODE: str | None = None
TIMESTAMP_OUT_OF_RANGE_MESSAGE = (
    "Cannot create the usage record with this timestamp because timestamps must be after the "
    "subscription's last invoice period (or current period start time)."
)
TIMESTAMP_IN_FUTURE_MESSAGE = (
    "Cannot create the usage record with this timestamp because timestamps must not be in the "
    "future."
)
DUPLICATE_METER_EVENT_CODE: str | None = None
DUPLICATE_METER_EVENT_MESSAGE = "An event already exists with identifier {identifier}."
USAGE_RECORDS_REMOVED_MESSAGE = (
    "Usage records were removed in API version 2025-03-31.basil, and this request uses {version}. "
    "Pin Stripe-Version 2025-02-24.acacia or earlier for a legacy metered price, or send "
    "/v1/billing/meter_events for a price with a meter."
)
METER_PRICE_MESSAGE = (
    "Cannot create a usage record for `{item}` because it is not on the legacy metered billing "
    "system. Call /v1/billing/meter_events instead."
)
# Stripe's spec says the rule (usage_records `action`), not the message: this wording is the fake's.
BILLING_THRESHOLDS_MESSAGE = (
    "Cannot set the usage of `{item}`: its subscription has billing thresholds, so `increment` is "
    "the only allowed action."
)
LOCK_TIMEOUT_MESSAGE = (
    "This object cannot be accessed right now because another API request or Stripe process is "
    "currently accessing it. If you see this error intermittently, retry the request."
)
RATE_LIMIT_MESSAGE = "Request rate limit exceeded. Learn more about rate limits in Stripe's docs."
IDEMPOTENCY_MISMATCH_MESSAGE = (
    "Keys for idempotent requests can only be used with the same parameters they were first used "
    "with. Try using a key other than '{key}' if you meant to execute a different request."
)

_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")
_STATUSES = (  # the subscription status enum of Stripe's spec (2026-09-30.endive)
    "active",
    "trialing",
    "past_due",
    "unpaid",
    "canceled",
    "incomplete",
    "incomplete_expired",
    "paused",
)
_ENDED = ("canceled", "incomplete_expired")  # statuses whose subscription bills nothing more
# Invoices finalize 1 hour after they are created unless the account sets up to 72 hours; until
# then usage for the previous period is still billed (docs.stripe.com/billing/subscriptions/
# usage-based/configure-grace-period).
DEFAULT_INVOICE_GRACE = 3_600


class StripeError(Exception):
    """An error answer in Stripe's shape; `saved` says whether an idempotent retry replays it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        saved: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.saved = saved
        self.headers = dict(headers or {})
        self.body: dict[str, Any] = {"error": {"type": error_type, "message": message}}
        if code is not None:
            self.body["error"]["code"] = code
            self.body["error"]["doc_url"] = f"https://stripe.com/docs/error-codes/{code}"
        if param is not None:
            self.body["error"]["param"] = param


def _invalid(message: str, *, param: str | None = None, code: str | None = None) -> StripeError:
    """A 400 the endpoint decided while running: saved for idempotent replay."""
    return StripeError(400, message, param=param, code=code)


def _bad_param(message: str, param: str, code: str = "parameter_invalid") -> StripeError:
    """A 400 from parameter validation: Stripe saves no idempotent result for it."""
    return StripeError(400, message, param=param, code=code, saved=False)


def _missing(noun: str, object_id: str, param: str = "id") -> StripeError:
    """Stripe's 404 for an id it does not know."""
    return StripeError(404, f"No such {noun}: '{object_id}'", code="resource_missing", param=param)


def _new_id(prefix: str) -> str:
    """A Stripe-looking id: the prefix and 24 random characters."""
    return f"{prefix}_{secrets.token_hex(12)}"


def _date(version: str) -> str:
    """The date part of an API version (`2025-02-24.acacia` -> `2025-02-24`)."""
    return version.split(".", 1)[0]


def _mask(key: str) -> str:
    """An API key as Stripe echoes it: its prefix and last four characters."""
    if len(key) <= 12:
        return "*" * len(key)
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


@dataclass
class _Outcome:
    """How the fake answers one request; a None body closes the socket without an answer."""

    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)
    replay: bool = False
    performed: bool = False
    saved: bool = False
    fault: str | None = None
    delay: float = 0.0

    @classmethod
    def of(cls, error: StripeError) -> _Outcome:
        """The outcome of an error answer."""
        return cls(error.status, error.body, dict(error.headers), saved=error.saved)
