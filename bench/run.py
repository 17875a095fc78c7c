"""`make bench`: the service as its container starts it, a fake Stripe with latency, load.

All on this machine: the fake Stripe in its own process (tests/fake_stripe/), the service under
gunicorn with gunicorn.conf.py, and a closed-loop load generator here. After every run the fake
Stripe's usage is compared with what was sent: lost and doubled windows are counted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import ledger_cost
from bridge.stripe_api import USAGE_RECORDS_API_VERSION
from tests.harness import (
    Running,
    fake_and_service,
    free_port,
    healthy,
    sign,
    start_service,
    wait_until,
    worker_pids,
)

API_KEY = "sk_test_bench"
# At month-end thousands of customers report at once: at least one subject per sender, so that
# senders do not wait for one another on a shared subscription item.
SUBJECTS = 64
# A non-2xx answer (counted in the table) is retried this many times, as Svix would retry it.
SVIX_RETRIES = 8
# Windows are minutes from 20 days ago on, counted per subject (each has its own subscription
# item): a full run sends about 38,000 windows, 26 days of minutes if they were counted together,
# and windows past now were refused (make bench's soak once lost 7,564 that way).
FIRST_WINDOW = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=20)


@dataclass
class Stack(Running):
    """The fake Stripe and the service, both running, and the usage sent to them."""

    items: dict[str, str] = field(default_factory=dict)  # subject -> subscription item
    sent: dict[tuple[str, int], int] = field(default_factory=dict)  # (item, timestamp) -> value
    next_window: dict[str, int] = field(default_factory=dict)  # subject -> its next minute
    lock: threading.Lock = field(default_factory=threading.Lock)

    def windows(self, subject: str, count: int, value: int) -> list[dict[str, Any]]:
        """`count` fresh one-minute windows for subject, each remembered as sent with value."""
        with self.lock:
            first = self.next_window.get(subject, 0)
            self.next_window[subject] = first + count
        rows = []
        for index in range(first, first + count):
            start = FIRST_WINDOW + timedelta(minutes=index)
            rows.append(
                {
                    "subject": subject,
                    "value": value,
                    "windowStart": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "windowEnd": (start + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            )
            with self.lock:
                self.sent[self.items[subject], int(start.timestamp()) + 1] = value
        return rows

    def processes(self) -> list[int]:
        """The gunicorn master and its workers."""
        children = Path(f"/proc/{self.service.pid}/task/{self.service.pid}/children").read_text()
        return [self.service.pid, *map(int, children.split())]


def report(rows: list[dict[str, Any]], subject: str) -> str:
    """A report.meter body."""
    return json.dumps(
        {
            "type": "report.meter",
            "meter": {"slug": "api_requests", "aggregation": "SUM", "windowSize": "MINUTE"},
            "query": {"subject": subject, "windowSize": "MINUTE"},
            "usage": rows,
        }
    )


@contextmanager
def running(
    latency: float,
    workdir: Path,
    budget: float = 12.0,
    *,
    subjects: int = SUBJECTS,
    max_rate: float = 10_000.0,
) -> Iterator[Stack]:
    """Starts the fake Stripe and the service; stops both afterwards. The rate budget is as good as
    unlimited unless max_rate says otherwise: paced, but never waiting."""
    prices = [{"id": "price_1Bench", "usage_type": "metered", "aggregate_usage": "sum"}]
    subscriptions = [{"id": f"sub_1Bench{n}", "prices": ["price_1Bench"]} for n in range(subjects)]
    mapping = "".join(f"  customer-{n}: sub_1Bench{n}\n" for n in range(subjects))
    config = f"meters:\n  api_requests: price_1Bench\nsubjects:\n{mapping}"
    env = {
        "STRIPE_API_KEY": API_KEY,
        "STATE_PATH": str(workdir / "state.sqlite3"),
        "TIME_BUDGET_SECONDS": str(budget),
        "STRIPE_MAX_RATE": f"{max_rate:.3f}",
    }
    fixtures = {"prices": prices, "subscriptions": subscriptions}
    with fake_and_service(workdir, fixtures, config, env, latency) as started:
        stack = Stack(**{f.name: getattr(started, f.name) for f in fields(Running)})
        state = stack.control("state")
        for n in range(subjects):
            items = state["subscriptions"][f"sub_1Bench{n}"]["items"]["data"]
            stack.items[f"customer-{n}"] = items[0]["id"]
        yield stack


class Sender:
    """One Svix-like sender: a kept-alive connection, signed bodies, a 15 s timeout."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=15)

    def send(self, body: str, message_id: str) -> tuple[int, float, dict[str, Any]]:
        """POSTs one webhook; returns status, seconds and answer."""
        started = time.perf_counter()
        try:
            self.connection.request("POST", "/webhook", body.encode(), sign(body, message_id))
            response = self.connection.getresponse()
            answer = json.loads(response.read())
            status = response.status
        except (OSError, http.client.HTTPException):
            self.connection.close()
            return 0, time.perf_counter() - started, {}
        return status, time.perf_counter() - started, answer


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of these processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def memory_kib(pids: list[int], kind: str) -> int:
    """The sum of Pss or Rss (KiB) over these processes."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{kind}:"):
                total += int(line.split()[1])
    return total


@dataclass
class Result:
    """What one scenario measured."""

    name: str
    webhooks: int
    seconds: float
    latencies: list[float]
    non_2xx: int
    cpu_ms: float
    stripe_calls: int

    def row(self) -> dict[str, Any]:
        """The scenario as a table row."""
        ordered = sorted(self.latencies)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

        return {
            "scenario": self.name,
            "webhooks": self.webhooks,
            "throughput/s": round(self.webhooks / self.seconds, 1),
            "p50 ms": round(statistics.median(ordered) * 1000, 1),
            "p90 ms": round(pct(0.90), 1),
            "p99 ms": round(pct(0.99), 1),
            "cpu ms/webhook": round(self.cpu_ms / self.webhooks, 2),
            "stripe calls/webhook": round(self.stripe_calls / self.webhooks, 2),
            "non-2xx": self.non_2xx,
        }


def load(
    stack: Stack, name: str, concurrency: int, webhooks: int, windows: int, *, fresh: bool = False
) -> Result:
    """A closed loop: `concurrency` senders, each sending again as soon as it has an answer; with
    fresh, each webhook on a new connection (which either worker may accept)."""
    calls_before = stack.control("state")["requests"]
    pids = stack.processes()
    cpu_before = cpu_seconds(pids)
    latencies: list[float] = []
    failures = 0
    counter = iter(range(webhooks))
    counter_lock = threading.Lock()

    def sender_loop(worker: int) -> None:
        nonlocal failures
        sender = Sender(stack.base)
        while True:
            with counter_lock:
                number = next(counter, None)
            if number is None:
                return
            if fresh:
                sender.connection.close()
                sender = Sender(stack.base)
            subject = f"customer-{number % SUBJECTS}"
            body = report(stack.windows(subject, windows, 1 + number % 97), subject)
            status, seconds, _ = sender.send(body, f"msg_{name}_{number}")
            with counter_lock:
                latencies.append(seconds)
                failures += not 200 <= status < 300
            for _ in range(SVIX_RETRIES):  # a non-2xx is retried, as Svix would: never lost
                if 200 <= status < 300:
                    break
                status, _, _ = sender.send(body, f"msg_{name}_{number}")

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(sender_loop, range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pids) - cpu_before
    calls = stack.control("state")["requests"] - calls_before
    return Result(name, webhooks, elapsed, latencies, failures, cpu * 1000, calls)


def check_usage(stack: Stack) -> tuple[int, int]:
    """(lost, doubled): windows whose usage in the fake Stripe is below or above what was sent."""
    records = stack.control("state")["usage_records"]
    lost = doubled = 0
    for (item, timestamp), value in stack.sent.items():
        landed = int(records.get(item, {}).get(str(timestamp), 0))
        lost += landed < value
        doubled += landed > value
    expected = {(item, ts) for item, ts in stack.sent}
    extra = sum(
        1 for item, stamps in records.items() for ts in stamps if (item, int(ts)) not in expected
    )
    return lost, doubled + extra


def big_report(stack: Stack, windows: int) -> dict[str, Any]:
    """One report of `windows` windows, retried on 503 as Svix would; the worker that handled each
    failed attempt is killed (SIGKILL) before the next one."""
    subject = "customer-0"
    body = report(stack.windows(subject, windows, 3), subject)
    attempts: list[str] = []
    while len(attempts) < 10:
        status, seconds, answer = Sender(stack.base).send(body, "msg_big_report")
        done = answer.get("written") if status != 200 else answer.get("sent")
        attempts.append(f"{status} in {seconds:.1f} s ({done} written)")
        if status == 200:
            break
        webhooks = [line for line in stack.log_path.read_text().splitlines() if '"webhook"' in line]
        os.kill(json.loads(webhooks[-1])["pid"], signal.SIGKILL)
        time.sleep(1)
    return {"windows": windows, "attempts": len(attempts), "each": "; ".join(attempts)}


def fake_alone(stack: Stack, requests: int) -> float:
    """The p50 (ms) of one usage record posted straight to the fake Stripe, as the bridge would:
    what of a webhook's latency is the fake's own."""
    address = urllib.parse.urlsplit(stack.fake_url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=15)
    headers = {"Authorization": f"Bearer {API_KEY}", "Stripe-Version": USAGE_RECORDS_API_VERSION,
               "Content-Type": "application/x-www-form-urlencoded"}  # fmt: skip
    latencies = []
    for number in range(requests):
        [row] = stack.windows("customer-0", 1, 1 + number % 97)
        start = datetime.strptime(row["windowStart"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        body = urllib.parse.urlencode(
            {"quantity": row["value"], "timestamp": int(start.timestamp()) + 1, "action": "set"}
        )
        path = f"/v1/subscription_items/{stack.items['customer-0']}/usage_records"
        started = time.perf_counter()
        connection.request("POST", path, body, headers | {"Idempotency-Key": f"alone_{number}"})
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        assert response.status == 200, response.status
    return statistics.median(latencies) * 1000


def floor(workdir: Path, pause: float, requests: int) -> tuple[float, float]:
    """CPU ms per request of bench/floor.py's do-nothing app under gunicorn.conf.py, one sender:
    back to back, then `pause` apart (as one sender waiting on Stripe leaves the service idle)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {"PORT": str(port), "TMPDIR": str(workdir)}
    service = start_service(env, workdir / "floor.log", "bench.floor:app")
    try:
        wait_until(
            lambda: len(worker_pids(service.pid)) == 2 and healthy(f"http://127.0.0.1:{port}")
        )
        pids = [service.pid, *worker_pids(service.pid)]
        # A webhook's size and headers; the app does not look at them.
        row = {"subject": "customer-0", "value": 1, "windowStart": "2026-01-01T00:00:00Z",
               "windowEnd": "2026-01-01T00:01:00Z"}  # fmt: skip
        body = report([row], "customer-0").encode()
        headers = sign(body.decode(), "msg_floor")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        costs = []
        for gap in (0.0, pause):
            before = cpu_seconds(pids)
            for _ in range(requests):
                time.sleep(gap)
                connection.request("POST", "/webhook", body, headers)
                connection.getresponse().read()
            costs.append((cpu_seconds(pids) - before) * 1000 / requests)
        return costs[0], costs[1]
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)


