"""`fedgate-coordinator privacy` and the privacy line of `status`.

Runs the real command line (click's runner) against a store initialised by `init`, on a
SQLite file and on PostgreSQL; [privacy] is switched on in coordinator.toml as an operator
would, and the ledger is written through the store as `serve` would, with ε from the real
accountant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import nacl.signing
import numpy as np
import pytest
from click.testing import CliRunner, Result
from fedgate_common.keys import public_key_text
from fedgate_common.model_spec import initial_weights
from fedgate_coordinator.cli import SITE_LEVEL_OFF, ExitCode, main
from fedgate_coordinator.config import load_config, validate, write_config
from fedgate_coordinator.site_privacy import (
    ACCOUNTANT,
    SAMPLING,
    UNIT,
    SitePrivacySettings,
    epsilon,
    pooled_epsilon,
    pooled_record_sigma,
)
from fedgate_coordinator.store import (
    POOLED_UNIT,
    RECORD_UNIT,
    SITE_UNIT,
    ModelRecord,
    PrivacyLedgerEntry,
    Store,
)

from tests.federation_support import add_genesis

if TYPE_CHECKING:
    from tests.coordinator.conftest import StoreBackend

DELTA = 1e-5
TARGET = 8.0
NOISE_MULTIPLIER = 1.5
EFFECTIVE = 1.4375
CLIP_NORM = 2.5
SECAGG: dict[str, Any] = {
    "aggregation": "secagg",
    "threshold": 2,
    "graph_degree": 2,
    "word_bits": 32,
}


@dataclass(frozen=True)
class Coordinator:
    """An initialised state directory and the store it points at."""

    state_dir: Path
    database_url: str

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["--state-dir", str(self.state_dir), *args])

    def configure_privacy(self, **settings: Any) -> None:
        """Rewrite [privacy] in coordinator.toml (site-level DP needs 32-bit secagg words)."""
        config = load_config(self.state_dir)
        changed = msgspec.structs.replace(
            config,
            privacy=SitePrivacySettings(**settings),
            secagg=msgspec.structs.replace(config.secagg, word_bits=32),
        )
        assert validate(changed) == []
        write_config(self.state_dir, changed)


# The command line reopens the store in every call: in-memory SQLite cannot take part.
on_disk_stores = pytest.mark.parametrize(
    "store_backend", ["sqlite-file", "postgresql"], indirect=True
)


@pytest.fixture
def coordinator(store_backend: StoreBackend, tmp_path: Path) -> Coordinator:
    """`init` run against a fresh store; site-level DP still off, nothing recorded."""
    state_dir = tmp_path / "coord"
    init = CliRunner().invoke(
        main, ["--state-dir", str(state_dir), "init", "--cloud", "c1", "--db", store_backend.url]
    )
    assert init.exit_code == 0, init.output
    add_genesis(state_dir, store_backend.url)  # what the first `serve` does
    return Coordinator(state_dir, store_backend.url)


def _child_of(parent: ModelRecord, round: int) -> ModelRecord:
    spec = parent.decode_spec()
    weights = initial_weights(spec, np.random.default_rng(round))
    return ModelRecord.from_weights(
        round=round, parent_digest=parent.digest, spec=spec, weights=weights
    )


def _run_rounds(store: Store, count: int, *, ledger: bool = True) -> None:
    """``count`` completed secagg rounds after the head, each with a ledger entry if
    ``ledger``; ε of each comes from the accountant at the effective multiplier."""
    head = store.head_model()
    assert head is not None
    before = store.privacy_ledger(SITE_UNIT)
    spent = [entry.effective_noise_multiplier for entry in before]
    for _ in range(count):
        round = store.next_round_number()
        store.begin_round(
            round=round, base_digest=head.digest, selected=3, min_participants=2, **SECAGG
        )
        store.set_round_clip(round, clip_norm=CLIP_NORM, within_clip=0.625)
        if ledger:
            spent.append(EFFECTIVE)
            store.record_privacy(
                PrivacyLedgerEntry(
                    round=round,
                    unit=SITE_UNIT,
                    accountant=ACCOUNTANT,
                    delta=DELTA,
                    noise_multiplier=NOISE_MULTIPLIER,
                    effective_noise_multiplier=EFFECTIVE,
                    clip_norm=CLIP_NORM,
                    count_noise=0.15,
                    min_inputs=2,
                    inputs=3,
                    epsilon_round=epsilon([EFFECTIVE], DELTA),
                    epsilon_total=epsilon(spent, DELTA),
                    target_epsilon=TARGET,
                )
            )
        head = _child_of(head, round)
        store.complete_round(
            round=round, participants=[], model=head, mean_train_loss=None, bytes_down_per_agent=1
        )


@pytest.fixture
def private(coordinator: Coordinator) -> Coordinator:
    """Site-level DP on (ε 8 at δ 1e-5); rounds 1 and 2 completed and in the ledger, round 3
    running (its sum not yet released, so not in the ledger)."""
    coordinator.configure_privacy(
        site_level="on",
        target_epsilon=TARGET,
        delta=DELTA,
        planned_rounds=20,
        noise_multiplier=NOISE_MULTIPLIER,
    )
    with Store.open(coordinator.database_url) as store:
        _run_rounds(store, 2)
        head = store.head_model()
        assert head is not None
        store.begin_round(round=3, base_digest=head.digest, selected=3, min_participants=2)
    return coordinator


def _fields(output: str) -> dict[str, str]:
    """The ``label  value`` lines before the first blank line."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        if not line.strip():
            break
        fields[line[:17].strip()] = line[18:].strip()
    return fields


