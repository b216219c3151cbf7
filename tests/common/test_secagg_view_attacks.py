"""A lying coordinator that shows agents different or doctored survivor sets.

Each test drives honest :class:`Participant` objects up to the survivor check, then plays
a malicious coordinator. The attacks recover one agent's input unless agents refuse, so
each test asserts the refusal and that the shares revealed cannot rebuild the victim's
secrets.
"""

from __future__ import annotations

from collections.abc import Sequence

import nacl.signing
import numpy as np
import pytest
from fedgate_common.envelope import seal
from fedgate_common.errors import ConsistencyCheckFailed, ProtocolError
from fedgate_common.messages import (
    KeyRoster,
    Payload,
    Reveal,
    RosterEntry,
    RoundStart,
    SealedShare,
    SecAggParams,
    ShareDelivery,
    SurvivorCheck,
    TrainingPlan,
    UnmaskRequest,
)
from fedgate_common.secagg.context import sha256
from fedgate_common.secagg.graph import (
    consistency_quorum,
    default_degree,
    default_threshold,
    effective_degree,
    graph_seed,
    is_connected,
    neighbour_graph,
)
from fedgate_common.secagg.participant import Participant

DEPLOYMENT, CLOUD, CERTIFICATE = "plant", "c1", b"certificate"


class Round:
    """Honest agents up to their masked inputs; the coordinator's part is the test's."""

    def __init__(self, n: int, degree: int | None = None) -> None:
        self.ids = tuple(f"agent-{i:02d}" for i in range(n))
        k = default_degree(n) if degree is None else degree
        self.params = SecAggParams(
            word_bits=16,
            clip_norm=1.0,
            weight_cap=10,
            max_inputs=n,
            degree=k,
            threshold=default_threshold(effective_degree(n, k)),
        )
        start = RoundStart(
            round=1,
            base_digest="base",
            selected=self.ids,
            plan=TrainingPlan(learning_rate=0.01),
            update_timeout_s=60.0,
            min_participants=1,
            secagg=self.params,
        )
        self.keys = {a: nacl.signing.SigningKey(sha256(a.encode())) for a in self.ids}
        self.agents = {
            a: Participant(
                agent_id=a,
                deployment=DEPLOYMENT,
                cloud=CLOUD,
                start=start,
                base_certificate=CERTIFICATE,
                pinned_identities={},
                min_threshold=2,  # some rounds here use graphs below the default on purpose
            )
            for a in self.ids
        }
        roster = KeyRoster(
            round=1,
            entries=tuple(
                RosterEntry(
                    agent_id=a,
                    identity_key=bytes(self.keys[a].verify_key),
                    keys_envelope=self.seal(a, self.agents[a].advertise_keys()),
                )
                for a in self.ids
            ),
        )
        bundles = {a: self.agents[a].on_roster(roster) for a in self.ids}
        self.digest = bundles[self.ids[0]].roster_digest
        self.inbox: dict[str, list[SealedShare]] = {a: [] for a in self.ids}
        for bundle in bundles.values():
            for share in bundle.shares:
                self.inbox[share.holder].append(share)
        seed = graph_seed(deployment=DEPLOYMENT, cloud=CLOUD, round=1, base_certificate=CERTIFICATE)
        self.graph = neighbour_graph(self.ids, k, seed)
        self.ring = sorted(self.ids, key=lambda a: sha256(seed, a.encode()))

    def seal(self, agent: str, payload: Payload) -> bytes:
        return seal(
            payload, signing_key=self.keys[agent], deployment=DEPLOYMENT, cloud=CLOUD, sender=agent
        )

    def deliver_and_mask(self, withhold: dict[str, set[str]] | None = None) -> None:
        for agent in self.ids:
            kept = [s for s in self.inbox[agent] if s.owner not in (withhold or {}).get(agent, ())]
            participant = self.agents[agent]
            participant.on_delivery(
                ShareDelivery(round=1, roster_digest=self.digest, shares=tuple(kept))
            )
            encoded = participant.encode(np.full(8, 0.1), 5)
            participant.mask_input(encoded)

    def check(self, agent: str, survivors: Sequence[str]) -> bytes | ProtocolError:
        message = SurvivorCheck(
            round=1, roster_digest=self.digest, survivors=tuple(sorted(survivors))
        )
        try:
            return self.seal(agent, self.agents[agent].on_check(message))
        except ProtocolError as exc:
            return exc

    def unmask(
        self, agent: str, survivors: Sequence[str], confirmations: Sequence[bytes]
    ) -> Reveal | ProtocolError:
        dropped = tuple(sorted(set(self.ids) - set(survivors)))
        request = UnmaskRequest(
            round=1,
            roster_digest=self.digest,
            survivors=tuple(sorted(survivors)),
            dropped=dropped,
            confirmations=tuple(confirmations),
        )
        try:
            return self.agents[agent].on_unmask(request)
        except ProtocolError as exc:
            return exc


