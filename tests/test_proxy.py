"""A real nginx running docs/nginx.conf in front of gunicorn started as the container starts it.

The samples' lines marked EDIT (user, paths, ports, certificate) are the only ones changed:
docs/nginx-main.conf, the complete main config, includes docs/nginx.conf, the site file.
`make proxy` (part of `make test`) installs nginx where it can; elsewhere these tests skip.
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Billing
from tests.fake_stripe import FakeStripe
from tests.harness import PROJECT, free_port, healthy, report, sign, start_service, wait_until

SAMPLE = PROJECT / "docs" / "nginx.conf"
MAIN = PROJECT / "docs" / "nginx-main.conf"
# Directives whose values belong to a site: each must be on a line marked EDIT.
SITE_SPECIFIC = re.compile(
    r"^\s*(user|pid|error_log|access_log|\w+_temp_path|include|server|listen|server_name"
    r"|ssl_certificate|ssl_certificate_key|ssl_protocols|proxy_set_header X-Forwarded-For)\s+[^{\s]"
)
NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx",) if os.access(path, os.X_OK)), None
)
OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(
    NGINX is None or OPENSSL is None,
    reason="nginx or openssl is not installed (`make proxy` installs nginx as root with apt-get)",
)
# Svix's client, as the bridge sees it: an address other than nginx's own 127.0.0.1.
CLIENT = "127.0.0.5"
# The bridge listens on a loopback address of its own; 127.0.0.1 stands for the host's public one.
BRIDGE_HOST = "127.0.0.2"


@dataclass
class Proxied:
    """nginx on its public and internal ports, the bridge behind it, and the bridge's log."""

    public: int
    internal: int
    bridge_port: int
    cert: Path
    log_path: Path

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, str, bytes]:
        """One HTTPS request to nginx's public port from CLIENT: status, content type, body."""
        context = ssl.create_default_context(cafile=str(self.cert))
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.public, timeout=30, context=context, source_address=(CLIENT, 0)
        )
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.getheader("content-type", ""), response.read()
        finally:
            connection.close()

    def webhook_lines(self) -> list[dict[str, Any]]:
        """The bridge's `webhook` log lines so far."""
        lines = self.log_path.read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [event for event in events if event.get("message") == "webhook"]


def edited(path: Path, edits: dict[str, str]) -> str:
    """The sample at path with exactly these lines changed, each of them one marked EDIT."""
    text = path.read_text()
    for old, new in edits.items():
        lines = [line for line in text.splitlines() if old in line]
        assert len(lines) == 1, f"{path.name} no longer has exactly one `{old}`"
        assert "# EDIT" in lines[0], f"{path.name}: `{old}` is changed but not marked EDIT"
        text = text.replace(old, new)
    return text


def site_config(public: int, internal: int, bridge: str, cert: Path, key: Path) -> str:
    """docs/nginx.conf with its EDIT lines set to this test's ports and certificate."""
    return edited(
        SAMPLE,
        {
            "listen 443 ssl;": f"listen 127.0.0.1:{public} ssl;",
            "server 127.0.0.1:8080;": f"server {bridge};",
            "ssl_certificate /etc/ssl/openmeter-bridge/fullchain.pem;": f"ssl_certificate {cert};",
            "ssl_certificate_key /etc/ssl/openmeter-bridge/privkey.pem;": (
                f"ssl_certificate_key {key};"
            ),
            "listen 127.0.0.1:8081;": f"listen 127.0.0.1:{internal};",
        },
    )


