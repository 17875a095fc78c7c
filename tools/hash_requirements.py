"""Adds to every exact pin in the given requirements files the sha256 of each file of that release.

    python3 tools/hash_requirements.py requirements.txt requirements-dev.txt   (or: make hashes)

Pins, comments and `-r` lines stay as written; hashes already there are replaced. The hashes are
those the package index lists for the release (PEP 691 JSON), all of them: every wheel and sdist,
so `pip install --require-hashes` works on any platform the release has files for (Linux x86_64
and aarch64 images, a developer's Mac), as `pip-compile --generate-hashes` would write them. A
release's files never change on PyPI, so the output is the same on every run. Standard library
only: it has to run when the venv cannot be built because a new pin has no hash yet.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from pathlib import Path

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)$")
SDIST_SUFFIXES = (".tar.gz", ".zip")


def normalize(name: str) -> str:
    """PEP 503's normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def file_version(filename: str, project: str) -> str | None:
    """The version in a wheel's or sdist's file name, or None for other files."""
    if filename.endswith(".whl"):
        parts = filename.removesuffix(".whl").split("-")
        return parts[1] if len(parts) in (5, 6) else None
    for suffix in SDIST_SUFFIXES:
        if filename.endswith(suffix):
            stem = filename.removesuffix(suffix)
            name, _, version = stem.rpartition("-")
            return version if normalize(name) == project else None
    return None


def release_hashes(index_url: str, name: str, version: str) -> list[str]:
    """The sha256 of every file of name==version on the index, sorted."""
    project = normalize(name)
    url = f"{index_url.rstrip('/')}/{project}/"
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
    request = urllib.request.Request(url, headers=accept)  # noqa: S310  # the index, as pip would
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        files = json.load(response)["files"]
    hashes = sorted(
        {
            entry["hashes"]["sha256"]
            for entry in files
            if "sha256" in entry.get("hashes", {})
            and file_version(entry["filename"], project) == version
        }
    )
    if not hashes:
        raise SystemExit(f"{name}=={version}: the index lists no files for this release")
    return hashes


def logical_lines(text: str) -> list[str]:
    """The file's lines with backslash continuations joined."""
    joined: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    if pending:
        joined.append(pending)
    return joined


def rewrite(text: str, index_url: str) -> str:
    """The requirements text with each pin followed by its release's hashes."""
    out: list[str] = []
    for line in logical_lines(text):
        requirement = re.sub(r"\s--hash=\S+", "", line).strip()
        if not requirement or requirement.startswith(("#", "-")):
            out.append(line.rstrip())
            continue
        match = PIN.match(requirement)
        if match is None:
            raise SystemExit(f"not an exact pin (name==version): {requirement!r}")
        hashes = release_hashes(index_url, match["name"], match["version"])
        out.append(" \\\n".join([requirement, *(f"    --hash=sha256:{h}" for h in hashes)]))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Rewrites each file in place."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--index-url", default="https://pypi.org/simple")
    args = parser.parse_args(argv)
    for path in args.files:
        path.write_text(rewrite(path.read_text(), args.index_url))
        print(f"{path}: hashed", file=sys.stderr)


if __name__ == "__main__":
    main()
