"""Randomized simulation of the Tendermint core: Byzantine clouds, crashes, a lossy network
before GST (tests/common/consensus_sim.py). Every schedule must keep agreement, validity, no
honest double-signing and termination; a failure names its seed.

More schedules: ``pytest tests/common/test_consensus_simulation.py --consensus-schedules 20000``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fedgate_common.consensus.tendermint import (
    Action,
    ConsensusCore,
    ConsensusState,
    Persist,
    Timeout,
)

from tests.common.consensus_sim import (
    BYZANTINE_BEHAVIOURS,
    CLOUD_COUNTS,
    CoreFactory,
    ScheduleResult,
    Totals,
    run_schedule,
)


def failure_report(failures: list[ScheduleResult]) -> str:
    lines = [f"{len(failures)} schedule(s) broke an invariant:"]
    for result in failures[:10]:
        lines.append(result.describe())
        lines.extend(f"    {v}" for v in result.violations[:5])
    return "\n".join(lines)


@pytest.mark.slow
def test_random_schedules_keep_every_invariant(
    consensus_schedules: int, consensus_report: list[str]
) -> None:
    totals = Totals()
    failures: list[ScheduleResult] = []
    started = time.perf_counter()
    for seed in range(consensus_schedules):
        result = run_schedule(seed)
        totals.add(result)
        if not result.ok:
            failures.append(result)
    elapsed = time.perf_counter() - started
    report = f"{totals.report()}; {elapsed:.1f}s"
    print(report)
    consensus_report.append(report)
    assert not failures, failure_report(failures)
    # the schedules really exercised what they are meant to
    for clouds in CLOUD_COUNTS:
        assert totals.by_clouds[clouds] >= consensus_schedules // 6, totals.by_clouds
    assert totals.decisions >= consensus_schedules  # every height of every honest cloud
    for behaviour in BYZANTINE_BEHAVIOURS:
        assert totals.behaviours[f"cloud:{behaviour}"] > 0, behaviour
    assert totals.crashes > 0
    assert totals.crashes_after_persist > 0
    assert totals.decisions_without_content > 0
    assert totals.evidence > 0
    assert totals.forged_rejected > 0


def test_a_schedule_is_reproducible() -> None:
    first, again = run_schedule(12345), run_schedule(12345)
    assert first == again
    assert first.ok, first.describe()


# -- the checker fails on broken cores ---------------------------------------------------------


class AmnesiacCore(ConsensusCore):
    """Restarts without the votes and the lock its journal holds: it signs twice."""

    def __init__(self, *, state: ConsensusState | None = None, **kwargs: Any) -> None:
        if state is not None:
            state = ConsensusState(height=state.height, certificate=state.certificate)
        super().__init__(state=state, **kwargs)


class HastyCore(ConsensusCore):
    """Takes one precommit for a quorum: clouds decide different values."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._quorum = 1


class TrustingCore(ConsensusCore):
    """Judges every proposal valid."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, "is_valid": lambda proposal: True})


class TimelessCore(ConsensusCore):
    """Ignores its timers: a height whose messages were lost never ends."""

    def on_timeout(self, timeout: Timeout) -> list[Action]:
        return []


class EagerCore(ConsensusCore):
    """Broadcasts before persisting: a crash in between forgets what it sent."""

    def _finish(self, out: list[Action]) -> list[Action]:
        actions = super()._finish(out)
        return [a for a in actions if not isinstance(a, Persist)] + [
            a for a in actions if isinstance(a, Persist)
        ]


@pytest.mark.parametrize(
    ("factory", "clouds", "violation"),
    [
        (AmnesiacCore, None, "double-signing"),
        (HastyCore, None, "agreement"),
        (TrustingCore, 4, "validity"),
        (TimelessCore, None, "termination"),
        (EagerCore, None, "before persisting"),
    ],
)
def test_the_checker_catches_a_broken_core(
    factory: CoreFactory, clouds: int | None, violation: str
) -> None:
    for seed in range(300):
        result = run_schedule(seed, core_factory=factory, clouds=clouds)
        caught = [v for v in result.violations if violation in v]
        if caught:
            print(f"{factory.__name__}: {result.describe()}: {caught[0]}")
            return
    pytest.fail(f"no schedule of {factory.__name__} broke {violation!r}")
