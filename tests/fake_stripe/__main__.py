"""Serves a fake Stripe on its own, for trying the service by hand (docs/development.md).

It prints its URL, then serves until SIGTERM or SIGINT (Ctrl-C). --fixtures loads a JSON object
with the lists customers, meters, prices and subscriptions; an unknown key is refused.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.fake_stripe.fixtures import FIXTURE_KEYS, check_fixtures
from tests.fake_stripe.server import FakeStripe


def read_fixtures(path: Path) -> Any:
    """A fixtures file's document, checked: ValueError names what is wrong with it."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read it: {error}") from None
    check_fixtures(document)
    return document


def port_problem(error: OSError, port: int) -> str:
    """What a failed listen means and what to do (a port in use, above all)."""
    if error.errno == errno.EADDRINUSE:
        return (
            f"port {port} is in use (another fake Stripe? `make try` runs one; stop it, or "
            "pass --port 0 for any free port and point STRIPE_API_BASE at the URL printed)"
        )
    return error.strerror or str(error)


def main(argv: Sequence[str] | None = None) -> None:
    """Serves a fake Stripe until SIGTERM or SIGINT, printing its URL first."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_stripe", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=12111, help="0: any free port (12111)")
    parser.add_argument("--api-key", default="sk_test_fake", help="the key it takes (sk_test_fake)")
    parser.add_argument(
        "--fixtures",
        type=Path,
        metavar="FILE",
        help=f"JSON object with the lists {', '.join(FIXTURE_KEYS)} (docs/development.md)",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to answers")
    parser.add_argument(
        "--rate-limit", type=float, metavar="R", help="429 (global-rate) beyond R requests/s"
    )
    args = parser.parse_args(argv)
    fake = FakeStripe(args.api_key)
    fake.latency = args.latency
    fake.limit_rate(args.rate_limit)
    if args.fixtures:
        try:
            fake.add_fixtures(read_fixtures(args.fixtures))
        except (ValueError, TypeError) as error:  # exits 2 with the message, no traceback
            parser.error(f"--fixtures {args.fixtures}: {error}")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stopping.set())
    try:
        url = fake.start(args.host, args.port)
    except OSError as error:  # exits 2 with what to do, no traceback
        parser.error(f"cannot listen on {args.host}:{args.port}: {port_problem(error, args.port)}")
    print(url, flush=True)
    while not stopping.wait(1.0):
        pass
    fake.stop()


if __name__ == "__main__":
    main()
