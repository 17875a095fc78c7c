"""Svix delivery: the signature, and when the attempt was sent."""

from __future__ import annotations

import binascii
import re
from collections.abc import Mapping, Sequence

from svix.webhooks import Webhook, WebhookVerificationError

from bridge.errors import BadSignature


def verify(body: bytes, headers: Mapping[str, str], verifiers: Sequence[Webhook]) -> str:
    """Checks the Svix signature against every configured secret; returns the message id."""
    # Svix's own header names win over the standard-webhooks ones, as in the svix library.
    signed = {
        f"webhook-{name}": headers.get(f"svix-{name}") or headers.get(f"webhook-{name}") or ""
        for name in ("id", "timestamp", "signature")
    }
    if not all(signed.values()):
        raise BadSignature(
            "missing signature headers (svix-id, svix-timestamp, svix-signature)",
            "Send webhooks through Svix, or sign them with the Svix algorithm.",
        )
    reason = "no signature matches"
    for verifier in verifiers:
        try:
            verifier.verify(body, signed)
            return signed["webhook-id"]
        except WebhookVerificationError as error:
            reason = str(error)
        # Malformed headers or a non-UTF-8 body make the library raise these instead.
        except (ValueError, binascii.Error, UnicodeDecodeError):
            reason = "malformed signature header or body"
    raise BadSignature(
        f"signature rejected: {reason}",
        "Check that OPENMETER_WEBHOOK_SECRET holds this endpoint's signing secret and that "
        "the sender's clock is right (5 minutes tolerance).",
    )


SENT_AT = re.compile(r"[0-9]{1,15}")


def sent_at(headers: Mapping[str, str]) -> float | None:
    """When Svix sent this attempt: its signed timestamp (Unix seconds), if the headers have one."""
    sent = headers.get("svix-timestamp") or headers.get("webhook-timestamp") or ""
    return float(sent) if SENT_AT.fullmatch(sent) else None


def attempt_budget(budget: float, headers: Mapping[str, str], now: float) -> float:
    """The budget, less what the attempt waited since Svix sent it (queued behind busy threads).

    Svix's 15 s run from when it sent the attempt; the signed timestamp says when that was, to the
    second. At most half the budget is discounted, so a skewed clock cannot starve every attempt.
    """
    sent = sent_at(headers)
    waited = now - sent - 1 if sent is not None else 0.0
    return budget - min(max(waited, 0.0), budget / 2)
