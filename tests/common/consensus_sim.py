"""A seeded discrete-event world for the Tendermint core (tests only; pytest does not collect it).

``run_schedule(seed)`` draws one reproducible world from ``seed`` and runs it:

* M ∈ {1, 3, 4, 7} clouds, ``HEIGHTS`` heights, up to f = ⌊(M − 1)/3⌋ Byzantine clouds, each
  with one to three behaviours from ``BYZANTINE_BEHAVIOURS``: equivocate (two signed votes or
  two valid proposals, each half of the peers gets one), silent, invalid proposals, votes for
  invalid values, replay of old messages (earlier heights and rounds, its own and others'),
  votes for far rounds and later heights, and votes forged in an honest cloud's name (the
  harness drops those: signatures are HMACs with per-cloud secrets, checked before delivery).
  A Byzantine cloud runs a real core under the hood and mutates what it sends.
* Before the global stabilization time (GST): loss, duplication, reordering, delays of up to
  a few seconds and sometimes a partition; honest clouds crash at random points of an action
  list (for instance after ``Persist`` and before its ``Broadcast``) and restart after a
  downtime as ``ConsensusCore(state=last persisted state)`` + ``resume()``, losing their
  timers, pending values and the messages that arrived while down. After GST: no loss,
  delivery within ``DELAY_AFTER_GST_S``; every honest cloud rebroadcasts at GST and every
  ``REBROADCAST_S`` (from the start), and answers a message of a height it has decided with
  that height's certificate (as the coordinator's driver serves certified models).
* ``RequestValue`` is answered with a valid value ``h{h}-{cloud}-r{r}`` (content marks it
  valid); before GST sometimes late or never.

Invariants (``ScheduleResult.violations``): agreement, validity, no honest double-signing
(over everything an honest cloud ever sent, across crashes), termination (every honest
cloud decides every height by ``GST + MAX_DOWNTIME_S + TERMINATION_BOUND_S``), ``Persist``
before the ``Broadcast`` of what it signed, well-formed certificates, no evidence against an
honest cloud. Reproduce a schedule with ``python -m tests.common.consensus_sim SEED``.
"""

from __future__ import annotations

import hmac
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import Any, Final

import msgspec
from fedgate_common.consensus.quorum import faults_tolerated
from fedgate_common.consensus.tendermint import (
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
    Timeouts,
    is_commit_certificate,
)
from fedgate_common.consensus.types import (
    NIL,
    CommitCertificate,
    Proposal,
    SignedProposal,
    SignedVote,
    Vote,
)

CLOUD_COUNTS: Final = (1, 3, 4, 7)
HEIGHTS: Final = 3
TIMEOUTS: Final = Timeouts(propose_s=1.0, prevote_s=0.5, precommit_s=0.5, delta_s=0.25)
MAX_GST_S: Final = 20.0
MAX_DELAY_BEFORE_GST_S: Final = 4.0
DELAY_AFTER_GST_S: Final = 0.2
REBROADCAST_S: Final = 2.0
CATCH_UP_REPLY_S: Final = 1.0  # a cloud answers one peer about one height at most this often
MAX_DOWNTIME_S: Final = 4.0
MAX_CRASHES: Final = 3  # per honest cloud
TERMINATION_BOUND_S: Final = 60.0
MAX_EVENTS: Final = 300_000
BYZANTINE_BEHAVIOURS: Final = (
    "equivocate",
    "approve_all",
    "fresh_proposals",
    "silent",
    "invalid_proposal",
    "invalid_votes",
    "replay",
    "future_rounds",
    "forge",
)
REPLAY_ARCHIVE: Final = 64  # old messages a replaying Byzantine cloud keeps

Message = SignedProposal | SignedVote | CommitCertificate
CoreFactory = Callable[..., ConsensusCore]

_DELIVER, _TIMEOUT, _VALUE, _START, _TICK, _RESTART = range(6)
_VOTE_ENCODER = msgspec.msgpack.Encoder()


def valid_content(value: str) -> bytes:
    return b"ok|" + value.encode()


