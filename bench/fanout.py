"""`make bench-fanout`: month-end, when OpenMeter sends every subject's report at the same minute.

A Svix-like sender delivers N reports of w windows at once to the service (gunicorn, as the
container runs it) against a fake Stripe that allows R requests a second (429 `global-rate`
beyond, as Stripe does). Each failed attempt is retried on Svix's schedule (immediately, 5 s,
5 min, 30 min, 2 h, 5 h, 10 h, 10 h: docs.svix.com/retries) scaled in time, and with `--throttle`
Svix's endpoint throttling (docs.svix.com/throttling: at most T messages a second to the
endpoint, retries included) releases them at T/s. The run reports the drain time against the
floor N·w/R, the 429s, attempts per message, the messages that would have exhausted Svix's 8
attempts, and windows lost or doubled (which must be 0).
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.run import Stack, check_usage, print_table, report, running
from tests.harness import sign

# Svix's delays after each failed attempt (docs.svix.com/retries): 8 attempts in about 27.6 h.
SVIX_DELAYS = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
SVIX_ATTEMPTS = 8
CLIENT_TIMEOUT = 15.0  # Svix's: a slower answer is a failure
MAX_ATTEMPTS = 30  # the bench goes on past Svix's 8 (at the last delay) to see the drain end


@dataclass
class Outcome:
    """What one scenario measured."""

    name: str
    rate: float
    reports: int
    windows: int
    throttle: float | None
    drain: float = 0.0
    attempts: list[int] = field(default_factory=list)
    rate_limited: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    doubled: int = 0
    unfinished: int = 0

    def row(self) -> dict[str, Any]:
        """The scenario as a table row."""
        floor = self.reports * self.windows / self.rate
        writes = self.reports * self.windows
        return {
            "scenario": self.name,
            "R/s": f"{self.rate:g}",
            "N x w": f"{self.reports} x {self.windows}",
            "throttle/s": f"{self.throttle:.2f}" if self.throttle else "none",
            "drain s": round(self.drain, 1),
            "floor s": round(floor, 1),
            "drain/floor": round(self.drain / floor, 2),
            "429s": f"{self.rate_limited} ({self.rate_limited / writes:.1%})",
            "attempts mean/max": (
                f"{statistics.mean(self.attempts):.2f} / {max(self.attempts)}"
                if self.attempts
                else "-"
            ),
            f"> {SVIX_ATTEMPTS} attempts": sum(a > SVIX_ATTEMPTS for a in self.attempts),
            "Svix wait (real time)": svix_time(self.attempts),
            "unfinished": self.unfinished,
            "answers": " ".join(f"{k}:{v}" for k, v in sorted(self.answers.items())),
            "lost/doubled": f"{self.lost}/{self.doubled}",
        }


def svix_time(attempts: list[int]) -> str:
    """How long after the burst the last message's successful attempt would come in real time:
    Svix's unscaled delays before it (the attempts' own seconds apart)."""
    worst = max(attempts, default=1)
    delays = (*SVIX_DELAYS, *(SVIX_DELAYS[-1],) * max(0, worst - 1 - len(SVIX_DELAYS)))
    seconds = sum(delays[: worst - 1])
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


class Svix:
    """Delivers messages at least once: each attempt in its own thread, failures rescheduled on
    Svix's delays times `scale`, every attempt (first or retry) released at `throttle`/s if set."""

    def __init__(self, base: str, scale: float, throttle: float | None) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.scale, self.throttle = scale, throttle
        self.lock = threading.Lock()
        self.due: list[tuple[float, int]] = []  # (when, message)
        self.attempts: dict[int, int] = {}
        self.done: dict[int, float] = {}
        self.answers: dict[str, int] = {}
        self.in_flight = 0

    def deliver(self, bodies: list[str], deadline: float) -> None:
        """Sends every body until each is answered 2xx, or MAX_ATTEMPTS, or the deadline."""
        start = time.monotonic()
        self.due = [(start, number) for number in range(len(bodies))]
        heapq.heapify(self.due)
        self.attempts = dict.fromkeys(range(len(bodies)), 0)
        next_release = start
        while time.monotonic() < deadline:
            with self.lock:
                if not self.due and self.in_flight == 0:
                    return
                ready = bool(self.due) and self.due[0][0] <= time.monotonic()
                number = heapq.heappop(self.due)[1] if ready else -1
            if number < 0:
                time.sleep(0.01)
                continue
            if self.throttle:  # Svix holds throttled messages back, off the wire
                time.sleep(max(0.0, next_release - time.monotonic()))
                next_release = max(next_release, time.monotonic()) + 1.0 / self.throttle
            with self.lock:
                self.in_flight += 1
                self.attempts[number] += 1
            threading.Thread(
                target=self._attempt, args=(number, bodies[number]), daemon=True
            ).start()

    def _attempt(self, number: int, body: str) -> None:
        """One delivery attempt; a failure is rescheduled."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=CLIENT_TIMEOUT)
        try:
            connection.request("POST", "/webhook", body.encode(), sign(body, f"msg_fan_{number}"))
            response = connection.getresponse()
            answer = json.loads(response.read() or b"{}")
            status, code = response.status, answer.get("error") or answer.get("outcome", "")
        except (OSError, http.client.HTTPException, ValueError):
            status, code = 0, "timeout"
        finally:
            connection.close()
        with self.lock:
            self.in_flight -= 1
            key = f"{status} {code}".strip()
            self.answers[key] = self.answers.get(key, 0) + 1
            if 200 <= status < 300:
                self.done[number] = time.monotonic()
            elif self.attempts[number] < MAX_ATTEMPTS:
                delay = SVIX_DELAYS[min(self.attempts[number], len(SVIX_DELAYS)) - 1]
                heapq.heappush(self.due, (time.monotonic() + delay * self.scale, number))


def scenario(
    stack: Stack, name: str, reports: int, windows: int, rate: float, args: argparse.Namespace
) -> Outcome:
    """N reports of w windows sent at once (or throttled) to a fresh stack; what happened."""
    throttle = args.headroom * rate / windows if name == "throttled" else None
    outcome = Outcome(name, rate, reports, windows, throttle)
    bodies = []
    for number in range(reports):
        subject = f"customer-{number}"
        bodies.append(report(stack.windows(subject, windows, 1 + number % 97), subject))
    stack.control("rate_limit", {"rate": rate})
    svix = Svix(stack.base, args.time_scale, throttle)
    started = time.monotonic()
    svix.deliver(bodies, started + args.deadline)
    outcome.drain = max(svix.done.values(), default=started) - started
    outcome.unfinished = reports - len(svix.done)
    outcome.attempts = list(svix.attempts.values())
    outcome.answers = svix.answers
    outcome.rate_limited = stack.control("rate_limit")["refused"]
    outcome.lost, outcome.doubled = check_usage(stack)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Runs each rate throttled and not; exits 1 if anything was lost or doubled, or unfinished."""
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--rates", default="25,100", help="the fake's limits R, requests/s")
    parser.add_argument("--windows", type=int, default=24, help="windows per report (w)")
    parser.add_argument("--writes-per-rate", type=float, default=30.0,
                        help="N = ceil(this x R / w): N·w >= 30·R by default")  # fmt: skip
    parser.add_argument("--latency", type=float, default=0.05, help="fake Stripe latency (s)")
    parser.add_argument("--time-scale", type=float, default=0.01,
                        help="Svix's retry delays times this (0.01: 5 min -> 3 s)")  # fmt: skip
    parser.add_argument("--headroom", type=float, default=0.9,
                        help="throttle = headroom x R / w messages/s")  # fmt: skip
    parser.add_argument("--deadline", type=float, default=900.0, help="give up after (s)")
    parser.add_argument("--only", choices=("throttled", "unthrottled"), help="one scenario")
    parser.add_argument("--max-rate", type=float,
                        help="STRIPE_MAX_RATE (default R; 10000: no budget)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="R=25, 4 reports of 5 windows")
    args = parser.parse_args(argv)
    rates = [25.0] if args.smoke else [float(r) for r in args.rates.split(",")]
    names = [args.only] if args.only else ["throttled", "unthrottled"]
    rows, problems = [], 0
    with tempfile.TemporaryDirectory(prefix="bridge-fanout-") as folder:
        for rate in rates:
            windows = 5 if args.smoke else args.windows
            reports = 4 if args.smoke else -(-int(args.writes_per_rate * rate) // windows)
            for name in names:
                workdir = Path(folder) / f"{name}-{rate:g}"
                # The bridge's budget is the fake's whole limit: the bench is the account's
                # only user (in production STRIPE_MAX_RATE leaves room for the rest).
                budget = args.max_rate or rate
                with running(args.latency, workdir, subjects=reports, max_rate=budget) as stack:
                    outcome = scenario(stack, name, reports, windows, rate, args)
                rows.append(outcome.row())
                problems += outcome.lost + outcome.doubled + outcome.unfinished
    print(
        f"fake Stripe latency {args.latency * 1000:.0f} ms; Svix delays x {args.time_scale:g}; "
        f"STRIPE_MAX_RATE = {args.max_rate or 'R'}; gunicorn as the container runs it"
    )
    print_table(rows)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
