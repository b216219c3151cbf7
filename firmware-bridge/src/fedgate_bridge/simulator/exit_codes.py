"""Exit codes of ``fedgate-bridge simulate``, one line each in its ``--help``.

They use the numbers fedgate's other commands use for the same failure kinds (0 ok,
2 usage, 3 configuration) and add 7 for a simulator that fails while it runs.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["EXIT_CODES_HELP", "SimulateExitCode"]


class SimulateExitCode(IntEnum):
    OK = 0  # stopped by SIGTERM/SIGINT, or --hours reached
    USAGE = 2  # bad command line (click)
    CONFIG = 3  # bad fault spec, mode, sample period, topic prefix or config path
    SIMULATOR_FAILED = 7  # tep-studio missing, a port in use, the plant tripped or diverged


EXIT_CODES_HELP = """\b
Exit codes:
  0 stopped (SIGTERM/SIGINT) or --hours reached
  2 bad command line
  3 bad fault spec, mode, sample period, topic prefix or --write-bridge-config path
  7 simulator failed: tep-studio not installed, port in use, plant shut down"""
