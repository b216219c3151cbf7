"""`fedgate-coordinator rounds`: the aggregation column, `--detail N` and its JSON form.

Runs the real command line (click's runner) against a store initialised by `init`, on a
SQLite file and on PostgreSQL; the rounds are written through the store as `serve` would.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from fedgate_common.model_spec import initial_weights
from fedgate_coordinator.cli import EXIT_CODES_HELP, ExitCode, main
from fedgate_coordinator.store import SECAGG_STAGES, ModelRecord, ParticipantRecord, Store

from tests.federation_support import add_genesis

if TYPE_CHECKING:
    from tests.coordinator.conftest import StoreBackend


@dataclass(frozen=True)
class Coordinator:
    """An initialised state directory and the store it points at."""

    state_dir: Path
    database_url: str

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["--state-dir", str(self.state_dir), "rounds", *args])


# The command line reopens the store in every call: in-memory SQLite cannot take part.
on_disk_stores = pytest.mark.parametrize(
    "store_backend", ["sqlite-file", "postgresql"], indirect=True
)


@pytest.fixture
def coordinator(store_backend: StoreBackend, tmp_path: Path) -> Coordinator:
    """`init` run against a fresh store, then a plaintext, a secagg and a bare round in it.

    Round 1: plaintext, completed, one ``update`` stage. Round 2: secagg (t=3, k=4,
    32-bit words), aborted at ``masked``. Round 3: plaintext, running, no stage yet.
    """
    state_dir = tmp_path / "coord"
    init = CliRunner().invoke(
        main, ["--state-dir", str(state_dir), "init", "--cloud", "c1", "--db", store_backend.url]
    )
    assert init.exit_code == 0, init.output
    add_genesis(state_dir, store_backend.url)  # what the first `serve` does
    with Store.open(store_backend.url) as store:
        _record_rounds(store)
    return Coordinator(state_dir, store_backend.url)


def _record_rounds(store: Store) -> None:
    genesis = store.head_model()
    assert genesis is not None
    store.begin_round(round=1, base_digest=genesis.digest, selected=2, min_participants=2)
    store.record_stage(
        round=1,
        stage="update",
        expected=2,
        received=2,
        bytes_in=80_000,
        bytes_out=82_000,
        seconds=3.5,
    )
    model = _child_of(genesis)
    store.complete_round(
        round=1,
        participants=[
            ParticipantRecord(agent_id="site-a", num_samples=10, train_loss=0.5, bytes_up=40_000),
            ParticipantRecord(agent_id="site-b", num_samples=30, train_loss=0.25, bytes_up=40_000),
        ],
        model=model,
        mean_train_loss=0.3125,
        bytes_down_per_agent=41_000,
    )
    store.begin_round(
        round=2,
        base_digest=model.digest,
        selected=5,
        min_participants=3,
        aggregation="secagg",
        threshold=3,
        graph_degree=4,
        word_bits=32,
    )
    for stage, received in [("keys", 5), ("shares", 4), ("masked", 2)]:
        store.record_stage(
            round=2,
            stage=stage,
            expected=5,
            received=received,
            bytes_in=received * 1000,
            bytes_out=5 * 3000,
            seconds=0.75,
        )
    store.abort_round(
        round=2,
        reason="2 masked inputs, threshold 3",
        participants=[
            ParticipantRecord(
                agent_id=agent, num_samples=None, train_loss=None, bytes_up=1000, stage="masked"
            )
            for agent in ("site-a", "site-b")
        ],
    )
    store.begin_round(round=3, base_digest=model.digest, selected=2, min_participants=2)


def _child_of(genesis: ModelRecord) -> ModelRecord:
    spec = genesis.decode_spec()
    weights = initial_weights(spec, np.random.default_rng(1))
    return ModelRecord.from_weights(
        round=1, parent_digest=genesis.digest, spec=spec, weights=weights
    )


def _table_rows(output: str, first_column: str) -> list[list[str]]:
    """The data rows of the text table whose header starts with ``first_column``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_column])
    rows: list[list[str]] = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


