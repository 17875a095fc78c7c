"""The fake answers as Stripe's OpenAPI spec says Stripe does, at each API version the bridge uses.

Every response the bridge relies on is checked against the schemas vendored in
tests/stripe_openapi.json (from github.com/stripe/openapi; provenance and stand-ins are in it):
required fields present, no field the spec lacks, types, enums and lengths right.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe
from flask import Flask
from flask.testing import FlaskClient

from bridge.stripe_api import USAGE_RECORDS_API_VERSION
from tests.conftest import API_KEY, CONFIG_YAML, Billing, deliver
from tests.fake_stripe import FakeStripe, RecordedRequest
from tests.harness import report
from tools.refresh_stripe_openapi import refresh

SPEC: dict[str, Any] = json.loads((Path(__file__).parent / "stripe_openapi.json").read_text())
DEFAULT = "2026-10-28.endive"  # stripe-python 16.1's version: the spec section that answers it
VERSIONS = (DEFAULT, USAGE_RECORDS_API_VERSION)
# Which vendored operation answers a request the bridge (or this test) sends.
OPERATIONS = [
    (
        "GET",
        re.compile(r"/v1/subscriptions/[^/]+"),
        "GET /v1/subscriptions/{subscription_exposed_id}",
    ),
    ("GET", re.compile(r"/v1/subscription_items"), "GET /v1/subscription_items"),
    ("GET", re.compile(r"/v1/prices/[^/]+"), "GET /v1/prices/{price}"),
    ("GET", re.compile(r"/v1/billing/meters/[^/]+"), "GET /v1/billing/meters/{id}"),
    ("POST", re.compile(r"/v1/billing/meter_events"), "POST /v1/billing/meter_events"),
    (
        "POST",
        re.compile(r"/v1/subscription_items/[^/]+/usage_records"),
        "POST /v1/subscription_items/{subscription_item}/usage_records",
    ),
]
TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}
FORM_SCALARS = {"integer": re.compile(r"-?[0-9]+"), "number": re.compile(r"-?[0-9]+(\.[0-9]+)?")}


# --- a validator for the subset of OpenAPI 3.0 that Stripe's schemas use ----------------------


def problems(value: Any, schema: dict[str, Any], version: str, path: str = "$") -> list[str]:
    """Where `value` breaks `schema` ($ref, anyOf, nullable, type, enum, maxLength, pattern,
    required, properties, additionalProperties, items), as `version`'s components resolve them."""
    return _check(value, schema, version, path, form=False)


def form_problems(params: dict[str, Any], schema: dict[str, Any], version: str) -> list[str]:
    """Like problems(), for a form-encoded request: every scalar arrives as a string."""
    return _check(params, schema, version, "$", form=True)