def _table(output: str) -> tuple[str, list[list[str]]]:
    """The header line and data rows of the table that follows the ``----`` rule."""
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("-----"))
    return lines[rule - 1], [line.split() for line in lines[rule + 1 :] if line.strip()]


def _f(value: float) -> str:
    return f"{value:.4f}"


@on_disk_stores
def test_privacy_shows_the_budget_and_one_line_per_round(private: Coordinator) -> None:
    result = private.run("privacy")

    assert result.exit_code == 0, result.output
    one, two = epsilon([EFFECTIVE], DELTA), epsilon([EFFECTIVE] * 2, DELTA)
    assert 0 < one < two < TARGET
    assert _fields(result.output) == {
        "unit of privacy": UNIT,
        "site-level DP": "on",
        "accountant": ACCOUNTANT,
        "sampling": SAMPLING,
        "δ": "1e-05",
        "target ε": "8 over 20 planned rounds",
        "rounds recorded": "2",
        "ε spent": _f(two),
        "budget left": _f(TARGET - two),
    }
    assert "note:" not in result.output
    header, rows = _table(result.output)
    assert header.split("  ")[0] == "round"
    for column in ("inputs", "noise multiplier", "effective multiplier", "clip norm"):
        assert column in header
    assert "ε this round" in header
    assert header.rstrip().endswith("ε total")
    assert rows == [
        ["1", "3", "1.5000", "1.4375", "2.5000", _f(one), _f(one)],
        ["2", "3", "1.5000", "1.4375", "2.5000", _f(one), _f(two)],
    ]


@on_disk_stores
def test_privacy_json_is_settings_and_rows(private: Coordinator) -> None:
    result = private.run("privacy", "--json")

    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    assert list(data) == [
        "settings",
        "rounds_recorded",
        "epsilon_spent",
        "epsilon_spent_recorded",
        "budget_left",
        "unrecorded_rounds",
        "record_warning",
        "warning",
        "rows",
        "record_level",
    ]
    assert data["record_level"] == {
        "agents": [],
        "rows": [],
        # Pooled noise off and nothing booked: no count of it at all.
        "pooled": {
            "rounds_recorded": 0,
            "epsilon_spent": None,
            "target_epsilon": 3.0,
            "budget_left": None,
            "sample_rate": 0.7,
            "rows": [],
        },
    }
    assert data["settings"] == {
        "site_level": "on",
        "unit": UNIT,
        "accountant": ACCOUNTANT,
        "sampling": SAMPLING,
        "delta": DELTA,
        "target_epsilon": TARGET,
        "planned_rounds": 20,
        "noise_multiplier": NOISE_MULTIPLIER,
        # Pooled record-level noise is off: its settings, and no σ sized.
        "record_level": "off",
        "record_epsilon": 3.0,
        "record_clip_norm": 1.0,
        "record_sample_rate": 0.7,
        "record_noise_multiplier": None,
    }
    two = epsilon([EFFECTIVE] * 2, DELTA)
    assert data["rounds_recorded"] == 2
    assert data["epsilon_spent"] == pytest.approx(two)
    assert data["budget_left"] == pytest.approx(TARGET - two)
    assert data["unrecorded_rounds"] == 0
    rows = data["rows"]
    assert [row["round"] for row in rows] == [1, 2]
    assert list(rows[0]) == [
        "round",
        "unit",
        "accountant",
        "delta",
        "noise_multiplier",
        "effective_noise_multiplier",
        "clip_norm",
        "count_noise",
        "min_inputs",
        "inputs",
        "epsilon_round",
        "epsilon_total",
        "target_epsilon",
        "recorded_at",
        "agent",
    ]
    assert rows[1]["epsilon_total"] == data["epsilon_spent"]
    assert (rows[0]["unit"], rows[0]["inputs"], rows[0]["min_inputs"]) == ("site", 3, 2)
    assert (rows[0]["effective_noise_multiplier"], rows[0]["count_noise"]) == (EFFECTIVE, 0.15)
    assert all(row["recorded_at"] for row in rows)


