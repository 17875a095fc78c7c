"""What each window becomes in Stripe: the checks, its timestamp, its key, its write."""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.errors import BadRequest, StripeRefused
from bridge.identity import meter_event_identifier, usage_record_key
from bridge.quantities import (
    MeterValue,
    Quantity,
    denoised,
    meter_value_text,
    to_meter_value,
    to_quantity,
)
from bridge.report import Report, Window, incomplete
from bridge.settings import DEFAULT_INVOICE_GRACE_SECONDS
from bridge.sharing import OFFSET_SLOTS, subject_offset
from bridge.stripe_objects import Item, Meter
from bridge.targets import Target

# OpenMeter aggregation -> the Stripe aggregations (legacy aggregate_usage, or a meter's formula)
# that bill the same amount when each window is set once. UNIQUE_COUNT, AVG and MIN have none.
COMPATIBLE_AGGREGATIONS = {
    "SUM": {"sum"},
    "COUNT": {"sum"},
    "MAX": {"max"},
    "LATEST": {"last_during_period", "last_ever", "last"},
}
BUCKET_SECONDS = {"hour": 3600, "day": 86400}
METER_EVENT_MAX_AGE_SECONDS = 35 * 86400 - 3600  # Stripe's 35 days, less an hour of retries


@dataclass(frozen=True)
class Write:
    """One window as Stripe receives it: a usage record or a meter event."""

    window: Window
    timestamp: int
    value: Quantity | MeterValue  # a usage record's whole quantity, or a meter event's value
    key: str  # the idempotency key of a usage record, the identifier of a meter event
    fresh: str | None = None  # the key that replaced `key` after a 5xx (from the ledger)


@dataclass(frozen=True)
class Plan:
    """A report's windows: written now, left for a later attempt, left out, or refused."""

    writes: list[Write]
    waiting: list[dict[str, str]]  # {window_start, reason}: a later attempt writes them
    left_out: list[dict[str, str]]  # {window_start, reason}: a raw meter's partial windows
    refused: list[dict[str, Any]]  # the bodies of windows refused: negative, or billed in no period


def check_aggregation(report: Report, target: Target) -> None:
    """Refuses a report whose aggregation Stripe would bill differently (a 422 naming both)."""
    stripe_side = target.meter.formula if target.meter else target.item.aggregate_usage
    if stripe_side == "count":
        raise StripeRefused(
            f"meter {target.meter and target.meter.id} counts events and cannot take values",
            "Use a meter whose aggregation is sum (or last) for this price.",
        )
    aggregation = (report.aggregation or "").upper()
    if aggregation and stripe_side not in COMPATIBLE_AGGREGATIONS.get(aggregation, set()):
        raise StripeRefused(
            f"OpenMeter meter {report.meter!r} aggregates with {aggregation}, but Stripe "
            f"price {target.mapping.price} aggregates with {stripe_side}: the bill would be wrong",
            "SUM and COUNT need a sum price or meter, MAX a legacy max price, LATEST a "
            "last_during_period, last_ever or last one; UNIQUE_COUNT, AVG and MIN fit none.",
            openmeter_aggregation=aggregation,
            stripe_aggregation=stripe_side,
        )


def check_meter_age(window: Window, now: datetime) -> None:
    """Refuses (for this window only) one older than Stripe takes meter events for."""
    if window.start.timestamp() < now.timestamp() - METER_EVENT_MAX_AGE_SECONDS:
        raise StripeRefused(
            f"window {window.start.isoformat()} is older than Stripe's 35 days for meter events",
            "Stripe cannot take this usage any more; bill it by hand if it matters.",
            window_start=window.start.isoformat(),
        )


def check_meter_window(window: Window, meter: Meter) -> None:
    """Refuses a report whose windows are not exactly one pre-aggregation bucket each."""
    start, end = window.start.timestamp(), window.end.timestamp()
    size = meter.event_time_window or ""
    bucket = BUCKET_SECONDS.get(size)
    if bucket and (start % bucket or end - start != bucket):
        raise StripeRefused(
            f"window {window.start.isoformat()}..{window.end.isoformat()} is not exactly one "
            f"{size} of meter {meter.id}, so windows would overwrite each other",
            f"Report this meter from OpenMeter with windowSize {size.upper()} (or map it to a "
            "meter whose event_time_window matches).",
            window_start=window.start.isoformat(),
        )


