"""A coordinator refuses a store that holds another coordinator's history.

`init` against a database that already holds a model chain or enrolled agents, and `serve`
with a ``database_url`` that points at a store grown from another genesis (a restored or
copied state directory, a typo): both exit 3 (config) and write nothing to that store.
Real command line, on a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import nacl.signing
import pytest
from click.testing import CliRunner, Result
from fedgate_common.keys import public_key_text
from fedgate_coordinator.cli import ExitCode, main
from fedgate_coordinator.store import Store

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
        assert store.genesis_digest() == genesis.digest
