"""check-config --online: what Stripe says about every mapped price, meter and subscription."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import (
    Decimal,
)

import stripe

from bridge.config import Config, MeterMapping
from bridge.errors import BridgeError
from bridge.sharing import stripe_adds_up
from bridge.stripe_api import USAGE_RECORDS_API_VERSION
from bridge.stripe_objects import (
    Price,
    Subscription,
    fetch_meter,
    fetch_price,
    fetch_subscription,
    fetch_thresholds,
)

# What a raw meter loses (docs/windows.md, "Late events"): OpenMeter accepts events dated in the
# past, and its usage syncs offer no lag or look-back (schedule interval and startAt, query groupBy,
# filter: openmeter.io/docs/cloud/guides/usage-syncs/overview); a raw meter keeps a window's first
# event, so usage ingested after the report that first held the window whole is never billed.
LATE_EVENTS_ON_A_RAW_METER = (
    "a raw meter takes each window once, when a report first holds it whole: usage OpenMeter "
    "ingests later for that window (late events) is never billed. If events can come late, bill "
    "through a meter with event_time_window hour or day (the report's window size) and let each "
    "report's range overlap the previous one: each window is then set again, with its late usage"
)


def check_online(client: stripe.StripeClient, config: Config) -> list[tuple[str, str, str]]:
    """Asks Stripe about every mapped price, meter and subscription: (entry, verdict, detail)."""
    rows: list[tuple[str, str, str]] = []
    meter_users: dict[str, str] = {}  # two prices on one meter would overwrite each other's events
    meter_of_price: dict[str, str] = {}
    legacy_prices: set[str] = set()  # usage records: refused on a subscription with thresholds
    adds_up: dict[str, bool] = {}  # price -> whether Stripe sums several subjects' writes to it
    found: dict[str, Subscription] = {}  # subject -> its subscription
    for slug, mapping in config.meters.items():
        entry = f"meters.{slug}"
        try:
            price = fetch_price(client, mapping.price)
        except BridgeError as error:
            rows.append((entry, "problem", f"{mapping.price}: {error.message}"))
            continue
        if price.usage_type != "metered":
            rows.append((entry, "problem", f"{mapping.price} is not a metered price"))
        elif not price.meter:
            legacy_prices.add(mapping.price)
            adds_up[mapping.price] = stripe_adds_up("usage_records", price.aggregate_usage)
            rows.append(legacy_price_row(entry, price, mapping))
        else:
            try:
                meter = fetch_meter(client, price.meter)
            except BridgeError as error:
                rows.append((entry, "problem", error.message))
                continue
            detail = (
                f"{mapping.price}: meter events to {meter.id} ({meter.event_name}, "
                f"{meter.formula}, window {meter.event_time_window or 'none: raw'})"
            )
            meter_of_price[mapping.price] = meter.id
            adds_up[mapping.price] = stripe_adds_up(
                "meter_events", meter.formula, bool(meter.event_time_window)
            )
            if (other := meter_users.setdefault(meter.id, entry)) != entry:
                rows.append((entry, "problem", f"{detail}: {other} already uses {meter.id}"))
                continue
            if not meter.active:
                rows.append((entry, "problem", detail + ", inactive"))
            elif not meter.event_time_window and meter.formula == "sum":
                rows.append((entry, "warning", f"{detail}: {LATE_EVENTS_ON_A_RAW_METER}"))
            else:
                rows.append((entry, "ok", detail))
    for subject, subscription_id in config.subjects.items():
        entry = f"subjects.{subject}"
        try:
            subscription = fetch_subscription(client, subscription_id)
        except BridgeError as error:
            rows.append((entry, "problem", f"{subscription_id}: {error.message}"))
            continue
        found[subject] = subscription
        missing = sorted(
            m.price for m in config.meters.values() if m.price not in subscription.items
        )
        if subscription.status not in ("active", "trialing"):
            rows.append((entry, "problem", f"{subscription_id} is {subscription.status}"))
        elif problem := thresholds_problem(client, subscription, legacy_prices):
            rows.append((entry, "problem", problem))
        elif missing:
            rows.append(
                (entry, "problem", f"{subscription_id} has no item for {', '.join(missing)}")
            )
        else:
            rows.append(
                (
                    entry,
                    "ok",
                    f"{subscription_id} ({subscription.status}, customer {subscription.customer})",
                )
            )
    return (
        rows
        + shared_customer_rows(found, meter_of_price)
        + shared_subscription_rows(found, adds_up)
    )


def thresholds_problem(
    client: stripe.StripeClient, subscription: Subscription, legacy_prices: set[str]
) -> str | None:
    """Why a subscription with billing thresholds cannot take its legacy prices' usage records."""
    legacy = sorted(price for price in subscription.items if price in legacy_prices)
    if not legacy:
        return None
    try:
        thresholds = fetch_thresholds(client, subscription.id)
    except BridgeError as error:
        return f"{subscription.id}: {error.message}"
    items = [subscription.items[price].id for price in legacy]
    if not thresholds.subscription and not thresholds.items.intersection(items):
        return None
    return (
        f"{subscription.id} has billing thresholds, so Stripe takes only `increment` usage "
        f"records and every report for {', '.join(legacy)} would be refused: remove the "
        "thresholds, or bill those prices through Billing meters"
    )


