"""A window's value as Stripe takes it: zero thresholds, whole quantities, meter values."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import NewType

from bridge.config import ROUNDING_MODES, Config, MeterMapping
from bridge.errors import BadRequest
from bridge.report import DECIMAL, Report, Window
from bridge.targets import Target

# Below these magnitudes, after the multiplier, a window's value is zero: float noise such as
# 0.1 + 0.2 - 0.3 = 5.551115123125783e-17. A usage record's quantity is whole, so under half a
# unit cannot be carried (not even by rounding up); a meter event takes 15 significant digits,
# and a billionth of a unit is far below any price's smallest charge, yet far above the noise of
# float64 sums (about 1e-16 of their size) of values up to a million.
ZERO_BELOW = {"usage_records": Decimal("0.5"), "meter_events": Decimal("1e-9")}


# Negative usage begins at half a unit below zero whatever the kind, which needs only the config's
# multiplier, so such a report is refused before Stripe is asked. A meter event carries decimals,
# so once the target says it is a meter, it begins far closer to zero: a millionth of a unit,
# beyond the noise of float64 sums of values up to 1e10.
NEGATIVE_FROM = Decimal("-0.5")
METER_NEGATIVE_FROM = Decimal("-1e-6")


# A usage record's quantity: a whole number of the price's units, as Stripe's `quantity` takes it.
Quantity = NewType("Quantity", int)
# A meter event's value: at most 15 significant digits, no trailing zeros (meter_value_text).
MeterValue = NewType("MeterValue", Decimal)

# Stripe takes meter event values with at most 15 significant digits.
METER_VALUE = Context(prec=15, rounding=ROUND_HALF_EVEN)


def check_negative(report: Report, config: Config) -> None:
    """Refuses (400) a report with nothing billable: every window below -half a unit.

    A window is judged by its sum (its group rows added up). A report with some negative windows
    and some billable ones is written: the plan refuses the negative windows one by one.
    """
    mapping = config.meters.get(report.meter)
    multiplier = mapping.multiplier if mapping else Decimal(1)
    windows = report.windows
    if windows and all(DECIMAL.multiply(w.value, multiplier) <= NEGATIVE_FROM for w in windows):
        raise negative_usage(windows[0], count=len(windows))


def negative_usage(window: Window, count: int = 1) -> BadRequest:
    """The 400 for a window whose sum is below zero by more than noise."""
    more = f" (and {count - 1} more windows)" if count > 1 else ""
    return BadRequest(
        f"window {window.start.isoformat()}: usage cannot be negative ({window.value}){more}",
        "Negative usage cannot be billed: fix the meter's events in OpenMeter.",
        window_start=window.start.isoformat(),
    )


def denoised(window: Window, target: Target) -> Decimal:
    """The window's value, or zero if it is noise; a 400 for a window of negative usage."""
    scaled = DECIMAL.multiply(window.value, target.mapping.multiplier)
    if scaled <= (METER_NEGATIVE_FROM if target.meter else NEGATIVE_FROM):
        raise negative_usage(window)
    return Decimal(0) if scaled < ZERO_BELOW[target.kind] else window.value


def to_quantity(value: Decimal, mapping: MeterMapping) -> Quantity:
    """A window's value as the whole number a usage record takes (rounded as configured)."""
    rounding = ROUNDING_MODES[mapping.rounding or "nearest"]
    scaled = DECIMAL.multiply(value, mapping.multiplier)
    return Quantity(int(scaled.quantize(Decimal(1), rounding, DECIMAL)))


def to_meter_value(value: Decimal, mapping: MeterMapping) -> MeterValue:
    """A window's value as a meter event takes it: 15 digits, whole only if rounding is set."""
    if mapping.rounding:
        return MeterValue(Decimal(to_quantity(value, mapping)))
    scaled = DECIMAL.multiply(value, mapping.multiplier)
    return MeterValue(METER_VALUE.plus(scaled).normalize(METER_VALUE))


def meter_value_text(value: Quantity | MeterValue) -> str:
    """A value as a meter event's payload carries it: plain digits, never an exponent."""
    return str(value) if isinstance(value, int) else f"{value:f}"