def _check(value: Any, schema: dict[str, Any], version: str, path: str, *, form: bool) -> list[str]:
    """One node of the check."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        target: dict[str, Any] | None = SPEC["versions"][version]["components"]["schemas"].get(name)
        if target is None:
            return [f"{path}: schema {name} is not vendored, so the fake must not render a value"]
        nullable = bool(target.get("nullable") or schema.get("nullable"))
        return _check(value, {**target, "nullable": nullable}, version, path, form=form)
    if value is None:
        return [] if schema.get("nullable") else [f"{path}: null, but the spec does not allow it"]
    if "anyOf" in schema:
        branches = [_check(value, branch, version, path, form=form) for branch in schema["anyOf"]]
        if any(not branch for branch in branches):
            return []
        return [f"{path}: matches no anyOf branch: " + " | ".join("; ".join(b) for b in branches)]
    wanted = schema.get("type")
    if wanted is not None:
        if form and wanted in FORM_SCALARS and isinstance(value, str):
            if not FORM_SCALARS[wanted].fullmatch(value):
                return [f"{path}: {value!r} is not a form-encoded {wanted}"]
        # bool is an int in Python, never in JSON
        elif isinstance(value, bool) != (wanted == "boolean") or not isinstance(
            value, TYPES[wanted]
        ):
            return [f"{path}: {type(value).__name__} {value!r:.60}, but the spec says {wanted}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    found: list[str] = []
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            found.append(f"{path}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        found += _check_object(value, schema, version, path, form=form)
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += _check(item, schema["items"], version, f"{path}[{index}]", form=form)
    return found


def _check_object(
    value: dict[str, Any], schema: dict[str, Any], version: str, path: str, *, form: bool
) -> list[str]:
    """Required fields present; every other field one the spec has, and of its schema."""
    found = [
        f"{path}.{name}: required, missing"
        for name in schema.get("required", [])
        if name not in value
    ]
    properties = schema.get("properties")
    extra = schema.get("additionalProperties")
    for name, item in value.items():
        if properties is not None and name in properties:
            found += _check(item, properties[name], version, f"{path}.{name}", form=form)
        elif isinstance(extra, dict):
            found += _check(item, extra, version, f"{path}.{name}", form=form)
        elif properties is not None or extra is False:
            found.append(f"{path}.{name}: not in the spec at {version}")
    return found


def operation(method: str, path: str) -> str:
    """The vendored operation that answers a request."""
    for route_method, pattern, name in OPERATIONS:
        if route_method == method and pattern.fullmatch(path):
            return name
    raise AssertionError(f"no vendored operation for {method} {path}: vendor it")


def spec_version(header: str) -> str:
    """The vendored section for a Stripe-Version header."""
    assert header in VERSIONS, (
        f"{header} has no vendored spec section: refresh tests/stripe_openapi.json"
    )
    return header


def check_recorded(requests: list[RecordedRequest]) -> list[str]:
    """Every recorded answer (and request body) against its operation at its version."""
    found = []
    for request in requests:
        assert request.body is not None, request
        version = spec_version(request.headers["stripe-version"])
        spec = SPEC["versions"][version]["operations"][operation(request.method, request.path)]
        where = f"{request.method} {request.path} @ {version}"
        if request.status != 200:
            schema = SPEC["versions"][version]["operations"]["error"]["response"]
            found += [
                f"{where} ({request.status}): {p}" for p in problems(request.body, schema, version)
            ]
            continue
        assert "absent" not in spec, f"{where} answered 200, but the spec has no such endpoint"
        found += [f"{where}: {p}" for p in problems(request.body, spec["response"], version)]
        if request.method == "POST" and "request" in spec:
            params = form_problems(request.params, spec["request"], version)
            found += [f"{where} request: {p}" for p in params]
    return found


# --- the fake, its fixtures and the bridge --------------------------------------------------------

CONFORMANCE_CONFIG = CONFIG_YAML.replace(
    "meters:\n", "meters:\n  calls: price_1Calls\n  far_away: price_1Far\n"
).replace("subjects:\n", "subjects:\n  big: sub_1Big\n")


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """The tests' config.yaml, with a meter price and a subscription of twelve items."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFORMANCE_CONFIG)
    return path


@pytest.fixture
def fake(stripe_fake: FakeStripe, billing: Billing) -> Iterator[FakeStripe]:
    """Legacy prices (one with transform_quantity), meter prices, and a subscription of 12 items."""
    stripe_fake.keep_bodies = True
    stripe_fake.add_meter("mtr_1Calls", event_name="calls", event_time_window="hour")
    stripe_fake.add_meter("mtr_1Off", event_name="off", status="inactive")
    stripe_fake.add_price("price_1Calls", aggregate_usage=None, meter="mtr_1Calls")
    stripe_fake.add_price("price_1Kilo", transform_quantity={"divide_by": 1000, "round": "up"})
    stripe_fake.add_price("price_1Seat", usage_type="licensed", aggregate_usage=None)
    stripe_fake.add_item(billing.customer1, "price_1Calls")
    fillers = [stripe_fake.add_price(f"price_1Fill{n:02}") for n in range(11)]
    stripe_fake.add_price("price_1Far", aggregate_usage="max")
    stripe_fake.add_subscription("sub_1Big", prices=[*fillers, "price_1Far", "price_1Seat"])
    stripe_fake.add_subscription("sub_1Done", prices=["price_1Api"], status="canceled")
    yield stripe_fake
    stripe_fake.keep_bodies = False


def connect(fake: FakeStripe) -> stripe.StripeClient:
    """The real client, as the bridge makes it: no hidden retries."""
    return stripe.StripeClient(API_KEY, base_addresses={"api": fake.url}, max_network_retries=0)


def test_the_clients_default_version_has_a_vendored_spec() -> None:
    assert stripe.api_version == DEFAULT, "stripe-python changed its version: refresh the spec"
    assert set(SPEC["versions"]) == set(VERSIONS)
    for version in VERSIONS:
        assert SPEC["versions"][version]["_source"]


