"""config.yaml as it is now: live reload, the last good version kept."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bridge.config import Config, config_checksum, parse_config_file, read_file
from bridge.errors import ConfigError
from bridge.logs import CONFIG_RELOADS, log_event


class ConfigSource:
    """config.yaml as it is now: re-read when its bytes change, the last good version kept.

    Comparing content (not mtime or inode) catches every way of replacing the file: an edit, an
    atomic rename, a Kubernetes ConfigMap's symlink swap. A new version is taken only once it is
    stable, so that a file being written in place is never taken half-written.
    """

    CHECK_EVERY_SECONDS = 1.0
    # The same bytes, read again at least this long after they were first read (or read from a
    # file not modified for that long), are a stable version: a write in place is seldom torn for
    # that long, and renames are never torn.
    STABLE_SECONDS = 1.0

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        try:
            raw = read_file(path)
        except ConfigError as error:
            raise ConfigError(
                [
                    f"CONFIG_PATH: {problem} (give CONFIG_PATH a readable config.yaml; in a "
                    "container, mount the folder that holds it: docs/operations.md#the-container)"
                    for problem in error.problems
                ]
            ) from error
        self.config, self.checksum = parse_config_file(raw, path), config_checksum(raw)
        self.loaded_at = datetime.now(UTC)
        self.error: str | None = None
        self._rejected: str | None = None  # the checksum of the last invalid version, logged once
        self._candidate: tuple[str, float] | None = None  # a new version, and when first read
        self._checked_at = clock()
        self._lock = threading.Lock()

    def current(self) -> Config:
        """The newest valid config, checking the file at most once a second."""
        if self._clock() - self._checked_at >= self.CHECK_EVERY_SECONDS:
            # Requests that arrive while another thread checks wait for it (reading the file takes
            # well under a millisecond): none answers from a config older than its second.
            with self._lock:
                if self._clock() - self._checked_at >= self.CHECK_EVERY_SECONDS:
                    self._checked_at = self._clock()
                    self._reload_if_changed()
        return self.config

    def watch(self) -> None:
        """Checks the file every second in a thread of this process, requests or not.

        Without it an idle worker would serve, and /readyz show, the old version until a request
        came. gunicorn's post_worker_init calls this in each worker: threads do not survive fork.
        """

        def check_forever() -> None:
            while True:
                time.sleep(self.CHECK_EVERY_SECONDS)
                try:
                    self.current()
                except Exception as error:  # a bug: logged, and the thread keeps watching
                    log_event("config watch failed", logging.ERROR, path=self.path,
                              error=f"{type(error).__name__}: {error}"[:300])  # fmt: skip

        threading.Thread(target=check_forever, name="config-watch", daemon=True).start()

    def _reload_if_changed(self) -> None:
        """Swaps in a changed file if it is valid; otherwise keeps serving the old one."""
        try:
            raw = read_file(self.path)
        except ConfigError as error:
            self._reject("unreadable", error)
            return
        checksum = config_checksum(raw)
        if checksum == self.checksum:
            self.error = self._rejected = self._candidate = None  # an edit was undone
            return
        if checksum == self._rejected or not self._stable(checksum):
            return
        try:
            config = parse_config_file(raw, self.path)
            _keeps_something(self.config, config)
        except ConfigError as error:
            self._reject(checksum, error)
            return
        self.config, self.checksum, self.loaded_at = config, checksum, datetime.now(UTC)
        self.error = self._rejected = None
        CONFIG_RELOADS.labels("loaded").inc()
        log_event("config reloaded", path=self.path, checksum=checksum)

    def _stable(self, checksum: str) -> bool:
        """Whether the version just read was read STABLE_SECONDS ago already, or had not been
        modified for that long (a second more, for filesystems that keep whole seconds)."""
        now = self._clock()
        if self._candidate is None or self._candidate[0] != checksum:
            self._candidate = (checksum, now)
        if now - self._candidate[1] >= self.STABLE_SECONDS:
            return True
        try:  # stat after the read: a write since then makes the file look new, never old
            return time.time() - os.stat(self.path).st_mtime >= self.STABLE_SECONDS + 1
        except OSError:
            return False

    def _reject(self, version: str, error: ConfigError) -> None:
        """Keeps the last good config, and says so once per bad version of the file."""
        if self._rejected != version:
            self._rejected, self.error = version, "; ".join(error.problems)
            CONFIG_RELOADS.labels("failed").inc()
            log_event(
                "config reload failed", logging.ERROR, path=self.path, problems=error.problems
            )

    def status(self) -> dict[str, Any]:
        """What /readyz says about the config."""
        return {
            "path": self.path,
            "checksum": self.checksum,
            "loaded_at": self.loaded_at.isoformat(),
            "last_reload_error": self.error,
        }


def _keeps_something(loaded: Config, new: Config) -> None:
    """Refuses a reload that empties a section: far likelier a truncated file than an intent."""
    emptied = [
        f"every {noun}"
        for noun, before, after in [
            ("subject", loaded.subjects, new.subjects),
            ("meter", loaded.meters, new.meters),
        ]
        if before and not after
    ]
    if emptied:
        raise ConfigError(
            [
                f"the new version would drop {' and '.join(emptied)}: refused as a file cut off "
                "or emptied mid-write would be; to remove them all, restart with the new file"
            ]
        )
