"""`python -m bench.transport`: the CPU one Stripe call costs the bridge's process, per transport.

The two candidates of issue 13, each cutting every request's timeout to the webhook's budget:
the bridge's BudgetHTTPClient (urllib3's pool), and stripe's RequestsClient over a requests
Session whose adapter does the cutting. Both drive the same stripe client against the fake
Stripe (its own process, no latency), one thread and then 16 (gunicorn's threads a worker), in
alternating rounds so that a busy machine weighs on both alike. CPU is each calling thread's own.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import stripe

from bridge.budget import time_left
from bridge.stripe_api import USAGE_RECORDS_API_VERSION
from bridge.transport import STRIPE_READ_TIMEOUT, BudgetHTTPClient
from tests.harness import PROJECT, fake_control

API_KEY = "sk_test_transport"


class BudgetAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, each request's timeout cut to what is left of the webhook's budget."""

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        """Sends with the budget's timeout."""
        kwargs["timeout"] = min(STRIPE_READ_TIMEOUT, max(time_left(), 0.05))
        return super().send(request, *args, **kwargs)


def requests_client() -> stripe.HTTPClient:
    """stripe's RequestsClient over one Session (shared by the threads) with the budget adapter."""
    session = requests.Session()
    adapter = BudgetAdapter(pool_maxsize=32, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return stripe.RequestsClient(timeout=STRIPE_READ_TIMEOUT, session=session)


TRANSPORTS: dict[str, Callable[[], stripe.HTTPClient]] = {
    "urllib3 (BudgetHTTPClient)": BudgetHTTPClient,
    "requests (RequestsClient)": requests_client,
}


def cpu_per_call(client: stripe.StripeClient, item: str, threads: int, calls: int) -> float:
    """Microseconds of CPU per usage-record POST, summed over the calling threads."""
    timestamp = int(time.time()) - 3600
    spent: list[float] = []
    lock = threading.Lock()

    def worker(number: int) -> None:
        started = time.thread_time()
        for call in range(calls):
            client.raw_request(
                "post",
                f"/v1/subscription_items/{item}/usage_records",
                quantity=call,
                timestamp=timestamp,
                action="set",
                stripe_version=USAGE_RECORDS_API_VERSION,
                idempotency_key=f"{time.time_ns()}-{number}-{call}",
            )
        with lock:
            spent.append(time.thread_time() - started)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return sum(spent) / (threads * calls) * 1e6


@contextmanager
def fake_stripe(folder: Path, fixtures: dict[str, Any]) -> Iterator[str]:
    """The fake Stripe in its own process, without latency; yields its URL."""
    (folder / "fixtures.json").write_text(json.dumps(fixtures))
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_stripe", "--port", "0", "--api-key", API_KEY,
         "--fixtures", str(folder / "fixtures.json")],
        cwd=PROJECT, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert fake.stdout
        yield fake.stdout.readline().decode().strip()
    finally:
        fake.send_signal(signal.SIGTERM)
        fake.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    """Prints the median CPU per call of each transport, for 1 and 16 threads."""
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400, help="calls per thread and round")
    args = parser.parse_args(argv)
    stripe.enable_telemetry = False
    fixtures = {
        "prices": [{"id": "price_1T", "usage_type": "metered", "aggregate_usage": "sum"}],
        "subscriptions": [{"id": "sub_1T", "prices": ["price_1T"]}],
    }
    results: dict[tuple[str, int], list[float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bridge-transport-") as folder,
        fake_stripe(Path(folder), fixtures) as fake_url,
    ):
        state = fake_control(fake_url, "state")
        item = state["subscriptions"]["sub_1T"]["items"]["data"][0]["id"]
        clients = {
            name: stripe.StripeClient(
                API_KEY,
                base_addresses={"api": fake_url},
                max_network_retries=0,
                http_client=make(),
            )
            for name, make in TRANSPORTS.items()
        }
        for client in clients.values():  # warm: connections open, code paths run once
            cpu_per_call(client, item, 16, 20)
        for _ in range(args.rounds):
            for threads in (1, 16):
                for name, client in clients.items():
                    calls = args.calls if threads == 1 else max(1, args.calls // 8)
                    cost = cpu_per_call(client, item, threads, calls)
                    results.setdefault((name, threads), []).append(cost)
    print(f"median over {args.rounds} rounds; CPU us per Stripe call in the calling threads")
    for (name, threads), costs in results.items():
        spread = f"{min(costs):.0f}-{max(costs):.0f}"
        print(f"{name:28} {threads:2} thread(s): {statistics.median(costs):6.0f} ({spread})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
