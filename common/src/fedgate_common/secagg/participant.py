"""Agent side of one secure-aggregation round, as an IO-free state machine.

The driver calls, in order: :meth:`Participant.advertise_keys` (after the round start),
:meth:`on_roster`, :meth:`on_delivery`, :meth:`mask_input` (once training is done),
:meth:`on_check`, :meth:`on_unmask`. Each returns the payload to sign and send, or raises a
:class:`~fedgate_common.errors.ProtocolError`; after a refusal the agent sends nothing more
for the round, so a refusal never reveals anything.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, cast

import msgspec
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedgate_common.arrays import encode_array
from fedgate_common.errors import (
    ConflictingUnmaskRequest,
    ConsistencyCheckFailed,
    EnvelopeMismatch,
    KeySubstituted,
    MalformedMessage,
    NoiseTooLow,
    ProtocolError,
    ReplayedMessage,
    ShareRejected,
    ThresholdTooLow,
    TooFewNeighbours,
    WrongRound,
)
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.messages import (
    AdvertiseKeys,
    KeyRoster,
    MaskedInput,
    Reveal,
    RevealedShare,
    RoundStart,
    SealedShare,
    SecAggParams,
    ShareBundle,
    ShareDelivery,
    SurvivorCheck,
    SurvivorConfirmation,
    UnmaskRequest,
)
from fedgate_common.secagg.confirmations import confirmed_by
from fedgate_common.secagg.context import RoundContext, sha256, start_digest
from fedgate_common.secagg.encoding import EncodingParams, encode_update
from fedgate_common.secagg.graph import (
    consistency_quorum,
    default_threshold_for,
    effective_degree,
    graph_seed,
    is_connected,
    neighbour_graph,
)
from fedgate_common.secagg.keystream import MaskExpander, Words, word_dtype
from fedgate_common.secagg.mask_keys import pairwise_mask_key, pairwise_sign, self_mask_key
from fedgate_common.secagg.roster import Roster, verify_roster
from fedgate_common.secagg.shamir import split_secret
from fedgate_common.secagg.share_box import open_share, seal_share

Stage = Literal["keys", "shares", "delivery", "masked", "check", "unmask", "done", "refused"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _refusal_ends_round(method: _F) -> _F:
    """After a refusal the participant answers nothing more in this round.

    A message for another round or a stage already passed (``WrongRound``,
    ``ReplayedMessage``: e.g. an MQTT QoS 1 redelivery) is refused without ending the round.
    """

    @functools.wraps(method)
    def guarded(self: Participant, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (WrongRound, ReplayedMessage):
            raise
        except (ProtocolError, ValueError):
            self.stage = "refused"
            raise

    return cast(_F, guarded)


class SharePlaintext(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    owner: str
    holder: str
    x: int
    mask_key_share: bytes
    seed_share: bytes


_plaintext_decoder = msgspec.msgpack.Decoder(SharePlaintext)


def encoding_params(params: SecAggParams) -> EncodingParams:
    noise = params.noise
    return EncodingParams(
        word_bits=params.word_bits,
        clip_norm=params.clip_norm,
        weight_cap=params.weight_cap,
        max_inputs=params.max_inputs,
        noise_multiplier=noise.noise_multiplier if noise else 0.0,
        count_noise=noise.count_noise if noise else 0.0,
        min_inputs=noise.min_inputs if noise else 1,
        count_within_clip=params.count_within_clip,
    )


def check_params(
    params: SecAggParams, *, selected: int, min_threshold: int, min_noise_multiplier: float = 0.0
) -> None:
    """The refusals an agent applies to a round's parameters before making any keys.

    ``min_threshold`` 0 is the default graph's threshold for ``selected`` agents
    (:func:`default_threshold_for`): a coordinator may ask for more, never for less, so a
    deviating one cannot shrink the graph until one colluding neighbour is enough.
    """
    try:
        encoding_params(params).check()
    except ValueError as exc:
        raise MalformedMessage(f"unusable secure-aggregation parameters: {exc}") from None
    noise = params.noise.noise_multiplier if params.noise else 0.0
    if noise < min_noise_multiplier:
        raise NoiseTooLow(
            f"site-level noise multiplier {noise} is below this agent's floor of "
            f"{min_noise_multiplier}"
        )
    if params.noise and params.count_within_clip and params.noise.count_noise <= 0:
        raise NoiseTooLow("adaptive clipping under site-level DP needs noise on the count")
    # With noise, the encoding must not dilute it: 16-bit words, or inputs sized for more
    # agents than were selected, shrink the level until rounding outweighs the noise, and
    # the round's real noise multiplier falls far below the nominal one checked above.
    if params.noise and params.word_bits != 32:
        raise NoiseTooLow(f"site-level noise with {params.word_bits}-bit words (32 needed)")
    if params.noise and params.max_inputs != max(selected, 1):
        raise NoiseTooLow(
            f"site-level noise with inputs sized for {params.max_inputs} agents, "
            f"{selected} selected"
        )
    if selected > params.max_inputs:
        raise MalformedMessage(
            f"{selected} agents selected but inputs sized for {params.max_inputs}"
        )
    floor = min_threshold or default_threshold_for(selected)
    if params.threshold < floor:
        why = "" if min_threshold else f", the default graph's for {selected} agents"
        raise ThresholdTooLow(
            f"threshold {params.threshold} is below this agent's floor of {floor}{why}"
        )
    group = effective_degree(selected, params.degree) + 1
    if 2 * params.threshold <= group:
        raise ThresholdTooLow(
            f"threshold {params.threshold} is not a majority of the {group} share holders"
        )


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Participant:
    def __init__(
        self,
        *,
        agent_id: str,
        deployment: str,
        cloud: str,
        start: RoundStart,
        base_certificate: bytes,
        pinned_identities: Mapping[str, bytes],
        min_threshold: int = 0,
        min_noise_multiplier: float = 0.0,
        assumed_colluders: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if start.secagg is None:
            raise MalformedMessage(f"round {start.round} does not use secure aggregation")
        check_params(
            start.secagg,
            selected=len(start.selected),
            min_threshold=min_threshold,
            min_noise_multiplier=min_noise_multiplier,
        )
        self.agent_id = agent_id
        self.deployment = deployment
        self.cloud = cloud
        self.start = start
        self._start_digest = start_digest(start)
        self.params: SecAggParams = start.secagg
        self.round = start.round
        self._certificate = base_certificate
        self._pinned = dict(pinned_identities)
        self._assumed_colluders = assumed_colluders
        self._graph: dict[str, tuple[str, ...]] = {}
        self._limits = limits
        self._random_bytes = random_bytes
        self.stage: Stage = "keys"
        self._share_key = X25519PrivateKey.from_private_bytes(random_bytes(32))
        self._mask_secret = random_bytes(32)
        self._mask_key = X25519PrivateKey.from_private_bytes(self._mask_secret)
        self._seed = random_bytes(32)
        self.roster: Roster | None = None
        self.context: RoundContext | None = None
        self.neighbours: tuple[str, ...] = ()
        self._held: dict[str, SharePlaintext] = {}  # owner → the shares this agent holds
        self._confirmed: tuple[str, ...] | None = None

    def _expect(self, stage: Stage, what: str) -> None:
        if self.stage != stage:
            raise ReplayedMessage(f"{what} arrived at stage {self.stage!r} of round {self.round}")

    def _check_round(self, round: int) -> None:
        if round != self.round:
            raise WrongRound(f"message for round {round}, this agent is in round {self.round}")

    def _check_digest(self, digest: bytes) -> RoundContext:
        assert self.context is not None  # stage order guarantees it; not input validation
        if digest != self.context.roster_digest:
            raise EnvelopeMismatch("message names another key roster than the one verified")
        return self.context

    # -- stage 1 ------------------------------------------------------------------------
    def advertise_keys(self) -> AdvertiseKeys:
        self._expect("keys", "key advertisement")
        return AdvertiseKeys(
            round=self.round,
            base_digest=self.start.base_digest,
            start_digest=self._start_digest,
            share_key=public_bytes(self._share_key),
            mask_key=public_bytes(self._mask_key),
            seed_commitment=sha256(self._seed),
        )

    # -- stages 2 and 3 -----------------------------------------------------------------
    @_refusal_ends_round
    def on_roster(self, message: KeyRoster) -> ShareBundle:
        self._check_round(message.round)
        self._expect("keys", "key roster")
        roster = verify_roster(
            message,
            deployment=self.deployment,
            cloud=self.cloud,
            base_digest=self.start.base_digest,
            start_digest=self._start_digest,
            selected=self.start.selected,
            pinned_identities=self._pinned,
            limits=self._limits,
        )
        own = roster.members.get(self.agent_id)
        if own is None:
            raise MalformedMessage("the key roster leaves this agent out")
        mine = self.advertise_keys()
        if (own.share_key, own.mask_key, own.seed_commitment) != (
            mine.share_key,
            mine.mask_key,
            mine.seed_commitment,
        ):
            raise KeySubstituted("the key roster carries other round keys for this agent")
        noise = self.params.noise
        if noise is not None and len(roster.ids) < noise.min_inputs:
            # No survivor set could reach min_inputs: refuse before masking, so that the
            # agent books no site-level spend for a round that can never release a sum.
            raise NoiseTooLow(
                f"a roster of {len(roster.ids)} cannot reach the {noise.min_inputs} inputs the "
                "site-level noise shares were sized for"
            )
        if 2 * self.params.threshold <= effective_degree(len(roster.ids), self.params.degree) + 1:
            raise ThresholdTooLow(
                f"threshold {self.params.threshold} is not a majority of the share holders "
                f"for a roster of {len(roster.ids)}"
            )
        graph = neighbour_graph(
            roster.ids,
            self.params.degree,
            graph_seed(
                deployment=self.deployment,
                cloud=self.cloud,
                round=self.round,
                base_certificate=self._certificate,
            ),
        )
        self._graph = graph
        self.neighbours = graph[self.agent_id]
        holders = sorted((*self.neighbours, self.agent_id))
        if len(holders) < self.params.threshold:
            raise TooFewNeighbours(
                f"{len(holders)} share holders in the graph, threshold is {self.params.threshold}"
            )
        context = RoundContext(
            deployment=self.deployment,
            cloud=self.cloud,
            round=self.round,
            roster_digest=roster.digest,
        )
        xs = [roster.members[h].x for h in holders]
        t = self.params.threshold
        rb = self._random_bytes
        mask_shares = split_secret(self._mask_secret, threshold=t, xs=xs, random_bytes=rb)
        seed_shares = split_secret(self._seed, threshold=t, xs=xs, random_bytes=rb)
        sealed = []
        for holder, mask_share, seed_share in zip(holders, mask_shares, seed_shares, strict=True):
            plaintext = SharePlaintext(
                owner=self.agent_id,
                holder=holder,
                x=mask_share.x,
                mask_key_share=mask_share.y,
                seed_share=seed_share.y,
            )
            sealed.append(
                SealedShare(
                    owner=self.agent_id,
                    holder=holder,
                    sealed=seal_share(
                        msgspec.msgpack.encode(plaintext),
                        private=self._share_key,
                        peer_public=roster.members[holder].share_key,
                        context=context,
                        sender=self.agent_id,
                        receiver=holder,
                        random_bytes=rb,
                    ),
                )
            )
        self.roster, self.context = roster, context
        self._pinned.update({a: m.identity_key for a, m in roster.members.items()})
        self.stage = "delivery"
        return ShareBundle(round=self.round, roster_digest=roster.digest, shares=tuple(sealed))

    @property
    def pinned_identities(self) -> dict[str, bytes]:
        """Identity keys known after this round's roster (the driver persists them)."""
        return dict(self._pinned)

    @_refusal_ends_round
    def on_delivery(self, message: ShareDelivery) -> None:
        self._check_round(message.round)
        self._expect("delivery", "share delivery")
        context = self._check_digest(message.roster_digest)
        assert self.roster is not None
        allowed = {*self.neighbours, self.agent_id}
        held: dict[str, SharePlaintext] = {}
        for item in message.shares:
            if item.holder != self.agent_id:
                raise ShareRejected(f"delivery holds a share meant for {item.holder!r}")
            if item.owner not in allowed:
                raise ShareRejected(
                    f"share from {item.owner!r}, who is not a neighbour in the derived graph"
                )
            if item.owner in held:
                raise ShareRejected(f"two shares from {item.owner!r} in one delivery")
            raw = open_share(
                item.sealed,
                private=self._share_key,
                peer_public=self.roster.members[item.owner].share_key,
                context=context,
                sender=item.owner,
                receiver=self.agent_id,
            )
            try:
                plaintext = _plaintext_decoder.decode(raw)
            except (msgspec.DecodeError, ValueError):
                raise ShareRejected(f"share from {item.owner!r} is undecodable") from None
            own_x = self.roster.members[self.agent_id].x
            if (plaintext.owner, plaintext.holder, plaintext.x) != (
                item.owner,
                self.agent_id,
                own_x,
            ):
                raise ShareRejected(f"share from {item.owner!r} names another owner or holder")
            held[item.owner] = plaintext
        if len(held) < self.params.threshold:
            raise TooFewNeighbours(
                f"shares from {len(held)} holders delivered, threshold is {self.params.threshold}"
            )
        self._held = held
        self.stage = "masked"

    @property
    def ready_to_mask(self) -> bool:
        return self.stage == "masked"

    # -- stage 4 ------------------------------------------------------------------------
    def encode(self, update: npt.NDArray[np.floating], num_samples: int) -> Words:
        """Clip, weight, quantize and wrap the flat update (see :mod:`.encoding`)."""
        return encode_update(
            update, num_samples, encoding_params(self.params), random_bytes=self._random_bytes
        )

    @_refusal_ends_round
    def mask_input(self, encoded: Words) -> MaskedInput:
        """Add the self mask and every pairwise mask to ``encoded``, mod 2^b."""
        self._expect("masked", "masking")
        context, roster = self.context, self.roster
        assert context is not None  # set with the stage
        assert roster is not None
        dtype = word_dtype(self.params.word_bits)
        if encoded.dtype != dtype or encoded.ndim != 1:
            raise ValueError(f"encoded input must be a flat {dtype} array")
        words = encoded.copy()
        expander = MaskExpander(words.size, self.params.word_bits)
        expander.add(words, self_mask_key(self._seed, context, self.agent_id))
        for peer in self._held:
            if peer == self.agent_id:
                continue
            key = pairwise_mask_key(
                self._mask_key, roster.members[peer].mask_key, context, self.agent_id, peer
            )
            if pairwise_sign(self.agent_id, peer) > 0:
                expander.add(words, key)
            else:
                expander.subtract(words, key)
        self.stage = "check"
        return MaskedInput(
            round=self.round,
            roster_digest=context.roster_digest,
            words=encode_array("masked", words),
        )

    # -- stages 5 and 6 -----------------------------------------------------------------
    @_refusal_ends_round
    def on_check(self, message: SurvivorCheck) -> SurvivorConfirmation:
        self._check_round(message.round)
        self._expect("check", "survivor check")
        context = self._check_digest(message.roster_digest)
        survivors = self._check_survivors(message.survivors)
        self._confirmed = survivors
        self.stage = "unmask"
        return SurvivorConfirmation(
            round=self.round, roster_digest=context.roster_digest, survivors=survivors
        )

    def _check_survivors(self, survivors: tuple[str, ...]) -> tuple[str, ...]:
        assert self.roster is not None
        if list(survivors) != sorted(set(survivors)):
            raise MalformedMessage("the survivor set must be sorted and without repeats")
        if not set(survivors) <= set(self.roster.members):
            raise MalformedMessage("the survivor set names agents outside the key roster")
        if self.agent_id not in survivors:
            raise ConsistencyCheckFailed("the survivor set leaves out this agent's own input")
        if len(survivors) < self.params.threshold:
            raise ConsistencyCheckFailed(
                f"{len(survivors)} survivors, fewer than the threshold {self.params.threshold}"
            )
        noise = self.params.noise
        if noise is not None and len(survivors) < noise.min_inputs:
            raise ConsistencyCheckFailed(
                f"{len(survivors)} survivors, fewer than the {noise.min_inputs} the site-level "
                "noise shares were sized for: the sum would carry too little noise"
            )
        unmasked = [p for p in self.neighbours if p in survivors and p not in self._held]
        if unmasked:
            raise ConsistencyCheckFailed(
                f"survivor set names neighbour {unmasked[0]!r}, whose share never reached this "
                "agent: its input and this agent's would not be masked against each other"
            )
        if not is_connected(survivors, self._graph):
            raise ConsistencyCheckFailed(
                "the survivors fall apart into unconnected groups of the neighbour graph; "
                "the sum of each group could be unmasked on its own"
            )
        return survivors

    @_refusal_ends_round
    def on_unmask(self, message: UnmaskRequest) -> Reveal:
        self._check_round(message.round)
        self._expect("unmask", "unmask request")
        context = self._check_digest(message.roster_digest)
        assert self.roster is not None
        both = set(message.survivors) & set(message.dropped)
        if both:
            raise ConflictingUnmaskRequest(
                f"unmask request lists {sorted(both)[:5]} as both survivor and dropped"
            )
        if message.survivors != self._confirmed:
            raise ConsistencyCheckFailed(
                "unmask request names a survivor set other than the one this agent confirmed"
            )
        if self.agent_id in message.dropped or not set(message.dropped) <= set(self.roster.members):
            raise MalformedMessage("dropped set names this agent or agents outside the roster")
        signers = confirmed_by(
            message.confirmations,
            roster=self.roster,
            context=context,
            survivors=message.survivors,
            limits=self._limits,
        )
        quorum = consistency_quorum(
            len(self.roster.members), self.params.threshold, self._assumed_colluders
        )
        if len(signers) < quorum:
            raise ConsistencyCheckFailed(
                f"{len(signers)} valid signatures on the survivor set, {quorum} needed"
            )
        self.stage = "done"  # one unmask request per round: never reveal twice
        # A survivor's self-mask seed is revealed only if that survivor itself signed this
        # set: an agent that refused it (e.g. a withheld neighbour share) keeps its input
        # masked, whatever the other holders are told.
        survivors, dropped = signers, set(message.dropped)
        own_x = self.roster.members[self.agent_id].x
        return Reveal(
            round=self.round,
            roster_digest=context.roster_digest,
            seed_shares=tuple(
                RevealedShare(owner=owner, x=own_x, y=share.seed_share)
                for owner, share in sorted(self._held.items())
                if owner in survivors
            ),
            mask_key_shares=tuple(
                RevealedShare(owner=owner, x=own_x, y=share.mask_key_share)
                for owner, share in sorted(self._held.items())
                if owner in dropped
            ),
        )
