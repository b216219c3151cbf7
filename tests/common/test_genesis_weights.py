"""Genesis-weights files: what `fedgate-agent pretrain` writes and coordinators read."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
from fedgate_common.arrays import encode_arrays
from fedgate_common.digests import GENESIS_PARENT, model_digest
from fedgate_common.errors import GenesisWeightsInvalid, MalformedMessage
from fedgate_common.genesis_weights import (
    GenesisWeights,
    Pretraining,
    decode_genesis_weights,
    encode_genesis_weights,
    genesis_weights_digest,
    make_genesis_weights,
    read_genesis_weights,
    write_genesis_weights,
)
from fedgate_common.model_spec import ModelSpec, initial_weights

SPEC = ModelSpec(n_features=4, window=6, n_classes=3, channels=5)
PRETRAINING = Pretraining(
    start_seed=7,
    runs_sha256=("ab" * 32,),
    runs=2,
    windows=100,
    stride=2,
    epochs=2,
    learning_rate=0.01,
    momentum=0.9,
    batch_size=32,
    created_at="2026-11-29T12:00:00Z",
)


def _genesis(seed: int = 7) -> GenesisWeights:
    return make_genesis_weights(
        SPEC, initial_weights(SPEC, np.random.default_rng(seed)), PRETRAINING
    )


def test_round_trip_keeps_weights_and_digest(tmp_path: Path) -> None:
    genesis = _genesis()
    path = tmp_path / "genesis.msgpack"
    write_genesis_weights(path, genesis)
    again = read_genesis_weights(path)
    assert again == genesis
    assert genesis_weights_digest(again) == genesis_weights_digest(genesis)
    start = initial_weights(SPEC, np.random.default_rng(7))
    for name, array in again.named_weights().items():
        np.testing.assert_array_equal(array, start[name])
    assert [p.name for p in tmp_path.iterdir()] == ["genesis.msgpack"]


def test_digest_is_the_round_zero_link_of_the_chain() -> None:
    genesis = _genesis()
    expected = model_digest(
        parent_digest=GENESIS_PARENT,
        round=0,
        spec=SPEC,
        weights=encode_arrays(initial_weights(SPEC, np.random.default_rng(7))),
    )
    assert genesis_weights_digest(genesis) == expected
    assert genesis_weights_digest(_genesis(seed=8)) != expected


def test_weights_must_be_the_specs_parameters() -> None:
    weights = initial_weights(SPEC, np.random.default_rng(1))
    del weights["head.bias"]
    with pytest.raises(MalformedMessage, match=r"missing=\['head\.bias'\]"):
        make_genesis_weights(SPEC, weights, PRETRAINING)


def _tampered(**changes: object) -> bytes:
    raw = msgspec.msgpack.decode(encode_genesis_weights(_genesis()))
    raw.update(changes)
    return msgspec.msgpack.encode(raw)


def test_tampered_files_are_refused() -> None:
    genesis = _genesis()
    weights = list(genesis.weights)
    nan = np.full((5, 4, 3), np.nan, dtype=np.float32)
    cases: list[tuple[bytes, str]] = [
        (b"\x93not a genesis", "not a genesis-weights file"),
        (encode_genesis_weights(genesis)[:-7], "not a genesis-weights file"),
        (_tampered(format="fedgate-genesis-weights/9"), "this release reads"),
        (
            _tampered(weights=[w for w in reversed(weights)]),
            "not the model spec's parameters in order",
        ),
        (
            _tampered(
                weights=[w for w in encode_arrays({"conv1.weight": nan})] + [w for w in weights[1:]]
            ),
            "NaN or Inf",
        ),
        (
            _tampered(
                weights=[
                    w
                    for w in encode_arrays(
                        {
                            name: np.asarray(array, dtype=np.float64)
                            for name, array in genesis.named_weights().items()
                        }
                    )
                ]
            ),
            "float32",
        ),
        (_tampered(spec={"n_features": 4, "window": 6, "n_classes": 4}), "wrong_shape"),
    ]
    for data, message in cases:
        with pytest.raises(GenesisWeightsInvalid, match=message):
            decode_genesis_weights(data)


@pytest.mark.parametrize("start_seed", [-1, 2**63, 2**64 - 1])
def test_a_start_seed_no_manifest_can_hold_is_refused(start_seed: int) -> None:
    """The manifest's genesis_seed is the start seed, and it must be 0..2**63-1."""
    pretraining = msgspec.to_builtins(PRETRAINING) | {"start_seed": start_seed}
    with pytest.raises(GenesisWeightsInvalid, match=f"start_seed {start_seed} is not a genesis"):
        decode_genesis_weights(_tampered(pretraining=pretraining))


def test_an_unreadable_file_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.msgpack"
    with pytest.raises(GenesisWeightsInvalid, match=r"nope\.msgpack: cannot read it"):
        read_genesis_weights(missing)
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(GenesisWeightsInvalid) as caught:
        read_genesis_weights(garbage)
    assert caught.value.path == str(garbage)
