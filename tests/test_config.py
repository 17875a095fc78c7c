"""Configuration: the service refuses to start on a bad environment or config.yaml, naming why."""

from __future__ import annotations

import base64
from decimal import Decimal
from pathlib import Path

import pytest

from app import create_app, serve
from bridge.config import MeterMapping, load_config
from bridge.errors import ConfigError
from bridge.settings import settings_from_env
from tests.conftest import API_KEY
from tests.harness import SECRET
from tests.tunnel import clear_proxies

PROJECT = Path(__file__).parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


def test_short_and_long_forms(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "meters:\n  a: price_1A\n  b: {price: price_1B, multiplier: 0.001, rounding: up}\n"
            "subjects:\n  c: sub_1C\n",
        )
    )
    assert config.meters["a"] == MeterMapping("price_1A")
    assert config.meters["b"] == MeterMapping("price_1B", Decimal("0.001"), "up")
    assert config.subjects == {"c": "sub_1C"}


def test_the_shipped_example_config_is_valid() -> None:
    config = load_config(str(PROJECT / "config.yaml"))
    assert config.meters and config.subjects


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("meters:\n  a: prod_1A\n", "meters.a: must be a Stripe price ID"),
        ("meters:\n  a: {price: prod_1A}\n", "meters.a.price: must be a Stripe price ID"),
        ("subjects:\n  c: cus_1C\n", "subjects.c: must be a Stripe subscription ID"),
        ("meters:\n  b: {price: price_1B, rounding: sideways}\n", "meters.b.rounding:"),
        ("meters:\n  b: {price: price_1B, multiplier: -1}\n", "meters.b.multiplier:"),
        ("meters:\n  b: {price: price_1B, multiplier: abc}\n", "meters.b.multiplier:"),
        ("meters:\n  b: {price: price_1B, factor: 2}\n", "meters.b.factor: unknown key"),
        ("meterz:\n  a: price_1A\n", "meterz: unknown key"),
        ("subjects:\n  c: sub_1C\n  c: sub_1D\n", "subjects.c: duplicate key (line 3)"),
        ("subjects:\n  123: sub_1C\n", "subjects.123: quote this key"),
        ("meters: [price_1A]\n", "meters: must be a mapping"),
        ("- a\n", "(top level)"),
        ("meters: {a: [", "not valid YAML"),
        (
            "meters:\n  a: price_1A\n  b: {price: price_1A}\n",
            "meters.b: price_1A is already used by meters.a",
        ),
        (
            "subjects:\n  team-3: sub_1C\n  team-36: sub_1C\n",
            "subjects.team-36: shares sub_1C with subjects.team-3",
        ),
    ],
)
def test_bad_config_names_the_entry(tmp_path: Path, text: str, expected: str) -> None:
    assert any(expected in problem for problem in problems_of(tmp_path, text))


def test_every_problem_is_listed(tmp_path: Path) -> None:
    text = "meters:\n  a: nope\n  b: {price: price_1B, rounding: x}\nsubjects:\n  c: nope\n"
    problems = problems_of(tmp_path, text)
    assert len(problems) == 3


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.yaml"):
        load_config(str(tmp_path / "nowhere.yaml"))


