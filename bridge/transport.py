"""stripe's HTTP transport over urllib3's pool, each request's timeout cut to the webhook's
budget; and the egress proxy, read from the environment as requests reads it."""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

import requests
import stripe
import urllib3

from bridge.budget import time_left
from bridge.logs import STRIPE_429
from bridge.pacing import Pacer

STRIPE_READ_TIMEOUT = 8.0


class BudgetHTTPClient(stripe.HTTPClient):
    """stripe's transport over urllib3's connection pool, each request's timeout cut to what is
    left of the webhook's budget (stripe's RequestsClient takes one timeout for every request)."""

    name = "urllib3"

    def __init__(self, proxy: str | None = None, pacer: Pacer | None = None) -> None:
        super().__init__()
        self._pacer = pacer
        # Idle connections kept per host: more than gunicorn's 16 threads a worker, so that none
        # is closed after use for want of room (urllib3 keeps one by default).
        options: dict[str, Any] = {"maxsize": 32, "ca_certs": stripe.ca_bundle_path}
        self._pool: urllib3.PoolManager
        if proxy is None:
            self._pool = urllib3.PoolManager(**options)
        else:
            # As requests does: the proxy URL's user and password, percent-decoded, go in the
            # CONNECT request's Proxy-Authorization; TLS then runs through the tunnel to Stripe.
            user, password = requests.utils.get_auth_from_url(proxy)
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
            message = f"Stripe unreachable: {type(error).__name__}: {error}"
            raise stripe.APIConnectionError(message, should_retry=retry) from error  # type: ignore[no-untyped-call]
        if response.status == 429:
            self._rate_limited(response.headers.get("Stripe-Rate-Limited-Reason"))
        # The headers stay case-insensitive: stripe looks Request-Id up in any case.
        return response.data, response.status, response.headers

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
    try:
        proxy = egress_proxy(url)
    except ValueError:  # urllib3's LocationParseError: no URL at all
        proxy = ""
    if proxy is not None and not _is_http_proxy(proxy):
        return [
            f"{scheme.upper()}_PROXY (or {scheme}_proxy, all_proxy) must be "
            "http://[user:password@]host[:port]: a CONNECT proxy (socks and https proxies are "
            "not supported)"
        ]
    return []


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
