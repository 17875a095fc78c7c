"""The endpoints: each takes the ids its path names, the parameters and the API version."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

from tests.fake_stripe.params import (
    _find,
    _integer,
    _list_page,
    _meter_value,
    _only,
    _string,
)
from tests.fake_stripe.render import Rendering
from tests.fake_stripe.rules import (
    ADJUSTMENT_WINDOW,
    BILLING_THRESHOLDS_MESSAGE,
    DUPLICATE_METER_EVENT_CODE,
    DUPLICATE_METER_EVENT_MESSAGE,
    LAST_USAGE_RECORDS_DATE,
    MAX_IDENTIFIER,
    METER_EVENT_MAX_AGE,
    METER_EVENT_MAX_AHEAD,
    METER_PRICE_MESSAGE,
    TIMESTAMP_IN_FUTURE_MESSAGE,
    TIMESTAMP_OUT_OF_RANGE_CODE,
    TIMESTAMP_OUT_OF_RANGE_MESSAGE,
    USAGE_RECORDS_REMOVED_MESSAGE,
    StripeError,
    _bad_param,
    _date,
    _invalid,
    _new_id,
)
from tests.fake_stripe.state import _MeterEvent

Handler = Callable[[Sequence[str], dict[str, Any], str], dict[str, Any]]
# Method, path and the endpoint's method name; the path's groups are the ids it passes on.
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/v1/(customers|prices|billing/meters)/([^/]+)"), "_get"),
    ("GET", re.compile(r"/v1/subscriptions/([^/]+)"), "_get_subscription"),
    ("GET", re.compile(r"/v1/subscription_items"), "_list_items"),
    ("GET", re.compile(r"/v1/subscription_items/([^/]+)"), "_get_item"),
    ("POST", re.compile(r"/v1/subscription_items/([^/]+)/usage_records"), "_create_usage_record"),
    ("POST", re.compile(r"/v1/billing/meter_events"), "_create_meter_event"),
    ("POST", re.compile(r"/v1/billing/meter_event_adjustments"), "_create_adjustment"),
]


class Handlers(Rendering):
    """Stripe's v1 endpoints: customers, prices, meters, subscriptions, usage, meter events."""

    def _route(self, method: str, path: str) -> tuple[Handler, Sequence[str]] | None:
        """The endpoint for a method and path, and the ids the path names."""
        for route_method, pattern, name in ROUTES:
            match = pattern.fullmatch(path)
            if match is not None and route_method == method:
                return cast(Handler, getattr(self, name)), match.groups()
        return None

    def _get(self, ids: Sequence[str], params: dict[str, Any], version: str) -> dict[str, Any]:
        """GET /v1/customers/{id}, /v1/prices/{id} and /v1/billing/meters/{id} at `version`."""
        _only(params, "expand")
        resource, object_id = ids
        if resource == "prices":
            return self._render_price(_find(self._prices, "price", object_id), version)
        table = {"customers": self._customers}.get(resource, self._meters)
        noun = {"customers": "customer"}.get(resource, "billing meter")
        return copy.deepcopy(_find(table, noun, object_id))

    def _get_subscription(
        self, ids: Sequence[str], params: dict[str, Any], version: str
    ) -> dict[str, Any]:
        """GET /v1/subscriptions/{id}, with its first 10 items embedded."""
        _only(params, "expand")
        subscription = _find(self._subscriptions, "subscription", ids[0])
        return self._render_subscription(subscription, version)

    def _list_items(self, _: Sequence[str], params: dict[str, Any], version: str) -> dict[str, Any]:
        """GET /v1/subscription_items?subscription=sub_...: one page of its items."""
        _only(params, "subscription", "limit", "starting_after", "expand")
        subscription = _string(params, "subscription")
        found = _find(self._subscriptions, "subscription", subscription, param="subscription")
        items = [self._render_item(self._items[item], version) for item in found.items]
        return cast(
            dict[str, Any],
            _list_page(f"/v1/subscription_items?subscription={subscription}", items, params),
        )

    def _get_item(self, ids: Sequence[str], params: dict[str, Any], version: str) -> dict[str, Any]:
        """GET /v1/subscription_items/{id}."""
        _only(params, "expand")
        return self._render_item(_find(self._items, "subscription item", ids[0]), version)

    def _create_usage_record(
        self, ids: Sequence[str], params: dict[str, Any], version: str
    ) -> dict[str, Any]:
        """POST /v1/subscription_items/{id}/usage_records: legacy metered billing, pre-basil."""
        if _date(version) > LAST_USAGE_RECORDS_DATE:
            raise StripeError(
                400, USAGE_RECORDS_REMOVED_MESSAGE.format(version=version), saved=False
            )
        _only(params, "quantity", "timestamp", "action", "expand")
        quantity = _integer(params, "quantity")
        now = int(self.now())
        timestamp = (
            now if params.get("timestamp", "now") == "now" else _integer(params, "timestamp")
        )
        action = params.get("action", "increment")
        if action not in ("increment", "set"):
            raise _bad_param(f"Invalid action: {action} (must be increment or set)", "action")
        item = _find(self._items, "subscription item", ids[0], param="subscription_item")
        subscription = self._subscriptions[item.subscription]
        recurring = self._prices[item.price]["recurring"]
        if subscription.status == "canceled":
            message = (
                f"Cannot create a usage record for `{item.id}`: {subscription.id} is canceled."
            )
            raise _invalid(message)
        if recurring["meter"] is not None:
            raise _invalid(METER_PRICE_MESSAGE.format(item=item.id))
        if recurring["usage_type"] != "metered":
            message = f"Cannot create a usage record for `{item.id}`: its price is not metered."
            raise _invalid(message)
        if action == "set" and (subscription.billing_thresholds or item.usage_gte is not None):
            # The spec's `action`: "If the subscription has billing thresholds, `increment` is
            # the only allowed value." (2023 spec, POST .../usage_records; Stripe's wording of
            # the error is not published: this one is the fake's.)
            raise _invalid(BILLING_THRESHOLDS_MESSAGE.format(item=item.id), param="action")
        if timestamp > now:
            raise _invalid(
                TIMESTAMP_IN_FUTURE_MESSAGE, param="timestamp", code=TIMESTAMP_OUT_OF_RANGE_CODE
            )
        if timestamp < subscription.period_start:
            raise _invalid(
                TIMESTAMP_OUT_OF_RANGE_MESSAGE, param="timestamp", code=TIMESTAMP_OUT_OF_RANGE_CODE
            )
        before = 0 if action == "set" else item.usage.get(timestamp, 0)
        item.usage[timestamp] = before + quantity
        return {
            "id": _new_id("mbur"),
            "object": "usage_record",
            "livemode": False,
            "quantity": quantity,
            "subscription_item": item.id,
            "timestamp": timestamp,
        }

    def _create_meter_event(
        self, _: Sequence[str], params: dict[str, Any], __: str
    ) -> dict[str, Any]:
        """POST /v1/billing/meter_events: validated now, counted by the meter's aggregation."""
        _only(params, "event_name", "payload", "timestamp", "identifier")
        event_name = _string(params, "event_name")
        payload = params.get("payload")
        if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
            raise _bad_param("Invalid payload: must be a hash of strings.", "payload")
        identifier = params.get("identifier") or _new_id("mev")
        if not isinstance(identifier, str) or len(identifier) > MAX_IDENTIFIER:
            message = (
                f"Invalid identifier: must be a string of at most {MAX_IDENTIFIER} characters."
            )
            raise _bad_param(message, "identifier")
        now = self.now()
        timestamp = _integer(params, "timestamp") if "timestamp" in params else int(now)
        meter = self._active_meter(event_name)
        if meter is None:
            message = f"No active meter was found with event_name `{event_name}`."
            raise _invalid(message, param="event_name")
        customer_key = meter["customer_mapping"]["event_payload_key"]
        customer = payload.get(customer_key)
        if customer is None:
            raise _invalid(f"Missing {customer_key} in payload.", param=f"payload[{customer_key}]")
        if customer not in self._customers:
            message = f"No such customer: '{customer}'"
            raise _invalid(message, param=f"payload[{customer_key}]", code="resource_missing")
        value = None
        if meter["default_aggregation"]["formula"] != "count":
            value = _meter_value(payload, meter["value_settings"]["event_payload_key"])
        if not now - METER_EVENT_MAX_AGE <= timestamp <= now + METER_EVENT_MAX_AHEAD:
            message = (
                "Timestamp must be within the past 35 calendar days and at most 5 minutes in "
                f"the future: {timestamp}."
            )
            raise _invalid(message, param="timestamp")
        if identifier in self._event_ids:
            message = DUPLICATE_METER_EVENT_MESSAGE.format(identifier=identifier)
            raise _invalid(message, param="identifier", code=DUPLICATE_METER_EVENT_CODE)
        event = _MeterEvent(
            identifier, event_name, meter["id"], customer, value, payload, timestamp, now
        )
        self._events.append(event)
        self._event_ids[identifier] = event
        return {
            "object": "billing.meter_event",
            "event_name": event_name,
            "identifier": identifier,
            "payload": payload,
            "timestamp": timestamp,
            "created": int(now),
            "livemode": False,
        }

    def _create_adjustment(
        self, _: Sequence[str], params: dict[str, Any], __: str
    ) -> dict[str, Any]:
        """POST /v1/billing/meter_event_adjustments: cancels one event received under 24 h ago."""
        _only(params, "event_name", "type", "cancel")
        event_name = _string(params, "event_name")
        if _string(params, "type") != "cancel":
            raise _bad_param("Invalid type: must be cancel.", "type")
        cancel = params.get("cancel")
        if not isinstance(cancel, dict) or not cancel.get("identifier"):
            raise _bad_param("Missing required param: cancel[identifier].", "cancel[identifier]")
        identifier = cancel["identifier"]
        event = self._event_ids.get(identifier)
        if event is None or event.event_name != event_name:
            message = f"No meter event with identifier {identifier} for event_name {event_name}."
            raise _invalid(message, param="cancel[identifier]")
        if self.now() - event.received >= ADJUSTMENT_WINDOW:
            message = "A meter event can only be cancelled within 24 hours of being received."
            raise _invalid(message, param="cancel[identifier]")
        if event.cancelled:
            raise _invalid(f"The meter event {identifier} is already cancelled.")
        event.cancelled = True
        return {
            "object": "billing.meter_event_adjustment",
            "livemode": False,
            "status": "pending",
            "event_name": event_name,
            "type": "cancel",
            "cancel": {"identifier": identifier},
        }
