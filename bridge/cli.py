"""The command line: flask --app app check-config | replay."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import click

from bridge.config import Config, load_config
from bridge.errors import BridgeError, ConfigError
from bridge.online_check import check_online
from bridge.service import make_bridge, process_event
from bridge.settings import config_path, settings_from_env
from bridge.sizing import Sizing
from bridge.stripe_api import make_stripe_client


@click.command("check-config")
@click.argument("path", required=False)
@click.option("--online", is_flag=True, help="Also ask Stripe about every price and subscription.")
@click.option(
    "--windows", default=24, show_default=True, type=click.IntRange(1),
    help="Windows in each report, for the sizing (24: a day of hourly windows).",
)  # fmt: skip
def check_config_command(path: str | None, online: bool, windows: int) -> None:
    """Validate a config file (default $CONFIG_PATH, then config.yaml); exit 1 on any problem."""
    path = path or config_path(os.environ)
    try:
        config = load_config(path)
    except ConfigError as error:
        click.echo(f"{path}: {len(error.problems)} problem(s)")
        for problem in error.problems:
            click.echo(f"  {problem}")
        raise SystemExit(1) from None
    click.echo(f"{path}: valid ({len(config.meters)} meters, {len(config.subjects)} subjects)")
    for warning in coarsening_warnings(config):
        click.echo(f"  {warning}")
    for line in sizing_lines(config, windows):
        click.echo(line)
    if online:
        try:
            client = make_stripe_client(settings_from_env(os.environ, ["STRIPE_API_KEY"]))
        except ConfigError as error:
            raise click.ClickException("; ".join(error.problems)) from None
        rows = check_online(client, config)
        width = max(len(row[0]) for row in rows) if rows else 0
        for entry, verdict, detail in rows:
            click.echo(f"  {entry:<{width}}  {verdict:<8}  {detail}")
        if any(verdict == "problem" for _, verdict, _ in rows):
            raise SystemExit(1)


def sizing_lines(config: Config, windows: int) -> list[str]:
    """The month-end sizing for this config at the environment's STRIPE_MAX_RATE (or the default
    for the key's mode), each subject reporting each meter at once."""
    try:
        settings = settings_from_env(os.environ, ())
    except ConfigError as error:
        return [f"sizing: skipped, the environment is not valid: {'; '.join(error.problems)}"]
    reports = len(config.subjects) * len(config.meters)
    sizing = Sizing(settings.stripe_max_rate, settings.time_budget, reports, windows,
                    settings.invoice_grace)  # fmt: skip
    return sizing.lines()


def coarsening_warnings(config: Config) -> list[str]:
    """Mappings that round each window on its own, so that the error grows with the windows."""
    # transform_quantity divides the reported usage, then rounds up or down, before the price
    # applies: docs.stripe.com/billing/subscriptions/usage-based/transform-quantities
    warnings = []
    for slug, mapping in config.meters.items():
        reasons = [f"multiplier {mapping.multiplier} is below 1"] if mapping.multiplier < 1 else []
        if mapping.rounding:
            reasons.append(f"rounding {mapping.rounding} rounds fractional values")
        if reasons:
            warnings.append(
                f"meters.{slug}: warning: {' and '.join(reasons)}, so each window is rounded to a "
                "whole unit on its own (on a legacy usage-record price; with rounding, on a meter "
                "price too) and the error grows with the number of windows. Send whole small "
                "units (a multiplier of 1 or more, no rounding) and set the price's "
                "transform_quantity (divide_by, round): Stripe converts the period's total once."
            )
    return warnings


@click.command("replay")
@click.argument("file", type=click.File("rb"))
@click.option("--dry-run", is_flag=True, help="Print what would be written; write nothing.")
@click.option("--message-id", help="The id to derive idempotency keys from (default: a new one).")
def replay_command(file: Any, dry_run: bool, message_id: str | None) -> None:
    """Push a saved report body through the webhook's path, without a signature or time limit."""
    try:
        bridge = make_bridge(os.environ, ["STRIPE_API_KEY"])
    except ConfigError as error:
        raise click.ClickException("; ".join(error.problems)) from None
    body = file.read()
    # A fresh id makes a replay a new message: it overwrites, as a correction would.
    message_id = message_id or f"replay-{int(time.time())}-{hashlib.sha256(body).hexdigest()[:12]}"
    facts: dict[str, Any] = {}
    try:
        answer = process_event(bridge, body, message_id, facts, dry_run=dry_run)
    except BridgeError as error:
        click.echo(json.dumps(error.body(), indent=2))
        raise SystemExit(1) from None
    for write in answer.pop("writes", []):
        click.echo("would write " + json.dumps(write))
    click.echo(json.dumps(answer, indent=2))
