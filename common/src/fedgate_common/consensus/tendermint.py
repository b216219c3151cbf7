"""Tendermint's consensus algorithm as an IO-free state machine (DESIGN.md §5).

Anchor: Buchman, Kwon, Milosevic, *The latest gossip on BFT consensus*, arXiv 1807.04938,
**Algorithm 1**. Line numbers quoted in docstrings (``L22``, ``L36``…) are that listing's.

Events in, actions out: every input method returns the list of :data:`Action` values the
driver performs **in order**. The core reads no clock, does no IO and draws no random numbers;
the driver owns the network, timers, the durable journal and ``getValue()``.

Departures from the paper's pseudo-code, each needed by the setting and none weakening it:

* ``q = quorum_size(M)`` replaces ``2f + 1`` and ``f + 1 = faults_tolerated(M) + 1`` is the
  round-skip threshold, so M not of the form 3f + 1 stays correct (M = 1 decides alone;
  M = 3 tolerates no fault). Two quorums share at least f + 1 clouds, one of them honest.
* ``getValue()`` (L18) is asynchronous: the core emits :class:`RequestValue` and proposes
  when :meth:`ConsensusCore.on_value` answers. Therefore ``timeoutPropose`` is scheduled in
  every StartRound (L21 schedules it only for non-proposers), so a proposer whose value
  never comes still prevotes nil and the height goes on.
* Deciding (L49–L54) does not start the next height by itself: the core emits
  :class:`Decided` (and broadcasts the certificate) and waits for the driver's
  :meth:`~ConsensusCore.start_height`, which performs L53–L54.
* Peers cannot make it grow without bound: kept are the proposer's first proposal per
  round (a proposal with no value or with a valid round outside −1 ≤ vr < r is dropped: an
  honest proposer never sends one) and each voter's first vote per (round, step), only for
  rounds up to ``round + FUTURE_ROUNDS``; messages for ``height + 1`` are buffered under
  the same rule relative to round 0 and replayed when that height starts; older heights
  are ignored. What is kept for the current height grows only with its round number,
  which honest clouds advance (a timeout needs a quorum, a round skip f + 1 senders).
* A voter's *second*, conflicting vote for a (round, step) is reported as
  :class:`Evidence` and is also counted, for its value only, when a held proposal names
  that value for that round (see :class:`_MessageLog`); and the core relays (:class:`Relay`)
  the peers' prevotes that justify its valid value. Both stand in for the paper's gossip
  assumption (every message a correct process receives reaches every correct process):
  without them an equivocator can leave an honest cloud locked on a value that the others
  can never see a quorum for, and the height never ends.
* The core persists, before anything it signs leaves, its own signed messages of the
  height, its lock and its valid value (:class:`Persist` is always the first action of a
  list that changed them), and never signs a second message for a (height, round, step),
  even after a restart (:meth:`~ConsensusCore.resume`). A vote or proposal signed by this
  cloud that comes back from the network is adopted as its own, for the same reason.

Signatures are opaque: the driver verifies them before a message reaches the core.
Heights are federated rounds, numbered from 1; a fresh state is at height 0 ("none begun").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final, TypeAlias

import msgspec

from fedgate_common.consensus.quorum import faults_tolerated, quorum_size
from fedgate_common.consensus.types import (
    NIL,
    CommitCertificate,
    Proposal,
    SignedProposal,
    SignedVote,
    Step,
    TimeoutStep,
    Vote,
)

FUTURE_ROUNDS: Final = 8
"""Messages are kept for rounds up to the current round plus this many (round 0 plus this
many for the next height). Further rounds are dropped; the periodic rebroadcast of the
peers brings them again once this cloud has caught up."""

_STEP_ORDER: Final[dict[TimeoutStep, int]] = {"propose": 0, "prevote": 1, "precommit": 2}


class Timeouts(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Step timeouts in seconds; round r waits ``base + r * delta_s`` (they grow per round, so
    that after GST a round is eventually long enough for every honest cloud)."""

    propose_s: float
    prevote_s: float
    precommit_s: float
    delta_s: float

    def __post_init__(self) -> None:
        for name in ("propose_s", "prevote_s", "precommit_s"):
            seconds = getattr(self, name)
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"timeout {name} must be a positive number, not {seconds!r}")
        if not (math.isfinite(self.delta_s) and self.delta_s >= 0):
            raise ValueError(f"timeout delta_s must be ≥ 0, not {self.delta_s!r}")

    def seconds(self, step: TimeoutStep, round: int) -> float:
        """timeoutPropose / timeoutPrevote / timeoutPrecommit of ``round``."""
        base = {"propose": self.propose_s, "prevote": self.prevote_s}.get(step, self.precommit_s)
        return base + round * self.delta_s


