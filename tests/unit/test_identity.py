"""Identities (bridge/identity.py): each name a write, a place or a message goes by."""

from __future__ import annotations

import re

from bridge import identity
from bridge.identity import (
    fresh_key,
    idempotency_key,
    lock_key,
    message_digest,
    meter_event_identifier,
    place,
    usage_record_key,
)
from tests.unit.objects import legacy_target, meter_target


def ident(
    message: str = "msg_1",
    *,
    event_name: str = "tokens",
    customer: str = "cus_1",
    timestamp: int = 100,
    value: str = "1",
    raw: bool = True,
) -> str:
    """A meter event identifier, with defaults for what a test does not vary."""
    return meter_event_identifier(
        message, event_name=event_name, customer=customer, timestamp=timestamp, value=value, raw=raw
    )


def test_an_idempotency_key_is_the_message_and_what_the_write_means() -> None:
    assert idempotency_key("msg_1", "si_1", 1767225601, 3) == "msg_1:si_1:1767225601:3"
    assert usage_record_key("msg_1", "si_1", 1767225601, 3) == "msg_1:si_1:1767225601:3"
    # A correction (another quantity) or another message is another write: never replayed.
    assert usage_record_key("msg_1", "si_1", 1767225601, 4) != usage_record_key(
        "msg_1", "si_1", 1767225601, 3
    )


def test_a_long_idempotency_key_is_hashed_to_fit_stripes_255_characters() -> None:
    key = idempotency_key("m" * 247, "si_1", 1, 2)  # 256 characters
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", key)
    assert key != idempotency_key("m" * 247, "si_1", 1, 3)
    assert idempotency_key("m" * 246, "si_1", 1, 2) == "m" * 246 + ":si_1:1:2"  # 255: fits


def test_a_fresh_key_after_a_5xx_is_new_per_nonce_and_fits() -> None:
    key = usage_record_key("msg_1", "si_1", 1, 2)
    assert fresh_key(key, "a") != fresh_key(key, "b") != key
    assert fresh_key(key, "a").startswith(key)
    assert len(fresh_key("m" * 250, "a")) <= 255


def test_a_raw_meter_takes_one_event_per_window_ever() -> None:
    assert ident("msg_1") == ident("msg_2", value="2")
    assert ident("msg_1") != ident("msg_1", timestamp=101)


def test_a_pre_aggregated_meter_takes_one_event_per_message_and_window() -> None:
    assert ident("msg_1", raw=False) != ident("msg_2", raw=False)
    assert ident("msg_1", raw=False) == ident("msg_1", raw=False)
    # The same message converted to another value (a multiplier fix) is new to the bucket.
    assert ident("msg_1", raw=False) != ident("msg_1", raw=False, value="1000")


def test_an_identifier_names_the_meter_and_customer_and_fits_stripes_100() -> None:
    assert ident() != ident(customer="cus_2")
    assert ident() != ident(event_name="calls")
    assert re.fullmatch(r"om-[0-9a-f]{48}", ident())


def test_the_lock_key_is_the_item_or_the_customers_meter() -> None:
    assert lock_key("si_1") == "si_1"
    assert lock_key("si_1", "cus_1", "mtr_1") == "cus_1/mtr_1"  # Stripe's one call per both
    assert legacy_target().lock_key == "si_1"
    target = meter_target("hour")
    assert target.meter is not None
    assert target.lock_key == f"{target.subscription.customer}/{target.meter.id}"


def test_the_place_is_object_ids_alone_so_a_key_rotation_changes_nothing() -> None:
    assert place("usage_records", "si_1") == "usage_records/si_1"
    assert legacy_target().place == "usage_records/si_1"
    assert not hasattr(identity, "account")  # no key, no hash of one, in any identity


def test_a_message_digest_is_body_place_and_conversion() -> None:
    body = identity.body_digest(b"{}")
    digest = message_digest(body, "usage_records/si_1", "1", None)
    assert digest == message_digest(body, "usage_records/si_1", "1", None)
    assert digest != message_digest(identity.body_digest(b"[]"), "usage_records/si_1", "1", None)
    assert digest != message_digest(body, "usage_records/si_2", "1", None)  # a remap
    assert digest != message_digest(body, "usage_records/si_1", "1000", None)  # a multiplier fix
    assert digest != message_digest(body, "usage_records/si_1", "1", "up")  # a rounding fix
