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

import yaml

from bridge.errors import ConfigError

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
    return parse_config_file(read_file(path))


def read_file(path: str) -> bytes:
    """A config file's bytes, or a ConfigError naming it."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error}"]) from error


def parse_config_file(raw: bytes) -> Config:
    """Validates config.yaml's bytes."""
    try:
        document = yaml.compose(raw.decode("utf-8"), Loader=yaml.SafeLoader)
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError([f"not valid YAML: {error}"]) from error
    problems: list[str] = []
    if document is not None:
        _find_duplicate_keys(document, "", problems)
    if problems:
        raise ConfigError(problems)
    return parse_config(yaml.safe_load(raw), problems)


def config_checksum(raw: bytes) -> str:
    """A config version's checksum, as /readyz shows it."""
    return hashlib.sha256(raw).hexdigest()


def _find_duplicate_keys(node: yaml.Node, path: str, problems: list[str]) -> None:
    """Reports keys given twice in one mapping: YAML would silently keep the last one."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key_path = f"{path}.{key_node.value}" if path else str(key_node.value)
            if key_node.value in seen:
                line = key_node.start_mark.line + 1
                problems.append(f"{key_path}: duplicate key (line {line})")
            seen.add(key_node.value)
            _find_duplicate_keys(value_node, key_path, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _find_duplicate_keys(item, f"{path}[{index}]", problems)


def parse_config(document: Any, problems: list[str] | None = None) -> Config:
    """Validates a loaded config document; raises ConfigError listing every problem."""
    problems = [] if problems is None else problems
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(["(top level): must be a mapping with 'meters' and 'subjects'"])
    for key in document:
        if key not in ("meters", "subjects"):
            problems.append(f"{key}: unknown key (expected 'meters' and 'subjects')")
    meters = {
        slug: mapping
        for slug, entry in _section(document, "meters", problems).items()
        if (mapping := _meter_mapping(f"meters.{slug}", entry, problems))
    }
    subjects = {}
    for subject, subscription in _section(document, "subjects", problems).items():
        if isinstance(subscription, str) and SUBSCRIPTION_ID.fullmatch(subscription):
            subjects[subject] = subscription
        else:
            problems.append(f"subjects.{subject}: must be a Stripe subscription ID (sub_...)")
    # Two entries on one Stripe target would set the same windows and overwrite each other's usage.
    _shared_targets("meters", {slug: mapping.price for slug, mapping in meters.items()}, problems)
    _shared_targets("subjects", subjects, problems)
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


def _section(document: dict[Any, Any], name: str, problems: list[str]) -> dict[str, Any]:
    """One top-level map, with its keys checked to be text."""
    section = document.get(name) or {}
    if not isinstance(section, dict):
        problems.append(f"{name}: must be a mapping")
        return {}
    for key in section:
        if not isinstance(key, str) or not key:
            problems.append(f"{name}.{key}: quote this key so that YAML reads it as text")
    return {key: value for key, value in section.items() if isinstance(key, str) and key}


def _meter_mapping(path: str, entry: Any, problems: list[str]) -> MeterMapping | None:
    """One meter entry, short (a price ID) or long (price, multiplier, rounding)."""
    if isinstance(entry, str):
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