def test_every_answer_the_bridge_relies_on_conforms(
    fake: FakeStripe, client: FlaskClient, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bridge's own calls: legacy and meter webhooks, paging past ten items, check-config.
    for number, (subject, meter) in enumerate(
        [("customer-1", "api_requests"), ("customer-1", "calls"), ("big", "far_away")]
    ):
        event = report([3], subject=subject, meter=meter)
        if meter == "far_away":
            event["meter"]["aggregation"] = "MAX"
        response = deliver(client, event, f"msg_conformance_{number}")
        assert response.status_code == 200, response.json
    monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", fake.url)
    config = Path(app.extensions["bridge"].settings.config_path)
    app.test_cli_runner().invoke(args=["check-config", str(config), "--online"])
    called = {operation(r.method, r.path) for r in fake.requests}
    assert called == {name for _, _, name in OPERATIONS}, called
    assert {r.headers["stripe-version"] for r in fake.requests} == set(VERSIONS)
    assert check_recorded(fake.requests) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_every_read_conforms_at_each_version(fake: FakeStripe, version: str) -> None:
    client = connect(fake)
    options: Any = {"stripe_version": version}
    client.v1.subscriptions.retrieve("sub_1Big", options=options)
    client.v1.subscriptions.retrieve("sub_1Done", options=options)
    first = client.v1.subscription_items.list(params={"subscription": "sub_1Big"}, options=options)
    client.v1.subscription_items.list(
        params={"subscription": "sub_1Big", "limit": 100, "starting_after": first.data[-1].id},
        options=options,
    )
    for price in ("price_1Api", "price_1Kilo", "price_1Calls", "price_1Seat"):
        client.v1.prices.retrieve(price, options=options)
    for meter in ("mtr_1Calls", "mtr_1Off"):
        client.v1.billing.meters.retrieve(meter, options=options)
    assert {r.headers["stripe-version"] for r in fake.requests} == {version}
    assert check_recorded(fake.requests) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_every_write_and_error_conforms_at_each_version(
    fake: FakeStripe, billing: Billing, version: str
) -> None:
    client = connect(fake)
    now = int(fake.now())
    customer = fake.state()["subscriptions"][billing.customer1]["customer"]
    payload = {"stripe_customer_id": customer, "value": "2.5"}
    send = {"event_name": "calls", "payload": payload, "timestamp": now - 60}
    client.raw_request(
        "post", "/v1/billing/meter_events", **send, identifier="conf-1", stripe_version=version
    )
    with pytest.raises(stripe.InvalidRequestError):  # the same identifier again
        client.raw_request(
            "post", "/v1/billing/meter_events", **send, identifier="conf-1", stripe_version=version
        )
    usage = f"/v1/subscription_items/{billing.api}/usage_records"
    record = {"quantity": 4, "timestamp": now - 60, "action": "set", "stripe_version": version}
    if version == USAGE_RECORDS_API_VERSION:
        client.raw_request("post", usage, **record, idempotency_key="conf-usage")
        with pytest.raises(stripe.IdempotencyError):  # the same key, other parameters
            client.raw_request(
                "post", usage, **record | {"quantity": 5}, idempotency_key="conf-usage"
            )
    else:
        with pytest.raises(stripe.InvalidRequestError, match="removed in API version 2025-03-31"):
            client.raw_request("post", usage, **record)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.prices.retrieve("price_1Nope", options={"stripe_version": version})
    fake.inject("500", path="/v1/prices/")
    with pytest.raises(stripe.APIError):
        client.v1.prices.retrieve("price_1Api", options={"stripe_version": version})
    fake.inject("429_lock", path="/v1/billing/meters/")
    with pytest.raises(stripe.RateLimitError):
        client.v1.billing.meters.retrieve("mtr_1Calls", options={"stripe_version": version})
    with pytest.raises(stripe.AuthenticationError):
        stripe.StripeClient("sk_test_wrong", base_addresses={"api": fake.url}).v1.prices.retrieve(
            "price_1Api", options={"stripe_version": version}
        )
    statuses = sorted({r.status for r in fake.requests})
    assert statuses == [200, 400, 401, 404, 429, 500]
    assert check_recorded(fake.requests) == []


# --- the validator catches what it is there to catch -----------------------------------------


def legacy_price(version: str) -> dict[str, Any]:
    """A legacy metered price as the fake renders it at `version`."""
    fake = FakeStripe(API_KEY)
    fake.add_price("price_1", transform_quantity={"divide_by": 10, "round": "down"})
    return fake._render_price(fake._prices["price_1"], version)


@pytest.mark.parametrize(
    ("version", "change", "problem"),
    [
        (
            DEFAULT,
            lambda p: p["recurring"].update(aggregate_usage="sum"),
            "aggregate_usage: not in the spec",
        ),
        (
            USAGE_RECORDS_API_VERSION,
            lambda p: p["recurring"].update(aggregate_usage="avg"),
            "not one of",
        ),
        (DEFAULT, lambda p: p.pop("billing_scheme"), "billing_scheme: required, missing"),
        (DEFAULT, lambda p: p.update(created="1"), "but the spec says integer"),
        (DEFAULT, lambda p: p.update(active=None), "null, but the spec does not allow it"),
        (DEFAULT, lambda p: p["transform_quantity"].update(round="nearest"), "matches no anyOf"),
        (DEFAULT, lambda p: p.update(product={"id": "prod_1"}), "is not vendored"),
    ],
    ids=[
        "removed_field",
        "bad_enum",
        "missing_required",
        "wrong_type",
        "null",
        "nested",
        "unvendored",
    ],
)
def test_the_validator_refuses_what_the_spec_does_not_allow(
    version: str, change: Any, problem: str
) -> None:
    schema = SPEC["versions"][version]["operations"]["GET /v1/prices/{price}"]["response"]
    price = legacy_price(version)
    assert problems(price, schema, version) == []
    change(price)
    found = problems(price, schema, version)
    assert found and problem in found[0], found


def test_the_period_is_where_each_version_has_it() -> None:
    fake = FakeStripe(API_KEY)
    fake.add_price("price_1")
    fake.add_subscription("sub_1", prices=["price_1"])
    for version in VERSIONS:
        schema = SPEC["versions"][version]["operations"][
            "GET /v1/subscriptions/{subscription_exposed_id}"
        ]
        rendered = fake._render_subscription(fake._subscriptions["sub_1"], version)
        assert problems(rendered, schema["response"], version) == []
        other = DEFAULT if version != DEFAULT else USAGE_RECORDS_API_VERSION
        assert problems(rendered, schema["response"], other), f"{version} conforms to {other} too"


@pytest.mark.parametrize("version", VERSIONS)
def test_billing_thresholds_render_as_the_spec_says(version: str) -> None:
    fake = FakeStripe(API_KEY)
    fake.add_price("price_1")
    fake.add_subscription("sub_1", prices=["price_1"])
    fake.set_billing_thresholds("sub_1", amount_gte=5000)
    fake.set_billing_thresholds("sub_1", item=fake.item_id("sub_1", "price_1"), usage_gte=100)
    schema = SPEC["versions"][version]["operations"][
        "GET /v1/subscriptions/{subscription_exposed_id}"
    ]["response"]
    rendered = fake._render_subscription(fake._subscriptions["sub_1"], version)
    assert rendered["billing_thresholds"]["amount_gte"] == 5000
    assert rendered["items"]["data"][0]["billing_thresholds"] == {"usage_gte": 100}
    assert problems(rendered, schema, version) == []
    rendered["billing_thresholds"]["amount_gte"] = "5000"
    assert problems(rendered, schema, version), "the vendored schema checks the thresholds"


def test_the_refresh_tool_rebuilds_a_section_from_a_full_spec() -> None:
    section = SPEC["versions"][DEFAULT]
    # A stand-in for a downloaded spec3.json: the vendored schemas, with descriptions put back.
    schemas = {
        name: {**schema, "description": "from the spec"}
        for name, schema in section["components"]["schemas"].items()
        if name != "error"
    }
    paths: dict[str, Any] = {}
    for name, entry in section["operations"].items():
        if name == "error" or "absent" in entry:
            continue
        method, path = name.split(" ", 1)
        answer = {"200": {"content": {"application/json": {"schema": entry["response"]}}}}
        found: dict[str, Any] = {"responses": answer}
        if "request" in entry:
            form = {"application/x-www-form-urlencoded": {"schema": entry["request"]}}
            found["requestBody"] = {"content": form}
        paths.setdefault(path, {})[method.lower()] = found
    spec = {
        "info": {"version": "2026-09-30.endive"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    vendored = json.loads(json.dumps(SPEC))
    assert refresh(spec, vendored, DEFAULT, "abc123") == ["schema error"]
    fresh = vendored["versions"][DEFAULT]
    assert fresh["components"]["schemas"]["price"] == section["components"]["schemas"]["price"]
    assert fresh["operations"] == section["operations"] | {
        "POST /v1/subscription_items/{subscription_item}/usage_records": {
            "absent": "not in the spec at abc123"
        }
    }
    assert fresh["_source"]["commit"] == "abc123"