class ConsensusState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the core must find again after a restart (msgpack round-trips it).

    ``own_proposals`` / ``own_votes`` are every message this cloud signed at ``height``;
    ``certificate`` is the last decision (of ``height`` once decided, else of an earlier one).
    ``locked_value`` / ``valid_value`` are :data:`NIL` when unset (lockedValue = nil).
    """

    height: int = 0
    round: int = 0
    step: TimeoutStep = "propose"
    locked_value: str = NIL
    locked_round: int = -1
    valid_value: str = NIL
    valid_round: int = -1
    valid_content: bytes = b""
    own_proposals: tuple[SignedProposal, ...] = ()
    own_votes: tuple[SignedVote, ...] = ()
    certificate: CommitCertificate | None = None


class Timeout(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A timer the driver scheduled (:class:`ScheduleTimeout`) has fired."""

    step: TimeoutStep
    height: int
    round: int


# -- actions ---------------------------------------------------------------------------------


class Persist(msgspec.Struct, frozen=True, kw_only=True):
    """Write ``state`` durably (fsync) before performing any later action of the list."""

    state: ConsensusState


class Broadcast(msgspec.Struct, frozen=True, kw_only=True):
    """Send ``message`` to every other cloud (the core has already counted it itself)."""

    message: SignedProposal | SignedVote | CommitCertificate


class Relay(msgspec.Struct, frozen=True, kw_only=True):
    """Send a peer's signed vote on to every other cloud (gossip). These are the prevotes
    that make this cloud's valid value re-proposable (L28 at the peers); the vote is not
    this cloud's own: do not record it as signed by it."""

    message: SignedVote


class ScheduleTimeout(msgspec.Struct, frozen=True, kw_only=True):
    """Call :meth:`ConsensusCore.on_timeout` with :attr:`timeout` after ``seconds``."""

    step: TimeoutStep
    height: int
    round: int
    seconds: float

    @property
    def timeout(self) -> Timeout:
        return Timeout(step=self.step, height=self.height, round=self.round)


class RequestValue(msgspec.Struct, frozen=True, kw_only=True):
    """getValue() (L18): answer with :meth:`ConsensusCore.on_value` (late or never is fine)."""

    height: int
    round: int


class Decided(msgspec.Struct, frozen=True, kw_only=True):
    """``value`` is decided at ``height`` (L49–L51). ``content`` is ``None`` when the core
    learnt the decision from a certificate without holding the proposal: fetch the model."""

    height: int
    round: int
    value: str
    content: bytes | None
    certificate: CommitCertificate


class Evidence(msgspec.Struct, frozen=True, kw_only=True):
    """One voter signed two different values for the same (height, round, step)."""

    first: SignedVote
    second: SignedVote


Action: TypeAlias = (
    Persist | Broadcast | Relay | ScheduleTimeout | RequestValue | Decided | Evidence
)


def is_commit_certificate(certificate: CommitCertificate, *, validators: Sequence[str]) -> bool:
    """True when ``certificate`` holds a quorum of precommits for its own (height, round,
    value) from distinct validators. Structure only: signatures are the driver's check."""
    members = frozenset(validators)
    if certificate.value == NIL or not members:
        return False
    voters: set[str] = set()
    for signed in certificate.precommits:
        vote = signed.vote
        if (
            vote.step != "precommit"
            or vote.height != certificate.height
            or vote.round != certificate.round
            or vote.value != certificate.value
            or vote.voter not in members
            or vote.voter in voters
        ):
            return False
        voters.add(vote.voter)
    return len(voters) >= quorum_size(len(members))


