"""Planning: each window's checks, its timestamp and billing period, and what is written, waits
or is left out."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from bridge.errors import BadRequest, StripeRefused
from bridge.identity import idempotency_key
from bridge.planning import (
    check_aggregation,
    check_meter_age,
    check_meter_window,
    in_billing_period,
    not_yet,
    plan_writes,
    previous_period_start,
    window_timestamp,
)
from bridge.report import Window
from bridge.stripe_objects import Item, Meter
from bridge.targets import Target
from tests.unit.objects import T0, legacy_target, meter_target, report, window

NOW = T0 + timedelta(days=2)
START = int(T0.timestamp())


def meter_of(target: Target) -> Meter:
    """A meter target's meter."""
    assert target.meter
    return target.meter


def test_a_window_is_written_one_second_after_it_starts() -> None:
    assert window_timestamp(window(0)) == START + 1
    half = Window(T0 + timedelta(seconds=0.5), T0 + timedelta(hours=1), Decimal(1))
    assert window_timestamp(half) == START + 1  # inside the window, whole seconds


def billed_at(target: Target, hour: int, hours: int = 1, now: datetime = NOW) -> int:
    """The timestamp in_billing_period gives the window (grace: Stripe's default hour)."""
    placed = window(hour, hours=hours)
    return in_billing_period(placed, window_timestamp(placed), target, now, 3600)


def test_a_window_split_by_a_renewal_is_billed_in_the_new_period() -> None:
    legacy = legacy_target()  # its period starts at T0
    assert billed_at(legacy, -1, hours=2) == START  # 23:00 to 01:00 across T0
    assert billed_at(legacy, 3) == START + 3 * 3600 + 1
    # Wholly before: left as it is, for Stripe to refuse by name.
    assert billed_at(legacy, -2) == START - 2 * 3600 + 1


def test_a_meter_event_for_an_invoiced_period_is_refused_after_the_grace() -> None:
    hourly = meter_target("hour")  # its period starts at T0
    assert billed_at(hourly, -2, now=T0 + timedelta(minutes=59)) == START - 2 * 3600 + 1
    with pytest.raises(StripeRefused, match="INVOICE_GRACE_SECONDS"):
        billed_at(hourly, -2, now=T0 + timedelta(hours=1))


def test_a_window_the_end_splits_is_billed_before_the_end() -> None:
    ends = T0 + timedelta(hours=1, minutes=30)
    target = legacy_target(period_end=ends.timestamp())
    ending = replace(target, subscription=replace(target.subscription, cancel_at_period_end=True))
    assert billed_at(ending, 1) == START + 3601  # 01:00:01, before 01:30
    with pytest.raises(StripeRefused, match="starts after subscription sub_1 ends"):
        billed_at(ending, 2)


def test_a_legacy_window_across_the_period_end_waits_for_the_new_period() -> None:
    ends = (T0 + timedelta(hours=1, minutes=30)).timestamp()
    assert "renewal" in (not_yet(window(1), legacy_target(period_end=ends), NOW) or "")
    assert not_yet(window(0), legacy_target(period_end=ends), NOW) is None
    # A subscription that will not renew has no next period: its last window is written now.
    target = legacy_target(period_end=ends)
    ending = replace(target, subscription=replace(target.subscription, cancel_at_period_end=True))
    assert not_yet(window(1), ending, NOW) is None


@pytest.mark.parametrize(
    ("aggregation", "stripe_side", "fits"),
    [
        ("SUM", "sum", True),
        ("COUNT", "sum", True),
        ("MAX", "max", True),
        ("LATEST", "last_during_period", True),
        (None, "max", True),  # OpenMeter did not say: not checked
        ("MAX", "sum", False),
        ("AVG", "sum", False),
        ("UNIQUE_COUNT", "sum", False),
    ],
)
def test_the_aggregations_must_bill_the_same(
    aggregation: str | None, stripe_side: str, fits: bool
) -> None:
    target = legacy_target(aggregate_usage=stripe_side)
    if fits:
        check_aggregation(report(aggregation=aggregation), target)
    else:
        with pytest.raises(StripeRefused):
            check_aggregation(report(aggregation=aggregation), target)


def test_a_counting_meter_cannot_take_values() -> None:
    with pytest.raises(StripeRefused, match="counts events"):
        check_aggregation(report(), meter_target(formula="count"))


def test_a_pre_aggregated_meter_takes_exactly_one_bucket_per_window() -> None:
    check_meter_window(window(0), meter_of(meter_target("hour")))
    for wrong in [window(0, hours=2), window(0, hours=24)]:
        with pytest.raises(StripeRefused, match="not exactly one hour"):
            check_meter_window(wrong, meter_of(meter_target("hour")))
    check_meter_window(window(0, hours=24), meter_of(meter_target("day")))


def test_a_meter_event_older_than_35_days_is_refused() -> None:
    with pytest.raises(StripeRefused, match="35 days"):
        check_meter_age(window(0), T0 + timedelta(days=35))


