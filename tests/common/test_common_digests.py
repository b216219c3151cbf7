"""Model digests: deterministic, and covering parent, round, spec and every weight byte."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from fedgate_common.arrays import WireArray, encode_arrays
from fedgate_common.digests import GENESIS_PARENT, model_digest
from fedgate_common.model_spec import ModelSpec, initial_weights
from hypothesis import given
from hypothesis import strategies as st

SPEC = ModelSpec(n_features=2, window=5, n_classes=2, channels=3, kernel_size=3)
WEIGHTS = encode_arrays(initial_weights(SPEC, np.random.default_rng(5)))
PARENT = "5e" * 32


def _digest(
    *,
    parent_digest: str = PARENT,
    round: int = 4,
    spec: ModelSpec = SPEC,
    weights: tuple[WireArray, ...] = WEIGHTS,
) -> str:
    return model_digest(parent_digest=parent_digest, round=round, spec=spec, weights=weights)


def test_known_answer() -> None:
    # Pinned: changing the encoding invalidates every stored hash chain.
    spec = ModelSpec(n_features=1, window=1, n_classes=1, channels=1, kernel_size=1)
    weights = encode_arrays(
        {
            "conv1.weight": np.full((1, 1, 1), 0.5, dtype="<f4"),
            "conv1.bias": np.zeros(1, dtype="<f4"),
        }
    )
    assert (
        model_digest(parent_digest=GENESIS_PARENT, round=0, spec=spec, weights=weights)
        == "0e3226abbce70a6e25fb2529713dd24cc35b3bd95f290a9b608d4bf271ac1b72"
    )
    assert (
        model_digest(parent_digest="ab" * 32, round=1, spec=spec, weights=weights)
        == "94dc16f770d304d748bd3ef0c0b341dbb370b37dd3053c12cd702b6310db6980"
    )


def test_deterministic_and_independent_of_object_identity() -> None:
    digest = _digest()
    assert len(digest) == 64
    assert int(digest, 16) >= 0  # lowercase hex
    assert digest == digest.lower()
    assert _digest() == digest
    # Fresh objects decoded from the wire give the same digest.
    spec = msgspec.msgpack.decode(msgspec.msgpack.encode(SPEC), type=ModelSpec)
    weights = msgspec.msgpack.decode(msgspec.msgpack.encode(WEIGHTS), type=tuple[WireArray, ...])
    assert _digest(spec=spec, weights=weights) == digest
    assert model_digest(parent_digest=PARENT, round=4, spec=SPEC, weights=list(WEIGHTS)) == digest


def test_genesis_parent_is_empty() -> None:
    assert GENESIS_PARENT == ""
    assert _digest(parent_digest=GENESIS_PARENT, round=0) != _digest(round=0)


@pytest.mark.parametrize("parent", ["", "5e" * 31 + "5f", "5E" * 32, PARENT + "00", PARENT[:-1]])
def test_changes_with_the_parent(parent: str) -> None:
    assert _digest(parent_digest=parent) != _digest()


@pytest.mark.parametrize("number", [0, 3, 5, 2**40])
def test_changes_with_the_round(number: int) -> None:
    assert _digest(round=number) != _digest()


@pytest.mark.parametrize(
    "changes",
    [
        {"window": 6},
        {"n_classes": 3},
        {"channels": 4},
        {"kernel_size": 2},
        {"n_features": 2, "feature_mean": (0.0, 0.0)},
        {"feature_mean": (0.0, 1e-9)},
        {"feature_scale": (1.0, 1.0)},
    ],
    ids=str,
)
def test_changes_with_the_spec(changes: dict[str, object]) -> None:
    assert _digest(spec=msgspec.structs.replace(SPEC, **changes)) != _digest()


@given(data=st.data())
def test_changes_with_any_single_weight_byte(data: st.DataObject) -> None:
    which = data.draw(st.integers(0, len(WEIGHTS) - 1), label="array")
    item = WEIGHTS[which]
    index = data.draw(st.integers(0, len(item.data) - 1), label="byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    changed = bytearray(item.data)
    changed[index] ^= flip
    weights = list(WEIGHTS)
    weights[which] = msgspec.structs.replace(item, data=bytes(changed))
    assert _digest(weights=tuple(weights)) != _digest()


def test_changes_with_names_order_dtype_and_shape() -> None:
    first = WEIGHTS[0]
    renamed = (msgspec.structs.replace(first, name="conv9.weight"), *WEIGHTS[1:])
    reordered = (WEIGHTS[1], WEIGHTS[0], *WEIGHTS[2:])
    assert first.shape == (3, 2, 3)
    reshaped = (msgspec.structs.replace(first, shape=(6, 3)), *WEIGHTS[1:])
    retyped = (msgspec.structs.replace(first, dtype="<i4"), *WEIGHTS[1:])
    dropped = WEIGHTS[:-1]
    digests = {
        _digest(weights=w) for w in (WEIGHTS, renamed, reordered, reshaped, retyped, dropped)
    }
    assert len(digests) == 6


def test_chain_child_depends_on_every_ancestor() -> None:
    def chain(genesis: tuple[WireArray, ...]) -> list[str]:
        digests = [_digest(parent_digest=GENESIS_PARENT, round=0, weights=genesis)]
        for number in (1, 2, 3):
            digests.append(_digest(parent_digest=digests[-1], round=number))
        return digests

    original = chain(WEIGHTS)
    tampered_genesis = encode_arrays(initial_weights(SPEC, np.random.default_rng(6)))
    tampered = chain(tampered_genesis)
    # Rounds 1..3 carry identical weights, yet every later link differs.
    assert all(a != b for a, b in zip(original, tampered, strict=True))
    assert len(set(original)) == 4
