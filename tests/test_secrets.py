"""Secrets stay secret, and logs cannot be forged (issue 6).

Every error path runs while everything is captured: the bridge's own JSON lines (its handler's
stream), every log record of every logger at DEBUG (stripe's request logging included, also
printed to stderr), stdout and stderr at the file-descriptor level, CLI output, subprocess output,
the gunicorn service's log, and every response's body and headers. None of it may contain the
Stripe API key or a webhook signing secret, whole or in part.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import stripe
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

import bridge.stripe_api
from app import create_app, serve
from bridge.errors import ConfigError
from bridge.logs import JsonFormatter, configure_logging
from bridge.settings import settings_from_env
from tests.conftest import API_KEY, Billing, Service, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import (
    PROJECT,
    ROTATED_SECRET,
    SECRET,
    clock_env,
    hours_ago,
    post,
    report,
    sign,
)

# A malformed key and secret still are secrets: a config error must name them, never show them.
BAD_KEY = "pk_live_51NotASecretKeyButStillPrivate"
BAD_SECRET = "whsec_c2VjcmV0LWJ1dC1ub3QtYmFzZTY0X"  # one base64 character too many
LOGGERS = ["", "bridge", "app", "stripe", "werkzeug", "urllib3", "flask.app", "gunicorn.error"]


def fragments(secret: str, size: int) -> set[str]:
    """Every `size`-character piece of a secret's private part (a prefix is not a secret)."""
    private = secret.split("_", 2)[-1] if secret.startswith(("sk_", "rk_", "pk_")) else secret
    private = private.removeprefix("whsec_")
    return {private[i : i + size] for i in range(max(1, len(private) - size + 1))}


def hidden(*secrets: str) -> dict[str, set[str]]:
    """What must never show, per secret: the whole of it, its parts, its decoded key."""
    found: dict[str, set[str]] = {}
    for secret in secrets:
        parts = {secret, *fragments(secret, 8 if secret.startswith(("sk_", "pk_")) else 12)}
        if secret.startswith("whsec_"):
            encoded = secret.removeprefix("whsec_")
            parts.add(encoded)
            try:
                key = base64.b64decode(encoded + "==")
            except ValueError:
                key = b""
            if key:
                parts |= {key.hex(), repr(key)[2:-1], base64.b64encode(key).decode()}
        found[secret] = parts
    return found


SECRETS = hidden(API_KEY, SECRET, ROTATED_SECRET)


def leaks(text: str, secrets: dict[str, set[str]] = SECRETS) -> list[str]:
    """The secrets (by their first characters) that text shows some part of."""
    return [
        secret[:10] + "..." for secret, parts in secrets.items() if any(p in text for p in parts)
    ]


class Capture:
    """Everything the service says, from every channel a secret could leave by."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.stream = io.StringIO()  # the bridge's own handler, as production formats it
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []  # answers, CLI output, exceptions
        self.fd_output = ""  # stdout and stderr, file descriptors 1 and 2

    def emit(self, record: logging.LogRecord) -> None:
        """Keeps a record whole."""
        self.records.append(record)

    def answer(self, response: TestResponse) -> TestResponse:
        """Keeps an answer's status line, headers and body."""
        self.texts.append(
            f"{response.status}\n{response.headers}\n{response.get_data(as_text=True)}"
        )
        return response

    def everything(self) -> str:
        """All of it as text: JSON lines, each record formatted and raw, fd output, answers."""
        formatter = JsonFormatter()
        plain = logging.Formatter("%(name)s %(levelname)s %(message)s")
        out, err = self.capfd.readouterr()
        self.fd_output += out + err
        parts = [self.stream.getvalue(), self.fd_output, *self.texts]
        for record in self.records:
            parts += [formatter.format(record), plain.format(record), repr(vars(record))]
        return "\n".join(parts)

    def assert_clean(self, secrets: dict[str, set[str]] = SECRETS) -> str:
        """No secret anywhere; returns the text that was checked."""
        text = self.everything()
        assert text.strip(), "nothing was captured: the capture itself is broken"
        assert leaks(text, secrets) == [], f"secret in logs or answers: {leaks(text, secrets)}"
        return text


class _ListHandler(logging.Handler):
    def __init__(self, capture: Capture) -> None:
        super().__init__(logging.DEBUG)
        self.capture = capture

    def emit(self, record: logging.LogRecord) -> None:
        self.capture.emit(record)


