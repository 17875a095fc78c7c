"""The chaos test's short run: faults, duplicates, retries and killed workers lose nothing.

`make chaos` runs the full one (1,000 reports); this one sends 150 in about 40 s.
"""

from __future__ import annotations

import subprocess
import sys

from tests.harness import PROJECT


def test_chaos_short_run_loses_and_doubles_nothing() -> None:
    result = subprocess.run(
        # One fixed plan of faults and duplicates, so that CI runs the same one every time;
        # `make chaos` draws a new seed each run (and prints it) to look further.
        [sys.executable, "-m", "bench.chaos", "--short", "--seed", "20261207"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "lost / doubled windows: 0 / 0" in result.stdout, output
    assert "messages finished: 168 / 168" in result.stdout, output
    assert "chaos: passed" in result.stdout, output
