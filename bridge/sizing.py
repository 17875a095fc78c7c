"""Sizing for Svix's fan-out: what one wave of attempts and a message's life can write at the
rate budget, the endpoint throttle to set, and when to coarsen windows (docs/performance.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bridge.pacing import SEND_MARGIN_SECONDS

# Svix tries a message 8 times in about 27.6 h (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
# 10 h: docs.svix.com/retries), then gives up on it.
SVIX_ATTEMPTS = 8
# The throttle leaves a tenth of the budget for the reads a cold cache adds (one subscription
# a report at most) and for Svix's own overshoot ("an endpoint may potentially get messages at a
# rate of 1,050 or even higher" for 1,000/s: docs.svix.com/throttling).
THROTTLE_HEADROOM = 0.9
# A report's windows go one after another (one writer per Stripe object): at a typical 250 ms a
# Stripe write, this is how long each takes in the sizing.
WRITE_SECONDS = 0.25


@dataclass(frozen=True)
class Sizing:
    """The month-end burst against the rate budget."""

    rate: float  # STRIPE_MAX_RATE, requests/s
    budget: float  # TIME_BUDGET_SECONDS
    reports: int  # reports sent at once (N): subjects x meters
    windows: int  # windows a report (w)
    grace: float  # INVOICE_GRACE_SECONDS: the last period's usage must land before this

    @property
    def wave(self) -> int:
        """Windows one wave of attempts (every message tried once, at once) can write."""
        return int((self.budget - SEND_MARGIN_SECONDS) * self.rate)

    @property
    def life(self) -> int:
        """Windows Svix's 8 waves can write, unthrottled: past this, messages are given up."""
        return SVIX_ATTEMPTS * self.wave

    @property
    def total(self) -> int:
        """Windows the burst holds (N x w)."""
        return self.reports * self.windows

    @property
    def floor(self) -> float:
        """Seconds to write them all at the budget (N x w / R)."""
        return self.total / self.rate

    @property
    def throttle(self) -> float:
        """The Svix endpoint throttle, in messages/s: the budget's worth of reports a second."""
        return THROTTLE_HEADROOM * self.rate / max(self.windows, 1)

    @property
    def waves(self) -> int:
        """Waves of attempts an unthrottled burst needs."""
        return math.ceil(self.total / max(self.wave, 1))

    @property
    def one_attempt(self) -> int:
        """Windows one report can write in one attempt, one after another."""
        return int((self.budget - SEND_MARGIN_SECONDS) / max(WRITE_SECONDS, 1 / self.rate))

    def advice(self) -> list[str]:
        """What to do, in order of urgency."""
        lines = []
        if self.windows > self.one_attempt:
            lines.append(
                f"a report of {self.windows} windows needs more than one attempt at "
                f"{WRITE_SECONDS * 1000:.0f} ms a write ({self.one_attempt} fit in one): "
                "coarsen the windows, or narrow the report's range"
            )
        if self.floor > self.grace:
            lines.append(
                f"the burst needs {self.floor:.0f} s at {self.rate:g}/s, longer than the invoice "
                f"grace period ({self.grace:.0f} s): the last period's usage would be late. "
                "Coarsen the windows (fewer per report), or move the prices to Billing meters "
                "and raise STRIPE_MAX_RATE (live meter events have their own 1,000/s limit)"
            )
        if self.waves > SVIX_ATTEMPTS:
            lines.append(
                f"without the throttle, the burst needs {self.waves} waves of attempts and Svix "
                f"makes {SVIX_ATTEMPTS}: messages would be given up. Set the throttle"
            )
        elif self.waves > 1:
            lines.append(
                f"without the throttle, the burst needs {self.waves} waves of attempts (Svix's "
                "next ones come 5 s, 5 min, 30 min ... later): set the throttle to drain it "
                "in one pass"
            )
        else:
            lines.append("the burst fits in one wave: the throttle is optional")
        return lines

    def lines(self) -> list[str]:
        """The sizing as check-config prints it."""
        return [
            f"sizing: STRIPE_MAX_RATE {self.rate:g}/s, {self.reports} reports "
            f"(subjects x meters) of {self.windows} windows = {self.total} windows",
            f"  one wave of attempts writes at most {self.wave} windows "
            f"({self.budget - SEND_MARGIN_SECONDS:g} s x {self.rate:g}/s); "
            f"a message's life ({SVIX_ATTEMPTS} attempts) {self.life}",
            f"  the burst takes at least {self.floor:.1f} s (N x w / R)",
            f"  Svix endpoint throttle: {self.throttle:.2f} messages/s "
            f"({THROTTLE_HEADROOM:g} x R / w); drains in about "
            f"{self.reports / self.throttle:.0f} s",
            *(f"  {line}" for line in self.advice()),
        ]
