"""OpenMeter -> Stripe usage bridge.

Verifies a Svix-signed OpenMeter usage report, maps its meter to a Stripe price and its subject to a
Stripe subscription (config.yaml), writes every usage window to Stripe, and only then answers 200.
Any failure answers non-2xx so that Svix retries; every write is idempotent, so retries never
count twice.
"""

from __future__ import annotations

import binascii
import contextvars
import hashlib
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import (
    ROUND_CEILING,
    ROUND_FLOOR,
    ROUND_HALF_EVEN,
    ROUND_HALF_UP,
    Context,
    Decimal,
    InvalidOperation,
)
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import click
import requests
import stripe
import urllib3
import yaml
from flask import Flask, Response, jsonify, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from svix.webhooks import Webhook, WebhookVerificationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# Stripe removed usage records in 2025-03-31.basil; this is the last API version that has them.
# Unpinned calls go at stripe-python 16.1's 2026-10-28.endive. "endive spec" below: stripe/openapi
# latest/openapi.spec3.json at 18fa2cc7 (2026-09-30.endive), trimmed into tests/stripe_openapi.json.
USAGE_RECORDS_API_VERSION = "2025-02-24.acacia"
MAX_BODY_BYTES = 1024 * 1024
STRIPE_READ_TIMEOUT = 8.0
STRIPE_MAX_ATTEMPTS = 3
CACHE_TTL_SECONDS = 300.0
CACHE_MAX_ENTRIES = 10_000
# Invoices finalize 1 hour after the period ends unless the account sets up to 72 hours; until then
# usage for the previous period is still billed (docs.stripe.com/billing/subscriptions/usage-based/
# configure-grace-period).
DEFAULT_INVOICE_GRACE_SECONDS = 3600
MAX_INVOICE_GRACE_SECONDS = 72 * 3600

log = logging.getLogger("bridge")


# --- errors: each one is an answer an operator reads in Svix's dashboard ----------------------


class ConfigError(Exception):
    """The environment or config.yaml is unusable; every problem is named by its path."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class BridgeError(Exception):
    """A webhook that cannot be accepted (yet), with the status and advice Svix will show."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, hint: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def body(self) -> dict[str, Any]:
        """The JSON answer for this error."""
        return {"error": self.code, "message": self.message, "hint": self.hint, **self.details}


class BadSignature(BridgeError):
    status, code = 401, "bad_signature"


class BadRequest(BridgeError):
    status, code = 400, "bad_payload"


class PayloadTooLarge(BridgeError):
    status, code = 413, "payload_too_large"


class Unmapped(BridgeError):
    status, code = 422, "not_configured"


class StripeRefused(BridgeError):
    status, code = 422, "stripe_refused"


class StripeUnavailable(BridgeError):
    status, code = 503, "stripe_unavailable"


class SharedCustomer(BridgeError):
    status, code = 422, "shared_customer"


class WindowsWaiting(BridgeError):
    status, code = 503, "windows_waiting"


# --- logs and metrics ------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; json.dumps escapes anything a sender puts in a name."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's message and fields as a JSON line."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def log_event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Logs one event with structured fields."""
    log.log(level, message, extra={"fields": fields})


def _configure_logging() -> None:
    """Sends the bridge's log lines to stderr as JSON, unless something configured it already."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


# Under gunicorn these live in files shared by the workers (PROMETHEUS_MULTIPROC_DIR).
WEBHOOKS = Counter("bridge_webhooks_total", "Webhooks answered.", ["outcome", "status"])
WINDOWS_WRITTEN = Counter("bridge_windows_written_total", "Windows Stripe accepted.", ["kind"])
STRIPE_SECONDS = Histogram(
    "bridge_stripe_request_seconds",
    "Stripe request latency.",
    ["operation"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STRIPE_ERRORS = Counter("bridge_stripe_errors_total", "Stripe errors.", ["error_class"])
CONFIG_RELOADS = Counter("bridge_config_reloads_total", "config.yaml reloads.", ["result"])


def metrics_text() -> bytes:
    """Every worker's metrics in Prometheus' text format."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


# --- configuration ---------------------------------------------------------------------------

ROUNDING_MODES = {"up": ROUND_CEILING, "down": ROUND_FLOOR, "nearest": ROUND_HALF_UP}
PRICE_ID = re.compile(r"price_[A-Za-z0-9]+")
SUBSCRIPTION_ID = re.compile(r"sub_[A-Za-z0-9]+")


@dataclass(frozen=True)
class MeterMapping:
    """Where one OpenMeter meter goes in Stripe, and how its values are converted."""

    price: str
    multiplier: Decimal = Decimal(1)
    rounding: str | None = None


@dataclass(frozen=True)
class Config:
    """config.yaml: OpenMeter meter slug -> price, OpenMeter subject -> subscription."""

    meters: Mapping[str, MeterMapping]
    subjects: Mapping[str, str]


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
    state_path: str | None = "state/bridge.sqlite3"
    time_budget: float = 12.0
    invoice_grace: int = DEFAULT_INVOICE_GRACE_SECONDS

    @property
    def account(self) -> str:
        """Which Stripe account the key opens, as the ledger records it: a hash, never the key.

        A hash needs no call and no permission to read the account (restricted keys may lack
        it). A rotated key of the same account looks like another account: that costs one
        rewrite, which is idempotent (a `set`, a bucket's newest event, a raw meter identifier).
        """
        digest = hashlib.sha256(b"stripe-account\n" + self.stripe_api_key.encode())
        return digest.hexdigest()[:24]


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
    elif api_base and not (api_base.startswith("https://") or _is_loopback_url(api_base)):
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
        state_path=environ.get("STATE_PATH", "state/bridge.sqlite3").strip() or None,
        time_budget=float(budget),
        invoice_grace=int(grace),
    )


def _is_http_proxy(url: str) -> bool:
    """Whether url names a plain-HTTP CONNECT proxy, the only kind the Stripe transport speaks."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        return parts.scheme == "http" and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, or out of range
        return False


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


def load_config(path: str) -> Config:
    """Reads and validates config.yaml, listing every bad entry by its path."""
    return parse_config_file(read_file(path))


def read_file(path: str) -> bytes:
    """A config file's bytes, or a ConfigError naming it."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error}"]) from error


def parse_config_file(raw: bytes) -> Config:
    """Validates config.yaml's bytes."""
    try:
        document = yaml.compose(raw.decode("utf-8"), Loader=yaml.SafeLoader)
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError([f"not valid YAML: {error}"]) from error
    problems: list[str] = []
    if document is not None:
        _find_duplicate_keys(document, "", problems)
    if problems:
        raise ConfigError(problems)
    return parse_config(yaml.safe_load(raw), problems)


class ConfigSource:
    """config.yaml as it is now: re-read when its bytes change, the last good version kept.

    Comparing content (not mtime or inode) catches every way of replacing the file: an edit, an
    atomic rename, a Kubernetes ConfigMap's symlink swap. A new version is taken only once it is
    stable, so that a file being written in place is never taken half-written.
    """

    CHECK_EVERY_SECONDS = 1.0
    # The same bytes, read again at least this long after they were first read (or read from a
    # file not modified for that long), are a stable version: a write in place is seldom torn for
    # that long, and renames are never torn.
    STABLE_SECONDS = 1.0

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        raw = read_file(path)
        self.config, self.checksum = parse_config_file(raw), _sha256(raw)
        self.loaded_at = datetime.now(UTC)
        self.error: str | None = None
        self._rejected: str | None = None  # the checksum of the last invalid version, logged once
        self._candidate: tuple[str, float] | None = None  # a new version, and when first read
        self._checked_at = clock()
        self._lock = threading.Lock()

    def current(self) -> Config:
        """The newest valid config, checking the file at most once a second."""
        if self._clock() - self._checked_at >= self.CHECK_EVERY_SECONDS:
            # Requests that arrive while another thread checks wait for it (reading the file takes
            # well under a millisecond): none answers from a config older than its second.
            with self._lock:
                if self._clock() - self._checked_at >= self.CHECK_EVERY_SECONDS:
                    self._checked_at = self._clock()
                    self._reload_if_changed()
        return self.config

    def watch(self) -> None:
        """Checks the file every second in a thread of this process, requests or not.

        Without it an idle worker would serve, and /readyz show, the old version until a request
        came. gunicorn's post_worker_init calls this in each worker: threads do not survive fork.
        """

        def check_forever() -> None:
            while True:
                time.sleep(self.CHECK_EVERY_SECONDS)
                self.current()

        threading.Thread(target=check_forever, name="config-watch", daemon=True).start()

    def _reload_if_changed(self) -> None:
        """Swaps in a changed file if it is valid; otherwise keeps serving the old one."""
        try:
            raw = read_file(self.path)
        except ConfigError as error:
            self._reject("unreadable", error)
            return
        checksum = _sha256(raw)
        if checksum == self.checksum:
            self.error = self._rejected = self._candidate = None  # an edit was undone
            return
        if checksum == self._rejected or not self._stable(checksum):
            return
        try:
            config = parse_config_file(raw)
            _keeps_something(self.config, config)
        except ConfigError as error:
            self._reject(checksum, error)
            return
        self.config, self.checksum, self.loaded_at = config, checksum, datetime.now(UTC)
        self.error = self._rejected = None
        CONFIG_RELOADS.labels("loaded").inc()
        log_event("config reloaded", path=self.path, checksum=checksum)

    def _stable(self, checksum: str) -> bool:
        """Whether the version just read was read STABLE_SECONDS ago already, or had not been
        modified for that long (a second more, for filesystems that keep whole seconds)."""
        now = self._clock()
        if self._candidate is None or self._candidate[0] != checksum:
            self._candidate = (checksum, now)
        if now - self._candidate[1] >= self.STABLE_SECONDS:
            return True
        try:  # stat after the read: a write since then makes the file look new, never old
            return time.time() - os.stat(self.path).st_mtime >= self.STABLE_SECONDS + 1
        except OSError:
            return False

    def _reject(self, version: str, error: ConfigError) -> None:
        """Keeps the last good config, and says so once per bad version of the file."""
        if self._rejected != version:
            self._rejected, self.error = version, "; ".join(error.problems)
            CONFIG_RELOADS.labels("failed").inc()
            log_event(
                "config reload failed", logging.ERROR, path=self.path, problems=error.problems
            )

    def status(self) -> dict[str, Any]:
        """What /readyz says about the config."""
        return {
            "path": self.path,
            "checksum": self.checksum,
            "loaded_at": self.loaded_at.isoformat(),
            "last_reload_error": self.error,
        }


