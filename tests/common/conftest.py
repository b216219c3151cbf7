"""Options of the tests in tests/common.

``--consensus-schedules N`` sets how many random schedules the consensus simulation runs
(``pytest tests/common/test_consensus_simulation.py --consensus-schedules 20000``); its
counts are printed in the terminal summary.
"""

from __future__ import annotations

import pytest

DEFAULT_CONSENSUS_SCHEDULES = 3000
CONSENSUS_REPORT = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--consensus-schedules",
        type=int,
        default=DEFAULT_CONSENSUS_SCHEDULES,
        help="random schedules of the consensus simulation "
        f"(default {DEFAULT_CONSENSUS_SCHEDULES})",
    )


@pytest.fixture
def consensus_schedules(pytestconfig: pytest.Config) -> int:
    count = pytestconfig.getoption("--consensus-schedules", default=DEFAULT_CONSENSUS_SCHEDULES)
    return int(count)


@pytest.fixture
def consensus_report(pytestconfig: pytest.Config) -> list[str]:
    """Lines for the terminal summary (shown even when output is captured)."""
    return pytestconfig.stash.setdefault(CONSENSUS_REPORT, [])


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    lines = config.stash.get(CONSENSUS_REPORT, [])
    if lines:
        terminalreporter.section("consensus simulation")
        for line in lines:
            terminalreporter.write_line(line)
