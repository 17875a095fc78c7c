"""`make chaos`: at-least-once delivery into the service while Stripe fails and workers die.

The service runs as its container starts it (the Dockerfile's CMD: gunicorn with gunicorn.conf.py,
two workers, STATE_PATH in a temporary folder; with --replicas N, N such masters behind a
round-robin "proxy", sharing one throw-away PostgreSQL ledger through DATABASE_URL) against the fake
Stripe in its own process (tests/fake_stripe/), which fails a share of all calls (500, 429 lock
timeouts with Stripe-Should-Retry, 429 rate limits, dropped connections, lost and late answers of
performed writes). A Svix-like sender delivers the reports at least once: shuffled, sometimes twice
(some of those at the same moment), retried with the same svix-id and a fresh signature on a
compressed Svix schedule, a 15 s timeout counting as a failure. Meanwhile a gunicorn worker is
SIGKILLed every few seconds. Then a correction phase, under the same faults, sets windows to v1, v2
and v1 again under new message ids. Afterwards every window in the fake Stripe must hold exactly its
value: usage records per item and timestamp (a legacy price), meter values per customer and hour (a
pre-aggregated hourly meter).

Exits 1 if a window was lost or doubled, a message never finished, the service answered anything
but 200 or 503, a fault kind was never injected, faults hit under 30 % of calls, or no worker was
killed.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import http.client
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.replicas import ledger_env, more_replicas
from tests.fake_stripe import FAULT_KINDS
from tests.harness import (
    Running,
    fake_and_service,
    sign,
    worker_pids,
)

API_KEY = "sk_test_chaos0123456789"
SUBJECTS = 20
LEGACY, METERED = "usage_records", "meter_events"
SLUGS = {LEGACY: "api_requests", METERED: "ai_tokens"}
PRICES = {LEGACY: "price_1ChaosLegacy", METERED: "price_1ChaosHourly"}
METER, EVENT_NAME = "mtr_1ChaosHourly", "chaos_tokens"
HOUR = 3600
# Svix attempts immediately, then after 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h: 8 attempts over
# 27.6 h. Compressed to seconds, the faults are not: with a worker killed every 3-4 s and 36-40 %
# of Stripe's calls failing, about one message in a thousand needed more than 8 attempts by chance
# alone. So the schedule goes on every 8 s up to 15 attempts (about 80 s), and the run reports how
# many messages needed more than Svix's 8; a message that can never finish still fails the run.
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0, *(8.0,) * 9)
SVIX_ATTEMPTS = 8
CLIENT_TIMEOUT = 15.0  # Svix's: a slower answer is a failure
STALL_SECONDS = 120.0  # no delivery answered (or timed out) for this long: the run hangs
# Each kind's share of the faults. A 429 for a rate limit pauses every worker's rate budget for a
# second before its retry, and a late answer costs a whole read timeout, so those two are rarer.
FAULT_WEIGHTS = {
    "500": 5,
    "429_lock": 5,
    "429_rate": 3,
    "drop": 4,
    "lost_response": 4,
    "late_response": 2,
}
MIN_FAULT_SHARE = 0.30
# The newest window a report holds starts this many hours back; the oldest stays within 25 days
# (usage records: the fake's billing period began 30 days ago; meter events: 35 days).
NEWEST_HOUR, OLDEST_HOUR = 2, 25 * 24


# --- what is sent, and what Stripe must hold afterwards ------------------------------------------


@dataclass
class Message:
    """One Svix message: a report body under one svix-id, delivered until it gets a 2xx."""

    id: str
    body: str
    kind: str
    attempts: int = 0
    finished: bool = False  # its delivery chain got a 2xx
    gave_up: bool = False  # its delivery chain ran out of attempts
    pending: int = 0  # deliveries scheduled or in flight
    last_timestamp: int = 0
    history: list[str] = field(default_factory=list)  # each delivery: when, which, outcome
    settled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Stream:
    """One subject's report of one meter: its Stripe object and the hours it has used."""

    subject: str
    kind: str
    stripe_object: str  # the subscription item (usage records) or the customer (meter events)
    starts: list[int] = field(default_factory=list)  # the windows it has used, newest first


