"""`make try`: the fake Stripe and the service against it, for trying the bridge by hand.

The fake Stripe holds the prices and subscription of the shipped config.yaml
(docs/fake-stripe-fixtures.json) on 127.0.0.1:12111; the service runs as `make run` does, on
$PORT (8080), with the fake's key and a throw-away webhook secret. Its ledger is a temporary one,
removed at the end: a fresh fake would otherwise meet windows the ledger says were written.
Ctrl-C stops both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from tests.fake_stripe.__main__ import port_problem, read_fixtures
from tests.fake_stripe.server import FakeStripe
from tests.harness import PROJECT, dockerfile_cmd

TRY_KEY = "sk_test_fake"
# Not a secret: a throw-away key for signing by hand ("local-try-only-not-real!" in base64).
TRY_SECRET = "whsec_bG9jYWwtdHJ5LW9ubHktbm90LXJlYWwh"  # noqa: S105  # the README's, for local tries
FAKE_PORT = int(os.environ.get("FAKE_STRIPE_PORT", "12111"))  # tests pick a free one
FIXTURES = PROJECT / "docs" / "fake-stripe-fixtures.json"
EXAMPLE = "tests/examples/report-daily-hourly-windows.json"


def main() -> int:
    """Runs the fake and the service until Ctrl-C (or SIGTERM); returns the exit status."""
    fake = FakeStripe(TRY_KEY)
    fake.add_fixtures(read_fixtures(FIXTURES))
    try:
        fake_url = fake.start("127.0.0.1", FAKE_PORT)
    except OSError as error:
        print(
            f"make try: cannot start the fake Stripe: {port_problem(error, FAKE_PORT)}",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="bridge-try-") as workdir:
        env = os.environ | {
            "STRIPE_API_KEY": TRY_KEY,
            "OPENMETER_WEBHOOK_SECRET": TRY_SECRET,
            "STRIPE_API_BASE": fake_url,
            "STATE_PATH": str(Path(workdir) / "ledger.sqlite3"),
        }
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        port = env.setdefault("PORT", "8080")
        print(instructions(fake_url, port), flush=True)
        # The Dockerfile's CMD, a fixed argv; its log goes to this terminal.
        service = subprocess.Popen(dockerfile_cmd(), cwd=PROJECT, env=env)  # noqa: S603

        def forward(signum: int, _frame: FrameType | None) -> None:
            """Passes a signal sent to this process alone on (Ctrl-C reaches the whole group)."""
            if service.poll() is None:
                service.send_signal(signum)

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, forward)
        status = service.wait()
    fake.stop()
    return 0 if status in (0, -signal.SIGINT, -signal.SIGTERM) else status


def instructions(fake_url: str, port: str) -> str:
    """What to type in another terminal."""
    return f"""
fake Stripe on {fake_url}; the service on http://127.0.0.1:{port} (Ctrl-C stops both).
In another terminal:

  export OPENMETER_WEBHOOK_SECRET={TRY_SECRET}
  make send FILE={EXAMPLE} URL=http://127.0.0.1:{port}/webhook
  curl -s {fake_url}/_fake/state
"""


if __name__ == "__main__":
    sys.exit(main())
