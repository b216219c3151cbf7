"""Exceptions of fedgate-common.

Tree::

    FedgateError                 root of every fedgate exception (all distributions)
     ├── ProtocolError           bytes from the wire that must be rejected
     │    ├── MalformedMessage   not decodable, wrong type, wrong field values
     │    ├── LimitExceeded      a declared or actual size is above the configured limit
     │    ├── BadSignature       the envelope signature does not verify
     │    ├── UnknownSender      the sender is not enrolled / not a known coordinator
     │    ├── EnvelopeMismatch   envelope fields disagree with topic, deployment or cloud
     │    ├── WrongRound         message for a past or future round
     │    ├── ReplayedMessage    a message already accepted arrives again
     │    ├── NonFiniteValues    NaN or Inf inside an array
     │    ├── ShareRejected      a sealed secure-aggregation share does not open
     │    ├── CertificateInvalid a commit certificate does not prove a quorum decision
     │    └── SecAggRefusal      an agent refuses a secure-aggregation request; nothing is revealed
     │         ├── PlaintextRefused         a round without secure aggregation, not allowed
     │         ├── ThresholdTooLow          threshold below the agent's floor or not a majority
     │         ├── DuplicateKeys            two roster entries share an id or a key
     │         ├── KeySignatureInvalid      a roster entry is unsigned or wrongly signed
     │         ├── KeySubstituted           an identity or round key differs from the known one
     │         ├── StartMismatch            a roster member answered another start of the round
     │         ├── TooFewNeighbours         fewer holders than the threshold
     │         ├── ConflictingUnmaskRequest an agent listed as survivor and as dropped
     │         └── ConsistencyCheckFailed   fewer than t signatures on this agent's survivor set
     ├── InvalidIdentifier       an id that is not safe inside an MQTT topic
     ├── ManifestInvalid         a federation manifest is malformed or not signed by a quorum
     ├── BrokerTlsInvalid        a broker login's TLS files do not load or do not pair
     ├── AlreadyRunning          another process runs on the state directory (instance_lock)
     ├── StateDirUnusable        the state directory cannot hold the lock (instance_lock)
     └── FileInvalid             a data file (simulated runs, genesis weights) cannot be used
          ├── NpzUnreadable          not an .npz archive with the arrays asked for (npz_files)
          ├── PlantRunsInvalid       not a readable, consistent simulated-runs file
          └── GenesisWeightsInvalid  not a readable genesis-weights file for its model spec

Every ProtocolError carries ``kind``: the short name stored in the events table and
used as a counter label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal


class FedgateError(Exception):
    """Root of every fedgate exception."""


class ProtocolError(FedgateError):
    """A message received from the network was rejected."""

    kind = "protocol_error"

    def __init__(self, message: str, *, sender: str | None = None) -> None:
        super().__init__(message)
        self.sender = sender


class MalformedMessage(ProtocolError):
    kind = "malformed"


class LimitExceeded(ProtocolError):
    kind = "limit_exceeded"


class BadSignature(ProtocolError):
    kind = "bad_signature"


class UnknownSender(ProtocolError):
    kind = "unknown_sender"


class EnvelopeMismatch(ProtocolError):
    kind = "envelope_mismatch"


class WrongRound(ProtocolError):
    kind = "wrong_round"


class ReplayedMessage(ProtocolError):
    kind = "replay"


class NonFiniteValues(ProtocolError):
    kind = "non_finite"


class ShareRejected(ProtocolError):
    kind = "share_rejected"


class CertificateInvalid(ProtocolError):
    """A commit certificate is not a quorum of valid precommits for the model it names."""

    kind = "bad_certificate"


class SecAggRefusal(ProtocolError):
    kind = "secagg_refusal"


class PlaintextRefused(SecAggRefusal):
    kind = "plaintext_refused"


class ThresholdTooLow(SecAggRefusal):
    kind = "threshold_too_low"


class NoiseTooLow(SecAggRefusal):
    """The round's site-level DP noise is below the agent's configured floor."""

    kind = "noise_too_low"


class DuplicateKeys(SecAggRefusal):
    kind = "duplicate_keys"


class KeySignatureInvalid(SecAggRefusal):
    kind = "bad_key_signature"


class KeySubstituted(SecAggRefusal):
    kind = "key_substitution"


class StartMismatch(SecAggRefusal):
    """A roster member's keys answer another :class:`RoundStart` than this agent's: the
    coordinator sent agents of one sum different plans or noise parameters."""

    kind = "start_mismatch"


class TooFewNeighbours(SecAggRefusal):
    kind = "too_few_neighbours"


class ConflictingUnmaskRequest(SecAggRefusal):
    kind = "conflicting_unmask"


class ConsistencyCheckFailed(SecAggRefusal):
    kind = "consistency_failed"


class InvalidIdentifier(FedgateError, ValueError):
    """An agent, cloud or deployment id that cannot be used in a topic."""


class ManifestInvalid(FedgateError):
    """A federation manifest is malformed, does not follow its predecessor, or lacks the
    signatures it needs.

    ``problems`` lists every issue found, each phrased as what to fix.
    """

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class BrokerTlsInvalid(FedgateError):
    """A broker login's CA, client certificate or key does not load, or only one of the
    certificate and its key is set; the message names the file and what to set."""


class FileInvalid(FedgateError):
    """A data file that cannot be used; ``path`` names it (``None`` for bytes in memory)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


NpzProblem = Literal["single_array", "missing", "pickle", "unreadable", "too_large"]


class NpzUnreadable(FileInvalid):
    """``problem`` says what is wrong; ``detail`` is numpy's or zipfile's own text, and
    ``missing`` the required arrays not in the archive (in the order asked for)."""

    def __init__(
        self, problem: NpzProblem, detail: str, *, path: Path, missing: tuple[str, ...] = ()
    ) -> None:
        super().__init__(f"{problem}: {detail}", path=str(path))
        self.problem: NpzProblem = problem
        self.detail = detail
        self.missing = missing


class PlantRunsInvalid(FileInvalid):
    """A simulated plant-runs file that is unreadable, inconsistent or has NaN/Inf."""


class GenesisWeightsInvalid(FileInvalid):
    """A genesis-weights file that is unreadable or does not fit its model spec."""
