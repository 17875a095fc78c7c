"""Which Stripe object bills a report: a legacy item's usage records, or a meter's events."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial

import stripe

from bridge.config import Config, MeterMapping
from bridge.errors import SharedCustomer, StripeRefused, Unmapped
from bridge.report import Report
from bridge.sharing import co_subjects, may_share
from bridge.stripe_objects import (
    Item,
    Meter,
    StripeCaches,
    Subscription,
    Thresholds,
    fetch_meter,
    fetch_price,
    fetch_subscription,
    fetch_thresholds,
)


@dataclass(frozen=True)
class Target:
    """Where a report's windows go: a legacy item's usage records, or a meter's events."""

    subscription: Subscription
    item: Item
    mapping: MeterMapping
    meter: Meter | None
    account: str = ""  # a fingerprint of the Stripe account's key (Settings.account)
    co_subjects: tuple[str, ...] = ()  # the other subjects config.yaml maps to this subscription

    @property
    def kind(self) -> str:
        """The Stripe API that takes the writes; discovered from the price, never configured."""
        return "meter_events" if self.meter else "usage_records"

    @property
    def lock_key(self) -> str:
        """What Stripe locks on a write (the item, or the customer's meter): writes to one key
        are made one at a time, and the ledger keeps its windows under it."""
        if self.meter:
            return f"{self.subscription.customer}/{self.meter.id}"
        return self.item.id

    @property
    def place(self) -> str:
        """Where the writes land: the lock key's object, in this account; the ledger's unit."""
        return f"{self.account}/{self.kind}/{self.lock_key}"

    @property
    def raw_meter(self) -> bool:
        """A meter without pre-aggregation: it adds every event, so a window is sent only once."""
        return bool(self.meter and not self.meter.event_time_window)


def find_mapping(report: Report, config: Config) -> tuple[str, MeterMapping]:
    """The subscription and meter mapping for a report, or a 422 telling what to add."""
    subscription = config.subjects.get(report.subject)
    mapping = config.meters.get(report.meter)
    missing = []
    if subscription is None:
        missing.append(f"subject {report.subject!r} is not under 'subjects'")
    if mapping is None:
        missing.append(f"meter {report.meter!r} is not under 'meters'")
    if subscription is None or mapping is None:
        raise Unmapped(
            "; ".join(missing) + " in config.yaml",
            "Add it to config.yaml; Svix keeps retrying for about a day, so nothing is lost.",
            subject=report.subject,
            meter=report.meter,
        )
    return subscription, mapping


def resolve_target(
    report: Report,
    config: Config,
    client: stripe.StripeClient,
    caches: StripeCaches,
    account: str,
) -> Target:
    """Finds the item, and the meter if its price has one, that bill this report."""
    subscription_id, mapping = find_mapping(report, config)
    subscription = caches.subscriptions.get(
        subscription_id,
        partial(fetch_subscription, client),
        # A renewed subscription has a new period: its cached copy is stale.
        lambda found: (
            mapping.price in found.items and found.items[mapping.price].period_end > time.time()
        ),
    )
    caches.customers.setdefault(subscription.customer, set()).add(subscription.id)
    item = subscription.items.get(mapping.price)
    if item is None:
        raise StripeRefused(
            f"subscription {subscription_id} has no item with price {mapping.price}",
            f"Add {mapping.price} to the subscription in Stripe, or fix meters.{report.meter} "
            "in config.yaml; Svix retries for about a day.",
            subscription=subscription_id,
            price=mapping.price,
        )
    if item.usage_type != "metered":
        raise StripeRefused(
            f"price {mapping.price} is not metered, so it cannot take usage",
            f"Map meters.{report.meter} to a metered price in config.yaml.",
            price=mapping.price,
        )
    meter = None
    if not item.meter:
        price = caches.prices.get(mapping.price, partial(fetch_price, client))
        item = replace(item, aggregate_usage=price.aggregate_usage)
        thresholds = caches.thresholds.get(subscription.id, partial(fetch_thresholds, client))
        check_no_billing_thresholds(report.subject, subscription, item, thresholds)
    if item.meter:
        meter = caches.meters.get(item.meter, partial(fetch_meter, client))
        if not meter.active:
            raise StripeRefused(
                f"meter {meter.id} of price {mapping.price} is not active",
                "Reactivate the meter in Stripe; Svix retries for about a day.",
                meter=meter.id,
            )
        check_one_price_per_meter(report.meter, subscription, meter, config)
        check_shared_customer(report.subject, subscription, meter, config, caches)
    target = Target(
        subscription, item, mapping, meter, account, co_subjects(config.subjects, report.subject)
    )
    check_shared_subscription(report.subject, target)
    return target


