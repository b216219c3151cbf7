"""A coordinator refuses a store that holds another coordinator's history, or that it
cannot read as it is.

`init` against a database that already holds a model chain or enrolled agents, and `serve`
with a ``database_url`` that points at a store grown from another genesis (a restored or
copied state directory, a typo): both exit 3 (config) and write nothing to that store.
Commands that only read refuse a store at an older schema revision instead of migrating
it, and every command refuses one from a newer version with what to do (exit 4). Real
command line, on a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import nacl.signing
import pytest
import sqlalchemy as sa
from alembic import command
from click.testing import CliRunner, Result
from fedgate_common.keys import public_key_text
from fedgate_coordinator.cli import ExitCode, main
from fedgate_coordinator.store import Store, alembic_config, head_revision

from tests.federation_support import add_genesis

if TYPE_CHECKING:
    from tests.coordinator.conftest import StoreBackend

on_disk_stores = pytest.mark.parametrize(
    "store_backend", ["sqlite-file", "postgresql"], indirect=True
)


def _cli(state_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--state-dir", str(state_dir), *args])


def _init(state_dir: Path, url: str, cloud: str = "c1") -> Result:
    return _cli(state_dir, "init", "--cloud", cloud, "--deployment", "plant-a", "--db", url)


@on_disk_stores
def test_init_refuses_a_store_with_a_model_chain(
    store_backend: StoreBackend, tmp_path: Path
) -> None:
    first = tmp_path / "first"
    assert _init(first, store_backend.url).exit_code == 0
    add_genesis(first, store_backend.url)

    second = _init(tmp_path / "second", store_backend.url, cloud="c2")

    assert second.exit_code == ExitCode.CONFIG, second.output
    assert "already holds a model chain from genesis" in second.output
    assert not (tmp_path / "second" / "coordinator.toml").exists()


@on_disk_stores
def test_init_refuses_a_store_with_enrolled_agents(
    store_backend: StoreBackend, tmp_path: Path
) -> None:
    first = tmp_path / "first"
    assert _init(first, store_backend.url).exit_code == 0
    key = public_key_text(nacl.signing.SigningKey.generate().verify_key)
    enrolled = _cli(first, "enroll", "site-1", key)
    assert enrolled.exit_code == 0, enrolled.output

    second = _init(tmp_path / "second", store_backend.url, cloud="c2")

    assert second.exit_code == ExitCode.CONFIG, second.output
    assert "already holds 1 agent(s)" in second.output


@on_disk_stores
def test_serve_refuses_a_store_grown_from_another_genesis(
    store_backend: StoreBackend, tmp_path: Path
) -> None:
    # The first coordinator's store, with a round left running by a crash.
    first = tmp_path / "first"
    assert _init(first, store_backend.url).exit_code == 0
    add_genesis(first, store_backend.url)
    with Store.open(store_backend.url) as store:
        genesis = store.head_model()
        assert genesis is not None
        store.begin_round(round=1, base_digest=genesis.digest, selected=2, min_participants=2)
    # A second coordinator (its own random genesis), then its database_url pointed at it.
    second = tmp_path / "second"
    assert _cli(second, "init", "--cloud", "c2", "--deployment", "plant-a").exit_code == 0
    config = second / "coordinator.toml"
    text = config.read_text()
    config.write_text(re.sub('database_url = ".*"', f'database_url = "{store_backend.url}"', text))

    served = _cli(second, "serve", "--rounds", "1")

    assert served.exit_code == ExitCode.CONFIG, served.output
    assert "not this federation's genesis" in served.output
    with Store.open(store_backend.url) as store:
        assert store.running_rounds() == [1]  # not recovered (aborted) by the wrong coordinator
        assert store.history_marks()[0] == genesis.digest


def _set_revision(url: str, revision: str) -> None:
    """Move the store to ``revision``: a real downgrade, or a revision no release has."""
    with Store.open(url) as store:
        if revision == FUTURE:
            with store.engine.begin() as connection:
                connection.execute(
                    sa.text("UPDATE alembic_version SET version_num = :v"), {"v": revision}
                )
            return
        config = alembic_config(store.engine.url)
        with store.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)


def _revision(url: str) -> str | None:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


FUTURE = "0999"


@on_disk_stores
@pytest.mark.parametrize(
    "command_line", [["status"], ["rounds"], ["privacy", "--json"], ["agents"]]
)
def test_commands_that_only_read_do_not_migrate_an_older_store(
    store_backend: StoreBackend, tmp_path: Path, command_line: list[str]
) -> None:
    state_dir = tmp_path / "coord"
    assert _init(state_dir, store_backend.url).exit_code == 0
    _set_revision(store_backend.url, "0004")

    result = _cli(state_dir, *command_line)

    assert result.exit_code == ExitCode.STORE, result.output
    assert f"is at schema revision 0004 and this fedgate-coordinator needs {head_revision()}" in (
        result.output
    )
    assert _revision(store_backend.url) == "0004"
    # A command that writes migrates, as the first start of serve does.
    key = public_key_text(nacl.signing.SigningKey.generate().verify_key)
    assert _cli(state_dir, "enroll", "site-1", key).exit_code == 0
    assert _revision(store_backend.url) == head_revision()
    assert _cli(state_dir, *command_line).exit_code == 0


@on_disk_stores
@pytest.mark.parametrize("command_line", [["status"], ["enroll", "site-1"]])
def test_a_store_from_a_newer_version_is_refused_with_what_to_do(
    store_backend: StoreBackend, tmp_path: Path, command_line: list[str]
) -> None:
    state_dir = tmp_path / "coord"
    assert _init(state_dir, store_backend.url).exit_code == 0
    _set_revision(store_backend.url, FUTURE)
    if command_line[0] == "enroll":
        command_line = [
            *command_line,
            public_key_text(nacl.signing.SigningKey.generate().verify_key),
        ]

    result = _cli(state_dir, *command_line)

    assert result.exit_code == ExitCode.STORE, result.output
    assert (
        f"is at schema revision {FUTURE}, which this fedgate-coordinator does not know "
        f"(it knows up to {head_revision()}): a newer version migrated it"
    ) in result.output
    assert _revision(store_backend.url) == FUTURE


@on_disk_stores
def test_a_foreign_store_is_refused_before_it_is_migrated(
    store_backend: StoreBackend, tmp_path: Path
) -> None:
    """Another coordinator's store at an older revision (it runs an older release): init
    and serve refuse it as it is; migrating it first would lock its owner out."""
    first = tmp_path / "first"
    assert _init(first, store_backend.url).exit_code == 0
    add_genesis(first, store_backend.url)
    _set_revision(store_backend.url, "0004")

    assert _init(tmp_path / "second", store_backend.url, cloud="c2").exit_code == ExitCode.CONFIG
    assert _revision(store_backend.url) == "0004"
    third = tmp_path / "third"
    assert _cli(third, "init", "--cloud", "c3", "--deployment", "plant-a").exit_code == 0
    config = third / "coordinator.toml"
    text = config.read_text()
    config.write_text(re.sub('database_url = ".*"', f'database_url = "{store_backend.url}"', text))
    served = _cli(third, "serve", "--rounds", "1")
    assert served.exit_code == ExitCode.CONFIG, served.output
    assert "not this federation's genesis" in served.output
    assert _revision(store_backend.url) == "0004"


@on_disk_stores
@pytest.mark.parametrize("command_line", [["enroll", "site-1"], ["status"], ["serve"]])
def test_a_database_url_without_a_store_is_refused_and_nothing_is_created(
    store_backend: StoreBackend, tmp_path: Path, command_line: list[str]
) -> None:
    """A mistyped database_url, or a restore into an empty database that skipped
    `pg_restore`: only `init` creates a store; every other command refuses (exit 4) and
    leaves no file, no schema behind (a new, empty store would take the coordinator's
    enrolments and rounds, away from its history)."""
    state_dir = tmp_path / "coord"
    assert _cli(state_dir, "init", "--cloud", "c1", "--deployment", "plant-a").exit_code == 0
    config = state_dir / "coordinator.toml"
    config.write_text(
        re.sub('database_url = ".*"', f'database_url = "{store_backend.url}"', config.read_text())
    )
    if command_line[0] == "enroll":
        command_line = [
            *command_line,
            public_key_text(nacl.signing.SigningKey.generate().verify_key),
        ]

    result = _cli(state_dir, *command_line)

    assert result.exit_code == ExitCode.STORE, result.output
    if store_backend.url.startswith("sqlite"):
        assert "no coordinator store at" in result.output
        assert "the file does not exist" in result.output
        assert not Path(store_backend.url.removeprefix("sqlite:///")).exists()
    else:
        assert "holds no coordinator store: run `fedgate-coordinator init`" in result.output
        engine = sa.create_engine(
            store_backend.url.replace("postgresql://", "postgresql+psycopg://")
        )
        try:
            assert sa.inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
