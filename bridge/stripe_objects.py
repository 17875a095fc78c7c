"""What the bridge reads from Stripe (subscriptions, prices, meters), and its cache of them.

"endive spec" below: stripe/openapi's spec at the version unpinned calls use (see stripe_api).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

import stripe
from stripe import RequestOptions

from bridge.stripe_api import USAGE_RECORDS_API_VERSION, call_stripe, classify

CACHE_TTL_SECONDS = 300.0
CACHE_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Item:
    """A subscription item and what its price says about metering."""

    id: str
    usage_type: str | None
    aggregate_usage: str | None  # a legacy price's, read at USAGE_RECORDS_API_VERSION (fetch_price)
    meter: str | None
    period_start: int = 0  # the current billing period's start; usage records cannot go before it
    period_end: float = math.inf
    interval: str | None = None  # the price's billing interval: day, week, month or year
    interval_count: int = 1


# Subscription statuses that bill nothing more (of the status enum in Stripe's spec, endive).
ENDED_STATUSES = ("canceled", "incomplete_expired")


@dataclass(frozen=True)
class Subscription:
    """A Stripe subscription: whom it bills, its items by price, and whether it renews."""

    id: str
    customer: str
    items: Mapping[str, Item]
    status: str = "active"
    # stripe/openapi spec3 (2026-09-30.endive), schema `subscription`: start_date and
    # cancel_at_period_end are required; cancel_at and ended_at are nullable timestamps.
    start_date: int = 0
    cancel_at: int | None = None
    cancel_at_period_end: bool = False
    ended_at: int | None = None

    @property
    def ended(self) -> bool:
        """Whether it has ended: canceled, or expired before its first payment."""
        return self.status in ENDED_STATUSES or self.ended_at is not None

    def final_end(self, item: Item) -> float:
        """When billing stops for good, if that is within the item's current period; else inf."""
        if self.ended_at is not None:
            return self.ended_at
        if self.cancel_at is not None and self.cancel_at <= item.period_end:
            return self.cancel_at
        return item.period_end if self.cancel_at_period_end else math.inf


@dataclass(frozen=True)
class Price:
    """A price as USAGE_RECORDS_API_VERSION shows it: the only versions with aggregate_usage."""

    id: str
    usage_type: str | None
    aggregate_usage: str | None
    meter: str | None
    divide_by: int | None = None  # transform_quantity: Stripe divides the period's total usage
    round: str | None = None


@dataclass(frozen=True)
class Meter:
    """A Stripe Billing meter: how its events are named, keyed and aggregated."""

    id: str
    event_name: str
    customer_key: str
    value_key: str
    formula: str
    event_time_window: str | None
    active: bool


@dataclass(frozen=True)
class Thresholds:
    """Which of a subscription's billing thresholds are set: its own (amount), its items' (usage).

    Stripe takes only `increment` usage records on such a subscription (2023 spec, usage_records
    `action`: "If the subscription has billing thresholds, `increment` is the only allowed
    value"), never the bridge's `set`. Meter events have no such rule: their endpoint takes no
    action, and threshold invoices work with meter prices (docs.stripe.com/billing/subscriptions/
    usage-based/manage-billing-setup, "if you use billing thresholds").
    """

    subscription: bool
    items: frozenset[str]


V = TypeVar("V")