@on_disk_stores
def test_rounds_lists_the_aggregation_of_each_round(coordinator: Coordinator) -> None:
    result = coordinator.run()
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split()
    assert header[:3] == ["round", "status", "aggregation"]
    rows = _table_rows(result.output, "round")
    assert [row[:3] for row in rows] == [
        ["3", "running", "plaintext"],
        ["2", "aborted", "secagg"],
        ["1", "completed", "plaintext"],
    ]
    listed = json.loads(coordinator.run("--json", "--limit", "2").output)
    assert [(r["round"], r["aggregation"]) for r in listed] == [(3, "plaintext"), (2, "secagg")]
    assert listed[1]["threshold"] == 3


@on_disk_stores
def test_rounds_detail_shows_parameters_and_stage_table(coordinator: Coordinator) -> None:
    result = coordinator.run("--detail", "2")
    assert result.exit_code == 0, result.output
    fields = {
        label.strip(): value.strip()
        for label, value in (
            (line[:19], line[19:]) for line in result.output.splitlines() if line.startswith("  ")
        )
    }
    assert fields["status"] == "aborted"
    assert fields["aggregation"] == "secagg"
    assert (fields["threshold"], fields["degree"], fields["word bits"]) == ("3", "4", "32")
    assert fields["participants"] == "2"
    assert fields["train loss"] == "-"
    assert fields["reason"] == "2 masked inputs, threshold 3"
    assert result.output.splitlines()[0] == "round 2"
    header = next(line for line in result.output.splitlines() if line.startswith("stage"))
    assert header.split() == [
        "stage",
        "expected",
        "received",
        "dropped",
        "bytes_in",
        "bytes_out",
        "seconds",
    ]
    assert _table_rows(result.output, "stage") == [
        ["keys", "5", "5", "0", "5000", "15000", "0.7500"],
        ["shares", "5", "4", "1", "4000", "15000", "0.7500"],
        ["masked", "5", "2", "3", "2000", "15000", "0.7500"],
    ]


@on_disk_stores
def test_rounds_detail_json_has_the_same_content(coordinator: Coordinator) -> None:
    result = coordinator.run("--detail", "2", "--json")
    assert result.exit_code == 0, result.output
    detail: dict[str, Any] = json.loads(result.output)
    assert detail["round"] == 2
    assert detail["status"] == "aborted"
    assert detail["aggregation"] == "secagg"
    assert (detail["threshold"], detail["graph_degree"], detail["word_bits"]) == (3, 4, 32)
    assert detail["mean_train_loss"] is None
    assert [
        (s["stage"], s["expected"], s["received"], s["dropped"], s["bytes_in"], s["bytes_out"])
        for s in detail["stages"]
    ] == [
        ("keys", 5, 5, 0, 5000, 15000),
        ("shares", 5, 4, 1, 4000, 15000),
        ("masked", 5, 2, 3, 2000, 15000),
    ]
    assert all(s["seconds"] == 0.75 and s["recorded_at"] for s in detail["stages"])
    assert [s["stage"] for s in detail["stages"]] == list(SECAGG_STAGES[:3])


@on_disk_stores
def test_rounds_detail_of_a_plaintext_round(coordinator: Coordinator) -> None:
    result = coordinator.run("--detail", "1")
    assert result.exit_code == 0, result.output
    assert "aggregation       plaintext" in result.output
    assert "threshold         -" in result.output
    assert _table_rows(result.output, "stage") == [
        ["update", "2", "2", "0", "80000", "82000", "3.5000"]
    ]
    detail = json.loads(coordinator.run("--detail", "1", "--json").output)
    assert detail["threshold"] is None
    assert detail["mean_train_loss"] == 0.3125
    assert [s["stage"] for s in detail["stages"]] == ["update"]


@on_disk_stores
def test_rounds_detail_of_a_round_without_stages(coordinator: Coordinator) -> None:
    result = coordinator.run("--detail", "3")
    assert result.exit_code == 0, result.output
    assert "no stages recorded" in result.output
    assert json.loads(coordinator.run("--detail", "3", "--json").output)["stages"] == []


@on_disk_stores
@pytest.mark.parametrize("as_json", [False, True])
def test_rounds_detail_of_an_unknown_round_exits_not_found(
    coordinator: Coordinator, as_json: bool
) -> None:
    result = coordinator.run("--detail", "42", *(["--json"] if as_json else []))
    assert result.exit_code == ExitCode.NOT_FOUND
    assert int(ExitCode.NOT_FOUND) == 7
    assert "round 42 not found" in result.output


def test_rounds_without_config_exits_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--state-dir", str(tmp_path / "none"), "rounds", "--detail", "1"]
    )
    assert result.exit_code == ExitCode.CONFIG


