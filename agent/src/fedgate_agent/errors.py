"""Exceptions of fedgate-agent.

Tree::

    FedgateError                 root of every fedgate exception (fedgate_common.errors)
     └── AgentError              root of every exception raised by the agent
          ├── ConfigError        the agent's configuration is missing or invalid
          │    └── IdentityExists  ``init`` would replace an existing identity key
          ├── LocalDataError     the local training data cannot be used as it is
          ├── TrainingDiverged   local training produced NaN/Inf; the update is not sent
          ├── PlanRejected       a training plan from the coordinator is outside safe bounds
          ├── ModelRejected      a model from the federation is refused (shape, digest, cert)
          ├── StillTraining      a round starts while the last one still trains
          ├── PrivacyBudgetExhausted  the next round would spend more than the ε budget
          │    └── SiteBudgetExhausted  … more than this agent's own site-level budget
          ├── LedgerUnreadable   privacy.json cannot be read (fedgate_agent.privacy_ledger)
          ├── StatusUnreadable   status.json may not be read (fedgate_agent.state)
          ├── LedgerUnwritable   a round cannot be booked in privacy.json (same module)
          └── PretrainingRefused simulated runs or settings unusable for pre-training
                                 (fedgate_agent.pretraining)

Messages say what to fix; details a caller may act on are attributes.
"""

from __future__ import annotations

from pathlib import Path

from fedgate_common.errors import FedgateError

__all__ = [
    "AgentError",
    "ConfigError",
    "IdentityExists",
    "LocalDataError",
    "ModelRejected",
    "PlanRejected",
    "PrivacyBudgetExhausted",
    "SiteBudgetExhausted",
    "StillTraining",
    "TrainingDiverged",
]


class AgentError(FedgateError):
    """Root of every exception raised by fedgate-agent."""


class ConfigError(AgentError):
    """The agent's configuration is missing or invalid.

    ``problems`` lists every problem found, each phrased as what to fix.
    """

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = [message] if problems is None else list(problems)


class IdentityExists(ConfigError):
    """``init`` would replace an existing identity key."""


class LocalDataError(AgentError):
    """Local training data is unreadable or does not fit the model.

    ``path`` is the offending file when there is one.
    """

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class TrainingDiverged(AgentError):
    """Local training produced NaN/Inf; nothing is sent for the round."""


class PlanRejected(AgentError):
    """A training plan from the coordinator is outside the bounds the agent accepts."""

    kind = "plan_rejected"


class ModelRejected(AgentError):
    """A model received from the federation is refused and is not loaded."""

    kind = "model_rejected"


class StillTraining(AgentError):
    """A round started while this agent still trains for an earlier one: not joined, so that
    two rounds never draw on the privacy budget at once."""

    kind = "still_training"


class PrivacyBudgetExhausted(AgentError):
    """Training this round would take record-level ε past ``privacy.target_epsilon``.

    ``spent`` is ε so far, ``next_round`` what it would be after the round.
    """

    kind = "privacy_budget_exhausted"

    def __init__(self, message: str, *, spent: float, next_round: float) -> None:
        super().__init__(message)
        self.spent = spent
        self.next_round = next_round


class SiteBudgetExhausted(PrivacyBudgetExhausted):
    """Sending this round's noisy input would take the agent's own count of site-level ε past
    ``privacy.site_max_epsilon`` (:mod:`fedgate_agent.site_privacy`)."""

    kind = "site_privacy_budget_exhausted"
