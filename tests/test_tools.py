"""The operator's commands, run exactly as the README writes them: `make send`, `make replay`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import Billing, Service
from tests.fake_stripe import FakeStripe
from tests.harness import PROJECT, SECRET, report


def make(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs a make target in the project, with env added to this environment."""
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        check=False,
        cwd=PROJECT,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_send_signs_a_report_the_service_accepts(
    service: Service, stripe_fake: FakeStripe, billing: Billing, tmp_path: Path
) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report([3, 4])))
    env = {"OPENMETER_WEBHOOK_SECRET": SECRET}
    sent = make("send", f"FILE={path}", f"URL={service.base}/webhook", env=env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert ": 200" in sent.stdout and '"outcome": "written"' in sent.stdout
    assert stripe_fake.usage_total(billing.api) == 7

    again = make(
        "send", f"FILE={path}", f"URL={service.base}/webhook", "ARGS=--message-id m1", env=env
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert stripe_fake.usage_total(billing.api) == 7  # a new message, the same windows: set again


def test_make_send_without_the_secret_says_which_variable(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("{}")
    sent = make("send", f"FILE={path}", env={"OPENMETER_WEBHOOK_SECRET": ""})
    assert sent.returncode != 0
    assert "OPENMETER_WEBHOOK_SECRET is not set" in sent.stderr


def test_make_replay_dry_run_writes_nothing(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing, tmp_path: Path
) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report([5])))
    run = make("replay", f"FILE={path}", "ARGS=--dry-run", env=environment)
    assert run.returncode == 0, run.stdout + run.stderr
    assert '"outcome": "dry_run"' in run.stdout and "would write" in run.stdout
    assert stripe_fake.usage_total(billing.api) == 0
