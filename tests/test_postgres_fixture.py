"""The throw-away PostgreSQL of the ledger's tests: it starts, serves, stops and starts again."""

from __future__ import annotations

import psycopg
import pytest

from tests.postgres import PostgresServer


def test_each_test_gets_an_empty_database_of_its_own(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as connection:
        tables = connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
    assert tables == (0,)


def test_the_server_can_be_stopped_and_started_again(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    postgres_server.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres_url, connect_timeout=5)
    postgres_server.start()
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
