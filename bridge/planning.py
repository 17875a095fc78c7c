"""What each window becomes in Stripe: the checks, its timestamp, its key, its write."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime

from bridge.errors import BadRequest, StripeRefused
from bridge.quantities import MeterValue, Quantity, denoised, to_meter_value, to_quantity
from bridge.report import Report, Window, incomplete
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


@dataclass(frozen=True)
class Plan:
    """A report's windows: written now, left for a later attempt, or left out for good."""

    writes: list[Write]
    waiting: list[dict[str, str]]  # {window_start, reason}: a later attempt writes them
    left_out: list[dict[str, str]]  # {window_start, reason}: a raw meter's partial windows


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


def check_meter_window(window: Window, meter: Meter, now: datetime) -> None:
    """Refuses windows a meter cannot take: too old, or not exactly one pre-aggregation bucket."""
    start, end = window.start.timestamp(), window.end.timestamp()
    if start < now.timestamp() - METER_EVENT_MAX_AGE_SECONDS:
        raise StripeRefused(
            f"window {window.start.isoformat()} is older than Stripe's 35 days for meter events",
            "Stripe cannot take this usage any more; bill it by hand if it matters.",
            window_start=window.start.isoformat(),
        )
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
    if not target.meter and window.start.timestamp() < target.item.period_end < end:
        # Written now it would land in this period, and again, in full, in the next one.
        return "spans the subscription's renewal; it is billed in the new period once that begins"
    return None


def window_timestamp(window: Window) -> int:
    """One second after the window starts: inside it, in its billing period, and in the past."""
    return math.floor(window.start.timestamp()) + 1


def in_billing_period(window: Window, timestamp: int, item: Item) -> int:
    """A window that a renewal splits is billed in the new period: the old one is invoiced."""
    if window.start.timestamp() < item.period_start < window.end.timestamp():
        return max(timestamp, item.period_start)
    return timestamp  # wholly before the period: Stripe refuses it, and the answer says which


def idempotency_key(message_id: str, *meaning: object) -> str:
    """A key per write: the message and what the write means, so that only a true repeat replays."""
    key = ":".join([message_id, *map(str, meaning)])
    if len(key) <= 255:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def meter_event_identifier(message_id: str, target: Target, timestamp: int) -> str:
    """Raw meters: one event per window, ever. Pre-aggregated: one per message and window."""
    assert target.meter
    meaning = [target.meter.event_name, target.subscription.customer, str(timestamp)]
    # A pre-aggregated meter keeps the newest event per bucket, so each message must be new to it;
    # a raw meter adds every event, so a window must never be sent twice.
    if not target.raw_meter:
        meaning.insert(0, message_id)
    return "om-" + hashlib.sha256("\n".join(meaning).encode()).hexdigest()[:48]


def plan_writes(
    report: Report, target: Target, message_id: str, now: datetime, made_at: datetime | None = None
) -> Plan:
    """Checks a report against its target's rules and computes every write, before any is sent;
    also returns the windows that must wait (written by a later attempt) and those left out for
    good (a raw meter's windows that this report holds only in part)."""
    check_aggregation(report, target)
    writes: list[Write] = []
    waiting: list[dict[str, str]] = []
    left_out: list[dict[str, str]] = []
    for window in report.windows:
        timestamp = window_timestamp(window)
        if timestamp >= window.end.timestamp():
            raise BadRequest(f"window {window.start.isoformat()} is shorter than two seconds")
        if target.meter:
            check_meter_window(window, target.meter, now)
        usage = denoised(window, target)
        # A raw meter keeps a window's first event for good: a partial value would stick, and no
        # retry of this body can bring the rest. A later report carries the window in full.
        if target.raw_meter and (reason := incomplete(window, report, made_at or now)):
            left_out.append({"window_start": window.start.isoformat(), "reason": reason})
            continue
        if reason := not_yet(window, target, now):
            waiting.append({"window_start": window.start.isoformat(), "reason": reason})
            continue
        if target.meter:
            value = to_meter_value(usage, target.mapping)
            identifier = meter_event_identifier(message_id, target, timestamp)
            writes.append(Write(window, timestamp, value, identifier))
        else:
            timestamp = in_billing_period(window, timestamp, target.item)
            quantity = to_quantity(usage, target.mapping)
            key = idempotency_key(message_id, target.item.id, timestamp, quantity)
            writes.append(Write(window, timestamp, quantity, key))
    return Plan(writes, waiting, left_out)
