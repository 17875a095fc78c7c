"""Writing a report's windows to Stripe (inside the ledger's critical section for their object)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import stripe

from bridge.errors import BridgeError, StripeUnavailable
from bridge.identity import fresh_key
from bridge.logs import WINDOWS_WRITTEN, count_windows, log_event
from bridge.planning import Write
from bridge.quantities import meter_value_text
from bridge.stripe_api import USAGE_RECORDS_API_VERSION, call_stripe, classify
from bridge.stripe_objects import Cache, Subscription
from bridge.targets import Target


def send_write(
    client: stripe.StripeClient,
    target: Target,
    write: Write,
    on_fresh_key: Callable[[Write, str], None] = lambda write, key: None,
) -> str | None:
    """Sends one window to Stripe; returns Stripe's request id (None: it already had it).

    on_fresh_key(write, key) hears of the key that replaces one Stripe answered with a 5xx.
    """
    if write.timestamp > time.time():
        raise StripeUnavailable(
            f"window {write.window.start.isoformat()} started less than a second ago",
            "Svix will retry in a moment.",
        )
    if target.meter is None:
        key = write.fresh or write.key

        def send_usage_record() -> Any:
            """One attempt; after a 5xx the next one takes a fresh idempotency key."""
            nonlocal key
            try:
                return client.raw_request(
                    "post",
                    f"/v1/subscription_items/{target.item.id}/usage_records",
                    quantity=write.value,
                    timestamp=write.timestamp,
                    action="set",  # a repeat or a correction overwrites the window
                    stripe_version=USAGE_RECORDS_API_VERSION,
                    idempotency_key=key,
                )
            except stripe.APIError as error:
                if (error.http_status or 0) >= 500:
                    key = after_server_error(write.key)
                    on_fresh_key(write, key)
                raise

        response = call_stripe("usage_record", send_usage_record)
        return str(response.request_id)
    meter = target.meter
    try:
        response = call_stripe(
            "meter_event",
            lambda: client.raw_request(
                "post",
                "/v1/billing/meter_events",
                event_name=meter.event_name,
                payload={
                    meter.customer_key: target.subscription.customer,
                    meter.value_key: meter_value_text(write.value),
                },
                timestamp=write.timestamp,
                identifier=write.key,
            ),
        )
    except stripe.InvalidRequestError as error:
        if _already_exists(error):
            return None
        raise
    return str(response.request_id)


def after_server_error(key: str) -> str:
    """A fresh idempotency key for a usage record whose last attempt Stripe answered with a 5xx.

    Stripe saves "the resulting status code and body of the first request made for any given
    idempotency key ... including 500 errors" (docs.stripe.com/api/idempotent_requests): retried
    with the same key, one 500 would replay for 24 h and block the message and every later window
    of its report. A `set` at the same timestamp overwrites, so writing the same quantity again
    under a new key cannot count twice. The suffix is random; the ledger remembers the fresh key
    (Ledger.replace_key), so every later delivery, in any worker, starts from it: a write whose
    answer was lost replays rather than runs again, and the saved 500 is never asked again.
    """
    return fresh_key(key, secrets.token_hex(8))


def _already_exists(error: stripe.InvalidRequestError) -> bool:
    """Stripe's answer to an identifier it already has: the event is in, which is success."""
    # Stripe gives this error no code; its fixed wording tells it from a malformed identifier.
    return "already exists with identifier" in str(error.user_message)


def write_facts(target: Target, write: Write) -> dict[str, Any]:
    """What a log line says of one write, in the words of its Stripe API."""
    if target.meter is None:
        return {
            "kind": target.kind,
            "idempotency_key": write.fresh or write.key,
            "item": target.item.id,
            "timestamp": write.timestamp,
            "quantity": write.value,
        }
    return {
        "kind": target.kind,
        "identifier": write.key,
        "event_name": target.meter.event_name,
        "customer": target.subscription.customer,
        "timestamp": write.timestamp,
        "value": meter_value_text(write.value),
    }


@dataclass(frozen=True)
class Sent:
    """What sending a report's windows came to, as a value the service answers from."""

    written: int  # windows Stripe took
    refused: list[dict[str, Any]]  # each refused window's 422 body
    stopped: StripeUnavailable | None  # the transient failure that ended the attempt, if one did

    @property
    def complete(self) -> bool:
        """Whether every window was written."""
        return not self.refused and self.stopped is None


def write_report(
    client: stripe.StripeClient,
    subscriptions: Cache[Subscription],
    target: Target,
    writes: Sequence[Write],
    on_accepted: Callable[[Write], None],
    *,
    on_fresh_key: Callable[[Write, str], None] = lambda write, key: None,
) -> Sent:
    """Sends every window in order; a refused window does not keep the others from Stripe, a
    transient failure ends the attempt (Svix's next one resumes: the ledger skips what Stripe
    has accepted)."""
    refused: list[dict[str, Any]] = []
    written = 0
    for write in writes:
        facts = write_facts(target, write)
        try:
            request_id = send_write(client, target, write, on_fresh_key)
        except (stripe.StripeError, StripeUnavailable) as error:
            problem = write_problem(error, write)
            log_event(
                "stripe write failed",
                logging.WARNING,
                **facts,
                status=problem.status,
                stripe_request_id=getattr(error, "request_id", None),
            )
            if isinstance(problem, StripeUnavailable):
                progress = {"written": written, "remaining": len(writes) - written}
                stopped = StripeUnavailable(
                    problem.message, problem.hint, **problem.details, **progress
                )
                return Sent(written, refused, stopped)
            # A refusal may come from a subscription changed since it was cached (an item
            # removed, a price swapped): drop the copy, so that Svix's retry reads it afresh.
            subscriptions.forget(target.subscription.id)
            refused.append(problem.body())
            continue
        written += 1
        on_accepted(write)
        if request_id is None and target.raw_meter:
            log_event(
                "raw meter kept the window's first event",
                logging.WARNING,
                **facts,
                hint="a correction of this window, if it was one, is not applied",
            )
        count_windows(target.kind, **{"kept" if request_id is None else "written": 1})
        WINDOWS_WRITTEN.labels(target.kind).inc()
        log_event("stripe write", **facts, stripe_request_id=request_id)
    return Sent(written, refused, None)


def write_problem(error: stripe.StripeError | StripeUnavailable, write: Write) -> BridgeError:
    """What a failed write answers: the bridge's own error as it is, Stripe's classified."""
    if isinstance(error, BridgeError):
        return error
    window = {
        "window_start": write.window.start.isoformat(),
        "window_end": write.window.end.isoformat(),
    }
    return classify(error, **window)
