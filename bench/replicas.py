"""Several replicas of the service for `make chaos`: one PostgreSQL ledger, more gunicorn masters.

The first replica is the one fake_and_service starts; the others run the same CMD against the
same fake Stripe and config, each with its own port and scratch folder, sharing DATABASE_URL.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.harness import SECRET, Running, free_port, healthy, start_service, wait_until
from tests.postgres import PostgresServer, why_not


@dataclass
class Replica:
    """One more gunicorn master serving the bridge."""

    base: str
    process: subprocess.Popen[bytes]
    log_path: Path


@contextmanager
def ledger_env(replicas: int, workdir: Path) -> Iterator[dict[str, str]]:
    """The ledger's environment: SQLite for one replica, a throw-away PostgreSQL for several."""
    sqlite = {"STATE_PATH": str(workdir / "state" / "bridge.sqlite3")}
    if replicas == 1:
        yield sqlite
        return
    if reason := why_not():
        raise SystemExit(f"--replicas {replicas} needs PostgreSQL: {reason}")
    server = PostgresServer()
    try:
        server.start()
        yield sqlite | {"DATABASE_URL": server.create_database()}
    finally:
        server.remove()


@contextmanager
def more_replicas(
    first: Running, count: int, env: dict[str, str], workdir: Path
) -> Iterator[list[Replica]]:
    """`count` more replicas beside `first`, stopped when the block ends."""
    with ExitStack() as stack:
        replicas = [
            stack.enter_context(replica(first, env, workdir / f"replica{n}")) for n in range(count)
        ]
        yield replicas


@contextmanager
def replica(first: Running, env: dict[str, str], workdir: Path) -> Iterator[Replica]:
    """One more replica, until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        "OPENMETER_WEBHOOK_SECRET": SECRET,
        "CONFIG_PATH": str(first.log_path.parent / "config.yaml"),
        "STRIPE_API_BASE": first.fake_url,
        "PORT": str(port),
        "TMPDIR": str(workdir),
        **env,
        "STATE_PATH": str(workdir / "unused.sqlite3"),  # never used: DATABASE_URL wins
    }
    log_path = workdir / "service.log"
    process = start_service(env, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(base) or process.poll() is not None, timeout=30)
        if process.poll() is not None:
            raise SystemExit(log_path.read_text())
        yield Replica(base, process, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