def _report(round: int, agent: str, epsilon_total: float) -> PrivacyLedgerEntry:
    """An agent's record-level report as the coordinator books it."""
    return PrivacyLedgerEntry(
        round=round,
        unit=RECORD_UNIT,
        agent=agent,
        accountant="rdp (opacus.accountants.RDPAccountant)",
        delta=DELTA,
        noise_multiplier=3.90625,
        effective_noise_multiplier=3.90625,
        clip_norm=1.0,
        count_noise=0.0,
        min_inputs=0,
        inputs=0,
        epsilon_round=0.5,
        epsilon_total=epsilon_total,
        target_epsilon=3.0,
    )


@on_disk_stores
def test_privacy_shows_each_agents_last_record_level_report(private: Coordinator) -> None:
    with Store.open(private.database_url) as store:
        store.record_privacy(_report(1, "gw-2", 0.5))
        store.record_privacy(_report(1, "gw-1", 0.5))
        store.record_privacy(_report(2, "gw-1", 0.875))

    result = private.run("privacy")

    assert result.exit_code == 0, result.output
    site, record = result.output.split("record level, as the agents report it")
    assert "ε spent" in site  # the site-level part is unchanged
    _, rows = _table(record)
    assert rows == [
        ["gw-1", "2", "2", "0.8750", "3", "1e-05", "3.9062", "1.0000"],
        ["gw-2", "1", "1", "0.5000", "3", "1e-05", "3.9062", "1.0000"],
    ]
    data = json.loads(private.run("privacy", "--json").output)
    agents = data["record_level"]["agents"]
    assert [(a["agent"], a["last_round"], a["rounds_reported"]) for a in agents] == [
        ("gw-1", 2, 2),
        ("gw-2", 1, 1),
    ]
    assert agents[0]["epsilon_total"] == 0.875
    assert agents[0]["budget_left"] == pytest.approx(2.125)
    assert agents[0]["accountant"].startswith("rdp")
    assert [(r["round"], r["agent"]) for r in data["record_level"]["rows"]] == [
        (1, "gw-1"),
        (1, "gw-2"),
        (2, "gw-1"),
    ]
    assert [r["unit"] for r in data["rows"]] == ["site", "site"]  # site rows stay apart
    status = private.run("status")
    assert status.exit_code == 0, status.output
    assert (
        "           record-level: ε reported by 2 agent(s); largest 0.8750 of 3 (gw-1)"
        in status.output.splitlines()
    )
    reporting = json.loads(private.run("status", "--json").output)["record_level_privacy"]
    assert reporting == agents


@on_disk_stores
def test_privacy_shows_the_highest_report_when_a_later_one_falls(private: Coordinator) -> None:
    """An agent restored from an older copy reports less: nothing is spent back."""
    with Store.open(private.database_url) as store:
        store.record_privacy(_report(1, "gw-1", 0.5))
        store.record_privacy(_report(2, "gw-1", 0.875))
        store.record_privacy(_report(3, "gw-1", 0.5))

    result = private.run("privacy")

    assert result.exit_code == 0, result.output
    _, record = result.output.split("record level, as the agents report it")
    _, rows = _table(record)
    assert rows[0][:4] == ["gw-1", "3", "3", "0.8750"]
    assert (
        "note: gw-1 last reported ε 0.5000 (round 3), below the 0.8750 of round 2 shown"
        in result.output
    )
    agent = json.loads(private.run("privacy", "--json").output)["record_level"]["agents"][0]
    assert (agent["epsilon_total"], agent["highest_round"]) == (0.875, 2)
    assert (agent["epsilon_total_last"], agent["last_round"]) == (0.5, 3)
    assert agent["budget_left"] == pytest.approx(2.125)


