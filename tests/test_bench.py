"""The benchmark's short smoke run: it starts, drives load, and finds nothing lost or doubled.

Not a timed test: the figures are printed by `make bench`, never asserted here.
"""

from __future__ import annotations

import subprocess
import sys

from bench.profile import OTHER, costs, parse_collapsed
from tests.harness import PROJECT


def test_bench_smoke_runs_and_loses_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost / doubled windows: 0 / 0" in result.stdout
    assert "lost / doubled windows (large report): 0 / 0" in result.stdout


def test_transport_comparison_runs_both_transports() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.transport", "--rounds", "1", "--calls", "8"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "urllib3 (BudgetHTTPClient)" in result.stdout
    assert "requests (RequestsClient)" in result.stdout


def test_profile_charges_library_frames_to_their_caller_component() -> None:
    raw = [
        "process 1;webhook (/srv/app.py:10);send (/v/site-packages/stripe/_x.py:5);"
        "urlopen (urllib3/connectionpool.py:7);recv (/py/socket.py:3) 6",
        "process 1;webhook (/srv/app.py:10);record (/srv/bridge/ledger.py:40) 3",
        "process 1;dumps (/py/json/encoder.py:1) 1",
    ]
    by_component, by_function = costs(parse_collapsed(raw))
    assert by_component == {"HTTP to Stripe (urllib3)": 6, "ledger (SQLite)": 3, OTHER: 1}
    assert by_function["recv (/py/socket.py)"] == 6