class Cache(Generic[V]):
    """Stripe objects by ID, bounded and expiring, so that webhooks do not ask Stripe each time."""

    def __init__(
        self,
        ttl: float = CACHE_TTL_SECONDS,
        max_entries: int = CACHE_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, fetch: Callable[[str], V], usable: Callable[[V], bool] = bool) -> V:
        """The cached object if fresh and usable, else a fresh one (so a miss refreshes once)."""
        with self._lock:
            fetched_at, value = self._entries.get(key, (-math.inf, None))
            if self._clock() - fetched_at < self._ttl and value is not None and usable(value):
                self._entries.move_to_end(key)
                return value
        value = fetch(key)
        with self._lock:
            self._entries[key] = (self._clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return value

    def forget(self, key: str) -> None:
        """Drops an object that Stripe says has changed."""
        with self._lock:
            self._entries.pop(key, None)


@dataclass
class StripeCaches:
    """The Stripe objects kept between webhooks, each by its ID: they save calls, never decide
    (what every worker must agree on lives in the ledger)."""

    subscriptions: Cache[Subscription] = field(default_factory=Cache)
    meters: Cache[Meter] = field(default_factory=Cache)
    # Legacy prices read at acacia: the endive spec's POST /v1/prices/{price} cannot change
    # recurring or transform_quantity, so a cached one never goes stale.
    prices: Cache[Price] = field(default_factory=Cache)
    # Subscriptions with a legacy item: their billing thresholds, read at acacia.
    thresholds: Cache[Thresholds] = field(default_factory=Cache)


def _retrieve_with_items(
    client: stripe.StripeClient, subscription: str, version: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A subscription and all its items, at `version` (None: the client's); one call up to 10."""
    options: RequestOptions = {"stripe_version": version} if version else {}
    try:
        found = call_stripe(
            "retrieve_subscription",
            partial(client.v1.subscriptions.retrieve, subscription, options=options),
        ).to_dict()
        items, has_more = found["items"]["data"], found["items"]["has_more"]
        while has_more:
            after = items[-1]["id"]
            # Both specs' GET /v1/subscription_items lists `subscription_item`s.
            page = call_stripe(
                "list_subscription_items",
                partial(
                    client.v1.subscription_items.list,
                    params={"subscription": subscription, "limit": 100, "starting_after": after},
                    options=options,
                ),
            ).to_dict()
            items, has_more = items + page["data"], page["has_more"]
    except stripe.StripeError as error:
        raise classify(error, subscription=subscription) from error
    return found, items


def fetch_subscription(client: stripe.StripeClient, subscription: str) -> Subscription:
    """A subscription, its customer and items (one call unless it has over 10 items)."""
    # At endive: the endive spec's `subscription` requires status, customer and items, and its
    # `subscription_item` requires price and current_period_start/end.
    found, items = _retrieve_with_items(client, subscription)
    customer = found["customer"]
    return Subscription(
        id=subscription,
        status=found["status"],
        customer=customer if isinstance(customer, str) else customer["id"],
        start_date=found.get("start_date") or 0,
        cancel_at=found.get("cancel_at"),
        cancel_at_period_end=bool(found.get("cancel_at_period_end")),
        ended_at=found.get("ended_at"),
        items={
            item["price"]["id"]: Item(
                id=item["id"],
                # The endive spec's `recurring` has usage_type and meter but no aggregate_usage
                # (basil removed it "from all API endpoints"): resolve_target reads it at acacia.
                usage_type=(item["price"].get("recurring") or {}).get("usage_type"),
                aggregate_usage=None,
                meter=(item["price"].get("recurring") or {}).get("meter"),
                # Since basil the period lives on the item (required there), not the subscription.
                period_start=item.get("current_period_start") or 0,
                period_end=item.get("current_period_end") or math.inf,
                # The endive spec's `recurring` requires interval and interval_count.
                interval=(item["price"].get("recurring") or {}).get("interval"),
                interval_count=(item["price"].get("recurring") or {}).get("interval_count") or 1,
            )
            for item in items
        },
    )


def fetch_thresholds(client: stripe.StripeClient, subscription: str) -> Thresholds:
    """Billing thresholds on a subscription and its items, read at USAGE_RECORDS_API_VERSION."""
    # Read where usage records are written: basil's changelog ("Removes legacy usage-based
    # billing") removed billing_thresholds from the subscription endpoints, so a newer version may
    # hide them (though the endive spec lists them). The 2023 spec (stripe/openapi 63a67463) has
    # `subscription.billing_thresholds` {amount_gte, reset_billing_cycle_anchor} and
    # `subscription_item.billing_thresholds` {usage_gte}, both nullable.
    found, items = _retrieve_with_items(client, subscription, USAGE_RECORDS_API_VERSION)
    return Thresholds(
        subscription=bool(found.get("billing_thresholds")),
        items=frozenset(item["id"] for item in items if item.get("billing_thresholds")),
    )


def fetch_price(client: stripe.StripeClient, price: str) -> Price:
    """A price read at USAGE_RECORDS_API_VERSION, the last version that shows aggregate_usage."""
    try:
        # Pinned: basil removed aggregate_usage (changelog "Removes legacy usage-based billing");
        # acacia's `recurring` has it and meter (stripe-python 11.6, generated from that spec).
        found = call_stripe(
            "retrieve_price",
            partial(
                client.v1.prices.retrieve,
                price,
                options={"stripe_version": USAGE_RECORDS_API_VERSION},
            ),
        ).to_dict()
    except stripe.StripeError as error:
        raise classify(error, price=price) from error
    recurring = found.get("recurring") or {}
    # `price.transform_quantity` {divide_by, round up|down} is nullable (2023 and endive specs).
    transform = found.get("transform_quantity") or {}
    return Price(
        id=price,
        usage_type=recurring.get("usage_type"),
        aggregate_usage=recurring.get("aggregate_usage"),
        meter=recurring.get("meter"),
        divide_by=transform.get("divide_by"),
        round=transform.get("round"),
    )


def fetch_meter(client: stripe.StripeClient, meter: str) -> Meter:
    """A billing meter's event name, payload keys and aggregation."""
    try:
        # At endive: the endive spec's `billing.meter` requires event_name, status and the payload
        # keys and formula read here; event_time_window is nullable day|hour.
        found = call_stripe(
            "retrieve_meter", partial(client.v1.billing.meters.retrieve, meter)
        ).to_dict()
    except stripe.StripeError as error:
        raise classify(error, meter=meter) from error
    return Meter(
        id=meter,
        event_name=found["event_name"],
        customer_key=found["customer_mapping"]["event_payload_key"],
        value_key=found["value_settings"]["event_payload_key"],
        formula=found["default_aggregation"]["formula"],
        event_time_window=found.get("event_time_window"),
        active=found.get("status") == "active",
    )
