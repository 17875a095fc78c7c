"""End to end: the Dockerfile's exact CMD (gunicorn with gunicorn.conf.py), over a real socket."""

from __future__ import annotations

import json
import select
import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import API_KEY, Billing, Service
from tests.fake_stripe import FakeStripe
from tests.harness import (
    SECRET,
    free_port,
    healthy,
    post,
    report,
    sign,
    start_service,
    wait_until,
)


def test_dockerfile_cmd_serves_webhooks(
    service: Service, stripe_fake: FakeStripe, billing: Billing
) -> None:
    base, process, log_path = service.base, service.process, service.log_path
    body = json.dumps(report([10, 20, 30]))
    status, answer = post(f"{base}/webhook", body, sign(body, "msg_e2e"))
    assert status == 200, answer
    status, answer = post(f"{base}/webhook", body, sign(body, "msg_e2e"))  # a redelivery
    assert status == 200 and answer["outcome"] == "already_written"
    assert stripe_fake.usage_total(billing.api) == 60

    status, answer = post(f"{base}/webhook", body, sign(body, "msg_e2e") | {"svix-signature": "v1"})
    assert status == 401 and answer["error"] == "bad_signature"

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    webhooks = [line for line in lines if line["message"] == "webhook"]
    assert [line["status"] for line in webhooks] == [200, 200, 401]
    assert webhooks[0]["message_id"] == "msg_e2e" and webhooks[0]["windows"] == 3
    writes = [line for line in lines if line["message"] == "stripe write"]
    assert len(writes) == 3 and all(line["stripe_request_id"] for line in writes)
    assert {line["item"] for line in writes} == {billing.api}
    assert [line["quantity"] for line in writes] == [10, 20, 30]
    assert all(line["idempotency_key"].startswith("msg_e2e:") for line in writes)
    text = log_path.read_text()
    assert API_KEY not in text and SECRET.removeprefix("whsec_") not in text


def test_the_master_removes_the_metrics_folder_on_exit(
    environment: dict[str, str], billing: Billing, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    port = free_port()
    env = environment | {"PORT": str(port), "TMPDIR": str(scratch)}
    process = start_service(env, tmp_path / "gunicorn.log")
    wait_until(lambda: healthy(f"http://127.0.0.1:{port}"), timeout=20)
    assert [p.name[:15] for p in scratch.iterdir()] == ["bridge-metrics-"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert list(scratch.iterdir()) == []


def test_refuses_to_start_without_its_environment(tmp_path: Path) -> None:
    log_path = tmp_path / "gunicorn.log"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    process = start_service({"PORT": str(free_port()), "TMPDIR": str(scratch)}, log_path)
    assert process.wait(timeout=30) != 0
    output = log_path.read_text()
    assert "STRIPE_API_KEY is not set" in output
    assert "OPENMETER_WEBHOOK_SECRET is not set" in output
    assert list(scratch.iterdir()) == [], "a refused start left its metrics folder behind"


def test_refuses_to_start_with_a_short_secret_and_leaves_nothing(
    environment: dict[str, str], tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    secrets = f"{SECRET} whsec_bad"  # the second decodes to 2 bytes; Svix's keys are 24
    env = environment | {
        "PORT": str(free_port()),
        "TMPDIR": str(scratch),
        "OPENMETER_WEBHOOK_SECRET": secrets,
    }
    log_path = tmp_path / "gunicorn.log"
    process = start_service(env, log_path)
    assert process.wait(timeout=30) != 0
    output = log_path.read_text()
    assert "OPENMETER_WEBHOOK_SECRET: secret #2 decodes to fewer than Svix's 24 bytes" in output
    assert "Booting worker" not in output and "whsec_bad" not in output
    assert list(scratch.iterdir()) == []


def test_bind_listens_only_where_told(
    environment: dict[str, str], billing: Billing, tmp_path: Path
) -> None:
    port = free_port()
    # 127.0.0.2 is loopback too: an address beside it on the same port must get no answer.
    env = environment | {"PORT": str(port), "BIND": f"127.0.0.2:{port}", "TMPDIR": str(tmp_path)}
    process = start_service(env, tmp_path / "gunicorn.log")
    try:
        wait_until(lambda: healthy(f"http://127.0.0.2:{port}") or process.poll() is not None, 20)
        assert healthy(f"http://127.0.0.2:{port}"), (tmp_path / "gunicorn.log").read_text()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_an_oversized_body_is_read_before_the_413_so_a_proxy_sees_no_reset(
    service: Service,
) -> None:
    # A proxy (nginx buffers the body first) sends all of it before it reads the answer. Had the
    # service answered and closed with the body unread, the kernel would reset the connection and
    # the proxy would answer 502 instead of the 413 that names the fix. So the service reads the
    # body first: with half of it sent, no answer has come.
    body = b'{"padding": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    head = (
        f"POST /webhook HTTP/1.0\r\nHost: bridge\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    host, port = service.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head + body[: len(body) // 2])
        readable, _, _ = select.select([connection], [], [], 1.0)
        assert not readable, "answered before the body was read"
        connection.sendall(body[len(body) // 2 :])
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:300]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"] == "payload_too_large"