def test_a_legacy_plan_writes_whole_quantities_at_their_timestamps() -> None:
    target = legacy_target()
    plan = plan_writes(report(window(0, "2.6"), window(1, "0.2")), target, "msg_1", NOW)
    assert [(w.timestamp, w.value) for w in plan.writes] == [
        (START + 1, 3),
        (START + 3601, 0),  # float noise is written as zero: the window is set, not skipped
    ]
    assert plan.writes[0].key == idempotency_key("msg_1", "si_1", START + 1, 3)
    assert (plan.waiting, plan.left_out) == ([], [])


def test_a_meter_plan_writes_meter_values() -> None:
    plan = plan_writes(report(window(0, "2.50")), meter_target("hour"), "msg_1", NOW)
    assert [(w.timestamp, w.value) for w in plan.writes] == [(START + 1, Decimal("2.5"))]
    assert plan.writes[0].key.startswith("om-")


def test_windows_across_the_renewal_wait() -> None:
    ends = (T0 + timedelta(hours=1, minutes=30)).timestamp()
    plan = plan_writes(report(window(0), window(1)), legacy_target(period_end=ends), "m", NOW)
    assert [w.window for w in plan.writes] == [window(0)]
    assert [entry["window_start"] for entry in plan.waiting] == [window(1).start.isoformat()]


def test_a_raw_meter_leaves_out_what_the_report_holds_only_in_part() -> None:
    partial = report(window(0), window(1), query_to=T0 + timedelta(hours=1, minutes=30))
    plan = plan_writes(partial, meter_target(), "m", NOW)
    assert [w.window for w in plan.writes] == [window(0)]
    assert [entry["window_start"] for entry in plan.left_out] == [window(1).start.isoformat()]
    # A pre-aggregated meter keeps the newest event per bucket: a partial window is corrected.
    assert len(plan_writes(partial, meter_target("hour"), "m", NOW).writes) == 2


def test_windows_after_the_end_are_refused_and_the_others_still_planned() -> None:
    ends = T0 + timedelta(hours=1, minutes=30)
    target = legacy_target(period_end=ends.timestamp())
    ending = replace(target, subscription=replace(target.subscription, cancel_at_period_end=True))
    plan = plan_writes(report(window(0), window(1), window(2)), ending, "m", NOW)
    assert [w.window for w in plan.writes] == [window(0), window(1)]
    assert [body["window_start"] for body in plan.refused] == [window(2).start.isoformat()]
    assert plan.refused[0]["error"] == "stripe_refused"


def test_an_ended_subscription_takes_no_window() -> None:
    target = legacy_target()
    ended = replace(target, subscription=replace(target.subscription, status="canceled"))
    with pytest.raises(StripeRefused, match="has ended"):
        plan_writes(report(window(0)), ended, "m", NOW)


def test_a_window_shorter_than_two_seconds_is_refused() -> None:
    short = Window(T0, T0 + timedelta(seconds=1), Decimal(1))
    with pytest.raises(BadRequest, match="shorter than two seconds"):
        plan_writes(report(short), legacy_target(), "m", NOW)


def test_a_refused_aggregation_refuses_the_whole_plan() -> None:
    with pytest.raises(StripeRefused):
        plan_writes(report(window(0), aggregation="AVG"), legacy_target(), "m", NOW)


@pytest.mark.parametrize(
    ("interval", "count", "start", "previous"),
    [
        ("month", 1, "2026-03-31", "2026-02-28"),  # the month's last day, as Stripe anchors
        ("month", 3, "2026-01-15", "2025-10-15"),
        ("year", 1, "2024-02-29", "2023-02-28"),
        ("week", 2, "2026-03-15", "2026-03-01"),
        ("day", 1, "2026-03-01", "2026-02-28"),
    ],
)
def test_the_previous_period_starts_one_interval_back(
    interval: str, count: int, start: str, previous: str
) -> None:
    begun = datetime.fromisoformat(start).replace(tzinfo=UTC)
    item = Item("si_1", "metered", None, "mtr_1", int(begun.timestamp()), math.inf, interval, count)
    expected = datetime.fromisoformat(previous).replace(tzinfo=UTC).timestamp()
    assert previous_period_start(item) == expected


def test_an_unknown_interval_refuses_nothing() -> None:
    assert previous_period_start(Item("si_1", "metered", None, None)) == -math.inf


@pytest.mark.parametrize("target", [legacy_target(), meter_target()], ids=["records", "meter"])
def test_a_negative_window_is_refused_on_its_own_and_the_others_planned(target: Target) -> None:
    plan = plan_writes(report(window(0, "5"), window(1, "-3"), window(2, "7")), target, "m", NOW)
    assert [w.window for w in plan.writes] == [window(0, "5"), window(2, "7")]
    assert [body["window_start"] for body in plan.refused] == [window(1).start.isoformat()]
    assert "cannot be negative" in plan.refused[0]["message"]
