"""stripe's HTTP transport over urllib3's pool, each request's timeout cut to the webhook's
budget; and the egress proxy, read from the environment as requests reads it."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

import requests
import stripe
import urllib3

from bridge.budget import time_left
from bridge.logs import STRIPE_429, log_event
from bridge.pacing import Pacer
from bridge.stripe_health import KeyHealth

STRIPE_READ_TIMEOUT = 8.0


class BudgetHTTPClient(stripe.HTTPClient):
    """stripe's transport over urllib3's connection pool, each request's timeout cut to what is
    left of the webhook's budget (stripe's RequestsClient takes one timeout for every request)."""

    name = "urllib3"

    def __init__(
        self, proxy: str | None = None, pacer: Pacer | None = None, health: KeyHealth | None = None
    ) -> None:
        super().__init__()
        self._pacer = pacer
        self.health = health or KeyHealth()
        self._proxy_address = _without_credentials(proxy)
        # Idle connections kept per host: more than gunicorn's 16 threads a worker, so that none
        # is closed after use for want of room (urllib3 keeps one by default).
        options: dict[str, Any] = {"maxsize": 32, "ca_certs": stripe.ca_bundle_path}
        self._secret: str | None = None
        self._pool: urllib3.PoolManager
        if proxy is None:
            self._pool = urllib3.PoolManager(**options)
        else:
            # As requests does: the proxy URL's user and password, percent-decoded, go in the
            # CONNECT request's Proxy-Authorization; TLS then runs through the tunnel to Stripe.
            user, password = requests.utils.get_auth_from_url(proxy)
            self._secret = password or None
            auth = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}") if user else None
            self._pool = urllib3.ProxyManager(proxy, proxy_headers=auth, **options)

    def request(  # type: ignore[override]  # bytes, as stripe's own RequestsClient returns
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        post_data: Any = None,
        *,
        _usage: list[str] | None = None,
    ) -> tuple[bytes, int, Mapping[str, str]]:
        """One HTTP exchange, in its turn of the rate budget; a network failure is stripe's
        retryable APIConnectionError."""
        if self._pacer is not None:
            self._pacer.wait_turn(time_left())
        timeout = urllib3.Timeout(total=min(STRIPE_READ_TIMEOUT, max(time_left(), 0.05)))
        try:
            # urlopen, not request: stripe's body is encoded already, and a plain dict of
            # headers spares urllib3 building a case-insensitive copy on every call.
            response = self._pool.urlopen(
                method.upper(),
                url,
                body=post_data,
                headers=dict(headers or {}),
                timeout=timeout,
                retries=False,  # call_stripe retries
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as error:
            # As stripe's RequestsClient: a certificate that does not verify is not retried.
            retry = not isinstance(error, urllib3.exceptions.SSLError)
            why = f"unreachable: {type(error).__name__}: {error}"
            self._failed(method, url, why, "Check STRIPE_API_BASE, HTTPS_PROXY and the network.")
            message = f"Stripe unreachable at {_origin(url)}: {type(error).__name__}: {error}"
            raise stripe.APIConnectionError(message, should_retry=retry) from error  # type: ignore[no-untyped-call]
        limited = response.headers.get("Stripe-Rate-Limited-Reason")
        if response.status == 429:
            self._rate_limited(limited)
        self._judge(method, url, response.status, response.data, limited)
        # The headers stay case-insensitive: stripe looks Request-Id up in any case.
        return response.data, response.status, response.headers

    def _judge(self, method: str, url: str, status: int, body: bytes, limited: str | None) -> None:
        """Records what an answer says of the key, and logs a failure the operator must see."""
        if status < 300:
            self.health.accepted()
            return
        # Stripe's error object: {"error": {"type", "code", "message"}} (docs.stripe.com/api/errors)
        code = _error_code(body) if status in {401, 403, 429} or status >= 500 else None
        if status == 401:
            why = "Stripe rejected the API key (401)"
            self.health.rejected(f"{why}: set STRIPE_API_KEY to a valid key, then restart")
            self._failed(method, url, why, "Set STRIPE_API_KEY to a valid key.")
        elif status == 403:
            why = f"the API key lacks a permission (403{', ' + code if code else ''})"
            self._failed(method, url, why, "Give the restricted key the permissions it needs.")
        elif status == 429:
            # docs.stripe.com/rate-limits: a limit names itself in Stripe-Rate-Limited-Reason
            # (global-rate, endpoint-rate, ...); a 429 lock_timeout without it is an object lock.
            if code == "lock_timeout" and not limited:
                why = "another request holds the object (429, lock_timeout)"
            else:
                why = f"rate limited (429, {limited or code or 'no reason given'})"
            self._failed(method, url, why, "Svix retries; nothing is written twice.")
        elif status >= 500:
            self._failed(method, url, f"Stripe server error ({status})", "Svix retries.")

    def _failed(self, method: str, url: str, why: str, hint: str) -> None:
        """One warning line: what was tried (address, method, path, proxy) and why it failed."""
        parts = urllib.parse.urlsplit(url)
        log_event(
            "stripe request failed",
            logging.WARNING,
            address=_origin(url),
            method=method.upper(),
            path=parts.path,
            proxy=self._proxy_address,
            reason=self._scrub(why),
            hint=hint,
        )

    def _scrub(self, text: str) -> str:
        """text without the egress proxy's password, should an error quote the proxy's URL."""
        return text if self._secret is None else text.replace(self._secret, "***")

    def _rate_limited(self, reason: str | None) -> None:
        """Counts a 429; one for a rate limit slows the budget for every worker."""
        # Stripe names the limiter that refused in Stripe-Rate-Limited-Reason (global-rate,
        # endpoint-rate, global-concurrency, endpoint-concurrency, resource-specific;
        # docs.stripe.com/rate-limits, "Handling limiting gracefully"). A 429 without it is an
        # object's lock timeout (code lock_timeout), which says nothing of the account's rate.
        STRIPE_429.labels(reason or "none").inc()
        if reason and self._pacer is not None:
            self._pacer.slow_down()

    def request_stream(self, *args: Any, **kwargs: Any) -> Any:
        """Streams are for file downloads, which the bridge never makes."""
        raise NotImplementedError

    def close(self) -> None:
        """Closes every pooled connection."""
        self._pool.clear()


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL: where a request went."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _without_credentials(proxy: str | None) -> str | None:
    """The proxy's scheme://host[:port], never its user and password (for logs)."""
    return _origin(proxy) if proxy else None


