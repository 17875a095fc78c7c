"""Refresh one API version's schemas in tests/stripe_openapi.json from a full Stripe spec.

Stripe publishes its API as OpenAPI in github.com/stripe/openapi (MIT). To move the fake to a new
version (say, after a stripe-python upgrade changes the version it sends):

    curl -sLo /tmp/spec3.json \\
      https://raw.githubusercontent.com/stripe/openapi/COMMIT/latest/openapi.spec3.json
    python tools/refresh_stripe_openapi.py /tmp/spec3.json 2026-10-28.endive --commit COMMIT
    python -m pytest tests/test_conformance.py   # then fix the fake where it no longer conforms

Every schema and operation already vendored for that version is replaced by the spec's, with
descriptions dropped; a schema the spec lacks is reported and kept. Older versions' specs are
tagged in the same repository (`git tag`, e.g. v1505 for 2025-02-24.acacia): pass their
openapi/spec3.json to replace the stand-in that tests/stripe_openapi.json describes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

VENDORED = Path(__file__).resolve().parent.parent / "tests" / "stripe_openapi.json"
DROPPED = {"description", "title", "x-expandableFields", "x-expansionResources", "x-resourceId"}


def strip(node: Any) -> Any:
    """A schema without descriptions and documentation-only keys."""
    if isinstance(node, dict):
        return {key: strip(value) for key, value in node.items() if key not in DROPPED}
    if isinstance(node, list):
        return [strip(value) for value in node]
    return node


def operation_schemas(spec: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The 200 response (and form request) schema of `METHOD /path`, or None if not in the spec."""
    method, path = name.split(" ", 1)
    found = spec["paths"].get(path, {}).get(method.lower())
    if found is None:
        return None
    schemas = {"response": found["responses"]["200"]["content"]["application/json"]["schema"]}
    if method == "POST":
        form = found["requestBody"]["content"]["application/x-www-form-urlencoded"]
        schemas["request"] = form["schema"]
    return {key: strip(value) for key, value in schemas.items()}


def refresh(spec: dict[str, Any], vendored: dict[str, Any], version: str, commit: str) -> list[str]:
    """Replaces the version's vendored schemas from the spec; returns what the spec lacks."""
    section = vendored["versions"][version]
    missing = []
    schemas = section["components"]["schemas"]
    for name in list(schemas):
        if name in spec["components"]["schemas"]:
            schemas[name] = strip(spec["components"]["schemas"][name])
        else:
            missing.append(f"schema {name}")
    for name in list(section["operations"]):
        if name == "error":
            continue
        found = operation_schemas(spec, name)
        if found is None:
            section["operations"][name] = {"absent": f"not in the spec at {commit}"}
        else:
            section["operations"][name] = found
    section["_source"] = {
        "repository": "stripe/openapi",
        "commit": commit,
        "info.version": spec["info"]["version"],
        "refreshed_by": "tools/refresh_stripe_openapi.py",
    }
    return missing


def main() -> None:
    """Reads the spec, refreshes one version, writes tests/stripe_openapi.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="a full openapi.spec3.json from stripe/openapi")
    parser.add_argument("version", help="the section to refresh, e.g. 2026-10-28.endive")
    parser.add_argument("--commit", required=True, help="the stripe/openapi commit it came from")
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    vendored = json.loads(VENDORED.read_text())
    for problem in refresh(spec, vendored, args.version, args.commit):
        print(f"not in the spec, kept as it was: {problem}")
    VENDORED.write_text(json.dumps(vendored, indent=1) + "\n")


if __name__ == "__main__":
    main()
