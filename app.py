"""OpenMeter -> Stripe usage bridge: the Flask app.

Verifies a Svix-signed OpenMeter usage report, maps its meter to a Stripe price and its subject to a
Stripe subscription (config.yaml), writes every usage window to Stripe, and only then answers 200.
Any failure answers non-2xx so that Svix retries; every write is idempotent, so retries never
count twice. The work is done by the `bridge` package (bridge/__init__.py maps it); this module is
the web side: the routes, their JSON answers, and one webhook's short path.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from bridge.budget import time_budget
from bridge.cli import check_config_command, replay_command
from bridge.errors import BridgeError, ConfigError, NotReady, PayloadTooLarge
from bridge.logs import WEBHOOKS, configure_logging, log, log_event, metrics_text
from bridge.service import Bridge, make_bridge, process_event
from bridge.settings import Settings
from bridge.signature import attempt_budget, sent_at, verify

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

MAX_BODY_BYTES = 1024 * 1024
DRAIN_BYTES = 8 * 1024 * 1024  # a refused body read up to this (docs/nginx.conf passes 4 MiB)


def process_webhook(
    bridge: Bridge, body: bytes, headers: Mapping[str, str], facts: dict[str, Any]
) -> dict[str, Any]:
    """One webhook's short path: verify it, then parse, resolve, plan and write (process_event);
    returns the 200 answer, or raises the BridgeError that answers it."""
    message_id = verify(body, headers, bridge.verifiers)
    return process_event(bridge, body, message_id, facts, sent_at=sent_at(headers))


def read_body() -> bytes:
    """The request body, refused whole past 1 MiB (OpenMeter's reports are far smaller)."""
    try:
        return request.get_data(cache=False)
    except RequestEntityTooLarge as error:
        drain_body(request.environ, request.content_length or 0)
        raise PayloadTooLarge(
            f"body over {MAX_BODY_BYTES} bytes", "Send a narrower report (fewer windows or groups)."
        ) from error


def drain_body(environ: WSGIEnvironment, length: int) -> None:
    """Reads and drops a refused body of up to DRAIN_BYTES before the 413 is sent.

    A connection closed with the body unread is reset by the kernel; a proxy that was still
    sending it (nginx sends the whole body first) then answers 502 instead of the 413 that names
    the fix. gunicorn's own graceful close drains only 64 KiB (gunicorn.util.close_graceful).
    """
    if length > DRAIN_BYTES:
        return  # more than any proxy in front passes: not worth reading
    stream = environ["wsgi.input"]
    while length > 0 and (chunk := stream.read(min(length, 64 * 1024))):
        length -= len(chunk)


class TrustedProxyFix:
    """werkzeug's ProxyFix for requests from a trusted proxy; others keep their own address.

    ProxyFix believes X-Forwarded-For from any peer, so a client that reaches the port directly
    could forge the address the logs show; gunicorn trusts forwarding headers only from
    FORWARDED_ALLOW_IPS, and so does this.
    """

    def __init__(self, wsgi_app: WSGIApplication, settings: Settings) -> None:
        hops = settings.trusted_proxies
        self._direct, self._proxied = wsgi_app, ProxyFix(wsgi_app, x_for=hops, x_proto=hops)
        self._allow_all = "*" in settings.forwarded_allow_ips
        self._allowed = [
            ipaddress.ip_network(a, strict=False) for a in settings.forwarded_allow_ips if a != "*"
        ]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Serves the request, with the forwarded client only if the peer may forward."""
        trusted = self._allow_all or self._trusted(environ.get("REMOTE_ADDR", ""))
        return (self._proxied if trusted else self._direct)(environ, start_response)

    def _trusted(self, peer: str) -> bool:
        """Whether peer is one of the allowed proxies."""
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:  # a Unix socket has no address: only a local proxy can reach it
            return True
        return any(address in network for network in self._allowed)


def create_app(test_config: Mapping[str, str] | None = None) -> Flask:
    """Builds the service from the environment; test_config overrides environment variables.

    A missing variable or a bad config.yaml leaves the app unready (serve() then refuses to
    start), so that the CLI commands, which need less, still run.
    """
    configure_logging()
    environ = {**os.environ, **(test_config or {})}
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    bridge: Bridge | None = None
    problems: list[str] = []
    try:
        bridge = make_bridge(environ)
    except ConfigError as error:
        problems = error.problems
    app.extensions["bridge"], app.extensions["problems"] = bridge, problems
    if bridge and bridge.settings.trusted_proxies:
        app.wsgi_app = TrustedProxyFix(app.wsgi_app, bridge.settings)  # type: ignore[method-assign]

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: the process serves requests."""
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        """Readiness: a valid config is loaded, the environment is complete, and Stripe has not
        rejected the API key since its last successful call."""
        if bridge is None:
            return jsonify(status="not_ready", problems=problems), 503
        bridge.config.current()
        if problem := bridge.key_health.problem():  # until a Stripe call succeeds again
            return jsonify(
                status="not_ready", problems=[problem], config=bridge.config.status()
            ), 503
        return jsonify(status="ready", config=bridge.config.status()), 200

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics, summed over the gunicorn workers."""
        return Response(metrics_text(), mimetype="text/plain; version=0.0.4")

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        """Takes one Svix-delivered OpenMeter event; 200 only once Stripe has every window."""
        started = time.monotonic()
        facts: dict[str, Any] = {"client": request.remote_addr}
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            if bridge is None:
                raise NotReady("the service is not configured: " + "; ".join(problems))
            budget = attempt_budget(bridge.settings.time_budget, headers, time.time())
            with time_budget(budget):
                answer, status = process_webhook(bridge, read_body(), headers, facts), 200
        except BridgeError as error:
            answer, status = error.body(), error.status
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        outcome = answer.get("outcome") or answer.get("error")
        WEBHOOKS.labels(outcome, str(status)).inc()
        log_event("webhook", **facts, outcome=outcome, status=status, duration_ms=duration_ms)
        return jsonify(answer), status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        """Wrong paths and methods get JSON too."""
        status = error.code or 500
        return jsonify(
            error=(error.name or "error").lower().replace(" ", "_"), message=error.description
        ), status

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> tuple[Response, int]:
        """A bug: log it whole, answer without details (Svix retries)."""
        log.exception("unexpected error", extra={"fields": {"path": request.path}})
        return jsonify(
            error="internal_error",
            message="unexpected error; see the service's logs",
            hint="Svix will retry; report this if it persists.",
        ), 500

    app.cli.add_command(check_config_command)
    app.cli.add_command(replay_command)
    return app


def serve() -> Flask:
    """The app gunicorn serves: a configuration problem stops the start with its message alone."""
    app = create_app()
    if problems := app.extensions["problems"]:
        log_event("cannot start", logging.ERROR, problems=problems)
        raise SystemExit("cannot start:\n- " + "\n- ".join(problems))
    bridge = app.extensions["bridge"]
    log_event(
        "started",
        config_path=bridge.settings.config_path,
        config_checksum=bridge.config.checksum,
        secrets=len(bridge.settings.webhook_secrets),
        trusted_proxies=bridge.settings.trusted_proxies,
    )
    return app
