"""Adding objects: customers, prices, meters, subscriptions and their items, and fixtures files.

A fixtures document (`python -m tests.fake_stripe --fixtures FILE`, `POST /_fake/fixtures`) is a
JSON object with up to four lists, loaded in the order of FIXTURE_KEYS; docs/development.md
describes each key. An unknown key is refused, naming the allowed ones, rather than dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tests.fake_stripe.rules import _STATUSES, DAY, WINDOW_SECONDS, _new_id
from tests.fake_stripe.state import State, _Item, _Subscription

# The keys an entry of each list takes: the arguments of the add_* method of the same name, and for
# a subscription its scheduled cancellation (`cancel`). A customer entry is its id, a string.
FIXTURE_KEYS: dict[str, tuple[str, ...]] = {
    "customers": (),
    "meters": (
        "id", "event_name", "customer_key", "value_key", "formula", "event_time_window", "status",
    ),
    "prices": ("id", "usage_type", "aggregate_usage", "meter", "transform_quantity"),
    "subscriptions": (
        "id", "customer", "prices", "status", "period_start", "period_end", "start_date",
        "cancel_at", "cancel_at_period_end",
    ),
}  # fmt: skip
REQUIRED_KEYS = {"meters": ("event_name",), "subscriptions": ("prices",)}
_SECONDS_KEYS = ("period_start", "period_end", "start_date", "cancel_at")  # Unix seconds


def check_fixtures(fixtures: object) -> None:
    """Refuses a fixtures document with an unknown or misshapen key, naming the allowed ones."""
    if not isinstance(fixtures, Mapping):
        raise ValueError(f"fixtures must be a JSON object with the lists {_names(FIXTURE_KEYS)}")
    for kind, entries in fixtures.items():
        if kind not in FIXTURE_KEYS:
            raise ValueError(f"fixtures: unknown key {kind!r}; the keys are {_names(FIXTURE_KEYS)}")
        if not isinstance(entries, list):
            raise ValueError(f"fixtures: {kind} must be a list, not {entries!r}")
        for n, entry in enumerate(entries):
            _check_entry(kind, f"{kind}[{n}]", entry)


def _check_entry(kind: str, where: str, entry: object) -> None:
    """One list entry: a customer id, or an object with only its list's keys."""
    if kind == "customers":
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"fixtures: {where} must be a customer id (a string), not {entry!r}")
        return
    allowed = FIXTURE_KEYS[kind]
    if not isinstance(entry, Mapping):
        raise ValueError(f"fixtures: {where} must be an object with the keys {_names(allowed)}")
    for key in entry:
        if key not in allowed:
            message = f"fixtures: {where} has unknown key {key!r}; a {kind[:-1]} takes"
            raise ValueError(f"{message} {_names(allowed)}")
    for key in REQUIRED_KEYS.get(kind, ()):
        if key not in entry:
            raise ValueError(f"fixtures: {where} is missing the required key {key!r}")
    for key in _SECONDS_KEYS:
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"fixtures: {where}: {key} must be Unix seconds, not {value!r}")
    if not isinstance(entry.get("cancel_at_period_end", False), bool):
        raise ValueError(f"fixtures: {where}: cancel_at_period_end must be true or false")


def _names(keys: Mapping[str, Any] | Sequence[str]) -> str:
    """Keys as a readable list."""
    return ", ".join(keys)


class Fixtures(State):
    """Adds objects the way a test or a fixtures file sets up an account."""

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

    def set_billing_thresholds(
        self,
        subscription: str,
        *,
        amount_gte: int | None = None,
        usage_gte: int | None = None,
        item: str | None = None,
    ) -> None:
        """Gives a subscription a monetary threshold, or one of its items a usage threshold."""
        with self._lock:
            if item is not None:
                self._items[item].usage_gte = usage_gte
            else:
                found = self._subscriptions[subscription]
                found.billing_thresholds = {
                    "amount_gte": amount_gte,
                    "reset_billing_cycle_anchor": False,
                }

    def add_fixtures(self, fixtures: Mapping[str, Any]) -> None:
        """Adds customers, meters, prices and subscriptions from a fixtures document (checked)."""
        check_fixtures(fixtures)
        for customer in fixtures.get("customers", []):
            self.add_customer(customer)
        for meter in fixtures.get("meters", []):
            self.add_meter(**meter)
        for price in fixtures.get("prices", []):
            self.add_price(**price)
        for entry in fixtures.get("subscriptions", []):
            arguments = dict(entry)
            cancel_at = arguments.pop("cancel_at", None)
            at_period_end = arguments.pop("cancel_at_period_end", False)
            subscription = self.add_subscription(**arguments)
            if cancel_at is not None or at_period_end:
                self.cancel(subscription, at_period_end=at_period_end, at=cancel_at)
