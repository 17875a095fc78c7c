"""OpenMeter's report.meter event: strict JSON, its windows, and whether it holds them in full."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import (
    Context,
    Decimal,
)
from typing import Any

from bridge.errors import BadRequest

RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
NUMERIC_STRING = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")  # ASCII only


# Exact decimal arithmetic on any value that passes parse_value's bounds.
DECIMAL = Context(prec=80)
MAX_WINDOW = timedelta(days=32)  # OpenMeter's largest window is a month (31 days and a DST hour)


@dataclass(frozen=True)
class Window:
    """One usage window [start, end) and the summed value of its rows (one per group); for a
    MAX meter, the largest row (window_value).

    The sum is what is billed and what is judged negative: a credit row (-3) beside a usage row
    (500) is a window of 497, not a negative one.
    """

    start: datetime
    end: datetime
    value: Decimal


@dataclass(frozen=True)
class Report:
    """A parsed report.meter event: one subject's usage of one meter."""

    meter: str
    subject: str
    aggregation: str | None
    windows: tuple[Window, ...]
    query_from: datetime | None = None  # the range OpenMeter queried, when the report says
    query_to: datetime | None = None


def decode_json(body: bytes) -> Any:
    """Strict JSON: no NaN or Infinity, no duplicate keys, numbers as Decimal."""
    try:
        return json.loads(
            body,
            parse_float=_decimal,
            parse_constant=_reject_constant,
            object_pairs_hook=_reject_duplicates,
        )
    except (ValueError, ArithmeticError, RecursionError) as error:  # 1e999999999999: Decimal's
        raise BadRequest(
            f"body is not valid JSON: {str(error)[:200]}",
            "Send the OpenMeter report body unchanged.",
        ) from error


def _decimal(text: str) -> Decimal:
    """A number's text as Decimal; one too small for Decimal's exponent is zero (as for billing).

    Too large for it is an ArithmeticError, which the caller answers 400.
    """
    try:
        return Decimal(text)
    except ArithmeticError:
        if re.search(r"[eE]-[0-9]", text):  # 1e-99999999999999999999999999: finite, and tiny
            return Decimal(0)
        raise


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON, and not usage."""
    raise ValueError(f"{name} is not a number")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is ambiguous: which value would be billed?"""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def event_type(event: Any) -> str:
    """The event's type; OpenMeter may send other events than usage reports to this endpoint."""
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise BadRequest("body must be a JSON object with a string 'type'")
    return str(event["type"])


def parse_report(event: dict[str, Any], now: datetime) -> Report:
    """Validates a report.meter event and adds up its rows per window (window_value)."""
    meter = _object(event, "meter").get("slug")
    if not isinstance(meter, str) or not meter:
        raise BadRequest("meter.slug must be a non-empty string")
    aggregation = _object(event, "meter").get("aggregation")
    query_subject = _object(event, "query").get("subject")
    rows = event.get("usage")
    if not isinstance(rows, list):
        raise BadRequest("usage must be a list of rows")
    subjects: set[str] = set()
    sums: dict[tuple[datetime, datetime], Decimal] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(f"usage[{index}] must be an object")
        subject = row.get("subject") or query_subject
        if not isinstance(subject, str) or not subject:
            raise BadRequest(f"usage[{index}].subject: missing (and no query.subject)")
        subjects.add(subject)
        start = parse_time(row.get("windowStart"), f"usage[{index}].windowStart")
        end = parse_time(row.get("windowEnd"), f"usage[{index}].windowEnd")
        if end <= start:
            raise BadRequest(f"usage[{index}]: windowEnd must be after windowStart")
        if end - start > MAX_WINDOW:
            raise BadRequest(f"usage[{index}]: a window cannot be longer than a month")
        if start > now:
            raise BadRequest(f"usage[{index}]: window starts in the future ({row['windowStart']})")
        value = parse_value(row.get("value"), f"usage[{index}].value")
        sums[start, end] = window_value(aggregation, sums.get((start, end)), value)
    if not subjects and isinstance(query_subject, str) and query_subject:
        subjects.add(query_subject)
    if len(subjects) != 1:
        raise BadRequest("a report must be about exactly one subject", subjects=sorted(subjects))
    windows = tuple(Window(start, end, value) for (start, end), value in sorted(sums.items()))
    for earlier, later in itertools.pairwise(windows):
        if later.start < earlier.end:
            raise BadRequest(f"windows overlap: {earlier.start} and {later.start}")
    query = _object(event, "query")
    return Report(
        meter=meter,
        subject=subjects.pop(),
        aggregation=aggregation if isinstance(aggregation, str) else None,
        windows=windows,
        query_from=_optional_time(query.get("from"), "query.from"),
        query_to=_optional_time(query.get("to"), "query.to"),
    )


