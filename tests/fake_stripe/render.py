"""Objects as each Stripe-Version shows them, and the fake's whole state as JSON."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, cast

from tests.fake_stripe.rules import BASIL_DATE, DEFAULT_API_VERSION, EMBEDDED_ITEMS, _date
from tests.fake_stripe.state import State, _Item, _Subscription


class Rendering(State):
    """Renders subscriptions, items and prices at an API version."""

    def _render_subscription(self, subscription: _Subscription, version: str) -> dict[str, Any]:
        """A subscription as the given API version shows it."""
        items = [self._render_item(self._items[item], version) for item in subscription.items]
        rendered: dict[str, Any] = {
            "id": subscription.id,
            "object": "subscription",
            "automatic_tax": {"enabled": False, "liability": None, "disabled_reason": None},
            "billing_cycle_anchor": subscription.period_start,
            "canceled_at": subscription.ended_at,
            "collection_method": "charge_automatically",
            "currency": "usd",
            "customer": subscription.customer,
            "status": subscription.status,
            "created": subscription.created,
            "start_date": subscription.start_date,
            "cancel_at": subscription.cancel_at,
            "cancel_at_period_end": subscription.cancel_at_period_end,
            "ended_at": subscription.ended_at,
            # Nullable in the endive spec's `subscription` and in the 2023 spec (stripe/openapi
            # 18fa2cc7 and 63a67463): `subscription_billing_thresholds` or null.
            "billing_thresholds": subscription.billing_thresholds,
            "livemode": False,
            "metadata": {},
            "items": {
                "object": "list",
                "data": items[:EMBEDDED_ITEMS],
                "has_more": len(items) > EMBEDDED_ITEMS,
                "url": f"/v1/subscription_items?subscription={subscription.id}",
            },
        }
        if _date(version) < BASIL_DATE:
            rendered["current_period_start"] = subscription.period_start
            rendered["current_period_end"] = subscription.period_end
        else:
            # Newer than the acacia-era spec: endive requires them (which version added each is
            # not confirmed; the fake shows them from basil on, as it shows the item periods).
            rendered["billing_mode"] = {"type": "classic"}
            rendered["billing_schedules"] = []
            rendered["discounts"] = []
            rendered["invoice_settings"] = {"account_tax_ids": None, "issuer": {"type": "self"}}
        return rendered

    def _render_item(self, item: _Item, version: str) -> dict[str, Any]:
        """A subscription item with its full price, and from basil on its billing period."""
        subscription = self._subscriptions[item.subscription]
        price = self._render_price(self._prices[item.price], version)
        rendered: dict[str, Any] = {
            "id": item.id,
            "object": "subscription_item",
            "price": price,
            "subscription": item.subscription,
            "created": item.created,
            "metadata": {},
            # Nullable in both specs: `subscription_item_billing_thresholds` ({usage_gte}) or null.
            "billing_thresholds": None if item.usage_gte is None else {"usage_gte": item.usage_gte},
        }
        if _date(version) >= BASIL_DATE:
            # basil moved the period from the subscription to each item (changelog; endive spec
            # `subscription_item` requires both), and `discounts` is required there too.
            rendered["current_period_start"] = subscription.period_start
            rendered["current_period_end"] = subscription.period_end
            rendered["discounts"] = []
        if price["recurring"]["usage_type"] == "licensed":
            rendered["quantity"] = 1  # metered items have no quantity
        return rendered

    def _render_price(self, price: Mapping[str, Any], version: str) -> dict[str, Any]:
        """A price as `version` shows it: aggregate_usage only before basil."""
        rendered = copy.deepcopy(dict(price))
        if _date(version) >= BASIL_DATE:
            # basil removed aggregate_usage "from all API endpoints" (changelog); endive's
            # `recurring` is interval, interval_count, meter and usage_type.
            del rendered["recurring"]["aggregate_usage"]
        return rendered

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot of everything the fake holds."""
        with self._lock:
            metered = {(e.meter, e.customer) for e in self._events}
            snapshot = {
                "url": self.url,
                "latency": self.latency,
                "customers": sorted(self._customers),
                "prices": dict(self._prices),
                "meters": dict(self._meters),
                "subscriptions": {
                    s: self._render_subscription(sub, DEFAULT_API_VERSION)
                    for s, sub in self._subscriptions.items()
                },
                "usage_records": {
                    i: {str(ts): qty for ts, qty in sorted(item.usage.items())}
                    for i, item in self._items.items()
                },
                "usage_totals": {i: sum(item.usage.values()) for i, item in self._items.items()},
                # The same totals as a person reads them: subscription -> price -> total.
                "usage_by_subscription": {
                    s: {
                        item.price: sum(item.usage.values())
                        for item in self._items.values()
                        if item.subscription == s
                    }
                    for s in self._subscriptions
                },
                "meter_events": self.meter_events(),
                "meter_values": {
                    m: {c: str(self.meter_value(m, c)) for mm, c in sorted(metered) if mm == m}
                    for m in self._meters
                },
                "meter_buckets": {  # meter -> customer -> bucket start -> value
                    m: {
                        c: {str(start): str(v) for start, v in self.meter_buckets(m, c).items()}
                        for mm, c in sorted(metered)
                        if mm == m
                    }
                    for m in self._meters
                },
                "faults_injected": dict(self.faults_injected),
                "requests": len(self.requests),
                "writes": len(self.writes()),
            }
            return cast(dict[str, Any], json.loads(json.dumps(snapshot)))  # detached from the state