def print_table(rows: list[dict[str, Any]]) -> None:
    """A plain-text table."""
    columns = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))


SCENARIOS = ("1 sender, 1 window", "32 senders, 1 window", "1 sender, 24 windows")
WIDEST = "1 sender, 200 windows"  # the widest report one attempt writes at L = 50 ms
ROUNDS = 4  # of the 32-sender scenario; the table shows the median round (the lower of two)


def by_round(rounds: list[dict[str, Any]], latency: float) -> dict[str, str]:
    """Each 32-sender round against the latency floor 32 / L, and issue 19's targets on them."""
    floor = 32 / latency
    shares = [row["throughput/s"] / floor for row in rounds]
    cpu = [row["cpu ms/webhook"] for row in rounds]
    each = "; ".join(
        f"{row['throughput/s']}/s ({share:.0%}), {row['cpu ms/webhook']:.2f} ms"
        for row, share in zip(rounds, shares, strict=True)
    )
    return {
        f"32 senders, {len(rounds)} rounds: throughput (of 32/L = {floor:.0f}/s), CPU": each,
        "target: 32 senders >= 70% of 32/L as the median of the rounds, >= 55% in the worst": (
            f"median {statistics.median(shares):.0%}, worst {min(shares):.0%}"
        ),
        "target: CPU per webhook at 32 senders <= 1.5 ms (median of the rounds)": (
            f"{statistics.median(cpu):.2f} ms"
        ),
    }


