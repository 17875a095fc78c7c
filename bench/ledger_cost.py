"""What coordination costs: the ledger and its lock, per webhook, on SQLite and on PostgreSQL.

One webhook's ledger work, as process_event does it for a warm one-window meter-event report:
begin (first sight), claim, written_elsewhere, then the critical section around pending and
record. Senders run the way gunicorn does (1 sender: one process; 32: two processes of 16 threads),
each on a Stripe object of its own, back to back. Stripe is not called: this is the cost on top of
the one Stripe call such a webhook makes. PostgreSQL runs where tests/postgres.py can start one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal

from bridge.budget import time_budget
from bridge.ledger import Ledger, Message
from bridge.ledger_postgres import PostgresLedger
from bridge.ledger_sqlite import SqliteLedger
from bridge.planning import Write
from bridge.quantities import MeterValue
from bridge.report import Window
from bridge.targets import Claim
from tests.postgres import PostgresServer, why_not

START = datetime(2026, 11, 1, tzinfo=UTC)


def one_webhook(ledger: Ledger, sender: str, number: int) -> float:
    """One webhook's ledger work; its wall time in seconds."""
    began = time.perf_counter()
    message_id, place = f"msg_{sender}_{number}", f"meter_events/cus_{sender}/mtr_bench"
    seen = ledger.begin(message_id, time.time())
    claim = Claim(f"cus_{sender}", "mtr_bench", f"subject-{sender}", f"sub_{sender}", "tokens")
    ledger.claim(claim, lambda held: True)
    ledger.written_elsewhere(message_id, place)
    message = Message(message_id, "digest", seen.first_seen)
    stamp = int(START.timestamp()) + 60 * number
    window = Window(START, START, Decimal(1))
    write = Write(window, stamp, MeterValue(Decimal(1)), f"om-{message_id}")
    with time_budget(12), ledger.section(f"cus_{sender}/mtr_bench"):
        pending = ledger.pending([write], place, False, message)
        ledger.record(message, True, place, pending.writes)
    return time.perf_counter() - began


def sender_process(kind: str, where: str, process: int, threads: int, each: int) -> list[float]:
    """One worker-like process: `threads` senders, `each` webhooks apiece; every duration."""
    ledger: Ledger = SqliteLedger(where) if kind == "sqlite" else PostgresLedger(where)
    durations: list[float] = []
    guard = threading.Lock()

    def sender(thread: int) -> None:
        """Sends back to back."""
        mine = [one_webhook(ledger, f"{process}x{thread}", n) for n in range(each)]
        with guard:
            durations.extend(mine)

    pool = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return durations


def measure(kind: str, where: str, senders: int, webhooks: int) -> dict[str, object]:
    """Runs `webhooks` webhooks over `senders` senders; the row that reports them."""
    processes = 1 if senders == 1 else 2
    threads, each = senders // processes, max(webhooks // senders, 1)
    context = multiprocessing.get_context("fork")
    began = time.perf_counter()
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        runs = [
            pool.submit(sender_process, kind, where, p, threads, each) for p in range(processes)
        ]
        durations = [d for run in runs for d in run.result()]
    wall = time.perf_counter() - began
    ms = sorted(d * 1000 for d in durations)
    return {
        "ledger": kind,
        "senders": senders,
        "webhooks": len(ms),
        "mean ms": round(statistics.fmean(ms), 2),
        "p50 ms": round(ms[len(ms) // 2], 2),
        "p99 ms": round(ms[min(int(len(ms) * 0.99), len(ms) - 1)], 2),
        "webhooks/s": round(len(ms) / wall),
    }


def run(smoke: bool, say: Callable[[str], None] = print) -> list[dict[str, object]]:
    """Both backends at 1 and 32 senders (PostgreSQL only where one can run)."""
    webhooks = {1: 40 if smoke else 1000, 32: 128 if smoke else 6400}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bridge-ledger-cost-") as folder:
        for senders, count in webhooks.items():
            rows.append(measure("sqlite", f"{folder}/s{senders}.sqlite3", senders, count))
    if reason := why_not():
        say(f"PostgreSQL not measured: {reason}")
        return rows
    server = PostgresServer()
    try:
        server.start()
        for senders, count in webhooks.items():
            rows.append(measure("postgres", server.create_database(), senders, count))
    finally:
        server.remove()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Prints the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_cost", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="a few webhooks, for CI")
    args = parser.parse_args(argv)
    rows = run(args.smoke)
    print("ledger and lock per webhook (no Stripe call):")
    for row in rows:
        print("  " + ", ".join(f"{key} {value}" for key, value in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