@pytest.fixture
def captured(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Capture]:
    """Every logger at DEBUG, stripe's console logging on, the bridge's lines into a buffer."""
    configure_logging()
    capture = Capture(capfd)
    handler = _ListHandler(capture)
    bridge = logging.getLogger("bridge")
    streams = [h for h in bridge.handlers if isinstance(h, logging.StreamHandler)]
    old_streams = [h.setStream(capture.stream) for h in streams]
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    bridge.addHandler(handler)
    monkeypatch.setattr(stripe, "log", "debug")  # stripe prints its request log to stderr too
    try:
        yield capture
    finally:
        bridge.removeHandler(handler)
        logging.getLogger().removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for h, old in zip(streams, old_streams, strict=True):
            if old is not None:
                h.setStream(old)


def test_the_checker_finds_secrets() -> None:
    for secret in (API_KEY, SECRET, ROTATED_SECRET):
        assert leaks(f"x {secret} y") != []
    assert leaks("key=" + API_KEY.removeprefix("sk_test_")) != []
    assert leaks("token " + SECRET.removeprefix("whsec_")[3:20]) != []
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    assert leaks(repr(key)) != [] and leaks(key.hex()) != []
    assert leaks("Invalid API Key provided: sk_test_************6789") == []  # Stripe's mask


# --- the webhook's error paths -----------------------------------------------------------------


@pytest.fixture
def one_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """One retry (after half a second) instead of two: the same paths, less waiting."""
    monkeypatch.setattr(bridge.stripe_api, "STRIPE_MAX_ATTEMPTS", 2)


def test_webhook_error_paths_leak_no_secret(
    client: FlaskClient,
    stripe_fake: FakeStripe,
    billing: Billing,
    captured: Capture,
    one_retry: None,
) -> None:
    keep = captured.answer
    event = report([3])
    statuses = {
        "written": keep(deliver(client, event, "msg_ok")),
        "rotated secret": keep(deliver(client, report([4]), "msg_rot", secret=ROTATED_SECRET)),
        "wrong secret": keep(deliver(client, event, "msg_w", secret="whsec_b3RoZXItc2VjcmV0")),
        "expired": keep(deliver(client, event, at=datetime.now(UTC) - timedelta(minutes=6))),
        "garbage signature": keep(
            client.post("/webhook", data="{}", headers=sign("{}") | {"svix-signature": "v1,!"})
        ),
        "no headers": keep(client.post("/webhook", data=json.dumps(event))),
        "not JSON": keep(deliver(client, "not json")),
        "NaN": keep(deliver(client, '{"type": "report.meter", "usage": [{"value": NaN}]}')),
        "too large": keep(deliver(client, json.dumps(event) + " " * (1024 * 1024))),
        "unmapped": keep(deliver(client, report([1], subject="stranger"))),
        "price missing": keep(deliver(client, report([1], subject="acme", meter="storage_gb"))),
        "before the period": keep(
            deliver(client, report([5], first=hours_ago(24 * 40)), "msg_old")
        ),
        "wrong method": keep(client.get("/webhook")),
        "wrong path": keep(client.post("/nope")),
        "ready": keep(client.get("/readyz")),
        "metrics": keep(client.get("/metrics")),
    }
    for fault in ("500", "drop", "429_rate", "429_lock"):
        stripe_fake.inject(fault, path="/usage_records", count=None, probability=1.0)
        statuses[fault] = keep(deliver(client, report([7]), f"msg_{fault}"))
        stripe_fake.clear_faults()
    codes = {name: response.status_code for name, response in statuses.items()}
    assert codes == {
        "written": 200,
        "rotated secret": 200,
        "wrong secret": 401,
        "expired": 401,
        "garbage signature": 401,
        "no headers": 401,
        "not JSON": 400,
        "NaN": 400,
        "too large": 413,
        "unmapped": 422,
        "price missing": 422,
        "before the period": 422,
        "wrong method": 405,
        "wrong path": 404,
        "ready": 200,
        "metrics": 200,
        "500": 503,
        "drop": 503,
        "429_rate": 503,
        "429_lock": 503,
    }
    text = captured.assert_clean()
    assert "Request to Stripe api" in captured.fd_output  # stripe's console log reached stderr
    assert "API response body" in text  # and its DEBUG records, with Stripe's whole answers
    assert captured.stream.getvalue().count('"message": "webhook"') == len(codes) - 4


def test_stripe_rejecting_the_key_leaks_it_nowhere(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, captured: Capture
) -> None:
    stripe_fake.api_key = "sk_test_theKeyStripeNowWants0000"  # ours was rolled in the dashboard
    response = captured.answer(deliver(client, report([1]), "msg_auth"))
    assert response.status_code == 503, response.json
    assert response.json is not None and "API key" in response.json["message"]
    text = captured.assert_clean()
    assert "Invalid API Key provided" in text  # Stripe's (masked) answer was in the logs


