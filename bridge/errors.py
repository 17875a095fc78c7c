"""Errors: each one is an answer an operator reads in Svix's dashboard."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ConfigError(Exception):
    """The environment or config.yaml is unusable; every problem is named by its path."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class BridgeError(Exception):
    """A webhook that cannot be accepted (yet), with the status and advice Svix will show."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, hint: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def body(self) -> dict[str, Any]:
        """The JSON answer for this error."""
        return {"error": self.code, "message": self.message, "hint": self.hint, **self.details}


class BadSignature(BridgeError):
    status, code = 401, "bad_signature"


class BadRequest(BridgeError):
    status, code = 400, "bad_payload"


class PayloadTooLarge(BridgeError):
    status, code = 413, "payload_too_large"


class Unmapped(BridgeError):
    status, code = 422, "not_configured"


class StripeRefused(BridgeError):
    status, code = 422, "stripe_refused"


class StripeUnavailable(BridgeError):
    status, code = 503, "stripe_unavailable"


class SharedCustomer(BridgeError):
    status, code = 422, "shared_customer"


class WindowsWaiting(BridgeError):
    status, code = 503, "windows_waiting"


class NotReady(BridgeError):
    status, code = 503, "not_ready"


class LedgerUnavailable(BridgeError):
    status, code = 503, "ledger_unavailable"
