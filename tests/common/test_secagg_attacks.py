"""A malicious coordinator against honest participants: every attack ends in a typed refusal.

The coordinator here is test code. It drives :class:`Participant` objects step by step,
uses an honest :class:`Aggregator` for the routine parts and forges the rest of its own
messages. Agent messages are sealed with each agent's identity key; roster entries carry
the raw sealed ``keys`` envelopes. An attack succeeds only if a participant answers with
something (above all a :class:`Reveal`); each must instead raise the named refusal.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import msgspec
import nacl.signing
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fedgate_common.envelope import decode_payload, open_envelope, seal
from fedgate_common.errors import (
    ConflictingUnmaskRequest,
    ConsistencyCheckFailed,
    DuplicateKeys,
    EnvelopeMismatch,
    KeySignatureInvalid,
    KeySubstituted,
    NoiseTooLow,
    ProtocolError,
    ReplayedMessage,
    ShareRejected,
    StartMismatch,
    ThresholdTooLow,
    TooFewNeighbours,
    WrongRound,
)
from fedgate_common.messages import (
    AdvertiseKeys,
    KeyRoster,
    Payload,
    Reveal,
    RosterEntry,
    RoundStart,
    SealedShare,
    SecAggParams,
    ShareBundle,
    ShareDelivery,
    SiteNoise,
    SurvivorCheck,
    SurvivorConfirmation,
    TrainingPlan,
    UnmaskRequest,
)
from fedgate_common.secagg.aggregator import Aggregator
from fedgate_common.secagg.context import sha256, start_digest
from fedgate_common.secagg.graph import (
    default_degree,
    default_threshold,
    effective_degree,
    graph_seed,
    neighbour_graph,
)
from fedgate_common.secagg.participant import (
    Participant,
    SharePlaintext,
    check_params,
    public_bytes,
)
from fedgate_common.secagg.shamir import split_secret
from fedgate_common.secagg.share_box import seal_share

DEPLOYMENT, CLOUD = "plant-1", "line-a"
BASE_DIGEST = "ab" * 32
CERTIFICATE = b"commit-certificate-of-the-base-model"
DIMENSION = 6
# The malicious coordinator's own signing key: it can sign anything, but only as itself.
COORDINATOR = nacl.signing.SigningKey(random.Random("coordinator").randbytes(32))

T = TypeVar("T")
P = ParamSpec("P")


def seeded(label: str) -> Callable[[int], bytes]:
    return random.Random(label).randbytes


def identity(agent: str) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(seeded(f"identity/{agent}")(32))


def default_params(n: int, **changes: object) -> SecAggParams:
    degree = default_degree(n)
    params = SecAggParams(
        word_bits=16,
        clip_norm=1.0,
        weight_cap=100,
        max_inputs=n,
        degree=degree,
        threshold=default_threshold(effective_degree(n, degree)),
    )
    return msgspec.structs.replace(params, **changes)


def attempt(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | ProtocolError:
    """What the participant answered, or the refusal it raised."""
    try:
        return call(*args, **kwargs)
    except ProtocolError as exc:
        return exc


def deliver_each(participant: Participant, *deliveries: ShareDelivery) -> Outcomes:
    """Each delivery tried against the participant as it was before the first of them.

    In production one refusal ends the agent's round (test_refusal_ends_the_participants_
    round); restoring the stage lets one test check several variants of an attack.
    """
    outcomes: Outcomes = []
    for delivery in deliveries:
        participant.stage = "delivery"
        outcomes.append(attempt(participant.on_delivery, delivery))
    return outcomes


class Colluder:
    """A test-only malicious agent working with the coordinator: its keys are its own."""

    def __init__(self, agent_id: str) -> None:
        rng = random.Random(f"colluder/{agent_id}")
        self.agent_id = agent_id
        self.identity = nacl.signing.SigningKey(rng.randbytes(32))
        self.share_key = X25519PrivateKey.from_private_bytes(rng.randbytes(32))
        self.mask_key = X25519PrivateKey.from_private_bytes(rng.randbytes(32))
        self.seed = rng.randbytes(32)

    def advertise(self, start: RoundStart) -> AdvertiseKeys:
        return AdvertiseKeys(
            round=start.round,
            base_digest=BASE_DIGEST,
            start_digest=start_digest(start),
            share_key=public_bytes(self.share_key),
            mask_key=public_bytes(self.mask_key),
            seed_commitment=sha256(self.seed),
        )

    def entry(self, keys: AdvertiseKeys) -> RosterEntry:
        raw = seal(
            keys,
            signing_key=self.identity,
            deployment=DEPLOYMENT,
            cloud=CLOUD,
            sender=self.agent_id,
        )
        return RosterEntry(
            agent_id=self.agent_id,
            identity_key=bytes(self.identity.verify_key),
            keys_envelope=raw,
        )

    def share_for(self, victim: Participant) -> SealedShare:
        """A genuinely sealed share of this colluder's secrets, made for ``victim``."""
        assert victim.roster is not None
        assert victim.context is not None
        x = victim.roster.members[victim.agent_id].x
        secret_share = split_secret(self.seed, threshold=1, xs=[x])[0]
        plaintext = SharePlaintext(
            owner=self.agent_id,
            holder=victim.agent_id,
            x=x,
            mask_key_share=secret_share.y,
            seed_share=secret_share.y,
        )
        return SealedShare(
            owner=self.agent_id,
            holder=victim.agent_id,
            sealed=seal_share(
                msgspec.msgpack.encode(plaintext),
                private=self.share_key,
                peer_public=victim.roster.members[victim.agent_id].share_key,
                context=victim.context,
                sender=self.agent_id,
                receiver=victim.agent_id,
            ),
        )