def is_valid_proposal(proposal: Proposal) -> bool:
    """The simulation's valid(v): the content marks this very value valid for this height."""
    return proposal.content == valid_content(proposal.value) and proposal.value.startswith(
        f"h{proposal.height}-"
    )


@dataclass
class ScheduleResult:
    """What one schedule did, and what went wrong (``violations``)."""

    seed: int
    clouds: int
    heights: int
    byzantine: dict[str, tuple[str, ...]]
    gst: float
    end_time: float = 0.0
    events: int = 0
    decisions: int = 0  # (honest cloud, height) pairs decided
    decisions_without_content: int = 0  # learnt from a certificate alone
    crashes: int = 0
    crashes_after_persist: int = 0  # the state was written, the broadcast never happened
    restarts: int = 0
    max_round: int = 0
    messages_sent: int = 0
    messages_lost: int = 0
    messages_duplicated: int = 0
    forged_rejected: int = 0
    relayed: int = 0
    evidence: int = 0
    last_decision_after_gst: float = 0.0
    behaviours: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def describe(self) -> str:
        byzantine = ", ".join(f"{c}:{'+'.join(b)}" for c, b in self.byzantine.items()) or "none"
        return (
            f"seed {self.seed}: M={self.clouds}, byzantine {byzantine}, GST {self.gst:.1f}s, "
            f"{self.crashes} crashes; reproduce with `python -m tests.common.consensus_sim "
            f"{self.seed}`"
        )


class _Cloud:
    __slots__ = (
        "archive",
        "behaviours",
        "core",
        "crashes",
        "decisions",
        "honest",
        "incarnation",
        "index",
        "name",
        "persisted",
        "replied",
        "secret",
    )

    def __init__(self, index: int, name: str, secret: bytes, behaviours: tuple[str, ...]) -> None:
        self.index = index
        self.name = name
        self.secret = secret
        self.behaviours = behaviours
        self.honest = not behaviours
        self.core: ConsensusCore | None = None  # None while crashed
        self.persisted: ConsensusState | None = None
        self.incarnation = 0
        self.crashes = 0
        self.decisions: dict[int, CommitCertificate] = {}  # the driver's durable store
        self.replied: dict[tuple[int, int], float] = {}  # (peer, height) → last answer
        self.archive: list[Message] = []  # a replaying Byzantine cloud's old messages