def shared_customer_rows(
    found: Mapping[str, Subscription], meter_of_price: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """A problem for each subject whose customer and meter an earlier subject already bills."""
    rows: list[tuple[str, str, str]] = []
    first: dict[tuple[str, str], str] = {}  # (customer, meter) -> the first subject on it
    for subject, subscription in found.items():
        for price in subscription.items:
            if (meter := meter_of_price.get(price)) is None:
                continue
            other = first.setdefault((subscription.customer, meter), subject)
            if other != subject and found[other].id != subscription.id:  # one subscription: below
                rows.append((
                    f"subjects.{subject}",
                    "problem",
                    f"{subscription.id} bills customer {subscription.customer} on meter {meter}, "
                    f"as subjects.{other} ({found[other].id}) does: meter events are per "
                    "customer, so the two would overwrite or cancel each other",
                ))  # fmt: skip
    return rows


def shared_subscription_rows(
    found: Mapping[str, Subscription], adds_up: Mapping[str, bool]
) -> list[tuple[str, str, str]]:
    """A problem for each subject sharing a subscription with an earlier one on a mapped price
    whose writes Stripe does not add up (bridge.sharing)."""
    rows: list[tuple[str, str, str]] = []
    first: dict[str, str] = {}  # subscription -> the first subject on it
    for subject, subscription in found.items():
        other = first.setdefault(subscription.id, subject)
        replaced = sorted(
            p for p in subscription.items if other != subject and not adds_up.get(p, True)
        )
        if replaced:
            rows.append((
                f"subjects.{subject}",
                "problem",
                f"{subscription.id} also bills subjects.{other}, and Stripe does not add up "
                f"two subjects' usage of {', '.join(replaced)} (only a legacy sum price or a raw "
                "sum meter does): one subject's windows would replace the other's",
            ))  # fmt: skip
    return rows


def legacy_price_row(entry: str, price: Price, mapping: MeterMapping) -> tuple[str, str, str]:
    """A legacy price's row: its aggregation and unit conversion, a problem if Stripe hides it."""
    detail = f"{price.id}: usage records (aggregate_usage {price.aggregate_usage}"
    if price.divide_by is not None:
        detail += f", transform_quantity divide_by {price.divide_by} round {price.round}"
    detail += ")"
    if price.aggregate_usage is None:
        return (
            entry,
            "problem",
            f"{detail}: Stripe showed no aggregate_usage at {USAGE_RECORDS_API_VERSION}, so "
            "the bridge cannot check the aggregation and would refuse every report",
        )
    if advice := conversion_advice(price, mapping):
        return entry, "warning", f"{detail}: {advice}"
    return entry, "ok", detail


def conversion_advice(price: Price, mapping: MeterMapping) -> str | None:
    """How to stop a legacy mapping from rounding each window, given what the price does."""
    if mapping.multiplier >= 1 and not mapping.rounding:
        return None
    # transform_quantity divides the period's total, then rounds it once (up or down):
    # docs.stripe.com/billing/subscriptions/usage-based/transform-quantities
    divide_by = ((1 / mapping.multiplier) if mapping.multiplier < 1 else Decimal(1)).normalize()
    steps = [f"the bridge rounds every window to a whole unit (multiplier {mapping.multiplier}"]
    steps[0] += f", rounding {mapping.rounding or 'nearest'}), so the error grows with the windows"
    if price.divide_by is None and divide_by == divide_by.to_integral_value() and divide_by > 1:
        round_ = "down" if mapping.rounding == "down" else "up"
        steps.append(
            f"give {price.id} transform_quantity divide_by {divide_by:f} round {round_} "
            "(a new price: Stripe cannot change it on this one), map it with multiplier 1 and no "
            "rounding, and Stripe converts the period's total once"
        )
    elif price.divide_by is not None:
        multiplier = (price.divide_by * mapping.multiplier).normalize()
        steps.append(
            f"{price.id} already divides by {price.divide_by}: map it with multiplier "
            f"{multiplier:f} and no rounding, so the bridge sends whole small units and Stripe "
            "converts the period's total once"
        )
    else:
        steps.append(
            "send whole small units (a multiplier of 1 or more, no rounding) and convert with a "
            "price whose transform_quantity divides the period's total"
        )
    return "; ".join(steps)