class HonestRound:
    """Honest participants of one round plus an honest aggregator for the routine steps.

    Participants are seeded per (agent, round): ``twin(agent)`` is a second instance with
    the very same keys, for controls that must not disturb the attacked instance.
    """

    def __init__(
        self,
        n: int = 10,
        *,
        number: int = 1,
        params: SecAggParams | None = None,
        colluders: Sequence[str] = (),
    ) -> None:
        self.number = number
        self.ids = tuple(f"agent-{i:02d}" for i in range(n))
        self.colluders = {a: Colluder(a) for a in colluders}
        self.honest = tuple(a for a in self.ids if a not in self.colluders)
        self.params = params or default_params(n)
        self.start = RoundStart(
            round=number,
            base_digest=BASE_DIGEST,
            selected=self.ids,
            plan=TrainingPlan(learning_rate=0.1),
            update_timeout_s=60.0,
            min_participants=1,
            secagg=self.params,
        )
        self.aggregator = Aggregator(
            deployment=DEPLOYMENT,
            cloud=CLOUD,
            round=number,
            base_digest=BASE_DIGEST,
            start_digest=start_digest(self.start),
            base_certificate=CERTIFICATE,
            selected=self.ids,
            params=self.params,
            dimension=DIMENSION,
            min_participants=1,
        )
        self.participants = {a: self.twin(a) for a in self.honest}

    def twin(
        self, agent: str, *, pinned: Mapping[str, bytes] | None = None, min_threshold: int = 2
    ) -> Participant:
        return Participant(
            agent_id=agent,
            deployment=DEPLOYMENT,
            cloud=CLOUD,
            start=self.start,
            base_certificate=CERTIFICATE,
            pinned_identities=pinned or {},
            min_threshold=min_threshold,
            random_bytes=seeded(f"{agent}/round-{self.number}"),
        )

    def seal(self, agent: str, payload: Payload) -> bytes:
        return seal(
            payload, signing_key=identity(agent), deployment=DEPLOYMENT, cloud=CLOUD, sender=agent
        )

    def send(self, agent: str, payload: Payload) -> None:
        signer = self.colluders[agent].identity if agent in self.colluders else identity(agent)
        raw = seal(payload, signing_key=signer, deployment=DEPLOYMENT, cloud=CLOUD, sender=agent)
        self.aggregator.add(agent, payload, raw=raw, identity_key=bytes(signer.verify_key))

    def pins(self) -> dict[str, bytes]:
        """Identity keys as an agent knows them from earlier rounds."""
        return {a: bytes(identity(a).verify_key) for a in self.honest}

    # -- the honest path, stage by stage -----------------------------------------------------
    def keys(self) -> KeyRoster:
        for agent in self.honest:
            self.send(agent, self.participants[agent].advertise_keys())
        for agent, colluder in self.colluders.items():
            self.send(agent, colluder.advertise(self.start))
        roster = self.aggregator.close_keys()
        assert isinstance(roster, KeyRoster)
        return roster

    def shares(self, roster: KeyRoster) -> dict[str, ShareDelivery]:
        for agent in self.honest:
            self.send(agent, self.participants[agent].on_roster(roster))
        deliveries = self.aggregator.close_shares()
        assert isinstance(deliveries, dict)
        return deliveries

    def masked(
        self, deliveries: Mapping[str, ShareDelivery], *, gone: Sequence[str] = ()
    ) -> SurvivorCheck:
        """Every agent but ``gone`` masks its input; ``gone`` drop out after their shares."""
        for agent, delivery in deliveries.items():
            if agent in gone:
                continue
            participant = self.participants[agent]
            participant.on_delivery(delivery)
            encoded = participant.encode(np.full(DIMENSION, 0.1), 10)
            self.send(agent, participant.mask_input(encoded))
        check = self.aggregator.close_masked()
        assert isinstance(check, SurvivorCheck)
        return check

    def confirm(self, check: SurvivorCheck, agents: Sequence[str]) -> dict[str, bytes]:
        """Each agent's signed ``confirm`` envelope for ``check``."""
        return {a: self.seal(a, self.participants[a].on_check(check)) for a in agents}

    def to_check(self, *, gone: Sequence[str] = ()) -> SurvivorCheck:
        return self.masked(self.shares(self.keys()), gone=gone)

    def unmask_request(
        self,
        check: SurvivorCheck,
        confirmations: Sequence[bytes],
        *,
        survivors: tuple[str, ...] | None = None,
        dropped: tuple[str, ...] = (),
    ) -> UnmaskRequest:
        return UnmaskRequest(
            round=self.number,
            roster_digest=check.roster_digest,
            survivors=check.survivors if survivors is None else survivors,
            dropped=dropped,
            confirmations=tuple(confirmations),
        )


# -- forging roster entries ------------------------------------------------------------------


def keys_of(entry: RosterEntry) -> AdvertiseKeys:
    payload = decode_payload(open_envelope(entry.keys_envelope))
    assert isinstance(payload, AdvertiseKeys)
    return payload


def fresh_public_key(label: str) -> bytes:
    return public_bytes(X25519PrivateKey.from_private_bytes(seeded(label)(32)))