@on_disk_stores
def test_privacy_with_site_level_off_and_an_empty_ledger_says_so(
    coordinator: Coordinator,
) -> None:
    with Store.open(coordinator.database_url) as store:
        _run_rounds(store, 1, ledger=False)

    result = coordinator.run("privacy")

    assert result.exit_code == 0, result.output
    assert result.output.strip() == SITE_LEVEL_OFF
    assert result.output.strip() == (
        "site-level DP is off: no site-level guarantee; "
        "record-level ε is kept by each agent: fedgate-agent privacy"
    )
    data = json.loads(coordinator.run("privacy", "--json").output)
    assert data["settings"]["site_level"] == "off"
    assert (data["epsilon_spent"], data["budget_left"], data["rows"]) == (None, None, [])
    assert data["unrecorded_rounds"] == 1


@on_disk_stores
def test_privacy_on_with_nothing_recorded_yet(coordinator: Coordinator) -> None:
    coordinator.configure_privacy(site_level="on")

    result = coordinator.run("privacy")

    assert result.exit_code == 0, result.output
    fields = _fields(result.output)
    assert (fields["rounds recorded"], fields["ε spent"], fields["budget left"]) == (
        "0",
        "0.0000",
        "8.0000",
    )
    assert "no rounds recorded yet" in result.output
    data = json.loads(coordinator.run("privacy", "--json").output)
    assert (data["epsilon_spent"], data["budget_left"], data["rows"]) == (0.0, 8.0, [])


@on_disk_stores
def test_privacy_warns_when_the_federation_is_too_small(coordinator: Coordinator) -> None:
    """Six agents and the TEP model: the noise would be ~70 times a site's largest update."""
    coordinator.configure_privacy(site_level="on")
    store = Store.open(coordinator.database_url)
    try:
        for index in range(6):
            key = public_key_text(nacl.signing.SigningKey.generate().verify_key)
            store.enroll_agent(f"site-{index}", key)
    finally:
        store.close()

    result = coordinator.run("privacy")

    assert result.exit_code == 0, result.output
    assert "warning: the federation is too small for site-level DP" in result.output
    assert "with 6 sites" in result.output
    data = json.loads(coordinator.run("privacy", "--json").output)
    assert data["warning"].startswith("the federation is too small")
    status = coordinator.run("status")
    assert status.exit_code == 0, status.output
    assert "warning: the federation is too small for site-level DP" in status.output
    shown = json.loads(coordinator.run("status", "--json").stdout)
    assert shown["privacy"]["warning"] == data["warning"]


@on_disk_stores
def test_a_pooled_budget_no_noise_meets_is_a_warning_in_the_read_only_views(
    coordinator: Coordinator,
) -> None:
    """record_epsilon 0.01 over 1,000 rounds at sampling rate 1: no σ up to 10⁴ fits. serve
    refuses to start with it (exit 3); privacy and status show it and what to change, and
    exit 0, as they do for the site-level warning."""
    config = load_config(coordinator.state_dir)
    write_config(
        coordinator.state_dir,
        msgspec.structs.replace(
            config,
            privacy=SitePrivacySettings(
                record_level="pooled",
                record_epsilon=0.01,
                record_sample_rate=1.0,
                planned_rounds=1000,
            ),
            secagg=msgspec.structs.replace(config.secagg, word_bits=32),
            rounds=msgspec.structs.replace(config.rounds, local_epochs=1),
        ),
    )
    shown = coordinator.run("privacy")
    assert shown.exit_code == 0, shown.output
    assert "warning: no noise multiplier up to 10000 keeps 1000 rounds" in shown.output
    assert "privacy.record_sample_rate" in shown.output
    data = json.loads(coordinator.run("privacy", "--json").stdout)
    assert data["settings"]["record_noise_multiplier"] is None
    assert data["record_warning"].startswith("no noise multiplier up to 10000")
    status = coordinator.run("status")
    assert status.exit_code == 0, status.output
    assert "warning: no noise multiplier up to 10000" in status.output