def test_stripe_refusing_a_write_leaks_no_secret(
    client: FlaskClient,
    stripe_fake: FakeStripe,
    billing: Billing,
    captured: Capture,
    one_retry: None,
) -> None:
    deliver(client, report([1], first=hours_ago(5)), "msg_warm")
    stripe_fake.inject("500", path="/usage_records", count=None)
    first = captured.answer(deliver(client, report([2]), "msg_x"))
    stripe_fake.clear_faults()
    old = report([1], first=hours_ago(24 * 45))
    second = captured.answer(deliver(client, old, "msg_y"))
    assert (first.status_code, second.status_code) == (503, 422)
    assert second.json is not None and second.json["error"] == "stripe_refused"
    captured.assert_clean()


# --- configuration errors ----------------------------------------------------------------------


BAD_ENVIRONMENTS = [
    {"STRIPE_API_KEY": BAD_KEY},
    {"OPENMETER_WEBHOOK_SECRET": f"{SECRET} {BAD_SECRET}"},
    {"OPENMETER_WEBHOOK_SECRET": BAD_SECRET, "STRIPE_API_KEY": BAD_KEY},
    {"OPENMETER_WEBHOOK_SECRET": SECRET.removeprefix("whsec_")},  # the prefix forgotten
    {"CONFIG_PATH": "/nowhere/config.yaml"},
]