def with_payload_swapped(entry: RosterEntry, keys: AdvertiseKeys) -> RosterEntry:
    """The agent's envelope with a re-encoded payload and its original signature."""
    envelope = open_envelope(entry.keys_envelope)
    forged = msgspec.structs.replace(envelope, payload=msgspec.msgpack.encode(keys))
    return msgspec.structs.replace(entry, keys_envelope=msgspec.msgpack.encode(forged))


def signed_by_coordinator(agent: str, keys: AdvertiseKeys) -> RosterEntry:
    """An entry whose identity key is the coordinator's own, signed with it."""
    raw = seal(keys, signing_key=COORDINATOR, deployment=DEPLOYMENT, cloud=CLOUD, sender=agent)
    return RosterEntry(
        agent_id=agent, identity_key=bytes(COORDINATOR.verify_key), keys_envelope=raw
    )


def replace_entry(roster: KeyRoster, entry: RosterEntry) -> KeyRoster:
    entries = tuple(entry if e.agent_id == entry.agent_id else e for e in roster.entries)
    assert entries != roster.entries
    return msgspec.structs.replace(roster, entries=entries)


# -- the attacks -----------------------------------------------------------------------------
# Each returns the answers of every participant it targets; all must be the named refusal.

Outcomes = list[object]


def split_view_of_survivors() -> Outcomes:
    """Set A (everyone) to five agents, set B (all but the victim) to the other five.

    With B the coordinator would get the victim's mask-key shares, with A its seed shares:
    together its input. t = 7 of 10, so neither set can gather t signatures.
    """
    round = HonestRound(10)
    check = round.to_check()
    victim = "agent-00"
    group_a, group_b = round.ids[:5], round.ids[5:]
    set_a = check.survivors
    set_b = tuple(a for a in set_a if a != victim)
    check_b = msgspec.structs.replace(check, survivors=set_b)
    confirmed_a = round.confirm(check, group_a)
    confirmed_b = round.confirm(check_b, group_b)
    both = [*confirmed_a.values(), *confirmed_b.values()]
    forged = [  # the coordinator signing "confirmations of A" in group B's names
        seal(
            SurvivorConfirmation(round=1, roster_digest=check.roster_digest, survivors=set_a),
            signing_key=COORDINATOR,
            deployment=DEPLOYMENT,
            cloud=CLOUD,
            sender=agent,
        )
        for agent in group_b
    ]
    requests_for_a = [
        round.unmask_request(check, list(confirmed_a.values())),
        round.unmask_request(check, both),
        round.unmask_request(check, list(confirmed_a.values()) * 3),  # repeats count once
        round.unmask_request(check, [*confirmed_a.values(), *forged]),
    ]
    request_for_b = round.unmask_request(
        check, list(confirmed_b.values()), survivors=set_b, dropped=(victim,)
    )
    # One request per agent: a refusal ends the agent's round (later requests would meet
    # ReplayedMessage, see test_refusal_ends_the_participants_round).
    outcomes: Outcomes = []
    for index, agent in enumerate(group_a):
        request = requests_for_a[index % len(requests_for_a)]
        outcomes.append(attempt(round.participants[agent].on_unmask, request))
    for index, agent in enumerate(group_b):
        request = round.unmask_request(check, both) if index % 2 else request_for_b
        outcomes.append(attempt(round.participants[agent].on_unmask, request))
    reveals = [o for o in outcomes if isinstance(o, Reveal)]
    assert len(reveals) < round.params.threshold  # so no secret can be rebuilt: no round
    return outcomes


def victim_left_out_of_survivor_check() -> Outcomes:
    """The coordinator asks the victim to confirm a set that says it dropped."""
    round = HonestRound(10)
    check = round.to_check()
    without = msgspec.structs.replace(check, survivors=check.survivors[1:])
    return [attempt(round.participants["agent-00"].on_check, without)]


def survivor_set_below_threshold() -> Outcomes:
    round = HonestRound(10)
    check = round.to_check()
    small = msgspec.structs.replace(check, survivors=check.survivors[: round.params.threshold - 1])
    return [attempt(round.participants[a].on_check, small) for a in small.survivors]


def survivor_set_below_noise_min_inputs() -> Outcomes:
    """Site-level DP: a survivor set large enough for t but smaller than the noise shares
    were sized for would release a sum with too little noise."""
    noise = SiteNoise(noise_multiplier=1.0, min_inputs=9)
    round = HonestRound(10, params=default_params(10, word_bits=32, noise=noise))
    check = round.to_check()
    small = msgspec.structs.replace(check, survivors=check.survivors[:8])
    assert len(small.survivors) >= round.params.threshold
    return [attempt(round.participants[a].on_check, small) for a in small.survivors]


def mask_key_swapped_under_old_signature() -> Outcomes:
    round = HonestRound(10)
    roster = round.keys()
    target = roster.entries[3]
    changed = msgspec.structs.replace(keys_of(target), mask_key=fresh_public_key("coordinator"))
    forged = replace_entry(roster, with_payload_swapped(target, changed))
    # Control: an identical twin of the victim accepts the untouched roster.
    assert isinstance(round.twin("agent-00").on_roster(roster), ShareBundle)
    return [attempt(round.participants[a].on_roster, forged) for a in ("agent-00", "agent-05")]


