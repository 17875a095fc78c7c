"""config.yaml: meter -> price and subject -> subscription mappings, validated entry by entry."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import (
    ROUND_CEILING,
    ROUND_FLOOR,
    ROUND_HALF_UP,
    Decimal,
    InvalidOperation,
)
from typing import Any

from bridge.config_yaml import read_document
from bridge.errors import ConfigError
from bridge.sharing import offset_collisions

ROUNDING_MODES = {"up": ROUND_CEILING, "down": ROUND_FLOOR, "nearest": ROUND_HALF_UP}
PRICE_ID = re.compile(r"price_[A-Za-z0-9]+")
SUBSCRIPTION_ID = re.compile(r"sub_[A-Za-z0-9]+")


@dataclass(frozen=True)
class MeterMapping:
    """Where one OpenMeter meter goes in Stripe, and how its values are converted."""

    price: str
    multiplier: Decimal = Decimal(1)
    rounding: str | None = None


@dataclass(frozen=True)
class Config:
    """config.yaml: OpenMeter meter slug -> price, OpenMeter subject -> subscription."""

    meters: Mapping[str, MeterMapping]
    subjects: Mapping[str, str]


def load_config(path: str) -> Config:
    """Reads and validates config.yaml, listing every bad entry by its path."""
    return parse_config_file(read_file(path), path)


def read_file(path: str) -> bytes:
    """A config file's bytes, or a ConfigError naming it."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error}"]) from error


def parse_config_file(raw: bytes, source: str = "config.yaml") -> Config:
    """Validates config.yaml's bytes, listing every problem (a key given twice included)."""
    document = read_document(raw, source)
    return parse_config(document.content, list(document.duplicates), document.written)


def config_checksum(raw: bytes) -> str:
    """A config version's checksum, as /readyz shows it."""
    return hashlib.sha256(raw).hexdigest()


def parse_config(
    document: Any,
    problems: list[str] | None = None,
    written: Mapping[str, Mapping[Any, str]] | None = None,
) -> Config:
    """Validates a loaded config document; raises ConfigError listing every problem.

    written: each mapping's keys as the file spells them, so that a problem names `yes`, not True.
    """
    problems = [] if problems is None else problems
    written = written or {}
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(
            [*problems, "(top level): must be a mapping with 'meters' and 'subjects'"]
        )
    for key in document:
        if key not in ("meters", "subjects"):
            name = written.get("", {}).get(key, key)
            problems.append(f"{name}: unknown key (expected 'meters' and 'subjects')")
    meters = {
        slug: mapping
        for slug, entry in _section(document, "meters", problems, written).items()
        if (mapping := _meter_mapping(f"meters.{slug}", entry, problems))
    }
    subjects = {}
    for subject, subscription in _section(document, "subjects", problems, written).items():
        if isinstance(subscription, str) and SUBSCRIPTION_ID.fullmatch(subscription):
            subjects[subject] = subscription
        else:
            problems.append(f"subjects.{subject}: must be a Stripe subscription ID (sub_...)")
    # Two meters on one price would set the same windows and overwrite each other's usage. Several
    # subjects may share a subscription: each writes at a second of its own (bridge.sharing).
    _shared_targets("meters", {slug: mapping.price for slug, mapping in meters.items()}, problems)
    problems += offset_collisions(subjects)
    if problems:
        raise ConfigError(problems)
    return Config(meters=meters, subjects=subjects)


def _shared_targets(section: str, targets: Mapping[str, str], problems: list[str]) -> None:
    """Flags every entry whose Stripe ID an earlier entry of the same section already uses."""
    first: dict[str, str] = {}
    for name, target in targets.items():
        if target in first:
            problems.append(
                f"{section}.{name}: {target} is already used by {section}.{first[target]}; "
                "both would set the same windows and overwrite each other"
            )
        first.setdefault(target, name)


def _section(
    document: dict[Any, Any],
    name: str,
    problems: list[str],
    written: Mapping[str, Mapping[Any, str]],
) -> dict[str, Any]:
    """One top-level map, with its keys checked to be text (named as the file writes them)."""
    section = document.get(name) or {}
    if not isinstance(section, dict):
        problems.append(f"{name}: must be a mapping")
        return {}
    for key in section:
        if not isinstance(key, str) or not key:
            text = written.get(name, {}).get(key, key)
            problems.append(f"{name}.{text}: quote this key so that YAML reads it as text")
    return {key: value for key, value in section.items() if isinstance(key, str) and key}


def _meter_mapping(path: str, entry: Any, problems: list[str]) -> MeterMapping | None:
    """One meter entry, short (a price ID) or long (price, multiplier, rounding)."""
    if isinstance(entry, str):
        if not PRICE_ID.fullmatch(entry):  # named as written: meters.x, not meters.x.price
            problems.append(f"{path}: must be a Stripe price ID (price_...)")
            return None
        entry = {"price": entry}
    if not isinstance(entry, dict):
        problems.append(f"{path}: must be a price ID or a mapping with 'price'")
        return None
    count = len(problems)
    for key in entry:
        if key not in ("price", "multiplier", "rounding"):
            problems.append(f"{path}.{key}: unknown key (expected price, multiplier, rounding)")
    price = entry.get("price")
    if not isinstance(price, str) or not PRICE_ID.fullmatch(price):
        problems.append(f"{path}.price: must be a Stripe price ID (price_...)")
    multiplier = _multiplier(entry.get("multiplier", 1))
    if multiplier is None:
        problems.append(f"{path}.multiplier: must be a positive number such as 0.001")
    rounding = entry.get("rounding")
    if rounding is not None and rounding not in ROUNDING_MODES:
        problems.append(f"{path}.rounding: must be one of up, down, nearest")
    if len(problems) > count or not isinstance(price, str) or multiplier is None:
        return None
    return MeterMapping(price=price, multiplier=multiplier, rounding=rounding)


def _multiplier(raw: Any) -> Decimal | None:
    """A positive, finite multiplier of sane size, or None."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        return None
    if not value.is_finite() or not Decimal("1e-18") <= value <= Decimal("1e18"):
        return None
    return value
