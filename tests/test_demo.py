"""`make demo` is what a newcomer runs first: it must work every time and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.harness import PROJECT


def operators_state() -> set[Path]:
    """What the operator's ledger folder holds."""
    return set(PROJECT.glob("state/*"))


def test_demo_runs_twice_in_a_row_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # A TMPDIR of its own: other runs of the demo on this machine come and go in the shared one,
    # and everything the demo and its service make there (folders, metrics) must be gone after.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    before = operators_state()
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-m", "tools.demo"],
            check=False,
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "redelivery (same svix-id): 200" in run.stdout
        assert '"outcome": "already_written"' in run.stdout
        assert "24 windows, total 4332 (report total 4332)" in run.stdout
    assert sorted(tmp_path.iterdir()) == []
    assert operators_state() == before