def targets(rows: list[dict[str, Any]], facts: dict[str, Any], latency: float) -> dict[str, str]:
    """The performance targets (issues 13 and 19), read off this run's figures."""
    one, many, wide = (next(r for r in rows if r["scenario"] == name) for name in SCENARIOS)
    widest = [r for r in rows if r["scenario"] == WIDEST]
    share = one["p50 ms"] - facts["fake Stripe alone: p50 of one usage record (ms)"]
    scale = many["throughput/s"] / one["throughput/s"]
    found = {
        "target: the bridge's own share of 1 sender's p50 <= 5 ms": f"{share:.1f} ms",
        "target: 32 senders >= 20x 1 sender's throughput, 0 non-2xx": (
            f"{scale:.1f}x, {many['non-2xx']} non-2xx"
        ),
    }
    for row, windows in [(wide, 24)] + [(row, 200) for row in widest]:
        bound = windows * latency * 1000
        found[f"target: {windows} windows p50 <= 1.15 x {windows} x L"] = (
            f"{row['p50 ms']:.0f} ms = {row['p50 ms'] / bound:.2f} x {bound:.0f} ms"
        )
    return found


def main(argv: list[str] | None = None) -> int:
    """Runs the scenarios; exits 1 if any usage was lost or doubled."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--latency", type=float, default=0.05, help="fake Stripe latency (s)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--no-soak", action="store_true", help="skip the 20,000-webhook run")
    args = parser.parse_args(argv)
    scale = 0.02 if args.smoke else 1.0

    def n(count: int) -> int:
        return max(4, int(count * scale))

    # Warm means every worker has every subject's subscription cached: each subject is sent 32
    # times, each time on a new connection, which either worker may accept. (On kept-alive
    # connections a subject always went to the same sender, so to one worker, and the first
    # 32-sender round paid the other worker's fetches: 1.05 Stripe calls a webhook.)
    warm_up = (2 if args.smoke else 32) * SUBJECTS
    rows: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    problems = 0
    count = 1 if args.smoke else ROUNDS
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as folder:
        with running(args.latency, Path(folder) / "a") as stack:
            facts["start to first /healthz 200 (s)"] = round(stack.startup_seconds, 2)
            load(stack, "warm-up", 32, warm_up, 1, fresh=True)
            rows.append(load(stack, SCENARIOS[0], 1, n(300), 1).row())
            facts["fake Stripe alone: p50 of one usage record (ms)"] = round(
                fake_alone(stack, n(300)), 1
            )
            # Issue 19 judges the median and the worst of 4 rounds: where kept-alive connections
            # land decides how evenly the two workers share them, round by round.
            rounds = [load(stack, SCENARIOS[1], 32, n(3000), 1).row() for _ in range(count)]
            rows.append(sorted(rounds, key=lambda row: row["throughput/s"])[(count - 1) // 2])
            facts.update(by_round(rounds, args.latency))
            rows.append(load(stack, SCENARIOS[2], 1, n(30), 24).row())
            if not args.smoke:  # 10 s a webhook: too long for CI's smoke run
                rows.append(load(stack, WIDEST, 1, 5, 200).row())
            if not (args.smoke or args.no_soak):
                load(stack, "soak to 2,000", 32, 2000, 1)
                rss_2000 = memory_kib(stack.processes(), "Rss")
                load(stack, "soak to 20,000", 32, 18000, 1)
                rss_20000 = memory_kib(stack.processes(), "Rss")
                facts["RSS after 2,000 / 20,000 webhooks (MiB)"] = (
                    f"{rss_2000 / 1024:.1f} / {rss_20000 / 1024:.1f} "
                    f"({(rss_20000 - rss_2000) / rss_2000:+.1%})"
                )
            facts["service PSS, master + 2 workers (MiB)"] = round(
                memory_kib(stack.processes(), "Pss") / 1024, 1
            )
            lost, doubled = check_usage(stack)
            facts["lost / doubled windows"] = f"{lost} / {doubled}"
            problems += lost + doubled
        big, budget = (120, 1.0) if args.smoke else (1440, 12.0)
        with running(0.02, Path(folder) / "b", budget) as stack:
            load(stack, "warm-up", 32, warm_up, 1, fresh=True)
            result = big_report(stack, big)
            facts[f"{big}-window report at 20 ms, budget {budget:.0f} s"] = (
                f"{result['attempts']} attempts: {result['each']}"
            )
            lost, doubled = check_usage(stack)
            facts["lost / doubled windows (large report)"] = f"{lost} / {doubled}"
            problems += lost + doubled
        back_to_back, apart = floor(Path(folder) / "c", args.latency, n(300))
        facts["floor: a do-nothing app under gunicorn.conf.py, 1 sender (CPU ms/request)"] = (
            f"{back_to_back:.2f} back to back; {apart:.2f} with {args.latency * 1000:.0f} ms "
            "between requests"
        )
    facts.update(targets(rows, facts, args.latency))
    coordination = ledger_cost.run(args.smoke)
    python = sys.version.split()[0]
    print(
        f"fake Stripe latency {args.latency * 1000:.0f} ms; {os.cpu_count()} CPUs; Python {python}"
    )
    print_table(rows)
    for key, value in facts.items():
        print(f"{key}: {value}")
    print("ledger and lock per webhook, on top of its Stripe calls (bench/ledger_cost.py):")
    for row in coordination:
        print("  " + ", ".join(f"{key} {value}" for key, value in row.items()))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
