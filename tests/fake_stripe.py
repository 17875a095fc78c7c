"""A stateful fake Stripe API on 127.0.0.1 that enforces the rules the bridge depends on."""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import random
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

# --- Stripe's rules and messages --------------------------------------------------------------

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
LOCK_TIMEOUT_MESSAGE = (
    "This object cannot be accessed right now because another API request or Stripe process is "
    "currently accessing it. If you see this error intermittently, retry the request."
)
RATE_LIMIT_MESSAGE = "Request rate limit exceeded. Learn more about rate limits in Stripe's docs."
IDEMPOTENCY_MISMATCH_MESSAGE = (
    "Keys for idempotent requests can only be used with the same parameters they were first used "
    "with. Try using a key other than '{key}' if you meant to execute a different request."
)

FAULT_KINDS = ("500", "429_lock", "429_rate", "drop", "lost_response", "late_response")
# These write nothing; of them only a 500 is saved under its idempotency key (as Stripe does).
_REFUSING_FAULTS = ("500", "429_lock", "429_rate", "drop")
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")
_FORM_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
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
T = TypeVar("T")


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


# --- the wire format: bracketed form bodies ---------------------------------------------------


def decode_form(text: str) -> dict[str, Any]:
    """Stripe's form encoding (`payload[customer]=x`, `expand[0]=items`) as nested dicts/lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        match = _FORM_KEY.match(key)
        if match is None:
            raise _bad_param(f"Invalid parameter name: {key}", key)
        parts = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node = root
        for depth, part in enumerate(parts):
            name = part or str(len(node))  # `a[]=x` appends, like Rails-style encoders
            if depth == len(parts) - 1:
                if name in node:
                    raise _bad_param(f"Received the parameter {key} twice.", key)
                node[name] = value
                break
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise _bad_param(f"Invalid hash: {key} mixes a value and a hash.", key)
            node = child
    return cast(dict[str, Any], _listify(root))


def _listify(node: Any) -> Any:
    """Turns dicts keyed 0..n into lists, as Stripe reads `expand[0]`, `expand[1]`."""
    if not isinstance(node, dict):
        return node
    values = {key: _listify(value) for key, value in node.items()}
    if values and all(key.isdigit() for key in values):
        return [values[key] for key in sorted(values, key=int)]
    return values


def _only(params: Mapping[str, Any], *allowed: str) -> None:
    """Stripe refuses parameters an endpoint does not take."""
    for name in params:
        if name not in allowed:
            raise _bad_param(f"Received unknown parameter: {name}", name, "parameter_unknown")


def _integer(params: Mapping[str, Any], name: str) -> int:
    """A required non-negative integer parameter."""
    value = params.get(name)
    if value is None:
        raise _bad_param(f"Missing required param: {name}.", name, "parameter_missing")
    if not isinstance(value, str) or not value.isdigit():
        raise _bad_param(
            f"Invalid non-negative integer: {value}", name, "parameter_invalid_integer"
        )
    return int(value)


def _string(params: Mapping[str, Any], name: str) -> str:
    """A required string parameter."""
    value = params.get(name)
    if value is None or value == "":
        raise _bad_param(f"Missing required param: {name}.", name, "parameter_missing")
    if not isinstance(value, str):
        raise _bad_param(f"Invalid string: {name} must be a string.", name)
    return value


def _list_page(url: str, objects: Sequence[dict[str, Any]], params: Mapping[str, Any]) -> Any:
    """A Stripe list object: `limit` (1..100, default 10) objects after `starting_after`."""
    limit = _integer(params, "limit") if "limit" in params else 10
    if not 1 <= limit <= 100:
        raise _bad_param("Invalid limit: must be between 1 and 100.", "limit")
    start = 0
    if "starting_after" in params:
        ids = [found["id"] for found in objects]
        if params["starting_after"] not in ids:
            raise _missing("object", str(params["starting_after"]), param="starting_after")
        start = ids.index(params["starting_after"]) + 1
    page = list(objects[start : start + limit])
    return {"object": "list", "data": page, "has_more": start + limit < len(objects), "url": url}


# --- state ------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One API request as the fake saw it, and what it answered (status 0: closed, no answer)."""

    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]
    status: int
    idempotent_replay: bool = False
    performed: bool = False  # the endpoint ran and succeeded: for a POST, a write
    fault: str | None = None
    body: dict[str, Any] | None = None  # the answer, kept only while FakeStripe.keep_bodies is set


@dataclass
class _Subscription:
    """A subscription; its billing period is shared by its items."""

    id: str
    customer: str
    status: str
    period_start: int
    period_end: int
    created: int
    items: list[str] = field(default_factory=list)
    start_date: int = 0  # when it began (may be backdated); the first period starts here
    cancel_at: int | None = None
    cancel_at_period_end: bool = False
    ended_at: int | None = None
    # The periods already invoiced: (start, end, when their invoice finalizes).
    invoiced: list[tuple[int, int, float]] = field(default_factory=list)


@dataclass
class _Item:
    """A subscription item and its legacy usage records (timestamp -> quantity)."""

    id: str
    subscription: str
    price: str
    created: int
    usage: dict[int, int] = field(default_factory=dict)


@dataclass
class _MeterEvent:
    """One accepted meter event, with when Stripe received it."""

    identifier: str
    event_name: str
    meter: str
    customer: str
    value: Decimal | None
    payload: dict[str, str]
    timestamp: int
    received: float
    cancelled: bool = False

    def as_json(self) -> dict[str, Any]:
        """The event as plain JSON values."""
        return {**asdict(self), "value": None if self.value is None else str(self.value)}