def identity_and_keys_substituted_against_pinned() -> Outcomes:
    """New identity key + new round keys for agent-03, all signed by the coordinator."""
    round = HonestRound(10)
    roster = round.keys()
    target = roster.entries[3]
    changed = msgspec.structs.replace(keys_of(target), mask_key=fresh_public_key("coordinator"))
    forged = replace_entry(roster, signed_by_coordinator(target.agent_id, changed))
    pinned = round.pins()
    # Control: with the same pins the untouched roster is accepted.
    assert isinstance(round.twin("agent-00", pinned=pinned).on_roster(roster), ShareBundle)
    victims = [round.twin(a, pinned=pinned) for a in ("agent-00", "agent-07")]
    return [attempt(v.on_roster, forged) for v in victims]


def own_keys_replaced_by_coordinator() -> Outcomes:
    """The victim's own entry carries keys the coordinator made (and signed)."""
    round = HonestRound(10)
    roster = round.keys()
    victim = "agent-02"
    own = next(e for e in roster.entries if e.agent_id == victim)
    changed = msgspec.structs.replace(keys_of(own), mask_key=fresh_public_key("coordinator"))
    forged = replace_entry(roster, signed_by_coordinator(victim, changed))
    return [attempt(round.participants[victim].on_roster, forged)]


def own_keys_replaced_by_stale_signed_keys() -> Outcomes:
    """The victim's own, validly signed keys from an earlier start of the same round."""
    round = HonestRound(10)
    roster = round.keys()
    victim = "agent-02"
    earlier = Participant(
        agent_id=victim,
        deployment=DEPLOYMENT,
        cloud=CLOUD,
        start=round.start,
        base_certificate=CERTIFICATE,
        pinned_identities={},
        random_bytes=seeded("an earlier start"),
    )
    stale = RosterEntry(
        agent_id=victim,
        identity_key=bytes(identity(victim).verify_key),
        keys_envelope=round.seal(victim, earlier.advertise_keys()),
    )
    return [attempt(round.participants[victim].on_roster, replace_entry(roster, stale))]


def start_equivocated() -> Outcomes:
    """The coordinator sends agent-00 one start and the others another (here a step a
    thousand times smaller: their updates, and with pooled noise their noise shares, all but
    vanish, and agent-00's input is left under its own share). agent-00 signs keys for its
    start, the others for theirs; the roster mixing them is refused by both sides."""
    round = HonestRound(10)
    roster = round.keys()
    victim = "agent-00"
    own_start = msgspec.structs.replace(
        round.start, plan=msgspec.structs.replace(round.start.plan, learning_rate=1e-4)
    )
    equivocated = Participant(
        agent_id=victim,
        deployment=DEPLOYMENT,
        cloud=CLOUD,
        start=own_start,
        base_certificate=CERTIFICATE,
        pinned_identities={},
        min_threshold=2,
        random_bytes=seeded(f"{victim}/equivocated"),
    )
    own_entry = RosterEntry(
        agent_id=victim,
        identity_key=bytes(identity(victim).verify_key),
        keys_envelope=round.seal(victim, equivocated.advertise_keys()),
    )
    mixed = replace_entry(roster, own_entry)
    # Control: the other agents take the roster their start was answered under.
    assert isinstance(round.twin("agent-05").on_roster(roster), ShareBundle)
    return [
        attempt(equivocated.on_roster, mixed),
        attempt(round.participants["agent-05"].on_roster, mixed),
    ]


def previous_rounds_keys_replayed() -> Outcomes:
    """agent-04's validly signed keys of round 1 put into round 2's roster."""
    first, second = HonestRound(10, number=1), HonestRound(10, number=2)
    old = next(e for e in first.keys().entries if e.agent_id == "agent-04")
    roster = replace_entry(second.keys(), old)
    return [attempt(second.participants["agent-00"].on_roster, roster)]


def survivor_also_listed_as_dropped() -> Outcomes:
    round = HonestRound(10)
    check = round.to_check()
    confirmations = list(round.confirm(check, check.survivors).values())
    victim = "agent-06"
    conflicting = round.unmask_request(check, confirmations, dropped=(victim,))
    outcomes: Outcomes = [
        attempt(round.participants[a].on_unmask, conflicting) for a in round.ids[:5]
    ]
    outcomes.append(attempt(round.participants[victim].on_unmask, conflicting))
    # Control: the same request without the conflict is answered by another agent.
    honest = round.unmask_request(check, confirmations)
    assert isinstance(round.participants["agent-09"].on_unmask(honest), Reveal)
    return outcomes


def share_from_a_non_neighbour() -> Outcomes:
    """A colluding non-neighbour's genuinely sealed share added to the victim's delivery."""
    round = HonestRound(20, colluders=["agent-19"])
    roster = round.keys()
    deliveries = round.shares(roster)
    graph = neighbour_graph(round.ids, round.params.degree, graph_seed_of(round))
    victim = next(a for a in round.honest if "agent-19" not in graph[a])
    participant = round.participants[victim]
    extra = round.colluders["agent-19"].share_for(participant)
    delivery = deliveries[victim]
    widened = msgspec.structs.replace(delivery, shares=(*delivery.shares, extra))
    # Relabelled: another agent's share for a neighbour, now marked "for the victim".
    stranger = next(a for a in round.honest if a != victim and a not in graph[victim])
    moved = next(s for b in deliveries.values() for s in b.shares if s.owner == stranger)
    relabelled = msgspec.structs.replace(
        delivery, shares=(*delivery.shares, msgspec.structs.replace(moved, holder=victim))
    )
    return [
        *deliver_each(participant, widened, relabelled),
    ]


