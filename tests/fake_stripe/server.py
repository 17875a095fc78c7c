"""The fake on a socket: FakeStripe itself, its HTTP server and the `/_fake/...` control API."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

from tests.fake_stripe.api import Api
from tests.fake_stripe.fixtures import Fixtures
from tests.fake_stripe.rules import _new_id


class FakeStripe(Api, Fixtures):
    """Stripe's v1 API for customers, prices, meters, subscriptions, usage records, meter events."""

    def __init__(
        self, api_key: str = "sk_test_fake", *, now: Callable[[], float] = time.time
    ) -> None:
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        super().__init__(api_key, now=now)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serves on host:port (0: any free port) in a daemon thread; returns the base URL."""
        self._server = _Server((host, port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.url = f"http://{host}:{self._server.server_port}"
        return self.url

    def stop(self) -> None:
        """Stops serving; requests still sleeping in a fault are abandoned."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def _control(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """`/_fake/...`: state, reset, fixtures, faults and latency for other processes."""
        try:
            request = json.loads(body or b"{}")
            if (method, path) == ("GET", "/_fake/state"):
                return 200, self.state()
            if (method, path) == ("POST", "/_fake/reset"):
                self.reset()
            elif (method, path) == ("POST", "/_fake/fixtures"):
                self.add_fixtures(request)
            elif (method, path) == ("POST", "/_fake/faults"):
                if isinstance(request, dict) and request.get("clear"):
                    self.clear_faults()
                else:
                    for fault in request:
                        self.inject(**fault)
            elif (method, path) == ("POST", "/_fake/latency"):
                self.latency = float(request["seconds"])
            elif (method, path) == ("POST", "/_fake/rate_limit"):
                self.limit_rate(request.get("rate"), request.get("burst"))
            elif (method, path) == ("GET", "/_fake/rate_limit"):
                limit = self.rate_limit
                return 200, {"refused": limit.refused if limit else 0}
            else:
                return 404, {"error": f"no control endpoint {method} {path}"}
        except (ValueError, TypeError, KeyError) as error:
            return 400, {"error": f"{type(error).__name__}: {error}"}
        return 200, {"ok": True}


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server that knows its fake."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the benchmark opens many connections at once

    def __init__(self, address: tuple[str, int], fake: FakeStripe) -> None:
        super().__init__(address, _Handler)
        self.fake = fake

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (say, a killed process) is not an error; anything else is."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, lets the fake answer it, and writes (or withholds) the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, like api.stripe.com
    disable_nagle_algorithm = True  # else each answer waits ~40 ms for the client's delayed ACK

    def do_GET(self) -> None:
        """Any GET."""
        self._handle("GET")

    def do_POST(self) -> None:
        """Any POST."""
        self._handle("POST")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests and the benchmark read the recorded requests instead."""

    def _handle(self, method: str) -> None:
        """Dispatches to the control API or the fake Stripe API."""
        fake = cast(_Server, self.server).fake
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if url.path.startswith("/_fake/"):
            status, answer = fake._control(method, url.path, body)
            self._send(status, answer, {"Request-Id": _new_id("req")})
            return
        headers = {key.lower(): value for key, value in self.headers.items()}
        outcome = fake._serve(method, url.path, url.query, body, headers)
        if outcome.delay > 0:
            time.sleep(outcome.delay)  # a late answer: the client may have given up by now
        if outcome.body is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)  # closed with no answer at all
            return
        self._send(outcome.status, outcome.body, outcome.headers)

    def _send(self, status: int, body: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        """Writes a JSON answer; a client that already left is not an error."""
        data = json.dumps(body, indent=2).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