@dataclass
class Plan:
    """Messages to send, and the value every window must end with."""

    streams: list[Stream]
    newest: int  # the start of the newest window any report holds
    messages: list[Message] = field(default_factory=list)
    expected: dict[tuple[str, str, int], Decimal] = field(default_factory=dict)
    # The messages that set each window to its expected value (any of them finishing sets it).
    setters: dict[tuple[str, str, int], list[Message]] = field(default_factory=dict)
    repeats: int = 0
    windows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fresh_windows(self, stream: Stream, count: int) -> list[int]:
        """`count` hours the stream has not used yet, going back in time."""
        with self.lock:
            if len(stream.starts) + count > OLDEST_HOUR - NEWEST_HOUR:
                raise SystemExit(f"too many windows: a stream has {OLDEST_HOUR} hours at most")
            starts = [self.newest - (len(stream.starts) + n) * HOUR for n in range(count)]
            stream.starts += starts
            return starts


def hour_start(hours_back: int) -> int:
    """The epoch second at which the UTC hour that many hours back starts."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return int((now - timedelta(hours=hours_back)).timestamp())


def iso(epoch: int) -> str:
    """RFC 3339 with Z, as OpenMeter writes it."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_value(kind: str, rng: random.Random) -> Decimal:
    """A whole quantity for a usage record; a value with a fraction for a meter event."""
    if kind == LEGACY:
        return Decimal(rng.randint(0, 5000))
    return Decimal(rng.randint(0, 500_000)) / 10


def report_body(stream: Stream, values: dict[int, Decimal], rng: random.Random) -> str:
    """A report.meter event: one window per hour given, some split over two groupBy rows."""
    rows = []
    for start, value in sorted(values.items()):
        parts = [value]
        if rng.random() < 0.2:  # the bridge must sum rows that share a window
            first = value * Decimal(rng.randint(0, 100)) / 100
            first = first.quantize(Decimal("0.1") if stream.kind == METERED else Decimal(1))
            parts = [first, value - first]
        for group, part in enumerate(parts):
            # Older OpenMeter sends JSON numbers, newer numeric strings: both must parse exactly.
            number: Any = str(part) if rng.random() < 0.5 else float(part)
            if stream.kind == LEGACY and not isinstance(number, str):
                number = int(part)
            rows.append(
                {
                    "subject": stream.subject,
                    "value": number,
                    "groupBy": {"model": f"m{group}"},
                    "windowStart": iso(start),
                    "windowEnd": iso(start + HOUR),
                }
            )
    rng.shuffle(rows)
    return json.dumps(
        {
            "type": "report.meter",
            "report": {"slug": "chaos"},
            "meter": {"slug": SLUGS[stream.kind], "aggregation": "SUM", "windowSize": "HOUR"},
            "query": {"subject": stream.subject, "windowSize": "HOUR", "groupBy": ["model"]},
            "usage": rows,
        }
    )


def add_message(
    plan: Plan, stream: Stream, values: dict[int, Decimal], rng: random.Random, tag: str
) -> Message:
    """A new message setting these windows; their expected values become these."""
    body = report_body(stream, values, rng)
    with plan.lock:
        message = Message(f"msg_{tag}_{len(plan.messages):05d}", body, stream.kind)
        for start, value in values.items():
            key = (stream.kind, stream.stripe_object, start)
            if plan.expected.get(key) != value:
                plan.setters[key] = []
            plan.expected[key] = value
            plan.setters[key].append(message)
        plan.messages.append(message)
    return message


def make_plan(streams: list[Stream], reports: int, rng: random.Random) -> Plan:
    """`reports` messages over every stream: 1-3 fresh windows each, or one in ten a repeat (new
    id, same windows, same values) of an earlier report, as OpenMeter resends overlapping ranges."""
    plan = Plan(streams, hour_start(NEWEST_HOUR))
    originals: list[tuple[Stream, dict[int, Decimal]]] = []
    for number in range(reports):
        if originals and rng.random() < 0.1:
            stream, values = rng.choice(originals)
            add_message(plan, stream, values, rng, "repeat")
            plan.repeats += 1
            continue
        stream = streams[number % len(streams)]
        count = rng.choice((1, 1, 2, 3))
        values = {
            start: random_value(stream.kind, rng) for start in plan.fresh_windows(stream, count)
        }
        add_message(plan, stream, values, rng, "report")
        originals.append((stream, values))
        plan.windows += count
    return plan