def delivery_below_threshold() -> Outcomes:
    round = HonestRound(20)
    deliveries = round.shares(round.keys())
    t = round.params.threshold
    victim = "agent-05"
    delivery = deliveries[victim]
    short = msgspec.structs.replace(delivery, shares=delivery.shares[: t - 1])
    empty = msgspec.structs.replace(delivery, shares=())
    participant = round.participants[victim]
    return [
        *deliver_each(participant, short, empty),
    ]


def graph_seed_of(round: HonestRound) -> bytes:
    return graph_seed(
        deployment=DEPLOYMENT, cloud=CLOUD, round=round.number, base_certificate=CERTIFICATE
    )


@dataclass
class TwoRounds:
    """Round 1 up to its deliveries, then round 2 (same agents, fresh keys) likewise."""

    first: HonestRound
    second: HonestRound
    old: dict[str, ShareDelivery]
    new: dict[str, ShareDelivery]


def two_rounds() -> TwoRounds:
    first, second = HonestRound(10, number=1), HonestRound(10, number=2)
    old = first.shares(first.keys())
    new = second.shares(second.keys())
    return TwoRounds(first, second, old, new)


VICTIM = "agent-01"


def old_shares_in_a_new_delivery() -> Outcomes:
    """Round-1 shares inside a correct round-2 delivery (right round, right digest).

    Only the sealed shares themselves can tell: their AEAD key came from round-1 share keys
    and their associated data names round 1 and its roster, so opening fails.
    """
    rounds = two_rounds()
    current = rounds.new[VICTIM]
    replayed = msgspec.structs.replace(current, shares=rounds.old[VICTIM].shares)
    one_swapped = msgspec.structs.replace(
        current,
        shares=tuple(
            next(o for o in rounds.old[VICTIM].shares if o.owner == s.owner)
            if s.owner == "agent-04"
            else s
            for s in current.shares
        ),
    )
    victim = rounds.second.participants[VICTIM]
    return [
        *deliver_each(victim, replayed, one_swapped),
    ]


def old_delivery_replayed_as_is() -> Outcomes:
    """Round 1's delivery message unchanged: the round number check fires first."""
    rounds = two_rounds()
    victim = rounds.second.participants[VICTIM]
    return [attempt(victim.on_delivery, rounds.old[VICTIM])]


def old_shares_under_old_roster_digest() -> Outcomes:
    """Round number updated, roster digest left at round 1's: the digest check fires first."""
    rounds = two_rounds()
    replayed = msgspec.structs.replace(rounds.old[VICTIM], round=2)
    victim = rounds.second.participants[VICTIM]
    return [attempt(victim.on_delivery, replayed)]


def shares_moved_between_receivers() -> Outcomes:
    """agent-04's share for agent-02 relabelled for agent-01, and delivered unrelabelled."""
    round = HonestRound(10)
    deliveries = round.shares(round.keys())
    target = deliveries[VICTIM]
    foreign = next(s for s in deliveries["agent-02"].shares if s.owner == "agent-04")
    relabelled = msgspec.structs.replace(foreign, holder=VICTIM)
    moved = msgspec.structs.replace(
        target,
        shares=tuple(relabelled if s.owner == "agent-04" else s for s in target.shares),
    )
    as_is = msgspec.structs.replace(
        target, shares=tuple(foreign if s.owner == "agent-04" else s for s in target.shares)
    )
    victim = round.participants[VICTIM]
    return deliver_each(victim, moved, as_is)


def _new_participant(params: SecAggParams, min_threshold: int) -> Outcomes:
    round = HonestRound(params.max_inputs)
    start = msgspec.structs.replace(round.start, secagg=params)
    return [
        attempt(
            Participant,
            agent_id="agent-00",
            deployment=DEPLOYMENT,
            cloud=CLOUD,
            start=start,
            base_certificate=CERTIFICATE,
            pinned_identities={},
            min_threshold=min_threshold,
        )
    ]


def threshold_below_floor() -> Outcomes:
    params = default_params(10)
    assert params.threshold == 7
    return _new_participant(params, min_threshold=8)


def graph_shrunk_below_the_default() -> Outcomes:
    """degree 2 and t = 2 are a majority of 3 holders, but with them one colluding neighbour
    and one declared dropout expose an input at any roster size: an agent without its own
    floor (min_threshold 0) takes the default graph's t for the selected agents."""
    return [
        *_new_participant(default_params(10, degree=2, threshold=2), min_threshold=0),
        *_new_participant(default_params(100, degree=4, threshold=4), min_threshold=0),
    ]


def threshold_not_a_majority() -> Outcomes:
    """t = 7 of 14 holders (n = 20, degree 13) and t = 5 of 10 (complete graph)."""
    return [
        *_new_participant(default_params(20, threshold=7), min_threshold=2),
        *_new_participant(default_params(10, threshold=5), min_threshold=2),
    ]


def roster_below_the_noises_min_inputs() -> Outcomes:
    """Site-level noise sized for 8 inputs, and a roster of 7 (three of 10 advertisements
    dropped, the victim's kept): no survivor set could reach 8, so the round can never
    release a sum, and an agent that masked would have booked its site-level ε for
    nothing. Refused at the roster, before anything is masked or booked."""
    params = default_params(10, word_bits=32)
    params = msgspec.structs.replace(
        params, noise=SiteNoise(noise_multiplier=1.0, min_inputs=8, count_noise=0.0)
    )
    round = HonestRound(10, params=params)
    roster = round.keys()
    small = msgspec.structs.replace(roster, entries=roster.entries[:7])
    return [attempt(round.participants["agent-00"].on_roster, small)]