@pytest.mark.parametrize("changes", BAD_ENVIRONMENTS)
def test_config_errors_name_the_variable_never_its_value(
    environment: dict[str, str],
    changes: dict[str, str],
    captured: Capture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = environment | changes
    secrets = SECRETS | hidden(BAD_KEY, BAD_SECRET, SECRET.removeprefix("whsec_"))
    problems: list[str] = []
    try:
        settings_from_env(env)
    except ConfigError as error:
        problems = error.problems
        captured.texts += [str(error), repr(error)]
    app = create_app(env)
    client = app.test_client()
    assert captured.answer(client.get("/readyz")).status_code == 503
    webhook = captured.answer(deliver(client, report([1]), "msg_cfg"))
    assert webhook.status_code == 503 and webhook.json is not None
    assert webhook.json["error"] == "not_ready"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        serve()
    captured.texts.append(str(stopped.value))
    text = captured.assert_clean(secrets)
    assert "cannot start" in text
    assert problems or "nowhere" in text


def test_a_good_start_leaks_no_secret(
    environment: dict[str, str],
    billing: Billing,
    captured: Capture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    app = serve()
    captured.answer(app.test_client().get("/readyz"))
    text = captured.assert_clean()
    assert '"message": "started"' in text


def run(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """A command in the project folder with only env; its exit code and all it printed."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    done = subprocess.run(
        command,
        cwd=PROJECT,
        env={"PATH": path, **clock_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_startup_and_cli_in_their_own_process_leak_no_secret(
    environment: dict[str, str], stripe_fake: FakeStripe, billing: Billing, tmp_path: Path
) -> None:
    """What an operator sees in a terminal or a container log, stdout and stderr whole."""
    python = sys.executable
    secrets = SECRETS | hidden(BAD_KEY, BAD_SECRET)
    outputs = []
    bad = environment | {"STRIPE_API_KEY": BAD_KEY, "OPENMETER_WEBHOOK_SECRET": BAD_SECRET}
    code, output = run([python, "-c", "import app; app.serve()"], bad | {"STRIPE_LOG": "debug"})
    assert code != 0 and "cannot start" in output
    outputs.append(output)
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(report([2])))
    env = environment | {"STRIPE_LOG": "debug"}
    stripe_fake.api_key = "sk_test_theKeyStripeNowWants0000"
    for args in (["check-config", "--online"], ["replay", str(saved)]):
        code, output = run([python, "-m", "flask", "--app", "app", *args], env)
        assert code != 0, output
        outputs.append(output)
    stripe_fake.api_key = API_KEY
    code, output = run([python, "-m", "flask", "--app", "app", "replay", str(saved)], env)
    assert code == 0, output
    outputs.append(output)
    text = "\n".join(outputs)
    assert "Request to Stripe api" in text  # STRIPE_LOG=debug was on
    assert leaks(text, secrets) == [], f"secret in process output: {leaks(text, secrets)}"


def test_cli_error_paths_leak_no_secret(
    app: Flask,
    environment: dict[str, str],
    stripe_fake: FakeStripe,
    billing: Billing,
    captured: Capture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    one_retry: None,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    runner = app.test_cli_runner()
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(report([2])))
    unmapped = tmp_path / "unmapped.json"
    unmapped.write_text(json.dumps(report([2], subject="stranger")))
    exits = []

    def invoke(*args: str) -> None:
        result = runner.invoke(args=list(args))
        captured.texts += [result.output, repr(result.exception)]
        exits.append(result.exit_code)

    invoke("check-config", "--online")
    invoke("replay", str(saved), "--dry-run")
    invoke("replay", str(unmapped))
    stripe_fake.inject("drop", path="/usage_records", count=None)
    invoke("replay", str(saved))
    stripe_fake.clear_faults()
    stripe_fake.api_key = "sk_test_theKeyStripeNowWants0000"
    invoke("check-config", "--online")
    invoke("replay", str(saved))
    monkeypatch.setenv("STRIPE_API_KEY", BAD_KEY)
    invoke("check-config", "--online")
    invoke("replay", str(saved))
    assert exits == [1, 0, 1, 1, 1, 1, 1, 1]  # the test config maps prices sub_1Acme lacks
    captured.assert_clean(SECRETS | hidden(BAD_KEY))


def test_gunicorn_service_log_leaks_no_secret(
    service: Service, stripe_fake: FakeStripe, billing: Billing
) -> None:
    """The production process: gunicorn's own lines and the bridge's, from both workers."""
    body = json.dumps(report([1]))
    answers = [
        service.deliver(body, "msg_ok"),
        service.deliver(body, "msg_bad", secret="whsec_b3RoZXItc2VjcmV0"),
        post(f"{service.base}/webhook", body, sign(body) | {"svix-signature": "v1,%%"}),
        service.deliver("not json", "msg_nj"),
        service.deliver(report([1], subject="stranger"), "msg_un"),
    ]
    stripe_fake.inject("drop", count=None)
    answers.append(service.deliver(report([2]), "msg_down"))
    stripe_fake.clear_faults()
    stripe_fake.api_key = "sk_test_theKeyStripeNowWants0000"
    answers.append(service.deliver(report([3]), "msg_auth"))
    assert [status for status, _ in answers] == [200, 401, 401, 400, 422, 503, 503]
    text = service.log_path.read_text() + json.dumps([answer for _, answer in answers])
    assert '"message": "started"' in text
    assert leaks(text) == [], f"secret in the service's log: {leaks(text)}"


# --- forged log lines --------------------------------------------------------------------------

FORGERIES = [
    '\n{"level":"ERROR","message":"stripe write failed","subject":"acme"}',
    '"}\n{"level": "error", "message": "forged"',
    "\r\n{}\r\n",
    "a\u2028b\u2029c\x85d\x0be\x0cf",
    "\x00\x1b[2J\x7f\\",
    "\ud800 lone surrogate",
]


def bridge_lines(capture: Capture) -> list[str]:
    """The bridge's output so far, split as a log shipper splits it (on newlines only)."""
    return capture.stream.getvalue().split("\n")[:-1]


def test_subjects_cannot_forge_log_lines(
    client: FlaskClient, stripe_fake: FakeStripe, billing: Billing, captured: Capture
) -> None:
    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        st.sampled_from(FORGERIES) | st.text(min_size=1, max_size=60),
        st.sampled_from(["api_requests", '\n{"level":"ERROR"}', "m\r\ne\x00"]),
        st.booleans(),
    )
    def property_(subject: str, meter: str, ascii_only: bool) -> None:
        if subject in ("customer-1", "acme", "unbilled"):
            subject += "!"
        event = report([1], subject=subject, meter=meter)
        body = json.dumps(event, ensure_ascii=ascii_only or "\ud800" in subject)
        before = len(bridge_lines(captured))
        response = deliver(client, body, 'msg_"forged\x1b')
        assert response.status_code == 422, response.json
        lines = bridge_lines(captured)[before:]
        assert len(lines) == 1, f"one event, {len(lines)} lines: {lines}"
        parsed: dict[str, Any] = json.loads(lines[0])
        assert parsed["message"] == "webhook" and parsed["level"] == "info"
        assert parsed["subject"] == subject and parsed["meter"] == meter
        assert parsed["message_id"] == 'msg_"forged\x1b'
        assert lines[0].isascii() and lines[0].isprintable()  # every control char escaped

    property_()
    assert stripe_fake.writes() == []