def _keeps_something(loaded: Config, new: Config) -> None:
    """Refuses a reload that empties a section: far likelier a truncated file than an intent."""
    emptied = [
        f"every {noun}"
        for noun, before, after in [
            ("subject", loaded.subjects, new.subjects),
            ("meter", loaded.meters, new.meters),
        ]
        if before and not after
    ]
    if emptied:
        raise ConfigError(
            [
                f"the new version would drop {' and '.join(emptied)}: refused as a file cut off "
                "or emptied mid-write would be; to remove them all, restart with the new file"
            ]
        )


def _sha256(raw: bytes) -> str:
    """A config version's checksum, as /readyz shows it."""
    return hashlib.sha256(raw).hexdigest()


def _find_duplicate_keys(node: yaml.Node, path: str, problems: list[str]) -> None:
    """Reports keys given twice in one mapping: YAML would silently keep the last one."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key_path = f"{path}.{key_node.value}" if path else str(key_node.value)
            if key_node.value in seen:
                line = key_node.start_mark.line + 1
                problems.append(f"{key_path}: duplicate key (line {line})")
            seen.add(key_node.value)
            _find_duplicate_keys(value_node, key_path, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _find_duplicate_keys(item, f"{path}[{index}]", problems)


def parse_config(document: Any, problems: list[str] | None = None) -> Config:
    """Validates a loaded config document; raises ConfigError listing every problem."""
    problems = [] if problems is None else problems
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(["(top level): must be a mapping with 'meters' and 'subjects'"])
    for key in document:
        if key not in ("meters", "subjects"):
            problems.append(f"{key}: unknown key (expected 'meters' and 'subjects')")
    meters = {
        slug: mapping
        for slug, entry in _section(document, "meters", problems).items()
        if (mapping := _meter_mapping(f"meters.{slug}", entry, problems))
    }
    subjects = {}
    for subject, subscription in _section(document, "subjects", problems).items():
        if isinstance(subscription, str) and SUBSCRIPTION_ID.fullmatch(subscription):
            subjects[subject] = subscription
        else:
            problems.append(f"subjects.{subject}: must be a Stripe subscription ID (sub_...)")
    # Two entries on one Stripe target would set the same windows and overwrite each other's usage.
    _shared_targets("meters", {slug: mapping.price for slug, mapping in meters.items()}, problems)
    _shared_targets("subjects", subjects, problems)
    if problems:
        raise ConfigError(problems)
    return Config(meters=meters, subjects=subjects)


def _shared_targets(section: str, targets: Mapping[str, str], problems: list[str]) -> None:
    """Flags every entry whose Stripe ID an earlier entry of the same section already uses."""
    first: dict[str, str] = {}
    for name, target in targets.items():
        if target in first:
            problems.append(
                f"{section}.{name}: {target} is already used by {section}.{first[target]}; "
                "both would set the same windows and overwrite each other"
            )
        first.setdefault(target, name)


def _section(document: dict[Any, Any], name: str, problems: list[str]) -> dict[str, Any]:
    """One top-level map, with its keys checked to be text."""
    section = document.get(name) or {}
    if not isinstance(section, dict):
        problems.append(f"{name}: must be a mapping")
        return {}
    for key in section:
        if not isinstance(key, str) or not key:
            problems.append(f"{name}.{key}: quote this key so that YAML reads it as text")
    return {key: value for key, value in section.items() if isinstance(key, str) and key}


def _meter_mapping(path: str, entry: Any, problems: list[str]) -> MeterMapping | None:
    """One meter entry, short (a price ID) or long (price, multiplier, rounding)."""
    if isinstance(entry, str):
        entry = {"price": entry}
    if not isinstance(entry, dict):
        problems.append(f"{path}: must be a price ID or a mapping with 'price'")
        return None
    count = len(problems)
    for key in entry:
        if key not in ("price", "multiplier", "rounding"):
            problems.append(f"{path}.{key}: unknown key (expected price, multiplier, rounding)")
    price = entry.get("price")
    if not isinstance(price, str) or not PRICE_ID.fullmatch(price):
        problems.append(f"{path}.price: must be a Stripe price ID (price_...)")
    multiplier = _multiplier(entry.get("multiplier", 1))
    if multiplier is None:
        problems.append(f"{path}.multiplier: must be a positive number such as 0.001")
    rounding = entry.get("rounding")
    if rounding is not None and rounding not in ROUNDING_MODES:
        problems.append(f"{path}.rounding: must be one of up, down, nearest")
    if len(problems) > count or not isinstance(price, str) or multiplier is None:
        return None
    return MeterMapping(price=price, multiplier=multiplier, rounding=rounding)


def _multiplier(raw: Any) -> Decimal | None:
    """A positive, finite multiplier of sane size, or None."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        return None
    if not value.is_finite() or not Decimal("1e-18") <= value <= Decimal("1e18"):
        return None
    return value


# --- verification ----------------------------------------------------------------------------


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


# --- parsing ---------------------------------------------------------------------------------

RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
NUMERIC_STRING = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")  # ASCII only
# Exact decimal arithmetic on any value that passes parse_value's bounds.
DECIMAL = Context(prec=80)
MAX_WINDOW = timedelta(days=32)  # OpenMeter's largest window is a month (31 days and a DST hour)


@dataclass(frozen=True)
class Window:
    """One usage window [start, end) and the summed value of its rows."""

    start: datetime
    end: datetime
    value: Decimal
    lowest: Decimal = Decimal(0)  # its most negative row (float noise, or really negative)


@dataclass(frozen=True)
class Report:
    """A parsed report.meter event: one subject's usage of one meter."""

    meter: str
    subject: str
    aggregation: str | None
    windows: tuple[Window, ...]
    query_from: datetime | None = None  # the range OpenMeter queried, when the report says
    query_to: datetime | None = None