# --- the Svix-like sender ------------------------------------------------------------------------


@dataclass(order=True)
class Delivery:
    """One scheduled delivery attempt."""

    due: float
    order: int
    message: Message = field(compare=False)
    attempt: int = field(compare=False)  # 1 for the first of its chain
    duplicate: bool = field(compare=False)  # an extra copy outside the retry chain


class Svix:
    """At-least-once delivery: a retry chain per message, plus duplicate copies of some."""

    def __init__(
        self,
        bases: list[str],
        *,
        senders: int,
        duplicate_rate: float,
        timeout: float,
        retry_delays: tuple[float, ...],
        rng: random.Random,
    ) -> None:
        # Like a proxy in front of replicas: each attempt goes to the next one in turn.
        self._addresses = [
            (host, int(port))
            for host, port in (base.removeprefix("http://").split(":") for base in bases)
        ]
        self._turn = itertools.count()
        self._duplicate_rate = duplicate_rate
        self._timeout = timeout
        self._retry_delays = retry_delays
        self._rng = rng
        self._queue: list[Delivery] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self.progress = time.monotonic()  # when a delivery last ended
        self.answers: collections.Counter[str] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []
        self.timeouts: list[str] = []
        self._threads = [
            threading.Thread(target=self._loop, name=f"svix-{n}", daemon=True)
            for n in range(senders)
        ]
        for thread in self._threads:
            thread.start()

    def send(self, message: Message, at: float | None = None) -> None:
        """Schedules a message's first delivery (now, or at a monotonic time), maybe a copy."""
        at = time.monotonic() if at is None else at
        with self._cond:
            self._schedule(message, at, 1, duplicate=False)
            if self._rng.random() < self._duplicate_rate:
                # Half the copies arrive together with the first delivery, half a little later.
                later = 0.0 if self._rng.random() < 0.5 else self._rng.uniform(0.05, 5.0)
                self._schedule(message, at + later, 1, duplicate=True)
                self.counts["duplicate copies"] += 1
                self.counts["concurrent copies"] += later == 0.0

    def _schedule(self, message: Message, due: float, attempt: int, *, duplicate: bool) -> None:
        """Queues one delivery (the condition held)."""
        message.pending += 1
        heapq.heappush(self._queue, Delivery(due, next(self._order), message, attempt, duplicate))
        self._cond.notify()

    def wait(self, message: Message) -> bool:
        """Waits until a message has settled; False if deliveries stalled meanwhile (a hang)."""
        while not message.settled.wait(1.0):
            if time.monotonic() - self.progress > STALL_SECONDS:
                return False
        return True

    def stop(self) -> None:
        """Stops the senders (deliveries still queued are dropped)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=CLIENT_TIMEOUT + 5)

    def _loop(self) -> None:
        """One sender: takes the next due delivery, makes it, schedules what follows."""
        while True:
            with self._cond:
                while not self._stopping and (
                    not self._queue or self._queue[0].due > time.monotonic()
                ):
                    wait = self._queue[0].due - time.monotonic() if self._queue else None
                    self._cond.wait(wait)
                if self._stopping:
                    return
                delivery = heapq.heappop(self._queue)
                message = delivery.message
                # A fresh timestamp (so a fresh signature) for every attempt, as Svix signs each.
                timestamp = max(int(time.time()), message.last_timestamp + 1)
                message.last_timestamp = timestamp
                message.attempts += 1
            sent_at = time.monotonic()
            try:
                outcome, detail = self._deliver(message, timestamp)
            except Exception as error:  # a bug here: counted as unexpected, never a hang
                outcome, detail = "sender error", repr(error)
            with self._cond:
                self.progress = time.monotonic()
                copy = " copy" if delivery.duplicate else ""
                message.history.append(
                    f"#{delivery.attempt}{copy} {outcome} after {time.monotonic() - sent_at:.1f} s"
                )
                self.answers[outcome] += 1
                self.counts["deliveries"] += 1
                if delivery.attempt > 1:
                    self.counts["retries"] += 1
                if outcome not in ("200", "503", "no answer", "timeout"):
                    self.unexpected.append(f"{message.id}: {outcome} {detail}")
                if outcome == "timeout":
                    sent = datetime.fromtimestamp(timestamp, UTC).strftime("%H:%M:%S")
                    self.timeouts.append(f"{message.id} sent at {sent}Z")
                if outcome == "200":
                    if not delivery.duplicate:
                        message.finished = True
                elif not delivery.duplicate:
                    if delivery.attempt <= len(self._retry_delays):
                        due = time.monotonic() + self._retry_delays[delivery.attempt - 1]
                        self._schedule(message, due, delivery.attempt + 1, duplicate=False)
                    else:
                        message.gave_up = True
                message.pending -= 1
                if message.pending == 0 and (message.finished or message.gave_up):
                    message.settled.set()

    def _deliver(self, message: Message, timestamp: int) -> tuple[str, str]:
        """POSTs the message once over a new connection: (outcome, detail)."""
        at = datetime.fromtimestamp(timestamp, UTC)
        headers = sign(message.body, message.id, at=at)
        address = self._addresses[next(self._turn) % len(self._addresses)]
        connection = http.client.HTTPConnection(*address, timeout=self._timeout)
        try:
            connection.request("POST", "/webhook", message.body.encode(), headers)
            response = connection.getresponse()
            return str(response.status), response.read().decode(errors="replace")[:300]
        except TimeoutError:
            return "timeout", ""
        except (OSError, http.client.HTTPException) as error:  # e.g. its worker was killed
            return "no answer", type(error).__name__
        finally:
            connection.close()


# --- the worker killer ---------------------------------------------------------------------------


class Killer:
    """SIGKILLs a random gunicorn worker every few seconds; the master respawns it."""

    def __init__(self, masters: list[int], every: float, rng: random.Random) -> None:
        self.masters = masters
        self.every = every
        self.rng = rng
        self.kills = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="killer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        """Kills until stopped."""
        while not self._stopping.wait(self.rng.uniform(0.5, 1.5) * self.every):  # 2-6 s
            workers = [pid for master in self.masters for pid in worker_pids(master)]
            if not workers:
                continue
            try:
                os.kill(self.rng.choice(workers), signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills += 1

    def stop(self) -> None:
        """Stops killing."""
        self._stopping.set()
        self._thread.join(timeout=10)


# --- the stack -----------------------------------------------------------------------------------


def fixtures() -> dict[str, Any]:
    """20 customers, each with a subscription to a legacy price and a pre-aggregated meter price."""
    return {
        "meters": [
            {"id": METER, "event_name": EVENT_NAME, "formula": "sum", "event_time_window": "hour"}
        ],
        "prices": [
            {"id": PRICES[LEGACY], "usage_type": "metered", "aggregate_usage": "sum"},
            {"id": PRICES[METERED], "meter": METER},
        ],
        "subscriptions": [
            {
                "id": f"sub_1Chaos{n}",
                "customer": f"cus_Chaos{n}",
                "prices": [PRICES[LEGACY], PRICES[METERED]],
            }
            for n in range(SUBJECTS)
        ],
    }


def config_yaml() -> str:
    """Two meters and 20 subjects."""
    subjects = "".join(f"  customer-{n}: sub_1Chaos{n}\n" for n in range(SUBJECTS))
    meters = "".join(f"  {SLUGS[kind]}: {PRICES[kind]}\n" for kind in (LEGACY, METERED))
    return f"meters:\n{meters}subjects:\n{subjects}"


def running(workdir: Path, ledger: dict[str, str]) -> AbstractContextManager[Running]:
    """The fake Stripe and the service as production starts it, with the ledger given."""
    # The fake has no rate limit here: faults, not pacing.
    env = {"STRIPE_API_KEY": API_KEY, "STRIPE_MAX_RATE": "1000", **ledger}
    return fake_and_service(workdir, fixtures(), config_yaml(), env)


def streams_of(stack: Running) -> list[Stream]:
    """Every subject with both kinds, and the Stripe objects their windows land on."""
    subscriptions = stack.control("state")["subscriptions"]
    streams = []
    for n in range(SUBJECTS):
        subscription = subscriptions[f"sub_1Chaos{n}"]
        items = {item["price"]["id"]: item["id"] for item in subscription["items"]["data"]}
        subject = f"customer-{n}"
        streams.append(Stream(subject, LEGACY, items[PRICES[LEGACY]]))
        streams.append(Stream(subject, METERED, subscription["customer"]))
    return streams


def fault_plan(rate: float, late_delay: float, seed: int) -> list[dict[str, Any]]:
    """Faults for every call, each kind its share of `rate`: the fake checks them in turn, so each
    one's probability is its share of the calls the ones before it let through."""
    weights = sum(FAULT_WEIGHTS.values())
    faults, taken = [], 0.0
    for number, kind in enumerate(FAULT_KINDS):
        share = rate * FAULT_WEIGHTS[kind] / weights
        fault: dict[str, Any] = {
            "kind": kind,
            "probability": share / (1 - taken),
            "seed": seed * 100 + number,
        }
        if kind == "late_response":
            fault["delay"] = late_delay
        faults.append(fault)
        taken += share
    return faults


