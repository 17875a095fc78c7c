"""Fault injection and latency: the next calls, or a share of them, fail as Stripe can."""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field

from tests.fake_stripe.rules import (
    LOCK_TIMEOUT_MESSAGE,
    RATE_LIMIT_MESSAGE,
    StripeError,
    _Outcome,
)
from tests.fake_stripe.state import State, _Fault

FAULT_KINDS = ("500", "429_lock", "429_rate", "drop", "lost_response", "late_response")
# Stripe names the limiter that refused a request in this header (docs.stripe.com/rate-limits,
# "Handling limiting gracefully"): global-rate is the account's basic limit (100/s live, 25/s in
# a sandbox); a 429 without it is an object's lock timeout.
RATE_LIMITED_REASON = "Stripe-Rate-Limited-Reason"


@dataclass
class RateLimit:
    """Stripe's basic rate limiter as a token bucket: `rate` requests a second for the account,
    up to `burst` at once (Stripe documents no burst: by default one second's worth)."""

    rate: float
    burst: float
    tokens: float = 0.0
    at: float = 0.0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.tokens, self.at = self.burst, time.monotonic()

    def admit(self) -> bool:
        """Takes a token if there is one; counts a refusal otherwise."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            self.refused += 1
            return False


# These write nothing; of them only a 500 is saved under its idempotency key (as Stripe does).
_REFUSING_FAULTS = ("500", "429_lock", "429_rate", "drop")


class Faults(State):
    """Injected faults, the account's rate limit, and the latency added to every answer."""

    rate_limit: RateLimit | None = None  # none unless limit_rate() sets one

    def limit_rate(self, rate: float | None, burst: float | None = None) -> None:
        """Answers 429 (global-rate) to requests beyond `rate` a second (None: no limit)."""
        self.rate_limit = None if rate is None else RateLimit(rate, burst or max(rate, 1.0))

    def _over_rate_limit(self) -> bool:
        """Whether the account's rate limit refuses this request."""
        limit = self.rate_limit
        return limit is not None and not limit.admit()

    def inject(
        self,
        kind: str,
        *,
        method: str | None = None,
        path: str | None = None,
        count: int | None = 1,
        probability: float | None = None,
        seed: int = 0,
        delay: float = 0.0,
    ) -> None:
        """Faults the next `count` matching calls (None: all), or each with `probability`."""
        # `path` is a regex searched in the request path; with a probability, count is ignored
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(FAULT_KINDS)}, not {kind!r}")
        fault = _Fault(
            kind=kind,
            method=method.upper() if method else None,
            path=re.compile(path) if path else None,
            count=count,
            probability=probability,
            rng=random.Random(seed),
            delay=delay,
        )
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Removes every injected fault (the counter stays)."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        """The first injected fault that fires for this call, counted by kind."""
        with self._lock:
            for fault in self._faults:
                if fault.fires(method, path):
                    self.faults_injected[fault.kind] += 1
                    return fault
        return None

    def _pause(self) -> None:
        """The configured latency, once per API answer."""
        if self.latency > 0:
            time.sleep(self.latency)


def _fault_outcome(kind: str) -> _Outcome:
    """The answer of a fault that stops the request before the endpoint."""
    if kind == "drop":
        return _Outcome(0, None, fault=kind)
    if kind == "500":
        # Stripe saves "the resulting status code and body of the first request made for any given
        # idempotency key ... including 500 errors" (docs.stripe.com/api/idempotent_requests): a
        # 500 comes from an endpoint that began executing, so every retry with its key replays it.
        error = StripeError(500, "An unknown error occurred", error_type="api_error")
    elif kind == "429_lock":
        retry = {"Stripe-Should-Retry": "true"}
        error = StripeError(429, LOCK_TIMEOUT_MESSAGE, code="lock_timeout", headers=retry)
    else:
        reason = {RATE_LIMITED_REASON: "global-rate"}
        error = StripeError(429, RATE_LIMIT_MESSAGE, code="rate_limit", headers=reason)
    outcome = _Outcome.of(error)
    outcome.fault, outcome.saved = kind, kind == "500"
    return outcome