def check_shared_subscription(subject: str, target: Target) -> None:
    """Refuses several subjects on one subscription where Stripe would not add up their windows."""
    meter = target.meter
    aggregation = meter.formula if meter else target.item.aggregate_usage
    pre_aggregated = bool(meter and meter.event_time_window)
    if not target.co_subjects or may_share(target.kind, aggregation, pre_aggregated, True):
        return
    what = (
        f"meter {meter.id} ({aggregation}, window {meter.event_time_window or 'none'})" if meter
        else f"price {target.mapping.price} (aggregate_usage {aggregation})"
    )  # fmt: skip
    other = target.co_subjects[0]
    raise SharedCustomer(
        f"subjects {subject!r} and {other!r} share subscription {target.subscription.id}, and "
        f"Stripe does not add up what two subjects send to {what}: one subject's windows "
        "would replace the other's",
        "Only a legacy sum price or a raw sum meter bills several subjects' sum. Map each "
        "subject to a subscription of its own (another customer, for a meter), or report them "
        "as one subject from OpenMeter; Svix retries for about a day.",
        subjects=sorted([subject, other]),
        subscription=target.subscription.id,
    )


def check_no_billing_thresholds(
    subject: str, subscription: Subscription, item: Item, thresholds: Thresholds
) -> None:
    """Refuses a legacy item whose subscription has billing thresholds, before any write.

    Stripe takes only `increment` usage records there (Thresholds says where that is written),
    and an increment repeated by a retry would count twice: the bridge writes only `set`.
    """
    where = (
        f"subscription {subscription.id}" if thresholds.subscription
        else f"item {item.id}" if item.id in thresholds.items
        else None
    )  # fmt: skip
    if where:
        raise StripeRefused(
            f"{where} (subject {subject!r}) has billing thresholds, so Stripe takes only "
            "`increment` usage records, which a retry would count twice; the bridge sets them",
            "Remove the billing thresholds from the subscription and its items, or bill this "
            "price through a Billing meter (meter events have no such rule); Svix retries for "
            "about a day.",
            subscription=subscription.id,
            item=item.id,
            subject=subject,
        )


def check_one_price_per_meter(
    slug: str, subscription: Subscription, meter: Meter, config: Config
) -> None:
    """Refuses a meter that another mapped price of the same subscription also feeds.

    Their events would carry the same event name and customer: a raw meter would keep only the
    first of each window, a pre-aggregated one only the last. The subscription is at hand, so
    this needs no call; `check-config --online` finds the same across every subscription.
    """
    for other_slug, other in config.meters.items():
        item = subscription.items.get(other.price)
        if other_slug != slug and item is not None and item.meter == meter.id:
            raise StripeRefused(
                f"meters.{slug} and meters.{other_slug} both go to Stripe meter {meter.id} on "
                f"subscription {subscription.id}: their events would overwrite each other",
                "Give each OpenMeter meter a price on its own Stripe meter; Svix retries for "
                "about a day.",
                meter=meter.id,
                meters=sorted([slug, other_slug]),
            )


def check_shared_customer(
    subject: str, subscription: Subscription, meter: Meter, config: Config, caches: StripeCaches
) -> None:
    """Refuses a meter that another subject's subscription also bills for the same customer.

    Meter events carry only the customer: two subjects billed to one customer and one meter would
    overwrite each other's buckets (pre-aggregated) or be deduplicated against each other (raw).
    Only what the cache holds is known here; `check-config --online` checks every subject.
    """
    for other_id in caches.customers.get(subscription.customer, set()) - {subscription.id}:
        other = caches.subscriptions.peek(other_id)
        if other is None or not any(i.meter == meter.id for i in other.items.values()):
            continue
        others = [name for name, sub in config.subjects.items() if sub == other_id]
        if others:
            raise SharedCustomer(
                f"subjects {subject!r} ({subscription.id}) and {others[0]!r} ({other_id}) bill "
                f"the same customer {subscription.customer} on meter {meter.id}: their meter "
                "events would overwrite or cancel each other",
                "Bill the two subjects to different customers, or report them as one subject "
                "from OpenMeter; Svix retries for about a day.",
                subjects=sorted([subject, others[0]]),
                customer=subscription.customer,
                meter=meter.id,
            )