def _error_code(body: bytes) -> str | None:
    """The code of Stripe's error object in an answer's body, if there is one."""
    try:
        error = json.loads(body).get("error") or {}
        return str(error["code"]) if error.get("code") else None
    except (ValueError, AttributeError, TypeError):
        return None


def egress_proxy(url: str) -> str | None:
    """The proxy requests would take from the process environment for url (None: direct):
    lowercase https_proxy over HTTPS_PROXY, then all_proxy, unless NO_PROXY names the host."""
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if not proxy:
        return None
    return str(requests.utils.prepend_scheme_if_needed(proxy, "http"))  # type: ignore[no-untyped-call]


def proxy_problems(url: str) -> list[str]:
    """What is wrong with the egress proxy the Stripe transport would take for url, read from the
    process environment as requests reads it (whatever settings_from_env was given)."""
    environ = os.environ
    scheme = urllib.parse.urlsplit(url).scheme
    for name in (scheme, "all"):
        lower, upper = f"{name}_proxy", f"{name.upper()}_PROXY"
        if environ.get(lower) == "" and environ.get(upper):
            return [
                f"{lower} is set but empty, which turns {upper} off (the lowercase one wins, as "
                f"in curl and requests): unset {lower} to use the proxy, or {upper} to go direct"
            ]
    must = f"{scheme.upper()}_PROXY (or {scheme}_proxy, all_proxy) must be http://[user:password@]host[:port]"
    try:
        proxy = egress_proxy(url)
    except ValueError:  # urllib3's LocationParseError: a space, a bad port, ...
        # The value is never quoted: it may hold a password.
        return [f"{must}: the value set is not a URL (e.g. http://proxy.internal:3128)"]
    if proxy is None or _is_http_proxy(proxy):
        return []
    if urllib.parse.urlsplit(proxy).scheme != "http":
        return [f"{must}: a CONNECT proxy (socks and https proxies are not supported)"]
    return [f"{must}: the value set has no host, or a port outside 1-65535"]


def _is_http_proxy(url: str) -> bool:
    """Whether url names a plain-HTTP CONNECT proxy, the only kind the Stripe transport speaks."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        return parts.scheme == "http" and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, or out of range
        return False


def is_loopback_url(url: str) -> bool:
    """Whether url's host is this machine: localhost, 127.0.0.0/8 or ::1."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
