"""`make try` starts the fake Stripe and the service together, as the README's quick start says;
Ctrl-C stops both. A busy port gets a message saying what to do, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.harness import PROJECT, free_port, healthy, wait_until
from tools.try_it import EXAMPLE, TRY_SECRET


def test_make_try_serves_the_readme_steps_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    port, fake_port = free_port(), free_port()
    env = os.environ | {
        "PORT": str(port),
        "FAKE_STRIPE_PORT": str(fake_port),
        "TMPDIR": str(tmp_path),
    }
    log_path = tmp_path / "try.log"
    with log_path.open("wb") as log:
        make = subprocess.Popen(
            ["make", "-s", "try"], cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's job: Ctrl-C goes to the whole group
        )  # fmt: skip
    base, fake = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{fake_port}"
    try:
        wait_until(lambda: healthy(base) or make.poll() is not None, timeout=60)
        assert make.poll() is None, log_path.read_text()
        assert f"export OPENMETER_WEBHOOK_SECRET={TRY_SECRET}" in log_path.read_text()
        # The README's next steps, in another terminal.
        sent = subprocess.run(
            ["make", "-s", "send", f"FILE={EXAMPLE}", f"URL={base}/webhook"],
            cwd=PROJECT, env=os.environ | {"OPENMETER_WEBHOOK_SECRET": TRY_SECRET},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert sent.returncode == 0 and ": 200\n" in sent.stdout, sent.stdout + sent.stderr
        with urllib.request.urlopen(f"{fake}/_fake/state", timeout=10) as response:
            state = json.loads(response.read())
        # What landed, by subscription and price (config.yaml's example IDs), not only by item.
        by_subscription = state["usage_by_subscription"]
        assert by_subscription["sub_1ExampleCustomer1"]["price_1ExampleApiRequests"] == 4332
        assert sum(state["usage_totals"].values()) == 4332
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=30)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(timeout=30)
    assert not healthy(base) and not healthy(fake)
    text = log_path.read_text()
    assert "Traceback" not in text and "was sent SIG" not in text, text[-3000:]


def test_a_busy_port_is_named_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        fake = subprocess.run(
            [sys.executable, "-m", "tests.fake_stripe", "--port", str(busy)],
            cwd=PROJECT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        env = os.environ | {"FAKE_STRIPE_PORT": str(busy), "PORT": str(free_port())}
        make = subprocess.run(
            ["make", "-s", "try"], cwd=PROJECT, env=env,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert fake.returncode == 2 and "Traceback" not in fake.stderr, fake.stderr
    assert f"cannot listen on 127.0.0.1:{busy}: port {busy} is in use" in fake.stderr
    assert "--port 0" in fake.stderr
    assert make.returncode != 0 and "Traceback" not in make.stderr, make.stderr
    assert f"cannot start the fake Stripe: port {busy} is in use" in make.stderr
