"""Pytest fixtures on the real PostgreSQL server of support/postgres.py. Import them into a test
module or a conftest::

    from promptopt_dagster_tests.support.postgres_fixtures import (
        postgres_db_url, postgres_server, postgres_url,
    )

- ``postgres_server`` (session): the running `PostgresServer`, started once per session. Use it to
  create more databases (`create_database`) or to restart the server (`restart`).
- ``postgres_url`` (session): ``postgresql+psycopg2://promptopt:...@127.0.0.1:PORT/promptopt``,
  an empty database shared by the whole session.
- ``postgres_db_url`` (function): a database of its own for each test, created by
  ``CREATE DATABASE ... TEMPLATE`` from a template that already holds Dagster's tables (so a
  Dagster instance on it needs no schema migration), dropped (``WITH (FORCE)``) after the test.

With `postgres_instance` (support/postgres.py) a test gets a Dagster instance on such a database::

    def test_something(postgres_db_url, tmp_path):
        with postgres_instance(postgres_db_url, tmp_path / "dagster_home") as instance:
            dg.materialize([...], instance=instance)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from promptopt_dagster_tests.support.postgres import DATABASE, PostgresServer, database_name

# One server per pytest process, however many modules import the fixtures: a session fixture
# imported into two test modules is two fixture definitions, each run once per session.
_shared: PostgresServer | None = None
_users = 0


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (stopped and removed at its end)."""
    global _shared, _users
    if _shared is None:
        _shared = PostgresServer().__enter__()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0 and _shared is not None:
            _shared.close()
            _shared = None


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of an empty database shared by the whole session."""
    return postgres_server.ensure_database(DATABASE)


@pytest.fixture
def postgres_db_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a database of this test's own, with Dagster's tables already there; dropped after."""
    url = postgres_server.create_database(template=postgres_server.dagster_template())
    yield url
    postgres_server.drop_database(database_name(url))
