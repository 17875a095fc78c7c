"""OpenMeter -> Stripe usage bridge.

Verifies a Svix-signed OpenMeter usage report, maps its meter to a Stripe price and its subject to a
Stripe subscription (config.yaml), writes every usage window to Stripe, and only then answers 200.
Any failure answers non-2xx so that Svix retries; every write is idempotent, so retries never
count twice.
"""

from __future__ import annotations

import binascii
import contextvars
import hashlib
import itertools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Context, Decimal, InvalidOperation
from functools import partial
from typing import Any, TypeVar

import requests
import stripe
import yaml
from flask import Flask, Response, jsonify, request
from svix.webhooks import Webhook, WebhookVerificationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

# Stripe removed usage records in 2025-03-31.basil; this is the last API version that has them.
USAGE_RECORDS_API_VERSION = "2025-02-24.acacia"
MAX_BODY_BYTES = 1024 * 1024
# Svix gives an attempt 15 s; answer well before, so a slow Stripe gives a 503 and not a timeout.
TIME_BUDGET_SECONDS = 12.0
STRIPE_CONNECT_TIMEOUT = 3.0
STRIPE_READ_TIMEOUT = 8.0
STRIPE_MAX_ATTEMPTS = 3
ITEM_CACHE_TTL_SECONDS = 300.0
ITEM_CACHE_MAX_SUBSCRIPTIONS = 10_000

log = logging.getLogger("bridge")


# --- errors: each one is an answer an operator reads in Svix's dashboard ----------------------


class ConfigError(Exception):
    """The environment or config.yaml is unusable; every problem is named by its path."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class BridgeError(Exception):
    """A webhook that cannot be accepted (yet), with the status and advice Svix will show."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, hint: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def body(self) -> dict[str, Any]:
        """The JSON answer for this error."""
        return {"error": self.code, "message": self.message, "hint": self.hint, **self.details}


class BadSignature(BridgeError):
    status, code = 401, "bad_signature"


class BadRequest(BridgeError):
    status, code = 400, "bad_payload"


class PayloadTooLarge(BridgeError):
    status, code = 413, "payload_too_large"


class Unmapped(BridgeError):
    status, code = 422, "not_configured"


class StripeRefused(BridgeError):
    status, code = 422, "stripe_refused"


class StripeUnavailable(BridgeError):
    status, code = 503, "stripe_unavailable"


# --- configuration ---------------------------------------------------------------------------

ROUNDING_MODES = {"up": ROUND_CEILING, "down": ROUND_FLOOR, "nearest": ROUND_HALF_UP}
PRICE_ID = re.compile(r"price_[A-Za-z0-9]+")
SUBSCRIPTION_ID = re.compile(r"sub_[A-Za-z0-9]+")


@dataclass(frozen=True)
class MeterMapping:
    """Where one OpenMeter meter goes in Stripe, and how its values are converted."""

    price: str
    multiplier: Decimal = Decimal(1)
    rounding: str | None = None


@dataclass(frozen=True)
class Config:
    """config.yaml: OpenMeter meter slug -> price, OpenMeter subject -> subscription."""

    meters: Mapping[str, MeterMapping]
    subjects: Mapping[str, str]


@dataclass(frozen=True)
class Settings:
    """What the environment provides: secrets and addresses."""

    stripe_api_key: str
    webhook_secrets: tuple[str, ...]
    config_path: str = "config.yaml"
    stripe_api_base: str | None = None
    port: int = 8080


