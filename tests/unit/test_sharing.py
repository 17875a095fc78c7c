"""Several subjects on one subscription: what Stripe adds up, and each subject's own second."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from bridge.errors import StripeRefused
from bridge.planning import plan_writes, subject_timestamp
from bridge.sharing import OFFSET_SLOTS, co_subjects, may_share, stripe_adds_up, subject_offset
from tests.unit.objects import T0, legacy_target, meter_target, report, window

NOW = T0 + timedelta(days=2)
START = int(T0.timestamp())


@pytest.mark.parametrize(
    ("kind", "aggregation", "pre_aggregated", "adds_up"),
    [
        ("usage_records", "sum", False, True),
        ("usage_records", "max", False, False),
        ("usage_records", "last_during_period", False, False),
        ("usage_records", "last_ever", False, False),
        ("usage_records", None, False, False),
        ("meter_events", "sum", False, True),  # a raw meter adds every event
        ("meter_events", "sum", True, False),  # a bucket keeps its last event
        ("meter_events", "last", False, False),
        ("meter_events", "count", False, False),
    ],
)
def test_stripe_adds_up_only_sums_that_keep_every_write(
    kind: str, aggregation: str | None, pre_aggregated: bool, adds_up: bool
) -> None:
    assert stripe_adds_up(kind, aggregation, pre_aggregated) is adds_up


def test_co_subjects_are_the_others_on_the_same_subscription() -> None:
    subjects = {"a": "sub_1", "b": "sub_2", "c": "sub_1", "d": "sub_1"}
    assert co_subjects(subjects, "c") == ("a", "d")
    assert co_subjects(subjects, "b") == ()


def test_an_offset_depends_on_the_name_alone_and_fits_its_room() -> None:
    assert subject_offset("acme-eu") == subject_offset("acme-eu")
    assert 0 <= subject_offset("acme-eu") < OFFSET_SLOTS
    assert all(0 <= subject_offset(f"s{i}", 59) < 59 for i in range(200))


def test_each_subject_of_a_shared_subscription_writes_at_its_own_second() -> None:
    target = replace(legacy_target(), co_subjects=("acme-eu",))
    other = replace(legacy_target(), co_subjects=("acme",))
    mine = subject_timestamp(window(3), START + 3 * 3600 + 1, target, "acme")
    theirs = subject_timestamp(window(3), START + 3 * 3600 + 1, other, "acme-eu")
    assert mine == START + 3 * 3600 + 1 + subject_offset("acme")
    assert theirs == START + 3 * 3600 + 1 + subject_offset("acme-eu")
    assert mine != theirs
    assert all(START + 3 * 3600 < t < START + 4 * 3600 for t in (mine, theirs))
    # A lone subject keeps the window's first second, as before subjects could share.
    assert subject_timestamp(window(3), START + 3 * 3600 + 1, legacy_target(), "acme") == (
        START + 3 * 3600 + 1
    )


def test_a_shared_window_split_by_the_period_start_stays_inside_what_is_left() -> None:
    target = replace(legacy_target(), co_subjects=("acme-eu",))
    plan = plan_writes(report(window(-1, hours=2)), target, "m", NOW)  # 23:00 to 01:00 across T0
    [write] = plan.writes
    assert START <= write.timestamp < START + 3600
    assert write.timestamp == START + subject_offset("acme", min(3600, OFFSET_SLOTS))


def test_two_subjects_that_would_share_a_second_of_a_short_window_are_refused_there() -> None:
    # team-3 and team-36 share a second of an hour: config.yaml refuses them; in a 30 s window
    # (two others that collide there) the window is refused, never overwritten.
    names = [f"t{i}" for i in range(400)]
    mine, theirs = next(
        (a, b)
        for a in names
        for b in names
        if a < b and subject_offset(a, 29) == subject_offset(b, 29)
    )
    target = replace(meter_target(), co_subjects=(theirs,))
    short = replace(window(0), end=window(0).start + timedelta(seconds=30))
    with pytest.raises(StripeRefused, match="same second"):
        subject_timestamp(short, START + 1, target, mine)


def test_two_subjects_may_share_only_through_one_subscription_where_stripe_adds_up() -> None:
    assert may_share("usage_records", "sum", False, same_subscription=True)
    assert may_share("meter_events", "sum", False, same_subscription=True)
    assert not may_share("meter_events", "sum", False, same_subscription=False)  # same second
    assert not may_share("meter_events", "sum", True, same_subscription=True)


def test_a_shared_subjects_window_whose_second_is_to_come_waits() -> None:
    target = replace(legacy_target(), co_subjects=("acme-eu",))
    second = START + 1 + subject_offset("acme")
    plan = plan_writes(report(window(0)), target, "m", datetime.fromtimestamp(second - 1, UTC))
    assert plan.writes == [] and "to come" in plan.waiting[0]["reason"]
    [write] = plan_writes(
        report(window(0)), target, "m", datetime.fromtimestamp(second, UTC)
    ).writes
    assert write.timestamp == second
