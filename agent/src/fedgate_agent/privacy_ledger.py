"""``privacy.json`` in the agent's state directory: every round's privacy spend.

Written atomically after each DP round and read at start, so ε survives restarts: the
record-level rounds (DP-SGD), and the noisy secure rounds this agent sent a masked input to
(site level, :mod:`fedgate_agent.site_privacy`). An unreadable ledger stops training (a
lost ledger would reset the budget silently), and so does one that holds less than the
agent last reported in ``status.json``.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
from fedgate_common.atomic_files import atomic_write

from fedgate_agent.errors import AgentError
from fedgate_agent.record_privacy import ACCOUNTANTS, RoundSpend
from fedgate_agent.site_privacy import SiteLedgerEntry

LEDGER_FILE = "privacy.json"


class LedgerUnreadable(AgentError):
    """``privacy.json`` exists but cannot be read; training stays off."""

    kind = "privacy_ledger_unreadable"


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    spend: RoundSpend
    epsilon_round: float  # this round alone, at delta
    epsilon_total: float  # all rounds so far, at delta
    delta: float
    max_grad_norm: float
    num_samples: int
    # Which accountant computed the two ε; entries written before there was a choice: RDP.
    accountant: str = ACCOUNTANTS["rdp"]


class PrivacyLedger(msgspec.Struct, kw_only=True):
    entries: list[LedgerEntry] = msgspec.field(default_factory=list)
    noise_multiplier: float | None = None  # fixed at the first DP round of the plan
    site_entries: list[SiteLedgerEntry] = msgspec.field(default_factory=list)

    @property
    def history(self) -> list[RoundSpend]:
        return [entry.spend for entry in self.entries]

    @property
    def epsilon_total(self) -> float:
        return self.entries[-1].epsilon_total if self.entries else 0.0

    @property
    def site_epsilon_total(self) -> float:
        return self.site_entries[-1].epsilon_total if self.site_entries else 0.0


def read_ledger(state_dir: Path) -> PrivacyLedger:
    path = state_dir / LEDGER_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=PrivacyLedger)
    except FileNotFoundError:
        return PrivacyLedger()
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise LedgerUnreadable(
            f"{path} is unreadable ({exc}); restore it from a backup. Training stays off: "
            "without it the privacy spent so far is unknown"
        ) from None


def check_not_behind(
    ledger: PrivacyLedger, reported: float | None, state_dir: Path, *, site_reported: float | None
) -> None:
    """Refuse a ledger that holds less spend than this agent last recorded in
    ``status.json`` (``privacy_epsilon``, ``site_privacy_epsilon``): deleted, emptied or
    rolled back to an older copy, it would hand the spent budget out again."""
    for level, held, last in (
        ("record-level", ledger.epsilon_total, reported),
        ("site-level", ledger.site_epsilon_total, site_reported),
    ):
        if last is not None and held < last - 1e-9:
            raise LedgerUnreadable(
                f"{state_dir / LEDGER_FILE} holds {level} ε {held:.4f} spent, but this agent "
                f"had recorded ε {last:.4f} (status.json): it was deleted, emptied or replaced "
                "by an older copy. Restore the latest one from a backup. Training stays off: "
                "without it the privacy spent so far is unknown"
            )


def write_ledger(state_dir: Path, ledger: PrivacyLedger) -> None:
    atomic_write(state_dir / LEDGER_FILE, msgspec.json.encode(ledger), mode=0o640)