def settings_from_env(environ: Mapping[str, str]) -> Settings:
    """Reads the settings, naming every missing or malformed variable (never its value)."""
    problems = []
    api_key = environ.get("STRIPE_API_KEY", "").strip()
    if not api_key:
        problems.append("STRIPE_API_KEY is not set: give the Stripe secret (sk_) or restricted key")
    elif not api_key.startswith(("sk_", "rk_")):
        problems.append("STRIPE_API_KEY must be a secret (sk_...) or restricted (rk_...) key")
    secrets = tuple(environ.get("OPENMETER_WEBHOOK_SECRET", "").split())
    if not secrets:
        problems.append("OPENMETER_WEBHOOK_SECRET is not set: give the endpoint's whsec_ secret")
    for number, secret in enumerate(secrets, start=1):
        if not _is_webhook_secret(secret):
            problems.append(
                f"OPENMETER_WEBHOOK_SECRET: secret #{number} is not a whsec_ secret in base64"
            )
    api_base = environ.get("STRIPE_API_BASE", "").strip() or None
    if api_base and not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", api_base):
        problems.append("STRIPE_API_BASE must be an http(s) URL such as https://api.stripe.com")
    port = environ.get("PORT", "8080").strip()
    if not (port.isdigit() and 0 < int(port) < 65536):
        problems.append("PORT must be a TCP port number (1-65535)")
    if problems:
        raise ConfigError(problems)
    return Settings(
        stripe_api_key=api_key,
        webhook_secrets=secrets,
        config_path=environ.get("CONFIG_PATH", "").strip() or "config.yaml",
        stripe_api_base=api_base,
        port=int(port),
    )


def _is_webhook_secret(secret: str) -> bool:
    """True for a whsec_ secret whose key decodes (Svix would refuse it later otherwise)."""
    if not secret.startswith("whsec_"):
        return False
    try:
        return bool(binascii.a2b_base64(secret.removeprefix("whsec_") + "=="))
    except binascii.Error:
        return False


