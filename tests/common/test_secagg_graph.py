"""The neighbour graph: a fixed vector that pins the derivation, and its structural properties."""

from __future__ import annotations

import hashlib
import random

import pytest
from fedgate_common.secagg.graph import (
    default_degree,
    default_threshold,
    effective_degree,
    graph_seed,
    neighbour_graph,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# graph_seed with the defaults of run_local_round. These constants pin the wire format of
# graph derivation (seed hashing, ring order, circulant wiring): every agent and coordinator
# must derive exactly these neighbours, so changing them breaks interoperability.
SEED = graph_seed(deployment="local", cloud="c1", round=1, base_certificate=b"certificate")
SEED_HEX = "8d9adcba644f674863587719b611badf1cf6eca49de2ab6d0cc9e4aa45b0c0c3"
TEN = tuple(f"agent-{i:02d}" for i in range(10))
EIGHT = TEN[:8]
TEN_DEGREE_4 = {
    "agent-00": ("agent-01", "agent-04", "agent-07", "agent-09"),
    "agent-01": ("agent-00", "agent-06", "agent-07", "agent-09"),
    "agent-02": ("agent-03", "agent-05", "agent-06", "agent-08"),
    "agent-03": ("agent-02", "agent-04", "agent-05", "agent-07"),
    "agent-04": ("agent-00", "agent-03", "agent-05", "agent-07"),
    "agent-05": ("agent-02", "agent-03", "agent-04", "agent-08"),
    "agent-06": ("agent-01", "agent-02", "agent-08", "agent-09"),
    "agent-07": ("agent-00", "agent-01", "agent-03", "agent-04"),
    "agent-08": ("agent-02", "agent-05", "agent-06", "agent-09"),
    "agent-09": ("agent-00", "agent-01", "agent-06", "agent-08"),
}
EIGHT_DEGREE_3 = {  # odd degree: each agent is also joined to the one opposite on the ring
    "agent-00": ("agent-01", "agent-05", "agent-07"),
    "agent-01": ("agent-00", "agent-03", "agent-06"),
    "agent-02": ("agent-05", "agent-06", "agent-07"),
    "agent-03": ("agent-01", "agent-04", "agent-05"),
    "agent-04": ("agent-03", "agent-06", "agent-07"),
    "agent-05": ("agent-00", "agent-02", "agent-03"),
    "agent-06": ("agent-01", "agent-02", "agent-04"),
    "agent-07": ("agent-00", "agent-02", "agent-04"),
}

IDS = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=10),
    min_size=1,
    max_size=40,
    unique=True,
)


def _length_prefixed_sha256(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(len(p).to_bytes(8, "big") + p for p in parts)).digest()


def test_seed_known_answer() -> None:
    assert SEED.hex() == SEED_HEX
    independent = _length_prefixed_sha256(
        b"fedgate-secagg-graph-v1", b"local", b"c1", (1).to_bytes(8, "big"), b"certificate"
    )
    assert independent == SEED


def test_even_degree_known_answer() -> None:
    assert neighbour_graph(TEN, 4, SEED) == TEN_DEGREE_4


def test_odd_degree_known_answer() -> None:
    assert neighbour_graph(EIGHT, 3, SEED) == EIGHT_DEGREE_3


def test_known_answer_is_a_seeded_ring() -> None:
    """Re-derive TEN_DEGREE_4 from its definition: ring by SHA-256(seed ‖ id), ±2 steps."""
    ring = sorted(TEN, key=lambda a: _length_prefixed_sha256(SEED, a.encode()))
    for i, agent in enumerate(ring):
        expected = {ring[(i + s) % 10] for s in (-2, -1, 1, 2)}
        assert set(TEN_DEGREE_4[agent]) == expected


@pytest.mark.parametrize(
    ("deployment", "cloud", "round", "certificate"),
    [
        ("other", "c1", 1, b"certificate"),
        ("local", "c2", 1, b"certificate"),
        ("local", "c1", 2, b"certificate"),
        ("local", "c1", 1, b"certificatf"),
        ("loca", "lc1", 1, b"certificate"),  # parts are length-prefixed, not concatenated
    ],
)
def test_seed_binds_every_input(
    deployment: str, cloud: str, round: int, certificate: bytes
) -> None:
    seed = graph_seed(deployment=deployment, cloud=cloud, round=round, base_certificate=certificate)
    assert seed != SEED
    assert neighbour_graph(TEN, 4, seed) != TEN_DEGREE_4


@settings(max_examples=80, deadline=None)
@given(IDS, st.integers(min_value=0, max_value=60), st.binary(min_size=32, max_size=32), st.data())
def test_graph_is_regular_symmetric_and_order_free(
    ids: list[str], degree: int, seed: bytes, data: st.DataObject
) -> None:
    graph = neighbour_graph(ids, degree, seed)
    k = effective_degree(len(ids), degree)
    assert set(graph) == set(ids)
    for agent, peers in graph.items():
        assert len(peers) == k
        assert agent not in peers
        assert list(peers) == sorted(set(peers))
        assert all(agent in graph[peer] for peer in peers)
    shuffled = data.draw(st.permutations(ids))
    assert neighbour_graph(shuffled, degree, seed) == graph


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        neighbour_graph(["a", "b", "a"], 2, SEED)


@pytest.mark.parametrize(
    ("n", "degree", "expected"),
    [(1, 5, 0), (2, 5, 1), (3, 1, 0), (3, 2, 2), (4, 3, 3), (7, 3, 2), (7, 10, 6), (8, 3, 3)],
)
def test_effective_degree(n: int, degree: int, expected: int) -> None:
    assert effective_degree(n, degree) == expected


def test_default_degree_is_logarithmic() -> None:
    assert [default_degree(n) for n in (0, 1, 2, 3, 4, 10, 50, 100, 1000)] == [
        0,
        0,
        1,
        2,
        3,
        9,
        17,
        20,
        30,
    ]


@pytest.mark.parametrize("degree", range(0, 40))
def test_default_threshold_is_a_two_thirds_majority(degree: int) -> None:
    t = default_threshold(degree)
    group = degree + 1
    assert 3 * t >= 2 * group
    assert 3 * (t - 1) < 2 * group
    if group >= 2:
        assert 2 * t > group


def test_edge_count_matches_the_degree() -> None:
    rng = random.Random(4)
    ids = [f"gw-{rng.randrange(10**6)}" for _ in range(30)]
    graph = neighbour_graph(ids, default_degree(30), SEED)
    assert sum(len(p) for p in graph.values()) == 30 * effective_degree(30, default_degree(30))
