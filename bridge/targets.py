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
from bridge.stripe_objects import (
    Item,
    Meter,
    StripeCaches,
    Subscription,
    fetch_meter,
    fetch_price,
    fetch_subscription,
)


@dataclass(frozen=True)
class Target:
    """Where a report's windows go: a legacy item's usage records, or a meter's events."""

    subscription: Subscription
    item: Item
    mapping: MeterMapping
    meter: Meter | None

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
    if item.meter:
        meter = caches.meters.get(item.meter, partial(fetch_meter, client))
        if not meter.active:
            raise StripeRefused(
                f"meter {meter.id} of price {mapping.price} is not active",
                "Reactivate the meter in Stripe; Svix retries for about a day.",
                meter=meter.id,
            )
        check_one_price_per_meter(report.meter, subscription, meter, config)
    return Target(subscription, item, mapping, meter)


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

    Another subject or another mapped meter on one customer's meter: a pre-aggregated meter
    keeps only the newest event per bucket, a raw one only the first per window identifier.
    """
    return (held.subject, held.slug) != (new.subject, new.slug)


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
