"""The neighbour graph: every party derives it from a public seed; nobody chooses it.

Agents are ordered by SHA-256(seed ‖ agent id), placed on a ring, and each is joined to
the ``degree // 2`` nearest agents on either side (plus the opposite agent when the
degree is odd): a k-regular circulant graph on a seeded permutation. The seed commits to
the base model's certificate, the round and the cloud, so the coordinator cannot steer who
neighbours whom except by leaving agents out of the roster.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from fedgate_common.secagg.context import sha256

_SEED_PURPOSE = b"fedgate-secagg-graph-v1"


def graph_seed(*, deployment: str, cloud: str, round: int, base_certificate: bytes) -> bytes:
    return sha256(
        _SEED_PURPOSE,
        deployment.encode(),
        cloud.encode(),
        round.to_bytes(8, "big"),
        base_certificate,
    )


def default_degree(n: int) -> int:
    """k = ceil(3 log2 n), at most n - 1: O(log n) neighbours."""
    if n < 2:
        return 0
    return min(n - 1, math.ceil(3 * math.log2(n)))


def effective_degree(n: int, degree: int) -> int:
    """The degree actually used for ``n`` agents: at most n - 1, even when n is odd."""
    k = min(degree, n - 1)
    if k % 2 == 1 and n % 2 == 1:
        k -= 1  # an odd-degree regular graph needs an even number of vertices
    return max(k, 0)


def default_threshold(degree: int) -> int:
    """t = ceil(2g/3) for a group of g = degree + 1 holders (the agent and its neighbours)."""
    group = degree + 1
    return -(-2 * group // 3)


def default_threshold_for(selected: int) -> int:
    """The threshold a coordinator with default settings uses for ``selected`` agents: the
    floor an agent applies unless it is configured with its own (``secagg.min_threshold``)."""
    return default_threshold(effective_degree(selected, default_degree(selected)))


def neighbour_graph(agents: Sequence[str], degree: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Each agent's neighbours (sorted), for the distinct ``agents`` and requested degree."""
    if len(set(agents)) != len(agents):
        raise ValueError("agent ids in the graph must be distinct")
    n = len(agents)
    k = effective_degree(n, degree)
    ring = sorted(agents, key=lambda agent: sha256(seed, agent.encode()))
    neighbours: dict[str, set[str]] = {agent: set() for agent in agents}
    for i, agent in enumerate(ring):
        for step in range(1, k // 2 + 1):
            neighbours[agent].add(ring[(i + step) % n])
            neighbours[agent].add(ring[(i - step) % n])
        if k % 2 == 1:
            neighbours[agent].add(ring[(i + n // 2) % n])
    return {agent: tuple(sorted(peers)) for agent, peers in neighbours.items()}


def consistency_quorum(roster_size: int, threshold: int, assumed_colluders: int = 0) -> int:
    """Signatures an agent needs on one survivor set before it reveals anything.

    Honest agents sign one set per round, colluders may sign several: two different sets
    both reaching ``floor((n + c) / 2) + 1`` signers out of a roster of n would need more
    than n + c signatures. So no two views of one round can both pass (split views fail),
    given at most ``assumed_colluders`` colluding agents.
    """
    return max(threshold, (roster_size + assumed_colluders) // 2 + 1)


def is_connected(members: Collection[str], graph: Mapping[str, Sequence[str]]) -> bool:
    """Whether ``members`` form one connected piece of ``graph`` restricted to them.

    Pairwise masks cancel only over whole connected pieces of the survivors: with two
    pieces, the coordinator could remove the masks of each piece's sum separately.
    """
    remaining = set(members)
    if not remaining:
        return True
    frontier = [remaining.pop()]
    while frontier:
        node = frontier.pop()
        for peer in graph.get(node, ()):
            if peer in remaining:
                remaining.remove(peer)
                frontier.append(peer)
    return not remaining