# --- checking ------------------------------------------------------------------------------------


def landed(state: dict[str, Any]) -> dict[tuple[str, str, int], Decimal]:
    """Every window the fake Stripe holds: usage records by item, meter buckets by customer."""
    found: dict[tuple[str, str, int], Decimal] = {}
    for item, records in state["usage_records"].items():
        for timestamp, quantity in records.items():
            found[LEGACY, item, int(timestamp) - 1] = Decimal(quantity)  # start + 1 s
    for customer, buckets in state["meter_buckets"].get(METER, {}).items():
        for start, value in buckets.items():
            found[METERED, customer, int(start)] = Decimal(value)
    return found


def compare(
    plan: Plan, found: dict[tuple[str, str, int], Decimal]
) -> tuple[list[str], list[str], list[str]]:
    """(lost, doubled, undelivered): windows below their value although a message setting it was
    answered 200; windows above their value (or never sent); windows below their value whose
    messages never finished (each already a failure of its own)."""
    lost: list[str] = []
    doubled: list[str] = []
    undelivered: list[str] = []
    for key in sorted(plan.expected.keys() | found.keys()):
        want, got = plan.expected.get(key, Decimal(0)), found.get(key, Decimal(0))
        line = f"{key[0]} {key[1]} {iso(key[2])}: expected {want}, Stripe has {got}"
        if got > want:
            doubled.append(line)
        elif got < want:
            finished = any(m.finished for m in plan.setters[key])
            (lost if finished else undelivered).append(line)
    return lost, doubled, undelivered