@dataclass
class _Fault:
    """A fault to inject into matching calls: the next `count`, or each with `probability`."""

    kind: str
    method: str | None
    path: re.Pattern[str] | None
    count: int | None
    probability: float | None
    rng: random.Random
    delay: float

    def fires(self, method: str, path: str) -> bool:
        """Whether this call gets the fault (consumes one of `count`)."""
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and not self.path.search(path):
            return False
        if self.probability is not None:
            return self.rng.random() < self.probability
        if self.count is None:
            return True
        if self.count <= 0:
            return False
        self.count -= 1
        return True


@dataclass
class _Saved:
    """What an idempotency key was first used for, and its answer once the endpoint ran."""

    method: str
    path: str
    params: dict[str, Any]
    status: int | None = None  # None while the first request is still executing
    body: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""


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


Handler = Callable[[Sequence[str], dict[str, Any], str], dict[str, Any]]


# --- the fake ---------------------------------------------------------------------------------


class FakeStripe:
    """Stripe's v1 API for customers, prices, meters, subscriptions, usage records, meter events."""

    lock_wait = 0.5  # how long a write waits for an object another write holds (lock_timeout)
    invoice_grace = DEFAULT_INVOICE_GRACE  # this account's invoice finalization grace period

    def __init__(
        self, api_key: str = "sk_test_fake", *, now: Callable[[], float] = time.time
    ) -> None:
        self.api_key = api_key
        self.now = now
        self.latency = 0.0  # seconds per answer; a write holds its object's lock meanwhile
        self.default_version = DEFAULT_API_VERSION  # the account's, for requests without a header
        self.keep_bodies = False  # record each answer's body too (the conformance test reads them)
        self.url = ""
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", re.compile(r"/v1/(customers|prices|billing/meters)/([^/]+)"), self._get),
            ("GET", re.compile(r"/v1/subscriptions/([^/]+)"), self._get_subscription),
            ("GET", re.compile(r"/v1/subscription_items"), self._list_items),
            ("GET", re.compile(r"/v1/subscription_items/([^/]+)"), self._get_item),
            (
                "POST",
                re.compile(r"/v1/subscription_items/([^/]+)/usage_records"),
                self._create_usage_record,
            ),
            ("POST", re.compile(r"/v1/billing/meter_events"), self._create_meter_event),
            ("POST", re.compile(r"/v1/billing/meter_event_adjustments"), self._create_adjustment),
        ]
        self.reset()

    def reset(self) -> None:
        """Drops all objects, usage, events, idempotency keys, faults and recorded requests."""
        with self._lock:
            self._customers: dict[str, dict[str, Any]] = {}
            self._prices: dict[str, dict[str, Any]] = {}
            self._meters: dict[str, dict[str, Any]] = {}
            self._subscriptions: dict[str, _Subscription] = {}
            self._items: dict[str, _Item] = {}
            self._events: list[_MeterEvent] = []  # in the order received
            self._event_ids: dict[str, _MeterEvent] = {}  # identifiers are remembered forever
            self._idempotency: dict[tuple[str, str], _Saved] = {}
            self._object_locks: dict[str, threading.Lock] = {}
            self._faults: list[_Fault] = []
            self.faults_injected: collections.Counter[str] = collections.Counter()
            self.requests: list[RecordedRequest] = []

    # --- serving ------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serves on host:port (0: any free port) in a daemon thread; returns the base URL."""
        self._server = _Server((host, port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.url = f"http://{host}:{self._server.server_port}"
        return self.url

    def stop(self) -> None:
        """Stops serving; requests still sleeping in a fault are abandoned."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    # --- fixtures -----------------------------------------------------------------------------

    def add_customer(self, id: str | None = None) -> str:
        """Adds a customer; returns its id."""
        customer = id or _new_id("cus")
        with self._lock:
            self._customers[customer] = {
                "id": customer,
                "object": "customer",
                "created": int(self.now()),
                "livemode": False,
            }
        return customer

    def add_price(
        self,
        id: str | None = None,
        *,
        usage_type: str = "metered",
        aggregate_usage: str | None = "sum",
        meter: str | None = None,
        transform_quantity: Mapping[str, Any] | None = None,
    ) -> str:
        """Adds a monthly price: legacy metered, licensed, or (with `meter`) billed by a meter."""
        if usage_type not in ("metered", "licensed"):
            raise ValueError(f"usage_type must be metered or licensed, not {usage_type!r}")
        if aggregate_usage not in ("sum", "max", "last_during_period", "last_ever", None):
            raise ValueError(f"unknown aggregate_usage {aggregate_usage!r}")
        if meter is not None and usage_type != "metered":
            raise ValueError("a price with a meter is metered")
        if meter is not None or usage_type == "licensed":
            aggregate_usage = None  # only legacy metered prices aggregate usage records
        if transform_quantity is not None and (
            set(transform_quantity) != {"divide_by", "round"}
            or transform_quantity["round"] not in ("up", "down")
        ):
            raise ValueError(
                f"transform_quantity needs divide_by and round up|down: {transform_quantity}"
            )
        price = id or _new_id("price")
        with self._lock:
            if meter is not None and meter not in self._meters:
                raise ValueError(f"no meter {meter}: add it first")
            self._prices[price] = {
                "id": price,
                "object": "price",
                "active": True,
                "billing_scheme": "per_unit",
                "created": int(self.now()),
                "currency": "usd",
                "livemode": False,
                "lookup_key": None,
                "metadata": {},
                "nickname": None,
                "product": f"prod_{price}",
                "tax_behavior": "unspecified",
                "tiers_mode": None,
                "transform_quantity": dict(transform_quantity) if transform_quantity else None,
                "type": "recurring",
                "unit_amount": 1,
                "unit_amount_decimal": "1",
                "recurring": {
                    "interval": "month",
                    "interval_count": 1,
                    "usage_type": usage_type,
                    "aggregate_usage": aggregate_usage,
                    "meter": meter,
                },
            }
        return price

    def add_meter(
        self,
        id: str | None = None,
        *,
        event_name: str,
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        formula: str = "sum",
        event_time_window: str | None = None,
        status: str = "active",
    ) -> str:
        """Adds a billing meter; `event_time_window` hour/day makes it pre-aggregated."""
        if formula not in ("sum", "count", "last"):
            raise ValueError(f"formula must be sum, count or last, not {formula!r}")
        if event_time_window not in (None, *WINDOW_SECONDS):
            raise ValueError(f"event_time_window must be hour, day or None: {event_time_window!r}")
        if status not in ("active", "inactive"):
            raise ValueError(f"status must be active or inactive, not {status!r}")
        meter = id or _new_id("mtr")
        with self._lock:
            if status == "active" and self._active_meter(event_name) is not None:
                raise ValueError(f"an active meter already takes event_name {event_name!r}")
            self._meters[meter] = {
                "id": meter,
                "object": "billing.meter",
                "event_name": event_name,
                "display_name": event_name,
                "status": status,
                "customer_mapping": {"type": "by_id", "event_payload_key": customer_key},
                "value_settings": {"event_payload_key": value_key},
                "default_aggregation": {"formula": formula},
                "event_time_window": event_time_window,
                "livemode": False,
                "created": int(self.now()),
                "updated": int(self.now()),
                "status_transitions": {
                    "deactivated_at": None if status == "active" else int(self.now())
                },
            }
        return meter

    def add_subscription(
        self,
        id: str | None = None,
        *,
        customer: str | None = None,
        prices: Sequence[str],
        status: str = "active",
        period_start: int | None = None,
        period_end: int | None = None,
        start_date: int | None = None,
    ) -> str:
        """Adds a subscription (and its customer if new); period default: now -30 to +30 days."""
        if status not in _STATUSES:
            raise ValueError(f"unknown subscription status {status!r}")
        now = int(self.now())
        subscription = id or _new_id("sub")
        with self._lock:
            if customer is None or customer not in self._customers:
                customer = self.add_customer(customer)
            self._subscriptions[subscription] = _Subscription(
                id=subscription,
                customer=customer,
                status=status,
                period_start=now - 30 * DAY if period_start is None else period_start,
                period_end=now + 30 * DAY if period_end is None else period_end,
                created=now,
            )
            found = self._subscriptions[subscription]
            found.start_date = found.period_start if start_date is None else start_date
            for price in prices:
                self.add_item(subscription, price)
        return subscription

    def renew(self, subscription: str, period_end: int) -> None:
        """Starts a subscription's next billing period where the current one ends."""
        with self._lock:
            found = self._subscriptions[subscription]
            ended = found.period_end
            found.invoiced.append((found.period_start, ended, ended + self.invoice_grace))
            found.period_start, found.period_end = ended, period_end

    def reset_billing_cycle(self, subscription: str, period_end: int) -> None:
        """An update with billing_cycle_anchor=now: the period is invoiced now, a new one begins."""
        with self._lock:
            found = self._subscriptions[subscription]
            now = int(self.now())
            found.invoiced.append((found.period_start, now, now + self.invoice_grace))
            found.period_start, found.period_end = now, period_end

    def cancel(
        self, subscription: str, *, at_period_end: bool = False, at: int | None = None
    ) -> None:
        """Schedules a cancellation: at the period's end, or at a moment (`cancel_at`)."""
        with self._lock:
            found = self._subscriptions[subscription]
            found.cancel_at_period_end, found.cancel_at = at_period_end, at

    def end(self, subscription: str, status: str = "canceled") -> None:
        """Ends a subscription now (canceled, or incomplete_expired); its period is invoiced."""
        if status not in _ENDED:
            raise ValueError(f"an ended subscription is {' or '.join(_ENDED)}, not {status!r}")
        with self._lock:
            found = self._subscriptions[subscription]
            now = int(self.now())
            found.status, found.ended_at = status, now
            found.invoiced.append((found.period_start, now, now + self.invoice_grace))

    def add_item(self, subscription: str, price: str) -> str:
        """Adds a price to an existing subscription; returns the new item's id."""
        with self._lock:
            if price not in self._prices:
                raise ValueError(f"no price {price}: add it first")
            if any(self._items[i].price == price for i in self._subscriptions[subscription].items):
                raise ValueError(f"{subscription} already has an item with {price}")
            item = _Item(_new_id("si"), subscription, price, int(self.now()))
            self._items[item.id] = item
            self._subscriptions[subscription].items.append(item.id)
        return item.id

    def add_fixtures(self, fixtures: Mapping[str, Any]) -> None:
        """Adds customers, meters, prices and subscriptions from a JSON-style mapping."""
        for customer in fixtures.get("customers", []):
            self.add_customer(customer)
        for meter in fixtures.get("meters", []):
            self.add_meter(**meter)
        for price in fixtures.get("prices", []):
            self.add_price(**price)
        for subscription in fixtures.get("subscriptions", []):
            self.add_subscription(**subscription)

    def item_id(self, subscription: str, price: str) -> str:
        """The id of the subscription's item for that price."""
        with self._lock:
            for item in self._subscriptions[subscription].items:
                if self._items[item].price == price:
                    return item
        raise KeyError(f"{subscription} has no item with {price}")

    # --- state --------------------------------------------------------------------------------

    def usage_records(self, item: str) -> dict[int, int]:
        """An item's usage records: timestamp -> quantity."""
        with self._lock:
            return dict(self._items[item].usage)

    def usage_total(self, item: str) -> int:
        """The sum of an item's usage records (what aggregate_usage=sum bills)."""
        return sum(self.usage_records(item).values())

    def meter_events(self, event_name: str | None = None) -> list[dict[str, Any]]:
        """Every accepted meter event (cancelled ones too), in the order received."""
        with self._lock:
            return [e.as_json() for e in self._events if event_name in (None, e.event_name)]

    def meter_value(self, meter: str, customer: str) -> Decimal:
        """A customer's value on a meter over all time, aggregated by the meter's rules."""
        with self._lock:
            formula = self._meters[meter]["default_aggregation"]["formula"]
            return _aggregate(formula, self._counted_events(meter, customer))

    def meter_buckets(self, meter: str, customer: str) -> dict[int, Decimal]:
        """Bucket start -> value, per the meter's event_time_window (UTC days for a raw meter)."""
        with self._lock:
            found = self._meters[meter]
            seconds = WINDOW_SECONDS[found["event_time_window"] or "day"]
            buckets: dict[int, list[_MeterEvent]] = collections.defaultdict(list)
            for event in self._counted_events(meter, customer):
                buckets[event.timestamp - event.timestamp % seconds].append(event)
            formula = found["default_aggregation"]["formula"]
            return {start: _aggregate(formula, events) for start, events in sorted(buckets.items())}

    def unbilled_events(self) -> list[dict[str, Any]]:
        """Events Stripe took but bills in no period: Stripe accepts meter events for any customer,
        and bills only those inside a period of the customer's subscription whose invoice was
        still open when the event arrived."""
        with self._lock:
            return [e.as_json() for e in self._events if not e.cancelled and not self._billed(e)]

    def _billed(self, event: _MeterEvent) -> bool:
        """Whether some subscription of the event's customer bills it."""
        for subscription in self._subscriptions.values():
            if subscription.customer != event.customer or event.timestamp < subscription.start_date:
                continue
            if not any(self._prices[self._items[i].price]["recurring"]["meter"] == event.meter
                       for i in subscription.items):  # fmt: skip
                continue
            for start, end, finalizes in subscription.invoiced:
                if start <= event.timestamp < end and event.received < finalizes:
                    return True
            current = subscription.status not in _ENDED
            if current and subscription.period_start <= event.timestamp < subscription.period_end:
                return True
        return False

    def writes(self) -> list[RecordedRequest]:
        """POSTs that performed a write: not replays, not errors, not refused by a fault."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == "POST" and r.performed and not r.idempotent_replay
            ]

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot of everything the fake holds."""
        with self._lock:
            metered = {(e.meter, e.customer) for e in self._events}
            snapshot = {
                "url": self.url,
                "latency": self.latency,
                "customers": sorted(self._customers),
                "prices": dict(self._prices),
                "meters": dict(self._meters),
                "subscriptions": {
                    s: self._render_subscription(sub, DEFAULT_API_VERSION)
                    for s, sub in self._subscriptions.items()
                },
                "usage_records": {
                    i: {str(ts): qty for ts, qty in sorted(item.usage.items())}
                    for i, item in self._items.items()
                },
                "usage_totals": {i: sum(item.usage.values()) for i, item in self._items.items()},
                "meter_events": self.meter_events(),
                "meter_values": {
                    m: {c: str(self.meter_value(m, c)) for mm, c in sorted(metered) if mm == m}
                    for m in self._meters
                },
                "meter_buckets": {  # meter -> customer -> bucket start -> value
                    m: {
                        c: {str(start): str(v) for start, v in self.meter_buckets(m, c).items()}
                        for mm, c in sorted(metered)
                        if mm == m
                    }
                    for m in self._meters
                },
                "faults_injected": dict(self.faults_injected),
                "requests": len(self.requests),
                "writes": len(self.writes()),
            }
            return cast(dict[str, Any], json.loads(json.dumps(snapshot)))  # detached from the state

    # --- faults -------------------------------------------------------------------------------

    def inject(
        self,
        kind: str,
        *,
        method: str | None = None,
        path: str | None = None,
        count: int | None = 1,
        probability: float | None = None,
        seed: int = 0,
        delay: float = 0.0,
    ) -> None:
        """Faults the next `count` matching calls (None: all), or each with `probability`."""
        # `path` is a regex searched in the request path; with a probability, count is ignored
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(FAULT_KINDS)}, not {kind!r}")
        fault = _Fault(
            kind=kind,
            method=method.upper() if method else None,
            path=re.compile(path) if path else None,
            count=count,
            probability=probability,
            rng=random.Random(seed),
            delay=delay,
        )
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Removes every injected fault (the counter stays)."""
        with self._lock:
            self._faults.clear()

    # --- one API request ----------------------------------------------------------------------

    def _serve(
        self, method: str, path: str, query: str, body: bytes, headers: dict[str, str]
    ) -> _Outcome:
        """Answers one API request and records it."""
        params: dict[str, Any] = {}
        try:
            params = decode_form(body.decode() if method == "POST" else query)
            outcome = self._answer(method, path, params, headers)
        except UnicodeDecodeError:
            self._pause()
            outcome = _Outcome.of(_bad_param("Invalid request body: not UTF-8.", "body"))
        except StripeError as error:  # refused before the endpoint: 401, bad version, idempotency
            self._pause()
            outcome = _Outcome.of(error)
        outcome.headers["Request-Id"] = _new_id("req")
        outcome.headers["Stripe-Version"] = headers.get("stripe-version", self.default_version)
        recorded = RecordedRequest(
            method=method,
            path=path,
            params=params,
            headers=headers,
            status=outcome.status,
            idempotent_replay=outcome.replay,
            performed=outcome.performed,
            fault=outcome.fault,
            body=copy.deepcopy(outcome.body) if self.keep_bodies else None,
        )
        with self._lock:
            self.requests.append(recorded)
        return outcome

    def _answer(
        self, method: str, path: str, params: dict[str, Any], headers: dict[str, str]
    ) -> _Outcome:
        """Authentication, then faults, then idempotency, then the endpoint."""
        self._authenticate(headers.get("authorization", ""))
        version = headers.get("stripe-version", self.default_version)
        if not _VERSION.match(version):
            raise _bad_param(f"Invalid Stripe API version: {version}", "Stripe-Version")
        fault = self._take_fault(method, path)
        key = headers.get("idempotency-key") if method == "POST" else None
        if fault is not None and fault.kind in _REFUSING_FAULTS:
            self._pause()
            outcome = _fault_outcome(fault.kind)
            if outcome.saved and key is not None:
                self._save_answer(method, path, params, key, outcome)
            return outcome
        if key is None:
            outcome = self._perform(method, path, params, version)
        else:
            outcome = self._perform_once(method, path, params, version, key)
        if fault is not None:
            outcome.fault = fault.kind
            if fault.kind == "lost_response":
                outcome.body = None  # performed and saved, but the answer never leaves
            else:
                outcome.delay = fault.delay
        return outcome

    def _authenticate(self, authorization: str) -> None:
        """Stripe takes the secret key as a Bearer token."""
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            message = (
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_KEY')."
            )
            raise StripeError(401, message, saved=False)
        if not secrets.compare_digest(credentials.encode(), self.api_key.encode()):
            masked = _mask(credentials)
            raise StripeError(401, f"Invalid API Key provided: {masked}", saved=False)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        """The first injected fault that fires for this call, counted by kind."""
        with self._lock:
            for fault in self._faults:
                if fault.fires(method, path):
                    self.faults_injected[fault.kind] += 1
                    return fault
        return None

    def _perform_once(
        self, method: str, path: str, params: dict[str, Any], version: str, key: str
    ) -> _Outcome:
        """Runs the endpoint once per idempotency key; a repeat replays the saved answer."""
        if len(key) > MAX_IDEMPOTENCY_KEY:
            message = f"Invalid Idempotency-Key: must be at most {MAX_IDEMPOTENCY_KEY} characters."
            raise _bad_param(message, "Idempotency-Key")
        scope = (self.api_key, key)  # keys are scoped to the account's key
        entry = _Saved(method, path, params)
        with self._lock:
            saved = self._idempotency.setdefault(scope, entry)
        if saved is not entry:
            return self._replay(saved, method, path, params, key)
        outcome = self._perform(method, path, params, version)
        with self._lock:
            if outcome.saved:
                entry.status, entry.body = outcome.status, outcome.body or {}
                entry.request_id = _new_id("req")
                outcome.headers["Original-Request"] = entry.request_id
            else:
                self._idempotency.pop(scope, None)  # the endpoint never ran: a retry runs afresh
        outcome.headers["Idempotency-Key"] = key
        return outcome

    def _save_answer(
        self, method: str, path: str, params: dict[str, Any], key: str, outcome: _Outcome
    ) -> None:
        """Saves an error the endpoint ended with, so that every retry with its key replays it."""
        with self._lock:
            entry = _Saved(method, path, params, outcome.status, outcome.body or {}, _new_id("req"))
            if self._idempotency.setdefault((self.api_key, key), entry) is entry:
                outcome.headers["Original-Request"] = entry.request_id
        outcome.headers["Idempotency-Key"] = key

    def _replay(
        self, saved: _Saved, method: str, path: str, params: dict[str, Any], key: str
    ) -> _Outcome:
        """The saved answer for a repeat; a different request or one still running is refused."""
        if (saved.method, saved.path, saved.params) != (method, path, params):
            message = IDEMPOTENCY_MISMATCH_MESSAGE.format(key=key)
            raise StripeError(400, message, error_type="idempotency_error", saved=False)
        if saved.status is None:
            message = (
                "There is currently another in-progress request using this Idempotent Key (that "
                "probably means you submitted twice, and the other request is still going "
                f"through): {key}. Please try again later."
            )
            raise StripeError(409, message, code="idempotency_key_in_use", saved=False)
        self._pause()
        headers = {
            "Idempotent-Replayed": "true",
            "Original-Request": saved.request_id,
            "Idempotency-Key": key,
        }
        return _Outcome(saved.status, saved.body, headers, replay=True)

    def _perform(self, method: str, path: str, params: dict[str, Any], version: str) -> _Outcome:
        """Runs the endpoint, holding the object it writes (Stripe's lock) through the latency."""
        route = self._route(method, path)
        if route is None:
            self._pause()
            message = (
                f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
                "or we can help at https://support.stripe.com/."
            )
            return _Outcome.of(StripeError(404, message, saved=False))
        handler, ids = route
        try:
            with self._holding(self._lock_key(path, params)):
                self._pause()
                with self._lock:
                    body = handler(ids, params, version)
        except StripeError as error:
            return _Outcome.of(error)
        except Exception as error:  # a bug in the fake: answer like Stripe's 500, never replay it
            traceback.print_exc()
            message = f"An unknown error occurred in the fake: {error!r}"
            return _Outcome(500, StripeError(500, message, error_type="api_error").body)
        return _Outcome(200, body, performed=True, saved=True)

    def _route(self, method: str, path: str) -> tuple[Handler, Sequence[str]] | None:
        """The endpoint for a method and path, and the ids the path names."""
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is not None and route_method == method:
                return handler, match.groups()
        return None

    def _lock_key(self, path: str, params: Mapping[str, Any]) -> str | None:
        """The object a write locks: its subscription item, or its meter and customer."""
        if path.endswith("/usage_records"):
            return path
        with self._lock:
            if path == "/v1/billing/meter_events":
                meter = self._active_meter(str(params.get("event_name")))
                payload = params.get("payload")
                if meter is None or not isinstance(payload, dict):
                    return None
                key = meter["customer_mapping"]["event_payload_key"]
                return f"{meter['id']}:{payload.get(key)}"
            if path == "/v1/billing/meter_event_adjustments":
                cancel = params.get("cancel")
                identifier = cancel.get("identifier") if isinstance(cancel, dict) else None
                event = self._event_ids.get(str(identifier))
                return None if event is None else f"{event.meter}:{event.customer}"
        return None

    @contextlib.contextmanager
    def _holding(self, key: str | None) -> Iterator[None]:
        """Holds an object's lock; a write that cannot take it in `lock_wait` is a lock_timeout."""
        if key is None:
            yield
            return
        with self._lock:
            lock = self._object_locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=self.lock_wait):
            raise StripeError(
                429,
                LOCK_TIMEOUT_MESSAGE,
                code="lock_timeout",
                saved=False,
                headers={"Stripe-Should-Retry": "true"},
            )
        try:
            yield
        finally:
            lock.release()

    def _pause(self) -> None:
        """The configured latency, once per API answer."""
        if self.latency > 0:
            time.sleep(self.latency)

    # --- endpoints ----------------------------------------------------------------------------

    def _get(self, ids: Sequence[str], params: dict[str, Any], version: str) -> dict[str, Any]:
        """GET /v1/customers/{id}, /v1/prices/{id} and /v1/billing/meters/{id} at `version`."""
        _only(params, "expand")
        resource, object_id = ids
        if resource == "prices":
            return self._render_price(_find(self._prices, "price", object_id), version)
        table = {"customers": self._customers}.get(resource, self._meters)
        noun = {"customers": "customer"}.get(resource, "billing meter")
        return copy.deepcopy(_find(table, noun, object_id))

    def _get_subscription(
        self, ids: Sequence[str], params: dict[str, Any], version: str
    ) -> dict[str, Any]:
        """GET /v1/subscriptions/{id}, with its first 10 items embedded."""
        _only(params, "expand")
        subscription = _find(self._subscriptions, "subscription", ids[0])
        return self._render_subscription(subscription, version)

    def _list_items(self, _: Sequence[str], params: dict[str, Any], version: str) -> dict[str, Any]:
        """GET /v1/subscription_items?subscription=sub_...: one page of its items."""
        _only(params, "subscription", "limit", "starting_after", "expand")
        subscription = _string(params, "subscription")
        found = _find(self._subscriptions, "subscription", subscription, param="subscription")
        items = [self._render_item(self._items[item], version) for item in found.items]
        return cast(
            dict[str, Any],
            _list_page(f"/v1/subscription_items?subscription={subscription}", items, params),
        )

    def _get_item(self, ids: Sequence[str], params: dict[str, Any], version: str) -> dict[str, Any]:
        """GET /v1/subscription_items/{id}."""
        _only(params, "expand")
        return self._render_item(_find(self._items, "subscription item", ids[0]), version)

    def _create_usage_record(
        self, ids: Sequence[str], params: dict[str, Any], version: str
    ) -> dict[str, Any]:
        """POST /v1/subscription_items/{id}/usage_records: legacy metered billing, pre-basil."""
        if _date(version) > LAST_USAGE_RECORDS_DATE:
            raise StripeError(
                400, USAGE_RECORDS_REMOVED_MESSAGE.format(version=version), saved=False
            )
        _only(params, "quantity", "timestamp", "action", "expand")
        quantity = _integer(params, "quantity")
        now = int(self.now())
        timestamp = (
            now if params.get("timestamp", "now") == "now" else _integer(params, "timestamp")
        )
        action = params.get("action", "increment")
        if action not in ("increment", "set"):
            raise _bad_param(f"Invalid action: {action} (must be increment or set)", "action")
        item = _find(self._items, "subscription item", ids[0], param="subscription_item")
        subscription = self._subscriptions[item.subscription]
        recurring = self._prices[item.price]["recurring"]
        if subscription.status == "canceled":
            message = (
                f"Cannot create a usage record for `{item.id}`: {subscription.id} is canceled."
            )
            raise _invalid(message)
        if recurring["meter"] is not None:
            raise _invalid(METER_PRICE_MESSAGE.format(item=item.id))
        if recurring["usage_type"] != "metered":
            message = f"Cannot create a usage record for `{item.id}`: its price is not metered."
            raise _invalid(message)
        if timestamp > now:
            raise _invalid(
                TIMESTAMP_IN_FUTURE_MESSAGE, param="timestamp", code=TIMESTAMP_OUT_OF_RANGE_CODE
            )
        if timestamp < subscription.period_start:
            raise _invalid(
                TIMESTAMP_OUT_OF_RANGE_MESSAGE, param="timestamp", code=TIMESTAMP_OUT_OF_RANGE_CODE
            )
        before = 0 if action == "set" else item.usage.get(timestamp, 0)
        item.usage[timestamp] = before + quantity
        return {
            "id": _new_id("mbur"),
            "object": "usage_record",
            "livemode": False,
            "quantity": quantity,
            "subscription_item": item.id,
            "timestamp": timestamp,
        }

    def _create_meter_event(
        self, _: Sequence[str], params: dict[str, Any], __: str
    ) -> dict[str, Any]:
        """POST /v1/billing/meter_events: validated now, counted by the meter's aggregation."""
        _only(params, "event_name", "payload", "timestamp", "identifier")
        event_name = _string(params, "event_name")
        payload = params.get("payload")
        if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
            raise _bad_param("Invalid payload: must be a hash of strings.", "payload")
        identifier = params.get("identifier") or _new_id("mev")
        if not isinstance(identifier, str) or len(identifier) > MAX_IDENTIFIER:
            message = (
                f"Invalid identifier: must be a string of at most {MAX_IDENTIFIER} characters."
            )
            raise _bad_param(message, "identifier")
        now = self.now()
        timestamp = _integer(params, "timestamp") if "timestamp" in params else int(now)
        meter = self._active_meter(event_name)
        if meter is None:
            message = f"No active meter was found with event_name `{event_name}`."
            raise _invalid(message, param="event_name")
        customer_key = meter["customer_mapping"]["event_payload_key"]
        customer = payload.get(customer_key)
        if customer is None:
            raise _invalid(f"Missing {customer_key} in payload.", param=f"payload[{customer_key}]")
        if customer not in self._customers:
            message = f"No such customer: '{customer}'"
            raise _invalid(message, param=f"payload[{customer_key}]", code="resource_missing")
        value = None
        if meter["default_aggregation"]["formula"] != "count":
            value = _meter_value(payload, meter["value_settings"]["event_payload_key"])
        if not now - METER_EVENT_MAX_AGE <= timestamp <= now + METER_EVENT_MAX_AHEAD:
            message = (
                "Timestamp must be within the past 35 calendar days and at most 5 minutes in "
                f"the future: {timestamp}."
            )
            raise _invalid(message, param="timestamp")
        if identifier in self._event_ids:
            message = DUPLICATE_METER_EVENT_MESSAGE.format(identifier=identifier)
            raise _invalid(message, param="identifier", code=DUPLICATE_METER_EVENT_CODE)
        event = _MeterEvent(
            identifier, event_name, meter["id"], customer, value, payload, timestamp, now
        )
        self._events.append(event)
        self._event_ids[identifier] = event
        return {
            "object": "billing.meter_event",
            "event_name": event_name,
            "identifier": identifier,
            "payload": payload,
            "timestamp": timestamp,
            "created": int(now),
            "livemode": False,
        }

    def _create_adjustment(
        self, _: Sequence[str], params: dict[str, Any], __: str
    ) -> dict[str, Any]:
        """POST /v1/billing/meter_event_adjustments: cancels one event received under 24 h ago."""
        _only(params, "event_name", "type", "cancel")
        event_name = _string(params, "event_name")
        if _string(params, "type") != "cancel":
            raise _bad_param("Invalid type: must be cancel.", "type")
        cancel = params.get("cancel")
        if not isinstance(cancel, dict) or not cancel.get("identifier"):
            raise _bad_param("Missing required param: cancel[identifier].", "cancel[identifier]")
        identifier = cancel["identifier"]
        event = self._event_ids.get(identifier)
        if event is None or event.event_name != event_name:
            message = f"No meter event with identifier {identifier} for event_name {event_name}."
            raise _invalid(message, param="cancel[identifier]")
        if self.now() - event.received >= ADJUSTMENT_WINDOW:
            message = "A meter event can only be cancelled within 24 hours of being received."
            raise _invalid(message, param="cancel[identifier]")
        if event.cancelled:
            raise _invalid(f"The meter event {identifier} is already cancelled.")
        event.cancelled = True
        return {
            "object": "billing.meter_event_adjustment",
            "livemode": False,
            "status": "pending",
            "event_name": event_name,
            "type": "cancel",
            "cancel": {"identifier": identifier},
        }

    # --- rendering and aggregation ------------------------------------------------------------

    def _render_subscription(self, subscription: _Subscription, version: str) -> dict[str, Any]:
        """A subscription as the given API version shows it."""
        items = [self._render_item(self._items[item], version) for item in subscription.items]
        rendered: dict[str, Any] = {
            "id": subscription.id,
            "object": "subscription",
            "automatic_tax": {"enabled": False, "liability": None, "disabled_reason": None},
            "billing_cycle_anchor": subscription.period_start,
            "canceled_at": subscription.ended_at,
            "collection_method": "charge_automatically",
            "currency": "usd",
            "customer": subscription.customer,
            "status": subscription.status,
            "created": subscription.created,
            "start_date": subscription.start_date,
            "cancel_at": subscription.cancel_at,
            "cancel_at_period_end": subscription.cancel_at_period_end,
            "ended_at": subscription.ended_at,
            "livemode": False,
            "metadata": {},
            "items": {
                "object": "list",
                "data": items[:EMBEDDED_ITEMS],
                "has_more": len(items) > EMBEDDED_ITEMS,
                "url": f"/v1/subscription_items?subscription={subscription.id}",
            },
        }
        if _date(version) < BASIL_DATE:
            rendered["current_period_start"] = subscription.period_start
            rendered["current_period_end"] = subscription.period_end
        else:
            # Newer than the acacia-era spec: endive requires them (which version added each is
            # not confirmed; the fake shows them from basil on, as it shows the item periods).
            rendered["billing_mode"] = {"type": "classic"}
            rendered["billing_schedules"] = []
            rendered["discounts"] = []
            rendered["invoice_settings"] = {"account_tax_ids": None, "issuer": {"type": "self"}}
        return rendered

    def _render_item(self, item: _Item, version: str) -> dict[str, Any]:
        """A subscription item with its full price, and from basil on its billing period."""
        subscription = self._subscriptions[item.subscription]
        price = self._render_price(self._prices[item.price], version)
        rendered: dict[str, Any] = {
            "id": item.id,
            "object": "subscription_item",
            "price": price,
            "subscription": item.subscription,
            "created": item.created,
            "metadata": {},
        }
        if _date(version) >= BASIL_DATE:
            # basil moved the period from the subscription to each item (changelog; endive spec
            # `subscription_item` requires both), and `discounts` is required there too.
            rendered["current_period_start"] = subscription.period_start
            rendered["current_period_end"] = subscription.period_end
            rendered["discounts"] = []
        if price["recurring"]["usage_type"] == "licensed":
            rendered["quantity"] = 1  # metered items have no quantity
        return rendered

    def _render_price(self, price: Mapping[str, Any], version: str) -> dict[str, Any]:
        """A price as `version` shows it: aggregate_usage only before basil."""
        rendered = copy.deepcopy(dict(price))
        if _date(version) >= BASIL_DATE:
            # basil removed aggregate_usage "from all API endpoints" (changelog); endive's
            # `recurring` is interval, interval_count, meter and usage_type.
            del rendered["recurring"]["aggregate_usage"]
        return rendered

    def _active_meter(self, event_name: str) -> dict[str, Any] | None:
        """The active meter that takes this event_name."""
        for meter in self._meters.values():
            if meter["event_name"] == event_name and meter["status"] == "active":
                return meter
        return None

    def _counted_events(self, meter: str, customer: str) -> list[_MeterEvent]:
        """The events a meter counts: all (raw) or the newest received per bucket (windowed)."""
        events = [
            e
            for e in self._events
            if e.meter == meter and e.customer == customer and not e.cancelled
        ]
        window = self._meters[meter]["event_time_window"]
        if window is None:
            return events
        seconds = WINDOW_SECONDS[window]
        newest: dict[int, _MeterEvent] = {}
        for event in events:  # in the order received, so a later one replaces an earlier one
            newest[event.timestamp - event.timestamp % seconds] = event
        return list(newest.values())

    # --- the control API ----------------------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """`/_fake/...`: state, reset, fixtures, faults and latency for other processes."""
        try:
            request = json.loads(body or b"{}")
            if (method, path) == ("GET", "/_fake/state"):
                return 200, self.state()
            if (method, path) == ("POST", "/_fake/reset"):
                self.reset()
            elif (method, path) == ("POST", "/_fake/fixtures"):
                self.add_fixtures(request)
            elif (method, path) == ("POST", "/_fake/faults"):
                if isinstance(request, dict) and request.get("clear"):
                    self.clear_faults()
                else:
                    for fault in request:
                        self.inject(**fault)
            elif (method, path) == ("POST", "/_fake/latency"):
                self.latency = float(request["seconds"])
            else:
                return 404, {"error": f"no control endpoint {method} {path}"}
        except (ValueError, TypeError, KeyError) as error:
            return 400, {"error": f"{type(error).__name__}: {error}"}
        return 200, {"ok": True}


def _find(table: Mapping[str, T], noun: str, object_id: str, param: str = "id") -> T:
    """An object by id, or Stripe's resource_missing."""
    if object_id not in table:
        raise _missing(noun, object_id, param)
    return table[object_id]


def _meter_value(payload: Mapping[str, str], key: str) -> Decimal:
    """The payload's value: a whole or decimal number of at most 15 significant digits."""
    raw = payload.get(key)
    if raw is None:
        raise _invalid(f"Missing {key} in payload.", param=f"payload[{key}]")
    digits = raw.lstrip("-").replace(".", "").lstrip("0")
    if not _NUMBER.match(raw) or len(digits) > MAX_SIGNIFICANT_DIGITS:
        message = f"Invalid {key}: {raw!r} must be a number of at most 15 significant digits."
        raise _invalid(message, param=f"payload[{key}]")
    return Decimal(raw)


def _aggregate(formula: str, events: Sequence[_MeterEvent]) -> Decimal:
    """A meter's formula over the events it counts."""
    if formula == "count":
        return Decimal(len(events))
    if formula == "last":
        if not events:
            return Decimal(0)
        latest = max(reversed(events), key=lambda e: e.timestamp)  # a tie: the later received
        return latest.value or Decimal(0)
    return sum((e.value or Decimal(0) for e in events), Decimal(0))


def _fault_outcome(kind: str) -> _Outcome:
    """The answer of a fault that stops the request before the endpoint."""
    if kind == "drop":
        return _Outcome(0, None, fault=kind)
    if kind == "500":
        # Stripe saves "the resulting status code and body of the first request made for any given
        # idempotency key ... including 500 errors" (docs.stripe.com/api/idempotent_requests): a
        # 500 comes from an endpoint that began executing, so every retry with its key replays it.
        error = StripeError(500, "An unknown error occurred", error_type="api_error")
    elif kind == "429_lock":
        retry = {"Stripe-Should-Retry": "true"}
        error = StripeError(429, LOCK_TIMEOUT_MESSAGE, code="lock_timeout", headers=retry)
    else:
        error = StripeError(429, RATE_LIMIT_MESSAGE, code="rate_limit")
    outcome = _Outcome.of(error)
    outcome.fault, outcome.saved = kind, kind == "500"
    return outcome


def _mask(key: str) -> str:
    """An API key as Stripe echoes it: its prefix and last four characters."""
    if len(key) <= 12:
        return "*" * len(key)
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


# --- HTTP ---------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server that knows its fake."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the benchmark opens many connections at once

    def __init__(self, address: tuple[str, int], fake: FakeStripe) -> None:
        super().__init__(address, _Handler)
        self.fake = fake

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (say, a killed process) is not an error; anything else is."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, lets the fake answer it, and writes (or withholds) the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, like api.stripe.com
    disable_nagle_algorithm = True  # else each answer waits ~40 ms for the client's delayed ACK

    def do_GET(self) -> None:
        """Any GET."""
        self._handle("GET")

    def do_POST(self) -> None:
        """Any POST."""
        self._handle("POST")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests and the benchmark read the recorded requests instead."""

    def _handle(self, method: str) -> None:
        """Dispatches to the control API or the fake Stripe API."""
        fake = cast(_Server, self.server).fake
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path.startswith("/_fake/"):
            status, answer = fake._control(method, url.path, body)
            self._send(status, answer, {"Request-Id": _new_id("req")})
            return
        headers = {key.lower(): value for key, value in self.headers.items()}
        outcome = fake._serve(method, url.path, url.query, body, headers)
        if outcome.delay > 0:
            time.sleep(outcome.delay)  # a late answer: the client may have given up by now
        if outcome.body is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)  # closed with no answer at all
            return
        self._send(outcome.status, outcome.body, outcome.headers)

    def _send(self, status: int, body: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        """Writes a JSON answer; a client that already left is not an error."""
        data = json.dumps(body, indent=2).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


# --- running it on its own ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Serves a fake Stripe until SIGTERM or SIGINT, printing its URL first."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_stripe", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--api-key", default="sk_test_fake")
    parser.add_argument("--fixtures", type=Path, help="JSON: customers, meters, prices, subs")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to answers")
    args = parser.parse_args(argv)
    fake = FakeStripe(args.api_key)
    fake.latency = args.latency
    if args.fixtures:
        fake.add_fixtures(json.loads(args.fixtures.read_text()))
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stopping.set())
    print(fake.start(args.host, args.port), flush=True)
    while not stopping.wait(1.0):
        pass
    fake.stop()


if __name__ == "__main__":
    main()
