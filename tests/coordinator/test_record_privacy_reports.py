"""The check of agents' record-level privacy reports, and the ledger row each becomes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import msgspec
import numpy as np
import pytest
from fedgate_common.arrays import encode_array
from fedgate_common.errors import MalformedMessage, NonFiniteValues
from fedgate_common.messages import MaskedInput, RecordPrivacyReport, SurvivorConfirmation
from fedgate_coordinator.config import CoordinatorConfig
from fedgate_coordinator.record_privacy_reports import decrease_detail, record_privacy_entry
from fedgate_coordinator.service import CoordinatorService, ensure_genesis
from fedgate_coordinator.store import RECORD_UNIT, PrivacyLedgerEntry, Store

from tests.federation_support import one_cloud

REPORT = RecordPrivacyReport(
    epsilon_round=0.5,
    epsilon_total=1.25,
    target_epsilon=3.0,
    delta=1e-5,
    noise_multiplier=3.9,
    max_grad_norm=1.0,
    accountant="rdp (opacus.accountants.RDPAccountant)",
)


def masked(report: RecordPrivacyReport | None) -> MaskedInput:
    words = encode_array("words", np.zeros(4, np.uint32))
    return MaskedInput(round=7, roster_digest=b"r" * 32, words=words, record_privacy=report)


def test_a_masked_input_with_a_report_becomes_a_record_row() -> None:
    entry = record_privacy_entry("gw-3", masked(REPORT))
    assert entry is not None
    assert (entry.round, entry.unit, entry.agent) == (7, RECORD_UNIT, "gw-3")
    assert (entry.epsilon_round, entry.epsilon_total, entry.target_epsilon) == (0.5, 1.25, 3.0)
    assert (entry.delta, entry.noise_multiplier, entry.clip_norm) == (1e-5, 3.9, 1.0)
    assert entry.effective_noise_multiplier == 3.9
    assert (entry.count_noise, entry.min_inputs, entry.inputs) == (0.0, 0, 0)
    assert entry.accountant == REPORT.accountant


def test_messages_without_a_report_book_nothing() -> None:
    assert record_privacy_entry("gw-3", masked(None)) is None
    confirmation = SurvivorConfirmation(round=7, roster_digest=b"r" * 32, survivors=("gw-3",))
    assert record_privacy_entry("gw-3", confirmation) is None


def test_a_masked_input_without_a_report_encodes_without_the_field() -> None:
    """Agents without record-level DP send what coordinators before reports accepted."""
    encoded = msgspec.msgpack.decode(msgspec.msgpack.encode(masked(None)))
    assert "record_privacy" not in encoded
    assert "record_privacy" in msgspec.msgpack.decode(msgspec.msgpack.encode(masked(REPORT)))


@pytest.mark.parametrize("field", ["epsilon_total", "delta", "noise_multiplier"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_numbers_are_refused(field: str, value: float) -> None:
    bad = msgspec.structs.replace(REPORT, **{field: value})
    with pytest.raises(NonFiniteValues, match=field) as caught:
        record_privacy_entry("gw-3", masked(bad))
    assert caught.value.sender == "gw-3"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"epsilon_round": -0.1}, "epsilon_round < 0"),
        ({"epsilon_total": 0.25}, "epsilon_total < epsilon_round"),
        ({"delta": 0.0}, "delta outside (0, 1)"),
        ({"delta": 1.0}, "delta outside (0, 1)"),
        ({"target_epsilon": 0.0}, "target_epsilon <= 0"),
        ({"noise_multiplier": -1.0}, "noise_multiplier <= 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm <= 0"),
        ({"accountant": " "}, "accountant must be"),
        ({"accountant": "x" * 201}, "accountant must be"),
    ],
)
def test_reports_no_accountant_could_write_are_refused(
    changes: dict[str, object], fragment: str
) -> None:
    bad = msgspec.structs.replace(REPORT, **changes)
    with pytest.raises(MalformedMessage, match="record privacy report") as caught:
        record_privacy_entry("gw-3", masked(bad))
    assert fragment in str(caught.value)
    assert caught.value.sender == "gw-3"


def test_a_report_past_its_own_target_is_booked_as_reported() -> None:
    """Self-reported: the ledger shows an agent over its budget rather than hiding it."""
    over = msgspec.structs.replace(REPORT, epsilon_total=4.0)
    entry = record_privacy_entry("gw-3", masked(over))
    assert entry is not None
    assert entry.epsilon_total > entry.target_epsilon


def _entry(round: int, epsilon_total: float, **changes: float | str) -> PrivacyLedgerEntry:
    report = msgspec.structs.replace(REPORT, epsilon_total=epsilon_total, **changes)
    entry = record_privacy_entry("gw-3", masked(report))
    assert entry is not None
    return dataclasses.replace(entry, round=round)


def test_a_report_below_an_earlier_one_is_explained() -> None:
    detail = decrease_detail(_entry(8, 4.397), _entry(9, 3.6568))
    assert detail.startswith(
        "agent gw-3 reported ε 3.6568 for its run in round 9, below the 4.3970 it reported "
        "in round 8: its privacy state (privacy.json) was probably restored"
    )
    changed = decrease_detail(_entry(8, 4.397), _entry(9, 3.6568, delta=1e-4))
    assert "its settings changed (delta 1e-05 -> 0.0001)" in changed


def test_a_report_at_or_above_the_highest_is_not_flagged() -> None:
    assert decrease_detail(None, _entry(1, 0.5)) == ""
    assert decrease_detail(_entry(1, 0.5), _entry(2, 0.5)) == ""
    assert decrease_detail(_entry(1, 0.5), _entry(2, 0.75)) == ""


def test_the_coordinator_books_a_falling_report_and_records_an_event(tmp_path: Path) -> None:
    """What serve does with each report: the lower one is kept as sent, an event says why,
    and one fall is one event (not one per round until ε climbs back)."""
    config = CoordinatorConfig(
        deployment="plant-a", cloud="c1", database_url=f"sqlite:///{tmp_path / 'c.db'}"
    )
    with Store.open(config.database_url) as store:
        service = CoordinatorService(config=config, store=store, **one_cloud(config, tmp_path))
        genesis = ensure_genesis(store, config, service.manifest.manifest, tmp_path)
        for number in (1, 2, 3, 4):
            store.begin_round(
                round=number, base_digest=genesis.digest, selected=1, min_participants=1
            )
        # Up, then down (a restore), then up again but still below the highest.
        for number, epsilon in ((1, 1.5), (2, 2.25), (3, 0.75), (4, 1.0)):
            service._book_record_privacy(_entry(number, epsilon))

        booked = [e.epsilon_total for e in store.privacy_ledger(RECORD_UNIT)]
        assert booked == [1.5, 2.25, 0.75, 1.0]
        latest = store.latest_privacy_entry(RECORD_UNIT, "gw-3")
        assert latest is not None
        assert (latest.round, latest.epsilon_total) == (4, 1.0)
        events = [e for e in store.list_events() if e.kind == "record_epsilon_decreased"]
        assert [(e.round, e.agent_id) for e in events] == [(3, "gw-3")]  # one fall, one event
        assert "below the 2.2500 it reported in round 2" in events[0].detail
