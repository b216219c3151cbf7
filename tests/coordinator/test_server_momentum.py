"""Heavy-ball momentum on the decided models (the manifest's ``server_momentum``): every
coordinator rebuilds a proposal's model as base + Δ + β·(base − parent), from its own
store; without it, or at height 1, the model is base + Δ as before."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import msgspec
import nacl.signing
import numpy as np
import pytest
from fedgate_common.consensus.manifest import (
    SignedManifest,
    encode_manifest_file,
    manifest_digest,
    manifest_problems,
)
from fedgate_common.consensus.wire import proposal_content
from fedgate_common.envelope import seal
from fedgate_common.errors import MalformedMessage
from fedgate_common.model_spec import parameter_shapes
from fedgate_coordinator.aggregation import as_float32, with_momentum
from fedgate_coordinator.federation import FederationNode
from fedgate_coordinator.store import ModelRecord

from tests.coordinator.test_federation_driver import SPEC, aggregate, c1_of_four
from tests.federation_support import federation_manifest


def test_momentum_is_the_weighted_difference_of_the_last_two_models() -> None:
    rng = np.random.default_rng(3)
    names = [name for name, _ in parameter_shapes(SPEC)]
    arrays = [
        {n: rng.normal(0, 1, s).astype(np.float32) for n, s in parameter_shapes(SPEC)}
        for _ in range(3)
    ]
    delta, base, parent = arrays
    moved = with_momentum(delta, base, parent, 0.8)
    assert list(moved) == names
    for name in names:
        expected = delta[name].astype(np.float64) + 0.8 * (
            base[name].astype(np.float64) - parent[name].astype(np.float64)
        )
        assert moved[name].dtype == np.float32
        assert np.array_equal(moved[name], expected.astype(np.float32))
    assert all(np.array_equal(with_momentum(delta, base, parent, 0.0)[n], delta[n]) for n in names)


def test_a_manifest_without_momentum_keeps_its_encoding() -> None:
    keys = {"c1": nacl.signing.SigningKey.generate()}
    signed = federation_manifest(deployment="plant", keys=keys, spec=SPEC)
    assert b"server_momentum" not in encode_manifest_file(signed)
    moving = msgspec.structs.replace(signed.manifest, server_momentum=0.8)
    data = encode_manifest_file(SignedManifest(manifest=moving))
    assert b'"server_momentum": 0.8' in data
    assert manifest_digest(moving) != manifest_digest(signed.manifest)
    assert manifest_problems(moving) == []
    for bad in (1.0, -0.1, math.nan):
        wrong = msgspec.structs.replace(signed.manifest, server_momentum=bad)
        assert any("server_momentum" in p for p in manifest_problems(wrong))


def _node_at_height_2(tmp_path: Path, beta: float) -> tuple[FederationNode, ModelRecord, bytes]:
    """c1's node of four clouds with ``beta`` in its manifest, height 1 decided (genesis +
    a fixed step), and the content of a proposal for height 2 (three clouds' aggregates)."""
    four = c1_of_four(tmp_path, f"momentum-{int(beta * 10)}")
    node = four.node
    node.manifest = msgspec.structs.replace(node.manifest, server_momentum=beta)
    genesis = four.genesis
    step = {n: np.full(s, 0.01, dtype=np.float32) for n, s in parameter_shapes(SPEC)}
    first_weights = {
        n: (np.asarray(w, dtype=np.float32) + step[n])
        for n, w in as_float32(genesis.decode_weights()).items()
    }
    first = ModelRecord.from_weights(
        round=1, parent_digest=genesis.digest, spec=SPEC, weights=first_weights
    )
    four.store.add_model(first)
    node._base, node._height = first, 2
    raws = tuple(
        seal(
            aggregate(2, first, index),
            signing_key=four.keys[cloud],
            deployment=four.deployment,
            cloud=cloud,
            sender=cloud,
        )
        for index, cloud in enumerate(("c1", "c2", "c3"), start=1)
    )
    return node, first, proposal_content(raws)


def test_a_proposal_at_height_2_carries_the_momentum_of_height_1(tmp_path: Path) -> None:
    node, _, content = _node_at_height_2(tmp_path, 0.0)
    plain = node._model_from_content(2, content).decode_weights()
    node.manifest = msgspec.structs.replace(node.manifest, server_momentum=0.8)
    moved = node._model_from_content(2, content).decode_weights()
    for name, _ in parameter_shapes(SPEC):
        # height 1 moved every weight by 0.01: momentum adds 0.8 of that again.
        difference = np.asarray(moved[name], np.float64) - np.asarray(plain[name], np.float64)
        assert np.allclose(difference, 0.008, atol=1e-6)


def test_a_node_without_the_parent_model_refuses_the_proposal(tmp_path: Path) -> None:
    node, first, content = _node_at_height_2(tmp_path, 0.8)
    orphan = dataclasses.replace(first, parent_digest="cd" * 32)
    node._base = orphan
    with pytest.raises(MalformedMessage, match="server momentum"):
        node._model_from_content(2, content)
