"""Settings from the environment: secrets and addresses, every problem named (never a value)."""

from __future__ import annotations

import binascii
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import stripe

from bridge.errors import ConfigError
from bridge.pacing import default_rate
from bridge.transport import is_loopback_url, proxy_problems

# Invoices finalize 1 hour after the period ends unless the account sets up to 72 hours; until then
# usage for the previous period is still billed (docs.stripe.com/billing/subscriptions/usage-based/
# configure-grace-period).
DEFAULT_INVOICE_GRACE_SECONDS = 3600
MAX_INVOICE_GRACE_SECONDS = 72 * 3600


@dataclass(frozen=True)
class Settings:
    """What the environment provides: secrets and addresses."""

    stripe_api_key: str
    webhook_secrets: tuple[str, ...]
    config_path: str = "config.yaml"
    stripe_api_base: str | None = None
    port: int = 8080
    trusted_proxies: int = 0
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    state_path: str = "state/bridge.sqlite3"
    database_url: str | None = (
        None  # PostgreSQL, for replicas; never logged (it may hold a password)
    )
    time_budget: float = 12.0
    invoice_grace: int = DEFAULT_INVOICE_GRACE_SECONDS
    stripe_max_rate: float = 20.0  # requests/s for every worker and replica together
    workers: int = 2  # gunicorn's WEB_CONCURRENCY: the share of each without a shared budget


def settings_from_env(
    environ: Mapping[str, str],
    required: Sequence[str] = ("STRIPE_API_KEY", "OPENMETER_WEBHOOK_SECRET"),
) -> Settings:
    """Reads the settings, naming every missing or malformed variable (never its value); the egress
    proxy comes from the process environment, where the transport reads it."""
    problems = []
    api_key = environ.get("STRIPE_API_KEY", "").strip()
    if not api_key and "STRIPE_API_KEY" in required:
        problems.append("STRIPE_API_KEY is not set: give the Stripe secret (sk_) or restricted key")
    elif api_key and not api_key.startswith(("sk_", "rk_")):
        problems.append("STRIPE_API_KEY must be a secret (sk_...) or restricted (rk_...) key")
    secrets = tuple(environ.get("OPENMETER_WEBHOOK_SECRET", "").split())
    if not secrets and "OPENMETER_WEBHOOK_SECRET" in required:
        problems.append("OPENMETER_WEBHOOK_SECRET is not set: give the endpoint's whsec_ secret")
    for number, secret in enumerate(secrets, start=1):
        if problem := _webhook_secret_problem(secret):
            problems.append(f"OPENMETER_WEBHOOK_SECRET: secret #{number} {problem}")
    api_base = environ.get("STRIPE_API_BASE", "").strip() or None
    if api_base and not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", api_base):
        problems.append("STRIPE_API_BASE must be an http(s) URL such as https://api.stripe.com")
    elif api_base and not (api_base.startswith("https://") or is_loopback_url(api_base)):
        problems.append(
            "STRIPE_API_BASE must be https:// (http:// only to localhost, 127.0.0.0/8 or ::1):"
            " plain HTTP would carry the Stripe secret key in clear text"
        )
    problems.extend(proxy_problems(api_base or stripe.DEFAULT_API_BASE))
    port = environ.get("PORT", "8080").strip()
    if not (re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536):
        problems.append("PORT must be a TCP port number (1-65535)")
    budget = environ.get("TIME_BUDGET_SECONDS", "12").strip()
    if not (re.fullmatch(r"\d+(\.\d+)?", budget) and 1 <= float(budget) <= 12):
        problems.append(
            "TIME_BUDGET_SECONDS must be between 1 and 12 (Svix waits 15 s; the rest is margin)"
        )
    grace = environ.get("INVOICE_GRACE_SECONDS", str(DEFAULT_INVOICE_GRACE_SECONDS)).strip()
    if not (re.fullmatch(r"[0-9]{1,6}", grace) and int(grace) <= MAX_INVOICE_GRACE_SECONDS):
        problems.append(
            "INVOICE_GRACE_SECONDS must be 0-259200: your Stripe account's invoice finalization "
            "grace period (Stripe's default is 3600)"
        )
    rate = environ.get("STRIPE_MAX_RATE", "").strip() or str(default_rate(api_key))
    if not (re.fullmatch(r"\d{1,5}(\.\d+)?", rate) and float(rate) >= 0.1):
        problems.append(
            "STRIPE_MAX_RATE must be the Stripe requests per second this bridge may use (0.1 or "
            "more; Stripe allows an account 100/s live and 25/s in a sandbox, for everything)"
        )
    state_path = environ.get("STATE_PATH", "state/bridge.sqlite3").strip()
    database_url = environ.get("DATABASE_URL", "").strip() or None
    if database_url and not re.fullmatch(r"postgres(ql)?://\S*", database_url):
        problems.append("DATABASE_URL must be a postgresql:// URL (the replicas' shared ledger)")
    elif not state_path and not database_url:
        problems.append(
            "STATE_PATH is empty: give the ledger's SQLite file (on a persistent volume), or "
            "DATABASE_URL for a PostgreSQL ledger; the bridge cannot run without a ledger"
        )
    workers = environ.get("WEB_CONCURRENCY", "2").strip()
    proxies = environ.get("TRUSTED_PROXIES", "0").strip()
    if not re.fullmatch(r"[0-9]", proxies):
        problems.append("TRUSTED_PROXIES must be the number of proxies in front (0-9)")
    # gunicorn's own variable and default: one list says which peers may set forwarding headers.
    allow = tuple(a.strip() for a in environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1").split(","))
    if not all(address == "*" or _is_network(address) for address in allow):
        problems.append(
            "FORWARDED_ALLOW_IPS must be IP addresses or networks, comma-separated, or *"
        )
    if problems:
        raise ConfigError(problems)
    return Settings(
        stripe_api_key=api_key,
        webhook_secrets=secrets,
        config_path=config_path(environ),
        stripe_api_base=api_base,
        port=int(port),
        trusted_proxies=int(proxies),
        forwarded_allow_ips=allow,
        state_path=state_path,
        database_url=database_url,
        time_budget=float(budget),
        invoice_grace=int(grace),
        stripe_max_rate=float(rate),
        workers=int(workers) if workers.isdigit() and int(workers) > 0 else 2,
    )


def _is_network(address: str) -> bool:
    """Whether address is an IP address or a CIDR network."""
    try:
        ipaddress.ip_network(address, strict=False)
        return True
    except ValueError:
        return False


def config_path(environ: Mapping[str, str]) -> str:
    """Where config.yaml is: CONFIG_PATH, or the working directory."""
    return environ.get("CONFIG_PATH", "").strip() or "config.yaml"


# Svix makes endpoint keys of 24 random bytes and takes none shorter (svix-webhooks,
# server/svix-server/src/core/types/mod.rs: EndpointSecret::KEY_SIZE = 24): less is a cut-off copy.
MIN_SECRET_BYTES = 24


def _webhook_secret_problem(secret: str) -> str | None:
    """What is wrong with a whsec_ secret (never quoting it), or None if its key is usable."""
    try:
        key = binascii.a2b_base64(secret.removeprefix("whsec_") + "==")
    except binascii.Error:
        key = b""
    if not secret.startswith("whsec_") or not key:
        return "is not a whsec_ secret in base64"
    if len(key) < MIN_SECRET_BYTES:
        return (
            f"decodes to fewer than Svix's {MIN_SECRET_BYTES} bytes: "
            "copy the endpoint's whole signing secret"
        )
    return None