def window_value(aggregation: Any, so_far: Decimal | None, row: Decimal) -> Decimal:
    """A window's value with one more of its group rows: the meter's aggregation over the whole
    window. A MAX meter's is the peak of every group (summed, two groups' peaks would bill a peak
    nobody reached); SUM's and COUNT's is their sum."""
    if so_far is None:
        return row
    if isinstance(aggregation, str) and aggregation.upper() == "MAX":
        return max(so_far, row)
    return DECIMAL.add(so_far, row)


def _optional_time(raw: Any, path: str) -> datetime | None:
    """A timestamp the report may leave out (absent or null)."""
    return None if raw is None else parse_time(raw, path)


def _object(event: dict[str, Any], name: str) -> dict[str, Any]:
    """A nested object of the event, or a 400 naming it."""
    value = event.get(name)
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object")
    return value


def parse_time(raw: Any, path: str) -> datetime:
    """An RFC 3339 timestamp with a zone, in UTC."""
    if not isinstance(raw, str) or not RFC3339.fullmatch(raw):
        raise BadRequest(f"{path}: must be an RFC 3339 timestamp such as 2026-11-22T00:00:00Z")
    try:
        return datetime.fromisoformat(raw.upper().replace(" ", "T")).astimezone(UTC)
    except (ValueError, OverflowError) as error:  # OverflowError: year 1 or 9999 shifted to UTC
        raise BadRequest(f"{path}: {error}") from error


# Values are kept to 30 decimal places, far finer than any zero threshold (ZERO_BELOW): with at
# most 31 digits before the point, sums stay exact in DECIMAL's 80 digits.
VALUE_QUANTUM = Decimal("1e-30")


def parse_value(raw: Any, path: str) -> Decimal:
    """A usage value, from any finite JSON number or numeric string, to 30 decimal places.

    It may still be slightly negative (float noise): the target decides what is zero.
    """
    if isinstance(raw, bool) or not isinstance(raw, int | Decimal | str):
        raise BadRequest(f"{path}: must be a number or a numeric string")
    if isinstance(raw, str) and not NUMERIC_STRING.fullmatch(raw.strip()):
        raise BadRequest(f"{path}: {raw[:40]!r} is not a number")
    try:
        value = _decimal(raw.strip()) if isinstance(raw, str) else Decimal(raw)
    except ArithmeticError as error:  # an exponent beyond what Decimal holds
        raise BadRequest(f"{path}: value out of range") from error
    if value.is_zero() or value.adjusted() < -30:
        return Decimal(0)  # 0e99999 is zero, and so is what lies below every zero threshold
    if value.adjusted() > 30:  # far beyond any real meter
        raise BadRequest(f"{path}: value out of range")
    if value.as_tuple().exponent < -30:  # type: ignore[operator]
        return value.quantize(VALUE_QUANTUM, context=DECIMAL)
    return value


# How much earlier than a report's query.to its first attempt may seem to come: the clocks of
# OpenMeter, Svix and this host differ by that much at most.
CLOCK_SKEW = timedelta(minutes=1)


def incomplete(window: Window, report: Report, made_at: datetime) -> str | None:
    """Why the report cannot hold the window's full value, judged from the report alone.

    A report's body never changes across Svix's retries: a window it holds partially stays
    partial in every retry, whatever the clock says when the retry comes.
    """
    if report.query_from and window.start < report.query_from:
        return f"starts before the report's query.from ({report.query_from.isoformat()})"
    if report.query_to and window.end > (ends_by := min(report.query_to, made_at + CLOCK_SKEW)):
        return f"ends after {ends_by.isoformat()}: query.to, or a minute after the report was made"
    if not report.query_to and window.end > made_at:
        return f"had not ended when the report was made ({made_at.isoformat()})"
    return None
