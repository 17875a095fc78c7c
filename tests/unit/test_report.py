"""OpenMeter report parsing: strict JSON, windows summed per row, times, values, completeness."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from bridge.errors import BadRequest
from bridge.report import (
    decode_json,
    event_type,
    incomplete,
    parse_report,
    parse_time,
    parse_value,
)
from tests.unit.objects import T0, report, window

NOW = T0 + timedelta(days=2)


def event(*rows: dict[str, Any], **query: Any) -> dict[str, Any]:
    """A report.meter event of meter `tokens` (SUM) with the given rows."""
    return {
        "type": "report.meter",
        "meter": {"slug": "tokens", "aggregation": "SUM"},
        "query": {"subject": "acme", **query},
        "usage": list(rows),
    }


def row(hour: int, value: Any, subject: str | None = None) -> dict[str, Any]:
    """One usage row of the hour starting `hour` hours after T0."""
    start = T0 + timedelta(hours=hour)
    cells = {
        "windowStart": start.isoformat().replace("+00:00", "Z"),
        "windowEnd": (start + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
        "value": value,
    }
    return cells | ({"subject": subject} if subject else {})


def test_rows_of_one_window_are_summed_and_windows_sorted() -> None:
    parsed = parse_report(event(row(1, 2), row(0, Decimal("0.5")), row(0, "1.5")), NOW)
    assert [(w.start, w.value) for w in parsed.windows] == [
        (T0, Decimal("2.0")),
        (T0 + timedelta(hours=1), Decimal(2)),
    ]
    assert (parsed.meter, parsed.subject, parsed.aggregation) == ("tokens", "acme", "SUM")


def test_a_window_is_the_sum_of_its_rows_negative_ones_included() -> None:
    (only,) = parse_report(event(row(0, 3), row(0, Decimal("-1")), row(0, 1)), NOW).windows
    assert only.value == Decimal(3)


def test_the_query_range_is_read_when_given() -> None:
    parsed = parse_report(event(row(0, 1), **{"from": "2026-11-01T00:00:00Z"}), NOW)
    assert (parsed.query_from, parsed.query_to) == (T0, None)


def test_a_report_is_about_exactly_one_subject() -> None:
    with pytest.raises(BadRequest) as refused:
        parse_report(event(row(0, 1, "acme"), row(1, 1, "globex")), NOW)
    assert refused.value.details == {"subjects": ["acme", "globex"]}


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([row(0, 1) | {"windowEnd": row(0, 1)["windowStart"]}], "windowEnd must be after"),
        ([row(0, 1) | {"windowEnd": "2026-12-03T01:00:00Z"}], "longer than a month"),
        ([row(72, 1)], "starts in the future"),
        ([row(0, 1), row(0, 1) | {"windowEnd": "2026-11-01T00:30:00Z"}], "windows overlap"),
        (["not an object"], "must be an object"),
    ],
)
def test_windows_that_cannot_be_billed_are_refused(rows: list[Any], words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        parse_report(event(*rows), NOW)


def test_times_are_rfc3339_with_a_zone_and_read_in_utc() -> None:
    assert parse_time("2026-11-01T01:00:00+01:00", "t") == T0
    assert parse_time("2026-11-01 00:00:00.5z", "t") == T0 + timedelta(milliseconds=500)
    for bad in ["2026-11-01T00:00:00", "2026-11-01", 1767225600, "0001-01-01T00:00:00+01:00"]:
        with pytest.raises(BadRequest):
            parse_time(bad, "t")


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (3, Decimal(3)),
        (" 2.5 ", Decimal("2.5")),
        ("1e3", Decimal(1000)),
        (Decimal("1e-31"), Decimal(0)),  # below every zero threshold: zero
        (Decimal("0e99999"), Decimal(0)),
        (Decimal("1e30"), Decimal("1e30")),
        (Decimal("0." + "1" * 40), Decimal("0." + "1" * 30)),  # kept to 30 decimal places
    ],
)
def test_values_are_exact_decimals(raw: Any, value: Decimal) -> None:
    assert parse_value(raw, "v") == value


@pytest.mark.parametrize("raw", [True, None, 1.5, "NaN", "1,5", "\u0661", Decimal("1e31"), "1e31"])
def test_values_that_are_not_usage_are_refused(raw: Any) -> None:
    with pytest.raises(BadRequest):
        parse_value(raw, "v")


def test_json_is_strict_and_its_numbers_are_decimal() -> None:
    assert decode_json(b'{"v": 0.1, "tiny": 1e-99999999999999999999999999}') == {
        "v": Decimal("0.1"),
        "tiny": Decimal(0),
    }
    for body in [b'{"v": 1, "v": 2}', b'{"v": NaN}', b'{"v": Infinity}', b"{", b"\xff"]:
        with pytest.raises(BadRequest):
            decode_json(body)


def test_the_event_type_is_a_string_of_an_object() -> None:
    assert event_type({"type": "report.meter"}) == "report.meter"
    for bad in [[], {"type": 1}, {}]:
        with pytest.raises(BadRequest):
            event_type(bad)


def test_a_window_inside_the_query_range_is_complete() -> None:
    made_at = T0 + timedelta(hours=2)
    assert incomplete(window(0), report(query_from=T0, query_to=made_at), made_at) is None


def test_a_window_outside_the_query_range_is_incomplete() -> None:
    made_at = T0 + timedelta(hours=2)
    late = report(query_from=T0 + timedelta(minutes=30))
    assert "query.from" in (incomplete(window(0), late, made_at) or "")
    early = report(query_to=T0 + timedelta(minutes=30))
    assert "query.to" in (incomplete(window(0), early, made_at) or "")


def test_query_to_counts_only_up_to_a_minute_after_the_report_was_made() -> None:
    made_at = T0 + timedelta(minutes=59)  # query.to says 02:00, the report came at 00:59
    assert incomplete(window(0), report(query_to=T0 + timedelta(hours=2)), made_at) is None
    made_at = T0 + timedelta(minutes=58, seconds=59)
    assert incomplete(window(0), report(query_to=T0 + timedelta(hours=2)), made_at)


def test_without_query_to_a_window_must_have_ended_when_the_report_was_made() -> None:
    assert incomplete(window(0), report(), T0 + timedelta(hours=1)) is None
    assert "had not ended" in (incomplete(window(0), report(), T0 + timedelta(minutes=59)) or "")


def test_parse_report_refuses_a_report_without_usage_rows() -> None:
    with pytest.raises(BadRequest, match="usage must be a list"):
        parse_report({"meter": {"slug": "m"}, "query": {}, "usage": None}, NOW)