def not_yet(window: Window, target: Target, now: datetime) -> str | None:
    """Why a window must wait before it is written, if it must."""
    end = window.end.timestamp()
    renews = target.subscription.final_end(target.item) == math.inf
    if renews and window.start.timestamp() < target.item.period_end < end:
        # Written now it would land in this period, and again, in full, in the next one.
        # (A subscription that will not renew has no next period: its last window is written now.)
        return "spans the subscription's renewal; it is billed in the new period once that begins"
    return None


def window_timestamp(window: Window) -> int:
    """One second after the window starts: inside it, in its billing period, and in the past."""
    return math.floor(window.start.timestamp()) + 1


def subject_timestamp(window: Window, timestamp: int, target: Target, subject: str) -> int:
    """On a subscription several subjects share, the subject's own second from `timestamp` on.

    Its offset comes from its name (bridge.sharing), within what is left of the window (and of
    the subscription): the same window of the same subject always lands on the same second, and
    two subjects never on one (their usage records, or raw meter events, would replace each other).
    """
    if not target.co_subjects:
        return timestamp
    limit = math.ceil(min(window.end.timestamp(), target.subscription.final_end(target.item)))
    room = min(limit - timestamp, OFFSET_SLOTS)
    offset = subject_offset(subject, room)
    if clash := [other for other in target.co_subjects if subject_offset(other, room) == offset]:
        raise StripeRefused(
            f"window {window.start.isoformat()}: subjects {subject!r} and {clash[0]!r} share "
            f"subscription {target.subscription.id} and would take the same second of its "
            f"{room} s left",
            "Bill this window by hand, or map one subject to another subscription.",
            window_start=window.start.isoformat(),
        )
    return timestamp + offset


def check_not_ended(report: Report, target: Target) -> None:
    """Refuses usage for a subscription that has ended: Stripe would bill none of it."""
    subscription = target.subscription
    if subscription.ended:
        ended_at = subscription.ended_at
        when = f" at {datetime.fromtimestamp(ended_at, UTC).isoformat()}" if ended_at else ""
        raise StripeRefused(
            f"subscription {subscription.id} has ended ({subscription.status}{when}): Stripe "
            f"bills none of the report's {len(report.windows)} windows",
            "Bill this usage by hand if it matters, or map the subject to its new subscription "
            "in config.yaml; Svix retries for about a day.",
            subscription=subscription.id,
            windows=[w.start.isoformat() for w in report.windows],
        )


def in_billing_period(
    window: Window, timestamp: int, target: Target, now: datetime, grace: int
) -> int:
    """The timestamp that bills a window in the period it belongs to, or a 422 naming it.

    A window that a renewal splits is billed in the new period (the old one is invoiced); one the
    subscription's start splits, from the start; one its end splits, before the end.
    """
    item, subscription = target.item, target.subscription
    start, end = window.start.timestamp(), window.end.timestamp()
    final_end = subscription.final_end(item)
    if start >= final_end:
        raise _unbillable(window, f"starts after subscription {subscription.id} ends")
    if start < subscription.start_date < end:
        timestamp = max(timestamp, subscription.start_date)
    if start < item.period_start < end:
        timestamp = max(timestamp, item.period_start)
    if start < final_end < end:
        timestamp = min(timestamp, math.ceil(final_end) - 1)
    if not target.meter:
        return timestamp  # Stripe refuses a record outside the period, and says which
    # A meter takes any event for the customer, and bills it only inside the subscription and
    # while its period's invoice is open.
    if end <= subscription.start_date:
        raise _unbillable(window, f"ended before subscription {subscription.id} began")
    if end <= item.period_start and now.timestamp() >= item.period_start + grace:
        raise _unbillable(
            window,
            f"belongs to a period whose invoice finalized {grace} s after it ended "
            "(INVOICE_GRACE_SECONDS)",
        )
    if end <= previous_period_start(item):
        raise _unbillable(window, "belongs to a period before the previous one, long invoiced")
    return timestamp


