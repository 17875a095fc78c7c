"""Shared by tests, demo and benchmark: signed deliveries, a service under gunicorn."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from svix.webhooks import Webhook

PROJECT = Path(__file__).parent.parent
EXAMPLES = Path(__file__).parent / "examples"
# Svix's published test vector secret, and a second one as if in the middle of a rotation.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ROTATED_SECRET = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24tdGVzdHM="


def sign(
    body: str,
    message_id: str = "msg_test1",
    *,
    secret: str = SECRET,
    at: datetime | None = None,
    prefix: str = "svix",
) -> dict[str, str]:
    """Headers Svix would send for body, signed with the real algorithm."""
    at = at or datetime.now(UTC)
    return {
        f"{prefix}-id": message_id,
        f"{prefix}-timestamp": str(int(at.timestamp())),
        f"{prefix}-signature": Webhook(secret).sign(message_id, at, body),
        "content-type": "application/json",
    }


# The hour hours_ago() counts back from while a test runs (pinned_hour), so that a test crossing
# an hour's end still means the same windows each time it says hours_ago(3).
_pinned_hour: datetime | None = None


def current_hour() -> datetime:
    """The start of the UTC hour the clock stands in."""
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def hours_ago(hours: int) -> datetime:
    """The start of the UTC hour that many hours back (from the pinned hour, in a test)."""
    return (_pinned_hour or current_hour()) - timedelta(hours=hours)


@contextmanager
def pinned_hour() -> Iterator[None]:
    """Inside, hours_ago() counts back from the hour this began in, however long it runs."""
    global _pinned_hour  # noqa: PLW0603 - one test at a time; its threads see it too
    _pinned_hour = current_hour()
    try:
        yield
    finally:
        _pinned_hour = None


def open_hour(room: float = 30.0) -> datetime:
    """The start of the current UTC hour, an open window: waits out the hour's first 1.5 s (its
    timestamp, start + 1 s, must be past) and its last `room` s (the test must end within it).
    A pinned hour moves to it, so that hours_ago(1) is the hour before it."""
    global _pinned_hour  # noqa: PLW0603
    while True:
        now = time.time()
        into = now % 3600
        if 1.5 <= into <= 3600 - room:
            hour = datetime.fromtimestamp(now - into, UTC)
            if _pinned_hour is not None:
                _pinned_hour = hour
            return hour
        time.sleep(0.05)


def iso(moment: datetime) -> str:
    """RFC 3339 with Z, as OpenMeter writes it."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def report(
    values: list[Any] | None = None,
    *,
    subject: str = "customer-1",
    meter: str = "api_requests",
    first: datetime | None = None,
    size: timedelta = timedelta(hours=1),
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A report.meter event with one row per value, in consecutive windows."""
    first = first or hours_ago(len(values or [1]) + 1)
    rows = rows if rows is not None else []
    for index, value in enumerate(values or []):
        start = first + index * size
        rows.append(
            {
                "subject": subject,
                "value": value,
                "groupBy": {},
                "windowStart": iso(start),
                "windowEnd": iso(start + size),
            }
        )
    return {
        "type": "report.meter",
        "report": {"slug": "test_report"},
        "meter": {"slug": meter, "aggregation": "SUM", "windowSize": "HOUR"},
        "query": {"subject": subject, "windowSize": "HOUR"},
        "usage": rows,
    }


def example(name: str, shift_to: datetime | None = None) -> str:
    """An example payload, its windows moved (same spacing) so the first starts at shift_to."""
    text = (EXAMPLES / name).read_text()
    if shift_to is None:
        return text
    event = json.loads(text)
    starts = [datetime.fromisoformat(row["windowStart"]) for row in event.get("usage", [])]
    delta = shift_to - min(starts)
    for row in event["usage"]:
        for key in ("windowStart", "windowEnd"):
            row[key] = iso(datetime.fromisoformat(row[key]) + delta)
    return json.dumps(event)


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    """Polls condition() until true, or fails."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def dockerfile_cmd() -> list[str]:
    """The exec-form CMD of the Dockerfile, as the container runs it."""
    lines = (PROJECT / "Dockerfile").read_text().splitlines()
    cmd = [line for line in lines if line.startswith("CMD ")]
    assert len(cmd) == 1, "the Dockerfile needs exactly one CMD"
    command = json.loads(cmd[0].removeprefix("CMD "))
    assert isinstance(command, list), "CMD must be in exec form so gunicorn is PID 1"
    return [str(part) for part in command]