def main_config(workdir: Path, site: Path) -> str:
    """docs/nginx-main.conf with its EDIT lines set to this test's user and folders."""
    # `user` is read only by a root master (whose workers would otherwise become www-data, who
    # cannot read the certificate here); without root it would only draw a warning.
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    edits = {
        "user www-data;": f"user {user} {group};" if os.geteuid() == 0 else "",
        "pid /run/nginx.pid;": f"pid {workdir / 'nginx.pid'};",
        "error_log /var/log/nginx/error.log notice;": f"error_log {workdir / 'error.log'} notice;",
        "access_log /var/log/nginx/access.log;": f"access_log {workdir / 'access.log'};",
        "include /etc/nginx/conf.d/openmeter-bridge.conf;": f"include {site};",
    }
    for kind, folder in [
        ("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"), ("uwsgi", "uwsgi"),
        ("scgi", "scgi"),
    ]:  # fmt: skip
        edits[f"{kind}_temp_path /var/lib/nginx/{folder};"] = f"{kind}_temp_path {workdir / kind};"
    return edited(MAIN, edits)


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A throw-away self-signed certificate for 127.0.0.1, and its key."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [str(OPENSSL), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def listening(host: str, port: int) -> bool:
    """True once something accepts TCP connections there."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def proxied(environment: dict[str, str], billing: Billing, tmp_path: Path) -> Iterator[Proxied]:
    """gunicorn (BIND on a loopback address, TRUSTED_PROXIES=1) and nginx running the sample."""
    workdir = tmp_path / "nginx"
    workdir.mkdir()
    bridge_port, public, internal = free_port(), free_port(), free_port()
    bridge = f"{BRIDGE_HOST}:{bridge_port}"
    env = environment | {"BIND": bridge, "TRUSTED_PROXIES": "1", "TMPDIR": str(tmp_path)}
    log_path = tmp_path / "gunicorn.log"
    service = start_service(env, log_path)
    nginx: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: healthy(f"http://{bridge}") or service.poll() is not None, 30)
        assert service.poll() is None, log_path.read_text()
        cert, key = make_certificate(workdir)
        site = workdir / "openmeter-bridge.conf"
        site.write_text(site_config(public, internal, bridge, cert, key))
        conf = workdir / "nginx.conf"
        conf.write_text(main_config(workdir, site))
        error_log = workdir / "error.log"
        with (workdir / "nginx.out").open("wb") as out:
            nginx = subprocess.Popen(
                [str(NGINX), "-p", str(workdir), "-e", str(error_log), "-c", str(conf),
                 "-g", "daemon off;"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(lambda: listening("127.0.0.1", public) or nginx.poll() is not None, 15)
        assert nginx.poll() is None, (workdir / "nginx.out").read_text() + error_log.read_text()
        yield Proxied(public, internal, bridge_port, cert, log_path)
    finally:
        if nginx is not None and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
            nginx.wait(timeout=30)
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=30)


def test_a_webhook_through_nginx_is_written_and_logged_with_its_client(
    proxied: Proxied, stripe_fake: FakeStripe, billing: Billing
) -> None:
    body = json.dumps(report([10, 20, 30]))
    forged = {"X-Forwarded-For": "203.0.113.66"}  # what a caller may claim; nginx drops it
    status, kind, answer = proxied.request(
        "POST", "/webhook", body.encode(), sign(body, "msg_proxy1") | forged
    )
    assert (status, kind) == (200, "application/json"), answer
    assert json.loads(answer)["outcome"] == "written"
    assert stripe_fake.usage_total(billing.api) == 60
    [line] = proxied.webhook_lines()
    assert line["message_id"] == "msg_proxy1" and line["status"] == 200
    # nginx itself connects from 127.0.0.1; the bridge names the caller from X-Forwarded-For.
    assert line["client"] == CLIENT


def test_a_direct_client_cannot_reach_the_bridge_to_forge_its_address(
    proxied: Proxied, stripe_fake: FakeStripe, billing: Billing
) -> None:
    # With BIND on a loopback address, the bridge's port answers nothing on the host's other
    # addresses (127.0.0.1 stands in for the public one here): a forged X-Forwarded-For sent
    # there never reaches the bridge, which trusts one hop (TRUSTED_PROXIES=1).
    body = json.dumps(report([5]))
    headers = sign(body, "msg_direct") | {"X-Forwarded-For": "203.0.113.66"}
    connection = http.client.HTTPConnection("127.0.0.1", proxied.bridge_port, timeout=5)
    with pytest.raises(ConnectionRefusedError):
        connection.request("POST", "/webhook", body=body, headers=headers)
    connection.close()
    assert proxied.webhook_lines() == []
    assert stripe_fake.usage_total(billing.api) == 0


def test_a_direct_client_forging_x_forwarded_for_is_logged_as_itself(
    proxied: Proxied, stripe_fake: FakeStripe, billing: Billing
) -> None:
    # A client that does reach the bridge's port, but not from FORWARDED_ALLOW_IPS (nginx's
    # 127.0.0.1 by default), keeps its own address whatever X-Forwarded-For it writes.
    body = json.dumps(report([5]))
    headers = sign(body, "msg_direct") | {"X-Forwarded-For": "203.0.113.66"}
    connection = http.client.HTTPConnection(
        BRIDGE_HOST, proxied.bridge_port, timeout=10, source_address=(CLIENT, 0)
    )
    connection.request("POST", "/webhook", body=body, headers=headers)
    assert connection.getresponse().status == 200
    connection.close()
    [line] = proxied.webhook_lines()
    assert line["client"] == CLIENT


def test_an_oversized_body_gets_the_bridges_json_413_through_nginx(
    proxied: Proxied, stripe_fake: FakeStripe, billing: Billing
) -> None:
    event = report([1])
    event["padding"] = "x" * (2 * 1024 * 1024)  # 2 MiB: over the bridge's 1 MiB, under nginx's
    body = json.dumps(event)
    status, kind, answer = proxied.request("POST", "/webhook", body.encode(), sign(body, "msg_big"))
    assert (status, kind) == (413, "application/json"), answer[:200]
    assert json.loads(answer)["error"] == "payload_too_large"
    assert stripe_fake.usage_total(billing.api) == 0


def test_metrics_and_readiness_are_served_only_on_the_internal_route(proxied: Proxied) -> None:
    for path in ("/metrics", "/readyz", "/healthz"):
        status, kind, answer = proxied.request("GET", path)
        assert (status, kind) == (404, "application/json"), (path, answer)
        assert json.loads(answer)["error"] == "not_found"
        connection = http.client.HTTPConnection("127.0.0.1", proxied.internal, timeout=10)
        connection.request("GET", path)
        assert connection.getresponse().status == 200, path
        connection.close()


def directives(name: str) -> list[str]:
    """The arguments of every `name` directive in the sample (comments removed)."""
    text = re.sub(r"#.*", "", SAMPLE.read_text())
    return re.findall(rf"(?m)^\s*{name}\s+([^;]*);", text)


def seconds(value: str) -> float:
    """An nginx time such as 20s, 1m or 500ms, in seconds."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value.strip()).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[unit]


