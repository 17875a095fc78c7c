"""What "the same write" means: every name a write, a place or a message goes by, in one module.

Each is a pure function of named inputs (docs/ledger.md#identities has the table). None holds the
Stripe key or the account: Stripe's object ids (si_, cus_, mtr_) are made by Stripe, random, and
each belongs to one account and mode ("API objects in one mode aren't accessible to the other",
docs.stripe.com/test-mode), so an object id names the account too. A key rotation, or a move from
sk_ to rk_, changes none of them.
"""

from __future__ import annotations

import hashlib

MAX_IDEMPOTENCY_KEY = 255  # Stripe's limit (docs.stripe.com/api/idempotent_requests)


def lock_key(item: str, customer: str | None = None, meter: str | None = None) -> str:
    """What Stripe locks on a write: the subscription item, or the customer's meter.

    Stripe takes one concurrent meter-event call per customer and meter, and locks an item while
    a usage record lands on it; writes under one lock key are made one at a time.
    """
    if meter is not None:
        return f"{customer}/{meter}"
    return item


def place(kind: str, lock_key: str) -> str:
    """Where writes land, as the ledger keys them: the API and the object it writes to."""
    return f"{kind}/{lock_key}"


def idempotency_key(message_id: str, *meaning: object) -> str:
    """A key per write: the message and what the write means, so that only a true repeat replays."""
    key = ":".join([message_id, *map(str, meaning)])
    if len(key) <= MAX_IDEMPOTENCY_KEY:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def usage_record_key(message_id: str, item: str, timestamp: int, quantity: int) -> str:
    """A usage record's idempotency key: a correction (another quantity) is another write."""
    return idempotency_key(message_id, item, timestamp, quantity)


def fresh_key(key: str, nonce: str) -> str:
    """The key that replaces one whose last attempt Stripe answered with a 5xx (its saved answer
    would replay for 24 h); the ledger remembers it, so the next delivery starts from it."""
    return idempotency_key(key, "after-5xx", nonce)


def meter_event_identifier(
    message_id: str, *, event_name: str, customer: str, timestamp: int, value: str, raw: bool
) -> str:
    """Raw meters: one event per window, ever. Pre-aggregated: one per message, window and value.

    A pre-aggregated meter keeps the newest event per bucket, so each message (and each value a
    message is converted to, after a multiplier fix) must be new to it; a raw meter adds every
    event, so a window must never be sent twice, whatever its value. At most 100 characters
    (Stripe's limit for `identifier`).
    """
    meaning = [event_name, customer, str(timestamp)]
    if not raw:
        meaning[:0] = [message_id, value]
    return "om-" + hashlib.sha256("\n".join(meaning).encode()).hexdigest()[:48]


def message_digest(body_sha256: str, place: str, multiplier: object, rounding: object) -> str:
    """What "already written" means: this body, converted this way, written to this place.

    A resend after a mapping fix (another place, multiplier or rounding) means something else,
    so it is written again.
    """
    meaning = f"{body_sha256}\n{place}\n{multiplier}\n{rounding}"
    return hashlib.sha256(meaning.encode()).hexdigest()


def body_digest(body: bytes) -> str:
    """The signed body's SHA-256: a reused svix-id with another body is another message."""
    return hashlib.sha256(body).hexdigest()
