"""What every fedgate-agent command shares: exit codes, the error guard, JSON output and
the ``--config`` option."""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

import click
from fedgate_common.click_support import echo_json, fail, several
from fedgate_common.errors import InvalidIdentifier, ManifestInvalid
from fedgate_common.instance_lock import AlreadyRunning, StateDirUnusable

from fedgate_agent.config import DEFAULT_CONFIG_PATH
from fedgate_agent.errors import ConfigError, IdentityExists, LocalDataError
from fedgate_agent.ingest.errors import IngestError
from fedgate_agent.privacy_ledger import LedgerUnreadable
from fedgate_agent.state import StatusUnreadable

__all__ = ["EXIT_CODES_HELP", "ExitCode", "config_option", "echo_json", "fail", "guard"]


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    DATA = 4
    CONFLICT = 5
    MANIFEST = 6
    NO_MODEL = 7


EXIT_CODES_HELP = """\b
Exit codes:
  0 success            1 unexpected failure     2 bad command line
  3 config invalid     4 data, buffer, import, status or privacy ledger unusable,
                         or another agent runs on state_dir (run)
  5 identity key exists (init) or output file exists (pretrain: use --force)
  6 federation manifest invalid
  7 no exported model yet (predict)"""

F = TypeVar("F", bound=Callable[..., Any])


def guard(func: F) -> F:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (
            LocalDataError,
            LedgerUnreadable,
            StatusUnreadable,
            IngestError,
            AlreadyRunning,
        ) as exc:
            fail(str(exc), ExitCode.DATA)
        except IdentityExists as exc:
            fail(str(exc), ExitCode.CONFLICT)
        except ManifestInvalid as exc:
            fail(str(exc), ExitCode.MANIFEST, problems=several(exc.problems))
        except ConfigError as exc:
            fail(str(exc), ExitCode.CONFIG, problems=several(exc.problems))
        except StateDirUnusable as exc:
            fail(str(exc), ExitCode.CONFIG)
        except InvalidIdentifier as exc:
            fail(str(exc), ExitCode.CONFIG)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG_PATH,
    envvar="FEDGATE_CONFIG",
    show_default=True,
    help="Agent configuration file (TOML).",
)
