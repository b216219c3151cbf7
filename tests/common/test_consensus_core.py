"""The Tendermint core in small, deterministic scenarios (Algorithm 1 of arXiv 1807.04938)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import msgspec
import pytest
from fedgate_common.consensus.tendermint import (
    FUTURE_ROUNDS,
    Action,
    Broadcast,
    ConsensusCore,
    ConsensusState,
    Decided,
    Evidence,
    Persist,
    Relay,
    RequestValue,
    ScheduleTimeout,
    Timeout,
    Timeouts,
    is_commit_certificate,
)
from fedgate_common.consensus.types import (
    NIL,
    CommitCertificate,
    Proposal,
    SignedProposal,
    SignedVote,
    Step,
    Vote,
)

T = TypeVar("T")
FOUR = ("a", "b", "c", "d")  # at height 1 the proposers of rounds 0, 1, 2, 3 are b, c, d, a
TIMEOUTS = Timeouts(propose_s=1.0, prevote_s=0.5, precommit_s=0.5, delta_s=0.25)


def content_of(value: str) -> bytes:
    return b"ok:" + value.encode()


def is_valid(proposal: Proposal) -> bool:
    return proposal.content == content_of(proposal.value)


class Signer:
    """Opaque signatures that name what they sign; counts what ``me`` signed."""

    def __init__(self) -> None:
        self.signed: list[Vote | Proposal] = []

    def vote(self, vote: Vote) -> SignedVote:
        self.signed.append(vote)
        return signed_vote(vote.voter, vote.step, vote.value, round=vote.round, height=vote.height)

    def proposal(self, proposal: Proposal) -> SignedProposal:
        self.signed.append(proposal)
        return SignedProposal(proposal=proposal, signature=f"sig:{proposal}".encode())


def make_core(
    me: str = "a",
    validators: Sequence[str] = FOUR,
    *,
    state: ConsensusState | None = None,
    signer: Signer | None = None,
) -> ConsensusCore:
    signer = signer or Signer()
    return ConsensusCore(
        me=me,
        validators=validators,
        sign_vote=signer.vote,
        sign_proposal=signer.proposal,
        is_valid=is_valid,
        timeouts=TIMEOUTS,
        state=state,
    )


def signed_vote(
    voter: str, step: Step, value: str, *, round: int = 0, height: int = 1
) -> SignedVote:
    vote = Vote(height=height, round=round, step=step, value=value, voter=voter)
    return SignedVote(vote=vote, signature=f"sig:{voter}:{height}:{round}:{step}:{value}".encode())


def signed_proposal(
    value: str,
    *,
    round: int = 0,
    height: int = 1,
    valid_round: int = -1,
    proposer: str | None = None,
    validators: Sequence[str] = FOUR,
    content: bytes | None = None,
) -> SignedProposal:
    proposal = Proposal(
        height=height,
        round=round,
        value=value,
        valid_round=valid_round,
        proposer=proposer or validators[(height + round) % len(validators)],
        content=content_of(value) if content is None else content,
    )
    return SignedProposal(proposal=proposal, signature=b"sig:proposal")


def sent_votes(actions: Sequence[Action]) -> list[Vote]:
    return [
        a.message.vote
        for a in actions
        if isinstance(a, Broadcast) and isinstance(a.message, SignedVote)
    ]


def of_type(actions: Sequence[Action], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


def check_persist_first(actions: Sequence[Action]) -> None:
    """Persist comes before the Broadcast of anything signed, and holds what is sent."""
    persisted: ConsensusState | None = None
    for action in actions:
        if isinstance(action, Persist):
            persisted = action.state
        elif isinstance(action, Broadcast) and isinstance(action.message, SignedVote):
            assert persisted is not None
            assert action.message in persisted.own_votes
        elif isinstance(action, Broadcast) and isinstance(action.message, SignedProposal):
            assert persisted is not None
            assert action.message in persisted.own_proposals


def feed(core: ConsensusCore, *messages: SignedVote | SignedProposal) -> list[Action]:
    actions: list[Action] = []
    for message in messages:
        if isinstance(message, SignedVote):
            step_actions = core.on_vote(message)
        else:
            step_actions = core.on_proposal(message)
        check_persist_first(step_actions)
        actions.extend(step_actions)
    return actions


def last_state(actions: Sequence[Action]) -> ConsensusState:
    return of_type(actions, Persist)[-1].state


def locked_in_round_zero(value: str = "v") -> tuple[ConsensusCore, list[Action]]:
    """Cloud a at height 1, locked on ``value`` in round 0 (prevotes of a, b, c)."""
    core = make_core()
    actions = core.start_height(1)
    actions += feed(
        core,
        signed_proposal(value),
        signed_vote("b", "prevote", value),
        signed_vote("c", "prevote", value),
    )
    return core, actions


# -- deciding ---------------------------------------------------------------------------------


def test_one_cloud_decides_alone() -> None:
    signer = Signer()
    core = make_core("solo", ("solo",), signer=signer)
    actions = core.start_height(1)
    assert isinstance(actions[0], Persist)
    assert RequestValue(height=1, round=0) in actions
    actions = core.on_value(1, 0, "v1", content_of("v1"))
    check_persist_first(actions)
    [decided] = of_type(actions, Decided)
    assert (decided.height, decided.round, decided.value) == (1, 0, "v1")
    assert decided.content == content_of("v1")
    assert len(decided.certificate.precommits) == 1
    assert is_commit_certificate(decided.certificate, validators=("solo",))
    assert core.decided
    assert core.state.certificate == decided.certificate
    assert [type(s).__name__ for s in signer.signed] == ["Proposal", "Vote", "Vote"]
    # the next height, once the driver starts it
    core.start_height(2)
    [decided] = of_type(core.on_value(2, 0, "v2", content_of("v2")), Decided)
    assert (decided.height, decided.value) == (2, "v2")


def test_four_clouds_decide_in_round_zero_with_a_quorum_certificate() -> None:
    core = make_core()
    assert core.quorum == 3
    assert core.proposer(1, 0) == "b"
    actions = core.start_height(1)
    assert of_type(actions, ScheduleTimeout) == [
        ScheduleTimeout(step="propose", height=1, round=0, seconds=1.0)
    ]
    assert not of_type(actions, RequestValue)  # b proposes round 0, not a
    actions = feed(core, signed_proposal("v"))
    assert sent_votes(actions) == [Vote(height=1, round=0, step="prevote", value="v", voter="a")]
    actions = feed(core, signed_vote("b", "prevote", "v"), signed_vote("c", "prevote", "v"))
    assert sent_votes(actions) == [Vote(height=1, round=0, step="precommit", value="v", voter="a")]
    assert core.state.locked_value == "v"
    assert core.state.locked_round == 0
    assert core.state.valid_value == "v"
    assert core.state.valid_content == content_of("v")
    actions = feed(core, signed_vote("b", "precommit", "v"))
    assert not of_type(actions, Decided)
    actions = feed(core, signed_vote("d", "precommit", "v"))
    [decided] = of_type(actions, Decided)
    assert (decided.round, decided.value, decided.content) == (0, "v", content_of("v"))
    voters = [v.vote.voter for v in decided.certificate.precommits]
    assert voters == ["a", "b", "d"]
    assert is_commit_certificate(decided.certificate, validators=FOUR)
    assert Broadcast(message=decided.certificate) in actions
    # after the decision the height is over: nothing more happens until start_height
    assert feed(core, signed_vote("c", "precommit", "v")) == []
    assert core.on_timeout(Timeout(step="precommit", height=1, round=0)) == []


def test_three_clouds_need_two_and_tolerate_no_fault() -> None:
    core = make_core("x", ("x", "y", "z"))
    assert core.quorum == 2
    core.start_height(1)  # proposer of (1, 0) is y
    feed(core, signed_proposal("v", validators=("x", "y", "z")))
    actions = feed(core, signed_vote("y", "prevote", "v"))
    assert sent_votes(actions)[0].step == "precommit"
    [decided] = of_type(feed(core, signed_vote("z", "precommit", "v")), Decided)
    assert len(decided.certificate.precommits) == 2


def test_a_late_quorum_of_precommits_decides_an_earlier_round() -> None:
    """L49 holds for any round r of the height, not only the current one."""
    core = make_core()
    core.start_height(1)
    feed(core, signed_proposal("v"))  # a prevotes v
    actions = core.on_timeout(Timeout(step="prevote", height=1, round=0))
    assert sent_votes(actions)[0] == Vote(height=1, round=0, step="precommit", value=NIL, voter="a")
    actions = feed(core, *(signed_vote(v, "precommit", "v") for v in ("b", "c")))
    assert not of_type(actions, Decided)  # two for v, one for nil
    assert ScheduleTimeout(step="precommit", height=1, round=0, seconds=0.5) in actions
    core.on_timeout(Timeout(step="precommit", height=1, round=0))
    assert core.state.round == 1
    [decided] = of_type(feed(core, signed_vote("d", "precommit", "v")), Decided)
    assert (decided.round, decided.value) == (0, "v")
    assert [v.vote.voter for v in decided.certificate.precommits] == ["b", "c", "d"]


# -- locks -----------------------------------------------------------------------------------


def test_a_locked_cloud_prevotes_nil_for_another_value() -> None:
    core, _ = locked_in_round_zero("v")
    feed(core, *(signed_vote(v, "precommit", NIL) for v in ("c", "d")))
    core.on_timeout(Timeout(step="precommit", height=1, round=0))
    assert (core.state.round, core.state.step) == (1, "propose")
    actions = feed(core, signed_proposal("w", round=1))  # L22: locked on v, so nil
    assert sent_votes(actions) == [Vote(height=1, round=1, step="prevote", value=NIL, voter="a")]
    assert core.state.locked_value == "v"


def test_a_locked_cloud_prevotes_its_locked_value_again() -> None:
    core, _ = locked_in_round_zero("v")
    feed(core, *(signed_vote(v, "precommit", NIL) for v in ("c", "d")))
    core.on_timeout(Timeout(step="precommit", height=1, round=0))
    actions = feed(core, signed_proposal("v", round=1, valid_round=0))
    assert sent_votes(actions)[0].value == "v"  # L28–L30 with lockedValue = v


def test_a_lock_yields_only_to_a_later_quorum_of_prevotes() -> None:
    """L28–L29: a proposal of w with valid round 1 > lockedRound 0 unlocks, but only once a
    quorum of round-1 prevotes for w is held."""
    core, _ = locked_in_round_zero("v")
    feed(core, *(signed_vote(v, "precommit", NIL) for v in ("c", "d")))
    core.on_timeout(Timeout(step="precommit", height=1, round=0))
    feed(core, signed_proposal("w", round=1))  # a prevotes nil (locked)
    feed(core, *(signed_vote(v, "prevote", "w", round=1) for v in ("b", "c")))
    core.on_timeout(Timeout(step="prevote", height=1, round=1))  # a precommits nil
    feed(core, *(signed_vote(v, "precommit", NIL, round=1) for v in ("b", "c")))
    core.on_timeout(Timeout(step="precommit", height=1, round=1))
    assert core.state.round == 2
    assert core.state.locked_value == "v"
    # round 2, proposer d re-proposes w with valid round 1: only b, c prevoted w there
    assert feed(core, signed_proposal("w", round=2, valid_round=1)) == []
    actions = feed(core, signed_vote("d", "prevote", "w", round=1))
    assert sent_votes(actions) == [Vote(height=1, round=2, step="prevote", value="w", voter="a")]


def test_a_re_proposal_without_the_quorum_of_its_valid_round_is_not_prevoted() -> None:
    core, _ = locked_in_round_zero("v")
    feed(core, *(signed_vote(v, "precommit", NIL) for v in ("c", "d")))
    core.on_timeout(Timeout(step="precommit", height=1, round=0))
    feed(core, signed_vote("b", "prevote", NIL, round=1), signed_vote("c", "prevote", NIL, round=1))
    # a round-1 proposal of w claiming valid round 0, where w has no quorum: nothing fires
    feed(core, signed_proposal("w", round=1, valid_round=0))
    actions = core.on_timeout(Timeout(step="propose", height=1, round=1))
    assert sent_votes(actions)[0].value == NIL


def test_an_invalid_proposal_gets_a_nil_prevote() -> None:
    core = make_core()
    core.start_height(1)
    actions = feed(core, signed_proposal("v", content=b"not the content of v"))
    assert sent_votes(actions)[0].value == NIL


# -- signing at most once, across restarts ----------------------------------------------------


def test_resume_resends_what_was_signed_and_signs_nothing_new() -> None:
    core = make_core()
    actions = core.start_height(1)
    actions += feed(core, signed_proposal("v"))
    state = last_state(actions)
    signer = Signer()
    restored = make_core(state=state, signer=signer)
    actions = restored.resume()
    prevote = state.own_votes[0]
    assert Broadcast(message=prevote) in actions
    assert ScheduleTimeout(step="prevote", height=1, round=0, seconds=0.5) in actions
    assert not of_type(actions, Persist)
    assert signer.signed == []
    # a stale timer from before the crash changes nothing
    assert restored.on_timeout(Timeout(step="propose", height=1, round=0)) == []
    assert signer.signed == []


def test_a_restored_cloud_never_signs_a_second_vote_for_a_step() -> None:
    """Even if the state says the step was not left (a driver that wrote it too early), the
    signed prevote is sent again instead of a nil one."""
    core = make_core()
    core.start_height(1)
    actions = feed(core, signed_proposal("v"))
    state = msgspec.structs.replace(last_state(actions), step="propose")
    signer = Signer()
    restored = make_core(state=state, signer=signer)
    restored.resume()
    actions = restored.on_timeout(Timeout(step="propose", height=1, round=0))  # would be nil
    assert sent_votes(actions) == [Vote(height=1, round=0, step="prevote", value="v", voter="a")]
    assert signer.signed == []
    # and a precommit signed for v is re-sent when a quorum of nil prevotes would ask for nil
    _, actions = locked_in_round_zero("v")
    state = msgspec.structs.replace(last_state(actions), step="prevote")
    restored = make_core(state=state, signer=signer)
    actions = feed(restored, *(signed_vote(v, "prevote", NIL) for v in ("b", "c", "d")))
    assert sent_votes(actions) == [Vote(height=1, round=0, step="precommit", value="v", voter="a")]
    assert signer.signed == []


def test_a_restored_cloud_keeps_its_lock() -> None:
    _, actions = locked_in_round_zero("v")
    restored = make_core(state=last_state(actions))
    restored.resume()
    feed(restored, *(signed_vote(v, "precommit", NIL) for v in ("b", "c")))
    restored.on_timeout(Timeout(step="precommit", height=1, round=0))
    actions = feed(restored, signed_proposal("w", round=1))
    assert sent_votes(actions)[-1] == Vote(height=1, round=1, step="prevote", value=NIL, voter="a")


def test_a_restored_proposer_proposes_the_same_or_asks_again() -> None:
    core = make_core("c")  # proposer of (1, 1)
    core.start_height(1)
    feed(core, *(signed_vote(v, "precommit", NIL) for v in ("a", "b", "d")))
    actions = core.on_timeout(Timeout(step="precommit", height=1, round=0))
    assert RequestValue(height=1, round=1) in actions
    # crashed before the value came: it asks again
    restored = make_core("c", state=last_state(actions))
    assert RequestValue(height=1, round=1) in restored.resume()
    actions = restored.on_value(1, 1, "w", content_of("w"))
    check_persist_first(actions)
    proposal = of_type(actions, Broadcast)[0].message
    assert isinstance(proposal, SignedProposal)
    assert proposal.proposal.value == "w"
    # crashed after proposing: the same proposal again, never a second one
    signer = Signer()
    again = make_core("c", state=last_state(actions), signer=signer)
    actions = again.resume()
    assert Broadcast(message=proposal) in actions
    assert again.on_value(1, 1, "w2", content_of("w2")) == []
    assert not [s for s in signer.signed if isinstance(s, Proposal)]


def test_a_vote_of_its_own_from_the_network_is_never_contradicted() -> None:
    """A vote this cloud signed but lost from its state (e.g. restored from an old backup)
    comes back from a peer: it is adopted, and the step is answered with it."""
    signer = Signer()
    core = make_core(signer=signer)
    core.start_height(1)
    mine = signed_vote("a", "prevote", "v")
    actions = feed(core, mine)
    assert isinstance(actions[0], Persist)
    assert mine in actions[0].state.own_votes
    actions = core.on_timeout(Timeout(step="propose", height=1, round=0))
    assert sent_votes(actions) == [mine.vote]
    assert signer.signed == []


def test_persist_comes_before_every_broadcast_of_a_new_signature() -> None:
    core = make_core("b")  # proposer of (1, 0)
    actions = core.start_height(1)
    actions = core.on_value(1, 0, "v", content_of("v"))
    assert isinstance(actions[0], Persist)
    kinds = [type(a).__name__ for a in actions]
    assert kinds.index("Persist") < kinds.index("Broadcast")
    check_persist_first(actions)
    actions = feed(core, signed_vote("a", "prevote", "v"), signed_vote("c", "prevote", "v"))
    assert isinstance(actions[0], Persist)
    assert sent_votes(actions)[0].step == "precommit"


# -- what peers cannot do ---------------------------------------------------------------------


def test_votes_of_strangers_and_proposals_of_non_proposers_are_ignored() -> None:
    core = make_core()
    core.start_height(1)
    assert core.on_vote(signed_vote("mallory", "prevote", "v")) == []
    assert core.on_proposal(signed_proposal("v", proposer="c")) == []  # b proposes round 0
    assert core.on_proposal(signed_proposal("v", proposer="mallory")) == []
    assert core.on_proposal(signed_proposal(NIL)) == []
    assert core.on_proposal(signed_proposal("v", round=1, valid_round=1)) == []  # vr ≥ r
    assert core.state.step == "propose"
    # strangers' prevotes do not make a quorum for anything
    feed(core, *(signed_vote(s, "prevote", NIL) for s in ("x", "y", "z")))
    assert core.on_timeout(Timeout(step="prevote", height=1, round=0)) == []
    actions = feed(core, signed_proposal("v"))
    assert sent_votes(actions)[0].value == "v"


def test_past_heights_are_ignored() -> None:
    core = make_core()
    core.start_height(2)
    assert core.on_vote(signed_vote("b", "prevote", "v", height=1)) == []
    assert core.on_proposal(signed_proposal("v", height=1)) == []
    with pytest.raises(ValueError, match="below the current height"):
        core.start_height(1)
    assert core.start_height(2) == []  # the current height again: nothing to do


def test_an_equivocating_voter_is_reported_once() -> None:
    core = make_core()
    core.start_height(1)
    first = signed_vote("b", "prevote", "v")
    second = signed_vote("b", "prevote", "w")
    assert core.on_vote(first) == []
    assert core.on_vote(first) == []  # a duplicate is not evidence
    assert core.on_vote(second) == [Evidence(first=first, second=second)]
    assert core.on_vote(signed_vote("b", "prevote", "x")) == []  # reported already
    assert core.on_vote(signed_vote("b", "precommit", "v")) == []
    [evidence] = of_type(core.on_vote(signed_vote("b", "precommit", NIL)), Evidence)
    assert evidence.first.vote.step == "precommit"


def test_an_equivocator_counts_once_per_value_it_signed() -> None:
    """d's prevote for v in round 0 reaches a after its nil prevote: it still counts for v
    once a proposal names v for round 0 (here, the re-proposal with valid round 0)."""
    core = make_core()
    core.start_height(1)
    feed(core, signed_vote("d", "prevote", NIL))  # d's first round-0 prevote: nil
    feed(core, signed_vote("b", "prevote", "v"), signed_vote("c", "prevote", "v"))
    core.on_timeout(Timeout(step="propose", height=1, round=0))  # a prevotes nil
    core.on_timeout(Timeout(step="prevote", height=1, round=0))  # a precommits nil
    feed(core, *(signed_vote(v, "precommit", NIL) for v in ("b", "c")))
    core.on_timeout(Timeout(step="precommit", height=1, round=0))
    assert core.state.round == 1
    assert feed(core, signed_proposal("v", round=1, valid_round=0)) == []  # b, c only
    actions = feed(core, signed_vote("d", "prevote", "v"))  # d equivocated; counts for v
    assert of_type(actions, Evidence)
    assert sent_votes(actions) == [Vote(height=1, round=1, step="prevote", value="v", voter="a")]


def test_the_proof_of_the_valid_value_is_relayed() -> None:
    core, _ = locked_in_round_zero("v")
    relayed = [a.message for a in core.rebroadcast() if isinstance(a, Relay)]
    assert relayed == [signed_vote("b", "prevote", "v"), signed_vote("c", "prevote", "v")]


def test_a_round_skip_needs_f_plus_one_clouds() -> None:
    core = make_core()
    core.start_height(1)
    assert feed(core, signed_vote("b", "prevote", NIL, round=3)) == []
    assert core.state.round == 0
    actions = feed(core, signed_vote("c", "precommit", NIL, round=3))
    assert core.state.round == 3
    assert ScheduleTimeout(step="propose", height=1, round=3, seconds=1.75) in actions
    # rounds beyond the window are not held: no skip however many send them
    far = 3 + FUTURE_ROUNDS + 1
    for voter in ("b", "c", "d"):
        assert core.on_vote(signed_vote(voter, "prevote", NIL, round=far)) == []
    assert core.state.round == 3


def test_the_next_height_is_buffered_within_bounds_and_replayed() -> None:
    core = make_core()
    core.start_height(1)
    for round in range(60):
        for voter in FOUR:
            for step in ("prevote", "precommit"):
                assert core.on_vote(signed_vote(voter, step, "w", round=round, height=2)) == []
        core.on_proposal(signed_proposal("w", round=round, height=2))
        core.on_vote(signed_vote("b", "prevote", "x", round=round, height=3))  # too far
    assert core.buffered == (FUTURE_ROUNDS + 1) * (2 * len(FOUR) + 1)
    # height 2 starts with a proposal and a quorum of precommits for w already held
    actions = core.start_height(2)
    [decided] = of_type(actions, Decided)
    assert (decided.height, decided.round, decided.value) == (2, 0, "w")
    assert core.buffered == 0


def test_a_buffered_equivocation_is_reported() -> None:
    core = make_core()
    core.start_height(1)
    first = signed_vote("c", "prevote", "w", height=2)
    core.on_vote(first)
    second = signed_vote("c", "prevote", "z", height=2)
    assert core.on_vote(second) == [Evidence(first=first, second=second)]


# -- catch-up ---------------------------------------------------------------------------------


def certificate(
    value: str, voters: Sequence[str], *, round: int = 2, height: int = 1
) -> CommitCertificate:
    return CommitCertificate(
        height=height,
        round=round,
        value=value,
        precommits=tuple(
            signed_vote(v, "precommit", value, round=round, height=height) for v in voters
        ),
    )


def test_a_certificate_decides_the_current_height() -> None:
    core = make_core()
    core.start_height(1)
    proof = certificate("v", ("b", "c", "d"))
    actions = core.on_certificate(proof)
    assert isinstance(actions[0], Persist)
    [decided] = of_type(actions, Decided)
    assert (decided.round, decided.value, decided.content) == (2, "v", None)
    assert core.state.certificate == proof
    assert core.decided
    assert core.on_certificate(proof) == []
    assert Broadcast(message=proof) in core.rebroadcast()


def test_a_certificate_uses_the_content_of_a_held_proposal() -> None:
    core = make_core()
    core.start_height(1)
    feed(core, signed_proposal("v"))
    [decided] = of_type(core.on_certificate(certificate("v", ("b", "c", "d"))), Decided)
    assert decided.content == content_of("v")


@pytest.mark.parametrize(
    "proof",
    [
        certificate("v", ("b", "c")),  # no quorum
        certificate("v", ("b", "b", "c")),  # a voter twice
        certificate("v", ("b", "c", "mallory")),  # a stranger
        certificate(NIL, ("b", "c", "d")),  # nil is not a decision
        certificate("v", ("b", "c", "d"), height=2),  # another height
        CommitCertificate(
            height=1,
            round=2,
            value="v",
            precommits=(
                *certificate("v", ("b", "c")).precommits,
                signed_vote("d", "precommit", "w", round=2),  # for another value
            ),
        ),
        CommitCertificate(
            height=1,
            round=2,
            value="v",
            precommits=(
                *certificate("v", ("b", "c")).precommits,
                signed_vote("d", "prevote", "v", round=2),  # not a precommit
            ),
        ),
    ],
)
def test_a_malformed_certificate_decides_nothing(proof: CommitCertificate) -> None:
    core = make_core()
    core.start_height(1)
    assert core.on_certificate(proof) == []
    assert not core.decided


def test_resume_after_a_decision_reports_it_again() -> None:
    core = make_core()
    core.start_height(1)
    feed(core, signed_proposal("v"))
    actions = core.on_certificate(certificate("v", ("b", "c", "d")))
    restored = make_core(state=last_state(actions))
    actions = restored.resume()
    [decided] = of_type(actions, Decided)
    assert decided.value == "v"
    assert decided.content is None
    assert not of_type(actions, ScheduleTimeout)
    assert of_type(restored.start_height(2), Persist)


# -- values, timeouts, state ------------------------------------------------------------------


def test_a_late_value_is_ignored() -> None:
    core = make_core("b")
    core.start_height(1)
    core.on_timeout(Timeout(step="propose", height=1, round=0))  # b gave up waiting
    assert core.on_value(1, 0, "v", content_of("v")) == []
    assert core.on_value(2, 0, "v", content_of("v")) == []


def test_timeouts_grow_per_round() -> None:
    assert TIMEOUTS.seconds("propose", 0) == 1.0
    assert TIMEOUTS.seconds("prevote", 4) == 1.5
    assert TIMEOUTS.seconds("precommit", 2) == 1.0
    with pytest.raises(ValueError, match="propose_s"):
        Timeouts(propose_s=0.0, prevote_s=1.0, precommit_s=1.0, delta_s=0.0)
    with pytest.raises(ValueError, match="delta_s"):
        Timeouts(propose_s=1.0, prevote_s=1.0, precommit_s=1.0, delta_s=-1.0)


def test_the_state_round_trips_through_msgpack() -> None:
    core, _ = locked_in_round_zero("v")
    core.on_certificate(certificate("v", ("b", "c", "d")))
    state = core.state
    assert state.own_votes
    assert state.certificate is not None
    assert state.valid_content
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=ConsensusState)
    assert decoded == state


def test_constructor_rejects_inconsistent_arguments() -> None:
    with pytest.raises(ValueError, match="not one of"):
        make_core("z")
    with pytest.raises(ValueError, match="repeat"):
        make_core("a", ("a", "a", "b"))
    _, actions = locked_in_round_zero("v")
    with pytest.raises(ValueError, match="state holds a vote of a"):
        make_core("b", state=last_state(actions))
    with pytest.raises(ValueError, match="numbered from 1"):
        make_core().start_height(0)
