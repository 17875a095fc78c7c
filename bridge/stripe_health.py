"""Whether Stripe rejects the API key: /readyz says so until a call succeeds, in every worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The folder a gunicorn start shares between its workers (gunicorn.conf.py makes a fresh one per
# start, for the Prometheus files). Outside gunicorn (tests, the CLI) the state is per process.
SHARED_FOLDER_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
MARKER_NAME = "stripe-key-rejected.json"


class KeyHealth:
    """The last verdict Stripe gave on the API key: rejected (with why), or fine.

    Under gunicorn the verdict is a file in the workers' shared folder, so that /readyz answers
    the same whichever worker a probe reaches. It only informs readiness; no write depends on it.
    """

    def __init__(self, folder: str | None = None) -> None:
        self._marker = Path(folder) / MARKER_NAME if folder else None
        self._reason: str | None = None  # without a shared folder

    @classmethod
    def for_this_start(cls) -> KeyHealth:
        """The verdict shared by this gunicorn start's workers (per process outside gunicorn)."""
        return cls(os.environ.get(SHARED_FOLDER_VARIABLE) or None)

    def rejected(self, reason: str) -> None:
        """Stripe refused the key (401, or 403 for a restricted key that lacks a permission)."""
        self._reason = reason
        if self._marker is not None:
            fresh = self._marker.with_name(f"{MARKER_NAME}.{os.getpid()}")
            fresh.write_text(json.dumps({"reason": reason}))
            fresh.replace(self._marker)  # atomic: a reader sees the old verdict or the new one

    def accepted(self) -> None:
        """A call succeeded: the key works (a stat per call when nothing was rejected)."""
        self._reason = None
        if self._marker is not None and self._marker.exists():
            self._marker.unlink(missing_ok=True)

    def problem(self) -> str | None:
        """Why the key does not work, or None."""
        if self._marker is None:
            return self._reason
        try:
            reason = json.loads(self._marker.read_text())["reason"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return str(reason)