def duplicate_agent_in_roster() -> Outcomes:
    round = HonestRound(10)
    roster = round.keys()
    doubled = msgspec.structs.replace(roster, entries=(*roster.entries, roster.entries[4]))
    return [attempt(round.participants["agent-00"].on_roster, doubled)]


def colluder_copies_victims_keys() -> Outcomes:
    """A colluding agent advertises, under its own valid signature, one of the victim's keys."""
    outcomes: Outcomes = []
    for field in ("mask_key", "share_key", "seed_commitment"):
        round = HonestRound(10, colluders=["agent-09"])
        colluder = round.colluders["agent-09"]
        for agent in round.honest:
            round.send(agent, round.participants[agent].advertise_keys())
        roster = round.aggregator.close_keys()
        assert isinstance(roster, KeyRoster)
        victim_keys = keys_of(roster.entries[2])
        copied = msgspec.structs.replace(
            colluder.advertise(round.start), **{field: getattr(victim_keys, field)}
        )
        forged = msgspec.structs.replace(roster, entries=(*roster.entries, colluder.entry(copied)))
        outcomes.append(attempt(round.participants["agent-00"].on_roster, forged))
    return outcomes


def second_unmask_after_reveal() -> Outcomes:
    """After its one reveal the agent answers no unmask request, however it is changed."""
    round = HonestRound(10)
    check = round.to_check(gone=["agent-09"])
    confirmations = list(round.confirm(check, check.survivors).values())
    request = round.unmask_request(check, confirmations)  # "forgets" that agent-09 dropped
    victim = round.participants["agent-03"]
    first = victim.on_unmask(request)
    assert isinstance(first, Reveal)  # the one legitimate reveal
    assert {s.owner for s in first.seed_shares} == set(check.survivors)
    assert not first.mask_key_shares
    with_dropped = round.unmask_request(check, confirmations, dropped=("agent-09",))
    reordered = round.unmask_request(check, confirmations[::-1])
    # Claim the neighbour agent-04 dropped too: its mask-key share next to its seed share.
    without_4 = tuple(a for a in check.survivors if a != "agent-04")
    swapped = round.unmask_request(
        check, confirmations, survivors=without_4, dropped=("agent-04", "agent-09")
    )
    return [attempt(victim.on_unmask, r) for r in (request, with_dropped, reordered, swapped)]


def second_survivor_check_after_confirming() -> Outcomes:
    """Confirming a second, different set would let the coordinator split the view later."""
    round = HonestRound(10)
    check = round.to_check()
    victim = round.participants["agent-03"]
    assert isinstance(victim.on_check(check), SurvivorConfirmation)
    other = msgspec.structs.replace(check, survivors=check.survivors[1:])
    return [attempt(victim.on_check, check), attempt(victim.on_check, other)]


def second_roster_after_shares() -> Outcomes:
    """A second roster (with a substituted key) after the victim already made its shares."""
    round = HonestRound(10)
    roster = round.keys()
    victim = round.participants["agent-00"]
    victim.on_roster(roster)
    target = roster.entries[5]
    changed = msgspec.structs.replace(keys_of(target), mask_key=fresh_public_key("coordinator"))
    forged = replace_entry(roster, signed_by_coordinator(target.agent_id, changed))
    return [attempt(victim.on_roster, forged)]


def unmask_request_for_another_round() -> Outcomes:
    round = HonestRound(10)
    check = round.to_check()
    confirmations = list(round.confirm(check, check.survivors).values())
    request = msgspec.structs.replace(round.unmask_request(check, confirmations), round=2)
    return [attempt(round.participants["agent-00"].on_unmask, request)]


def unmask_request_for_another_roster() -> Outcomes:
    round = HonestRound(10)
    check = round.to_check()
    confirmations = list(round.confirm(check, check.survivors).values())
    request = msgspec.structs.replace(
        round.unmask_request(check, confirmations), roster_digest=bytes(32)
    )
    return [attempt(round.participants["agent-00"].on_unmask, request)]


@dataclass(frozen=True)
class Attack:
    name: str
    refusal: type[ProtocolError]
    run: Callable[[], Outcomes]


