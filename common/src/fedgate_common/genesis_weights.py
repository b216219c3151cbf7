"""A pre-trained genesis model on disk: weights, their model spec and how they were made.

``fedgate-agent pretrain`` writes one (it has torch); coordinators read it (numpy only)
when the federation manifest's ``genesis_source`` is ``"weights"``, and check its digest
against the manifest's ``genesis_digest``. The digest is the round-0 link of the model
hash chain (:func:`~fedgate_common.digests.model_digest` with an empty parent), so the
manifest pins the exact weights every cloud starts from.

The file is the msgpack encoding of :class:`GenesisWeights`. Decoding checks the format,
the model spec, that the arrays are exactly the spec's parameters (float32, finite) and
the size before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from fedgate_common.arrays import WireArray, check_shapes, decode_arrays, encode_arrays
from fedgate_common.atomic_files import atomic_write
from fedgate_common.consensus.manifest import MAX_SEED
from fedgate_common.digests import GENESIS_PARENT, model_digest
from fedgate_common.errors import FedgateError, GenesisWeightsInvalid
from fedgate_common.model_spec import ModelSpec, parameter_shapes

__all__ = [
    "GENESIS_WEIGHTS_FORMAT",
    "MAX_GENESIS_WEIGHTS_BYTES",
    "GenesisWeights",
    "Pretraining",
    "decode_genesis_weights",
    "encode_genesis_weights",
    "genesis_weights_digest",
    "make_genesis_weights",
    "read_genesis_weights",
    "write_genesis_weights",
]

GENESIS_WEIGHTS_FORMAT = "fedgate-genesis-weights/1"
MAX_GENESIS_WEIGHTS_BYTES = 256 * 1024 * 1024


class Pretraining(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the weights were trained, for the people who sign the manifest naming them.

    ``start_seed`` gave the random weights training started from (the manifest's
    ``genesis_seed``); ``runs_sha256`` are the SHA-256 digests of the simulated-runs files;
    ``trainer`` names what trained (library versions, threads), which the weights depend on.
    """

    start_seed: int
    runs_sha256: tuple[str, ...]
    runs: int
    windows: int
    stride: int
    epochs: int
    learning_rate: float
    momentum: float
    batch_size: int
    created_at: str
    trainer: str = ""


class GenesisWeights(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The genesis model's ``spec`` and ``weights`` (in :func:`parameter_shapes` order)."""

    format: str = GENESIS_WEIGHTS_FORMAT
    spec: ModelSpec
    weights: tuple[WireArray, ...]
    pretraining: Pretraining

    def named_weights(self) -> dict[str, npt.NDArray[np.float32]]:
        """The weights by parameter name (already checked when the file was decoded)."""
        return {
            name: np.asarray(array, dtype=np.float32)
            for name, array in decode_arrays(self.weights).items()
        }


def make_genesis_weights(
    spec: ModelSpec, weights: Mapping[str, npt.NDArray[np.floating]], pretraining: Pretraining
) -> GenesisWeights:
    """Pack ``weights`` (named as :func:`parameter_shapes` names them) for ``spec``."""
    ordered = {
        name: np.ascontiguousarray(weights[name], dtype=np.float32)
        for name, _ in parameter_shapes(spec)
        if name in weights
    }
    check_shapes(ordered, parameter_shapes(spec))
    return _checked(
        GenesisWeights(spec=spec, weights=encode_arrays(ordered), pretraining=pretraining)
    )


def genesis_weights_digest(genesis: GenesisWeights) -> str:
    """The digest the manifest names this genesis by (round 0, empty parent)."""
    return model_digest(
        parent_digest=GENESIS_PARENT, round=0, spec=genesis.spec, weights=genesis.weights
    )


def encode_genesis_weights(genesis: GenesisWeights) -> bytes:
    return msgspec.msgpack.encode(genesis)


def decode_genesis_weights(data: bytes, *, path: str | None = None) -> GenesisWeights:
    """Decode and check a genesis-weights file's bytes."""
    if len(data) > MAX_GENESIS_WEIGHTS_BYTES:
        raise GenesisWeightsInvalid(
            f"{len(data)} bytes > limit {MAX_GENESIS_WEIGHTS_BYTES}", path=path
        )
    try:
        genesis = msgspec.msgpack.decode(data, type=GenesisWeights)
    except (msgspec.DecodeError, FedgateError) as exc:
        raise GenesisWeightsInvalid(f"not a genesis-weights file: {exc}", path=path) from None
    return _checked(genesis, path=path)


def _checked(genesis: GenesisWeights, *, path: str | None = None) -> GenesisWeights:
    if genesis.format != GENESIS_WEIGHTS_FORMAT:
        raise GenesisWeightsInvalid(
            f"format {genesis.format!r}; this release reads {GENESIS_WEIGHTS_FORMAT!r}", path=path
        )
    if not 0 <= genesis.pretraining.start_seed < MAX_SEED:
        raise GenesisWeightsInvalid(
            f"start_seed {genesis.pretraining.start_seed} is not a genesis seed (0..2**63-1)",
            path=path,
        )
    if [item.name for item in genesis.weights] != [
        name for name, _ in parameter_shapes(genesis.spec)
    ]:
        raise GenesisWeightsInvalid(
            "the arrays are not the model spec's parameters in order", path=path
        )
    if any(item.dtype != "<f4" for item in genesis.weights):
        raise GenesisWeightsInvalid("weights must be float32", path=path)
    try:
        named = decode_arrays(genesis.weights)
        check_shapes(named, parameter_shapes(genesis.spec))
    except FedgateError as exc:
        raise GenesisWeightsInvalid(str(exc), path=path) from None
    return genesis


def read_genesis_weights(path: Path) -> GenesisWeights:
    """The genesis weights in ``path``; :class:`GenesisWeightsInvalid` if unusable."""
    try:
        size = path.stat().st_size
        if size > MAX_GENESIS_WEIGHTS_BYTES:
            raise GenesisWeightsInvalid(
                f"{size} bytes > limit {MAX_GENESIS_WEIGHTS_BYTES}", path=str(path)
            )
        data = path.read_bytes()
    except OSError as exc:
        raise GenesisWeightsInvalid(f"cannot read it: {exc.strerror}", path=str(path)) from None
    return decode_genesis_weights(data, path=str(path))


def write_genesis_weights(path: Path, genesis: GenesisWeights, *, mode: int = 0o644) -> None:
    """Write ``genesis`` to ``path`` atomically (:func:`atomic_write`) with ``mode``."""
    atomic_write(path, encode_genesis_weights(genesis), mode=mode)