# --- the run -------------------------------------------------------------------------------------


def correction(svix: Svix, plan: Plan, stream: Stream, rng: random.Random) -> list[Message]:
    """One window set to v1, v2, then v1 again, each message finished before the next is sent."""
    # The stream's oldest window, which a report has set already (or a fresh one if none has).
    start = stream.starts[-1] if stream.starts else plan.fresh_windows(stream, 1)[0]
    v0 = plan.expected.get((stream.kind, stream.stripe_object, start), Decimal(0))
    v1 = v2 = v0
    while v1 == v0:
        v1 = random_value(stream.kind, rng)
    while v2 in (v0, v1):
        v2 = random_value(stream.kind, rng)
    sent = []
    for value in (v1, v2, v1):
        message = add_message(plan, stream, {start: value}, rng, "correction")
        svix.send(message)
        svix.wait(message)
        sent.append(message)
        if not message.finished:
            break  # it never finished: what follows would not be a correction of it
    return sent


def main(argv: list[str] | None = None) -> int:
    """Runs the chaos test; prints what happened; 1 if anything was lost, doubled or unfinished."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--reports", type=int, default=1000, help="reports to deliver (1000)")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="spread first deliveries over this long (60)"
    )
    parser.add_argument("--corrections", type=int, default=20, help="windows to correct (20)")
    parser.add_argument("--senders", type=int, default=16, help="concurrent deliveries (16)")
    parser.add_argument("--fault-rate", type=float, default=0.40, help="faulted calls (0.40)")
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean s between kills (4)")
    parser.add_argument("--duplicates", type=float, default=0.15, help="messages sent twice")
    parser.add_argument("--late-delay", type=float, default=9.0, help="late answers' delay (9 s)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the plan and faults")
    parser.add_argument("--short", action="store_true", help="the CI run: 150 reports, ~40 s")
    parser.add_argument("--keep", type=Path, help="copy the service log and state here")
    parser.add_argument(
        "--replicas", type=int, default=1, help="gunicorn masters; 2+ share one PostgreSQL (1)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.corrections <= 2 * SUBJECTS:
        parser.error(f"--corrections: 0 to {2 * SUBJECTS} (one window per subject and kind)")
    if args.short:
        args.reports, args.seconds, args.corrections = 150, 10.0, 6
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    rng = random.Random(seed)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="bridge-chaos-") as folder,
        ledger_env(args.replicas, Path(folder)) as ledger,
        running(Path(folder), ledger) as stack,
        more_replicas(stack, args.replicas - 1, ledger | {"STRIPE_API_KEY": API_KEY},
                      Path(folder)) as others,
    ):  # fmt: skip
        bases = [stack.base, *(other.base for other in others)]
        masters = [stack.service.pid, *(other.process.pid for other in others)]
        streams = streams_of(stack)
        plan = make_plan(streams, args.reports, rng)
        stack.control("faults", fault_plan(args.fault_rate, args.late_delay, seed))
        svix = Svix(
            bases,
            senders=args.senders,
            duplicate_rate=args.duplicates,
            timeout=CLIENT_TIMEOUT,
            retry_delays=RETRY_DELAYS,
            rng=random.Random(rng.random()),
        )
        killer = Killer(masters, args.kill_every, random.Random(rng.random()))
        # Shuffled: repeats and neighbouring windows arrive in any order, at an even pace.
        order = list(plan.messages)
        rng.shuffle(order)
        phase = time.monotonic()
        for number, message in enumerate(order):
            svix.send(message, phase + args.seconds * number / max(len(order), 1))
        for message in order:
            if not svix.wait(message):
                break
        main_seconds = time.monotonic() - phase

        phase = time.monotonic()
        # Every correction on its own window, all at once; each one's steps strictly in turn.
        chosen = [(streams[n], random.Random(rng.random())) for n in range(args.corrections)]
        with ThreadPoolExecutor(max(len(chosen), 1)) as pool:
            corrections = list(pool.map(lambda job: correction(svix, plan, *job), chosen))
        correction_seconds = time.monotonic() - phase
        killer.stop()
        svix.stop()

        state = stack.control("state")
        workers = [pid for master in masters for pid in worker_pids(master)]
        service_alive = all(p.poll() is None for p in [stack.service, *(o.process for o in others)])
        log_text = "".join(
            path.read_text() for path in [stack.log_path, *(o.log_path for o in others)]
        )
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            (args.keep / "service.log").write_text(log_text)
            (args.keep / "fake_state.json").write_text(json.dumps(state, indent=1))
    total_seconds = time.monotonic() - started

    lost, doubled, undelivered = compare(plan, landed(state))
    correction_messages = [m for sequence in corrections for m in sequence]
    correction_ids = {m.id for m in correction_messages}
    main_messages = [m for m in plan.messages if m.id not in correction_ids]
    unfinished = [m for m in plan.messages if not m.finished]
    unsettled = [m for m in plan.messages if not m.settled.is_set()]
    corrected = sum(len(s) == 3 and all(m.finished for m in s) for s in corrections)
    faults = {kind: int(state["faults_injected"].get(kind, 0)) for kind in FAULT_KINDS}
    calls = int(state["requests"])
    share = sum(faults.values()) / max(calls, 1)
    crashes = log_text.count('"message": "unexpected error"')

    print(
        f"chaos run (seed {seed}): {len(main_messages)} reports ({plan.windows} windows, "
        f"{plan.repeats} repeats) over {SUBJECTS} subjects x 2 Stripe kinds, "
        f"{args.senders} senders, {os.cpu_count()} CPUs, {args.replicas} replica(s) "
        f"({'one PostgreSQL ledger' if args.replicas > 1 else 'a SQLite ledger'})"
    )
    print(
        f"durations: main phase {main_seconds:.1f} s, corrections {correction_seconds:.1f} s, "
        f"total {total_seconds:.1f} s"
    )
    print(
        f"deliveries: {svix.counts['deliveries']} (retries {svix.counts['retries']}, "
        f"duplicate copies {svix.counts['duplicate copies']}, "
        f"{svix.counts['concurrent copies']} of them sent together with the first delivery)"
    )
    print("answers: " + ", ".join(f"{k} {v}" for k, v in sorted(svix.answers.items())))
    print(
        f"faults injected: {sum(faults.values())} of {calls} Stripe calls ({share:.1%}): "
        + ", ".join(f"{kind} {count}" for kind, count in faults.items())
    )
    print(
        f"workers killed: {killer.kills} (workers alive at the end: {len(workers)}, "
        f"masters {'alive' if service_alive else 'DEAD'})"
    )
    print(
        f"messages finished: {len(plan.messages) - len(unfinished)} / {len(plan.messages)} "
        f"(reports {sum(m.finished for m in main_messages)} / {len(main_messages)}, "
        f"corrections {sum(m.finished for m in correction_messages)} / "
        f"{len(correction_messages)})"
    )
    tries = collections.Counter(
        sum(" copy " not in line for line in m.history) for m in plan.messages if m.finished
    )
    beyond = sum(count for n, count in tries.items() if n > SVIX_ATTEMPTS)
    print(
        "attempts a message needed: "
        + ", ".join(f"{n}: {count}" for n, count in sorted(tries.items()))
        + f"; more than Svix's {SVIX_ATTEMPTS}: {beyond}"
    )
    if svix.timeouts:
        print(f"no answer within {CLIENT_TIMEOUT:.0f} s: {', '.join(svix.timeouts[:10])}")
    print(f"corrections v1 -> v2 -> v1 completed: {corrected} / {args.corrections}")
    print(f"windows checked: {len(plan.expected)}; Stripe writes performed: {state['writes']}")
    print(f"lost / doubled windows: {len(lost)} / {len(doubled)}")
    if undelivered:
        print(f"windows of messages that never finished: {len(undelivered)}")

    problems = []
    if lost or doubled:
        problems += [f"lost: {line}" for line in lost[:10]]
        problems += [f"doubled: {line}" for line in doubled[:10]]
    if unfinished:
        problems.append(
            f"{len(unfinished)} message(s) never finished: "
            + "; ".join(f"{m.id}: {', '.join(m.history)}" for m in unfinished[:10])
        )
    if unsettled:
        problems.append(
            f"deliveries stalled for {STALL_SECONDS:.0f} s; {len(unsettled)} message(s) unsettled"
        )
    if corrected < args.corrections:
        problems.append(f"only {corrected} of {args.corrections} corrections completed")
    if svix.unexpected:
        problems.append(f"{len(svix.unexpected)} unexpected answer(s): {svix.unexpected[:5]}")
    if crashes:
        problems.append(f"the service logged {crashes} unexpected error(s) (500)")
    if missing := [kind for kind, count in faults.items() if not count]:
        problems.append(f"fault kinds never injected: {', '.join(missing)}")
    if share < MIN_FAULT_SHARE:
        problems.append(f"faults hit {share:.1%} of calls, under {MIN_FAULT_SHARE:.0%}")
    if not killer.kills:
        problems.append("no worker was killed")
    if not service_alive or not workers:
        problems.append("the gunicorn master or its workers did not survive")
    for problem in problems:
        print(f"FAIL: {problem}")
    print("chaos: " + ("FAILED" if problems else "passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