class _World:
    def __init__(self, seed: int, core_factory: CoreFactory, clouds: int | None) -> None:
        rng = self.rng = random.Random(seed)
        m = clouds if clouds is not None else rng.choice(CLOUD_COUNTS)
        names = tuple(f"c{i}" for i in range(m))
        byzantine_names = rng.sample(names, rng.randint(0, faults_tolerated(m)))
        byzantine: dict[str, tuple[str, ...]] = {}
        for name in byzantine_names:
            chosen = tuple(rng.sample(BYZANTINE_BEHAVIOURS, rng.randint(1, 3)))
            byzantine[name] = ("silent",) if "silent" in chosen else chosen
        self.names = names
        self.factory = core_factory
        self.gst = rng.uniform(0.0, MAX_GST_S)
        self.loss = rng.choice((0.0, 0.1, 0.3, 0.5))
        self.duplication = rng.uniform(0.0, 0.2)
        self.max_delay = rng.uniform(0.05, MAX_DELAY_BEFORE_GST_S)
        self.crash_rate = rng.choice((0.0, 0.01, 0.03, 0.08))
        self.value_loss = rng.choice((0.0, 0.2))
        self.partition: tuple[float, float, frozenset[int]] | None = None
        if m > 1 and rng.random() < 0.3:
            start = rng.uniform(0.0, self.gst)
            side = frozenset(rng.sample(range(m), rng.randint(1, m - 1)))
            self.partition = (start, rng.uniform(start, self.gst), side)
        self.clouds = [
            _Cloud(i, name, rng.randbytes(16), byzantine.get(name, ()))
            for i, name in enumerate(names)
        ]
        self.secrets = {c.name: c.secret for c in self.clouds}
        self.honest = [c for c in self.clouds if c.honest]
        self.result = ScheduleResult(
            seed=seed, clouds=m, heights=HEIGHTS, byzantine=byzantine, gst=self.gst
        )
        self.deadline = self.gst + MAX_DOWNTIME_S + TERMINATION_BOUND_S
        self.now = 0.0
        self.queue: list[tuple[float, int, int, int, int, Any]] = []
        self.seq = 0
        self.valid_values: set[str] = set()
        self.sent_votes: dict[tuple[str, int, int, str], str] = {}  # honest votes ever sent
        self.sent_proposals: dict[tuple[str, int, int], str] = {}
        self.decided: dict[int, str] = {}  # height → the first value an honest cloud decided
        self.verified: dict[int, Message] = {}  # id → message whose signatures verified

    # -- signatures (unforgeable: HMAC under the signer's secret) ----------------------------

    def _mac(self, signer: str, kind: bytes, body: Vote | Proposal) -> bytes:
        secret = self.secrets.get(signer)
        if secret is None:
            return b""
        return hmac.digest(secret, kind + _VOTE_ENCODER.encode(body), "sha256")

    def sign_vote_as(self, cloud: _Cloud, vote: Vote) -> SignedVote:
        if vote.voter != cloud.name:
            raise ValueError(f"{cloud.name} cannot sign as {vote.voter}")
        return SignedVote(vote=vote, signature=self._mac(cloud.name, b"V", vote))

    def sign_proposal_as(self, cloud: _Cloud, proposal: Proposal) -> SignedProposal:
        if proposal.proposer != cloud.name:
            raise ValueError(f"{cloud.name} cannot sign as {proposal.proposer}")
        return SignedProposal(proposal=proposal, signature=self._mac(cloud.name, b"P", proposal))

    def verify(self, message: Message) -> bool:
        if self.verified.get(id(message)) is message:
            return True
        if isinstance(message, SignedVote):
            ok = hmac.compare_digest(
                message.signature, self._mac(message.vote.voter, b"V", message.vote)
            )
        elif isinstance(message, SignedProposal):
            proposal = message.proposal
            ok = hmac.compare_digest(
                message.signature, self._mac(proposal.proposer, b"P", proposal)
            )
        else:
            ok = all(self.verify(v) for v in message.precommits)
        if ok:
            self.verified[id(message)] = message
        return ok

    # -- event queue ---------------------------------------------------------------------------

    def push(self, at: float, kind: int, cloud: _Cloud, incarnation: int, payload: Any) -> None:
        self.seq += 1
        heappush(self.queue, (at, self.seq, kind, cloud.index, incarnation, payload))

    def make_core(self, cloud: _Cloud, state: ConsensusState | None) -> ConsensusCore:
        factory = self.factory if cloud.honest else ConsensusCore

        def sign_vote(vote: Vote) -> SignedVote:
            return self.sign_vote_as(cloud, vote)

        def sign_proposal(proposal: Proposal) -> SignedProposal:
            return self.sign_proposal_as(cloud, proposal)

        return factory(
            me=cloud.name,
            validators=self.names,
            sign_vote=sign_vote,
            sign_proposal=sign_proposal,
            is_valid=is_valid_proposal,
            timeouts=TIMEOUTS,
            state=state,
        )

    def run(self) -> ScheduleResult:
        result = self.result
        for cloud in self.clouds:
            if cloud.behaviours == ("silent",):
                continue  # never sends; nothing to run
            cloud.core = self.make_core(cloud, None)
            self.push(0.0, _START, cloud, 0, 1)
            self.push(self.rng.uniform(0.0, REBROADCAST_S), _TICK, cloud, 0, None)
            if cloud.honest:
                self.push(self.gst, _TICK, cloud, 0, "gst")
        while self.queue and result.events < MAX_EVENTS:
            at, _, kind, index, incarnation, payload = heappop(self.queue)
            if at > self.deadline:
                break
            self.now = at
            result.events += 1
            self.step(self.clouds[index], kind, incarnation, payload)
            if self.all_decided():
                break
        result.end_time = self.now
        self.check_termination()
        return result

    def all_decided(self) -> bool:
        return all(len(c.decisions) == HEIGHTS for c in self.honest)

    def step(self, cloud: _Cloud, kind: int, incarnation: int, payload: Any) -> None:
        if kind == _DELIVER:
            sender, message = payload
            if cloud.core is not None:
                self.deliver(cloud, sender, message)
            return
        if incarnation != cloud.incarnation:
            return  # scheduled before a crash: lost with it
        if kind == _RESTART:
            self.restart(cloud)
            return
        core = cloud.core
        if core is None:
            return
        if kind == _TIMEOUT:
            self.perform(cloud, core.on_timeout(payload))
        elif kind == _VALUE:
            height, round_ = payload
            self.perform(
                cloud, core.on_value(height, round_, *self.value_for(cloud, height, round_))
            )
        elif kind == _START:
            if payload <= HEIGHTS:
                self.perform(cloud, core.start_height(payload))
        elif payload == "gst":
            self.perform(cloud, core.rebroadcast())
        else:
            self.perform(cloud, core.rebroadcast())
            self.push(self.now + REBROADCAST_S, _TICK, cloud, incarnation, None)

    def value_for(self, cloud: _Cloud, height: int, round_: int) -> tuple[str, bytes]:
        if "invalid_proposal" in cloud.behaviours and self.rng.random() < 0.7:
            self.result.behaviours["invalid_proposal"] += 1
            value = f"bad-h{height}-{cloud.name}-r{round_}"
            return value, b"bad|" + value.encode()
        value = f"h{height}-{cloud.name}-r{round_}"
        self.valid_values.add(value)
        return value, valid_content(value)

    # -- an honest cloud's driver ----------------------------------------------------------

    def deliver(self, cloud: _Cloud, sender: int, message: Message) -> None:
        if not self.verify(message):
            self.result.forged_rejected += 1
            return
        core = cloud.core
        assert core is not None
        if isinstance(message, SignedVote):
            height = message.vote.height
            actions = core.on_vote(message)
        elif isinstance(message, SignedProposal):
            height = message.proposal.height
            actions = core.on_proposal(message)
        else:
            height = message.height
            actions = core.on_certificate(message)
        if cloud.honest:
            self.answer_laggard(cloud, sender, height)
        else:
            if "replay" in cloud.behaviours:
                self.archive(cloud, message)
            if "approve_all" in cloud.behaviours and isinstance(message, SignedProposal):
                self.approve(cloud, message.proposal)
        self.perform(cloud, actions)

    def answer_laggard(self, cloud: _Cloud, sender: int, height: int) -> None:
        """The driver serves the certificate of a height the sender has not finished."""
        certificate = cloud.decisions.get(height)
        if certificate is None or sender == cloud.index:
            return
        last = cloud.replied.get((sender, height))
        if last is not None and self.now - last < CATCH_UP_REPLY_S:
            return
        core = cloud.core
        if core is not None and core.state.height == height:
            return  # our own rebroadcast carries it
        cloud.replied[(sender, height)] = self.now
        self.transmit(cloud, certificate, [self.clouds[sender]])

    def perform(self, cloud: _Cloud, actions: list[Action]) -> None:
        if not cloud.honest:
            self.perform_byzantine(cloud, actions)
            return
        stop = len(actions)
        crash = (
            self.now < self.gst
            and cloud.crashes < MAX_CRASHES
            and self.rng.random() < self.crash_rate
        )
        if crash:
            stop = self.rng.randint(0, len(actions))
        for action in actions[:stop]:
            if isinstance(action, Persist):
                cloud.persisted = action.state
            elif isinstance(action, Broadcast):
                self.broadcast_honest(cloud, action.message)
            elif isinstance(action, Relay):
                self.result.relayed += 1
                self.transmit(cloud, action.message, self.clouds)
            elif isinstance(action, ScheduleTimeout):
                self.schedule_timeout(cloud, action)
            elif isinstance(action, RequestValue):
                self.request_value(cloud, action)
            elif isinstance(action, Decided):
                self.on_decided(cloud, action)
            elif isinstance(action, Evidence):
                self.on_evidence(action)
        if crash:
            self.crash(cloud, actions, stop)

    def broadcast_honest(self, cloud: _Cloud, message: Message) -> None:
        result = self.result
        persisted = cloud.persisted
        if isinstance(message, SignedVote):
            vote = message.vote
            if vote.voter != cloud.name:
                result.violations.append(f"{cloud.name} broadcast a vote of {vote.voter}")
            key = (cloud.name, vote.height, vote.round, vote.step)
            earlier = self.sent_votes.setdefault(key, vote.value)
            if earlier != vote.value:
                result.violations.append(
                    f"double-signing: honest {cloud.name} sent {vote.step} {earlier!r} and "
                    f"{vote.value!r} at height {vote.height} round {vote.round}"
                )
            if persisted is None or message not in persisted.own_votes:
                result.violations.append(f"{cloud.name} broadcast {vote} before persisting it")
        elif isinstance(message, SignedProposal):
            proposal = message.proposal
            key3 = (cloud.name, proposal.height, proposal.round)
            earlier = self.sent_proposals.setdefault(key3, proposal.value)
            if earlier != proposal.value:
                result.violations.append(
                    f"double-signing: honest {cloud.name} proposed {earlier!r} and "
                    f"{proposal.value!r} at height {proposal.height} round {proposal.round}"
                )
            if persisted is None or message not in persisted.own_proposals:
                result.violations.append(f"{cloud.name} broadcast a proposal before persisting it")
        self.transmit(cloud, message, self.clouds)

    def schedule_timeout(self, cloud: _Cloud, action: ScheduleTimeout) -> None:
        if action.round > self.result.max_round:
            self.result.max_round = action.round
        self.push(self.now + action.seconds, _TIMEOUT, cloud, cloud.incarnation, action.timeout)

    def request_value(self, cloud: _Cloud, action: RequestValue) -> None:
        if self.now < self.gst and self.rng.random() < self.value_loss:
            return  # getValue() never answers this time
        delay = self.rng.uniform(0.0, 0.3 if self.now >= self.gst else 2.0)
        self.push(self.now + delay, _VALUE, cloud, cloud.incarnation, (action.height, action.round))

    def on_decided(self, cloud: _Cloud, action: Decided) -> None:
        result = self.result
        height, value, certificate = action.height, action.value, action.certificate
        if cloud.honest:
            if not (
                certificate.height == height
                and certificate.value == value
                and is_commit_certificate(certificate, validators=self.names)
                and self.verify(certificate)
            ):
                result.violations.append(f"{cloud.name} decided {value!r} on a bad certificate")
            if action.content is not None and action.content != valid_content(value):
                result.violations.append(f"{cloud.name} decided {value!r} with foreign content")
            if value not in self.valid_values or not value.startswith(f"h{height}-"):
                result.violations.append(
                    f"validity: honest {cloud.name} decided invalid {value!r} at height {height}"
                )
            first = self.decided.setdefault(height, value)
            if first != value:
                result.violations.append(
                    f"agreement: honest clouds decided {first!r} and {value!r} at height {height}"
                )
            known = cloud.decisions.get(height)
            if known is None:
                cloud.decisions[height] = certificate
                result.decisions += 1
                result.decisions_without_content += action.content is None
                if self.now > self.gst:
                    result.last_decision_after_gst = max(
                        result.last_decision_after_gst, self.now - self.gst
                    )
            elif known.value != value:
                result.violations.append(f"{cloud.name} decided height {height} twice")
        if height < HEIGHTS:
            self.push(self.now, _START, cloud, cloud.incarnation, height + 1)

    def on_evidence(self, action: Evidence) -> None:
        first, second = action.first.vote, action.second.vote
        self.result.evidence += 1
        if (
            first.voter != second.voter
            or (first.height, first.round, first.step) != (second.height, second.round, second.step)
            or first.value == second.value
        ):
            self.result.violations.append(f"evidence that proves nothing: {first} / {second}")
        elif self.clouds[self.names.index(first.voter)].honest:
            self.result.violations.append(f"evidence against honest {first.voter}: {first}")

    def crash(self, cloud: _Cloud, actions: list[Action], stop: int) -> None:
        result = self.result
        result.crashes += 1
        if any(isinstance(a, Persist) for a in actions[:stop]) and any(
            isinstance(a, Broadcast) for a in actions[stop:]
        ):
            result.crashes_after_persist += 1
        cloud.crashes += 1
        cloud.core = None
        cloud.incarnation += 1
        downtime = self.rng.uniform(0.1, MAX_DOWNTIME_S)
        self.push(self.now + downtime, _RESTART, cloud, cloud.incarnation, None)

    def restart(self, cloud: _Cloud) -> None:
        self.result.restarts += 1
        core = cloud.core = self.make_core(cloud, cloud.persisted)
        incarnation = cloud.incarnation
        self.push(self.now + self.rng.uniform(0.0, REBROADCAST_S), _TICK, cloud, incarnation, None)
        if self.now < self.gst:
            self.push(self.gst, _TICK, cloud, incarnation, "gst")
        if cloud.persisted is not None:
            self.perform(cloud, core.resume())
        if cloud.core is core:
            following = max(cloud.decisions, default=0) + 1
            if following <= HEIGHTS and core.state.height < following:
                self.push(self.now, _START, cloud, incarnation, following)

    def check_termination(self) -> None:
        for cloud in self.honest:
            missing = [h for h in range(1, HEIGHTS + 1) if h not in cloud.decisions]
            if missing:
                self.result.violations.append(
                    f"termination: honest {cloud.name} has not decided heights {missing} by "
                    f"t={self.now:.1f}s (GST {self.gst:.1f}s, {self.result.events} events)"
                )

    # -- the network ---------------------------------------------------------------------------

    def transmit(self, sender: _Cloud, message: Message, targets: list[_Cloud]) -> None:
        rng = self.rng
        result = self.result
        now = self.now
        stable = now >= self.gst
        for target in targets:
            if target is sender or target.behaviours == ("silent",):
                continue
            result.messages_sent += 1
            if not stable:
                if self.partition is not None:
                    start, end, side = self.partition
                    if start <= now < end and (sender.index in side) != (target.index in side):
                        result.messages_lost += 1
                        continue
                if rng.random() < self.loss:
                    result.messages_lost += 1
                    continue
            copies = 1
            if rng.random() < self.duplication:
                copies = 2
                result.messages_duplicated += 1
            for _ in range(copies):
                delay = (
                    rng.uniform(0.001, DELAY_AFTER_GST_S)
                    if stable
                    else rng.uniform(0.0, self.max_delay)
                )
                self.push(now + delay, _DELIVER, target, 0, (sender.index, message))

    # -- Byzantine clouds ----------------------------------------------------------------------

    def perform_byzantine(self, cloud: _Cloud, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Broadcast | Relay):
                self.send_byzantine(cloud, action.message)
            elif isinstance(action, ScheduleTimeout):
                self.push(
                    self.now + action.seconds, _TIMEOUT, cloud, cloud.incarnation, action.timeout
                )
            elif isinstance(action, RequestValue):
                self.request_value(cloud, action)
            elif isinstance(action, Decided) and action.height < HEIGHTS:
                self.push(self.now, _START, cloud, cloud.incarnation, action.height + 1)

    def archive(self, cloud: _Cloud, message: Message) -> None:
        if len(cloud.archive) < REPLAY_ARCHIVE:
            cloud.archive.append(message)
        else:
            cloud.archive[self.rng.randrange(REPLAY_ARCHIVE)] = message

    def send_byzantine(self, cloud: _Cloud, message: Message) -> None:
        rng = self.rng
        counts = self.result.behaviours
        behaviours = cloud.behaviours
        peers = [c for c in self.clouds if c is not cloud]
        if "replay" in behaviours:
            self.archive(cloud, message)
            if cloud.archive:
                old = rng.choice(cloud.archive)
                self.transmit(cloud, old, [rng.choice(peers)])
                counts["replay"] += 1
        if "forge" in behaviours and isinstance(message, SignedVote):
            victim = rng.choice(self.names)
            forged = msgspec.structs.replace(message.vote, voter=victim, value=f"forged-{victim}")
            self.transmit(cloud, SignedVote(vote=forged, signature=message.signature), peers)
            counts["forge"] += 1
        if isinstance(message, SignedVote) and message.vote.voter == cloud.name:
            self.send_byzantine_vote(cloud, message, peers)
        elif isinstance(message, SignedProposal):
            self.send_byzantine_proposal(cloud, message, peers)
        else:
            self.transmit(cloud, message, peers)

    def send_byzantine_vote(self, cloud: _Cloud, signed: SignedVote, peers: list[_Cloud]) -> None:
        rng = self.rng
        counts = self.result.behaviours
        vote = signed.vote
        if "future_rounds" in cloud.behaviours:
            far = msgspec.structs.replace(
                vote,
                round=vote.round + rng.randint(1, 40),
                height=vote.height + rng.choice((0, 0, 1, 2)),
            )
            self.transmit(cloud, self.sign_vote_as(cloud, far), peers)
            counts["future_rounds"] += 1
        if "invalid_votes" in cloud.behaviours and rng.random() < 0.5:
            bad = f"bad-h{vote.height}-{cloud.name}-r{vote.round}"
            signed = self.sign_vote_as(cloud, msgspec.structs.replace(vote, value=bad))
            counts["invalid_vote"] += 1
        if "equivocate" in cloud.behaviours and len(peers) > 1 and rng.random() < 0.8:
            other = NIL if signed.vote.value != NIL else self.some_value(cloud, vote)
            twin = self.sign_vote_as(cloud, msgspec.structs.replace(signed.vote, value=other))
            half = rng.sample(peers, len(peers) // 2)
            self.transmit(cloud, signed, [p for p in peers if p not in half])
            self.transmit(cloud, twin, half)
            counts["equivocate_vote"] += 1
            return
        self.transmit(cloud, signed, peers)

    def approve(self, cloud: _Cloud, proposal: Proposal) -> None:
        """Prevote and precommit every valid proposal it sees, locks notwithstanding."""
        if not is_valid_proposal(proposal):
            return
        for step in ("prevote", "precommit"):
            vote = Vote(
                height=proposal.height,
                round=proposal.round,
                step=step,
                value=proposal.value,
                voter=cloud.name,
            )
            self.transmit(cloud, self.sign_vote_as(cloud, vote), self.clouds)
        self.result.behaviours["approve_all"] += 1

    def some_value(self, cloud: _Cloud, vote: Vote) -> str:
        """A value the equivocator pushes instead of nil: a fresh valid one of its own."""
        value = f"h{vote.height}-{cloud.name}-r{vote.round}-alt"
        self.valid_values.add(value)
        return value

    def send_byzantine_proposal(
        self, cloud: _Cloud, signed: SignedProposal, peers: list[_Cloud]
    ) -> None:
        rng = self.rng
        counts = self.result.behaviours
        behaviours = cloud.behaviours
        proposal = signed.proposal
        prefix = f"h{proposal.height}-{cloud.name}-r{proposal.round}"
        if "fresh_proposals" in behaviours:
            # a new value in every round, never the valid value a lock may be waiting for
            proposal = self.with_valid_value(proposal, f"{prefix}-fresh")
            counts["fresh_proposal"] += 1
        if "invalid_proposal" in behaviours and rng.random() < 0.5:
            # a valid-looking digest whose content does not yield it
            proposal = msgspec.structs.replace(proposal, value=f"{prefix}-x")
            counts["invalid_proposal"] += 1
        if proposal is not signed.proposal:
            signed = self.sign_proposal_as(cloud, proposal)
        if "equivocate" in behaviours and len(peers) > 1:
            twin = self.with_valid_value(proposal, f"{prefix}-twin")
            half = rng.sample(peers, len(peers) // 2)
            self.transmit(cloud, signed, [p for p in peers if p not in half])
            self.transmit(cloud, self.sign_proposal_as(cloud, twin), half)
            counts["equivocate_proposal"] += 1
            if "approve_all" in behaviours:
                self.approve(cloud, twin)
        else:
            self.transmit(cloud, signed, peers)
        if "approve_all" in behaviours:
            self.approve(cloud, proposal)

    def with_valid_value(self, proposal: Proposal, value: str) -> Proposal:
        self.valid_values.add(value)
        return msgspec.structs.replace(
            proposal, value=value, content=valid_content(value), valid_round=-1
        )


def run_schedule(
    seed: int, *, core_factory: CoreFactory = ConsensusCore, clouds: int | None = None
) -> ScheduleResult:
    """Run the world drawn from ``seed`` (``clouds`` fixes M); honest clouds use
    ``core_factory`` (a ``ConsensusCore`` subclass to test the checker itself)."""
    return _World(seed, core_factory, clouds).run()


@dataclass
class Totals:
    """Counts over many schedules, for the test's report."""

    schedules: int = 0
    by_clouds: Counter[int] = field(default_factory=Counter)
    decisions: int = 0
    decisions_without_content: int = 0
    crashes: int = 0
    crashes_after_persist: int = 0
    restarts: int = 0
    byzantine_clouds: int = 0
    evidence: int = 0
    forged_rejected: int = 0
    messages_sent: int = 0
    messages_lost: int = 0
    max_round: int = 0
    slowest_after_gst: float = 0.0
    behaviours: Counter[str] = field(default_factory=Counter)

    def add(self, result: ScheduleResult) -> None:
        self.schedules += 1
        self.by_clouds[result.clouds] += 1
        self.decisions += result.decisions
        self.decisions_without_content += result.decisions_without_content
        self.crashes += result.crashes
        self.crashes_after_persist += result.crashes_after_persist
        self.restarts += result.restarts
        self.byzantine_clouds += len(result.byzantine)
        self.evidence += result.evidence
        self.forged_rejected += result.forged_rejected
        self.messages_sent += result.messages_sent
        self.messages_lost += result.messages_lost
        self.max_round = max(self.max_round, result.max_round)
        self.slowest_after_gst = max(self.slowest_after_gst, result.last_decision_after_gst)
        for behaviours in result.byzantine.values():
            self.behaviours.update(f"cloud:{b}" for b in behaviours)
        self.behaviours.update(result.behaviours)

    def report(self) -> str:
        clouds = ", ".join(f"M={m}: {n}" for m, n in sorted(self.by_clouds.items()))
        behaviours = ", ".join(f"{k} {v}" for k, v in sorted(self.behaviours.items()))
        return (
            f"{self.schedules} schedules ({clouds}); {self.decisions} honest decisions "
            f"({self.decisions_without_content} from a certificate alone); {self.crashes} "
            f"crashes ({self.crashes_after_persist} between Persist and Broadcast), "
            f"{self.restarts} restarts; {self.byzantine_clouds} Byzantine clouds; "
            f"{self.evidence} evidence reports; {self.forged_rejected} forgeries dropped; "
            f"{self.messages_sent} messages ({self.messages_lost} lost); highest round "
            f"{self.max_round}; slowest last decision {self.slowest_after_gst:.1f}s after GST; "
            f"Byzantine behaviours: {behaviours}"
        )


def main(argv: list[str]) -> int:
    """``python -m tests.common.consensus_sim SEED [SEED…]``: rerun schedules, print them."""
    failed = 0
    for seed in (int(a) for a in argv):
        result = run_schedule(seed)
        print(result.describe())
        for line in result.violations:
            print("  VIOLATION", line)
        print(
            f"  {result.decisions} decisions, {result.events} events, end t={result.end_time:.1f}s"
        )
        failed += not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
