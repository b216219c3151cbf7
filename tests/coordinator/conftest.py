"""Store backends for coordinator tests: every store test runs on each of them.

``postgresql`` uses the real server named by ``FEDGATE_TEST_POSTGRES_URL`` (default: the
local trust-auth server): one fresh database per test module and a fresh schema in it per
test. It fails, never skips, when the server is down.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from fedgate_coordinator.store import Store
from psycopg import sql
from sqlalchemy.engine import make_url

POSTGRES_ADMIN_URL = os.environ.get(
    "FEDGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
STORE_BACKENDS = ["sqlite-file", "sqlite-memory", "postgresql"]


@dataclass(frozen=True)
class StoreBackend:
    """Where a test store lives; ``persistent`` is False for in-memory SQLite."""

    name: str
    url: str
    persistent: bool


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    """A uniquely named database for one test module; yields its plain URL, then drops it."""
    name = f"fedgate_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def fresh_postgres_schema(database_url: str) -> Iterator[str]:
    """An empty schema in ``database_url``; yields a URL whose search_path selects it.

    A schema per test is as isolated as a database per test (the store, its Alembic
    version table and every query see only that schema) and about 100 times faster.
    """
    schema = f"test_{secrets.token_hex(6)}"
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        url = make_url(database_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(database_url, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


@pytest.fixture(params=STORE_BACKENDS)
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    """An empty database on each backend (not yet migrated)."""
    name: str = request.param
    if name == "sqlite-file":
        yield StoreBackend(name, f"sqlite:///{tmp_path / 'coordinator.db'}", persistent=True)
    elif name == "sqlite-memory":
        yield StoreBackend(name, "sqlite://", persistent=False)
    else:
        database_url: str = request.getfixturevalue("postgres_database")
        with fresh_postgres_schema(database_url) as url:
            yield StoreBackend(name, url, persistent=True)


@pytest.fixture
def store(store_backend: StoreBackend) -> Iterator[Store]:
    """A migrated, empty store on each backend."""
    opened = Store.open(store_backend.url)
    try:
        yield opened
    finally:
        opened.close()