ATTACKS = [
    Attack("split-view-of-survivors", ConsistencyCheckFailed, split_view_of_survivors),
    Attack("victim-left-out-of-check", ConsistencyCheckFailed, victim_left_out_of_survivor_check),
    Attack("survivor-set-below-t", ConsistencyCheckFailed, survivor_set_below_threshold),
    Attack(
        "survivor-set-below-noise-min-inputs",
        ConsistencyCheckFailed,
        survivor_set_below_noise_min_inputs,
    ),
    Attack("mask-key-swapped", KeySignatureInvalid, mask_key_swapped_under_old_signature),
    Attack(
        "identity-substituted-pinned", KeySubstituted, identity_and_keys_substituted_against_pinned
    ),
    Attack("own-keys-by-coordinator", KeySubstituted, own_keys_replaced_by_coordinator),
    Attack("own-keys-stale-signed", KeySubstituted, own_keys_replaced_by_stale_signed_keys),
    Attack("previous-rounds-keys", KeySignatureInvalid, previous_rounds_keys_replayed),
    Attack("start-equivocated", StartMismatch, start_equivocated),
    Attack("survivor-and-dropped", ConflictingUnmaskRequest, survivor_also_listed_as_dropped),
    Attack("share-from-non-neighbour", ShareRejected, share_from_a_non_neighbour),
    Attack("delivery-below-t", TooFewNeighbours, delivery_below_threshold),
    Attack("old-shares-new-delivery", ShareRejected, old_shares_in_a_new_delivery),
    Attack("old-delivery-as-is", WrongRound, old_delivery_replayed_as_is),
    Attack("old-shares-old-digest", EnvelopeMismatch, old_shares_under_old_roster_digest),
    Attack("shares-moved-between-receivers", ShareRejected, shares_moved_between_receivers),
    Attack("threshold-below-floor", ThresholdTooLow, threshold_below_floor),
    Attack("threshold-not-majority", ThresholdTooLow, threshold_not_a_majority),
    Attack("graph-shrunk-below-default", ThresholdTooLow, graph_shrunk_below_the_default),
    Attack("roster-below-noise-min-inputs", NoiseTooLow, roster_below_the_noises_min_inputs),
    Attack("duplicate-agent-in-roster", DuplicateKeys, duplicate_agent_in_roster),
    Attack("colluder-copies-keys", DuplicateKeys, colluder_copies_victims_keys),
    Attack("second-unmask-after-reveal", ReplayedMessage, second_unmask_after_reveal),
    Attack("second-check-after-confirm", ReplayedMessage, second_survivor_check_after_confirming),
    Attack("second-roster-after-shares", ReplayedMessage, second_roster_after_shares),
    Attack("unmask-for-another-round", WrongRound, unmask_request_for_another_round),
    Attack("unmask-for-another-roster", EnvelopeMismatch, unmask_request_for_another_roster),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused(attack: Attack) -> None:
    outcomes = attack.run()
    assert outcomes
    for outcome in outcomes:
        assert not isinstance(outcome, Reveal), f"{attack.name}: the participant revealed shares"
        assert type(outcome) is attack.refusal, f"{attack.name}: got {outcome!r}"


def test_all_attacks_refused() -> None:
    """The whole table at once: 100 % of attacks end in their typed refusal."""
    refused = [a.name for a in ATTACKS if all(type(o) is a.refusal for o in a.run())]
    assert len(ATTACKS) >= 20
    assert refused == [a.name for a in ATTACKS]


def test_roster_order_does_not_change_neighbours() -> None:
    """The coordinator cannot pick neighbours by ordering the roster: the graph is a pure
    function of (seed, sorted ids, degree), and the roster digest of the sorted roster."""
    round = HonestRound(20)
    roster = round.keys()
    expected = neighbour_graph(sorted(round.ids), round.params.degree, graph_seed_of(round))
    assert len(expected["agent-00"]) == 13 < len(round.ids) - 1  # a sparse graph
    rng = random.Random(2)
    shuffled = list(roster.entries)
    rng.shuffle(shuffled)
    orders = [roster.entries, roster.entries[::-1], tuple(shuffled)]
    digests = set()
    for order in orders:
        for agent in round.ids:
            twin = round.twin(agent)
            bundle = twin.on_roster(msgspec.structs.replace(roster, entries=tuple(order)))
            assert twin.neighbours == expected[agent]
            assert [s.holder for s in bundle.shares] == sorted({agent, *expected[agent]})
            digests.add(bundle.roster_digest)
    assert len(digests) == 1


def test_delivery_with_exactly_t_shares_is_accepted() -> None:
    """Boundary control for delivery-below-t: t shares (own included) are enough."""
    round = HonestRound(20)
    deliveries = round.shares(round.keys())
    t = round.params.threshold
    delivery = deliveries["agent-05"]
    exact = msgspec.structs.replace(delivery, shares=delivery.shares[:t])
    participant = round.participants["agent-05"]
    assert not participant.ready_to_mask
    participant.on_delivery(exact)
    assert participant.ready_to_mask


def test_split_view_is_possible_only_with_t_signatures() -> None:
    """Control for split-view: with t signatures on the agent's own set, it does reveal."""
    round = HonestRound(10)
    check = round.to_check()
    t = round.params.threshold
    confirmations = round.confirm(check, check.survivors)
    request = round.unmask_request(check, list(confirmations.values())[:t])
    assert isinstance(round.participants["agent-00"].on_unmask(request), Reveal)
    short = round.unmask_request(check, list(confirmations.values())[: t - 1])
    assert type(attempt(round.participants["agent-01"].on_unmask, short)) is (
        ConsistencyCheckFailed
    )


def test_dropped_agents_get_mask_key_shares_only() -> None:
    """A legitimate dropout: the seed share and the mask-key share are never both revealed."""
    round = HonestRound(10)
    gone = "agent-09"
    check = round.to_check(gone=[gone])
    assert gone not in check.survivors
    confirmations = list(round.confirm(check, check.survivors).values())
    request = round.unmask_request(check, confirmations, dropped=(gone,))
    reveal = round.participants["agent-00"].on_unmask(request)
    assert {s.owner for s in reveal.mask_key_shares} == {gone}
    assert {s.owner for s in reveal.seed_shares} == set(check.survivors)


def test_refusal_ends_the_participants_round() -> None:
    """After one refusal the agent answers nothing more in the round, not even a request
    that would otherwise be acceptable."""
    round = HonestRound(10)
    check = round.to_check()
    confirmed = round.confirm(check, round.ids)
    agent = round.participants[round.ids[0]]
    too_few = round.unmask_request(check, list(confirmed.values())[: round.params.threshold - 1])
    assert isinstance(attempt(agent.on_unmask, too_few), ConsistencyCheckFailed)
    honest = round.unmask_request(check, list(confirmed.values()))
    assert isinstance(attempt(agent.on_unmask, honest), ReplayedMessage)
    assert isinstance(attempt(round.participants[round.ids[1]].on_unmask, honest), Reveal)


@pytest.mark.parametrize("n", [2, 3, 4, 6, 10, 12, 31, 100, 1000])
def test_the_default_graph_meets_the_default_floor(n: int) -> None:
    """An honest coordinator with default settings is never refused by the auto floor, and
    one step below its threshold is."""
    params = default_params(n)
    check_params(params, selected=n, min_threshold=0)
    if params.threshold > 2:
        lower = msgspec.structs.replace(params, threshold=params.threshold - 1)
        with pytest.raises(ThresholdTooLow):
            check_params(lower, selected=n, min_threshold=0)


# -- keys no exchange can use, and reveals that crowd out shares ----------------------------

LOW_ORDER_KEY = bytes(32)  # the identity point: every X25519 exchange with it gives zero


@pytest.mark.parametrize("field", ["share_key", "mask_key"])
def test_the_aggregator_refuses_a_low_order_key_at_intake(field: str) -> None:
    """One enrolled agent advertising a key of low order would stop every honest neighbour
    from sealing to it or masking with it (the round aborts, or the reveal stage crashes);
    it is refused as malformed, against that agent, and the round goes on without it."""
    honest = HonestRound(6, colluders=("agent-05",))
    colluder = honest.colluders["agent-05"]
    bad = msgspec.structs.replace(colluder.advertise(honest.start), **{field: LOW_ORDER_KEY})
    with pytest.raises(ProtocolError, match="unusable X25519") as refused:
        honest.send("agent-05", bad)
    assert refused.value.kind == "malformed"
    assert refused.value.sender == "agent-05"


@pytest.mark.parametrize("field", ["share_key", "mask_key"])
def test_a_roster_with_a_low_order_key_is_refused_before_anything_is_sealed(field: str) -> None:
    """A coordinator that lets such a key through: the agent refuses the roster before it
    seals a share or books anything, not halfway through masking."""
    honest = HonestRound(6, colluders=("agent-05",))
    roster = honest.keys()
    colluder = honest.colluders["agent-05"]
    bad = msgspec.structs.replace(colluder.advertise(honest.start), **{field: LOW_ORDER_KEY})
    entries = tuple(
        colluder.entry(bad) if entry.agent_id == "agent-05" else entry for entry in roster.entries
    )
    forged = msgspec.structs.replace(roster, entries=entries)
    victim = honest.participants["agent-00"]
    outcome = attempt(victim.on_roster, forged)
    assert isinstance(outcome, ProtocolError)
    assert "unusable X25519" in str(outcome)


def test_a_reveal_naming_one_owner_twice_is_refused() -> None:
    """Copies of its own genuine shares would fill every subset the reconstruction tries and
    abort the round; the reveal is refused instead, and the honest reveals recover the sum."""
    honest = HonestRound(10)
    check = honest.to_check()
    confirmations = honest.confirm(check, check.survivors)
    for agent, raw in confirmations.items():
        payload = decode_payload(open_envelope(raw))
        honest.aggregator.add(
            agent, payload, raw=raw, identity_key=bytes(identity(agent).verify_key)
        )
    sent = honest.aggregator.close_confirmations()
    assert isinstance(sent, UnmaskRequest)
    reveals = {a: honest.participants[a].on_unmask(sent) for a in check.survivors}
    liar = check.survivors[0]
    genuine = reveals[liar]
    copied = msgspec.structs.replace(genuine, seed_shares=genuine.seed_shares * 3)
    with pytest.raises(ProtocolError, match="names one owner twice"):
        honest.send(liar, copied)
    for agent in check.survivors[1:]:
        honest.send(agent, reveals[agent])
    result = honest.aggregator.close_reveals()
    assert result.__class__.__name__ == "Unmasked", result
    assert len(confirmations) == len(check.survivors)


def test_the_aggregator_refuses_keys_answering_another_start() -> None:
    """An agent that answers another start of the round (an older release's start, or one
    this coordinator did not send) is refused at intake, against that agent: the honest
    agents would refuse a roster holding it, and the round goes on without it."""
    honest = HonestRound(6, colluders=("agent-05",))
    colluder = honest.colluders["agent-05"]
    other = msgspec.structs.replace(honest.start, update_timeout_s=61.0)
    with pytest.raises(ProtocolError, match="another start") as refused:
        honest.send("agent-05", colluder.advertise(other))
    assert refused.value.kind == "malformed"
    assert refused.value.sender == "agent-05"
    honest.send("agent-05", colluder.advertise(honest.start))  # the same keys, the right start
    for agent in honest.honest:
        honest.send(agent, honest.participants[agent].advertise_keys())
    roster = honest.aggregator.close_keys()
    assert isinstance(roster, KeyRoster)
    assert [entry.agent_id for entry in roster.entries] == list(honest.ids)