def previous_period_start(item: Item) -> float:
    """When the period before the current one began, as far back as the price's interval goes.

    A month back from the period's start, on the same day or the month's last (Stripe's anchor
    may be a later day than that: then this is a few days early, and lets those days through).
    """
    begun = datetime.fromtimestamp(item.period_start, UTC)
    count = item.interval_count
    if item.interval in ("day", "week"):
        return (begun - timedelta(days=count * (7 if item.interval == "week" else 1))).timestamp()
    if item.interval in ("month", "year"):
        months = begun.year * 12 + begun.month - 1 - count * (12 if item.interval == "year" else 1)
        year, month = divmod(months, 12)
        day = min(begun.day, calendar.monthrange(year, month + 1)[1])
        return begun.replace(year=year, month=month + 1, day=day).timestamp()
    return -math.inf  # an interval the bridge does not know: no check


def _unbillable(window: Window, why: str) -> StripeRefused:
    """A 422 for a window that Stripe would take but bill in no period."""
    return StripeRefused(
        f"window {window.start.isoformat()}..{window.end.isoformat()} {why}: Stripe would bill "
        "it in no period",
        "Bill this usage by hand if it matters; if the account's invoice finalization grace "
        "period is longer, set INVOICE_GRACE_SECONDS to it.",
        window_start=window.start.isoformat(),
    )


def plan_writes(
    report: Report,
    target: Target,
    message_id: str,
    now: datetime,
    *,
    made_at: datetime | None = None,
    grace: int = DEFAULT_INVOICE_GRACE_SECONDS,
) -> Plan:
    """Checks a report against its target's rules and computes every write, before any is sent;
    also sorts out the windows that must wait (written by a later attempt), those left out for
    good (a raw meter's windows that this report holds only in part), and those Stripe would bill
    in no period (refused, while the others are still written)."""
    check_aggregation(report, target)
    check_not_ended(report, target)
    plan = Plan(writes=[], waiting=[], left_out=[], refused=[])
    for window in report.windows:
        timestamp = window_timestamp(window)
        if timestamp >= window.end.timestamp():
            raise BadRequest(f"window {window.start.isoformat()} is shorter than two seconds")
        if target.meter:
            check_meter_window(window, target.meter)
        try:  # a window whose sum is negative is refused on its own; the others are written
            usage = denoised(window, target)
        except BadRequest as refusal:
            plan.refused.append(refusal.body())
            continue
        # A raw meter keeps a window's first event for good: a partial value would stick, and no
        # retry of this body can bring the rest. A later report carries the window in full.
        if target.raw_meter and (reason := incomplete(window, report, made_at or now)):
            plan.left_out.append({"window_start": window.start.isoformat(), "reason": reason})
            continue
        if reason := not_yet(window, target, now):
            plan.waiting.append({"window_start": window.start.isoformat(), "reason": reason})
            continue
        try:  # a window Stripe would refuse, or bill in no period, keeps no other from Stripe
            if target.meter:
                check_meter_age(window, now)
            timestamp = in_billing_period(window, timestamp, target, now, grace)
            timestamp = subject_timestamp(window, timestamp, target, report.subject)
        except StripeRefused as refusal:
            plan.refused.append(refusal.body())
            continue
        if timestamp > now.timestamp() and target.co_subjects:  # Stripe takes no future second
            plan.waiting.append(
                {
                    "window_start": window.start.isoformat(),
                    "reason": "its subject's own second of the window is to come",
                }
            )
            continue  # fmt: skip
        if target.meter:
            value = to_meter_value(usage, target.mapping)
            meter = target.meter
            identifier = meter_event_identifier(
                message_id, event_name=meter.event_name, customer=target.subscription.customer,
                timestamp=timestamp, value=meter_value_text(value), raw=target.raw_meter,
            )  # fmt: skip
            plan.writes.append(Write(window, timestamp, value, identifier))
        else:
            quantity = to_quantity(usage, target.mapping)
            key = usage_record_key(message_id, target.item.id, timestamp, quantity)
            plan.writes.append(Write(window, timestamp, quantity, key))
    return plan
