"""Small Stripe objects and windows for the unit tests, built by hand (no Stripe, no Flask)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from bridge.config import MeterMapping
from bridge.report import Report, Window
from bridge.stripe_objects import Item, Meter, Subscription
from bridge.targets import Target

T0 = datetime(2026, 11, 1, tzinfo=UTC)  # a billing period's start, and the first window's


def window(hour: int, value: str = "1", hours: int = 1) -> Window:
    """The window of `hours` starting `hour` hours after T0."""
    start = T0 + timedelta(hours=hour)
    return Window(start, start + timedelta(hours=hours), Decimal(value))


def report(*windows: Window, aggregation: str | None = "SUM", **query: datetime) -> Report:
    """A report of meter `tokens` for subject `acme`."""
    return Report("tokens", "acme", aggregation, tuple(windows), **query)


def mapping(multiplier: str = "1", rounding: str | None = None) -> MeterMapping:
    """A mapping to price_tokens."""
    return MeterMapping("price_tokens", Decimal(multiplier), rounding)


def legacy_target(
    aggregate_usage: str = "sum",
    period_end: float = 1e12,
    multiplier: str = "1",
    rounding: str | None = None,
) -> Target:
    """A legacy item (usage records) on a subscription whose period starts at T0."""
    item = Item("si_1", "metered", aggregate_usage, None, int(T0.timestamp()), period_end)
    subscription = Subscription("sub_1", "cus_1", {"price_tokens": item})
    return Target(subscription, item, mapping(multiplier, rounding), None)


def meter_target(
    event_time_window: str | None = None,
    formula: str = "sum",
    multiplier: str = "1",
    rounding: str | None = None,
) -> Target:
    """A billing meter's item: raw (no event_time_window) or pre-aggregated by hour or day."""
    item = Item("si_2", "metered", None, "mtr_1", int(T0.timestamp()))
    subscription = Subscription("sub_1", "cus_1", {"price_tokens": item})
    meter = Meter(
        "mtr_1", "tokens", "stripe_customer_id", "value", formula, event_time_window, True
    )
    return Target(subscription, item, mapping(multiplier, rounding), meter)
