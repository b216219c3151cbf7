"""What every ``fedgate-coordinator`` command shares: exit codes, the error guard, JSON out.

In a module of its own so that the command modules ``cli`` registers (``federation_cli``,
``broker_config_cli``) import it directly instead of importing ``cli`` back.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import Any, NoReturn, TypeVar

import click
import msgspec
from fedgate_common.errors import (
    BrokerTlsInvalid,
    GenesisWeightsInvalid,
    InvalidIdentifier,
    ManifestInvalid,
)
from fedgate_common.instance_lock import AlreadyRunning, StateDirUnusable
from fedgate_common.keys import InvalidKey

from fedgate_coordinator.errors import (
    AgentConflict,
    AgentNotEnrolled,
    ChainBroken,
    ConfigError,
    StoreError,
)

__all__ = ["ExitCode", "echo_json", "fail", "guard"]


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    STORE = 4
    CONFLICT = 5
    CHAIN = 6
    NOT_FOUND = 7
    MANIFEST = 8


F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: ExitCode, *, problems: list[str] | None = None) -> NoReturn:
    """``error: …`` on stderr (one line per problem when there are several) and exit
    ``code``; a command run with ``--json`` also prints ``{"error": …, "exit_code": …}``
    (and ``problems``) on stdout, so that a script reading it gets JSON."""
    for line in problems or [message]:
        click.echo(f"error: {line}", err=True)
    context = click.get_current_context(silent=True)
    if context is not None and context.params.get("as_json"):
        report: dict[str, object] = {"error": message, "exit_code": int(code)}
        if problems:
            report["problems"] = problems
        echo_json(report)
    sys.exit(int(code))


def guard(func: F) -> F:
    """Map fedgate errors to documented exit codes with a one-line message."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, GenesisWeightsInvalid, BrokerTlsInvalid, StateDirUnusable) as exc:
            fail(str(exc), ExitCode.CONFIG)
        except AgentConflict as exc:
            fail(str(exc), ExitCode.CONFLICT)
        except AgentNotEnrolled as exc:
            fail(str(exc), ExitCode.NOT_FOUND)
        except ChainBroken as exc:
            fail(str(exc), ExitCode.CHAIN)
        except (StoreError, AlreadyRunning) as exc:
            fail(str(exc), ExitCode.STORE)
        except (InvalidKey, InvalidIdentifier) as exc:
            fail(str(exc), ExitCode.USAGE)
        except ManifestInvalid as exc:
            fail(str(exc), ExitCode.MANIFEST)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


def echo_json(data: object) -> None:
    click.echo(json.dumps(msgspec.to_builtins(data), indent=2, default=str))
