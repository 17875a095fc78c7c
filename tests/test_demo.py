"""`make demo` is what a newcomer runs first: it must work every time and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.harness import PROJECT


def operator_state() -> dict[Path, float]:
    """The operator's ledger folder: its files and when each last changed."""
    return {path: path.stat().st_mtime for path in PROJECT.glob("state/*")}


def test_demo_runs_twice_in_a_row_and_leaves_nothing_behind(tmp_path: Path) -> None:
    before = operator_state()
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-m", "tests.demo"],
            check=False,
            cwd=PROJECT,
            env=os.environ | {"TMPDIR": str(tmp_path)},  # its temporary folders, and only its
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "redelivery (same svix-id): 200" in run.stdout
        assert '"outcome": "already_written"' in run.stdout
        assert "24 windows, total 4332 (report total 4332)" in run.stdout
    assert list(tmp_path.iterdir()) == []
    assert operator_state() == before
