"""Operable: live config reload, readiness, check-config, replay, metrics, proxies, shutdown."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from bridge.config_source import ConfigSource
from bridge.stripe_api import USAGE_RECORDS_API_VERSION
from tests.conftest import API_KEY, CONFIG_YAML, Billing, Service, deliver
from tests.fake_stripe import FakeStripe
from tests.harness import (
    PROJECT,
    example,
    hours_ago,
    report,
    sign,
    wait_until,
    worker_pids,
)

NEW_SUBJECT = CONFIG_YAML.replace("subjects:\n", "subjects:\n  newcomer: sub_1Newcomer\n")


@pytest.fixture
def fast_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks the config file on every request, and takes a new version at its first read."""
    monkeypatch.setattr(ConfigSource, "CHECK_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(ConfigSource, "STABLE_SECONDS", 0.0)


def replace_atomically(path: Path, text: str) -> None:
    """Writes a new version beside the file and renames it over, as editors and tools do."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    fresh.replace(path)


def swap_configmap(folder: Path, text: str, version: int) -> None:
    """Does what the kubelet does to a ConfigMap volume: a new folder, then a swapped symlink."""
    data = folder / f"..v{version}"
    data.mkdir()
    (data / "config.yaml").write_text(text)
    link = folder / "..data_tmp"
    link.symlink_to(data.name)
    link.replace(folder / "..data")


# --- live reload -----------------------------------------------------------------------------


def test_added_subject_is_served_after_an_atomic_replace(
    client: FlaskClient, config_path: Path, fast_reload: None, billing: Billing
) -> None:
    assert deliver(client, report([1], subject="newcomer"), "msg_new").status_code == 422
    replace_atomically(config_path, NEW_SUBJECT)
    assert deliver(client, report([1], subject="newcomer"), "msg_new").status_code == 200


def test_configmap_symlink_swap_is_picked_up(
    tmp_path: Path,
    environment: dict[str, str],
    billing: Billing,
    fast_reload: None,
) -> None:
    folder = tmp_path / "configmap"
    folder.mkdir()
    swap_configmap(folder, CONFIG_YAML, 1)
    (folder / "config.yaml").symlink_to("..data/config.yaml")
    client = create_app(environment | {"CONFIG_PATH": str(folder / "config.yaml")}).test_client()
    assert deliver(client, report([1], subject="newcomer"), "msg_cm").status_code == 422
    swap_configmap(folder, NEW_SUBJECT, 2)
    assert deliver(client, report([1], subject="newcomer"), "msg_cm").status_code == 200


def test_invalid_edit_keeps_the_last_good_config_until_fixed(
    app: Flask, config_path: Path, fast_reload: None, caplog: pytest.LogCaptureFixture
) -> None:
    client = app.test_client()
    checksum = client.get("/readyz").json["config"]["checksum"]  # type: ignore[index]
    replace_atomically(config_path, CONFIG_YAML + "  broken: cus_1\n")
    assert deliver(client, report([1]), "msg_bad1").status_code == 200  # old mapping serves
    assert deliver(client, report([1], first=hours_ago(5)), "msg_bad2").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json is not None and "subjects.broken" in ready.json["config"]["last_reload_error"]
    assert ready.json["config"]["checksum"] == checksum
    failures = [r for r in caplog.records if r.getMessage() == "config reload failed"]
    assert len(failures) == 1  # logged once per change, not once per request
    replace_atomically(config_path, NEW_SUBJECT)
    ready = client.get("/readyz")
    assert ready.json is not None and ready.json["config"]["last_reload_error"] is None
    assert ready.json["config"]["checksum"] != checksum
    assert deliver(client, report([1], subject="newcomer"), "msg_ok").status_code == 200


@pytest.mark.parametrize(
    "bad", ["meters: &x {a: *x}\n", "meters: " + "[" * 3000 + "]" * 3000 + "\n"]
)
def test_an_alias_loop_or_deep_nesting_is_a_reload_error_and_the_last_good_config_serves(
    app: Flask, config_path: Path, fast_reload: None, bad: str
) -> None:
    client = app.test_client()
    replace_atomically(config_path, bad)
    ready = client.get("/readyz")  # the request that reads the new version
    assert ready.status_code == 200 and ready.json is not None
    assert str(config_path) in ready.json["config"]["last_reload_error"]
    assert deliver(client, report([1]), "msg_loop").status_code == 200  # the last good config


def test_the_watch_thread_outlives_a_bad_version_and_takes_the_next_good_one(
    config_path: Path,
) -> None:
    source = ConfigSource(str(config_path))
    source.watch()  # as each gunicorn worker runs it: once a second, requests or not
    replace_atomically(config_path, "meters: &x {a: *x}\n")
    wait_until(lambda: "anchors and aliases" in (source.error or ""), timeout=30)
    replace_atomically(config_path, NEW_SUBJECT)
    wait_until(lambda: "newcomer" in source.config.subjects, timeout=30)


def test_a_bad_config_stops_the_start_with_its_problem_and_no_traceback(
    environment: dict[str, str], config_path: Path
) -> None:
    config_path.write_text("meters: &x {a: *x}\n")
    done = subprocess.run(
        [sys.executable, "-c", "import app; app.serve()"],
        cwd=PROJECT,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "cannot start" in done.stderr and "anchors and aliases" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_readyz_says_which_config_is_loaded(client: FlaskClient, config_path: Path) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json is not None
    assert ready.json["config"]["path"] == str(config_path)
    assert re.fullmatch(r"[0-9a-f]{64}", ready.json["config"]["checksum"])
    assert ready.json["config"]["loaded_at"]


def test_reload_in_every_gunicorn_worker_within_five_seconds(
    service: Service, config_path: Path, stripe_fake: FakeStripe
) -> None:
    status, _ = service.deliver(report([2], subject="newcomer"), "msg_live")
    assert status == 422
    replace_atomically(config_path, NEW_SUBJECT)
    edited = time.monotonic()
    wait_until(lambda: service.deliver(report([2], subject="newcomer"), "msg_live")[0] == 200, 5)
    assert time.monotonic() - edited < 5
    # The other worker takes the change on its own once-a-second check (a version is taken once
    # it is stable): within the same five seconds, and every delivery below reads the config.
    workers = set(worker_pids(service.process.pid))

    def reloaded() -> set[int]:
        return {line["pid"] for line in service.logs() if line["message"] == "config reloaded"}

    wait_until(lambda: reloaded() == workers, max(0.1, edited + 5 - time.monotonic()))
    # Every worker now has it: many parallel deliveries, all 200, served by both processes.
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda i: service.deliver(report([2], subject="newcomer"), "msg_live"), range(24)
            )
        )
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:2]
    more = 0  # the kernel picks the worker that accepts: more deliveries until both have answered
    while len(service.webhook_pids()) < 2 and more < 100:
        assert service.deliver(report([2], subject="newcomer"), "msg_live")[0] == 200
        more += 1
    assert len(service.webhook_pids()) == 2


def test_idle_workers_take_a_change_within_five_seconds_without_a_request(
    service: Service, config_path: Path
) -> None:
    wait_until(lambda: len(worker_pids(service.process.pid)) == 2, 10)  # /healthz needs one
    workers = set(worker_pids(service.process.pid))
    replace_atomically(config_path, NEW_SUBJECT)
    edited = time.monotonic()

    def reloaded() -> set[int]:
        return {line["pid"] for line in service.logs() if line["message"] == "config reloaded"}

    wait_until(lambda: reloaded() == workers, 5)
    assert time.monotonic() - edited < 5
    assert not [line for line in service.logs() if line["message"] == "webhook"]


# --- check-config ----------------------------------------------------------------------------


def test_check_config_lists_every_bad_entry(tmp_path: Path, app: Flask) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "meters:\n  a: prod_1\n  b: {price: price_1B, rounding: x}\nsubjects:\n  c: cus_1\n"
    )
    result = app.test_cli_runner().invoke(args=["check-config", str(path)])
    assert result.exit_code == 1
    for entry in ("meters.a: must", "meters.b.rounding", "subjects.c"):
        assert entry in result.output


def test_make_check_config_uses_config_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("subjects:\n  c: cus_1\n")
    env = {**os.environ, "CONFIG_PATH": str(path)}
    result = subprocess.run(
        ["make", "-s", "check-config"],
        check=False,
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "subjects.c: must be a Stripe subscription ID" in result.stdout


def test_check_config_online_reports_what_stripe_lacks(
    tmp_path: Path, stripe_fake: FakeStripe, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    stripe_fake.add_price("price_1Licensed", usage_type="licensed", aggregate_usage=None)
    stripe_fake.add_subscription("sub_1Gone", prices=["price_1Api"], status="canceled")
    stripe_fake.add_subscription("sub_1Partial", prices=["price_1Api"])
    path = tmp_path / "config.yaml"
    path.write_text(
        "meters:\n  api_requests: price_1Api\n  nowhere: price_1Nope\n  seats: price_1Licensed\n"
        "subjects:\n  customer-1: sub_1Customer1\n  gone: sub_1Gone\n  partial: sub_1Partial\n"
    )
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", stripe_fake.url)
    result = app.test_cli_runner().invoke(args=["check-config", str(path), "--online"])
    assert result.exit_code == 1, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert "problem" in lines["meters.nowhere"] and "price_1Nope" in lines["meters.nowhere"]
    assert "not a metered price" in lines["meters.seats"]
    assert "ok" in lines["meters.api_requests"] and "usage records" in lines["meters.api_requests"]
    assert "canceled" in lines["subjects.gone"]
    assert "no item for" in lines["subjects.partial"]
    assert "problem" in lines["subjects.customer-1"]  # lacks price_1Licensed and price_1Nope


def test_check_config_online_finds_two_prices_on_one_meter(
    tmp_path: Path, stripe_fake: FakeStripe, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    stripe_fake.add_meter("mtr_1Shared", event_name="shared", event_time_window="hour")
    stripe_fake.add_price("price_1MeterA", aggregate_usage=None, meter="mtr_1Shared")
    stripe_fake.add_price("price_1MeterB", aggregate_usage=None, meter="mtr_1Shared")
    path = tmp_path / "config.yaml"
    path.write_text("meters:\n  a: price_1MeterA\n  b: price_1MeterB\nsubjects: {}\n")
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", stripe_fake.url)
    result = app.test_cli_runner().invoke(args=["check-config", str(path), "--online"])
    assert result.exit_code == 1, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert "ok" in lines["meters.a"]
    assert (
        "problem" in lines["meters.b"] and "meters.a already uses mtr_1Shared" in lines["meters.b"]
    )


def test_check_config_online_passes_a_good_config(
    tmp_path: Path, stripe_fake: FakeStripe, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    stripe_fake.add_meter("mtr_1Calls", event_name="calls", event_time_window="hour")
    stripe_fake.add_price("price_1Calls", aggregate_usage=None, meter="mtr_1Calls")
    stripe_fake.add_subscription(
        "sub_1Good", prices=["price_1Api", "price_1Calls"], status="trialing"
    )
    path = tmp_path / "config.yaml"
    path.write_text(
        "meters:\n  api_requests: price_1Api\n  calls: price_1Calls\nsubjects:\n  good: sub_1Good\n"
    )
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", stripe_fake.url)
    result = app.test_cli_runner().invoke(args=["check-config", str(path), "--online"])
    assert result.exit_code == 0, result.output
    assert "meter events to mtr_1Calls" in result.output


def check_online(
    path: Path, text: str, app: Flask, fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, dict[str, str]]:
    """Runs `check-config --online` on `text`; returns the exit code and each entry's line."""
    path.write_text(text)
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", fake.url)
    result = app.test_cli_runner().invoke(args=["check-config", str(path), "--online"])
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:] if line.strip()}
    return result.exit_code, lines | {"output": result.output}