def failures_at_once(
    call: Callable[[int], object], threads: int, error: type[BaseException]
) -> int:
    """Runs call(0) ... call(threads - 1) in threads released together; how many raised error."""
    failed, start = [], threading.Barrier(threads)

    def one(number: int) -> None:
        start.wait()
        try:
            call(number)
        except error:
            failed.append(number)

    pool = [threading.Thread(target=one, args=(number,)) for number in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return len(failed)


_HANDED_OUT: set[int] = set()
_HANDING_OUT = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that this run has not handed
    out before: the kernel picks a port at random and may pick a released one again, so two
    services that bind theirs a second later could otherwise get the same."""
    with _HANDING_OUT:
        while True:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


def clock_env() -> dict[str, str]:
    """This process's time zone and faked clock (TZ; libfaketime's LD_PRELOAD and FAKETIME*),
    for the processes a test starts with an environment of their own: a run under `faketime`
    or another TZ then runs the service on the same clock as the test that signs its webhooks."""
    return {
        name: value
        for name, value in os.environ.items()
        if name in ("TZ", "LD_PRELOAD") or name.startswith("FAKETIME")
    }


def start_service(
    env: dict[str, str], log_path: Path, wsgi_app: str | None = None
) -> subprocess.Popen[bytes]:
    """Runs the Dockerfile's CMD from the project folder, this venv's executables first on PATH
    (serving wsgi_app instead of the bridge, if given)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with log_path.open("wb") as log:
        return subprocess.Popen(
            dockerfile_cmd() + ([wsgi_app] if wsgi_app else []),
            cwd=PROJECT,
            env={"PATH": path, "WEB_CONCURRENCY": "2", **clock_env(), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def post(url: str, body: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POSTs over a real socket; returns the status and the JSON answer."""
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def healthy(base: str) -> bool:
    """True once /healthz answers 200."""
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def worker_pids(master: int) -> list[int]:
    """The gunicorn master's children: its workers (empty if the master is gone)."""
    try:
        children = Path(f"/proc/{master}/task/{master}/children").read_text()
    except OSError:
        return []
    return [int(pid) for pid in children.split()]


def fake_control(fake_url: str, path: str, body: Any = None) -> Any:
    """Calls a fake Stripe's control API (/_fake/...; never faulted)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{fake_url}/_fake/{path}", data=data, method="POST" if data else "GET"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@dataclass
class Running:
    """The fake Stripe in its own process and the service as the container starts it."""

    fake_url: str
    base: str
    service: subprocess.Popen[bytes]
    log_path: Path
    startup_seconds: float

    def control(self, path: str, body: Any = None) -> Any:
        """Calls the fake Stripe's control API (never faulted)."""
        return fake_control(self.fake_url, path, body)


@contextmanager
def fake_and_service(
    workdir: Path,
    fixtures: dict[str, Any],
    config: str,
    env: dict[str, str],
    latency: float = 0.0,
) -> Iterator[Running]:
    """Starts the fake Stripe with fixtures and the service with config and env (added to the
    essentials); stops both afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "fixtures.json").write_text(json.dumps(fixtures))
    (workdir / "config.yaml").write_text(config)
    key = env["STRIPE_API_KEY"]
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_stripe", "--port", "0", "--api-key", key,
         "--fixtures", str(workdir / "fixtures.json"), "--latency", str(latency)],
        cwd=PROJECT, stdout=subprocess.PIPE,
    )  # fmt: skip
    service: subprocess.Popen[bytes] | None = None
    try:
        assert fake.stdout
        fake_url = fake.stdout.readline().decode().strip()
        port = free_port()
        env = {
            "OPENMETER_WEBHOOK_SECRET": SECRET,
            "CONFIG_PATH": str(workdir / "config.yaml"),
            "STRIPE_API_BASE": fake_url,
            "PORT": str(port),
            "TMPDIR": str(workdir),
            **env,
        }
        log_path = workdir / "service.log"
        started = time.monotonic()
        service = start_service(env, log_path)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(base) or service.poll() is not None, timeout=30)
        startup = time.monotonic() - started
        if service.poll() is not None:
            raise SystemExit(log_path.read_text())
        yield Running(fake_url, base, service, log_path, startup)
    finally:
        if service is not None and service.poll() is None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=30)
        fake.send_signal(signal.SIGTERM)
        fake.wait(timeout=30)