GOOD_ENV = {"STRIPE_API_KEY": API_KEY, "OPENMETER_WEBHOOK_SECRET": SECRET}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"STRIPE_API_KEY": ""}, "STRIPE_API_KEY is not set"),
        ({"STRIPE_API_KEY": "pk_test_abc"}, "STRIPE_API_KEY must be a secret"),
        ({"OPENMETER_WEBHOOK_SECRET": " "}, "OPENMETER_WEBHOOK_SECRET is not set"),
        ({"OPENMETER_WEBHOOK_SECRET": f"{SECRET} abc"}, "secret #2 is not a whsec_"),
        ({"OPENMETER_WEBHOOK_SECRET": "whsec_%%%"}, "secret #1"),
        ({"STRIPE_API_BASE": "ftp://x"}, "STRIPE_API_BASE"),
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"TIME_BUDGET_SECONDS": "13"}, "TIME_BUDGET_SECONDS must be between 1 and 12"),
        ({"INVOICE_GRACE_SECONDS": "259201"}, "INVOICE_GRACE_SECONDS must be 0-259200"),
        ({"INVOICE_GRACE_SECONDS": "1h"}, "INVOICE_GRACE_SECONDS must be 0-259200"),
        ({"PORT": "80\u00b2"}, "PORT"),
        ({"TRUSTED_PROXIES": "\u0661"}, "TRUSTED_PROXIES"),
        ({"FORWARDED_ALLOW_IPS": "127.0.0.1,proxy.corp"}, "FORWARDED_ALLOW_IPS"),
        ({"STRIPE_API_BASE": "http://api.stripe.com"}, "STRIPE_API_BASE must be https://"),
    ],
)
def test_bad_environment_names_the_variable(changes: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env(GOOD_ENV | changes)
    message = str(caught.value)
    assert expected in message
    assert "pk_test_abc" not in message and "%%%" not in message


SHORT_KEY = "whsec_" + base64.b64encode(b"k" * 23).decode()  # one byte short of Svix's 24


@pytest.mark.parametrize("short", ["whsec_bad", SHORT_KEY], ids=["2-bytes", "23-bytes"])
def test_a_secret_shorter_than_svix_keys_is_refused_by_number(short: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env(GOOD_ENV | {"OPENMETER_WEBHOOK_SECRET": f"{SECRET} {short}"})
    message = str(caught.value)
    assert "OPENMETER_WEBHOOK_SECRET: secret #2 decodes to fewer than Svix's 24 bytes" in message
    assert "secret #1" not in message
    assert short.removeprefix("whsec_") not in message


def test_svix_test_secret_is_exactly_24_bytes() -> None:
    assert len(base64.b64decode(SECRET.removeprefix("whsec_"))) == 24
    assert settings_from_env(GOOD_ENV).webhook_secrets == (SECRET,)


def test_invoice_grace_defaults_to_stripes_hour_and_takes_up_to_72_hours() -> None:
    assert settings_from_env(GOOD_ENV).invoice_grace == 3600
    assert settings_from_env(GOOD_ENV | {"INVOICE_GRACE_SECONDS": "259200"}).invoice_grace == 259200


@pytest.mark.parametrize(
    "proxies",
    [
        {"HTTPS_PROXY": "socks5://127.0.0.1:1080"},
        {"https_proxy": "socks5h://u:pk_test_abc@proxy:1080"},
        {"ALL_PROXY": "socks5://u:pk_test_abc@proxy:1080"},  # requests takes all_proxy for https
        {"HTTPS_PROXY": "http://u:pk_test_abc@proxy:http"},
        {"https_proxy": "https://u:pk_test_abc@proxy:3128"},
        {"HTTPS_PROXY": "http://proxy:3128", "https_proxy": "socks5://u:pk_test_abc@proxy:1080"},
    ],
)
def test_a_proxy_the_transport_cannot_use_is_refused_at_start(
    proxies: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_proxies(monkeypatch)
    for name, value in proxies.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        settings_from_env(GOOD_ENV)
    message = str(caught.value)
    assert "HTTPS_PROXY (or https_proxy, all_proxy) must be http://" in message
    assert "pk_test_abc" not in message


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("not a url", "the value set is not a URL (e.g. http://proxy.internal:3128)"),
        ("http://u:pk_test_abc@proxy:99999", "the value set is not a URL"),
        ("http://u:pk_test_abc@:3128", "the value set has no host, or a port outside 1-65535"),
        ("socks5://u:pk_test_abc@proxy:1080", "socks and https proxies are not supported"),
    ],
)
def test_a_malformed_proxy_url_is_told_apart_from_an_unsupported_kind(
    value: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_proxies(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", value)
    with pytest.raises(ConfigError) as caught:
        settings_from_env(GOOD_ENV)
    (message,) = caught.value.problems
    assert message.startswith("HTTPS_PROXY (or https_proxy, all_proxy) must be http://")
    assert why in message and "pk_test_abc" not in message
    if not value.startswith("socks"):
        assert "socks" not in message


@pytest.mark.parametrize(
    "proxies",
    [
        {"HTTPS_PROXY": "http://u:p%40ss@proxy.corp:3128"},
        {"https_proxy": "proxy.corp:3128"},  # no scheme: http, as requests reads it
        {"HTTPS_PROXY": "socks5://proxy:1080", "https_proxy": "http://proxy:3128"},
        {"HTTPS_PROXY": "socks5://proxy:1080", "NO_PROXY": "api.stripe.com"},  # never used
        {"HTTP_PROXY": "socks5://proxy:1080"},  # for http:// only; Stripe is https
    ],
)
def test_the_proxy_the_transport_will_use_is_accepted(
    proxies: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_proxies(monkeypatch)
    for name, value in proxies.items():
        monkeypatch.setenv(name, value)
    assert settings_from_env(GOOD_ENV).stripe_api_base is None


@pytest.mark.parametrize("lowercase", ["https_proxy", "all_proxy"])
def test_an_empty_lowercase_proxy_turning_off_the_uppercase_one_is_refused(
    lowercase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_proxies(monkeypatch)
    monkeypatch.setenv(lowercase.upper(), "http://u:pk_test_abc@proxy.corp:3128")
    monkeypatch.setenv(lowercase, "")
    with pytest.raises(ConfigError) as caught:
        settings_from_env(GOOD_ENV)
    message = str(caught.value)
    assert f"{lowercase} is set but empty, which turns {lowercase.upper()} off" in message
    assert "pk_test_abc" not in message


@pytest.mark.parametrize(
    "base", ["http://api.stripe.com", "http://10.0.0.5:12111", "http://127.0.0.1.nip.io"]
)
def test_a_plain_http_stripe_api_base_is_refused_unless_loopback(base: str) -> None:
    with pytest.raises(ConfigError, match="STRIPE_API_BASE must be https://"):
        settings_from_env(GOOD_ENV | {"STRIPE_API_BASE": base})


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:12111",
        "http://127.8.9.10",
        "http://localhost:12111/",
        "http://[::1]:12111",
        "https://stripe-proxy.internal:8443",
    ],
)
def test_a_loopback_or_https_stripe_api_base_is_accepted(base: str) -> None:
    assert settings_from_env(GOOD_ENV | {"STRIPE_API_BASE": base}).stripe_api_base == base


def test_rotation_takes_several_secrets() -> None:
    settings = settings_from_env(GOOD_ENV | {"OPENMETER_WEBHOOK_SECRET": f" {SECRET}\n{SECRET} "})
    assert settings.webhook_secrets == (SECRET, SECRET)


def test_serve_refuses_a_bad_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = GOOD_ENV | {"CONFIG_PATH": write(tmp_path, "subjects:\n  c: cus_1\n")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=r"subjects\.c: must be a Stripe subscription ID"):
        serve()


def test_incomplete_app_is_not_ready(tmp_path: Path) -> None:
    app = create_app({"STRIPE_API_KEY": "", "OPENMETER_WEBHOOK_SECRET": "", "CONFIG_PATH": "x"})
    client = app.test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json is not None and len(response.json["problems"]) == 3
    webhook = client.post("/webhook", data="{}")
    assert webhook.status_code == 503
    assert webhook.json is not None and webhook.json["error"] == "not_ready"
