"""The bridge: everything a webhook needs, and what happens to a verified event."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import stripe
from svix.webhooks import Webhook

from bridge.config import Config
from bridge.config_source import ConfigSource
from bridge.errors import ConfigError, WindowsWaiting
from bridge.ledger import Ledger, Message, Pending
from bridge.logs import count_windows, log_event
from bridge.planning import plan_writes
from bridge.quantities import check_negative
from bridge.report import Report, decode_json, event_type, parse_report
from bridge.settings import Settings, config_path, settings_from_env
from bridge.stripe_api import make_stripe_client
from bridge.stripe_health import KeyHealth
from bridge.stripe_objects import StripeCaches
from bridge.targets import Target, resolve_target
from bridge.writing import LedgerBatch, write_facts, write_report


@dataclass
class Bridge:
    """Everything a webhook needs: settings, the mapping, the Stripe client and its caches."""

    settings: Settings
    config: ConfigSource
    stripe: stripe.StripeClient
    caches: StripeCaches
    ledger: Ledger
    verifiers: tuple[Webhook, ...]
    key_health: KeyHealth = field(default_factory=KeyHealth)  # what Stripe says of the key

    def target(self, report: Report, config: Config) -> Target:
        """The Stripe object that bills a report, found with this bridge's client and caches."""
        return resolve_target(report, config, self.stripe, self.caches, self.settings.account)


def make_bridge(
    environ: Mapping[str, str],
    required: Sequence[str] = ("STRIPE_API_KEY", "OPENMETER_WEBHOOK_SECRET"),
) -> Bridge:
    """The bridge from the environment and config.yaml; a ConfigError lists all that is wrong."""
    problems = []
    try:
        settings = settings_from_env(environ, required)
    except ConfigError as error:
        problems += error.problems
    try:
        config = ConfigSource(config_path(environ))
    except ConfigError as error:
        problems += error.problems
    if problems:
        raise ConfigError(problems)
    health = KeyHealth.for_this_start()
    client = make_stripe_client(settings, health)
    verifiers = tuple(Webhook(secret) for secret in settings.webhook_secrets)
    ledger = Ledger(settings.state_path)
    return Bridge(settings, config, client, StripeCaches(), ledger, verifiers, health)


def process_event(
    bridge: Bridge,
    body: bytes,
    message_id: str,
    facts: dict[str, Any],
    *,
    dry_run: bool = False,
    sent_at: float | None = None,
) -> dict[str, Any]:
    """Parse, resolve, plan, write: what happens to a verified event (and to a replayed one).

    sent_at is when Svix sent this attempt (its signed timestamp), if it came through Svix.
    """
    facts["message_id"] = message_id
    digest = hashlib.sha256(body).hexdigest()
    event = decode_json(body)
    kind = event_type(event)
    if kind != "report.meter":
        facts["type"] = kind
        return {"outcome": "ignored", "type": kind, "message_id": message_id}
    now = datetime.now(UTC)
    report = parse_report(event, now)
    facts.update(subject=report.subject, meter=report.meter, windows=len(report.windows))
    answer: dict[str, Any] = {"outcome": "written", "message_id": message_id,
                              "subject": report.subject, "meter": report.meter,
                              "windows": len(report.windows)}  # fmt: skip
    config = bridge.config.current()
    check_negative(report, config)
    grace = bridge.settings.invoice_grace
    if dry_run:
        found = bridge.target(report, config)
        plan = plan_writes(report, found, message_id, now, grace=grace)
        return answer | {"outcome": "dry_run", "kind": found.kind, "waiting": plan.waiting,
                         "incomplete": plan.left_out,
                         "writes": [write_facts(found, w) for w in plan.writes],
                         "refused": plan.refused}  # fmt: skip
    seen = bridge.ledger.begin(message_id)
    # When OpenMeter made the report, as far as the bridge can know: no later than the first
    # attempt the ledger saw, nor than the Svix attempt in hand (the first one, unless retried).
    made_at = datetime.fromtimestamp(min(seen.first_seen, sent_at or seen.first_seen), UTC)
    with LedgerBatch(bridge.ledger, Message(message_id, digest, seen.first_seen)) as batch:
        target = bridge.target(report, config)
        facts["kind"] = answer["kind"] = target.kind
        message = batch.message = Message(
            message_id, placed_digest(digest, target), seen.first_seen
        )
        if message.digest == seen.written_as:
            batch.nothing_to_record()
            return answer | {"outcome": "already_written"}
        plan = plan_writes(report, target, message_id, now, made_at=made_at, grace=grace)
        count_windows(target.kind, incomplete=len(plan.left_out), waiting=len(plan.waiting))
        if plan.left_out:
            answer["incomplete"] = plan.left_out
            log_event(
                "incomplete windows left out",
                logging.WARNING,
                incomplete=plan.left_out,
                hint="a later report that holds them in full writes them",
            )
        # Deciding what to send, sending and recording it under one lock keeps a newer report
        # for the same windows, waiting in this worker, from being undone by this one.
        with batch.writing(target, complete=not plan.waiting):
            pending = bridge.ledger.pending(plan.writes, target, message)
            warn_skipped(pending)
            count_windows(target.kind, superseded=pending.superseded, kept=pending.kept)
            write_report(bridge.stripe, bridge.caches.subscriptions, target, pending.writes,
                         batch.accepted, planned_refusals=plan.refused,
                         waiting=plan.waiting)  # fmt: skip
    sent, skipped = len(pending.writes), len(plan.writes) - len(pending.writes)
    if plan.waiting:
        raise WindowsWaiting(
            f"{len(plan.waiting)} of {len(plan.writes) + len(plan.waiting)} windows must wait: "
            f"{plan.waiting[0]['window_start']} {plan.waiting[0]['reason']}",
            "Nothing to do: Svix retries, and the windows are written once they can be.",
            written=sent,
            waiting=plan.waiting,
        )
    if left_out := len(plan.left_out) + pending.superseded + pending.kept:
        log_event(
            "answered 200 with windows left out",
            logging.WARNING,
            left_out=left_out,
            incomplete=len(plan.left_out),
            superseded=pending.superseded,
            kept=pending.kept,
            hint="these windows are not billed by this report; see bridge_windows_total",
        )
    return answer | {"sent": sent, "skipped": skipped}


def placed_digest(body_digest: str, target: Target) -> str:
    """What "already written" means: this body, to these Stripe objects, in this Stripe account.

    A resend after a mapping fix (another target, multiplier or rounding), or after switching from
    a test key to a live one, is another meaning, so it is written again.
    """
    # The conversion is part of the meaning: a resend after a multiplier fix writes again.
    mapping = target.mapping
    meaning = f"{body_digest}\n{target.place}\n{mapping.multiplier}\n{mapping.rounding}"
    return hashlib.sha256(meaning.encode()).hexdigest()


def warn_skipped(pending: Pending) -> None:
    """Says when the ledger kept a window from being written again, and why."""
    if pending.superseded:
        log_event(
            "windows kept from a newer report",
            logging.WARNING,
            skipped=pending.superseded,
            hint="a report seen later set these windows; this older one does not undo it",
        )
    if pending.kept:
        log_event(
            "raw meter kept the window's first event",
            logging.WARNING,
            skipped=pending.kept,
            hint="a correction of these windows, if it was one, is not applied",
        )