def decode_json(body: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no duplicate keys, numbers as Decimal."""
    try:
        return json.loads(
            body,
            parse_float=_decimal,
            parse_constant=_reject_constant,
            object_pairs_hook=_reject_duplicates,
        )
    except (ValueError, ArithmeticError, RecursionError) as error:  # 1e999999999999: Decimal's
        raise BadRequest(
            f"body is not valid JSON: {str(error)[:200]}",
            "Send the OpenMeter report body unchanged.",
        ) from error


def _decimal(text: str) -> Decimal:
    """A number's text as Decimal; one too small for Decimal's exponent is zero (as for billing).

    Too large for it is an ArithmeticError, which the caller answers 400.
    """
    try:
        return Decimal(text)
    except ArithmeticError:
        if re.search(r"[eE]-[0-9]", text):  # 1e-99999999999999999999999999: finite, and tiny
            return Decimal(0)
        raise


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON, and not usage."""
    raise ValueError(f"{name} is not a number")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is ambiguous: which value would be billed?"""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def event_type(event: Any) -> str:
    """The event's type; OpenMeter may send other events than usage reports to this endpoint."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise BadRequest("body must be a JSON object with a string 'type'")
    return str(event["type"])


def parse_report(event: dict[str, Any], now: datetime) -> Report:
    """Validates a report.meter event and sums its rows per window."""
    meter = _object(event, "meter").get("slug")
    if not isinstance(meter, str) or not meter:
        raise BadRequest("meter.slug must be a non-empty string")
    aggregation = _object(event, "meter").get("aggregation")
    query_subject = _object(event, "query").get("subject")
    rows = event.get("usage")
    if not isinstance(rows, list):
        raise BadRequest("usage must be a list of rows")
    subjects: set[str] = set()
    sums: dict[tuple[datetime, datetime], Decimal] = {}
    lowest: dict[tuple[datetime, datetime], Decimal] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(f"usage[{index}] must be an object")
        subject = row.get("subject") or query_subject
        if not isinstance(subject, str) or not subject:
            raise BadRequest(f"usage[{index}].subject: missing (and no query.subject)")
        subjects.add(subject)
        start = parse_time(row.get("windowStart"), f"usage[{index}].windowStart")
        end = parse_time(row.get("windowEnd"), f"usage[{index}].windowEnd")
        if end <= start:
            raise BadRequest(f"usage[{index}]: windowEnd must be after windowStart")
        if end - start > MAX_WINDOW:
            raise BadRequest(f"usage[{index}]: a window cannot be longer than a month")
        if start > now:
            raise BadRequest(f"usage[{index}]: window starts in the future ({row['windowStart']})")
        value = parse_value(row.get("value"), f"usage[{index}].value")
        sums[start, end] = DECIMAL.add(sums.get((start, end), Decimal(0)), value)
        lowest[start, end] = min(lowest.get((start, end), Decimal(0)), value)
    if not subjects and isinstance(query_subject, str) and query_subject:
        subjects.add(query_subject)
    if len(subjects) != 1:
        raise BadRequest("a report must be about exactly one subject", subjects=sorted(subjects))
    windows = tuple(
        Window(start, end, value, lowest[start, end])
        for (start, end), value in sorted(sums.items())
    )
    for earlier, later in itertools.pairwise(windows):
        if later.start < earlier.end:
            raise BadRequest(f"windows overlap: {earlier.start} and {later.start}")
    query = _object(event, "query")
    return Report(
        meter=meter,
        subject=subjects.pop(),
        aggregation=aggregation if isinstance(aggregation, str) else None,
        windows=windows,
        query_from=_optional_time(query.get("from"), "query.from"),
        query_to=_optional_time(query.get("to"), "query.to"),
    )


def _optional_time(raw: Any, path: str) -> datetime | None:
    """A timestamp the report may leave out (absent or null)."""
    return None if raw is None else parse_time(raw, path)


def _object(event: dict[str, Any], name: str) -> dict[str, Any]:
    """A nested object of the event, or a 400 naming it."""
    value = event.get(name)
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object")
    return value


def parse_time(raw: Any, path: str) -> datetime:
    """An RFC 3339 timestamp with a zone, in UTC."""
    if not isinstance(raw, str) or not RFC3339.fullmatch(raw):
        raise BadRequest(f"{path}: must be an RFC 3339 timestamp such as 2026-11-22T00:00:00Z")
    try:
        return datetime.fromisoformat(raw.upper().replace(" ", "T")).astimezone(UTC)
    except (ValueError, OverflowError) as error:  # OverflowError: year 1 or 9999 shifted to UTC
        raise BadRequest(f"{path}: {error}") from error


# Values are kept to 30 decimal places, far finer than any zero threshold (ZERO_BELOW): with at
# most 31 digits before the point, sums stay exact in DECIMAL's 80 digits.
VALUE_QUANTUM = Decimal("1e-30")


def parse_value(raw: Any, path: str) -> Decimal:
    """A usage value, from any finite JSON number or numeric string, to 30 decimal places.

    It may still be slightly negative (float noise): the target decides what is zero.
    """
    if isinstance(raw, bool) or not isinstance(raw, int | Decimal | str):
        raise BadRequest(f"{path}: must be a number or a numeric string")
    if isinstance(raw, str) and not NUMERIC_STRING.fullmatch(raw.strip()):
        raise BadRequest(f"{path}: {raw[:40]!r} is not a number")
    try:
        value = _decimal(raw.strip()) if isinstance(raw, str) else Decimal(raw)
    except ArithmeticError as error:  # an exponent beyond what Decimal holds
        raise BadRequest(f"{path}: value out of range") from error
    if value.is_zero() or value.adjusted() < -30:
        return Decimal(0)  # 0e99999 is zero, and so is what lies below every zero threshold
    if value.adjusted() > 30:  # far beyond any real meter
        raise BadRequest(f"{path}: value out of range")
    if value.as_tuple().exponent < -30:  # type: ignore[operator]
        return value.quantize(VALUE_QUANTUM, context=DECIMAL)
    return value


# --- talking to Stripe -----------------------------------------------------------------------

# Process-wide stripe settings, set once here at import. Telemetry would write an id under $HOME
# (unwritable, or unset, in a locked-down container).
stripe.enable_telemetry = False

T = TypeVar("T")
_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("deadline", default=math.inf)


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Bounds every Stripe call made inside, so that the answer reaches Svix in time."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left() -> float:
    """Seconds left in the current budget (infinite outside a webhook)."""
    return _deadline.get() - time.monotonic()


class BudgetHTTPClient(stripe.HTTPClient):
    """stripe's transport over urllib3's connection pool, each request's timeout cut to what is
    left of the webhook's budget (stripe's RequestsClient takes one timeout for every request)."""

    name = "urllib3"

    def __init__(self, proxy: str | None = None) -> None:
        super().__init__()
        # Idle connections kept per host: more than gunicorn's 16 threads a worker, so that none
        # is closed after use for want of room (urllib3 keeps one by default).
        options: dict[str, Any] = {"maxsize": 32, "ca_certs": stripe.ca_bundle_path}
        self._pool: urllib3.PoolManager
        if proxy is None:
            self._pool = urllib3.PoolManager(**options)
        else:
            # As requests does: the proxy URL's user and password, percent-decoded, go in the
            # CONNECT request's Proxy-Authorization; TLS then runs through the tunnel to Stripe.
            user, password = requests.utils.get_auth_from_url(proxy)
            auth = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}") if user else None
            self._pool = urllib3.ProxyManager(proxy, proxy_headers=auth, **options)

    def request(  # type: ignore[override]  # bytes, as stripe's own RequestsClient returns
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[bytes, int, Mapping[str, str]]:
        """One HTTP exchange; a network failure is stripe's retryable APIConnectionError."""
        timeout = urllib3.Timeout(total=min(STRIPE_READ_TIMEOUT, max(time_left(), 0.05)))
        try:
            response = self._pool.request(
                method.upper(),
                url,
                body=post_data,
                headers=headers,
                timeout=timeout,
                retries=False,  # call_stripe retries
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as error:
            # As stripe's RequestsClient: a certificate that does not verify is not retried.
            retry = not isinstance(error, urllib3.exceptions.SSLError)
            message = f"Stripe unreachable: {type(error).__name__}: {error}"
            raise stripe.APIConnectionError(message, should_retry=retry) from error  # type: ignore[no-untyped-call]
        # The headers stay case-insensitive: stripe looks Request-Id up in any case.
        return response.data, response.status, response.headers

    def request_stream(self, *args: Any, **kwargs: Any) -> Any:
        """Streams are for file downloads, which the bridge never makes."""
        raise NotImplementedError

    def close(self) -> None:
        """Closes every pooled connection."""
        self._pool.clear()


def egress_proxy(url: str) -> str | None:
    """The proxy requests would take from the process environment for url (None: direct):
    lowercase https_proxy over HTTPS_PROXY, then all_proxy, unless NO_PROXY names the host."""
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if not proxy:
        return None
    return str(requests.utils.prepend_scheme_if_needed(proxy, "http"))  # type: ignore[no-untyped-call]


def proxy_problems(url: str) -> list[str]:
    """What is wrong with the egress proxy the Stripe transport would take for url, read from the
    process environment as requests reads it (whatever settings_from_env was given)."""
    environ = os.environ
    scheme = urllib.parse.urlsplit(url).scheme
    for name in (scheme, "all"):
        lower, upper = f"{name}_proxy", f"{name.upper()}_PROXY"
        if environ.get(lower) == "" and environ.get(upper):
            return [
                f"{lower} is set but empty, which turns {upper} off (the lowercase one wins, as "
                f"in curl and requests): unset {lower} to use the proxy, or {upper} to go direct"
            ]
    try:
        proxy = egress_proxy(url)
    except ValueError:  # urllib3's LocationParseError: no URL at all
        proxy = ""
    if proxy is not None and not _is_http_proxy(proxy):
        return [
            f"{scheme.upper()}_PROXY (or {scheme}_proxy, all_proxy) must be "
            "http://[user:password@]host[:port]: a CONNECT proxy (socks and https proxies are "
            "not supported)"
        ]
    return []


def _is_loopback_url(url: str) -> bool:
    """Whether url's host is this machine: localhost, 127.0.0.0/8 or ::1."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_stripe_client(settings: Settings) -> stripe.StripeClient:
    """The one Stripe client: bounded timeouts, and no hidden retries (call_stripe retries)."""
    api_base = settings.stripe_api_base or stripe.DEFAULT_API_BASE
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses={"api": api_base},
        max_network_retries=0,
        # Every call the bridge makes goes to the API base: the proxy settings_from_env checked.
        http_client=BudgetHTTPClient(egress_proxy(api_base)),
    )


def call_stripe(operation: str, send: Callable[[], T]) -> T:
    """Runs one Stripe request, retrying what Stripe says is safe to retry while time is left."""
    # stripe's own retries (max_network_retries) sleep up to 5 s whatever is left of the budget.
    for attempt in range(1, STRIPE_MAX_ATTEMPTS + 1):
        if time_left() <= 0.1:
            raise StripeUnavailable(
                "time budget ran out before every window was written",
                "Svix will retry; writes already made are idempotent and will not count twice.",
            )
        try:
            with STRIPE_SECONDS.labels(operation).time():
                return send()
        except stripe.StripeError as error:
            STRIPE_ERRORS.labels(type(error).__name__).inc()
            delay = 0.25 * 2**attempt
            if attempt == STRIPE_MAX_ATTEMPTS or not _retryable(error) or time_left() < delay + 1:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def _retryable(error: stripe.StripeError) -> bool:
    """Stripe's retry rule: connection errors, 409 and 5xx, unless Stripe-Should-Retry says else."""
    # Restated: stripe's own copy is HTTPClient._should_retry, private and tied to its retry loop.
    if isinstance(error, stripe.APIConnectionError):
        return bool(error.should_retry)
    headers = {key.lower(): value for key, value in (error.headers or {}).items()}
    if "stripe-should-retry" in headers:
        return headers["stripe-should-retry"] == "true"
    status = error.http_status or 0
    return status == 409 or status >= 500


def classify(error: stripe.StripeError, **details: Any) -> BridgeError:
    """Turns a Stripe error into a retry (503) or a refusal (422), by its class and status."""
    stripe_code = getattr(error.error, "code", None) or error.code
    request_id = error.request_id
    if isinstance(error, stripe.AuthenticationError | stripe.PermissionError):
        return StripeUnavailable(
            "Stripe rejected the API key",
            "Fix STRIPE_API_KEY (it needs write access to usage); Svix will retry.",
            stripe_request_id=request_id,
            **details,
        )
    if isinstance(error, stripe.InvalidRequestError | stripe.IdempotencyError):
        return StripeRefused(
            f"Stripe refused the write: {error.user_message or error}",
            "Fix the subscription or price in Stripe, or the mapping in config.yaml; "
            "Svix retries for about a day.",
            stripe_code=stripe_code,
            stripe_request_id=request_id,
            **details,
        )
    return StripeUnavailable(
        f"Stripe is unavailable ({type(error).__name__}, status {error.http_status})",
        "Svix will retry; writes already made are idempotent and will not count twice.",
        stripe_request_id=request_id,
        **details,
    )


# --- mapping: which Stripe object bills a report ---------------------------------------------


@dataclass(frozen=True)
class Item:
    """A subscription item and what its price says about metering."""

    id: str
    usage_type: str | None
    aggregate_usage: str | None  # a legacy price's, read at USAGE_RECORDS_API_VERSION (fetch_price)
    meter: str | None
    period_start: int = 0  # the current billing period's start; usage records cannot go before it
    period_end: float = math.inf


# Subscription statuses that bill nothing more (of the status enum in Stripe's spec, endive).
ENDED_STATUSES = ("canceled", "incomplete_expired")


@dataclass(frozen=True)
class Subscription:
    """A Stripe subscription: whom it bills, its items by price, and whether it renews."""

    id: str
    customer: str
    items: Mapping[str, Item]
    status: str = "active"
    # stripe/openapi spec3 (2026-09-30.endive), schema `subscription`: start_date and
    # cancel_at_period_end are required; cancel_at and ended_at are nullable timestamps.
    start_date: int = 0
    cancel_at: int | None = None
    cancel_at_period_end: bool = False
    ended_at: int | None = None

    @property
    def ended(self) -> bool:
        """Whether it has ended: canceled, or expired before its first payment."""
        return self.status in ENDED_STATUSES or self.ended_at is not None

    def final_end(self, item: Item) -> float:
        """When billing stops for good, if that is within the item's current period; else inf."""
        if self.ended_at is not None:
            return self.ended_at
        if self.cancel_at is not None and self.cancel_at <= item.period_end:
            return self.cancel_at
        return item.period_end if self.cancel_at_period_end else math.inf


@dataclass(frozen=True)
class Price:
    """A price as USAGE_RECORDS_API_VERSION shows it: the only versions with aggregate_usage."""

    id: str
    usage_type: str | None
    aggregate_usage: str | None
    meter: str | None
    divide_by: int | None = None  # transform_quantity: Stripe divides the period's total usage
    round: str | None = None


@dataclass(frozen=True)
class Meter:
    """A Stripe Billing meter: how its events are named, keyed and aggregated."""

    id: str
    event_name: str
    customer_key: str
    value_key: str
    formula: str
    event_time_window: str | None
    active: bool


@dataclass(frozen=True)
class Target:
    """Where a report's windows go: a legacy item's usage records, or a meter's events."""

    subscription: Subscription
    item: Item
    mapping: MeterMapping
    meter: Meter | None
    account: str = ""  # a fingerprint of the Stripe account's key (Settings.account)

    @property
    def kind(self) -> str:
        """The Stripe API that takes the writes; discovered from the price, never configured."""
        return "meter_events" if self.meter else "usage_records"

    @property
    def stripe_object(self) -> str:
        """The object Stripe locks on a write: the item, or the customer's meter."""
        if self.meter:
            return f"{self.subscription.customer}/{self.meter.id}"
        return self.item.id

    @property
    def place(self) -> str:
        """Where the writes land: the Stripe object, in this account; the ledger's unit."""
        return f"{self.account}/{self.kind}/{self.stripe_object}"

    @property
    def raw_meter(self) -> bool:
        """A meter without pre-aggregation: it adds every event, so a window is sent only once."""
        return bool(self.meter and not self.meter.event_time_window)


def find_mapping(report: Report, config: Config) -> tuple[str, MeterMapping]:
    """The subscription and meter mapping for a report, or a 422 telling what to add."""
    subscription = config.subjects.get(report.subject)
    mapping = config.meters.get(report.meter)
    missing = []
    if subscription is None:
        missing.append(f"subject {report.subject!r} is not under 'subjects'")
    if mapping is None:
        missing.append(f"meter {report.meter!r} is not under 'meters'")
    if subscription is None or mapping is None:
        raise Unmapped(
            "; ".join(missing) + " in config.yaml",
            "Add it to config.yaml; Svix keeps retrying for about a day, so nothing is lost.",
            subject=report.subject,
            meter=report.meter,
        )
    return subscription, mapping


V = TypeVar("V")


class Cache(Generic[V]):
    """Stripe objects by ID, bounded and expiring, so that webhooks do not ask Stripe each time."""

    def __init__(
        self,
        ttl: float = CACHE_TTL_SECONDS,
        max_entries: int = CACHE_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, fetch: Callable[[str], V], usable: Callable[[V], bool] = bool) -> V:
        """The cached object if fresh and usable, else a fresh one (so a miss refreshes once)."""
        with self._lock:
            fetched_at, value = self._entries.get(key, (-math.inf, None))
            if self._clock() - fetched_at < self._ttl and value is not None and usable(value):
                self._entries.move_to_end(key)
                return value
        value = fetch(key)
        with self._lock:
            self._entries[key] = (self._clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return value

    def peek(self, key: str) -> V | None:
        """The cached object if fresh, without fetching it."""
        with self._lock:
            fetched_at, value = self._entries.get(key, (-math.inf, None))
            return value if self._clock() - fetched_at < self._ttl else None

    def forget(self, key: str) -> None:
        """Drops an object that Stripe says has changed."""
        with self._lock:
            self._entries.pop(key, None)


def fetch_subscription(client: stripe.StripeClient, subscription: str) -> Subscription:
    """A subscription, its customer and items (one call unless it has over 10 items)."""
    try:
        # At endive: the endive spec's `subscription` requires status, customer and items, and its
        # `subscription_item` requires price and current_period_start/end.
        found = call_stripe(
            "retrieve_subscription", partial(client.v1.subscriptions.retrieve, subscription)
        ).to_dict()
        items, has_more = found["items"]["data"], found["items"]["has_more"]
        while has_more:
            after = items[-1]["id"]
            # At endive: the endive spec's GET /v1/subscription_items lists `subscription_item`s.
            page = call_stripe(
                "list_subscription_items",
                partial(
                    client.v1.subscription_items.list,
                    params={"subscription": subscription, "limit": 100, "starting_after": after},
                ),
            ).to_dict()
            items, has_more = items + page["data"], page["has_more"]
    except stripe.StripeError as error:
        raise classify(error, subscription=subscription) from error
    customer = found["customer"]
    return Subscription(
        id=subscription,
        status=found["status"],
        customer=customer if isinstance(customer, str) else customer["id"],
        start_date=found.get("start_date") or 0,
        cancel_at=found.get("cancel_at"),
        cancel_at_period_end=bool(found.get("cancel_at_period_end")),
        ended_at=found.get("ended_at"),
        items={
            item["price"]["id"]: Item(
                id=item["id"],
                # The endive spec's `recurring` has usage_type and meter but no aggregate_usage
                # (basil removed it "from all API endpoints"): resolve_target reads it at acacia.
                usage_type=(item["price"].get("recurring") or {}).get("usage_type"),
                aggregate_usage=None,
                meter=(item["price"].get("recurring") or {}).get("meter"),
                # Since basil the period lives on the item (required there), not the subscription.
                period_start=item.get("current_period_start") or 0,
                period_end=item.get("current_period_end") or math.inf,
            )
            for item in items
        },
    )


def fetch_price(client: stripe.StripeClient, price: str) -> Price:
    """A price read at USAGE_RECORDS_API_VERSION, the last version that shows aggregate_usage."""
    try:
        # Pinned: basil removed aggregate_usage (changelog "Removes legacy usage-based billing");
        # acacia's `recurring` has it and meter (stripe-python 11.6, generated from that spec).
        found = call_stripe(
            "retrieve_price",
            partial(
                client.v1.prices.retrieve,
                price,
                options={"stripe_version": USAGE_RECORDS_API_VERSION},
            ),
        ).to_dict()
    except stripe.StripeError as error:
        raise classify(error, price=price) from error
    recurring = found.get("recurring") or {}
    # `price.transform_quantity` {divide_by, round up|down} is nullable (2023 and endive specs).
    transform = found.get("transform_quantity") or {}
    return Price(
        id=price,
        usage_type=recurring.get("usage_type"),
        aggregate_usage=recurring.get("aggregate_usage"),
        meter=recurring.get("meter"),
        divide_by=transform.get("divide_by"),
        round=transform.get("round"),
    )


def fetch_meter(client: stripe.StripeClient, meter: str) -> Meter:
    """A billing meter's event name, payload keys and aggregation."""
    try:
        # At endive: the endive spec's `billing.meter` requires event_name, status and the payload
        # keys and formula read here; event_time_window is nullable day|hour.
        found = call_stripe(
            "retrieve_meter", partial(client.v1.billing.meters.retrieve, meter)
        ).to_dict()
    except stripe.StripeError as error:
        raise classify(error, meter=meter) from error
    return Meter(
        id=meter,
        event_name=found["event_name"],
        customer_key=found["customer_mapping"]["event_payload_key"],
        value_key=found["value_settings"]["event_payload_key"],
        formula=found["default_aggregation"]["formula"],
        event_time_window=found.get("event_time_window"),
        active=found.get("status") == "active",
    )


def resolve_target(report: Report, config: Config, bridge: Bridge) -> Target:
    """Finds the item, and the meter if its price has one, that bill this report."""
    subscription_id, mapping = find_mapping(report, config)
    subscription = bridge.subscriptions.get(
        subscription_id,
        partial(fetch_subscription, bridge.stripe),
        # A renewed subscription has a new period: its cached copy is stale.
        lambda found: (
            mapping.price in found.items and found.items[mapping.price].period_end > time.time()
        ),
    )
    bridge.customers.setdefault(subscription.customer, set()).add(subscription.id)
    item = subscription.items.get(mapping.price)
    if item is None:
        raise StripeRefused(
            f"subscription {subscription_id} has no item with price {mapping.price}",
            f"Add {mapping.price} to the subscription in Stripe, or fix meters.{report.meter} "
            "in config.yaml; Svix retries for about a day.",
            subscription=subscription_id,
            price=mapping.price,
        )
    if item.usage_type != "metered":
        raise StripeRefused(
            f"price {mapping.price} is not metered, so it cannot take usage",
            f"Map meters.{report.meter} to a metered price in config.yaml.",
            price=mapping.price,
        )
    meter = None
    if not item.meter:
        price = bridge.prices.get(mapping.price, partial(fetch_price, bridge.stripe))
        item = replace(item, aggregate_usage=price.aggregate_usage)
    if item.meter:
        meter = bridge.meters.get(item.meter, partial(fetch_meter, bridge.stripe))
        if not meter.active:
            raise StripeRefused(
                f"meter {meter.id} of price {mapping.price} is not active",
                "Reactivate the meter in Stripe; Svix retries for about a day.",
                meter=meter.id,
            )
        check_shared_customer(report.subject, subscription, meter, config, bridge)
    return Target(subscription, item, mapping, meter, bridge.settings.account)


def check_shared_customer(
    subject: str, subscription: Subscription, meter: Meter, config: Config, bridge: Bridge
) -> None:
    """Refuses a meter that another subject's subscription also bills for the same customer.

    Meter events carry only the customer: two subjects billed to one customer and one meter would
    overwrite each other's buckets (pre-aggregated) or be deduplicated against each other (raw).
    Only what the cache holds is known here; `check-config --online` checks every subject.
    """
    for other_id in bridge.customers.get(subscription.customer, set()) - {subscription.id}:
        other = bridge.subscriptions.peek(other_id)
        if other is None or not any(i.meter == meter.id for i in other.items.values()):
            continue
        others = [name for name, sub in config.subjects.items() if sub == other_id]
        if others:
            raise SharedCustomer(
                f"subjects {subject!r} ({subscription.id}) and {others[0]!r} ({other_id}) bill "
                f"the same customer {subscription.customer} on meter {meter.id}: their meter "
                "events would overwrite or cancel each other",
                "Bill the two subjects to different customers, or report them as one subject "
                "from OpenMeter; Svix retries for about a day.",
                subjects=sorted([subject, others[0]]),
                customer=subscription.customer,
                meter=meter.id,
            )


# --- planning: what each window becomes in Stripe --------------------------------------------

# OpenMeter aggregation -> the Stripe aggregations (legacy aggregate_usage, or a meter's formula)
# that bill the same amount when each window is set once. UNIQUE_COUNT, AVG and MIN have none.
COMPATIBLE_AGGREGATIONS = {
    "SUM": {"sum"},
    "COUNT": {"sum"},
    "MAX": {"max"},
    "LATEST": {"last_during_period", "last_ever", "last"},
}
BUCKET_SECONDS = {"hour": 3600, "day": 86400}
METER_EVENT_MAX_AGE_SECONDS = 35 * 86400 - 3600  # Stripe's 35 days, less an hour of retries
# Stripe takes meter event values with at most 15 significant digits.
METER_VALUE = Context(prec=15, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True)
class Write:
    """One window as Stripe receives it: a usage record or a meter event."""

    window: Window
    timestamp: int
    value: str  # a whole quantity for a usage record, a decimal string for a meter event
    key: str  # the idempotency key of a usage record, the identifier of a meter event
    refusal: dict[str, Any] | None = None  # why Stripe would bill it in no period: not sent


def check_aggregation(report: Report, target: Target) -> None:
    """Refuses a report whose aggregation Stripe would bill differently (a 422 naming both)."""
    stripe_side = target.meter.formula if target.meter else target.item.aggregate_usage
    if stripe_side == "count":
        raise StripeRefused(
            f"meter {target.meter and target.meter.id} counts events and cannot take values",
            "Use a meter whose aggregation is sum (or last) for this price.",
        )
    aggregation = (report.aggregation or "").upper()
    if aggregation and stripe_side not in COMPATIBLE_AGGREGATIONS.get(aggregation, set()):
        raise StripeRefused(
            f"OpenMeter meter {report.meter!r} aggregates with {aggregation}, but Stripe "
            f"price {target.mapping.price} aggregates with {stripe_side}: the bill would be wrong",
            "SUM and COUNT need a sum price or meter, MAX a legacy max price, LATEST a "
            "last_during_period, last_ever or last one; UNIQUE_COUNT, AVG and MIN fit none.",
            openmeter_aggregation=aggregation,
            stripe_aggregation=stripe_side,
        )


def check_meter_window(window: Window, meter: Meter, now: datetime) -> None:
    """Refuses windows a meter cannot take: too old, or not exactly one pre-aggregation bucket."""
    start, end = window.start.timestamp(), window.end.timestamp()
    if start < now.timestamp() - METER_EVENT_MAX_AGE_SECONDS:
        raise StripeRefused(
            f"window {window.start.isoformat()} is older than Stripe's 35 days for meter events",
            "Stripe cannot take this usage any more; bill it by hand if it matters.",
            window_start=window.start.isoformat(),
        )
    size = meter.event_time_window or ""
    bucket = BUCKET_SECONDS.get(size)
    if bucket and (start % bucket or end - start != bucket):
        raise StripeRefused(
            f"window {window.start.isoformat()}..{window.end.isoformat()} is not exactly one "
            f"{size} of meter {meter.id}, so windows would overwrite each other",
            f"Report this meter from OpenMeter with windowSize {size.upper()} (or map it to a "
            "meter whose event_time_window matches).",
            window_start=window.start.isoformat(),
        )


def not_yet(window: Window, target: Target, now: datetime) -> str | None:
    """Why a window must wait before it is written, if it must."""
    end = window.end.timestamp()
    renews = target.subscription.final_end(target.item) == math.inf
    if renews and window.start.timestamp() < target.item.period_end < end:
        # Written now it would land in this period, and again, in full, in the next one.
        # (A subscription that will not renew has no next period: its last window is written now.)
        return "spans the subscription's renewal; it is billed in the new period once that begins"
    return None


# How much earlier than a report's query.to its first attempt may seem to come: the clocks of
# OpenMeter, Svix and this host differ by that much at most.
CLOCK_SKEW = timedelta(minutes=1)


def incomplete(window: Window, report: Report, made_at: datetime) -> str | None:
    """Why the report cannot hold the window's full value, judged from the report alone.

    A report's body never changes across Svix's retries: a window it holds partially stays
    partial in every retry, whatever the clock says when the retry comes.
    """
    if report.query_from and window.start < report.query_from:
        return f"starts before the report's query.from ({report.query_from.isoformat()})"
    if report.query_to and window.end > (ends_by := min(report.query_to, made_at + CLOCK_SKEW)):
        return f"ends after {ends_by.isoformat()}: query.to, or a minute after the report was made"
    if not report.query_to and window.end > made_at:
        return f"had not ended when the report was made ({made_at.isoformat()})"
    return None


# Below these magnitudes, after the multiplier, a window's value is zero: float noise such as
# 0.1 + 0.2 - 0.3 = 5.551115123125783e-17. A usage record's quantity is whole, so under half a
# unit cannot be carried (not even by rounding up); a meter event takes 15 significant digits,
# and a billionth of a unit is far below any price's smallest charge, yet far above the noise of
# float64 sums (about 1e-16 of their size) of values up to a million.
ZERO_BELOW = {"usage_records": Decimal("0.5"), "meter_events": Decimal("1e-9")}
# Below zero, noise stops and negative usage begins at half a unit, for both kinds: that needs
# only the config's multiplier, so a negative report is refused before Stripe is asked.
NEGATIVE_FROM = Decimal("-0.5")


def check_negative(report: Report, config: Config) -> None:
    """Refuses (400) a report with a row or window below -half a unit after the multiplier."""
    mapping = config.meters.get(report.meter)
    multiplier = mapping.multiplier if mapping else Decimal(1)
    for window in report.windows:
        if DECIMAL.multiply(min(window.lowest, window.value), multiplier) <= NEGATIVE_FROM:
            raise BadRequest(
                f"window {window.start.isoformat()}: usage cannot be negative "
                f"({min(window.lowest, window.value)})",
                "Negative usage cannot be billed: fix the meter's events in OpenMeter.",
            )


def denoised(window: Window, target: Target) -> Decimal:
    """The window's value, or zero if it is noise (check_negative refused what is not)."""
    scaled = DECIMAL.multiply(window.value, target.mapping.multiplier)
    return Decimal(0) if scaled < ZERO_BELOW[target.kind] else window.value


def window_timestamp(window: Window) -> int:
    """One second after the window starts: inside it, in its billing period, and in the past."""
    return math.floor(window.start.timestamp()) + 1


def check_not_ended(report: Report, target: Target) -> None:
    """Refuses usage for a subscription that has ended: Stripe would bill none of it."""
    subscription = target.subscription
    if subscription.ended:
        ended_at = subscription.ended_at
        when = f" at {datetime.fromtimestamp(ended_at, UTC).isoformat()}" if ended_at else ""
        raise StripeRefused(
            f"subscription {subscription.id} has ended ({subscription.status}{when}): Stripe "
            f"bills none of the report's {len(report.windows)} windows",
            "Bill this usage by hand if it matters, or map the subject to its new subscription "
            "in config.yaml; Svix retries for about a day.",
            subscription=subscription.id,
            windows=[w.start.isoformat() for w in report.windows],
        )


def in_billing_period(
    window: Window, timestamp: int, target: Target, now: datetime, grace: int
) -> int:
    """The timestamp that bills a window in the period it belongs to, or a 422 naming it.

    A window that a renewal splits is billed in the new period (the old one is invoiced); one the
    subscription's start splits, from the start; one its end splits, before the end.
    """
    item, subscription = target.item, target.subscription
    start, end = window.start.timestamp(), window.end.timestamp()
    final_end = subscription.final_end(item)
    if start >= final_end:
        raise _unbillable(window, f"starts after subscription {subscription.id} ends")
    if start < subscription.start_date < end:
        timestamp = max(timestamp, subscription.start_date)
    if start < item.period_start < end:
        timestamp = max(timestamp, item.period_start)
    if start < final_end < end:
        timestamp = min(timestamp, math.ceil(final_end) - 1)
    if not target.meter:
        return timestamp  # Stripe refuses a record outside the period, and says which
    # A meter takes any event for the customer, and bills it only inside the subscription and
    # while its period's invoice is open.
    if end <= subscription.start_date:
        raise _unbillable(window, f"ended before subscription {subscription.id} began")
    if end <= item.period_start and now.timestamp() >= item.period_start + grace:
        raise _unbillable(
            window,
            f"belongs to a period whose invoice finalized {grace} s after it ended "
            "(INVOICE_GRACE_SECONDS)",
        )
    return timestamp


def _unbillable(window: Window, why: str) -> StripeRefused:
    """A 422 for a window that Stripe would take but bill in no period."""
    return StripeRefused(
        f"window {window.start.isoformat()}..{window.end.isoformat()} {why}: Stripe would bill "
        "it in no period",
        "Bill this usage by hand if it matters; if the account's invoice finalization grace "
        "period is longer, set INVOICE_GRACE_SECONDS to it.",
        window_start=window.start.isoformat(),
    )


def to_quantity(value: Decimal, mapping: MeterMapping) -> int:
    """A window's value as the whole number a usage record takes (rounded as configured)."""
    rounding = ROUNDING_MODES[mapping.rounding or "nearest"]
    return int(DECIMAL.multiply(value, mapping.multiplier).quantize(Decimal(1), rounding, DECIMAL))


def to_meter_value(value: Decimal, mapping: MeterMapping) -> str:
    """A window's value as a meter event takes it: a decimal string, rounded only if configured."""
    if mapping.rounding:
        return str(to_quantity(value, mapping))
    exact = METER_VALUE.plus(DECIMAL.multiply(value, mapping.multiplier)).normalize(METER_VALUE)
    return f"{exact:f}"


def idempotency_key(message_id: str, *meaning: object) -> str:
    """A key per write: the message and what the write means, so that only a true repeat replays."""
    key = ":".join([message_id, *map(str, meaning)])
    if len(key) <= 255:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def meter_event_identifier(message_id: str, target: Target, timestamp: int) -> str:
    """Raw meters: one event per window, ever. Pre-aggregated: one per message and window."""
    assert target.meter
    meaning = [target.meter.event_name, target.subscription.customer, str(timestamp)]
    # A pre-aggregated meter keeps the newest event per bucket, so each message must be new to it;
    # a raw meter adds every event, so a window must never be sent twice.
    if not target.raw_meter:
        meaning.insert(0, message_id)
    return "om-" + hashlib.sha256("\n".join(meaning).encode()).hexdigest()[:48]


def plan_writes(
    report: Report,
    target: Target,
    message_id: str,
    now: datetime,
    *,
    made_at: datetime | None = None,
    grace: int = DEFAULT_INVOICE_GRACE_SECONDS,
) -> tuple[list[Write], list[dict[str, str]], list[dict[str, str]]]:
    """Checks a report against its target's rules and computes every write, before any is sent;
    also returns the windows that must wait (written by a later attempt) and those left out for
    good (a raw meter's windows that this report holds only in part)."""
    check_aggregation(report, target)
    check_not_ended(report, target)
    writes, waiting, left_out = [], [], []
    for window in report.windows:
        timestamp = window_timestamp(window)
        if timestamp >= window.end.timestamp():
            raise BadRequest(f"window {window.start.isoformat()} is shorter than two seconds")
        if target.meter:
            check_meter_window(window, target.meter, now)
        usage = denoised(window, target)
        # A raw meter keeps a window's first event for good: a partial value would stick, and no
        # retry of this body can bring the rest. A later report carries the window in full.
        if target.raw_meter and (reason := incomplete(window, report, made_at or now)):
            left_out.append({"window_start": window.start.isoformat(), "reason": reason})
            continue
        if reason := not_yet(window, target, now):
            waiting.append({"window_start": window.start.isoformat(), "reason": reason})
            continue
        try:
            timestamp = in_billing_period(window, timestamp, target, now, grace)
        except StripeRefused as refusal:  # the other windows are still written
            writes.append(Write(window, timestamp, "", "", refusal=refusal.body()))
            continue
        if target.meter:
            value = to_meter_value(usage, target.mapping)
            key = meter_event_identifier(message_id, target, timestamp)
        else:
            value = str(to_quantity(usage, target.mapping))
            key = idempotency_key(message_id, target.item.id, timestamp, value)
        writes.append(Write(window, timestamp, value, key))
    return writes, waiting, left_out


# --- the ledger: what Stripe already accepted ----------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A message as the ledger knows it: which body, and when it was first seen."""

    id: str
    digest: str
    first_seen: float


class Ledger:
    """The writes Stripe accepted in the last 48 hours, in a SQLite file shared by the workers.

    It lets a report too large for one attempt resume where the last one stopped, answers an
    exact redelivery without calling Stripe, and keeps a late retry of an old message from undoing
    a newer correction. It is an optimisation, never the truth: without it (deleted, unwritable,
    STATE_PATH empty) every write is still idempotent, so nothing is lost or counted twice.
    """

    KEEP_SECONDS = 48 * 3600
    EXPIRE_EVERY_SECONDS = 600.0
    SCHEMA = """
        CREATE TABLE IF NOT EXISTS messages (
            id TEXT PRIMARY KEY, digest TEXT NOT NULL, first_seen REAL NOT NULL,
            done INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS writes (key TEXT PRIMARY KEY, at REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS windows (
            object TEXT NOT NULL, timestamp INTEGER NOT NULL, first_seen REAL NOT NULL,
            message TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (object, timestamp)
        );
        CREATE INDEX IF NOT EXISTS messages_first_seen ON messages (first_seen);
        CREATE INDEX IF NOT EXISTS writes_at ON writes (at);
        CREATE INDEX IF NOT EXISTS windows_at ON windows (at);
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._local = threading.local()
        self._expired_at = 0.0

    def _db(self) -> sqlite3.Connection | None:
        """This thread's connection (opened after gunicorn forks), or None without a ledger."""
        if not self.path:
            return None
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(self.SCHEMA)
            self._local.connection, self._local.pid = connection, os.getpid()
        return connection

    def _run(self, default: T, work: Callable[[sqlite3.Connection], T]) -> T:
        """Runs work on the ledger; a broken ledger is logged and worked around, never fatal."""
        try:
            db = self._db()
            return default if db is None else work(db)
        except (sqlite3.Error, OSError) as error:
            self._local.connection = None
            log_event("ledger unavailable", logging.WARNING, path=self.path, error=str(error))
            return default

    def begin(self, message_id: str) -> tuple[float, str | None]:
        """When this message was first seen (now, if never), and the digest it was fully written
        under (None if it never was)."""

        def work(db: sqlite3.Connection) -> tuple[float, str | None]:
            row = db.execute(
                "SELECT first_seen, digest, done FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return time.time(), None
            return float(row[0]), str(row[1]) if row[2] else None

        self._expire()
        never: tuple[float, str | None] = (time.time(), None)
        return self._run(never, work)

    def pending(
        self, writes: Sequence[Write], target: Target, message: Message
    ) -> tuple[list[Write], int, int]:
        """The writes still to make; how many a later message superseded; how many another kept."""
        place = target.place  # the same object in another account is another object

        def work(db: sqlite3.Connection) -> tuple[list[Write], int, int]:
            todo, superseded, kept = [], 0, 0
            for write in writes:
                written = (f"{place} {write.key}",)
                if db.execute("SELECT 1 FROM writes WHERE key = ?", written).fetchone():
                    # Only a raw meter's keys are shared between messages (one event per window).
                    kept += target.raw_meter and bool(db.execute(
                        "SELECT 1 FROM windows WHERE object = ? AND timestamp = ? AND message != ?",
                        (place, write.timestamp, message.id),
                    ).fetchone())  # fmt: skip
                    continue
                newer = db.execute(
                    "SELECT 1 FROM windows WHERE object = ? AND timestamp = ? AND first_seen > ?",
                    (place, write.timestamp, message.first_seen),
                ).fetchone()
                if newer:
                    superseded += 1
                else:
                    todo.append(write)
            return todo, superseded, kept

        return self._run((list(writes), 0, 0), work)

    def record(
        self, message: Message, target: Target | None, accepted: Sequence[Write], done: bool
    ) -> None:
        """Remembers, in one transaction, the message and the writes Stripe accepted for it."""

        place = target and target.place

        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                    "digest = excluded.digest, done = CASE WHEN digest = excluded.digest "
                    "THEN max(done, excluded.done) ELSE excluded.done END",
                    (message.id, message.digest, message.first_seen, int(done)),
                )
                db.executemany(
                    "INSERT OR REPLACE INTO writes VALUES (?, ?)",
                    [(f"{place} {w.key}", now) for w in accepted],
                )
                db.executemany(
                    "INSERT INTO windows VALUES (?, ?, ?, ?, ?) ON CONFLICT (object, timestamp) "
                    "DO UPDATE SET first_seen = excluded.first_seen, message = excluded.message, "
                    "at = excluded.at WHERE excluded.first_seen >= windows.first_seen",
                    [(place, w.timestamp, message.first_seen, message.id, now)
                     for w in accepted],
                )  # fmt: skip
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        self._run(None, work)

    def _expire(self) -> None:
        """Forgets entries older than 48 hours, now and then: the ledger stays bounded."""
        if time.monotonic() - self._expired_at < self.EXPIRE_EVERY_SECONDS:
            return
        self._expired_at = time.monotonic()
        cutoff = time.time() - self.KEEP_SECONDS

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM messages WHERE first_seen < ?", (cutoff,))
            db.execute("DELETE FROM writes WHERE at < ?", (cutoff,))
            db.execute("DELETE FROM windows WHERE at < ?", (cutoff,))

        self._run(None, work)


# --- writing to Stripe -----------------------------------------------------------------------

_object_locks: dict[str, tuple[threading.Lock, int]] = {}  # a lock and how many want it
_object_locks_guard = threading.Lock()


@contextmanager
def one_writer(stripe_object: str) -> Iterator[None]:
    """Writes to one Stripe object one at a time: concurrent writes hit Stripe's lock timeouts."""
    with _object_locks_guard:
        lock, users = _object_locks.get(stripe_object, (threading.Lock(), 0))
        _object_locks[stripe_object] = lock, users + 1
    try:
        if not lock.acquire(timeout=max(min(time_left(), 60.0), 0)):
            raise StripeUnavailable(
                f"another webhook kept {stripe_object} busy until the time budget ran out",
                "Svix will retry.",
            )
        try:
            yield
        finally:
            lock.release()
    finally:
        with _object_locks_guard:  # the last user drops the lock: the table stays small
            lock, users = _object_locks[stripe_object]
            if users == 1:
                del _object_locks[stripe_object]
            else:
                _object_locks[stripe_object] = lock, users - 1


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
                    quantity=int(write.value),
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
                    meter.value_key: write.value,
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
            "quantity": int(write.value),
        }
    return {
        "kind": target.kind,
        "identifier": write.key,
        "event_name": target.meter.event_name,
        "customer": target.subscription.customer,
        "timestamp": write.timestamp,
        "value": write.value,
    }


def write_report(
    bridge: Bridge, target: Target, writes: Sequence[Write], on_accepted: Callable[[Write], None]
) -> None:
    """Sends every window in order; a refused window does not keep the others from Stripe."""
    refused: list[dict[str, Any]] = []
    written = 0
    for write in writes:
        if write.refusal:
            refused.append(write.refusal)
            continue
        facts = write_facts(target, write)
        try:
            request_id = send_write(bridge.stripe, target, write)
        except (stripe.StripeError, StripeUnavailable) as error:
            window = {
                "window_start": write.window.start.isoformat(),
                "window_end": write.window.end.isoformat(),
            }
            problem = error if isinstance(error, BridgeError) else classify(error, **window)
            log_event(
                "stripe write failed",
                logging.WARNING,
                **facts,
                status=problem.status,
                stripe_request_id=getattr(error, "request_id", None),
            )
            if isinstance(problem, StripeUnavailable):
                # Svix's next attempt resumes: the ledger skips what Stripe has accepted.
                problem.details.update(written=written, remaining=len(writes) - written)
                raise problem from error
            bridge.subscriptions.forget(target.subscription.id)
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
        WINDOWS_WRITTEN.labels(target.kind).inc()
        log_event("stripe write", **facts, stripe_request_id=request_id)
    if refused:
        raise StripeRefused(
            f"{len(refused)} of {len(writes)} windows refused: {refused[0]['message']}",
            refused[0]["hint"],
            refused=refused,
        )


# --- the Flask app ---------------------------------------------------------------------------


@dataclass
class Bridge:
    """Everything a webhook needs: settings, the mapping, the Stripe client and its caches."""

    settings: Settings
    config: ConfigSource
    stripe: stripe.StripeClient
    subscriptions: Cache[Subscription]
    meters: Cache[Meter]
    ledger: Ledger
    verifiers: tuple[Webhook, ...]
    # Legacy prices read at acacia: the endive spec's POST /v1/prices/{price} cannot change
    # recurring or transform_quantity, so a cached one never goes stale.
    prices: Cache[Price] = field(default_factory=Cache)
    # customer -> the subscriptions seen billing it: enough to find two subjects on one customer
    customers: dict[str, set[str]] = field(default_factory=dict)


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
    client = make_stripe_client(settings)
    verifiers = tuple(Webhook(secret) for secret in settings.webhook_secrets)
    return Bridge(
        settings, config, client, Cache(), Cache(), Ledger(settings.state_path), verifiers
    )


def attempt_budget(budget: float, headers: Mapping[str, str], now: float) -> float:
    """The budget, less what the attempt waited since Svix sent it (queued behind busy threads).

    Svix's 15 s run from when it sent the attempt; the signed timestamp says when that was, to the
    second. At most half the budget is discounted, so a skewed clock cannot starve every attempt.
    """
    sent = headers.get("svix-timestamp") or headers.get("webhook-timestamp") or ""
    waited = now - int(sent) - 1 if re.fullmatch(r"[0-9]{1,15}", sent) else 0.0
    return budget - min(max(waited, 0.0), budget / 2)


def process_webhook(
    bridge: Bridge, body: bytes, headers: Mapping[str, str], facts: dict[str, Any]
) -> dict[str, Any]:
    """Verify, then the rest of the path; returns the 200 answer."""
    message_id = verify(body, headers, bridge.verifiers)
    sent = headers.get("svix-timestamp") or headers.get("webhook-timestamp") or ""
    sent_at = float(sent) if re.fullmatch(r"[0-9]{1,15}", sent) else None
    return process_event(bridge, body, message_id, facts, sent_at=sent_at)


def process_event(
    bridge: Bridge,
    body: bytes,
    message_id: str,
    facts: dict[str, Any],
    *,
    dry_run: bool = False,
    sent_at: float | None = None,
) -> dict[str, Any]:
    """Parse, map, plan, write: what happens to a verified event (and to a replayed one).

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
    check_negative(report, bridge.config.current())
    if dry_run:
        found = resolve_target(report, bridge.config.current(), bridge)
        writes, waiting, left_out = plan_writes(
            report, found, message_id, now, grace=bridge.settings.invoice_grace
        )
        return answer | {"outcome": "dry_run", "kind": found.kind, "waiting": waiting,
                         "incomplete": left_out,
                         "writes": [write_facts(found, w) for w in writes if not w.refusal],
                         "refused": [w.refusal for w in writes if w.refusal]}  # fmt: skip
    first_seen, written_as = bridge.ledger.begin(message_id)
    message = Message(message_id, digest, first_seen)
    # When OpenMeter made the report, as far as the bridge can know: no later than the first
    # attempt the ledger saw, nor than the Svix attempt in hand (the first one, unless retried).
    made_at = datetime.fromtimestamp(min(first_seen, sent_at or first_seen), UTC)
    accepted: list[Write] = []
    target: Target | None = None
    finished = flushed = False

    def flush(done: bool) -> None:
        """Records the accepted writes; a worker killed mid-report redoes at most 50."""
        nonlocal flushed
        bridge.ledger.record(message, target, accepted, done=done)
        accepted.clear()
        flushed = True

    def remember(write: Write) -> None:
        accepted.append(write)
        if len(accepted) >= 50:
            flush(False)

    try:
        target = resolve_target(report, bridge.config.current(), bridge)
        facts["kind"] = answer["kind"] = target.kind
        message = Message(message_id, placed_digest(digest, target), first_seen)
        if message.digest == written_as:
            flushed = True  # nothing new to remember
            return answer | {"outcome": "already_written"}
        writes, waiting, left_out = plan_writes(
            report, target, message_id, now, made_at=made_at, grace=bridge.settings.invoice_grace
        )
        if left_out:
            answer["incomplete"] = left_out
            log_event(
                "incomplete windows left out",
                logging.WARNING,
                incomplete=left_out,
                hint="a later report that holds them in full writes them",
            )
        # Deciding what to send, sending and recording it under one lock keeps a newer report
        # for the same windows, waiting in this worker, from being undone by this one.
        with one_writer(target.stripe_object):
            try:
                pending, superseded, kept = bridge.ledger.pending(writes, target, message)
                warn_skipped(superseded, kept)
                write_report(bridge, target, pending, remember)
                finished = not waiting
            finally:
                flush(finished)
    finally:
        if not flushed:
            # Even a failed attempt is remembered: when it was first seen decides which wins.
            flush(finished)
    if waiting:
        raise WindowsWaiting(
            f"{len(waiting)} of {len(writes) + len(waiting)} windows must wait: "
            f"{waiting[0]['window_start']} {waiting[0]['reason']}",
            "Nothing to do: Svix retries, and the windows are written once they can be.",
            written=len(pending),
            waiting=waiting,
        )
    return answer | {"sent": len(pending), "skipped": len(writes) - len(pending)}


def placed_digest(body_digest: str, target: Target) -> str:
    """What "already written" means: this body, to these Stripe objects, in this Stripe account.

    A resend after a mapping fix, or after switching from a test key to a live one, goes to
    another place, so it is written again.
    """
    return hashlib.sha256(f"{body_digest}\n{target.place}".encode()).hexdigest()


def warn_skipped(superseded: int, kept: int) -> None:
    """Says when the ledger kept a window from being written again, and why."""
    if superseded:
        log_event(
            "windows kept from a newer report",
            logging.WARNING,
            skipped=superseded,
            hint="a report seen later set these windows; this older one does not undo it",
        )
    if kept:
        log_event(
            "raw meter kept the window's first event",
            logging.WARNING,
            skipped=kept,
            hint="a correction of these windows, if it was one, is not applied",
        )


def read_body() -> bytes:
    """The request body, refused whole past 1 MiB (OpenMeter's reports are far smaller)."""
    try:
        return request.get_data(cache=False)
    except RequestEntityTooLarge as error:
        raise PayloadTooLarge(
            f"body over {MAX_BODY_BYTES} bytes", "Send a narrower report (fewer windows or groups)."
        ) from error


class NotReady(BridgeError):
    status, code = 503, "not_ready"


class TrustedProxyFix:
    """werkzeug's ProxyFix for requests from a trusted proxy; others keep their own address.

    ProxyFix believes X-Forwarded-For from any peer, so a client that reaches the port directly
    could forge the address the logs show; gunicorn trusts forwarding headers only from
    FORWARDED_ALLOW_IPS, and so does this.
    """

    def __init__(self, wsgi_app: WSGIApplication, settings: Settings) -> None:
        hops = settings.trusted_proxies
        self._direct, self._proxied = wsgi_app, ProxyFix(wsgi_app, x_for=hops, x_proto=hops)
        self._allow_all = "*" in settings.forwarded_allow_ips
        self._allowed = [
            ipaddress.ip_network(a, strict=False) for a in settings.forwarded_allow_ips if a != "*"
        ]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Serves the request, with the forwarded client only if the peer may forward."""
        trusted = self._allow_all or self._trusted(environ.get("REMOTE_ADDR", ""))
        return (self._proxied if trusted else self._direct)(environ, start_response)

    def _trusted(self, peer: str) -> bool:
        """Whether peer is one of the allowed proxies."""
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:  # a Unix socket has no address: only a local proxy can reach it
            return True
        return any(address in network for network in self._allowed)


def create_app(test_config: Mapping[str, str] | None = None) -> Flask:
    """Builds the service from the environment; test_config overrides environment variables.

    A missing variable or a bad config.yaml leaves the app unready (serve() then refuses to
    start), so that the CLI commands, which need less, still run.
    """
    _configure_logging()
    environ = {**os.environ, **(test_config or {})}
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    bridge: Bridge | None = None
    problems: list[str] = []
    try:
        bridge = make_bridge(environ)
    except ConfigError as error:
        problems = error.problems
    app.extensions["bridge"], app.extensions["problems"] = bridge, problems
    if bridge and bridge.settings.trusted_proxies:
        app.wsgi_app = TrustedProxyFix(app.wsgi_app, bridge.settings)  # type: ignore[method-assign]

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process serves requests."""
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        """Readiness: a valid config is loaded and the environment is complete."""
        if bridge is None:
            return jsonify(status="not_ready", problems=problems), 503
        bridge.config.current()
        return jsonify(status="ready", config=bridge.config.status()), 200

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics, summed over the gunicorn workers."""
        return Response(metrics_text(), mimetype="text/plain; version=0.0.4")

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        """Takes one Svix-delivered OpenMeter event; 200 only once Stripe has every window."""
        started = time.monotonic()
        facts: dict[str, Any] = {"client": request.remote_addr}
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            if bridge is None:
                raise NotReady("the service is not configured: " + "; ".join(problems))
            budget = attempt_budget(bridge.settings.time_budget, headers, time.time())
            with time_budget(budget):
                answer, status = process_webhook(bridge, read_body(), headers, facts), 200
        except BridgeError as error:
            answer, status = error.body(), error.status
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        outcome = answer.get("outcome") or answer.get("error")
        WEBHOOKS.labels(outcome, str(status)).inc()
        log_event("webhook", **facts, outcome=outcome, status=status, duration_ms=duration_ms)
        return jsonify(answer), status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        """Wrong paths and methods get JSON too."""
        status = error.code or 500
        return jsonify(
            error=(error.name or "error").lower().replace(" ", "_"), message=error.description
        ), status

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> tuple[Response, int]:
        """A bug: log it whole, answer without details (Svix retries)."""
        log.exception("unexpected error", extra={"fields": {"path": request.path}})
        return jsonify(
            error="internal_error",
            message="unexpected error; see the service's logs",
            hint="Svix will retry; report this if it persists.",
        ), 500

    app.cli.add_command(check_config_command)
    app.cli.add_command(replay_command)
    return app


def serve() -> Flask:
    """The app gunicorn serves: a configuration problem stops the start with its message alone."""
    app = create_app()
    if problems := app.extensions["problems"]:
        log_event("cannot start", logging.ERROR, problems=problems)
        raise SystemExit("cannot start:\n- " + "\n- ".join(problems))
    bridge = app.extensions["bridge"]
    log_event(
        "started",
        config_path=bridge.settings.config_path,
        config_checksum=bridge.config.checksum,
        secrets=len(bridge.settings.webhook_secrets),
        trusted_proxies=bridge.settings.trusted_proxies,
    )
    return app


# --- the command line: flask --app app check-config | replay ------------------------------------


@click.command("check-config")
@click.argument("path", required=False)
@click.option("--online", is_flag=True, help="Also ask Stripe about every price and subscription.")
def check_config_command(path: str | None, online: bool) -> None:
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


def check_online(client: stripe.StripeClient, config: Config) -> list[tuple[str, str, str]]:
    """Asks Stripe about every mapped price, meter and subscription: (entry, verdict, detail)."""
    rows: list[tuple[str, str, str]] = []
    meter_users: dict[str, str] = {}  # two prices on one meter would overwrite each other's events
    meter_of_price: dict[str, str] = {}
    found: dict[str, Subscription] = {}  # subject -> its subscription
    for slug, mapping in config.meters.items():
        entry = f"meters.{slug}"
        try:
            price = fetch_price(client, mapping.price)
        except BridgeError as error:
            rows.append((entry, "problem", f"{mapping.price}: {error.message}"))
            continue
        if price.usage_type != "metered":
            rows.append((entry, "problem", f"{mapping.price} is not a metered price"))
        elif not price.meter:
            rows.append(legacy_price_row(entry, price, mapping))
        else:
            try:
                meter = fetch_meter(client, price.meter)
            except BridgeError as error:
                rows.append((entry, "problem", error.message))
                continue
            detail = (
                f"{mapping.price}: meter events to {meter.id} ({meter.event_name}, "
                f"{meter.formula}, window {meter.event_time_window or 'none: raw'})"
            )
            meter_of_price[mapping.price] = meter.id
            if (other := meter_users.setdefault(meter.id, entry)) != entry:
                rows.append((entry, "problem", f"{detail}: {other} already uses {meter.id}"))
                continue
            rows.append(
                (
                    entry,
                    "ok" if meter.active else "problem",
                    detail + ("" if meter.active else ", inactive"),
                )
            )
    for subject, subscription_id in config.subjects.items():
        entry = f"subjects.{subject}"
        try:
            subscription = fetch_subscription(client, subscription_id)
        except BridgeError as error:
            rows.append((entry, "problem", f"{subscription_id}: {error.message}"))
            continue
        found[subject] = subscription
        missing = sorted(
            m.price for m in config.meters.values() if m.price not in subscription.items
        )
        if subscription.status not in ("active", "trialing"):
            rows.append((entry, "problem", f"{subscription_id} is {subscription.status}"))
        elif missing:
            rows.append(
                (entry, "problem", f"{subscription_id} has no item for {', '.join(missing)}")
            )
        else:
            rows.append(
                (
                    entry,
                    "ok",
                    f"{subscription_id} ({subscription.status}, customer {subscription.customer})",
                )
            )
    return rows + shared_customer_rows(found, meter_of_price)


def shared_customer_rows(
    found: Mapping[str, Subscription], meter_of_price: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """A problem for each subject whose customer and meter an earlier subject already bills."""
    rows: list[tuple[str, str, str]] = []
    first: dict[tuple[str, str], str] = {}  # (customer, meter) -> the first subject on it
    for subject, subscription in found.items():
        for price in subscription.items:
            if (meter := meter_of_price.get(price)) is None:
                continue
            other = first.setdefault((subscription.customer, meter), subject)
            if other != subject:
                rows.append((
                    f"subjects.{subject}",
                    "problem",
                    f"{subscription.id} bills customer {subscription.customer} on meter {meter}, "
                    f"as subjects.{other} ({found[other].id}) does: meter events are per "
                    "customer, so the two would overwrite or cancel each other",
                ))  # fmt: skip
    return rows


def legacy_price_row(entry: str, price: Price, mapping: MeterMapping) -> tuple[str, str, str]:
    """A legacy price's row: its aggregation and unit conversion, a problem if Stripe hides it."""
    detail = f"{price.id}: usage records (aggregate_usage {price.aggregate_usage}"
    if price.divide_by is not None:
        detail += f", transform_quantity divide_by {price.divide_by} round {price.round}"
    detail += ")"
    if price.aggregate_usage is None:
        return (
            entry,
            "problem",
            f"{detail}: Stripe showed no aggregate_usage at {USAGE_RECORDS_API_VERSION}, so "
            "the bridge cannot check the aggregation and would refuse every report",
        )
    if advice := conversion_advice(price, mapping):
        return entry, "warning", f"{detail}: {advice}"
    return entry, "ok", detail


def conversion_advice(price: Price, mapping: MeterMapping) -> str | None:
    """How to stop a legacy mapping from rounding each window, given what the price does."""
    if mapping.multiplier >= 1 and not mapping.rounding:
        return None
    # transform_quantity divides the period's total, then rounds it once (up or down):
    # docs.stripe.com/billing/subscriptions/usage-based/transform-quantities
    divide_by = ((1 / mapping.multiplier) if mapping.multiplier < 1 else Decimal(1)).normalize()
    steps = [f"the bridge rounds every window to a whole unit (multiplier {mapping.multiplier}"]
    steps[0] += f", rounding {mapping.rounding or 'nearest'}), so the error grows with the windows"
    if price.divide_by is None and divide_by == divide_by.to_integral_value() and divide_by > 1:
        round_ = "down" if mapping.rounding == "down" else "up"
        steps.append(
            f"give {price.id} transform_quantity divide_by {divide_by:f} round {round_} "
            "(a new price: Stripe cannot change it on this one), map it with multiplier 1 and no "
            "rounding, and Stripe converts the period's total once"
        )
    elif price.divide_by is not None:
        multiplier = (price.divide_by * mapping.multiplier).normalize()
        steps.append(
            f"{price.id} already divides by {price.divide_by}: map it with multiplier "
            f"{multiplier:f} and no rounding, so the bridge sends whole small units and Stripe "
            "converts the period's total once"
        )
    else:
        steps.append(
            "send whole small units (a multiplier of 1 or more, no rounding) and convert with a "
            "price whose transform_quantity divides the period's total"
        )
    return "; ".join(steps)


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
    message_id = message_id or f"replay-{int(time.time())}-{_sha256(body)[:12]}"
    facts: dict[str, Any] = {}
    try:
        answer = process_event(bridge, body, message_id, facts, dry_run=dry_run)
    except BridgeError as error:
        click.echo(json.dumps(error.body(), indent=2))
        raise SystemExit(1) from None
    for write in answer.pop("writes", []):
        click.echo("would write " + json.dumps(write))
    click.echo(json.dumps(answer, indent=2))
