"""``privacy.json`` in the agent's state directory: every round's privacy spend.

Written atomically after each DP round and read at start, so ε survives restarts: the
record-level rounds (DP-SGD), and the noisy secure rounds this agent sent a masked input to
(site level, :mod:`fedgate_agent.site_privacy`). An unreadable ledger stops training (a
lost ledger would reset the budget silently), and so does one that holds less than the
agent last reported in ``status.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
from fedgate_common.atomic_files import atomic_write

from fedgate_agent.errors import AgentError
from fedgate_agent.pooled_noise import counted_history
from fedgate_agent.record_privacy import ACCOUNTANTS, Accountant, RoundSpend, epsilon
from fedgate_agent.site_privacy import (
    NEGLIGIBLE_NOISE,
    SiteLedgerEntry,
    counted_multipliers,
    site_epsilon,
)
from fedgate_agent.state import AgentStatus

LEDGER_FILE = "privacy.json"


class LedgerUnreadable(AgentError):
    """``privacy.json`` exists but cannot be read; training stays off."""

    kind = "privacy_ledger_unreadable"


class LedgerUnwritable(AgentError):
    """A round cannot be booked in ``privacy.json``; its update does not leave."""

    kind = "privacy_ledger_unwritable"


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    spend: RoundSpend
    epsilon_round: float  # this round alone, at delta
    epsilon_total: float  # all rounds so far, at delta
    delta: float
    max_grad_norm: float
    num_samples: int
    # Which accountant computed the two ε; entries written before there was a choice: RDP.
    accountant: str = ACCOUNTANTS["rdp"]


class SigmaPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What σ was sized for at the first DP round: ``rounds`` rounds of ``steps`` steps at
    sampling rate ``sample_rate`` (``privacy.planned_rounds`` may change later; σ does not)."""

    rounds: int
    steps: int
    sample_rate: float


class PrivacyLedger(msgspec.Struct, kw_only=True):
    entries: list[LedgerEntry] = msgspec.field(default_factory=list)
    noise_multiplier: float | None = None  # fixed at the first DP round of the plan
    site_entries: list[SiteLedgerEntry] = msgspec.field(default_factory=list)
    sized_for: SigmaPlan | None = None  # None: σ not fixed yet, or fixed before it was kept

    @property
    def history(self) -> list[RoundSpend]:
        return [entry.spend for entry in self.entries]

    @property
    def epsilon_total(self) -> float:
        return self.entries[-1].epsilon_total if self.entries else 0.0

    @property
    def site_epsilon_total(self) -> float:
        return self.site_entries[-1].epsilon_total if self.site_entries else 0.0

    def counted(self, colluders: int) -> list[RoundSpend]:
        """The record-level history as the budget counts it with ``colluders`` assumed:
        pooled rounds booked under fewer are counted again (:func:`counted_history`)."""
        return counted_history(self.history, colluders)

    @property
    def pooled(self) -> bool:
        """Whether any record-level round had its noise pooled in a secure sum."""
        return any(e.spend.own_share_noise_multiplier is not None for e in self.entries)

    def own_share_epsilon(self, delta: float, accountant: Accountant) -> float:
        """Record-level ε of the whole history if every other input of each pooled round's
        secure sum colluded with the coordinator: those rounds counted with this agent's
        own noise share alone (privacy.md §3.7)."""
        history = [spend.own_share_only for spend in self.history]
        if not history:
            return 0.0
        if min(spend.noise_multiplier for spend in history) < NEGLIGIBLE_NOISE:
            return math.inf
        return epsilon(history, delta, accountant=accountant)

    def spent(
        self, delta: float, accountant: Accountant, colluders: int = 0
    ) -> tuple[float, float]:
        """Record-level and site-level ε of the whole history at ``delta`` by ``accountant``
        (site level with ``colluders`` assumed), as the next round's budget check counts
        it. The entries' own totals were counted with the settings of their time; after a
        change they differ."""
        record = (
            epsilon(self.counted(colluders), delta, accountant=accountant) if self.entries else 0.0
        )
        site = site_epsilon(counted_multipliers(self.site_entries, colluders), delta, accountant)
        return record, site


def read_ledger(state_dir: Path) -> PrivacyLedger:
    path = state_dir / LEDGER_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=PrivacyLedger)
    except FileNotFoundError:
        return PrivacyLedger()
    except OSError as exc:  # not ours to read (run as the service user), or not a file
        raise LedgerUnreadable(
            f"{path} cannot be read ({exc.strerror or exc}): run this as the agent's service "
            "user, or fix the file's owner and mode. Training stays off while it cannot be read"
        ) from None
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise LedgerUnreadable(
            f"{path} is unreadable ({exc}); restore it from a backup. Training stays off: "
            "without it the privacy spent so far is unknown"
        ) from None


def check_not_behind(ledger: PrivacyLedger, status: AgentStatus, state_dir: Path) -> None:
    """Refuse a ledger that holds less than this agent last recorded in ``status.json``:
    fewer rounds, or less ε, at either level. Deleted, emptied or rolled back to an older
    copy, it would hand the spent budget out again. (Rounds are compared as well as ε: after
    a change of δ or accountant the totals are counted differently.)"""
    for level, held, last, rounds, last_rounds in (
        (
            "record-level",
            ledger.epsilon_total,
            status.privacy_epsilon,
            len(ledger.entries),
            status.privacy_rounds,
        ),
        (
            "site-level",
            ledger.site_epsilon_total,
            status.site_privacy_epsilon,
            len(ledger.site_entries),
            status.site_privacy_rounds,
        ),
    ):
        if (last is not None and held < last - 1e-9) or (
            last_rounds is not None and rounds < last_rounds
        ):
            raise LedgerUnreadable(
                f"{state_dir / LEDGER_FILE} holds {rounds} {level} rounds and ε {held:.4f} "
                f"spent, but this agent had recorded {last_rounds} rounds and ε "
                f"{last or 0:.4f} (status.json): it was deleted, emptied or replaced by an "
                "older copy. Restore the latest one from a backup. Training stays off: "
                "without it the privacy spent so far is unknown"
            )


def write_ledger(state_dir: Path, ledger: PrivacyLedger) -> None:
    path = state_dir / LEDGER_FILE
    try:
        atomic_write(path, msgspec.json.encode(ledger), mode=0o640)
    except OSError as exc:  # a full disk, a read-only state directory
        raise LedgerUnwritable(
            f"cannot write {path} ({exc}); the round is not booked and its update not sent"
        ) from None
