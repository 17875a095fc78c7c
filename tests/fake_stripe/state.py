"""What the fake holds: its objects as dataclasses, the lifecycle of a subscription, and queries."""

from __future__ import annotations

import collections
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from tests.fake_stripe.rules import (
    _ENDED,
    DEFAULT_API_VERSION,
    DEFAULT_INVOICE_GRACE,
    WINDOW_SECONDS,
)


@dataclass
class RecordedRequest:
    """One API request as the fake saw it, and what it answered (status 0: closed, no answer)."""

    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]
    status: int
    idempotent_replay: bool = False
    performed: bool = False  # the endpoint ran and succeeded: for a POST, a write
    fault: str | None = None
    body: dict[str, Any] | None = None  # the answer, kept only while FakeStripe.keep_bodies is set


@dataclass
class _Subscription:
    """A subscription; its billing period is shared by its items."""

    id: str
    customer: str
    status: str
    period_start: int
    period_end: int
    created: int
    items: list[str] = field(default_factory=list)
    start_date: int = 0  # when it began (may be backdated); the first period starts here
    cancel_at: int | None = None
    cancel_at_period_end: bool = False
    ended_at: int | None = None
    # `subscription_billing_thresholds` (amount_gte, reset_billing_cycle_anchor), or None.
    billing_thresholds: dict[str, Any] | None = None
    # The periods already invoiced: (start, end, when their invoice finalizes).
    invoiced: list[tuple[int, int, float]] = field(default_factory=list)


@dataclass
class _Item:
    """A subscription item and its legacy usage records (timestamp -> quantity)."""

    id: str
    subscription: str
    price: str
    created: int
    usage: dict[int, int] = field(default_factory=dict)
    usage_gte: int | None = None  # `subscription_item_billing_thresholds`, if the item has one


@dataclass
class _MeterEvent:
    """One accepted meter event, with when Stripe received it."""

    identifier: str
    event_name: str
    meter: str
    customer: str
    value: Decimal | None
    payload: dict[str, str]
    timestamp: int
    received: float
    cancelled: bool = False

    def as_json(self) -> dict[str, Any]:
        """The event as plain JSON values."""
        return {**asdict(self), "value": None if self.value is None else str(self.value)}


@dataclass
class _Fault:
    """A fault to inject into matching calls: the next `count`, or each with `probability`."""

    kind: str
    method: str | None
    path: re.Pattern[str] | None
    count: int | None
    probability: float | None
    rng: random.Random
    delay: float

    def fires(self, method: str, path: str) -> bool:
        """Whether this call gets the fault (consumes one of `count`)."""
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and not self.path.search(path):
            return False
        if self.probability is not None:
            return self.rng.random() < self.probability
        if self.count is None:
            return True
        if self.count <= 0:
            return False
        self.count -= 1
        return True


@dataclass
class _Saved:
    """What an idempotency key was first used for, and its answer once the endpoint ran."""

    method: str
    path: str
    params: dict[str, Any]
    status: int | None = None  # None while the first request is still executing
    body: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""