def test_rounds_help_documents_detail_and_exit_codes() -> None:
    result = CliRunner().invoke(main, ["rounds", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output
    assert "--detail N" in result.output
    assert "rounds --detail 12 --json" in result.output
    assert "7 round N does not exist" in result.output
    assert "7 not found" in EXIT_CODES_HELP
    assert "7 not found" in CliRunner().invoke(main, ["--help"]).output
    assert sorted(int(code) for code in ExitCode) == list(range(9))


@pytest.mark.parametrize(
    "args",
    [
        ["rounds", "--limit", str(10**30)],
        ["rounds", "--limit", "-1"],
        ["rounds", "--detail", str(2**31)],
        ["rounds", "--detail", "-1"],
        ["decisions", "--limit", "-1"],
        ["decisions", "--limit", str(10**30)],
        ["decisions", "--votes", str(2**31)],
        ["events", "--limit", str(10**30)],
        ["serve", "--rounds", "0"],
        ["serve", "--rounds", "-1"],
    ],
)
def test_numbers_the_store_cannot_take_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    """Out of 1..2**63-1 for a row limit, 0..2**31-1 for a round or height (a 32-bit
    column on PostgreSQL): a usage error before the store is opened, not an OverflowError
    from the SQL driver or a store error that only one backend gives."""
    result = CliRunner().invoke(main, ["--state-dir", str(tmp_path / "none"), *args])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert f"Invalid value for '{args[1]}'" in result.output
    limit = "2147483647" if args[1] in ("--detail", "--votes") else "9223372036854775807"
    assert limit in result.output


def test_a_relative_sqlite_path_is_stored_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored as given, `sqlite:///coord/coordinator.db` named another file (or a new, empty
    store) whenever a command ran from another directory."""
    monkeypatch.chdir(tmp_path)
    init = CliRunner().invoke(
        main,
        ["--state-dir", "coord", "init", "--cloud", "c1", "--db", "sqlite:///coord/c.db", "--json"],
    )
    assert init.exit_code == 0, init.output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    status = CliRunner().invoke(main, ["--state-dir", str(tmp_path / "coord"), "status", "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["database_url"] == f"sqlite:///{tmp_path / 'coord' / 'c.db'}"
    assert not (elsewhere / "coord").exists()


@on_disk_stores
def test_status_shows_a_running_round_without_a_participant_count(
    coordinator: Coordinator,
) -> None:
    """Round 3 runs: how many take part is not known until it closes; `status` says `-`
    (JSON: null), not Python's None."""
    shown = CliRunner().invoke(main, ["--state-dir", str(coordinator.state_dir), "status"])
    assert shown.exit_code == 0, shown.output
    assert "last round 3: running, participants -/2" in shown.output
    assert "None" not in shown.output
    data = CliRunner().invoke(main, ["--state-dir", str(coordinator.state_dir), "status", "--json"])
    last = json.loads(data.stdout)["last_round"]
    assert (last["participants"], last["selected"]) == (None, 2)


@on_disk_stores
def test_status_warns_when_the_consensus_journal_is_ahead_of_the_store(
    coordinator: Coordinator,
) -> None:
    """A store restored from a copy older than consensus-state.msgpack: serve reports
    consensus height 5 while the store has decided nothing; status says what happened
    (it used to show the height and nothing else)."""
    live = {"height": 5, "round": 0, "step": "propose", "updated": time.time(), "peers": []}
    (coordinator.state_dir / "federation-status.json").write_text(json.dumps(live))
    shown = CliRunner().invoke(main, ["--state-dir", str(coordinator.state_dir), "status"])
    assert shown.exit_code == 0, shown.output
    assert "decided    no height yet" in shown.output
    assert "the consensus journal is at height 5, past the store's last decided" in shown.output
    data = CliRunner().invoke(main, ["--state-dir", str(coordinator.state_dir), "status", "--json"])
    assert json.loads(data.stdout)["consensus"]["journal_ahead_of_store"] is True
    live["height"] = 1  # deciding the first height: as it should be
    (coordinator.state_dir / "federation-status.json").write_text(json.dumps(live))
    calm = CliRunner().invoke(main, ["--state-dir", str(coordinator.state_dir), "status"])
    assert "journal is at height" not in calm.output
