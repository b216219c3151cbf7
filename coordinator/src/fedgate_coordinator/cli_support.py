"""What every ``fedgate-coordinator`` command shares: exit codes, the error guard, JSON out.

In a module of its own so that the command modules ``cli`` registers (``federation_cli``,
``broker_config_cli``) import it directly instead of importing ``cli`` back.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import Any, TypeVar

from fedgate_common.click_support import echo_json, fail, several
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


def guard(func: F) -> F:
    """Map fedgate errors to documented exit codes with a one-line message."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), ExitCode.CONFIG, problems=several(exc.problems))
        except (GenesisWeightsInvalid, BrokerTlsInvalid, StateDirUnusable) as exc:
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
            fail(str(exc), ExitCode.MANIFEST, problems=several(exc.problems))

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]
