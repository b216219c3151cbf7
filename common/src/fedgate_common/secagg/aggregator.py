"""Coordinator side of one secure-aggregation round, as an IO-free state machine.

Stages: ``keys`` → roster, ``shares`` → deliveries, ``masked`` → survivor check,
``confirm`` → unmask request, ``reveal`` → the unmasked sum. The driver feeds each verified
agent message to ``add`` and calls ``close`` when the stage's agents have all answered or
its deadline has passed. ``close`` returns the next outbound message(s) or an
:class:`Aborted` (fewer than ``needed`` agents left, or reconstruction impossible); nothing
partial is ever returned. Key shares and individual inputs are held only in memory for the
round and never leave this object except as the final sum.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Literal

import msgspec
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedgate_common.arrays import decode_array
from fedgate_common.errors import (
    MalformedMessage,
    ProtocolError,
    ReplayedMessage,
    UnknownSender,
    WrongRound,
)
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.messages import (
    AdvertiseKeys,
    KeyRoster,
    MaskedInput,
    Payload,
    Reveal,
    RosterEntry,
    SealedShare,
    SecAggParams,
    ShareBundle,
    ShareDelivery,
    SurvivorCheck,
    SurvivorConfirmation,
    UnmaskRequest,
)
from fedgate_common.secagg.context import RoundContext, sha256
from fedgate_common.secagg.encoding import DecodedSum, decode_sum
from fedgate_common.secagg.graph import (
    consistency_quorum,
    effective_degree,
    graph_seed,
    is_connected,
    neighbour_graph,
)
from fedgate_common.secagg.keystream import MaskExpander, Words, word_dtype
from fedgate_common.secagg.mask_keys import pairwise_mask_key, pairwise_sign, self_mask_key
from fedgate_common.secagg.participant import encoding_params, public_bytes
from fedgate_common.secagg.roster import Roster, make_roster
from fedgate_common.secagg.shamir import Share, reconstruct_secret
from fedgate_common.secagg.share_box import check_x25519_public_key

Stage = Literal["keys", "shares", "masked", "confirm", "reveal", "done"]
STAGE_ORDER: tuple[Stage, ...] = ("keys", "shares", "masked", "confirm", "reveal")
_EXPECTED_PAYLOAD: dict[Stage, type] = {
    "keys": AdvertiseKeys,
    "shares": ShareBundle,
    "masked": MaskedInput,
    "confirm": SurvivorConfirmation,
    "reveal": Reveal,
}


class StageRecord(msgspec.Struct, kw_only=True):
    stage: str
    expected: int
    received: int = 0
    bytes_in: int = 0

    @property
    def dropped(self) -> int:
        return self.expected - self.received


class Aborted(msgspec.Struct, frozen=True, kw_only=True):
    stage: str
    reason: str


class Unmasked(msgspec.Struct, frozen=True, kw_only=True):
    """The only thing a round releases: the decoded sum over ``survivors``."""

    decoded: DecodedSum
    words: Words  # the sum of the survivors' encoded inputs, mod 2^b
    survivors: tuple[str, ...]


StageOutcome = (
    KeyRoster | dict[str, ShareDelivery] | SurvivorCheck | UnmaskRequest | Unmasked | Aborted
)


def fewest_inputs(params: SecAggParams, min_participants: int) -> int:
    """Below this many inputs a round aborts at any stage: the threshold t, the
    coordinator's minimum, and the count the site-level noise shares were sized for."""
    return max(params.threshold, min_participants, params.noise.min_inputs if params.noise else 1)