def test_check_config_online_shows_aggregate_usage_and_transform_quantity(
    tmp_path: Path, stripe_fake: FakeStripe, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    stripe_fake.add_price(
        "price_1Kilo", aggregate_usage="max", transform_quantity={"divide_by": 1000, "round": "up"}
    )
    text = "meters:\n  api_requests: price_1Api\n  kilo: price_1Kilo\nsubjects: {}\n"
    code, lines = check_online(tmp_path / "config.yaml", text, app, stripe_fake, monkeypatch)
    assert code == 0, lines["output"]
    assert "ok" in lines["meters.api_requests"]
    assert "usage records (aggregate_usage sum)" in lines["meters.api_requests"]
    assert "aggregate_usage max, transform_quantity divide_by 1000 round up" in lines["meters.kilo"]
    price_reads = [r for r in stripe_fake.requests if r.path.startswith("/v1/prices/")]
    assert {r.headers["stripe-version"] for r in price_reads} == {USAGE_RECORDS_API_VERSION}


def test_check_config_online_explains_a_mapping_that_rounds_each_window(
    tmp_path: Path, stripe_fake: FakeStripe, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    stripe_fake.add_price("price_1Gb")
    stripe_fake.add_price("price_1Kb", transform_quantity={"divide_by": 1000, "round": "up"})
    text = (
        "meters:\n  gb: {price: price_1Gb, multiplier: 0.001, rounding: up}\n"
        "  kb: {price: price_1Kb, multiplier: 0.001}\n  api_requests: price_1Api\nsubjects: {}\n"
    )
    code, lines = check_online(tmp_path / "config.yaml", text, app, stripe_fake, monkeypatch)
    assert code == 0, lines["output"]  # a warning, not a problem: the bill is still bounded
    assert "warning" in lines["meters.gb"] and "ok" in lines["meters.api_requests"]
    assert "transform_quantity divide_by 1000 round up" in lines["meters.gb"]
    assert "map it with multiplier 1 and no rounding" in lines["meters.gb"]
    assert "already divides by 1000: map it with multiplier 1 and no rounding" in lines["meters.kb"]


def test_check_config_online_fails_when_aggregate_usage_cannot_be_read(
    tmp_path: Path, stripe_fake: FakeStripe, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    stripe_fake.add_price("price_1Bare", aggregate_usage=None)  # Stripe shows none even at acacia
    stripe_fake.inject("500", method="GET", path="/v1/prices/price_1Api", count=None)
    text = "meters:\n  api_requests: price_1Api\n  bare: price_1Bare\nsubjects: {}\n"
    code, lines = check_online(tmp_path / "config.yaml", text, app, stripe_fake, monkeypatch)
    assert code == 1, lines["output"]
    assert "problem" in lines["meters.api_requests"]
    assert "price_1Api: Stripe is unavailable" in lines["meters.api_requests"]
    assert "problem" in lines["meters.bare"]
    assert "showed no aggregate_usage at 2025-02-24.acacia" in lines["meters.bare"]


# --- replay ----------------------------------------------------------------------------------


@pytest.fixture
def replay_env(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The CLI's environment: the Stripe key and config, and no webhook secret."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPENMETER_WEBHOOK_SECRET")
    return environment


def saved_body(tmp_path: Path, name: str, hours: int) -> Path:
    path = tmp_path / name
    path.write_text(example(name, shift_to=hours_ago(hours)))
    return path


def test_replay_dry_run_writes_nothing(
    tmp_path: Path, app: Flask, replay_env: dict[str, str], stripe_fake: FakeStripe
) -> None:
    body = saved_body(tmp_path, "report-daily-hourly-windows.json", 30)
    result = app.test_cli_runner().invoke(args=["replay", str(body), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.count("would write") == 24
    assert stripe_fake.writes() == []


def test_replay_writes_exactly_what_the_webhook_would(
    tmp_path: Path,
    app: Flask,
    replay_env: dict[str, str],
    stripe_fake: FakeStripe,
    billing: Billing,
) -> None:
    body = saved_body(tmp_path, "report-daily-hourly-windows.json", 30)
    result = app.test_cli_runner().invoke(args=["replay", str(body)])
    assert result.exit_code == 0, result.output
    replayed = stripe_fake.usage_records(billing.api)
    stripe_fake.reset()
    item = _rebuild(stripe_fake)
    assert deliver(app.test_client(), body.read_text(), "msg_webhook").status_code == 200
    assert stripe_fake.usage_records(item) == replayed
    assert len(replayed) == 24


def _rebuild(fake: FakeStripe) -> str:
    """The same prices and subscription again, after a reset; returns the api item."""
    fake.add_price("price_1Api", usage_type="metered", aggregate_usage="sum")
    fake.add_subscription("sub_1Customer1", prices=["price_1Api"])
    return fake.item_id("sub_1Customer1", "price_1Api")


def test_replay_of_an_unmapped_report_exits_1(
    tmp_path: Path, app: Flask, replay_env: dict[str, str]
) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report([1], subject="stranger")))
    result = app.test_cli_runner().invoke(args=["replay", str(path)])
    assert result.exit_code == 1
    assert "not_configured" in result.output


# --- metrics, proxies, shutdown ----------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 if absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.startswith(name + "{"):
            found = ",".join(sorted(sample[len(name) + 1 : -1].split(",")))
            if found == wanted:
                return float(value)
    return 0.0


def get_text(url: str) -> str:
    """A GET over a real socket."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_metrics_count_each_outcome_across_two_workers(
    service: Service, stripe_fake: FakeStripe, billing: Billing
) -> None:
    def one_of_each(index: int) -> list[int]:
        statuses = [service.deliver(report([1], first=hours_ago(index + 2)), f"msg_ok{index}")[0]]
        statuses.append(service.deliver(report([1]), f"msg_x{index}", secret="whsec_b3RoZXI=")[0])
        statuses.append(service.deliver(report([1], subject="nobody"), f"msg_u{index}")[0])
        return statuses

    with ThreadPoolExecutor(6) as pool:
        statuses = [s for batch in pool.map(one_of_each, range(6)) for s in batch]
    rounds = 6  # the kernel picks the worker that accepts: more rounds until both have answered
    while len(service.webhook_pids()) < 2 and rounds < 100:
        statuses += one_of_each(rounds)
        rounds += 1
    stripe_fake.inject("500", path="/usage_records", count=None, probability=1.0)
    statuses += [
        service.deliver(report([1], first=hours_ago(300)), f"msg_f{i}")[0] for i in range(2)
    ]
    assert sorted(statuses) == [200] * rounds + [401] * rounds + [422] * rounds + [503] * 2
    text = get_text(f"{service.base}/metrics")
    assert metric(text, "bridge_webhooks_total", outcome="written", status="200") == rounds
    assert metric(text, "bridge_webhooks_total", outcome="bad_signature", status="401") == rounds
    assert metric(text, "bridge_webhooks_total", outcome="not_configured", status="422") == rounds
    assert metric(text, "bridge_webhooks_total", outcome="stripe_unavailable", status="503") == 2
    assert metric(text, "bridge_windows_written_total", kind="usage_records") == rounds
    assert metric(text, "bridge_stripe_errors_total", error_class="APIError") >= 2
    assert (
        metric(text, "bridge_stripe_request_seconds_count", operation="usage_record") >= rounds + 2
    )
    assert len(service.webhook_pids()) == 2


def test_trusted_proxy_gives_the_real_client(
    environment: dict[str, str], billing: Billing, caplog: pytest.LogCaptureFixture
) -> None:
    client = create_app(environment | {"TRUSTED_PROXIES": "1"}).test_client()
    body = json.dumps(report([1]))
    headers = sign(body) | {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    with caplog.at_level(logging.INFO, logger="bridge"):
        client.post("/webhook", data=body, headers=headers)
    lines = [r for r in caplog.records if r.getMessage() == "webhook"]
    assert lines[-1].fields["client"] == "203.0.113.9"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("peer", "allow", "logged"),
    [
        ("198.51.100.7", None, "198.51.100.7"),  # a direct client: its forged header is ignored
        ("198.51.100.7", "198.51.100.0/24", "203.0.113.9"),  # the proxy's network is allowed
        ("198.51.100.7", "*", "203.0.113.9"),
        ("127.0.0.1", None, "203.0.113.9"),  # gunicorn's default: a proxy on this host
    ],
)
def test_forwarded_for_is_believed_only_from_forwarded_allow_ips(
    environment: dict[str, str],
    billing: Billing,
    caplog: pytest.LogCaptureFixture,
    peer: str,
    allow: str | None,
    logged: str,
) -> None:
    settings = {"TRUSTED_PROXIES": "1"} | ({"FORWARDED_ALLOW_IPS": allow} if allow else {})
    client = create_app(environment | settings).test_client()
    body = json.dumps(report([1]))
    headers = sign(body) | {"X-Forwarded-For": "203.0.113.9"}
    with caplog.at_level(logging.INFO, logger="bridge"):
        client.post("/webhook", data=body, headers=headers, environ_base={"REMOTE_ADDR": peer})
    lines = [r for r in caplog.records if r.getMessage() == "webhook"]
    assert lines[-1].fields["client"] == logged  # type: ignore[attr-defined]


def test_untrusted_forwarded_for_is_ignored(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps(report([1]))
    with caplog.at_level(logging.INFO, logger="bridge"):
        client.post("/webhook", data=body, headers=sign(body) | {"X-Forwarded-For": "203.0.113.9"})
    lines = [r for r in caplog.records if r.getMessage() == "webhook"]
    assert lines[-1].fields["client"] != "203.0.113.9"  # type: ignore[attr-defined]


def test_sigterm_lets_an_in_flight_webhook_finish(
    service: Service, stripe_fake: FakeStripe, billing: Billing
) -> None:
    service.deliver(report([1], first=hours_ago(10)), "msg_warm")
    stripe_fake.latency = 1.0
    answers: list[Any] = []
    sender = threading.Thread(
        target=lambda: answers.append(service.deliver(report([5, 6]), "msg_inflight"))
    )
    sender.start()
    wait_until(lambda: stripe_fake.in_flight > 0, 20)  # a worker is inside the webhook
    service.process.send_signal(signal.SIGTERM)
    sender.join(timeout=20)
    assert answers and answers[0][0] == 200
    assert service.process.wait(timeout=30) == 0
    assert stripe_fake.usage_total(billing.api) == 12
