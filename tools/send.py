"""`make send FILE=... URL=...`: sign a report as Svix would and post it to a running service.

For trying the service by hand: the signature uses the real Svix algorithm and the secret in
OPENMETER_WEBHOOK_SECRET (the first one, if several), so the service verifies it like any delivery.
A fixed --message-id sends a redelivery; by default each send is a new message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import requests
from svix.webhooks import Webhook


def signed_headers(body: str, message_id: str, secret: str) -> dict[str, str]:
    """The headers Svix sends with body, signed now."""
    now = datetime.now(UTC)
    return {
        "svix-id": message_id,
        "svix-timestamp": str(int(now.timestamp())),
        "svix-signature": Webhook(secret).sign(message_id, now, body),
        "content-type": "application/json",
    }


def send(url: str, body: str, headers: dict[str, str]) -> tuple[int, str]:
    """Posts body; returns the status and the answer's text, whatever the status."""
    response = requests.post(url, data=body.encode(), headers=headers, timeout=20)
    return response.status_code, response.text


def main(argv: Sequence[str] | None = None) -> int:
    """Sends one file; exits 0 on a 2xx answer."""
    parser = argparse.ArgumentParser(prog="make send", description=__doc__)
    parser.add_argument("file", type=Path, help="a report body, e.g. an OpenMeter report.json")
    parser.add_argument("--url", default="http://127.0.0.1:8080/webhook")
    parser.add_argument("--message-id", help="svix-id to send (default: a new one)")
    args = parser.parse_args(argv)
    secret = os.environ.get("OPENMETER_WEBHOOK_SECRET", "").split()
    if not secret:
        parser.error("OPENMETER_WEBHOOK_SECRET is not set: export the service's whsec_ secret")
    body = args.file.read_text()
    message_id = args.message_id or f"msg_manual_{int(time.time() * 1000)}"
    status, answer = send(args.url, body, signed_headers(body, message_id, secret[0]))
    with contextlib.suppress(ValueError):  # not JSON (a proxy's page, say): shown as it came
        answer = json.dumps(json.loads(answer), indent=2)
    print(f"{message_id} -> {args.url}: {status}\n{answer}")
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
