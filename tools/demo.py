"""`make demo`: the bridge under gunicorn, a local fake Stripe, one signed OpenMeter report.

No keys and no network: the fake Stripe listens on 127.0.0.1 and the report is signed with a demo
secret. Prints what the service answered and what landed in "Stripe". Everything it makes (config,
ledger, log) lives in one temporary folder, removed at the end: it touches nothing of the
operator's, so it runs any number of times.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.fake_stripe import FakeStripe
from tests.harness import SECRET, example, free_port, healthy, post, sign, start_service, wait_until

DEMO_KEY = "sk_test_demo"


def main() -> int:
    """Runs the demo; returns the exit status."""
    fake = FakeStripe(api_key=DEMO_KEY)
    fake.start()
    fake.add_price("price_1DemoApiRequests", usage_type="metered", aggregate_usage="sum")
    fake.add_subscription("sub_1DemoCustomer1", prices=["price_1DemoApiRequests"])
    item = fake.item_id("sub_1DemoCustomer1", "price_1DemoApiRequests")

    workdir = Path(tempfile.mkdtemp(prefix="bridge-demo-"))
    config = workdir / "config.yaml"
    config.write_text(
        "meters:\n  api_requests: price_1DemoApiRequests\n"
        "subjects:\n  customer-1: sub_1DemoCustomer1\n"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "STRIPE_API_KEY": DEMO_KEY,
        "OPENMETER_WEBHOOK_SECRET": SECRET,
        "CONFIG_PATH": str(config),
        "STRIPE_API_BASE": fake.url,
        "PORT": str(port),
        # Its own ledger: the operator's (state/bridge.sqlite3) would answer a second demo
        # "already_written", and would keep the demo's message.
        "STATE_PATH": str(workdir / "ledger.sqlite3"),
    }
    log_path = workdir / "service.log"
    service = start_service(env, log_path)
    try:
        wait_until(lambda: healthy(base) or service.poll() is not None, timeout=20)
        if service.poll() is not None:
            print(log_path.read_text(), file=sys.stderr)
            return 1
        print(f"bridge on {base}, fake Stripe on {fake.url}\n")
        yesterday = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        body = example("report-daily-hourly-windows.json", shift_to=yesterday - timedelta(days=1))
        outcomes = []
        for attempt in ("delivery", "redelivery (same svix-id)"):
            status, answer = post(f"{base}/webhook", body, sign(body, "msg_demo_1"))
            print(f"{attempt}: {status} {json.dumps(answer)}")
            outcomes.append(answer.get("outcome"))
        records = fake.usage_records(item)
        print(f"\nUsage records on {item} (subscription sub_1DemoCustomer1):")
        for timestamp, quantity in sorted(records.items()):
            moment = datetime.fromtimestamp(timestamp, UTC).isoformat()
            print(f"  {moment}  quantity {quantity:>4}")
        expected = sum(row["value"] for row in json.loads(body)["usage"])
        total = fake.usage_total(item)
        print(f"\n{len(records)} windows, total {total} (report total {expected})")
        return 0 if total == expected and outcomes == ["written", "already_written"] else 1
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
        fake.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
