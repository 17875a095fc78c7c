"""Idempotency keys and meter event identifiers: a repeat replays, anything new is new."""

from __future__ import annotations

import re
from dataclasses import replace
from decimal import Decimal

from bridge.planning import idempotency_key, meter_event_identifier
from bridge.quantities import MeterValue
from tests.unit.objects import meter_target

ONE = MeterValue(Decimal(1))


def test_an_idempotency_key_is_the_message_and_what_the_write_means() -> None:
    assert idempotency_key("msg_1", "si_1", 1767225601, 3) == "msg_1:si_1:1767225601:3"
    # A correction (another quantity) or another message is another write: never replayed.
    assert idempotency_key("msg_1", "si_1", 1767225601, 4) != idempotency_key(
        "msg_1", "si_1", 1767225601, 3
    )


def test_a_long_idempotency_key_is_hashed_to_fit_stripes_255_characters() -> None:
    key = idempotency_key("m" * 247, "si_1", 1, 2)  # 256 characters
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", key)
    assert key != idempotency_key("m" * 247, "si_1", 1, 3)
    assert idempotency_key("m" * 246, "si_1", 1, 2) == "m" * 246 + ":si_1:1:2"  # 255: fits


def test_a_raw_meter_takes_one_event_per_window_ever() -> None:
    raw = meter_target()
    two = MeterValue(Decimal(2))
    assert meter_event_identifier("msg_1", raw, 100, ONE) == meter_event_identifier(
        "msg_2", raw, 100, two
    )
    assert meter_event_identifier("msg_1", raw, 100, ONE) != meter_event_identifier(
        "msg_1", raw, 101, ONE
    )


def test_a_pre_aggregated_meter_takes_one_event_per_message_and_window() -> None:
    hourly = meter_target("hour")
    assert meter_event_identifier("msg_1", hourly, 100, ONE) != meter_event_identifier(
        "msg_2", hourly, 100, ONE
    )
    assert meter_event_identifier("msg_1", hourly, 100, ONE) == meter_event_identifier(
        "msg_1", hourly, 100, ONE
    )
    # The same message converted to another value (a multiplier fix) is new to the bucket.
    assert meter_event_identifier("msg_1", hourly, 100, ONE) != meter_event_identifier(
        "msg_1", hourly, 100, MeterValue(Decimal(1000))
    )


def test_an_identifier_names_the_meter_and_customer() -> None:
    raw = meter_target()
    other_customer = replace(raw, subscription=replace(raw.subscription, customer="cus_2"))
    assert meter_event_identifier("m", raw, 100, ONE) != meter_event_identifier(
        "m", other_customer, 100, ONE
    )
    assert raw.meter
    other_meter = replace(raw, meter=replace(raw.meter, event_name="calls"))
    assert meter_event_identifier("m", raw, 100, ONE) != meter_event_identifier(
        "m", other_meter, 100, ONE
    )
    assert re.fullmatch(r"om-[0-9a-f]{48}", meter_event_identifier("m", raw, 100, ONE))