class State:
    """The fake's objects, usage, events, idempotency keys, faults and recorded requests."""

    invoice_grace = DEFAULT_INVOICE_GRACE  # this account's invoice finalization grace period

    def __init__(
        self, api_key: str = "sk_test_fake", *, now: Callable[[], float] = time.time
    ) -> None:
        self.api_key = api_key
        self.now = now
        self.latency = 0.0  # seconds per answer; a write holds its object's lock meanwhile
        self.default_version = DEFAULT_API_VERSION  # the account's, for requests without a header
        self.keep_bodies = False  # record each answer's body too (the conformance test reads them)
        self.url = ""
        self._lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Drops all objects, usage, events, idempotency keys, faults and recorded requests."""
        with self._lock:
            self._customers: dict[str, dict[str, Any]] = {}
            self._prices: dict[str, dict[str, Any]] = {}
            self._meters: dict[str, dict[str, Any]] = {}
            self._subscriptions: dict[str, _Subscription] = {}
            self._items: dict[str, _Item] = {}
            self._events: list[_MeterEvent] = []  # in the order received
            self._event_ids: dict[str, _MeterEvent] = {}  # identifiers are remembered forever
            self._idempotency: dict[tuple[str, str], _Saved] = {}
            self._object_locks: dict[str, threading.Lock] = {}
            self._faults: list[_Fault] = []
            self.faults_injected: collections.Counter[str] = collections.Counter()
            self.requests: list[RecordedRequest] = []

    # --- a subscription's lifecycle ---------------------------------------------------------------

    def renew(self, subscription: str, period_end: int) -> None:
        """Starts a subscription's next billing period where the current one ends."""
        with self._lock:
            found = self._subscriptions[subscription]
            ended = found.period_end
            found.invoiced.append((found.period_start, ended, ended + self.invoice_grace))
            found.period_start, found.period_end = ended, period_end

    def reset_billing_cycle(self, subscription: str, period_end: int) -> None:
        """An update with billing_cycle_anchor=now: the period is invoiced now, a new one begins."""
        with self._lock:
            found = self._subscriptions[subscription]
            now = int(self.now())
            found.invoiced.append((found.period_start, now, now + self.invoice_grace))
            found.period_start, found.period_end = now, period_end

    def cancel(
        self, subscription: str, *, at_period_end: bool = False, at: int | None = None
    ) -> None:
        """Schedules a cancellation: at the period's end, or at a moment (`cancel_at`)."""
        with self._lock:
            found = self._subscriptions[subscription]
            found.cancel_at_period_end, found.cancel_at = at_period_end, at

    def end(self, subscription: str, status: str = "canceled") -> None:
        """Ends a subscription now (canceled, or incomplete_expired); its period is invoiced."""
        if status not in _ENDED:
            raise ValueError(f"an ended subscription is {' or '.join(_ENDED)}, not {status!r}")
        with self._lock:
            found = self._subscriptions[subscription]
            now = int(self.now())
            found.status, found.ended_at = status, now
            found.invoiced.append((found.period_start, now, now + self.invoice_grace))

    def item_id(self, subscription: str, price: str) -> str:
        """The id of the subscription's item for that price."""
        with self._lock:
            for item in self._subscriptions[subscription].items:
                if self._items[item].price == price:
                    return item
        raise KeyError(f"{subscription} has no item with {price}")

    # --- queries ----------------------------------------------------------------------------------

    def usage_records(self, item: str) -> dict[int, int]:
        """An item's usage records: timestamp -> quantity."""
        with self._lock:
            return dict(self._items[item].usage)

    def usage_total(self, item: str) -> int:
        """The sum of an item's usage records (what aggregate_usage=sum bills)."""
        return sum(self.usage_records(item).values())

    def meter_events(self, event_name: str | None = None) -> list[dict[str, Any]]:
        """Every accepted meter event (cancelled ones too), in the order received."""
        with self._lock:
            return [e.as_json() for e in self._events if event_name in (None, e.event_name)]

    def meter_value(self, meter: str, customer: str) -> Decimal:
        """A customer's value on a meter over all time, aggregated by the meter's rules."""
        with self._lock:
            formula = self._meters[meter]["default_aggregation"]["formula"]
            return _aggregate(formula, self._counted_events(meter, customer))

    def meter_buckets(self, meter: str, customer: str) -> dict[int, Decimal]:
        """Bucket start -> value, per the meter's event_time_window (UTC days for a raw meter)."""
        with self._lock:
            found = self._meters[meter]
            seconds = WINDOW_SECONDS[found["event_time_window"] or "day"]
            buckets: dict[int, list[_MeterEvent]] = collections.defaultdict(list)
            for event in self._counted_events(meter, customer):
                buckets[event.timestamp - event.timestamp % seconds].append(event)
            formula = found["default_aggregation"]["formula"]
            return {start: _aggregate(formula, events) for start, events in sorted(buckets.items())}

    def unbilled_events(self) -> list[dict[str, Any]]:
        """Events Stripe took but bills in no period: Stripe accepts meter events for any customer,
        and bills only those inside a period of the customer's subscription whose invoice was
        still open when the event arrived."""
        with self._lock:
            return [e.as_json() for e in self._events if not e.cancelled and not self._billed(e)]

    def _billed(self, event: _MeterEvent) -> bool:
        """Whether some subscription of the event's customer bills it."""
        for subscription in self._subscriptions.values():
            if subscription.customer != event.customer or event.timestamp < subscription.start_date:
                continue
            if not any(self._prices[self._items[i].price]["recurring"]["meter"] == event.meter
                       for i in subscription.items):  # fmt: skip
                continue
            for start, end, finalizes in subscription.invoiced:
                if start <= event.timestamp < end and event.received < finalizes:
                    return True
            current = subscription.status not in _ENDED
            if current and subscription.period_start <= event.timestamp < subscription.period_end:
                return True
        return False

    def writes(self) -> list[RecordedRequest]:
        """POSTs that performed a write: not replays, not errors, not refused by a fault."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == "POST" and r.performed and not r.idempotent_replay
            ]

    def _active_meter(self, event_name: str) -> dict[str, Any] | None:
        """The active meter that takes this event_name."""
        for meter in self._meters.values():
            if meter["event_name"] == event_name and meter["status"] == "active":
                return meter
        return None

    def _counted_events(self, meter: str, customer: str) -> list[_MeterEvent]:
        """The events a meter counts: all (raw) or the newest received per bucket (windowed)."""
        events = [
            e
            for e in self._events
            if e.meter == meter and e.customer == customer and not e.cancelled
        ]
        window = self._meters[meter]["event_time_window"]
        if window is None:
            return events
        seconds = WINDOW_SECONDS[window]
        newest: dict[int, _MeterEvent] = {}
        for event in events:  # in the order received, so a later one replaces an earlier one
            newest[event.timestamp - event.timestamp % seconds] = event
        return list(newest.values())


def _aggregate(formula: str, events: Sequence[_MeterEvent]) -> Decimal:
    """A meter's formula over the events it counts."""
    if formula == "count":
        return Decimal(len(events))
    if formula == "last":
        if not events:
            return Decimal(0)
        latest = max(reversed(events), key=lambda e: e.timestamp)  # a tie: the later received
        return latest.value or Decimal(0)
    return sum((e.value or Decimal(0) for e in events), Decimal(0))
