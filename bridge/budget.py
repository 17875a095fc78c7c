"""The webhook's time budget, which bounds every Stripe call made inside it."""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("deadline", default=math.inf)


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Bounds every Stripe call made inside, so that the answer reaches Svix in time."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left() -> float:
    """Seconds left in the current budget (infinite outside a webhook)."""
    return _deadline.get() - time.monotonic()
