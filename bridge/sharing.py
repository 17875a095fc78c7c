"""Several OpenMeter subjects on one Stripe subscription: when Stripe adds them up, and the second
of each window that is each subject's own.

A Stripe customer with two OpenMeter subjects (two projects, two API keys) maps both to its one
subscription. Their windows are then written to one subscription item (usage records) or one
customer's meter (meter events). Stripe bills their sum only where it adds what it is sent:
- a legacy `sum` price adds every usage record of the period, but `set` overwrites the record at its
  timestamp (2023 spec, usage_records `action`): each subject gets a timestamp of its own;
- a raw meter (no `event_time_window`) with formula `sum` adds every event, but takes one event per
  `identifier`, derived from the timestamp: the same own timestamp keeps them apart;
- a pre-aggregated meter keeps the last event per customer and bucket, a meter's `last` the last
  event, a legacy `max`, `last_during_period` or `last_ever` price one record: one subject's
  window would replace the other's, so the pair is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

# A window's timestamp is at most this many seconds after the first second it may take: every window
# of an hour or more holds them all (a minute window holds 59, a shorter one fewer).
OFFSET_SLOTS = 3599


def stripe_adds_up(kind: str, aggregation: str | None, pre_aggregated: bool = False) -> bool:
    """Whether Stripe bills the sum of what several subjects write to one subscription item
    (kind usage_records, aggregation its aggregate_usage) or one customer's meter (meter_events,
    aggregation its formula, pre_aggregated if it has an event_time_window)."""
    if kind == "usage_records":
        return aggregation == "sum"
    return aggregation == "sum" and not pre_aggregated


def may_share(
    kind: str, aggregation: str | None, pre_aggregated: bool, same_subscription: bool
) -> bool:
    """Whether two subjects may bill one subscription item or one customer's meter: only through
    one subscription (config.yaml then gives each its own second) and where Stripe adds up."""
    return same_subscription and stripe_adds_up(kind, aggregation, pre_aggregated)


def co_subjects(subjects: Mapping[str, str], subject: str) -> tuple[str, ...]:
    """The other subjects mapped to this subject's subscription, by name."""
    subscription = subjects.get(subject)
    return tuple(sorted(s for s, sub in subjects.items() if sub == subscription and s != subject))


def subject_offset(subject: str, room: int = OFFSET_SLOTS) -> int:
    """The subject's own offset in [0, room): from its name alone, so that no config edit (another
    subject added, removed or reordered) ever moves it."""
    digest = hashlib.sha256(subject.encode()).digest()
    return int.from_bytes(digest[:8], "big") % max(room, 1)


def offset_collisions(subjects: Mapping[str, str]) -> list[str]:
    """Config problems: subjects on one subscription that would take the same second of a window."""
    problems = []
    first: dict[tuple[str, int], str] = {}  # (subscription, offset) -> the first subject on it
    for subject, subscription in subjects.items():
        other = first.setdefault((subscription, subject_offset(subject)), subject)
        if other != subject:
            problems.append(
                f"subjects.{subject}: shares {subscription} with subjects.{other} and their names "
                "give both the same second of each window, where one would overwrite the other; "
                "map one of them to another subscription"
            )
    return problems