@on_disk_stores
def test_privacy_notes_what_the_numbers_do_not_cover(private: Coordinator) -> None:
    with Store.open(private.database_url) as store:
        store.abort_round(round=3, reason="stopped")
        _run_rounds(store, 1, ledger=False)
    # A smaller budget than the ledger was recorded against, and site-level DP off now.
    private.configure_privacy(site_level="off", target_epsilon=0.5, delta=DELTA)

    result = private.run("privacy")

    assert result.exit_code == 0, result.output
    two = epsilon([EFFECTIVE] * 2, DELTA)
    fields = _fields(result.output)
    assert fields["site-level DP"] == "off"
    assert fields["budget left"] == f"{_f(0.5 - two)} (over budget)"
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert len(notes) == 3
    assert "site-level DP is off now" in notes[0]
    assert "target 8; coordinator.toml now says δ 1e-05, target 0.5" in notes[1]
    assert notes[2].startswith("note: 1 completed rounds have no ledger entry")
    assert [row[0] for row in _table(result.output)[1]] == ["1", "2"]
    data = json.loads(private.run("privacy", "--json").output)
    assert data["unrecorded_rounds"] == 1
    assert data["budget_left"] == pytest.approx(0.5 - two)


@on_disk_stores
def test_a_changed_delta_counts_every_recorded_round_again(private: Coordinator) -> None:
    """The ledger's totals are at the δ of their rounds; spent and budget left are at the
    configured δ, as the budget check counts them."""
    private.configure_privacy(site_level="on", target_epsilon=TARGET, delta=1e-9)

    data = json.loads(private.run("privacy", "--json").output)

    at_new_delta = epsilon([EFFECTIVE] * 2, 1e-9)
    assert at_new_delta > epsilon([EFFECTIVE] * 2, DELTA)
    assert data["epsilon_spent"] == pytest.approx(at_new_delta)
    assert data["epsilon_spent_recorded"] == pytest.approx(epsilon([EFFECTIVE] * 2, DELTA))
    assert data["budget_left"] == pytest.approx(TARGET - at_new_delta)
    text = private.run("privacy").output
    assert _fields(text)["ε spent"] == _f(at_new_delta)
    assert "counted again at δ 1e-09, as the budget check counts it" in text
    status = private.run("status").output
    assert f"ε {_f(at_new_delta)} spent of {TARGET:g} at δ 1e-09" in status


@on_disk_stores
def test_status_shows_site_level_privacy(private: Coordinator) -> None:
    result = private.run("status")

    assert result.exit_code == 0, result.output
    two = epsilon([EFFECTIVE] * 2, DELTA)
    (line,) = [line for line in result.output.splitlines() if line.startswith("privacy")]
    assert (
        line == f"privacy    site-level on, ε {_f(two)} spent of 8 at δ 1e-05 (2 rounds recorded)"
    )
    data = json.loads(private.run("status", "--json").output)
    summary = data["privacy"]
    assert summary["settings"]["site_level"] == "on"
    assert summary["settings"]["target_epsilon"] == TARGET
    assert summary["epsilon_spent"] == pytest.approx(two)
    assert summary["rounds_recorded"] == 2
    assert "rows" not in summary
    assert data["last_round"]["round"] == 3
    assert data["last_round"]["clip_norm"] is None


@on_disk_stores
def test_status_with_site_level_off(coordinator: Coordinator) -> None:
    result = coordinator.run("status")

    assert result.exit_code == 0, result.output
    assert (
        "privacy    site-level off: no site-level guarantee (record-level ε: fedgate-agent privacy)"
        in result.output.splitlines()
    )
    summary = json.loads(coordinator.run("status", "--json").output)["privacy"]
    assert (summary["settings"]["site_level"], summary["epsilon_spent"]) == ("off", None)


@on_disk_stores
def test_rounds_detail_shows_the_clip(private: Coordinator) -> None:
    result = private.run("rounds", "--detail", "2")
    assert result.exit_code == 0, result.output
    assert "  clip norm         2.5" in result.output
    assert "  within clip       0.625" in result.output
    detail = json.loads(private.run("rounds", "--detail", "2", "--json").output)
    assert (detail["clip_norm"], detail["within_clip"]) == (2.5, 0.625)


def test_privacy_without_config_exits_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--state-dir", str(tmp_path / "none"), "privacy"])
    assert result.exit_code == ExitCode.CONFIG
    assert "run `fedgate-coordinator init` first" in result.output


