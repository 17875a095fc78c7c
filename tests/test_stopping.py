"""Stops never hang: `make run` stopped while busy, as a terminal's Ctrl-C and an orchestrator do.

A terminal's Ctrl-C sends SIGINT to every process of the group (make, gunicorn's master and its
workers); the master then sends each worker SIGQUIT. gthread's quit handler once deadlocked on its
thread pool's lock when that landed while the worker was starting a pool thread (gunicorn.conf.py,
_quit_gracefully): the stop then took graceful_timeout (20 s) and ended in SIGKILL and a false
"Perhaps out of memory?". Pool threads start during a worker's first burst of concurrent
requests, so each stop here comes right after a fresh service gets one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import Billing
from tests.harness import PROJECT, free_port, healthy, hours_ago, post, report, sign, wait_until

STOPS = 20
# A stop waits for in-flight webhooks (milliseconds against the local fake); a deadlocked worker
# holds it for graceful_timeout (20 s). Generous for a busy machine, far below that.
STOP_DEADLINE_SECONDS = 10.0
# How a stop arrives: a terminal's Ctrl-C (the group), `kill -INT` or `docker stop` (the master,
# PID 1 in a container), or SIGTERM to the whole group (some supervisors).
MODES = [("group", signal.SIGINT)] * 14 + [
    ("master", signal.SIGINT),
    ("master", signal.SIGTERM),
    ("group", signal.SIGTERM),
] * 2


def burst(base: str, stop: int, webhooks: int, probes: int) -> list[threading.Thread]:
    """Requests at once, each on its own connection: signed webhooks that write to the fake
    Stripe, and cheap probes that only make the workers start more pool threads."""

    def deliver(number: int) -> None:
        body = json.dumps(report([number + 1], first=hours_ago(2 + number)))
        with contextlib.suppress(OSError):  # a connection the stopping service never accepted
            post(f"{base}/webhook", body, sign(body, f"msg_stop{stop}_{number}"))

    def probe(number: int) -> None:
        healthy(base)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(webhooks)]
    threads += [threading.Thread(target=probe, args=(n,)) for n in range(probes)]
    for thread in threads:
        thread.start()
    return threads


def start_and_stop(
    number: int, target: str, signum: int, environment: dict[str, str], folder: Path
) -> tuple[float, str]:
    """Starts `make run`, makes it busy, stops it; returns how long the stop took, and its log."""
    port = free_port()
    log_path = folder / f"run{number}.log"
    env = os.environ | environment | {"PORT": str(port), "TMPDIR": str(folder)}
    env["STATE_PATH"] = str(folder / f"state{number}.sqlite3")
    with log_path.open("wb") as log:
        make = subprocess.Popen(
            ["make", "-s", "run"],
            cwd=PROJECT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's job
        )
    base = f"http://127.0.0.1:{port}"
    threads: list[threading.Thread] = []
    try:
        wait_until(lambda: healthy(base) or make.poll() is not None, timeout=60)
        assert make.poll() is None, log_path.read_text()
        threads = burst(base, number, webhooks=4, probes=28)
        time.sleep(random.Random(number).uniform(0.0, 0.1))
        started = time.monotonic()
        if target == "group":
            os.killpg(make.pid, signum)
        else:
            master = int(Path(f"/proc/{make.pid}/task/{make.pid}/children").read_text())
            os.kill(master, signum)
        make.wait(timeout=60)
        duration = time.monotonic() - started
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(timeout=30)
        for thread in threads:
            thread.join(timeout=30)
    return duration, log_path.read_text()


def test_a_busy_service_stops_quickly_twenty_times(
    environment: dict[str, str], billing: Billing, tmp_path: Path
) -> None:
    # Four at a time: each start costs a second or two of CPU, and a hang would cost 20 s.
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(start_and_stop, number, target, signum, environment, tmp_path)
            for number, (target, signum) in enumerate(MODES)
        ]
        stops = [future.result() for future in futures]
    assert len(stops) == STOPS
    for number, ((duration, text), mode) in enumerate(zip(stops, MODES, strict=True)):
        assert duration < STOP_DEADLINE_SECONDS, (number, mode, duration, text[-3000:])
        assert "out of memory" not in text and "was sent SIG" not in text, (number, text[-3000:])
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert [line for line in lines if line["level"] in {"error", "critical"}] == [], number
        assert lines[-1]["message"] == "Shutting down: Master", (number, text[-3000:])
