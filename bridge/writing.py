"""Writing a report's windows to Stripe, one writer per Stripe object at a time."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import stripe

from bridge.budget import time_left
from bridge.errors import BridgeError, StripeRefused, StripeUnavailable
from bridge.ledger import Accepted, Ledger, Message
from bridge.logs import WINDOWS_WRITTEN, count_windows, log_event
from bridge.planning import Write, idempotency_key
from bridge.quantities import meter_value_text
from bridge.stripe_api import USAGE_RECORDS_API_VERSION, call_stripe, classify
from bridge.stripe_objects import Cache, Subscription
from bridge.targets import Target

_locks: dict[str, tuple[threading.Lock, int]] = {}  # a lock and how many want it
_locks_guard = threading.Lock()


@contextmanager
def one_writer(lock_key: str) -> Iterator[None]:
    """Writes to one Stripe object one at a time: concurrent writes hit Stripe's lock timeouts."""
    with _locks_guard:
        lock, users = _locks.get(lock_key, (threading.Lock(), 0))
        _locks[lock_key] = lock, users + 1
    try:
        if not lock.acquire(timeout=max(min(time_left(), 60.0), 0)):
            raise StripeUnavailable(
                f"another webhook kept {lock_key} busy until the time budget ran out",
                "Svix will retry.",
            )
        try:
            yield
        finally:
            lock.release()
    finally:
        with _locks_guard:  # the last user drops the lock: the table stays small
            lock, users = _locks[lock_key]
            if users == 1:
                del _locks[lock_key]
            else:
                _locks[lock_key] = lock, users - 1


class LedgerBatch:
    """What one attempt leaves in the ledger: the writes Stripe accepted, 50 at a time (a worker
    killed mid-report redoes at most 50), and the message itself, however the attempt ends.

    Enter it around the whole attempt, and `writing(target, complete)` around the writes: the
    last batch is recorded before the lock is released, so that a newer report for the same
    windows, waiting for that lock, finds them in the ledger.
    """

    SIZE = 50

    def __init__(self, ledger: Ledger, message: Message) -> None:
        self._ledger = ledger
        # What is recorded: process_event swaps in the digest of body and place once it knows
        # the target.
        self.message = message
        self._place: str | None = None  # known once the writing starts
        self._accepted: list[Write] = []
        self._recorded = False

    def __enter__(self) -> LedgerBatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Records an attempt that failed before it wrote: even a failed attempt is remembered,
        as when a message was first seen decides which of two reports wins."""
        if not self._recorded:
            self._record(done=False)

    def nothing_to_record(self) -> None:
        """Ends the attempt unrecorded: the ledger has the message as written already."""
        self._recorded = True

    @contextmanager
    def writing(self, target: Target, complete: bool) -> Iterator[None]:
        """Holds the target's one writer lock around the block, and records what is left before
        it lets go: done if the block ended normally and complete (no window waits for later)."""
        with one_writer(target.lock_key):
            self._place = target.place
            done = False
            try:
                yield
                done = complete
            finally:
                self._record(done)

    def accepted(self, write: Write) -> None:
        """Notes one write Stripe accepted."""
        self._accepted.append(write)
        if len(self._accepted) >= self.SIZE:
            self._record(done=False)

    def _record(self, done: bool) -> None:
        """Records the message and the writes noted since the last batch."""
        writes = tuple(self._accepted)
        accepted = Accepted(self._place, writes) if self._place else None
        self._ledger.record(self.message, done, accepted)
        self._accepted.clear()
        self._recorded = True


def send_write(client: stripe.StripeClient, target: Target, write: Write) -> str | None:
    """Sends one window to Stripe; returns Stripe's request id (None: it already had it)."""
    if write.timestamp > time.time():
        raise StripeUnavailable(
            f"window {write.window.start.isoformat()} started less than a second ago",
            "Svix will retry in a moment.",
        )
    if target.meter is None:
        key = write.key

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
    under a new key cannot count twice. The suffix is random, not a counter: it needs no shared
    state (it works without the ledger, across workers), and each delivery still tries the
    message's own key first, so a write whose answer was lost replays rather than runs again.
    """
    return idempotency_key(key, "after-5xx", secrets.token_hex(8))


def _already_exists(error: stripe.InvalidRequestError) -> bool:
    """Stripe's answer to an identifier it already has: the event is in, which is success."""
    # Stripe gives this error no code; its fixed wording tells it from a malformed identifier.
    return "already exists with identifier" in str(error.user_message)


def write_facts(target: Target, write: Write) -> dict[str, Any]:
    """What a log line says of one write, in the words of its Stripe API."""
    if target.meter is None:
        return {
            "kind": target.kind,
            "idempotency_key": write.key,
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


def write_report(
    client: stripe.StripeClient,
    subscriptions: Cache[Subscription],
    target: Target,
    writes: Sequence[Write],
    on_accepted: Callable[[Write], None],
    *,
    planned_refusals: Sequence[dict[str, Any]] = (),
    waiting: Sequence[dict[str, str]] = (),
) -> None:
    """Sends every window in order; a refused window does not keep the others from Stripe.

    planned_refusals: windows the plan refused (Stripe would bill them in no period), answered
    together with any Stripe refuses, once the others are written. waiting: windows a later
    attempt writes, named in a refusal too (a 422 outranks the 503 that would name them).
    """
    refused = list(planned_refusals)
    written = 0
    for write in writes:
        facts = write_facts(target, write)
        try:
            request_id = send_write(client, target, write)
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
                # Svix's next attempt resumes: the ledger skips what Stripe has accepted.
                progress = {"written": written, "remaining": len(writes) - written}
                raise StripeUnavailable(
                    problem.message, problem.hint, **problem.details, **progress
                ) from error
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
    if refused:
        count_windows(target.kind, refused=len(refused))
        raise StripeRefused(
            f"{len(refused)} of {len(writes) + len(planned_refusals)} windows refused: "
            f"{refused[0]['message']}",
            refused[0]["hint"],
            refused=refused,
            **({"waiting": list(waiting)} if waiting else {}),
        )


def write_problem(error: stripe.StripeError | StripeUnavailable, write: Write) -> BridgeError:
    """What a failed write answers: the bridge's own error as it is, Stripe's classified."""
    if isinstance(error, BridgeError):
        return error
    window = {
        "window_start": write.window.start.isoformat(),
        "window_end": write.window.end.isoformat(),
    }
    return classify(error, **window)
