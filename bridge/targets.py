"""Which Stripe object bills a report: a legacy item's usage records, or a meter's events."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial

import stripe

from bridge import identity
from bridge.config import Config, MeterMapping
from bridge.errors import BridgeError, SharedCustomer, StripeRefused, Unmapped
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
    co_subjects: tuple[str, ...] = ()  # the other subjects config.yaml maps to this subscription

    @property
    def kind(self) -> str:
        """The Stripe API that takes the writes; discovered from the price, never configured."""
        return "meter_events" if self.meter else "usage_records"

    @property
    def lock_key(self) -> str:
        """What Stripe locks on a write (identity.lock_key): one writer at a time."""
        if self.meter:
            return identity.lock_key(self.item.id, self.subscription.customer, self.meter.id)
        return identity.lock_key(self.item.id)

    @property
    def place(self) -> str:
        """Where the writes land (identity.place): the ledger's unit."""
        return identity.place(self.kind, self.lock_key)

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
    target = Target(
        subscription, item, mapping, meter, co_subjects(config.subjects, report.subject)
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


@dataclass(frozen=True)
class Claim:
    """Who writes to a customer's meter: a subject, through a mapped meter (its slug).

    Meter events carry only the customer, so what two claims on one customer's meter send lands
    in the same buckets. The ledger keeps the first claim, so every worker and replica agrees.
    """

    customer: str
    meter: str
    subject: str
    subscription: str
    slug: str


def claim_for(target: Target, subject: str, slug: str) -> Claim | None:
    """The claim a report's writes make (None for usage records: each item is its own)."""
    if target.meter is None:
        return None
    subscription = target.subscription
    return Claim(subscription.customer, target.meter.id, subject, subscription.id, slug)


def clash(held: Claim, new: Claim, meter: Meter) -> bool:
    """Whether two claims' events would overwrite or cancel each other on this meter.

    Another mapped meter on one customer's meter always does; another subject does unless
    Stripe adds up what both send (sharing.may_share: through one subscription, whose subjects
    each take a second of their own, to a raw sum meter). A pre-aggregated meter keeps only the
    newest event per bucket, a raw one only the first per window identifier.
    """
    if held.slug != new.slug:
        return True
    same_subscription = held.subscription == new.subscription
    pre_aggregated = bool(meter.event_time_window)
    return held.subject != new.subject and not may_share(
        "meter_events", meter.formula, pre_aggregated, same_subscription
    )


def still_mapped(claim: Claim, config: Config) -> bool:
    """Whether config.yaml still maps the claim's subject and meter as when it was made: a
    claim an operator has mapped away is stale, and the next claim takes its place."""
    return config.subjects.get(claim.subject) == claim.subscription and claim.slug in config.meters


def claim_refusal(held: Claim, new: Claim) -> BridgeError:
    """The 422 for a claim that clashes with the one the ledger holds."""
    if held.slug != new.slug:
        return StripeRefused(
            f"meters.{new.slug} and meters.{held.slug} both go to Stripe meter {new.meter} for "
            f"customer {new.customer}: their events would overwrite each other",
            "Give each OpenMeter meter a price on its own Stripe meter; Svix retries for "
            "about a day.",
            meter=new.meter,
            meters=sorted([new.slug, held.slug]),
        )
    return SharedCustomer(
        f"subjects {new.subject!r} ({new.subscription}) and {held.subject!r} "
        f"({held.subscription}) bill the same customer {new.customer} on meter {new.meter}: "
        "their meter events would overwrite or cancel each other",
        "Bill the two subjects to different customers, or report them as one subject "
        "from OpenMeter; Svix retries for about a day.",
        subjects=sorted([new.subject, held.subject]),
        customer=new.customer,
        meter=new.meter,
    )
