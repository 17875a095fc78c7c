"""`make demo` is what a newcomer runs first: it must work every time and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tests.harness import PROJECT


def leftovers() -> set[Path]:
    """The demo's temporary folders, and the operator's ledger folder."""
    return {*Path(tempfile.gettempdir()).glob("bridge-demo-*"), *PROJECT.glob("state/*")}


def test_demo_runs_twice_in_a_row_and_leaves_nothing_behind() -> None:
    before = leftovers()
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-m", "tools.demo"],
            check=False,
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "redelivery (same svix-id): 200" in run.stdout
        assert '"outcome": "already_written"' in run.stdout
        assert "24 windows, total 4332 (report total 4332)" in run.stdout
    assert leftovers() == before