def test_the_sample_waits_for_the_bridge_and_never_retries_a_post() -> None:
    # Svix waits 15 s for an answer; nginx's default read timeout (60 s) is fine, a shorter one
    # would cut off a write that is still going, and a retried POST would be a second delivery.
    reads = directives("proxy_read_timeout")
    assert reads and all(seconds(value) >= 15 for value in reads)
    assert directives("proxy_next_upstream") == ["off"]
    assert directives("proxy_set_header X-Forwarded-For") == ["$remote_addr"]


def test_every_site_specific_line_is_marked_edit() -> None:
    for path in (MAIN, SAMPLE):
        for line in path.read_text().splitlines():
            if SITE_SPECIFIC.match(line) and not line.lstrip().startswith("#"):
                assert "# EDIT" in line, f"{path.name}: {line.strip()}"
    assert "include" in MAIN.read_text() and "http {" in MAIN.read_text()


def test_a_process_on_the_host_can_forge_x_forwarded_for_as_the_sample_warns(
    proxied: Proxied, stripe_fake: FakeStripe, billing: Billing
) -> None:
    # The limit docs/nginx.conf states: the bridge believes forwarding headers from 127.0.0.1
    # (nginx's address), so a process on the host connecting from there is believed too. Only
    # the logged address is at stake: the webhook still needs its Svix signature.
    body = json.dumps(report([5]))
    headers = sign(body, "msg_local") | {"X-Forwarded-For": "203.0.113.66"}
    connection = http.client.HTTPConnection(
        BRIDGE_HOST, proxied.bridge_port, timeout=10, source_address=("127.0.0.1", 0)
    )
    connection.request("POST", "/webhook", body=body, headers=headers)
    assert connection.getresponse().status == 200
    connection.close()
    unsigned = {"X-Forwarded-For": "203.0.113.66", "content-type": "application/json"}
    connection = http.client.HTTPConnection(
        BRIDGE_HOST, proxied.bridge_port, timeout=10, source_address=("127.0.0.1", 0)
    )
    connection.request("POST", "/webhook", body=body, headers=unsigned)
    assert connection.getresponse().status == 401
    connection.close()
    assert [line["client"] for line in proxied.webhook_lines()] == ["203.0.113.66"] * 2
