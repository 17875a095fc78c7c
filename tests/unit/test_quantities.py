"""A window's value as Stripe takes it: zero thresholds, negative usage, quantities, values."""

from __future__ import annotations

from decimal import Decimal

import pytest

from bridge.config import Config
from bridge.errors import BadRequest
from bridge.quantities import (
    MeterValue,
    Quantity,
    check_negative,
    denoised,
    meter_value_text,
    to_meter_value,
    to_quantity,
)
from tests.unit.objects import legacy_target, mapping, meter_target, report, window


@pytest.mark.parametrize(
    ("value", "multiplier", "rounding", "quantity"),
    [
        ("2.5", "1", None, 3),  # nearest: half up
        ("2.4", "1", None, 2),
        ("2.1", "1", "up", 3),
        ("2.9", "1", "down", 2),
        ("1500", "0.001", None, 2),  # 1.5 units
        ("1499", "0.001", "down", 1),
        ("3", "1000", None, 3000),
    ],
)
def test_a_usage_record_takes_a_whole_quantity(
    value: str, multiplier: str, rounding: str | None, quantity: int
) -> None:
    assert to_quantity(Decimal(value), mapping(multiplier, rounding)) == quantity
    assert isinstance(to_quantity(Decimal(value), mapping(multiplier, rounding)), int)


@pytest.mark.parametrize(
    ("value", "multiplier", "rounding", "expected"),
    [
        ("2.500", "1", None, Decimal("2.5")),  # no trailing zeros
        ("1.23456789012345678", "1", None, Decimal("1.23456789012346")),  # 15 digits
        ("1500", "0.001", None, Decimal("1.5")),
        ("100", "1", None, Decimal("1E+2")),
        ("2.5", "1", "down", Decimal(2)),  # rounding is applied only when configured
    ],
)
def test_a_meter_event_takes_fifteen_significant_digits(
    value: str, multiplier: str, rounding: str | None, expected: Decimal
) -> None:
    assert to_meter_value(Decimal(value), mapping(multiplier, rounding)) == expected


def test_meter_values_are_sent_in_plain_digits() -> None:
    assert meter_value_text(MeterValue(Decimal("1E+2"))) == "100"
    assert meter_value_text(MeterValue(Decimal("1.5E-7"))) == "0.00000015"
    assert meter_value_text(Quantity(3)) == "3"


@pytest.mark.parametrize(
    ("value", "zero"),
    [("0.4999", True), ("0.5", False), ("-0.3", True)],
)
def test_under_half_a_unit_is_zero_for_a_usage_record(value: str, zero: bool) -> None:
    usage = denoised(window(0, value), legacy_target())
    assert usage == (Decimal(0) if zero else Decimal(value))


def test_the_usage_record_threshold_applies_after_the_multiplier() -> None:
    assert denoised(window(0, "0.0004"), legacy_target(multiplier="1000")) == Decimal(0)
    assert denoised(window(0, "0.0005"), legacy_target(multiplier="1000")) == Decimal("0.0005")


@pytest.mark.parametrize(
    ("value", "zero"),
    [("5.551115123125783e-17", True), ("0.0000000009", True), ("0.000000001", False)],
)
def test_under_a_billionth_is_zero_for_a_meter_event(value: str, zero: bool) -> None:
    usage = denoised(window(0, value), meter_target())
    assert usage == (Decimal(0) if zero else Decimal(value))


def test_a_meter_event_takes_negative_noise_as_zero_but_refuses_negative_usage() -> None:
    assert denoised(window(0, "-5.551115123125783e-17"), meter_target()) == Decimal(0)
    assert denoised(window(0, "-0.0000009"), meter_target()) == Decimal(0)
    for negative in ["-0.000001", "-0.3"]:
        with pytest.raises(BadRequest, match="cannot be negative"):
            denoised(window(0, negative), meter_target())


def config(multiplier: str = "1") -> Config:
    """A config that maps the test reports' meter."""
    return Config(meters={"tokens": mapping(multiplier)}, subjects={"acme": "sub_1"})


def test_half_a_unit_below_zero_is_negative_usage() -> None:
    check_negative(report(window(0, "-0.49")), config())  # float noise: accepted
    with pytest.raises(BadRequest, match="cannot be negative"):
        check_negative(report(window(0, "-0.5")), config())


def test_a_report_is_refused_whole_only_when_every_window_is_negative() -> None:
    check_negative(report(window(0, "-2"), window(1, "5")), config())  # the plan refuses one
    with pytest.raises(BadRequest, match=r"and 1 more windows"):
        check_negative(report(window(0, "-2"), window(1, "-5")), config())


def test_a_usage_record_window_is_negative_from_half_a_unit_below_zero() -> None:
    assert denoised(window(0, "-0.49"), legacy_target()) == Decimal(0)
    with pytest.raises(BadRequest, match="cannot be negative"):
        denoised(window(0, "-0.5"), legacy_target())


def test_negative_usage_is_judged_after_the_multiplier() -> None:
    check_negative(report(window(0, "-0.001")), config())
    with pytest.raises(BadRequest):
        check_negative(report(window(0, "-0.001")), config("1000"))
