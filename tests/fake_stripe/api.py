"""One API request: authentication, the version, faults, idempotency keys, object locks, routing."""

from __future__ import annotations

import contextlib
import copy
import secrets
import threading
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

from tests.fake_stripe.faults import _REFUSING_FAULTS, Faults, _fault_outcome
from tests.fake_stripe.handlers import Handlers
from tests.fake_stripe.params import decode_form
from tests.fake_stripe.rules import (
    _VERSION,
    IDEMPOTENCY_MISMATCH_MESSAGE,
    LOCK_TIMEOUT_MESSAGE,
    MAX_IDEMPOTENCY_KEY,
    StripeError,
    _bad_param,
    _mask,
    _new_id,
    _Outcome,
)
from tests.fake_stripe.state import RecordedRequest, _Saved


class Api(Handlers, Faults):
    """Answers one request as Stripe would, and records it."""

    lock_wait = 0.5  # how long a write waits for an object another write holds (lock_timeout)

    def _serve(
        self, method: str, path: str, query: str, body: bytes, headers: dict[str, str]
    ) -> _Outcome:
        """Answers one API request and records it."""
        params: dict[str, Any] = {}
        try:
            params = decode_form(body.decode() if method == "POST" else query)
            outcome = self._answer(method, path, params, headers)
        except UnicodeDecodeError:
            self._pause()
            outcome = _Outcome.of(_bad_param("Invalid request body: not UTF-8.", "body"))
        except StripeError as error:  # refused before the endpoint: 401, bad version, idempotency
            self._pause()
            outcome = _Outcome.of(error)
        outcome.headers["Request-Id"] = _new_id("req")
        outcome.headers["Stripe-Version"] = headers.get("stripe-version", self.default_version)
        recorded = RecordedRequest(
            method=method,
            path=path,
            params=params,
            headers=headers,
            status=outcome.status,
            idempotent_replay=outcome.replay,
            performed=outcome.performed,
            fault=outcome.fault,
            body=copy.deepcopy(outcome.body) if self.keep_bodies else None,
        )
        with self._lock:
            self.requests.append(recorded)
        return outcome

    def _answer(
        self, method: str, path: str, params: dict[str, Any], headers: dict[str, str]
    ) -> _Outcome:
        """Authentication, then faults, then idempotency, then the endpoint."""
        self._authenticate(headers.get("authorization", ""))
        version = headers.get("stripe-version", self.default_version)
        if not _VERSION.match(version):
            raise _bad_param(f"Invalid Stripe API version: {version}", "Stripe-Version")
        if self._over_rate_limit():  # before the endpoint: nothing saved under a key
            self._pause()
            outcome = _fault_outcome("429_rate")
            outcome.fault = "rate_limit"
            return outcome
        fault = self._take_fault(method, path)
        key = headers.get("idempotency-key") if method == "POST" else None
        if fault is not None and fault.kind in _REFUSING_FAULTS:
            self._pause()
            outcome = _fault_outcome(fault.kind)
            if outcome.saved and key is not None:
                self._save_answer(method, path, params, key, outcome)
            return outcome
        if key is None:
            outcome = self._perform(method, path, params, version)
        else:
            outcome = self._perform_once(method, path, params, version, key)
        if fault is not None:
            outcome.fault = fault.kind
            if fault.kind == "lost_response":
                outcome.body = None  # performed and saved, but the answer never leaves
            else:
                outcome.delay = fault.delay
        return outcome

    def _authenticate(self, authorization: str) -> None:
        """Stripe takes the secret key as a Bearer token."""
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            message = (
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_KEY')."
            )
            raise StripeError(401, message, saved=False)
        if not secrets.compare_digest(credentials.encode(), self.api_key.encode()):
            masked = _mask(credentials)
            raise StripeError(401, f"Invalid API Key provided: {masked}", saved=False)

    def _perform_once(
        self, method: str, path: str, params: dict[str, Any], version: str, key: str
    ) -> _Outcome:
        """Runs the endpoint once per idempotency key; a repeat replays the saved answer."""
        if len(key) > MAX_IDEMPOTENCY_KEY:
            message = f"Invalid Idempotency-Key: must be at most {MAX_IDEMPOTENCY_KEY} characters."
            raise _bad_param(message, "Idempotency-Key")
        scope = (self.api_key, key)  # keys are scoped to the account's key
        entry = _Saved(method, path, params)
        with self._lock:
            saved = self._idempotency.setdefault(scope, entry)
        if saved is not entry:
            return self._replay(saved, method, path, params, key)
        outcome = self._perform(method, path, params, version)
        with self._lock:
            if outcome.saved:
                entry.status, entry.body = outcome.status, outcome.body or {}
                entry.request_id = _new_id("req")
                outcome.headers["Original-Request"] = entry.request_id
            else:
                self._idempotency.pop(scope, None)  # the endpoint never ran: a retry runs afresh
        outcome.headers["Idempotency-Key"] = key
        return outcome

    def _save_answer(
        self, method: str, path: str, params: dict[str, Any], key: str, outcome: _Outcome
    ) -> None:
        """Saves an error the endpoint ended with, so that every retry with its key replays it."""
        with self._lock:
            entry = _Saved(method, path, params, outcome.status, outcome.body or {}, _new_id("req"))
            if self._idempotency.setdefault((self.api_key, key), entry) is entry:
                outcome.headers["Original-Request"] = entry.request_id
        outcome.headers["Idempotency-Key"] = key

    def _replay(
        self, saved: _Saved, method: str, path: str, params: dict[str, Any], key: str
    ) -> _Outcome:
        """The saved answer for a repeat; a different request or one still running is refused."""
        if (saved.method, saved.path, saved.params) != (method, path, params):
            message = IDEMPOTENCY_MISMATCH_MESSAGE.format(key=key)
            raise StripeError(400, message, error_type="idempotency_error", saved=False)
        if saved.status is None:
            message = (
                "There is currently another in-progress request using this Idempotent Key (that "
                "probably means you submitted twice, and the other request is still going "
                f"through): {key}. Please try again later."
            )
            raise StripeError(409, message, code="idempotency_key_in_use", saved=False)
        self._pause()
        headers = {
            "Idempotent-Replayed": "true",
            "Original-Request": saved.request_id,
            "Idempotency-Key": key,
        }
        return _Outcome(saved.status, saved.body, headers, replay=True)

    def _perform(self, method: str, path: str, params: dict[str, Any], version: str) -> _Outcome:
        """Runs the endpoint, holding the object it writes (Stripe's lock) through the latency."""
        route = self._route(method, path)
        if route is None:
            self._pause()
            message = (
                f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
                "or we can help at https://support.stripe.com/."
            )
            return _Outcome.of(StripeError(404, message, saved=False))
        handler, ids = route
        try:
            with self._holding(self._lock_key(path, params)):
                self._pause()
                with self._lock:
                    body = handler(ids, params, version)
        except StripeError as error:
            return _Outcome.of(error)
        except Exception as error:  # a bug in the fake: answer like Stripe's 500, never replay it
            traceback.print_exc()
            message = f"An unknown error occurred in the fake: {error!r}"
            return _Outcome(500, StripeError(500, message, error_type="api_error").body)
        return _Outcome(200, body, performed=True, saved=True)

    def _lock_key(self, path: str, params: Mapping[str, Any]) -> str | None:
        """The object a write locks: its subscription item, or its meter and customer."""
        if path.endswith("/usage_records"):
            return path
        with self._lock:
            if path == "/v1/billing/meter_events":
                meter = self._active_meter(str(params.get("event_name")))
                payload = params.get("payload")
                if meter is None or not isinstance(payload, dict):
                    return None
                key = meter["customer_mapping"]["event_payload_key"]
                return f"{meter['id']}:{payload.get(key)}"
            if path == "/v1/billing/meter_event_adjustments":
                cancel = params.get("cancel")
                identifier = cancel.get("identifier") if isinstance(cancel, dict) else None
                event = self._event_ids.get(str(identifier))
                return None if event is None else f"{event.meter}:{event.customer}"
        return None

    @contextlib.contextmanager
    def _holding(self, key: str | None) -> Iterator[None]:
        """Holds an object's lock; a write that cannot take it in `lock_wait` is a lock_timeout."""
        if key is None:
            yield
            return
        with self._lock:
            lock = self._object_locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=self.lock_wait):
            raise StripeError(
                429,
                LOCK_TIMEOUT_MESSAGE,
                code="lock_timeout",
                saved=False,
                headers={"Stripe-Should-Retry": "true"},
            )
        try:
            yield
        finally:
            lock.release()