def _seed_shares_of(owner: str, reveals: Sequence[Reveal | ProtocolError]) -> int:
    return sum(
        1 for r in reveals if isinstance(r, Reveal) for s in r.seed_shares if s.owner == owner
    )


def test_withheld_share_and_declared_dropout_is_refused() -> None:
    """n = 3: the coordinator withholds b's share from u, says a dropped and shows {b, u}.
    Without the check u would mask only against a, whose mask key the coordinator then
    rebuilds, and u's seed shares come from b and u: u's input alone. u refuses."""
    round = Round(3)
    _, b, u = round.ids
    round.deliver_and_mask(withhold={u: {b}})
    outcome = round.check(u, (b, u))
    assert isinstance(outcome, ConsistencyCheckFailed)
    assert "never reached" in str(outcome)
    confirmation = round.check(b, (b, u))
    assert isinstance(confirmation, bytes)
    reveals = [round.unmask(b, (b, u), [confirmation])]
    # b alone cannot vouch for the set (quorum 2 of 3), and u revealed nothing.
    assert isinstance(reveals[0], ConsistencyCheckFailed)
    assert _seed_shares_of(u, reveals) < round.params.threshold


def test_split_views_of_the_survivor_set_are_refused_by_every_agent() -> None:
    """n = 40: half the agents are told the victim survived, half that it dropped. Each view
    gathers 20 signatures; t (12) would be met, the majority quorum (21) is not."""
    round = Round(40)
    round.deliver_and_mask()
    victim = round.ids[0]
    group_a, group_b = round.ids[:20], round.ids[20:]
    view_a = round.ids
    view_b = tuple(a for a in round.ids if a != victim)
    assert round.params.threshold <= 20 < consistency_quorum(40, round.params.threshold)
    signed_a = [round.check(a, view_a) for a in group_a]
    signed_b = [round.check(a, view_b) for a in group_b]
    assert all(isinstance(s, bytes) for s in signed_a + signed_b)
    reveals = [
        round.unmask(a, view_a, [s for s in signed_a if isinstance(s, bytes)]) for a in group_a
    ]
    reveals += [
        round.unmask(a, view_b, [s for s in signed_b if isinstance(s, bytes)]) for a in group_b
    ]
    assert all(isinstance(r, ConsistencyCheckFailed) for r in reveals)
    assert _seed_shares_of(victim, reveals) == 0


def test_survivors_that_fall_apart_in_the_graph_are_refused() -> None:
    """n = 20 with 4 neighbours: leaving out two adjacent ring positions on each side cuts
    the ring into two arcs; each arc's sum could be unmasked alone."""
    round = Round(20, degree=4)
    round.deliver_and_mask()
    ring = round.ring
    survivors = [a for i, a in enumerate(ring) if i not in (0, 1, 10, 11)]
    assert not is_connected(survivors, round.graph)
    outcomes = [round.check(a, survivors) for a in survivors]
    assert all(isinstance(o, ConsistencyCheckFailed) for o in outcomes)
    assert all("unconnected" in str(o) for o in outcomes)


@pytest.mark.parametrize("n", [5, 12, 40])
def test_honest_survivor_sets_pass_every_check(n: int) -> None:
    """The refusals do not fire on an honest round: one dropout, one view, full quorum."""
    round = Round(n)
    round.deliver_and_mask()
    survivors = round.ids[1:]
    confirmations = [round.check(a, survivors) for a in survivors]
    assert all(isinstance(c, bytes) for c in confirmations)
    signed = [c for c in confirmations if isinstance(c, bytes)]
    reveals = [round.unmask(a, survivors, signed) for a in survivors]
    assert all(isinstance(r, Reveal) for r in reveals)


def test_a_refusing_survivor_keeps_its_seed_even_if_the_others_confirm() -> None:
    """n = 6 (complete graph, g = 6, t = 4) with 2 colluders c1, c2. The coordinator
    withholds the shares of honest h1, h2 from victim v, lists them as survivors and says
    honest d dropped: v would have masked only against c1, c2 and d, whose mask key the
    coordinator rebuilds. v refuses the survivor check; the others confirm, and the holders
    must not reveal v's seed without v's own confirmation."""
    round = Round(6)
    v, h1, h2, c1, c2, _d = round.ids
    round.deliver_and_mask(withhold={v: {h1, h2}})
    survivors = (v, h1, h2, c1, c2)
    assert isinstance(round.check(v, survivors), ConsistencyCheckFailed)
    signed = [round.check(a, survivors) for a in (h1, h2, c1, c2)]
    assert all(isinstance(s, bytes) for s in signed)
    confirmations = [s for s in signed if isinstance(s, bytes)]
    assert len(confirmations) >= consistency_quorum(6, round.params.threshold)
    reveals = [round.unmask(a, survivors, confirmations) for a in (h1, h2)]
    assert all(isinstance(r, Reveal) for r in reveals)
    assert _seed_shares_of(v, reveals) == 0  # with the colluders' 2: still fewer than t = 4
    assert _seed_shares_of(h1, reveals) == 2  # confirming survivors' seeds are revealed