class _MessageLog:
    """The messages of one height, with running tallies for the upon-rules.

    Kept: the proposer's first proposal per round; each voter's first vote per (round, step)
    (it alone counts towards "a quorum of votes for anything", L34 / L47, and towards the
    senders of a round, L55); and a voter's *conflicting* vote only when it is for a value
    some held proposal names for that round (its own value, or the value it re-proposes with
    that valid round). Counting an equivocator for two values is the paper's semantics (a
    quorum of ⟨PREVOTE, h, r, id(v)⟩ messages from distinct senders) and is safe: two quorums
    for different values still share an honest cloud. Holding only the first would lose
    liveness: a cloud locked on v with an equivocator's prevote in its quorum could never
    convince peers that kept the equivocator's other vote (L28 needs that quorum).
    """

    __slots__ = (
        "anchors",
        "extra",
        "height",
        "proposals",
        "reported",
        "senders",
        "tally",
        "voters",
        "votes",
    )

    def __init__(self, height: int) -> None:
        self.height = height
        self.proposals: dict[int, SignedProposal] = {}
        self.votes: dict[tuple[int, Step, str], SignedVote] = {}  # the first per key
        self.extra: dict[tuple[int, Step, str, str], SignedVote] = {}  # + value: conflicting
        self.anchors: set[tuple[int, str]] = set()  # (round, value) a held proposal names
        self.tally: dict[tuple[int, Step, str], int] = {}  # (round, step, value) → voters
        self.voters: dict[tuple[int, Step], int] = {}  # (round, step) → voters, any value
        self.senders: dict[int, set[str]] = {}  # round → clouds with a message in it (L55)
        self.reported: set[tuple[int, Step, str]] = set()  # (round, step, voter) with evidence

    def add_vote(self, signed: SignedVote) -> tuple[bool, SignedVote | None]:
        """Returns (counted, the first vote to report as evidence when this one conflicts
        with it and that voter was not reported yet for this round and step)."""
        vote = signed.vote
        key = (vote.round, vote.step, vote.voter)
        first = self.votes.get(key)
        counted = (vote.round, vote.step, vote.value)
        if first is None:
            self.votes[key] = signed
            self.tally[counted] = self.tally.get(counted, 0) + 1
            any_value = (vote.round, vote.step)
            self.voters[any_value] = self.voters.get(any_value, 0) + 1
            self.senders.setdefault(vote.round, set()).add(vote.voter)
            return True, None
        if first.vote.value == vote.value:
            return False, None
        report = None
        if key not in self.reported:
            self.reported.add(key)
            report = first
        extra_key = (vote.round, vote.step, vote.voter, vote.value)
        if (vote.round, vote.value) not in self.anchors or extra_key in self.extra:
            return False, report
        self.extra[extra_key] = signed
        self.tally[counted] = self.tally.get(counted, 0) + 1
        return True, report

    def add_proposal(self, signed: SignedProposal) -> bool:
        proposal = signed.proposal
        if proposal.round in self.proposals:
            return False
        self.proposals[proposal.round] = signed
        self.anchors.add((proposal.round, proposal.value))
        if proposal.valid_round >= 0:
            self.anchors.add((proposal.valid_round, proposal.value))
        self.senders.setdefault(proposal.round, set()).add(proposal.proposer)
        return True

    def count(self, round: int, step: Step, value: str) -> int:
        return self.tally.get((round, step, value), 0)

    def votes_for(
        self, round: int, step: Step, value: str, validators: Sequence[str]
    ) -> tuple[SignedVote, ...]:
        """The held votes for (round, step, value), one per voter, in validator order."""
        found: list[SignedVote] = []
        for voter in validators:
            first = self.votes.get((round, step, voter))
            if first is not None and first.vote.value == value:
                found.append(first)
            else:
                other = self.extra.get((round, step, voter, value))
                if other is not None:
                    found.append(other)
        return tuple(found)


