"""Exceptions of fedgate-coordinator.

Tree::

    FedgateError                  root of every fedgate exception (fedgate_common.errors)
     └── CoordinatorError         root of every coordinator exception
          └── StoreError          the store cannot open, read or record something
               ├── ChainBroken    a model does not fit the hash chain, or a stored link is bad
               ├── AgentConflict  an agent id is already enrolled with a different key
               ├── AgentNotEnrolled  no agent is enrolled under the id
               └── RoundStateError  a round is missing, exists already, or is not running

Details travel as attributes (``round``, ``agent_id``, ``reason``), so callers can log or
count them without parsing the message.
"""

from __future__ import annotations

from fedgate_common.errors import FedgateError

__all__ = [
    "AgentConflict",
    "AgentNotEnrolled",
    "ChainBroken",
    "CoordinatorError",
    "RoundStateError",
    "StoreError",
]


class CoordinatorError(FedgateError):
    """Root of every exception raised by fedgate-coordinator."""


class StoreError(CoordinatorError):
    """The coordinator store cannot open, read or record something."""


class ChainBroken(StoreError):
    """A model cannot join the hash chain, or a stored model breaks it.

    ``round`` is the round of the offending model (``None`` when not known) and ``reason``
    says which check failed.
    """

    def __init__(self, reason: str, *, round: int | None = None) -> None:
        where = f"model of round {round}" if round is not None else "model"
        super().__init__(f"hash chain broken at {where}: {reason}")
        self.reason = reason
        self.round = round


class AgentConflict(StoreError):
    """``agent_id`` is already enrolled with a different public key."""

    def __init__(
        self, agent_id: str, why: str = "is already enrolled with a different public key"
    ) -> None:
        super().__init__(
            f"agent {agent_id!r} {why}; enroll the gateway under another id (ids are never "
            "reused: the store keeps every enrollment for the audit trail)"
        )
        self.agent_id = agent_id


class AgentNotEnrolled(StoreError):
    """``agent_id`` names no enrolled agent (revoke, or an update of its row)."""

    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent {agent_id!r} is not enrolled (see `fedgate-coordinator agents`)")
        self.agent_id = agent_id


class AgentRevoked(AgentConflict):
    """``agent_id`` was revoked: it stays revoked, whatever key it is enrolled with again."""

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id, "is revoked and stays revoked (there is no reactivation)")


class RoundStateError(StoreError):
    """A round is missing, already exists, or is not in the state the operation needs."""

    def __init__(self, message: str, *, round: int) -> None:
        super().__init__(message)
        self.round = round


class ConfigError(CoordinatorError):
    """coordinator.toml, the signing key or a command-line value is missing or invalid.

    ``problems`` lists every issue found, each phrased as what to fix.
    """

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]