@pytest.mark.parametrize("store_backend", ["sqlite-file"], indirect=True)
def test_privacy_with_an_unusable_store_exits_store(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    config = load_config(coordinator.state_dir)
    missing = f"sqlite:///{tmp_path / 'no-such-dir' / 'coordinator.db'}"
    write_config(coordinator.state_dir, msgspec.structs.replace(config, database_url=missing))
    for args in (["privacy"], ["privacy", "--json"]):
        result = coordinator.run(*args)
        assert result.exit_code == ExitCode.STORE, result.output
        assert result.output.startswith("error: ")


def test_privacy_help_has_an_example_and_exit_codes() -> None:
    result = CliRunner().invoke(main, ["privacy", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output
    assert "fedgate-coordinator privacy --json" in result.output
    assert "Exit codes: 0 shown, 3 config missing or invalid, 4 store error." in result.output
    assert "privacy" in CliRunner().invoke(main, ["--help"]).output


@on_disk_stores
def test_privacy_shows_the_coordinators_count_of_pooled_noise(
    coordinator: Coordinator,
) -> None:
    """Pooled record-level noise: the σ per window each released round carried, and ε of a
    window of a site in every round, as serve counts it (its budget check reads the same)."""
    config = load_config(coordinator.state_dir)
    pooled_config = msgspec.structs.replace(
        config,
        privacy=SitePrivacySettings(
            record_level="pooled", record_epsilon=3.0, record_sample_rate=0.5, planned_rounds=4
        ),
        secagg=msgspec.structs.replace(config.secagg, word_bits=32),
        rounds=msgspec.structs.replace(config.rounds, local_epochs=1),
    )
    assert validate(pooled_config) == []
    write_config(coordinator.state_dir, pooled_config)
    settings = pooled_config.privacy
    sigma = pooled_record_sigma(3.0, 1e-5, 0.5, 4)
    with Store.open(coordinator.database_url) as store:
        _run_rounds(store, 2, ledger=False)
        for round in (1, 2):
            store.record_privacy(
                PrivacyLedgerEntry(
                    round=round,
                    unit=POOLED_UNIT,
                    accountant="pld (dp_accounting.pld.PLDAccountant), poisson q=0.5",
                    delta=1e-5,
                    noise_multiplier=0.25,
                    effective_noise_multiplier=sigma,
                    clip_norm=1.0,
                    count_noise=0.0,
                    min_inputs=2,
                    inputs=3,
                    epsilon_round=pooled_epsilon(settings, [sigma]),
                    epsilon_total=pooled_epsilon(settings, [sigma] * round),
                    target_epsilon=3.0,
                )
            )

    result = coordinator.run("privacy")

    assert result.exit_code == 0, result.output
    pooled = result.output.split("record level      pooled in each secure sum")[1]
    spent = pooled_epsilon(settings, [sigma, sigma])
    assert 1.5 < spent < 3.0  # half the planned rounds: about half the budget, not more
    assert (
        f"ε spent           {spent:.4f} of 3 by this coordinator's count (2 rounds booked; "
        f"a site in every one), budget left {3.0 - spent:.4f}"
    ) in pooled.splitlines()
    header, rows = _table(pooled)
    assert header.split()[:3] == ["round", "inputs", "noise"]
    assert [row[:4] for row in rows] == [
        ["1", "3", "0.2500", _f(sigma)],
        ["2", "3", "0.2500", _f(sigma)],
    ]
    assert rows[1][-1] == _f(spent)
    data = json.loads(coordinator.run("privacy", "--json").stdout)["record_level"]["pooled"]
    assert data["epsilon_spent"] == pytest.approx(spent)
    assert data["budget_left"] == pytest.approx(3.0 - spent)
    assert [(r["round"], r["unit"]) for r in data["rows"]] == [(1, "pooled"), (2, "pooled")]
    assert data["target_epsilon"] == 3.0
    assert data["sample_rate"] == 0.5
    status = coordinator.run("status")
    assert status.exit_code == 0, status.output
    assert (
        f"           record-level, noise pooled: ε {spent:.4f} of 3 by this coordinator's "
        "count (2 rounds booked)"
    ) in status.output.splitlines()
    summary = json.loads(coordinator.run("status", "--json").stdout)["pooled_privacy"]
    assert summary["epsilon_spent"] == pytest.approx(spent)
    assert "rows" not in summary
    # A higher sampling rate configured since: the booked rounds are counted again at it.
    faster = msgspec.structs.replace(
        pooled_config, privacy=msgspec.structs.replace(settings, record_sample_rate=0.8)
    )
    write_config(coordinator.state_dir, faster)
    again = json.loads(coordinator.run("privacy", "--json").stdout)["record_level"]["pooled"]
    assert again["epsilon_spent"] == pytest.approx(pooled_epsilon(faster.privacy, [sigma] * 2))
    assert again["epsilon_spent"] > spent + 0.1