def load_config(path: str) -> Config:
    """Reads and validates config.yaml, listing every bad entry by its path."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError([f"{path}: cannot read: {error}"]) from error
    problems: list[str] = []
    if document is not None:
        _find_duplicate_keys(document, "", problems)
    if problems:
        raise ConfigError(problems)
    return parse_config(yaml.safe_load(text), problems)


def _find_duplicate_keys(node: yaml.Node, path: str, problems: list[str]) -> None:
    """Reports keys given twice in one mapping: YAML would silently keep the last one."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key_path = f"{path}.{key_node.value}" if path else str(key_node.value)
            if key_node.value in seen:
                line = key_node.start_mark.line + 1
                problems.append(f"{key_path}: duplicate key (line {line})")
            seen.add(key_node.value)
            _find_duplicate_keys(value_node, key_path, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _find_duplicate_keys(item, f"{path}[{index}]", problems)


def parse_config(document: Any, problems: list[str] | None = None) -> Config:
    """Validates a loaded config document; raises ConfigError listing every problem."""
    problems = [] if problems is None else problems
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(["(top level): must be a mapping with 'meters' and 'subjects'"])
    for key in document:
        if key not in ("meters", "subjects"):
            problems.append(f"{key}: unknown key (expected 'meters' and 'subjects')")
    meters = {
        slug: mapping
        for slug, entry in _section(document, "meters", problems).items()
        if (mapping := _meter_mapping(f"meters.{slug}", entry, problems))
    }
    subjects = {}
    for subject, subscription in _section(document, "subjects", problems).items():
        if isinstance(subscription, str) and SUBSCRIPTION_ID.fullmatch(subscription):
            subjects[subject] = subscription
        else:
            problems.append(f"subjects.{subject}: must be a Stripe subscription ID (sub_...)")
    if problems:
        raise ConfigError(problems)
    return Config(meters=meters, subjects=subjects)


def _section(document: dict[Any, Any], name: str, problems: list[str]) -> dict[str, Any]:
    """One top-level map, with its keys checked to be text."""
    section = document.get(name) or {}
    if not isinstance(section, dict):
        problems.append(f"{name}: must be a mapping")
        return {}
    for key in section:
        if not isinstance(key, str) or not key:
            problems.append(f"{name}.{key}: quote this key so that YAML reads it as text")
    return {key: value for key, value in section.items() if isinstance(key, str) and key}


def _meter_mapping(path: str, entry: Any, problems: list[str]) -> MeterMapping | None:
    """One meter entry, short (a price ID) or long (price, multiplier, rounding)."""
    if isinstance(entry, str):
        entry = {"price": entry}
    if not isinstance(entry, dict):
        problems.append(f"{path}: must be a price ID or a mapping with 'price'")
        return None
    count = len(problems)
    for key in entry:
        if key not in ("price", "multiplier", "rounding"):
            problems.append(f"{path}.{key}: unknown key (expected price, multiplier, rounding)")
    price = entry.get("price")
    if not isinstance(price, str) or not PRICE_ID.fullmatch(price):
        problems.append(f"{path}.price: must be a Stripe price ID (price_...)")
    multiplier = _multiplier(entry.get("multiplier", 1))
    if multiplier is None:
        problems.append(f"{path}.multiplier: must be a positive number such as 0.001")
    rounding = entry.get("rounding")
    if rounding is not None and rounding not in ROUNDING_MODES:
        problems.append(f"{path}.rounding: must be one of up, down, nearest")
    if len(problems) > count or not isinstance(price, str) or multiplier is None:
        return None
    return MeterMapping(price=price, multiplier=multiplier, rounding=rounding)


def _multiplier(raw: Any) -> Decimal | None:
    """A positive, finite multiplier of sane size, or None."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        return None
    if not value.is_finite() or not Decimal("1e-18") <= value <= Decimal("1e18"):
        return None
    return value


# --- verification ----------------------------------------------------------------------------


def verify(body: bytes, headers: Mapping[str, str], secrets: Sequence[str]) -> str:
    """Checks the Svix signature against every configured secret; returns the message id."""
    # Svix's own header names win over the standard-webhooks ones, as in the svix library.
    signed = {
        f"webhook-{name}": headers.get(f"svix-{name}") or headers.get(f"webhook-{name}") or ""
        for name in ("id", "timestamp", "signature")
    }
    if not all(signed.values()):
        raise BadSignature(
            "missing signature headers (svix-id, svix-timestamp, svix-signature)",
            "Send webhooks through Svix, or sign them with the Svix algorithm.",
        )
    reason = "no signature matches"
    for secret in secrets:
        try:
            Webhook(secret).verify(body, signed)
            return signed["webhook-id"]
        except WebhookVerificationError as error:
            reason = str(error)
        # Malformed headers or a non-UTF-8 body make the library raise these instead.
        except (ValueError, binascii.Error, UnicodeDecodeError):
            reason = "malformed signature header or body"
    raise BadSignature(
        f"signature rejected: {reason}",
        "Check that OPENMETER_WEBHOOK_SECRET holds this endpoint's signing secret and that "
        "the sender's clock is right (5 minutes tolerance).",
    )


# --- parsing ---------------------------------------------------------------------------------

RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
NUMERIC_STRING = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
# Exact decimal arithmetic on any value that passes parse_value's bounds.
DECIMAL = Context(prec=80)


@dataclass(frozen=True)
class Window:
    """One usage window [start, end) and the summed value of its rows."""

    start: datetime
    end: datetime
    value: Decimal


@dataclass(frozen=True)
class Report:
    """A parsed report.meter event: one subject's usage of one meter."""

    meter: str
    subject: str
    aggregation: str | None
    windows: tuple[Window, ...]


def decode_json(body: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no duplicate keys, numbers as Decimal."""
    try:
        return json.loads(
            body,
            parse_float=Decimal,
            parse_constant=_reject_constant,
            object_pairs_hook=_reject_duplicates,
        )
    except (ValueError, RecursionError) as error:
        raise BadRequest(
            f"body is not valid JSON: {str(error)[:200]}",
            "Send the OpenMeter report body unchanged.",
        ) from error


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON, and not usage."""
    raise ValueError(f"{name} is not a number")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is ambiguous: which value would be billed?"""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def event_type(event: Any) -> str:
    """The event's type; OpenMeter may send other events than usage reports to this endpoint."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise BadRequest("body must be a JSON object with a string 'type'")
    return str(event["type"])


def parse_report(event: dict[str, Any], now: datetime) -> Report:
    """Validates a report.meter event and sums its rows per window."""
    meter = _object(event, "meter").get("slug")
    if not isinstance(meter, str) or not meter:
        raise BadRequest("meter.slug must be a non-empty string")
    aggregation = _object(event, "meter").get("aggregation")
    query_subject = _object(event, "query").get("subject")
    rows = event.get("usage")
    if not isinstance(rows, list):
        raise BadRequest("usage must be a list of rows")
    subjects: set[str] = set()
    sums: dict[tuple[datetime, datetime], Decimal] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(f"usage[{index}] must be an object")
        subject = row.get("subject") or query_subject
        if not isinstance(subject, str) or not subject:
            raise BadRequest(f"usage[{index}].subject: missing (and no query.subject)")
        subjects.add(subject)
        start = parse_time(row.get("windowStart"), f"usage[{index}].windowStart")
        end = parse_time(row.get("windowEnd"), f"usage[{index}].windowEnd")
        if end <= start:
            raise BadRequest(f"usage[{index}]: windowEnd must be after windowStart")
        if start > now:
            raise BadRequest(f"usage[{index}]: window starts in the future ({row['windowStart']})")
        value = parse_value(row.get("value"), f"usage[{index}].value")
        sums[start, end] = DECIMAL.add(sums.get((start, end), Decimal(0)), value)
    if not subjects and isinstance(query_subject, str) and query_subject:
        subjects.add(query_subject)
    if len(subjects) != 1:
        raise BadRequest("a report must be about exactly one subject", subjects=sorted(subjects))
    windows = tuple(Window(start, end, value) for (start, end), value in sorted(sums.items()))
    for earlier, later in itertools.pairwise(windows):
        if later.start < earlier.end:
            raise BadRequest(f"windows overlap: {earlier.start} and {later.start}")
    return Report(
        meter=meter,
        subject=subjects.pop(),
        aggregation=aggregation if isinstance(aggregation, str) else None,
        windows=windows,
    )


def _object(event: dict[str, Any], name: str) -> dict[str, Any]:
    """A nested object of the event, or a 400 naming it."""
    value = event.get(name)
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object")
    return value


def parse_time(raw: Any, path: str) -> datetime:
    """An RFC 3339 timestamp with a zone, in UTC."""
    if not isinstance(raw, str) or not RFC3339.fullmatch(raw):
        raise BadRequest(f"{path}: must be an RFC 3339 timestamp such as 2026-11-22T00:00:00Z")
    try:
        return datetime.fromisoformat(raw.upper().replace(" ", "T")).astimezone(UTC)
    except ValueError as error:
        raise BadRequest(f"{path}: {error}") from error


def parse_value(raw: Any, path: str) -> Decimal:
    """A non-negative usage value, from a JSON number or a numeric string, exactly."""
    if isinstance(raw, bool) or not isinstance(raw, int | Decimal | str):
        raise BadRequest(f"{path}: must be a number or a numeric string")
    if isinstance(raw, str) and not NUMERIC_STRING.fullmatch(raw.strip()):
        raise BadRequest(f"{path}: {raw[:40]!r} is not a number")
    value = Decimal(raw.strip() if isinstance(raw, str) else raw)
    if value < 0:
        raise BadRequest(f"{path}: usage cannot be negative ({value})")
    # Bounds keep the arithmetic exact: far beyond any real meter, far below Decimal's limits.
    if value.adjusted() > 30 or value.as_tuple().exponent < -30:  # type: ignore[operator]
        raise BadRequest(f"{path}: value out of range")
    return value


# --- mapping ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The Stripe object a report's windows are written to."""

    subscription: str
    item: str
    mapping: MeterMapping


def find_mapping(report: Report, config: Config) -> tuple[str, MeterMapping]:
    """The subscription and meter mapping for a report, or a 422 telling what to add."""
    subscription = config.subjects.get(report.subject)
    mapping = config.meters.get(report.meter)
    missing = []
    if subscription is None:
        missing.append(f"subject {report.subject!r} is not under 'subjects'")
    if mapping is None:
        missing.append(f"meter {report.meter!r} is not under 'meters'")
    if subscription is None or mapping is None:
        raise Unmapped(
            "; ".join(missing) + " in config.yaml",
            "Add it to config.yaml; Svix keeps retrying for about a day, so nothing is lost.",
            subject=report.subject,
            meter=report.meter,
        )
    return subscription, mapping


@dataclass
class _CachedItems:
    fetched_at: float
    item_by_price: dict[str, str]


class ItemCache:
    """Each subscription's items by price, so that webhooks do not list them (bounded, expiring)."""

    def __init__(
        self,
        fetch: Callable[[str], dict[str, str]],
        ttl: float = ITEM_CACHE_TTL_SECONDS,
        max_entries: int = ITEM_CACHE_MAX_SUBSCRIPTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _CachedItems] = OrderedDict()
        self._lock = threading.Lock()

    def item_for(self, subscription: str, price: str) -> str | None:
        """The item holding price; a miss refreshes once, so a newly added price is found."""
        with self._lock:
            entry = self._entries.get(subscription)
            if entry and self._clock() - entry.fetched_at < self._ttl:
                self._entries.move_to_end(subscription)
                if price in entry.item_by_price:
                    return entry.item_by_price[price]
        item_by_price = self._fetch(subscription)
        with self._lock:
            self._entries[subscription] = _CachedItems(self._clock(), item_by_price)
            self._entries.move_to_end(subscription)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return item_by_price.get(price)

    def forget(self, subscription: str) -> None:
        """Drops a subscription whose items Stripe says have changed."""
        with self._lock:
            self._entries.pop(subscription, None)


# --- reporting to Stripe ---------------------------------------------------------------------

T = TypeVar("T")
_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("deadline", default=math.inf)


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Bounds every Stripe call made inside, so that the answer reaches Svix in time."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left() -> float:
    """Seconds left in the current budget (infinite outside a webhook)."""
    return _deadline.get() - time.monotonic()


class _BudgetAdapter(requests.adapters.HTTPAdapter):
    """Caps each Stripe request's timeout by what is left of the webhook's time budget."""

    def send(self, request: Any, *args: Any, **kwargs: Any) -> requests.Response:
        """Sends with a timeout no longer than the budget left."""
        left = max(time_left(), 0.05)
        connect, read = kwargs.get("timeout") or (STRIPE_CONNECT_TIMEOUT, STRIPE_READ_TIMEOUT)
        kwargs["timeout"] = (min(connect, left), min(read, left))
        return super().send(request, *args, **kwargs)


def make_stripe_client(settings: Settings) -> stripe.StripeClient:
    """The one Stripe client: bounded timeouts, and no hidden retries (call_stripe retries)."""
    session = requests.Session()
    adapter = _BudgetAdapter(pool_connections=4, pool_maxsize=32)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    http_client = stripe.RequestsClient(
        timeout=(STRIPE_CONNECT_TIMEOUT, STRIPE_READ_TIMEOUT), session=session
    )
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
        max_network_retries=0,
        http_client=http_client,
    )


def call_stripe(send: Callable[[], T]) -> T:
    """Runs one Stripe request, retrying what Stripe says is safe to retry while time is left."""
    for attempt in range(1, STRIPE_MAX_ATTEMPTS + 1):
        if time_left() <= 0.1:
            raise StripeUnavailable(
                "time budget ran out before every window was written",
                "Svix will retry; writes already made are idempotent and will not count twice.",
            )
        try:
            return send()
        except stripe.StripeError as error:
            delay = 0.25 * 2**attempt
            if attempt == STRIPE_MAX_ATTEMPTS or not _retryable(error) or time_left() < delay + 1:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def _retryable(error: stripe.StripeError) -> bool:
    """Stripe's retry rule: connection errors, 409 and 5xx, unless Stripe-Should-Retry says else."""
    if isinstance(error, stripe.APIConnectionError):
        return bool(error.should_retry)
    headers = {key.lower(): value for key, value in (error.headers or {}).items()}
    if "stripe-should-retry" in headers:
        return headers["stripe-should-retry"] == "true"
    status = error.http_status or 0
    return status == 409 or status >= 500


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


def fetch_items(client: stripe.StripeClient, subscription: str) -> dict[str, str]:
    """A subscription's items as price -> item (one call unless it has over 10 items)."""
    try:
        found = call_stripe(partial(client.v1.subscriptions.retrieve, subscription)).to_dict()
        items, has_more = found["items"]["data"], found["items"]["has_more"]
        while has_more:
            after = items[-1]["id"]
            page = call_stripe(
                partial(
                    client.v1.subscription_items.list,
                    params={"subscription": subscription, "limit": 100, "starting_after": after},
                )
            ).to_dict()
            items, has_more = items + page["data"], page["has_more"]
    except stripe.StripeError as error:
        raise classify(error, subscription=subscription) from error
    return {item["price"]["id"]: item["id"] for item in items}


def resolve_target(report: Report, config: Config, items: ItemCache) -> Target:
    """Finds the subscription item that bills this report's meter for its subject."""
    subscription, mapping = find_mapping(report, config)
    item = items.item_for(subscription, mapping.price)
    if item is None:
        raise StripeRefused(
            f"subscription {subscription} has no item with price {mapping.price}",
            f"Add {mapping.price} to the subscription in Stripe, or fix meters.{report.meter} "
            "in config.yaml; Svix retries for about a day.",
            subscription=subscription,
            price=mapping.price,
        )
    return Target(subscription=subscription, item=item, mapping=mapping)


@dataclass(frozen=True)
class UsageRecord:
    """One legacy usage record: the quantity of one window, set at the window's timestamp."""

    window: Window
    item: str
    timestamp: int
    quantity: int
    idempotency_key: str = field(repr=False)


def window_timestamp(window: Window) -> int:
    """One second after the window starts: inside it, in its billing period, and in the past."""
    return math.floor(window.start.timestamp()) + 1


def to_quantity(value: Decimal, mapping: MeterMapping) -> int:
    """A window's value as the whole number a usage record takes (rounded as configured)."""
    rounding = ROUNDING_MODES[mapping.rounding or "nearest"]
    return int(DECIMAL.multiply(value, mapping.multiplier).quantize(Decimal(1), rounding, DECIMAL))


def idempotency_key(message_id: str, *meaning: object) -> str:
    """A key per write: the message and what the write means, so that only a true repeat replays."""
    key = ":".join([message_id, *map(str, meaning)])
    if len(key) <= 255:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def plan_usage_records(report: Report, target: Target, message_id: str) -> list[UsageRecord]:
    """The writes a report makes: one record per window."""
    records = []
    for window in report.windows:
        timestamp = window_timestamp(window)
        if timestamp >= window.end.timestamp():
            raise BadRequest(f"window {window.start.isoformat()} is shorter than two seconds")
        quantity = to_quantity(window.value, target.mapping)
        key = idempotency_key(message_id, target.item, timestamp, quantity)
        records.append(UsageRecord(window, target.item, timestamp, quantity, key))
    return records


def write_usage_record(client: stripe.StripeClient, record: UsageRecord) -> str | None:
    """Sets one window's quantity (a repeat overwrites); returns Stripe's request id."""
    if record.timestamp > time.time():
        raise StripeUnavailable(
            f"window {record.window.start.isoformat()} started less than a second ago",
            "Svix will retry in a moment.",
        )
    response = call_stripe(
        lambda: client.raw_request(
            "post",
            f"/v1/subscription_items/{record.item}/usage_records",
            quantity=record.quantity,
            timestamp=record.timestamp,
            action="set",
            stripe_version=USAGE_RECORDS_API_VERSION,
            idempotency_key=record.idempotency_key,
        )
    )
    return str(response.request_id)


# --- the Flask app ---------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; json.dumps escapes anything a sender puts in a name."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's message and fields as a JSON line."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def log_event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Logs one event with structured fields."""
    log.log(level, message, extra={"fields": fields})


def _configure_logging() -> None:
    """Sends the bridge's log lines to stderr as JSON, unless something configured it already."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@dataclass
class Bridge:
    """Everything a webhook needs: settings, the mapping, the Stripe client and its caches."""

    settings: Settings
    config: Config
    stripe: stripe.StripeClient
    items: ItemCache


def process_webhook(
    bridge: Bridge, body: bytes, headers: Mapping[str, str], facts: dict[str, Any]
) -> dict[str, Any]:
    """Verify, parse, map, write: the whole path of one webhook; returns the 200 answer."""
    message_id = verify(body, headers, bridge.settings.webhook_secrets)
    facts["message_id"] = message_id
    event = decode_json(body)
    kind = event_type(event)
    if kind != "report.meter":
        facts["type"] = kind
        return {"outcome": "ignored", "type": kind, "message_id": message_id}
    report = parse_report(event, datetime.now(UTC))
    facts.update(subject=report.subject, meter=report.meter, windows=len(report.windows))
    target = resolve_target(report, bridge.config, bridge.items)
    records = plan_usage_records(report, target, message_id)
    refused: list[dict[str, Any]] = []
    for record in records:
        window = {
            "window_start": record.window.start.isoformat(),
            "window_end": record.window.end.isoformat(),
        }
        try:
            request_id = write_usage_record(bridge.stripe, record)
        except stripe.StripeError as error:
            problem = classify(error, **window)
            log_event(
                "stripe write failed",
                logging.WARNING,
                idempotency_key=record.idempotency_key,
                item=record.item,
                timestamp=record.timestamp,
                quantity=record.quantity,
                stripe_request_id=error.request_id,
                status=problem.status,
            )
            if isinstance(problem, StripeUnavailable):
                raise problem from error
            # A refused window must not keep the others from being written.
            bridge.items.forget(target.subscription)
            refused.append(problem.body())
            continue
        log_event(
            "stripe write",
            idempotency_key=record.idempotency_key,
            item=record.item,
            timestamp=record.timestamp,
            quantity=record.quantity,
            stripe_request_id=request_id,
        )
    if refused:
        first = refused[0]
        raise StripeRefused(
            f"Stripe refused {len(refused)} of {len(records)} windows: {first['message']}",
            first["hint"],
            refused=refused,
        )
    return {
        "outcome": "written",
        "message_id": message_id,
        "subject": report.subject,
        "meter": report.meter,
        "subscription_item": target.item,
        "windows": len(records),
        "quantity": sum(record.quantity for record in records),
    }


def read_body() -> bytes:
    """The request body, refused whole past 1 MiB (OpenMeter's reports are far smaller)."""
    try:
        return request.get_data(cache=False)
    except RequestEntityTooLarge as error:
        raise PayloadTooLarge(
            f"body over {MAX_BODY_BYTES} bytes", "Send a narrower report (fewer windows or groups)."
        ) from error


def create_app(test_config: Mapping[str, str] | None = None) -> Flask:
    """Builds the service from the environment; test_config overrides environment variables."""
    _configure_logging()
    environ = {**os.environ, **(test_config or {})}
    settings = settings_from_env(environ)
    config = load_config(settings.config_path)
    client = make_stripe_client(settings)
    bridge = Bridge(settings, config, client, ItemCache(lambda sub: fetch_items(client, sub)))

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["bridge"] = bridge

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process serves requests."""
        return jsonify(status="ok")

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        """Takes one Svix-delivered OpenMeter event; 200 only once Stripe has every window."""
        started = time.monotonic()
        facts: dict[str, Any] = {}
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            with time_budget(TIME_BUDGET_SECONDS):
                answer, status = process_webhook(bridge, read_body(), headers, facts), 200
        except BridgeError as error:
            answer, status = error.body(), error.status
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        outcome = answer.get("outcome") or answer.get("error")
        log_event("webhook", **facts, outcome=outcome, status=status, duration_ms=duration_ms)
        return jsonify(answer), status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        """Wrong paths and methods get JSON too."""
        status = error.code or 500
        return jsonify(
            error=(error.name or "error").lower().replace(" ", "_"), message=error.description
        ), status

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> tuple[Response, int]:
        """A bug: log it whole, answer without details (Svix retries)."""
        log.exception("unexpected error", extra={"fields": {"path": request.path}})
        return jsonify(
            error="internal_error",
            message="unexpected error; see the service's logs",
            hint="Svix will retry; report this if it persists.",
        ), 500

    log_event(
        "started",
        config_path=settings.config_path,
        meters=len(config.meters),
        subjects=len(config.subjects),
        secrets=len(settings.webhook_secrets),
    )
    return app


def serve() -> Flask:
    """The app gunicorn serves: a configuration problem stops the start with its message alone."""
    try:
        return create_app()
    except ConfigError as error:
        log_event("cannot start", logging.ERROR, problems=error.problems)
        raise SystemExit("cannot start:\n- " + "\n- ".join(error.problems)) from None
