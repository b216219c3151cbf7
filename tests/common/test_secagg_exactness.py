"""One secure-aggregation round under dropouts at every stage, checked against an oracle.

The oracle below re-derives, from the dropout sets and the public neighbour graph alone,
which agents survive each stage, which refuse, and whether every secret the coordinator
needs has ≥ t revealed shares. The round must then either release exactly the sum mod 2^b
of the survivors' encoded inputs (bit for bit) or abort at the predicted stage.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from fedgate_common.messages import SecAggParams
from fedgate_common.secagg.aggregator import Aborted, Aggregator, Unmasked
from fedgate_common.secagg.encoding import encode_update
from fedgate_common.secagg.graph import (
    default_degree,
    default_threshold,
    effective_degree,
    graph_seed,
    is_connected,
    neighbour_graph,
)
from fedgate_common.secagg.keystream import Words, word_dtype
from fedgate_common.secagg.local_round import run_local_round
from fedgate_common.secagg.participant import encoding_params

STAGES = ("keys", "shares", "masked", "confirm", "reveal")
# run_local_round's defaults: the graph every party derives in its rounds.
GRAPH_SEED = graph_seed(deployment="local", cloud="c1", round=1, base_certificate=b"certificate")
WEIGHT_CAP = 50
DIMENSION = {3: 200, 10: 200, 20: 100, 50: 100, 100: 50}


def make_params(n: int, word_bits: int) -> SecAggParams:
    degree = default_degree(n)
    return SecAggParams(
        word_bits=word_bits,
        clip_norm=2.0,
        weight_cap=WEIGHT_CAP,
        max_inputs=n,
        degree=degree,
        threshold=default_threshold(effective_degree(n, degree)),
    )


def agent_ids(n: int) -> tuple[str, ...]:
    return tuple(f"agent-{i:03d}" for i in range(n))


@dataclass(frozen=True)
class Prediction:
    outcome: type[Unmasked] | type[Aborted]
    stage: str  # where the round aborts; "done" when it completes
    survivors: tuple[str, ...]  # whose masked input the coordinator holds
    refused: frozenset[str]  # agents that refuse their delivery (fewer than t shares)


def predict(
    ids: Sequence[str], params: SecAggParams, dropouts: Mapping[str, set[str]]
) -> Prediction:
    """The oracle: what the round must do, from the dropouts and the neighbour graph only."""
    t = params.threshold
    first_missed = {
        a: min(STAGES.index(s) for s, who in dropouts.items() if a in who)
        for a in ids
        if any(a in who for who in dropouts.values())
    }

    def answers(agent: str, stage: str) -> bool:
        return first_missed.get(agent, len(STAGES)) > STAGES.index(stage)

    def abort(stage: str, refused: set[str] | None = None) -> Prediction:
        return Prediction(Aborted, stage, (), frozenset(refused or ()))

    keyed = sorted(a for a in ids if answers(a, "keys"))
    if len(keyed) < t or effective_degree(len(keyed), params.degree) + 1 < t:
        return abort("keys")
    graph = neighbour_graph(keyed, params.degree, GRAPH_SEED)
    holders = {a: {a, *graph[a]} for a in keyed}  # who holds shares of a's secrets
    shared = {a for a in keyed if answers(a, "shares")}
    if len(shared) < t:
        return abort("shares")
    # An agent refuses a delivery with shares from fewer than t holders (itself included).
    refused = {a for a in shared if answers(a, "masked") and len(holders[a] & shared) < t}
    survivors = {a for a in shared if answers(a, "masked")} - refused
    if len(survivors) < t:
        return abort("masked", refused)
    # Pairwise masks cancel only over a connected survivor graph; agents refuse other sets.
    if not is_connected(survivors, graph):
        return abort("masked", refused)
    confirmed = {a for a in survivors if answers(a, "confirm")}
    # Holders reveal a survivor's seed only with its own confirmation: every one must sign.
    if confirmed != survivors:
        return abort("confirm", refused)
    # Signatures from a majority of the key roster (and at least t): no split views.
    if len(confirmed) < max(t, len(keyed) // 2 + 1):
        return abort("confirm", refused)
    dropped = shared - survivors  # their mask keys must be rebuilt
    revealers = {a for a in confirmed if answers(a, "reveal")}
    for owner in survivors | dropped:
        if len(holders[owner] & revealers) < t:
            return abort("reveal", refused)
    return Prediction(Unmasked, "done", tuple(sorted(survivors)), frozenset(refused))


# -- dropout patterns -------------------------------------------------------------------


def no_dropouts() -> dict[str, set[str]]:
    return {stage: set() for stage in STAGES}


def random_dropouts(rng: random.Random, ids: Sequence[str], t: int) -> dict[str, set[str]]:
    """Up to n − t agents in total, each leaving at a random stage."""
    dropouts = no_dropouts()
    for agent in rng.sample(list(ids), rng.randint(0, len(ids) - t)):
        dropouts[rng.choice(STAGES)].add(agent)
    return dropouts


def all_but_t_minus_one(
    rng: random.Random, ids: Sequence[str], t: int, stage: str
) -> dict[str, set[str]]:
    dropouts = no_dropouts()
    dropouts[stage] = set(rng.sample(list(ids), len(ids) - (t - 1)))
    return dropouts


def around_one_owner(
    rng: random.Random, ids: Sequence[str], params: SecAggParams, kind: str, short: int
) -> dict[str, set[str]]:
    """Leave one owner's secret exactly t (short=0) or t − 1 (short=1) revealed shares.

    seed: the owner survives and g − t + short of its neighbours do not reveal.
    key: the owner drops before its masked input, and g − t − 1 + short neighbours do not
    reveal (its own share is gone with it). refuse: g − t + 1 neighbours leave before
    sending shares, so the owner holds t − 1 shares and must refuse its delivery.
    """
    graph = neighbour_graph(ids, params.degree, GRAPH_SEED)
    owner = rng.choice(list(ids))
    peers = list(graph[owner])
    g, t = len(peers) + 1, params.threshold
    dropouts = no_dropouts()
    if kind == "seed":
        dropouts["reveal"] = set(rng.sample(peers, g - t + short))
    elif kind == "key":
        dropouts["masked"] = {owner}
        dropouts["reveal"] = set(rng.sample(peers, g - t - 1 + short))
    else:
        dropouts["shares"] = set(rng.sample(peers, g - t + 1))
    return dropouts


@dataclass(frozen=True)
class Case:
    n: int
    word_bits: int
    seed: int
    pattern: str  # random | all-but:<stage> | seed:<short> | key:<short> | refuse

    def __str__(self) -> str:
        return f"n{self.n}-b{self.word_bits}-{self.pattern}-s{self.seed}"

    def dropouts(self, rng: random.Random, params: SecAggParams) -> dict[str, set[str]]:
        ids, t = agent_ids(self.n), params.threshold
        kind, _, detail = self.pattern.partition(":")
        if kind == "random":
            return random_dropouts(rng, ids, t)
        if kind == "all-but":
            return all_but_t_minus_one(rng, ids, t, detail)
        return around_one_owner(rng, ids, params, kind, int(detail or 0))


def _cases() -> list[Case]:
    cases: list[Case] = []
    # n = 20 (sparse graph, cheap) adds random rounds whose outcomes are mixed.
    random_rounds = {3: 10, 10: 8, 20: 8, 50: 3, 100: 2}
    for n, count in random_rounds.items():
        cases += [Case(n, (16, 32)[s % 2], s, "random") for s in range(count)]
    for n in (3, 10, 50):
        cases += [Case(n, 16 if n != 10 else 32, 100, f"all-but:{stage}") for stage in STAGES]
        cases += [Case(n, 32, 200, "seed:0"), Case(n, 16, 201, "seed:1")]
        cases += [Case(n, 16, 202, "key:0"), Case(n, 32, 203, "key:1")]
    cases += [Case(50, 32, 204, "refuse")]  # complete graphs (n = 3, 10) abort before refusing
    cases += [Case(100, 32, 100, "all-but:keys"), Case(100, 16, 101, "all-but:reveal")]
    cases += [Case(100, 16, 200, "seed:1"), Case(100, 32, 202, "key:0")]
    return cases


CASES = _cases()


def encode_inputs(
    rng: random.Random, ids: Sequence[str], params: SecAggParams, dimension: int
) -> tuple[dict[str, Words], dict[str, int]]:
    encoded, weights = {}, {}
    for agent in ids:
        update = np.array([rng.gauss(0.0, 1.0) for _ in range(dimension)])
        weights[agent] = rng.randint(0, 2 * WEIGHT_CAP)
        encoded[agent] = encode_update(
            update, weights[agent], encoding_params(params), rng.randbytes
        )
    return encoded, weights


def expected_sum(encoded: Mapping[str, Words], survivors: Sequence[str], bits: int) -> Words:
    total = np.zeros(encoded[survivors[0]].size, dtype=np.int64)
    for agent in survivors:
        total += encoded[agent]
    wrapped: Words = (total % 2**bits).astype(word_dtype(bits))
    return wrapped


@pytest.mark.parametrize("case", CASES, ids=str)
def test_round_releases_exactly_the_survivors_sum_or_aborts(case: Case) -> None:
    rng = random.Random(f"{case}")
    params = make_params(case.n, case.word_bits)
    ids = agent_ids(case.n)
    dropouts = case.dropouts(rng, params)
    encoded, weights = encode_inputs(rng, ids, params, DIMENSION[case.n])
    prediction = predict(ids, params, dropouts)
    if case.pattern.startswith("all-but"):
        assert prediction.outcome is Aborted
        assert prediction.stage == case.pattern.partition(":")[2]
    if case.pattern in ("seed:0", "key:0"):
        assert prediction.outcome is Unmasked
    if case.pattern in ("seed:1", "key:1"):
        assert (prediction.outcome, prediction.stage) == (Aborted, "reveal")
    if case.pattern == "refuse":
        assert prediction.refused

    result = run_local_round(encoded, params, dropouts=dropouts, random_bytes=rng.randbytes)

    outcome = result.outcome
    assert type(outcome) is prediction.outcome, outcome
    assert result.refusals == dict.fromkeys(prediction.refused, "too_few_neighbours")
    assert result.aggregator.stage == "done"
    if isinstance(outcome, Aborted):
        assert outcome.stage == prediction.stage
        return
    assert isinstance(outcome, Unmasked)
    assert outcome.survivors == prediction.survivors
    assert result.aggregator.records["masked"].received == len(outcome.survivors)
    assert outcome.words.dtype == word_dtype(case.word_bits)
    expected = expected_sum(encoded, outcome.survivors, case.word_bits)
    assert outcome.words.tobytes() == expected.tobytes()  # bit for bit
    capped = [min(weights[a], WEIGHT_CAP) for a in outcome.survivors]
    assert outcome.decoded.total_weight == sum(capped)


def test_case_table_covers_every_size_word_and_outcome() -> None:
    """The table above is not degenerate: both outcomes at every N, both word sizes."""
    seen: set[tuple[int, int, str]] = set()
    for case in CASES:
        rng = random.Random(f"{case}")
        params = make_params(case.n, case.word_bits)
        prediction = predict(agent_ids(case.n), params, case.dropouts(rng, params))
        seen.add((case.n, case.word_bits, prediction.outcome.__name__))
    for n in (3, 10, 50, 100):
        for name in ("Unmasked", "Aborted"):
            assert any((n, bits, name) in seen for bits in (16, 32)), (n, name)
        assert {bits for (m, bits, _) in seen if m == n} == {16, 32}


def test_hand_checked_refusals_and_reveal_abort() -> None:
    """A case worked out by hand on the pinned degree-4 graph of test_secagg_graph.py.

    agent-00's neighbours are 01, 04, 07, 09; agent-07's are 00, 01, 03, 04. With 01 and 04
    gone before the share stage, both hold 3 < t = 4 shares and refuse their delivery; the
    other six hold ≥ 4 and send masked inputs. agent-00's mask key then has holders
    {00, 01, 04, 07, 09}, of which only 09 reveals: reconstruction is impossible, the round
    must abort at the reveal stage.
    """
    ids = tuple(f"agent-{i:02d}" for i in range(10))
    params = SecAggParams(
        word_bits=16, clip_norm=1.0, weight_cap=WEIGHT_CAP, max_inputs=10, degree=4, threshold=4
    )
    assert neighbour_graph(ids, 4, GRAPH_SEED)["agent-00"] == (
        "agent-01",
        "agent-04",
        "agent-07",
        "agent-09",
    )
    dropouts = no_dropouts()
    dropouts["shares"] = {"agent-01", "agent-04"}
    prediction = predict(ids, params, dropouts)
    assert prediction == Prediction(Aborted, "reveal", (), frozenset({"agent-00", "agent-07"}))
    rng = random.Random(5)
    encoded, _ = encode_inputs(rng, ids, params, 20)
    # degree 4 at n = 10 is below the default graph: the agents take it with a floor of 2
    result = run_local_round(
        encoded, params, dropouts=dropouts, random_bytes=rng.randbytes, min_threshold=2
    )
    assert isinstance(result.outcome, Aborted)
    assert result.outcome.stage == "reveal"
    assert result.refusals == {"agent-00": "too_few_neighbours", "agent-07": "too_few_neighbours"}
    assert result.aggregator.survivors == tuple(
        a for a in ids if a not in {"agent-00", "agent-01", "agent-04", "agent-07"}
    )


def test_close_dispatches_to_the_open_stage_and_refuses_after_the_end() -> None:
    """``Aggregator.close`` (what the MQTT driver calls) closes whichever stage is open."""
    aggregator = Aggregator(
        deployment="d",
        cloud="c",
        round=1,
        base_digest="base",
        start_digest=bytes(32),
        base_certificate=b"cert",
        selected=agent_ids(3),
        params=make_params(3, 16),
        dimension=4,
        min_participants=1,
    )
    outcome = aggregator.close()  # no keys arrived: the keys stage aborts
    assert isinstance(outcome, Aborted)
    assert outcome.stage == "keys"
    with pytest.raises(RuntimeError):
        aggregator.close()
