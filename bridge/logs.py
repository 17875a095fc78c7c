"""Logs (one JSON object per line) and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger("bridge")


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


def configure_logging() -> None:
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
# What became of each window of each attempt: written, or left out of a 200 (incomplete, superseded,
# kept), or refused, or waiting for a later attempt. Only `written` is billed.
WINDOW_OUTCOMES = ("written", "incomplete", "superseded", "kept", "refused", "waiting")
WINDOWS = Counter("bridge_windows_total", "Windows by what became of them.", ["kind", "outcome"])


def count_windows(kind: str, **outcomes: int) -> None:
    """Adds windows to bridge_windows_total, by outcome (one of WINDOW_OUTCOMES)."""
    for outcome, count in outcomes.items():
        assert outcome in WINDOW_OUTCOMES, outcome
        if count:
            WINDOWS.labels(kind, outcome).inc(count)


STRIPE_SECONDS = Histogram(
    "bridge_stripe_request_seconds",
    "Stripe request latency.",
    ["operation"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STRIPE_ERRORS = Counter("bridge_stripe_errors_total", "Stripe errors.", ["error_class"])
STRIPE_429 = Counter(
    "bridge_stripe_429_total",
    "Stripe 429 answers, by Stripe-Rate-Limited-Reason (none: an object lock timeout).",
    ["reason"],
)
RATE_BUDGET_REFUSED = Counter(
    "bridge_rate_budget_refused_total",
    "Stripe requests not sent: the rate budget had no slot before the attempt's time ran out.",
)
CONFIG_RELOADS = Counter("bridge_config_reloads_total", "config.yaml reloads.", ["result"])


def metrics_text() -> bytes:
    """Every worker's metrics in Prometheus' text format."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