class ConsensusCore:
    """One validator of Algorithm 1 (see the module docstring for the contract).

    ``validators`` is the ordered list of cloud ids; the proposer of (h, r) is
    ``validators[(h + r) % M]``. ``is_valid`` is valid(v): it judges ``proposal.content``
    and that it yields ``proposal.value``. ``state`` resumes after a restart (then call
    :meth:`resume`); without it the core waits for :meth:`start_height`.
    """

    def __init__(
        self,
        *,
        me: str,
        validators: Sequence[str],
        sign_vote: Callable[[Vote], SignedVote],
        sign_proposal: Callable[[Proposal], SignedProposal],
        is_valid: Callable[[Proposal], bool],
        timeouts: Timeouts,
        state: ConsensusState | None = None,
    ) -> None:
        ordered = tuple(validators)
        if not ordered:
            raise ValueError("consensus needs at least one validator")
        if len(set(ordered)) != len(ordered):
            raise ValueError(f"validators repeat a cloud: {ordered}")
        if me not in ordered:
            raise ValueError(f"{me!r} is not one of the validators {ordered}")
        self._me = me
        self._validators = ordered
        self._members = frozenset(ordered)
        self._quorum = quorum_size(len(ordered))
        self._skip_threshold = faults_tolerated(len(ordered)) + 1
        self._sign_vote = sign_vote
        self._sign_proposal = sign_proposal
        self._is_valid = is_valid
        self._timeouts = timeouts
        restored = state if state is not None else ConsensusState()
        self._check_restored(restored)
        self._height = restored.height
        self._round = restored.round
        self._step: TimeoutStep = restored.step
        self._locked_value = restored.locked_value
        self._locked_round = restored.locked_round
        self._valid_value = restored.valid_value
        self._valid_round = restored.valid_round
        self._valid_content = restored.valid_content
        self._certificate = restored.certificate
        self._own_proposals = {p.proposal.round: p for p in restored.own_proposals}
        self._own_votes = {(v.vote.round, v.vote.step): v for v in restored.own_votes}
        self._log = _MessageLog(self._height)
        self._next = _MessageLog(self._height + 1)
        for signed_proposal in restored.own_proposals:
            self._log.add_proposal(signed_proposal)
        for signed_vote in restored.own_votes:
            self._log.add_vote(signed_vote)
        self._reset_round_memory()
        self._snapshot: ConsensusState | None = restored
        self._dirty = False

    def _check_restored(self, state: ConsensusState) -> None:
        if state.height < 0 or state.round < 0 or state.step not in _STEP_ORDER:
            raise ValueError(f"not a consensus state: height {state.height} round {state.round}")
        for signed in state.own_proposals:
            p = signed.proposal
            if p.proposer != self._me or p.height != state.height:
                raise ValueError(f"state holds a proposal of {p.proposer} at height {p.height}")
        for vote in (v.vote for v in state.own_votes):
            if vote.voter != self._me or vote.height != state.height:
                raise ValueError(f"state holds a vote of {vote.voter} at height {vote.height}")
        if state.height == 0 and (state.own_proposals or state.own_votes):
            raise ValueError("a state before the first height holds signed messages")

    def _reset_round_memory(self) -> None:
        """What only speeds a height up and may be forgotten in a crash (not persisted)."""
        self._valid_cache: dict[int, bool] = {}  # round → valid(v) of the proposal held
        self._prevote_timer_round = -1  # L34 "for the first time": the round it fired in
        self._precommit_timer_round = -1  # L47
        self._locked_in_round = -1  # L36
        self._skip_to = -1  # highest round > round_p with f + 1 senders (L55)

    # -- inspection --------------------------------------------------------------------------

    @property
    def state(self) -> ConsensusState:
        """The state to persist; the driver gets it in :class:`Persist` when it changes."""
        if self._snapshot is None:
            self._snapshot = ConsensusState(
                height=self._height,
                round=self._round,
                step=self._step,
                locked_value=self._locked_value,
                locked_round=self._locked_round,
                valid_value=self._valid_value,
                valid_round=self._valid_round,
                valid_content=self._valid_content,
                own_proposals=tuple(self._own_proposals.values()),
                own_votes=tuple(self._own_votes.values()),
                certificate=self._certificate,
            )
        return self._snapshot

    @property
    def quorum(self) -> int:
        return self._quorum

    def proposer(self, height: int, round: int) -> str:
        """proposer(h, r) = validators[(h + r) mod M]."""
        return self._validators[(height + round) % len(self._validators)]

    def keeps(self, height: int, round: int) -> bool:
        """Whether a message for (``height``, ``round``) lies where :meth:`on_vote` and
        :meth:`on_proposal` look: the current height up to ``FUTURE_ROUNDS`` rounds ahead,
        or the first ``FUTURE_ROUNDS`` + 1 rounds of the next. The driver stores only
        these, so a peer cannot fill its disk with votes for heights nobody will reach."""
        if round < 0:
            return False
        if height == self._height + 1:
            return round <= FUTURE_ROUNDS
        return self._height >= 1 and height == self._height and round <= self._round + FUTURE_ROUNDS

    @property
    def buffered(self) -> int:
        """Messages held for the next height: at most (FUTURE_ROUNDS + 1) × (2M + 1) first
        proposals and votes, plus conflicting votes for values those proposals name."""
        return len(self._next.votes) + len(self._next.extra) + len(self._next.proposals)

    @property
    def decided(self) -> bool:
        """decision_p[h_p] ≠ nil: the current height has a certificate."""
        return self._certificate is not None and self._certificate.height == self._height

    # -- inputs ------------------------------------------------------------------------------

    def start_height(self, height: int) -> list[Action]:
        """Begin ``height``: L53 (reset lock, valid value and message log) and L54 / L10
        (StartRound(0)), then replay what was buffered for it. A repeated call for the
        current height does nothing; heights only increase (a lower one is a driver bug)."""
        if height < 1:
            raise ValueError(f"heights are numbered from 1, not {height}")
        if height < self._height:
            raise ValueError(f"height {height} is below the current height {self._height}")
        if height == self._height:
            return []
        out: list[Action] = []
        log = self._next if height == self._height + 1 else _MessageLog(height)
        self._height = height
        self._locked_value, self._locked_round = NIL, -1
        self._valid_value, self._valid_round, self._valid_content = NIL, -1, b""
        self._own_proposals = {}
        self._own_votes = {}
        self._log = log
        self._next = _MessageLog(height + 1)
        self._reset_round_memory()
        for signed_vote in log.votes.values():
            if signed_vote.vote.voter == self._me:
                self._own_votes.setdefault(
                    (signed_vote.vote.round, signed_vote.vote.step), signed_vote
                )
        for signed_proposal in log.proposals.values():
            if signed_proposal.proposal.proposer == self._me:
                self._own_proposals.setdefault(signed_proposal.proposal.round, signed_proposal)
        self._changed()
        self._start_round(0, out)
        for round in sorted(log.proposals):
            self._try_decide(round, out)
        for round in sorted(log.senders):
            self._note_round(round)
        self._progress(out)
        return self._finish(out)

    def on_value(self, height: int, round: int, value: str, content: bytes) -> list[Action]:
        """The driver's answer to :class:`RequestValue` (getValue(), L18): propose (L19),
        unless (height, round) is no longer current or this round already has a proposal."""
        if value == NIL:
            raise ValueError("getValue() must return a value, not NIL")
        if (
            self.decided
            or height != self._height
            or round != self._round
            or self._step != "propose"
            or self.proposer(height, round) != self._me
            or round in self._own_proposals
        ):
            return []
        out: list[Action] = []
        if self._valid_value != NIL:  # L15–L16 take precedence over a fresh value
            self._send_proposal(self._valid_value, self._valid_round, self._valid_content, out)
        else:
            self._send_proposal(value, -1, content, out)
        self._progress(out)
        return self._finish(out)

    def on_proposal(self, signed: SignedProposal) -> list[Action]:
        """⟨PROPOSAL, h, r, v, vr⟩: kept only when it comes from proposer(h, r) (L22, L28,
        L36, L49 all say "from proposer"), names a value and has −1 ≤ vr < r."""
        proposal = signed.proposal
        if (
            proposal.round < 0
            or proposal.value == NIL
            or not -1 <= proposal.valid_round < proposal.round
            or proposal.proposer != self.proposer(proposal.height, proposal.round)
        ):
            return []
        if proposal.height == self._height + 1:
            if proposal.round <= FUTURE_ROUNDS:
                self._next.add_proposal(signed)
            return []
        if (
            self._height < 1
            or proposal.height != self._height
            or self.decided
            or proposal.round > self._round + FUTURE_ROUNDS
        ):
            return []
        out: list[Action] = []
        if proposal.proposer == self._me and proposal.round not in self._own_proposals:
            self._own_proposals[proposal.round] = signed  # signed by us before a lost write
            self._changed()
        if self._log.add_proposal(signed):
            self._try_decide(proposal.round, out)
            self._note_round(proposal.round)
            self._progress(out)
        return self._finish(out)

    def on_vote(self, signed: SignedVote) -> list[Action]:
        """⟨PREVOTE | PRECOMMIT, h, r, v⟩ from a validator: the first per (voter, r, step) is
        counted; a different one is reported once as :class:`Evidence` (and counted for its
        value when a held proposal names that value for round r)."""
        vote = signed.vote
        if vote.voter not in self._members or vote.round < 0:
            return []
        if vote.height == self._height + 1:
            if vote.round <= FUTURE_ROUNDS:
                _, first = self._next.add_vote(signed)
                if first is not None:
                    return [Evidence(first=first, second=signed)]
            return []
        if (
            self._height < 1
            or vote.height != self._height
            or vote.round > self._round + FUTURE_ROUNDS
        ):
            return []
        out: list[Action] = []
        if vote.voter == self._me and (vote.round, vote.step) not in self._own_votes:
            self._own_votes[(vote.round, vote.step)] = signed  # signed by us before a lost write
            self._changed()
        kept, first = self._log.add_vote(signed)
        if first is not None:
            out.append(Evidence(first=first, second=signed))
        if kept and not self.decided:
            if vote.step == "precommit" and vote.value != NIL:
                self._try_decide(vote.round, out)
            self._note_round(vote.round)
            self._progress(out)
        return self._finish(out)

    def on_certificate(self, certificate: CommitCertificate) -> list[Action]:
        """Catch-up: a quorum of precommits for (h_p, r, v) decides h_p at once, as L49 would
        with the proposal; ``content`` is ``None`` when this core never held a valid proposal
        of ``v`` (the driver then fetches the certified model)."""
        if (
            self._height < 1
            or certificate.height != self._height
            or self.decided
            or not is_commit_certificate(certificate, validators=self._validators)
        ):
            return []
        out: list[Action] = []
        self._decide(certificate, self._content_of(certificate.value), out)
        return self._finish(out)

    def on_timeout(self, timeout: Timeout) -> list[Action]:
        """OnTimeoutPropose (L57–L60), OnTimeoutPrevote (L61–L64), OnTimeoutPrecommit
        (L65–L67); a timer of another height or round, or a step already left, does nothing."""
        if self.decided or timeout.height != self._height or timeout.round != self._round:
            return []
        out: list[Action] = []
        if timeout.step == "propose" and self._step == "propose":
            self._prevote(NIL, out)
        elif timeout.step == "prevote" and self._step == "prevote":
            self._precommit(NIL, out)
        elif timeout.step == "precommit":
            self._start_round(self._round + 1, out)
        self._progress(out)
        return self._finish(out)

    def resume(self) -> list[Action]:
        """After a restart with ``state=``: re-send what this cloud signed at the height and
        re-arm the current step's timer. A proposer that had not proposed yet proposes its
        valid value or asks for a value again; nothing already signed is signed anew. A
        decided height emits :class:`Decided` again (the driver may not have acted on it)."""
        if self._height < 1:
            return []
        out: list[Action] = []
        certificate = self._certificate
        if certificate is not None and self.decided:
            out.append(
                Decided(
                    height=certificate.height,
                    round=certificate.round,
                    value=certificate.value,
                    content=self._content_of(certificate.value),
                    certificate=certificate,
                )
            )
            out.extend(self.rebroadcast())
            return self._finish(out)
        out.extend(self.rebroadcast())
        seconds = self._timeouts.seconds(self._step, self._round)
        out.append(self._timer(self._step, seconds))
        if (
            self._step == "propose"
            and self.proposer(self._height, self._round) == self._me
            and self._round not in self._own_proposals
        ):
            self._propose(out)
        self._progress(out)
        return self._finish(out)

    def rebroadcast(self) -> list[Action]:
        """Gossip: this cloud's signed proposals and votes of the current height, the peers'
        prevotes that justify its valid value (:class:`Relay`, while undecided), then its
        last certificate. Nothing is signed, so there is nothing to persist."""
        if self._height < 1:
            return []
        out: list[Action] = [Broadcast(message=p) for p in self._own_proposals.values()]
        out.extend(Broadcast(message=v) for v in self._own_votes.values())
        if not self.decided:
            self._relay_valid_value_proof(out)
        if self._certificate is not None:
            out.append(Broadcast(message=self._certificate))
        return out

    # -- Algorithm 1 ------------------------------------------------------------------------

    def _start_round(self, round: int, out: list[Action]) -> None:
        """StartRound (L11–L21); timeoutPropose is armed for the proposer too (asynchronous
        getValue(), see the module docstring)."""
        self._round = round
        self._step = "propose"
        self._changed()
        out.append(self._timer("propose", self._timeouts.seconds("propose", round)))
        if self.proposer(self._height, round) == self._me:
            self._propose(out)

    def _propose(self, out: list[Action]) -> None:
        """L14–L19: propose validValue with validRound, else ask for getValue()."""
        signed = self._own_proposals.get(self._round)
        if signed is not None:  # signed before a restart: send it again, never another
            out.append(Broadcast(message=signed))
        elif self._valid_value != NIL:
            self._send_proposal(self._valid_value, self._valid_round, self._valid_content, out)
        else:
            out.append(RequestValue(height=self._height, round=self._round))

    def _progress(self, out: list[Action]) -> None:
        """Apply the upon-rules of the current round until none fires: the round skip (L55)
        first, then L22, L28, L34, L36, L44, L47 (L49 fires as messages arrive)."""
        while not self.decided:
            if self._skip_to > self._round:
                self._start_round(self._skip_to, out)  # L55–L56
                continue
            if not self._apply_round_rules(out):
                return

    def _apply_round_rules(self, out: list[Action]) -> bool:
        """One pass over the rules about round_p; True when the step or round changed."""
        round = self._round
        log = self._log
        quorum = self._quorum
        signed = log.proposals.get(round)
        proposal = signed.proposal if signed is not None else None
        step = self._step
        if step == "propose" and signed is not None and proposal is not None:
            vr = proposal.valid_round
            v = proposal.value
            if vr == -1:
                # L22–L27: a fresh proposal; prevote it unless locked on another value.
                accept = self._valid(signed) and (
                    self._locked_round == -1 or self._locked_value == v
                )
                self._prevote(v if accept else NIL, out)
                return True
            if vr < round and log.count(vr, "prevote", v) >= quorum:
                # L28–L33: a value with a quorum of prevotes in round vr may unlock us when
                # our lock is from round vr or earlier.
                accept = self._valid(signed) and (
                    self._locked_round <= vr or self._locked_value == v
                )
                self._prevote(v if accept else NIL, out)
                return True
        if (
            step == "prevote"
            and self._prevote_timer_round != round
            and log.voters.get((round, "prevote"), 0) >= quorum
        ):
            # L34–L35: a quorum of prevotes for anything arms timeoutPrevote once.
            self._prevote_timer_round = round
            out.append(self._timer("prevote", self._timeouts.seconds("prevote", round)))
        if (
            step != "propose"
            and signed is not None
            and proposal is not None
            and self._locked_in_round != round
            and log.count(round, "prevote", proposal.value) >= quorum
            and self._valid(signed)
        ):
            # L36–L43: a quorum of prevotes for the proposal: lock and precommit it (only
            # from the prevote step), and remember it as the valid value in any case.
            self._locked_in_round = round
            if step == "prevote":
                self._locked_value = proposal.value
                self._locked_round = round
                self._precommit(proposal.value, out)
            self._valid_value = proposal.value
            self._valid_round = round
            self._valid_content = proposal.content
            self._changed()
            return True
        if step == "prevote" and log.count(round, "prevote", NIL) >= quorum:
            # L44–L46: a quorum of nil prevotes: precommit nil.
            self._precommit(NIL, out)
            return True
        if (
            self._precommit_timer_round != round
            and log.voters.get((round, "precommit"), 0) >= quorum
        ):
            # L47–L48: a quorum of precommits for anything arms timeoutPrecommit once.
            self._precommit_timer_round = round
            out.append(self._timer("precommit", self._timeouts.seconds("precommit", round)))
        return False

    def _try_decide(self, round: int, out: list[Action]) -> None:
        """L49–L51: the proposal of ``round`` from its proposer, a quorum of precommits for
        its value in that round (any round of the height) and valid(v): decide."""
        if self.decided:
            return
        signed = self._log.proposals.get(round)
        if signed is None:
            return
        value = signed.proposal.value
        if self._log.count(round, "precommit", value) < self._quorum or not self._valid(signed):
            return
        certificate = CommitCertificate(
            height=self._height,
            round=round,
            value=value,
            precommits=self._log.votes_for(round, "precommit", value, self._validators),
        )
        self._decide(certificate, signed.proposal.content, out)

    def _note_round(self, round: int) -> None:
        """L55: f + 1 clouds with a message in a round above round_p make us skip to it."""
        if round > self._round and len(self._log.senders.get(round, ())) >= self._skip_threshold:
            self._skip_to = max(self._skip_to, round)

    # -- signing (each at most once per (height, round, step)) -------------------------------

    def _prevote(self, value: str, out: list[Action]) -> None:
        self._send_vote("prevote", value, out)
        self._step = "prevote"
        self._changed()

    def _precommit(self, value: str, out: list[Action]) -> None:
        self._send_vote("precommit", value, out)
        self._step = "precommit"
        self._changed()

    def _send_vote(self, step: Step, value: str, out: list[Action]) -> None:
        """Sign and broadcast, unless a vote for (height, round, step) was signed already
        (before a restart): then that one is sent again, whatever ``value`` is now."""
        key = (self._round, step)
        signed = self._own_votes.get(key)
        if signed is not None:
            out.append(Broadcast(message=signed))
            return
        vote = Vote(height=self._height, round=self._round, step=step, value=value, voter=self._me)
        signed = self._sign_vote(vote)
        if signed.vote != vote:
            raise ValueError(f"sign_vote returned {signed.vote}, not the vote {vote}")
        self._own_votes[key] = signed
        self._changed()
        self._log.add_vote(signed)
        out.append(Broadcast(message=signed))
        if step == "precommit" and value != NIL:
            self._try_decide(self._round, out)

    def _send_proposal(
        self, value: str, valid_round: int, content: bytes, out: list[Action]
    ) -> None:
        proposal = Proposal(
            height=self._height,
            round=self._round,
            value=value,
            valid_round=valid_round,
            proposer=self._me,
            content=content,
        )
        signed = self._sign_proposal(proposal)
        if signed.proposal is not proposal and signed.proposal != proposal:
            raise ValueError("sign_proposal returned another proposal than it was given")
        self._own_proposals[self._round] = signed
        self._changed()
        self._log.add_proposal(signed)
        out.append(Broadcast(message=signed))
        if valid_round >= 0:
            self._relay_valid_value_proof(out)
        self._try_decide(self._round, out)

    def _relay_valid_value_proof(self, out: list[Action]) -> None:
        """The peers' prevotes for validValue in validRound (L42–L43 saw a quorum of them):
        what a peer needs to accept its re-proposal with that valid round (L28)."""
        if self._valid_round < 0:
            return
        held = self._log.votes_for(
            self._valid_round, "prevote", self._valid_value, self._validators
        )
        out.extend(Relay(message=v) for v in held if v.vote.voter != self._me)

    # -- helpers ----------------------------------------------------------------------------

    def _decide(
        self, certificate: CommitCertificate, content: bytes | None, out: list[Action]
    ) -> None:
        self._certificate = certificate
        self._changed()
        out.append(
            Decided(
                height=certificate.height,
                round=certificate.round,
                value=certificate.value,
                content=content,
                certificate=certificate,
            )
        )
        out.append(Broadcast(message=certificate))

    def _valid(self, signed: SignedProposal) -> bool:
        """valid(v), asked once per proposal held (one per round)."""
        round = signed.proposal.round
        known = self._valid_cache.get(round)
        if known is None:
            known = self._valid_cache[round] = bool(self._is_valid(signed.proposal))
        return known

    def _content_of(self, value: str) -> bytes | None:
        """The content of a valid proposal of ``value`` held at this height, if any."""
        for signed in self._log.proposals.values():
            if signed.proposal.value == value and self._valid(signed):
                return signed.proposal.content
        if value == self._valid_value and self._valid_value != NIL:
            return self._valid_content
        return None

    def _timer(self, step: TimeoutStep, seconds: float) -> ScheduleTimeout:
        return ScheduleTimeout(step=step, height=self._height, round=self._round, seconds=seconds)

    def _changed(self) -> None:
        self._dirty = True
        self._snapshot = None

    def _finish(self, out: list[Action]) -> list[Action]:
        """Persist first when anything persistent changed (before any Broadcast)."""
        if self._dirty:
            self._dirty = False
            out.insert(0, Persist(state=self.state))
        return out
