"""config.yaml and the environment: what is accepted, and every problem named by its path."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from bridge.config import Config, MeterMapping, parse_config, parse_config_file
from bridge.errors import ConfigError
from bridge.settings import Settings, settings_from_env

SECRET = "whsec_" + "A" * 32  # 24 bytes of key
GOOD_ENV = {"STRIPE_API_KEY": "sk_test_1", "OPENMETER_WEBHOOK_SECRET": SECRET}


def problems(document: Any) -> list[str]:
    """What parse_config says is wrong with a document."""
    with pytest.raises(ConfigError) as error:
        parse_config(document)
    return error.value.problems


def test_short_and_long_meter_entries() -> None:
    config = parse_config(
        {
            "meters": {
                "tokens": "price_1",
                "bytes": {"price": "price_2", "multiplier": 0.001, "rounding": "up"},
            },
            "subjects": {"acme": "sub_1"},
        }
    )
    assert config == Config(
        meters={
            "tokens": MeterMapping("price_1"),
            "bytes": MeterMapping("price_2", Decimal("0.001"), "up"),
        },
        subjects={"acme": "sub_1"},
    )


def test_an_empty_document_is_an_empty_config() -> None:
    assert parse_config(None) == Config(meters={}, subjects={})


def test_every_problem_is_named_by_its_path() -> None:
    found = problems(
        {
            "meters": {
                "a": "prod_1",
                "b": {"price": "price_2", "multiplier": 0, "rounding": "sideways", "unit": 1},
                "c": ["price_3"],
            },
            "subjects": {"x": "cus_1", 7: "sub_2"},
            "extra": {},
        }
    )
    assert found == [
        "extra: unknown key (expected 'meters' and 'subjects')",
        "meters.a: must be a Stripe price ID (price_...)",  # as written: the short form
        "meters.b.unit: unknown key (expected price, multiplier, rounding)",
        "meters.b.multiplier: must be a positive number such as 0.001",
        "meters.b.rounding: must be one of up, down, nearest",
        "meters.c: must be a price ID or a mapping with 'price'",
        "subjects.7: quote this key so that YAML reads it as text",
        "subjects.x: must be a Stripe subscription ID (sub_...)",
    ]


@pytest.mark.parametrize("multiplier", [True, "1e19", "1e-19", "nan", "-1", [1]])
def test_a_multiplier_is_a_sane_positive_number(multiplier: Any) -> None:
    found = problems({"meters": {"m": {"price": "price_1", "multiplier": multiplier}}})
    assert found == ["meters.m.multiplier: must be a positive number such as 0.001"]


def test_two_meters_on_one_price_are_refused_and_subjects_may_share_a_subscription() -> None:
    found = problems(
        {"meters": {"a": "price_1", "b": "price_1"}, "subjects": {"x": "sub_1", "y": "sub_1"}}
    )
    assert found == [
        "meters.b: price_1 is already used by meters.a; both would set the same windows and "
        "overwrite each other",
    ]


def test_subjects_on_one_subscription_whose_names_give_one_second_are_refused() -> None:
    # team-3 and team-36 hash to the same second of an hour (bridge.sharing.subject_offset).
    subjects = {"team-3": "sub_1", "team-36": "sub_1", "team-4": "sub_1"}
    found = problems({"meters": {"a": "price_1"}, "subjects": subjects})
    assert len(found) == 1 and found[0].startswith(
        "subjects.team-36: shares sub_1 with subjects.team-3"
    )
    parse_config({"meters": {"a": "price_1"}, "subjects": {"team-3": "sub_1", "team-36": "sub_2"}})


def test_the_top_level_must_be_a_mapping() -> None:
    assert problems(["meters"]) == ["(top level): must be a mapping with 'meters' and 'subjects'"]


def test_a_key_given_twice_is_refused_with_its_line() -> None:
    raw = b"meters:\n  tokens: price_1\n  tokens: price_2\nsubjects: {}\n"
    with pytest.raises(ConfigError) as error:
        parse_config_file(raw)
    assert error.value.problems == ["meters.tokens: duplicate key (line 3)"]


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"meters: [", "not valid YAML"),
        (b"\xff\xfe", "not UTF-8 at byte 0"),
        (b"a: *missing", "line 1, column 4: anchors and aliases"),
        (b"meters: &x {a: *x}\n", "line 1, column 9: anchors and aliases"),  # a loop
        (b"a: &l [1, 2]\nb: *l\n", "line 1, column 4: anchors and aliases"),
        (b"a: " + b"[" * 5000 + b"]" * 5000, "nested deeper than 20 levels"),
        (b"? [a]\n: b\n", "not valid YAML"),  # a list as a key
        (b"#" * (1024 * 1024 + 1), "bytes, over the 1048576 allowed"),
    ],
)
def test_every_yaml_problem_is_one_problem_naming_the_file_and_place(raw: bytes, why: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config_file(raw, "/etc/bridge/config.yaml")
    assert len(error.value.problems) == 1
    assert error.value.problems[0].startswith("/etc/bridge/config.yaml: ")
    assert why in error.value.problems[0]


def test_a_key_given_twice_does_not_hide_the_other_problems_and_keys_are_named_as_written() -> None:
    raw = b"meters:\n  a: price_1\n  a: price_2\n  other: sub_1\nsubjects:\n  yes: sub_1\n"
    with pytest.raises(ConfigError) as error:
        parse_config_file(raw)
    assert error.value.problems == [
        "meters.a: duplicate key (line 3)",
        "meters.other: must be a Stripe price ID (price_...)",
        "subjects.yes: quote this key so that YAML reads it as text",
    ]


def test_settings_from_a_complete_environment() -> None:
    settings = settings_from_env(
        GOOD_ENV
        | {
            "OPENMETER_WEBHOOK_SECRET": f"{SECRET} whsec_{'B' * 32}",
            "PORT": "9000",
            "TIME_BUDGET_SECONDS": "8.5",
            "TRUSTED_PROXIES": "1",
            "FORWARDED_ALLOW_IPS": "10.0.0.0/8, 127.0.0.1",
            "STATE_PATH": "",
            "DATABASE_URL": "postgresql://bridge@db.internal/bridge",
            "CONFIG_PATH": "/etc/bridge.yaml",
        }
    )
    assert settings == Settings(
        stripe_api_key="sk_test_1",
        webhook_secrets=(SECRET, f"whsec_{'B' * 32}"),
        config_path="/etc/bridge.yaml",
        port=9000,
        trusted_proxies=1,
        forwarded_allow_ips=("10.0.0.0/8", "127.0.0.1"),
        state_path="",  # unused: the ledger is PostgreSQL
        database_url="postgresql://bridge@db.internal/bridge",
        time_budget=8.5,
    )


def test_every_bad_variable_is_named_and_no_value_is_quoted() -> None:
    with pytest.raises(ConfigError) as error:
        settings_from_env(
            {
                "STRIPE_API_KEY": "pk_live_secretvalue",
                "OPENMETER_WEBHOOK_SECRET": "whsec_QUJD",  # 3 bytes: a cut-off copy
                "PORT": "70000",
                "TIME_BUDGET_SECONDS": "15",
                "TRUSTED_PROXIES": "10",
                "FORWARDED_ALLOW_IPS": "proxy.local",
            }
        )
    found = error.value.problems
    assert [problem.split()[0] for problem in found] == [
        "STRIPE_API_KEY",
        "OPENMETER_WEBHOOK_SECRET:",
        "PORT",
        "TIME_BUDGET_SECONDS",
        "TRUSTED_PROXIES",
        "FORWARDED_ALLOW_IPS",
    ]
    assert not any("secretvalue" in problem or "QUJD" in problem for problem in found)


def test_the_cli_needs_only_what_it_uses() -> None:
    settings = settings_from_env({"STRIPE_API_KEY": "rk_test_1"}, required=["STRIPE_API_KEY"])
    assert settings.webhook_secrets == ()
    with pytest.raises(ConfigError, match="STRIPE_API_KEY is not set"):
        settings_from_env({}, required=["STRIPE_API_KEY"])


def test_the_ledger_is_required_and_its_url_is_never_quoted() -> None:
    base = {"STRIPE_API_KEY": "rk_test_1", "OPENMETER_WEBHOOK_SECRET": SECRET}
    with pytest.raises(ConfigError) as error:
        settings_from_env(base | {"STATE_PATH": " "})
    assert error.value.problems[0].startswith("STATE_PATH is empty")
    with pytest.raises(ConfigError) as error:
        settings_from_env(base | {"DATABASE_URL": "mysql://bridge:pa55word@db/bridge"})
    [problem] = error.value.problems
    assert problem.startswith("DATABASE_URL must be a postgresql:// URL")
    assert "pa55word" not in problem
    url = "postgres://bridge:pa55word@db/bridge"
    assert settings_from_env(base | {"STATE_PATH": "", "DATABASE_URL": url}).database_url == url
