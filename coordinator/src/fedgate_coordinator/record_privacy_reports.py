"""Agents' record-level privacy reports: checked, then kept as privacy-ledger rows (no IO).

An agent that trains with record-level DP-SGD attaches a
:class:`~fedgate_common.messages.RecordPrivacyReport` to its update or masked input: ε of
the round and of its whole run, at its δ, from its own accountant. The coordinator cannot
verify any of it (the training happened on the gateway); it checks that the numbers are
well formed, then books them per (round, agent) with unit :data:`RECORD_UNIT`, so the
ledger a data engineer reads shows both units. A run's ε never falls: a report below one
the agent sent before (its privacy state restored from an older backup, or reset) is
booked as sent and flagged (:func:`decrease_detail`); ``fedgate-coordinator privacy``
shows the highest. docs/privacy.md section 4.
"""

from __future__ import annotations

import math

from fedgate_common.errors import MalformedMessage, NonFiniteValues
from fedgate_common.messages import MaskedInput, ModelUpdate, Payload, RecordPrivacyReport

from fedgate_coordinator.store.records import RECORD_UNIT, PrivacyLedgerEntry

MAX_ACCOUNTANT_LENGTH = 200
# ε over a longer history is never below ε of one of its rounds; allow for float rounding.
_ROUND_TOLERANCE = 1e-9


def record_privacy_entry(sender: str, payload: Payload) -> PrivacyLedgerEntry | None:
    """The ledger row for the report ``payload`` carries (``None`` without one).

    Raises :class:`NonFiniteValues` or :class:`MalformedMessage` (with ``sender``) for a
    report no accountant could have produced, so the whole message is rejected before the
    round sees it.
    """
    if not isinstance(payload, MaskedInput | ModelUpdate) or payload.record_privacy is None:
        return None
    report = payload.record_privacy
    _check(sender, report)
    return PrivacyLedgerEntry(
        round=payload.round,
        unit=RECORD_UNIT,
        agent=sender,
        accountant=report.accountant,
        delta=report.delta,
        noise_multiplier=report.noise_multiplier,
        effective_noise_multiplier=report.noise_multiplier,
        clip_norm=report.max_grad_norm,
        count_noise=0.0,
        min_inputs=0,
        inputs=0,
        epsilon_round=report.epsilon_round,
        epsilon_total=report.epsilon_total,
        target_epsilon=report.target_epsilon,
    )


def decrease_detail(previous: PrivacyLedgerEntry | None, entry: PrivacyLedgerEntry) -> str:
    """Why ``entry`` (just booked) reports a lower ε for the run than ``previous``, the
    agent's report before it; "" when it does not. Compared with the previous report, not
    the highest, so that one fall is flagged once."""
    if previous is None or entry.epsilon_total >= previous.epsilon_total * (1 - _ROUND_TOLERANCE):
        return ""
    changed = [
        f"{name} {old!r} -> {new!r}"
        for name, old, new in (
            ("delta", previous.delta, entry.delta),
            ("accountant", previous.accountant, entry.accountant),
        )
        if old != new
    ]
    cause = (
        f"its settings changed ({', '.join(changed)})"
        if changed
        else "its privacy state (privacy.json) was probably restored from an older backup "
        "or reset; the rounds since that copy are missing from its own count"
    )
    return (
        f"agent {entry.agent} reported ε {entry.epsilon_total:.4f} for its run in round "
        f"{entry.round}, below the {previous.epsilon_total:.4f} it reported in round "
        f"{previous.round}: {cause}. The higher figure stays the one spent"
    )


def _check(sender: str, report: RecordPrivacyReport) -> None:
    numbers = {
        "epsilon_round": report.epsilon_round,
        "epsilon_total": report.epsilon_total,
        "target_epsilon": report.target_epsilon,
        "delta": report.delta,
        "noise_multiplier": report.noise_multiplier,
        "max_grad_norm": report.max_grad_norm,
    }
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise NonFiniteValues(f"record privacy report: {name} is {value}", sender=sender)
    problems = []
    if report.epsilon_round < 0:
        problems.append("epsilon_round < 0")
    if report.epsilon_total < report.epsilon_round * (1 - _ROUND_TOLERANCE):
        problems.append("epsilon_total < epsilon_round")
    if not 0 < report.delta < 1:
        problems.append("delta outside (0, 1)")
    for name in ("target_epsilon", "noise_multiplier", "max_grad_norm"):
        if numbers[name] <= 0:
            problems.append(f"{name} <= 0")
    if not report.accountant.strip() or len(report.accountant) > MAX_ACCOUNTANT_LENGTH:
        problems.append(f"accountant must be 1-{MAX_ACCOUNTANT_LENGTH} characters")
    if problems:
        raise MalformedMessage(f"record privacy report: {'; '.join(problems)}", sender=sender)
