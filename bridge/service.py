"""The bridge: everything a webhook needs, and what happens to a verified event."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import stripe
from svix.webhooks import Webhook

from bridge import identity
from bridge.config import Config
from bridge.config_source import ConfigSource
from bridge.errors import ConfigError, StripeRefused, WindowsWaiting
from bridge.ledger import Ledger, Message, Pending, Seen, writing
from bridge.ledger_postgres import PostgresLedger
from bridge.ledger_sqlite import SqliteLedger
from bridge.logs import count_windows, log_event
from bridge.planning import Plan, plan_writes
from bridge.quantities import check_negative
from bridge.report import Report, decode_json, event_type, parse_report
from bridge.settings import Settings, config_path, settings_from_env
from bridge.stripe_api import make_stripe_client
from bridge.stripe_health import KeyHealth
from bridge.stripe_objects import StripeCaches
from bridge.targets import Target, claim_for, claim_refusal, clash, resolve_target, still_mapped
from bridge.writing import Sent, write_facts, write_report


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
    # The wall clock a report's windows are judged by (in the future? begun? past their period's
    # grace?): injectable so that a test can stand it at a chosen moment.
    clock: Callable[[], float] = time.time

    def target(self, report: Report, config: Config) -> Target:
        """The Stripe object that bills a report, found with this bridge's client and caches."""
        return resolve_target(report, config, self.stripe, self.caches)


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
    ledger = open_ledger(settings.state_path, settings.database_url)
    return Bridge(settings, config, client, StripeCaches(), ledger, verifiers, health)


def open_ledger(state_path: str, database_url: str | None) -> Ledger:
    """The ledger the environment names: PostgreSQL if DATABASE_URL is set, else SQLite."""
    return PostgresLedger(database_url) if database_url else SqliteLedger(state_path)


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
    digest = identity.body_digest(body)
    event = decode_json(body)
    kind = event_type(event)
    if kind != "report.meter":
        facts["type"] = kind
        return {"outcome": "ignored", "type": kind, "message_id": message_id}
    now = datetime.fromtimestamp(bridge.clock(), UTC)
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
    ledger = bridge.ledger
    seen = ledger.begin(message_id, sent_at)  # a 503 if the ledger cannot be reached
    target = bridge.target(report, config)
    facts["kind"] = answer["kind"] = target.kind
    mapping = target.mapping
    meaning = identity.message_digest(digest, target.place, mapping.multiplier, mapping.rounding)
    message = Message(message_id, meaning, seen.first_seen)
    if message.digest == seen.written_as:
        return answer | {"outcome": "already_written"}
    plan = plan_writes(
        report, target, message_id, now, made_at=made_at(seen, sent_at, now), grace=grace
    )
    check_claim(ledger, target, report, config)  # once the report could be written
    count_windows(target.kind, incomplete=len(plan.left_out), waiting=len(plan.waiting))
    if plan.left_out:
        answer["incomplete"] = plan.left_out
        log_event(
            "incomplete windows left out",
            logging.WARNING,
            incomplete=plan.left_out,
            hint="a later report that holds them in full writes them",
        )
    # A message seen for the first time has written nowhere: one ledger query fewer a webhook.
    if not seen.first_attempt and (elsewhere := written_elsewhere(ledger, message_id, target)):
        answer["written_elsewhere"] = elsewhere
    # The newer-wins check, the writes and their record: one critical section, in one worker of
    # one replica at a time, so a newer report for the same windows is never undone by this one.
    with writing(ledger, message, target) as progress:
        pending = ledger.pending(plan.writes, target.place, target.raw_meter, message)
        warn_skipped(pending)
        count_windows(target.kind, superseded=pending.superseded, kept=pending.kept)
        sent = write_report(
            bridge.stripe, bridge.caches.subscriptions, target, pending.writes, progress.accepted,
            on_fresh_key=lambda write, key: ledger.replace_key(write.key, key), clock=bridge.clock,
        )  # fmt: skip
        progress.done = sent.complete and not plan.refused and not plan.waiting
    return outcome(answer, target, plan, pending, sent)


def outcome(
    answer: dict[str, Any], target: Target, plan: Plan, pending: Pending, sent: Sent
) -> dict[str, Any]:
    """The attempt's one answer: 200 with what was sent, or the error that outranks the others
    (Stripe unavailable, then refused windows, then windows that wait)."""
    if sent.stopped is not None:
        raise sent.stopped
    if refused := plan.refused + sent.refused:
        count_windows(target.kind, refused=len(refused))
        total = len(plan.writes) + len(plan.refused)
        raise StripeRefused(
            f"{len(refused)} of {total} windows refused: {refused[0]['message']}",
            refused[0]["hint"],
            refused=refused,
            **({"waiting": plan.waiting} if plan.waiting else {}),  # a 422 outranks their 503
        )
    if plan.waiting:
        raise WindowsWaiting(
            f"{len(plan.waiting)} of {len(plan.writes) + len(plan.waiting)} windows must wait: "
            f"{plan.waiting[0]['window_start']} {plan.waiting[0]['reason']}",
            "Nothing to do: Svix retries, and the windows are written once they can be.",
            written=sent.written,
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
    return answer | {"sent": sent.written, "skipped": len(plan.writes) - len(pending.writes)}


def made_at(seen: Seen, sent_at: float | None, now: datetime) -> datetime:
    """When OpenMeter made the report, as far as the bridge can know: no later than the first
    attempt the ledger saw, by the sender's clock (its svix-timestamp), nor than this attempt.
    The host's clock judges only a replay (no Svix timestamp): a host whose clock is slow must not
    make a window the sender saw end look partial."""
    sent = [moment for moment in (seen.first_sent, sent_at) if moment is not None]
    return datetime.fromtimestamp(min(sent), UTC) if sent else now


def check_claim(ledger: Ledger, target: Target, report: Report, config: Config) -> None:
    """Refuses a report whose meter events would clash with those of the subject (or mapped
    meter) that first claimed the customer's meter, in any worker or replica (a 422)."""
    claim = claim_for(target, report.subject, report.meter)
    if claim is None or target.meter is None:
        return
    held = ledger.claim(claim, lambda held: still_mapped(held, config))
    if held != claim and clash(held, claim, target.meter):
        raise claim_refusal(held, claim)


def written_elsewhere(ledger: Ledger, message_id: str, target: Target) -> list[dict[str, str]]:
    """The windows this message already wrote to another place (the subject was remapped between
    two attempts): named in the answer and a warning, so that an operator can clear them."""
    found = [
        {"place": e.place, "timestamp": datetime.fromtimestamp(e.timestamp, UTC).isoformat()}
        for e in ledger.written_elsewhere(message_id, target.place)
    ]
    if found:
        log_event(
            "message already wrote to another place",
            logging.WARNING,
            place=target.place,
            written_elsewhere=found,
            hint="the subject was remapped; clear these windows in Stripe if they were wrong",
        )
    return found


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