class Aggregator:
    def __init__(
        self,
        *,
        deployment: str,
        cloud: str,
        round: int,
        base_digest: str,
        start_digest: bytes,
        base_certificate: bytes,
        selected: Sequence[str],
        params: SecAggParams,
        dimension: int,
        min_participants: int,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.deployment = deployment
        self.cloud = cloud
        self.round = round
        self.base_digest = base_digest
        self.start_digest = start_digest
        self._certificate = base_certificate
        self.selected = tuple(sorted(selected))
        self.params = params
        self.dimension = dimension
        self.needed = fewest_inputs(params, min_participants)
        self._limits = limits
        self._encoding = encoding_params(params)
        self.stage: Stage = "keys"
        self.records: dict[str, StageRecord] = {
            "keys": StageRecord(stage="keys", expected=len(self.selected))
        }
        self._keys: dict[str, tuple[bytes, AdvertiseKeys, bytes]] = {}
        self.roster: Roster | None = None
        self.context: RoundContext | None = None
        self.graph: dict[str, tuple[str, ...]] = {}
        self._bundles: dict[str, ShareBundle] = {}
        self._delivered: dict[str, tuple[str, ...]] = {}  # holder → owners delivered to it
        self._masked: dict[str, Words] = {}
        self._confirmations: dict[str, bytes] = {}
        self._reveals: dict[str, Reveal] = {}
        self.survivors: tuple[str, ...] = ()
        self.dropped: tuple[str, ...] = ()

    # -- bookkeeping --------------------------------------------------------------------
    @property
    def expected(self) -> tuple[str, ...]:
        """Agents that may still answer the current stage."""
        if self.stage == "keys":
            return self.selected
        if self.stage == "shares":
            return tuple(sorted(self._keys))
        if self.stage == "masked":
            return tuple(sorted(self._delivered))
        if self.stage in ("confirm",):
            return self.survivors
        if self.stage == "reveal":
            return tuple(sorted(self._confirmations))
        return ()

    def _received(self) -> Mapping[str, object]:
        by_stage: dict[str, Mapping[str, object]] = {
            "keys": self._keys,
            "shares": self._bundles,
            "masked": self._masked,
            "confirm": self._confirmations,
            "reveal": self._reveals,
        }
        return by_stage.get(self.stage, {})

    @property
    def all_in(self) -> bool:
        return len(self._received()) == len(self.expected)

    def _open_stage(self, stage: Stage, expected: int) -> None:
        self.stage = stage
        self.records[stage] = StageRecord(stage=stage, expected=expected)

    def _abort(self, reason: str) -> Aborted:
        stage = self.stage
        self.stage = "done"
        return Aborted(stage=stage, reason=reason)

    def _count_check(self, stage: str, count: int) -> Aborted | None:
        if count < self.needed:
            return self._abort(
                f"{count} agents left after the {stage} stage; at least {self.needed} needed"
            )
        return None

    # -- intake -------------------------------------------------------------------------
    def add(self, sender: str, payload: Payload, *, raw: bytes, identity_key: bytes) -> None:
        """Accept one verified agent message for the current stage or raise a ProtocolError."""
        if payload.round != self.round:
            raise WrongRound(
                f"message for round {payload.round}, round is {self.round}", sender=sender
            )
        stage = payload.__struct_config__.tag
        if self.stage == "done" or stage != self.stage:
            raise WrongRound(
                f"{stage!r} message while round {self.round} is at stage {self.stage!r}",
                sender=sender,
            )
        if sender not in self.expected:
            raise UnknownSender(
                f"{sender!r} is not expected at stage {self.stage!r} of round {self.round}",
                sender=sender,
            )
        if sender in self._received():
            raise ReplayedMessage(f"second {stage!r} message from {sender!r}", sender=sender)
        if not isinstance(payload, _EXPECTED_PAYLOAD[self.stage]):
            raise MalformedMessage(f"unexpected payload at stage {self.stage!r}", sender=sender)
        if isinstance(payload, AdvertiseKeys):
            self._add_keys(sender, payload, raw, identity_key)
        elif isinstance(payload, ShareBundle):
            self._add_shares(sender, payload)
        elif isinstance(payload, MaskedInput):
            self._add_masked(sender, payload)
        elif isinstance(payload, SurvivorConfirmation):
            self._add_confirmation(sender, payload, raw)
        elif isinstance(payload, Reveal):
            self._add_reveal(sender, payload)
        record = self.records[self.stage]
        record.received += 1
        record.bytes_in += len(raw)

    def _check_digest(self, sender: str, digest: bytes) -> None:
        assert self.context is not None
        if digest != self.context.roster_digest:
            raise MalformedMessage("message names another key roster", sender=sender)

    def _add_keys(self, sender: str, keys: AdvertiseKeys, raw: bytes, identity: bytes) -> None:
        if keys.base_digest != self.base_digest:
            raise MalformedMessage("keys for another base model", sender=sender)
        if keys.start_digest != self.start_digest:
            raise MalformedMessage(
                "keys answer another start of this round (an agent that answers an older "
                "release's start, or a start it was not sent)",
                sender=sender,
            )
        if len(keys.share_key) != 32 or len(keys.mask_key) != 32 or len(keys.seed_commitment) != 32:
            raise MalformedMessage("round keys must be 32 bytes each", sender=sender)
        check_x25519_public_key(keys.share_key, sender=sender, what="share key")
        check_x25519_public_key(keys.mask_key, sender=sender, what="mask key")
        if any(
            kept.seed_commitment == keys.seed_commitment or identity == other_identity
            for other_identity, kept, _ in self._keys.values()
        ):
            raise MalformedMessage(
                "seed commitment or identity key already used by another agent", sender=sender
            )
        taken = {
            k for _, other, _ in self._keys.values() for k in (other.share_key, other.mask_key)
        }
        if keys.share_key in taken or keys.mask_key in taken or keys.share_key == keys.mask_key:
            raise MalformedMessage("round keys already used by another agent", sender=sender)
        self._keys[sender] = (identity, keys, raw)

    def _add_shares(self, sender: str, bundle: ShareBundle) -> None:
        self._check_digest(sender, bundle.roster_digest)
        holders = sorted((*self.graph[sender], sender))
        if [s.holder for s in bundle.shares] != holders or any(
            s.owner != sender for s in bundle.shares
        ):
            raise MalformedMessage(
                "share bundle must hold one share per holder of the derived graph", sender=sender
            )
        if any(len(s.sealed) > 1024 for s in bundle.shares):
            raise MalformedMessage("sealed share larger than 1 KiB", sender=sender)
        self._bundles[sender] = bundle

    def _add_masked(self, sender: str, masked: MaskedInput) -> None:
        self._check_digest(sender, masked.roster_digest)
        dtype = word_dtype(self.params.word_bits)
        length = self._encoding.vector_length(self.dimension)
        if masked.words.dtype != dtype.str or masked.words.shape != (length,):
            raise MalformedMessage(
                f"masked input must be {length} words of {dtype.str}", sender=sender
            )
        words = decode_array(masked.words, self._limits, require_finite=False)
        self._masked[sender] = words.astype(dtype, copy=False)

    def _add_confirmation(self, sender: str, confirm: SurvivorConfirmation, raw: bytes) -> None:
        self._check_digest(sender, confirm.roster_digest)
        if confirm.survivors != self.survivors:
            raise MalformedMessage("confirmation of another survivor set", sender=sender)
        self._confirmations[sender] = raw

    def _add_reveal(self, sender: str, reveal: Reveal) -> None:
        self._check_digest(sender, reveal.roster_digest)
        assert self.roster is not None
        x = self.roster.members[sender].x
        held = set(self._delivered.get(sender, ()))
        survivors, dropped = set(self.survivors), set(self.dropped)
        for shares in (reveal.seed_shares, reveal.mask_key_shares):
            owners = [share.owner for share in shares]
            if len(set(owners)) != len(owners):  # copies would crowd out the other shares
                raise MalformedMessage("a reveal names one owner twice", sender=sender)
        for share, allowed in (
            *((s, survivors) for s in reveal.seed_shares),
            *((s, dropped) for s in reveal.mask_key_shares),
        ):
            if share.owner not in allowed or share.owner not in held or share.x != x:
                raise MalformedMessage(
                    f"revealed share of {share.owner!r} was not asked for", sender=sender
                )
        self._reveals[sender] = reveal

    # -- stage transitions --------------------------------------------------------------
    def close(self) -> StageOutcome:
        """Close the current stage, whichever it is (the ``close_*`` method of the stage)."""
        closers: dict[str, Callable[[], StageOutcome]] = {
            "keys": self.close_keys,
            "shares": self.close_shares,
            "masked": self.close_masked,
            "confirm": self.close_confirmations,
            "reveal": self.close_reveals,
        }
        if self.stage not in closers:
            raise RuntimeError(f"round {self.round} has no open stage to close")
        return closers[self.stage]()

    def close_keys(self) -> KeyRoster | Aborted:
        aborted = self._count_check("keys", len(self._keys))
        if aborted:
            return aborted
        try:
            roster = make_roster({a: (ident, keys) for a, (ident, keys, _) in self._keys.items()})
        except ProtocolError as exc:
            return self._abort(f"unusable key roster: {exc}")
        group = effective_degree(len(roster.members), self.params.degree) + 1
        if group < self.params.threshold:
            return self._abort(
                f"{len(roster.members)} agents give {group} share holders each; "
                f"threshold is {self.params.threshold}"
            )
        self.roster = roster
        self.context = RoundContext(
            deployment=self.deployment,
            cloud=self.cloud,
            round=self.round,
            roster_digest=roster.digest,
        )
        seed = graph_seed(
            deployment=self.deployment,
            cloud=self.cloud,
            round=self.round,
            base_certificate=self._certificate,
        )
        self.graph = neighbour_graph(roster.ids, self.params.degree, seed)
        self._open_stage("shares", len(roster.members))
        return KeyRoster(
            round=self.round,
            entries=tuple(
                RosterEntry(agent_id=a, identity_key=ident, keys_envelope=raw)
                for a, (ident, _, raw) in sorted(self._keys.items())
            ),
        )

    def close_shares(self) -> dict[str, ShareDelivery] | Aborted:
        aborted = self._count_check("shares", len(self._bundles))
        if aborted:
            return aborted
        assert self.context is not None
        inbox: dict[str, list[SealedShare]] = {holder: [] for holder in self._bundles}
        for bundle in self._bundles.values():
            for share in bundle.shares:
                if share.holder in inbox:
                    inbox[share.holder].append(share)
        deliveries = {}
        for holder, shares in sorted(inbox.items()):
            self._delivered[holder] = tuple(sorted(s.owner for s in shares))
            deliveries[holder] = ShareDelivery(
                round=self.round, roster_digest=self.context.roster_digest, shares=tuple(shares)
            )
        self._open_stage("masked", len(deliveries))
        return deliveries

    def close_masked(self) -> SurvivorCheck | Aborted:
        aborted = self._count_check("masked", len(self._masked))
        if aborted:
            return aborted
        assert self.context is not None
        survivors = tuple(sorted(self._masked))
        delivered = {
            agent: tuple(p for p in self.graph[agent] if p in self._delivered.get(agent, ()))
            for agent in survivors
        }
        if not is_connected(survivors, delivered):
            return self._abort(
                "the survivors fall apart into unconnected groups of the neighbour graph; "
                "agents refuse to unmask such a set"
            )
        self.survivors = survivors
        self._open_stage("confirm", len(self.survivors))
        return SurvivorCheck(
            round=self.round, roster_digest=self.context.roster_digest, survivors=self.survivors
        )

    def close_confirmations(self) -> UnmaskRequest | Aborted:
        assert self.context is not None
        assert self.roster is not None
        quorum = consistency_quorum(len(self.roster.members), self.params.threshold)
        silent = [a for a in self.survivors if a not in self._confirmations]
        if silent:
            return self._abort(
                f"{len(silent)} survivors (e.g. {silent[0]!r}) did not confirm the survivor set; "
                "holders reveal a survivor's seed only with its own confirmation"
            )
        if len(self._confirmations) < quorum:
            return self._abort(
                f"{len(self._confirmations)} agents confirmed the survivor set; {quorum} needed "
                f"(a majority of the {len(self.roster.members)} in the key roster, and t)"
            )
        self.dropped = tuple(sorted(set(self._bundles) - set(self.survivors)))
        self._open_stage("reveal", len(self._confirmations))
        return UnmaskRequest(
            round=self.round,
            roster_digest=self.context.roster_digest,
            survivors=self.survivors,
            dropped=self.dropped,
            confirmations=tuple(raw for _, raw in sorted(self._confirmations.items())),
        )

    def close_reveals(self) -> Unmasked | Aborted:
        """Reconstruct every needed secret, remove all masks and decode the sum."""
        assert self.context is not None
        assert self.roster is not None
        context, roster, t = self.context, self.roster, self.params.threshold
        seed_shares: dict[str, list[Share]] = {a: [] for a in self.survivors}
        key_shares: dict[str, list[Share]] = {a: [] for a in self.dropped}
        for reveal in self._reveals.values():
            for item in reveal.seed_shares:
                seed_shares[item.owner].append(Share(x=item.x, y=item.y))
            for item in reveal.mask_key_shares:
                key_shares[item.owner].append(Share(x=item.x, y=item.y))
        short = [a for a, s in (*seed_shares.items(), *key_shares.items()) if len(s) < t]
        if short:
            return self._abort(
                f"fewer than {t} shares revealed for {len(short)} agents (e.g. {short[0]!r})"
            )
        count, bits = self._encoding.vector_length(self.dimension), self.params.word_bits
        total = np.zeros(count, dtype=word_dtype(bits))
        expander = MaskExpander(count, bits)
        for words in self._masked.values():
            total += words
        for owner, shares in seed_shares.items():
            commitment = roster.members[owner].seed_commitment
            seed = _reconstruct_checked(shares, t, partial(_seed_matches, commitment))
            if seed is None:
                return self._abort(f"no {t} revealed shares of {owner!r} match its seed commitment")
            expander.subtract(total, self_mask_key(seed, context, owner))
        for dropped, shares in key_shares.items():
            mask_key = roster.members[dropped].mask_key
            secret = _reconstruct_checked(shares, t, partial(_mask_key_matches, mask_key))
            if secret is None:
                return self._abort(f"no {t} revealed shares of {dropped!r} match its mask key")
            private = X25519PrivateKey.from_private_bytes(secret)
            for survivor in self.survivors:
                if dropped not in self._delivered.get(survivor, ()):
                    continue  # the survivor never masked with this agent
                key = pairwise_mask_key(
                    private, roster.members[survivor].mask_key, context, dropped, survivor
                )
                # The survivor applied sign(survivor, dropped); take it back out.
                if pairwise_sign(survivor, dropped) > 0:
                    expander.subtract(total, key)
                else:
                    expander.add(total, key)
        self.stage = "done"
        decoded = decode_sum(total, self._encoding)
        self._masked.clear()  # individual inputs are not kept beyond the round
        return Unmasked(decoded=decoded, words=total, survivors=self.survivors)


RECONSTRUCTION_ATTEMPTS = 64


def _reconstruct_checked(
    shares: Sequence[Share], threshold: int, matches: Callable[[bytes], bool]
) -> bytes | None:
    """The secret from some ``threshold`` of ``shares`` that passes ``matches``, or None.

    Each secret is committed to in the roster (seed hash, mask public key), so a corrupted
    share is detected; with more than t shares revealed, other subsets are tried (at most
    ``RECONSTRUCTION_ATTEMPTS``), so one lying holder cannot by itself abort the round.
    """
    for subset in itertools.islice(_subsets(list(shares), threshold), RECONSTRUCTION_ATTEMPTS):
        try:
            secret = reconstruct_secret(subset, threshold=threshold)
        except ProtocolError:
            continue
        if matches(secret):
            return secret
    return None


def _subsets(shares: list[Share], size: int) -> Iterator[list[Share]]:
    """The first ``size`` shares, then every leave-one-out window, then the rest in order."""
    yield shares[:size]
    window = shares[: size + 1]
    for skip in range(len(window)):
        if len(window) > size:
            yield window[:skip] + window[skip + 1 :]
    for combination in itertools.combinations(shares, size):
        yield list(combination)


def _seed_matches(commitment: bytes, seed: bytes) -> bool:
    return sha256(seed) == commitment


def _mask_key_matches(public: bytes, secret: bytes) -> bool:
    return public_bytes(X25519PrivateKey.from_private_bytes(secret)) == public
