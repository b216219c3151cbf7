"""One training round inside a cloud, as an IO-free state machine.

The driver creates a :class:`RoundInProgress`, publishes :meth:`start_message`, feeds each
verified update to :meth:`accept`, and calls :meth:`close` when every selected agent has
answered or the deadline has passed. ``close`` decides: enough participants → a new global
model; otherwise → aborted, and nothing partial is released.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgspec
import numpy as np
import numpy.typing as npt
from fedgate_common.arrays import check_shapes, decode_arrays
from fedgate_common.errors import (
    LimitExceeded,
    MalformedMessage,
    NonFiniteValues,
    ReplayedMessage,
    UnknownSender,
    WrongRound,
)
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.messages import ModelUpdate, RoundStart, SecAggParams, TrainingPlan
from fedgate_common.model_spec import ModelSpec, parameter_shapes

from fedgate_coordinator.aggregation import apply_delta, weighted_mean_delta

MAX_SAMPLES_PER_UPDATE = 1_000_000_000


class RoundSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How rounds are run; ``[rounds]`` in coordinator.toml."""

    min_participants: int = 2
    update_timeout_s: float = 120.0
    learning_rate: float = 0.01
    lr_decay: float = 0.98
    momentum: float = 0.9
    local_epochs: int = 5
    batch_size: int = 32
    pause_between_rounds_s: float = 0.0
    max_weight: int = 100_000
    max_update_norm: float = 1_000.0

    def plan_for(self, round: int) -> TrainingPlan:
        """Learning rate decays by ``lr_decay`` per round (round 1 uses ``learning_rate``)."""
        return TrainingPlan(
            learning_rate=self.learning_rate * self.lr_decay ** max(round - 1, 0),
            momentum=self.momentum,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
        )


class Contribution(msgspec.Struct, frozen=True, kw_only=True):
    """What the coordinator knows of one agent's part; under secure aggregation the
    sample count and loss stay on the agent (``None``)."""

    agent_id: str
    num_samples: int | None
    train_loss: float | None
    bytes_up: int


class RoundCompleted(msgspec.Struct, frozen=True, kw_only=True):
    """A cloud's round that released an update: ``delta`` is the mean update (what the
    cloud contributes to consensus), ``weights`` the base model plus it."""

    round: int
    contributions: tuple[Contribution, ...]
    delta: dict[str, npt.NDArray[np.float32]]
    weights: dict[str, npt.NDArray[np.float32]]
    mean_train_loss: float | None


class RoundAborted(msgspec.Struct, frozen=True, kw_only=True):
    round: int
    reason: str
    contributions: tuple[Contribution, ...]


RoundResult = RoundCompleted | RoundAborted


def round_start(
    *,
    round: int,
    base_digest: str,
    selected: Sequence[str],
    settings: RoundSettings,
    secagg: SecAggParams | None = None,
) -> RoundStart:
    return RoundStart(
        round=round,
        base_digest=base_digest,
        selected=tuple(sorted(selected)),
        plan=settings.plan_for(round),
        update_timeout_s=settings.update_timeout_s,
        min_participants=settings.min_participants,
        secagg=secagg,
    )


class RoundInProgress:
    def __init__(
        self,
        *,
        round: int,
        base_digest: str,
        base_weights: Mapping[str, npt.NDArray[np.float32]],
        spec: ModelSpec,
        selected: Sequence[str],
        settings: RoundSettings,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.round = round
        self.base_digest = base_digest
        self._base_weights = dict(base_weights)
        self._shapes = parameter_shapes(spec)
        self.selected = tuple(sorted(selected))
        self.settings = settings
        self._limits = limits
        self._received: dict[str, tuple[Contribution, dict[str, npt.NDArray[np.float32]]]] = {}
        self._reported: dict[str, tuple[int, float]] = {}  # agent → (samples, train loss)
        self._closed = False

    def start_message(self) -> RoundStart:
        return round_start(
            round=self.round,
            base_digest=self.base_digest,
            selected=self.selected,
            settings=self.settings,
        )

    @property
    def all_in(self) -> bool:
        return len(self._received) == len(self.selected)

    @property
    def received(self) -> int:
        return len(self._received)

    def accept(self, sender: str, update: ModelUpdate, *, bytes_up: int) -> None:
        """Validate and keep one agent's update; raise a ProtocolError subclass otherwise."""
        if update.round != self.round:
            raise WrongRound(
                f"update for round {update.round}, current round is {self.round}", sender=sender
            )
        if self._closed:
            raise WrongRound(f"round {self.round} is already closed", sender=sender)
        if sender not in self.selected:
            raise UnknownSender(
                f"{sender!r} was not selected for round {self.round}", sender=sender
            )
        if sender in self._received:
            raise ReplayedMessage(
                f"second update from {sender!r} in round {self.round}", sender=sender
            )
        if update.base_digest != self.base_digest:
            raise MalformedMessage(
                f"update built on model {update.base_digest[:12]}, "
                f"round {self.round} uses {self.base_digest[:12]}",
                sender=sender,
            )
        if not 1 <= update.num_samples <= MAX_SAMPLES_PER_UPDATE:
            raise MalformedMessage(f"num_samples={update.num_samples} out of range", sender=sender)
        if not math.isfinite(update.train_loss):
            raise NonFiniteValues("train_loss is NaN or Inf", sender=sender)
        delta = decode_arrays(update.delta, self._limits, require_finite=True)
        check_shapes(delta, self._shapes)
        typed = {name: np.asarray(value, dtype=np.float32) for name, value in delta.items()}
        norm = float(
            np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in typed.values()))
        )
        if norm > self.settings.max_update_norm:
            raise LimitExceeded(
                f"update L2 norm {norm:.3g} > limit {self.settings.max_update_norm}",
                sender=sender,
            )
        contribution = Contribution(
            agent_id=sender,
            num_samples=update.num_samples,
            train_loss=update.train_loss,
            bytes_up=bytes_up,
        )
        self._received[sender] = (contribution, typed)
        self._reported[sender] = (update.num_samples, update.train_loss)

    def close(self) -> RoundResult:
        """End the round: aggregate if enough agents answered, else abort."""
        self._closed = True
        contributions = tuple(c for c, _ in self._received.values())
        if len(self._received) < self.settings.min_participants:
            return RoundAborted(
                round=self.round,
                reason=(
                    f"{len(self._received)} of {len(self.selected)} selected agents answered;"
                    f" at least {self.settings.min_participants} needed"
                ),
                contributions=contributions,
            )
        # An agent's weight is its claimed sample count, capped: no agent can outweigh the
        # others by claiming a huge data set.
        cap = self.settings.max_weight
        weighted = [(min(samples, cap), loss) for samples, loss in self._reported.values()]
        delta = weighted_mean_delta(
            [(min(self._reported[a][0], cap), d) for a, (_, d) in self._received.items()]
        )
        total = sum(weight for weight, _ in weighted)
        mean_loss = sum(weight * loss for weight, loss in weighted) / total
        weights = apply_delta(self._base_weights, delta)
        if not all(np.isfinite(w).all() for w in weights.values()):
            return RoundAborted(
                round=self.round,
                reason="the aggregated model is not finite; nothing is released",
                contributions=contributions,
            )
        return RoundCompleted(
            round=self.round,
            contributions=contributions,
            delta=delta,
            weights=weights,
            mean_train_loss=mean_loss,
        )
