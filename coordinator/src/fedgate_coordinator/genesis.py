"""The federation's genesis model: the same bytes in every cloud.

With the manifest's ``genesis_source`` ``"seed"``, every coordinator derives round 0 from
``model_spec`` and ``genesis_seed`` alone. With ``"weights"`` the genesis is a model
pre-trained on public data (``fedgate-agent pretrain``), and every coordinator is given
its file (:mod:`fedgate_common.genesis_weights`), kept in the state directory as
:data:`GENESIS_WEIGHTS_NAME`. Either way the result is checked against the manifest's
``genesis_digest``, so all clouds start their hash chains from one model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import nacl.signing
import numpy as np
from fedgate_common.consensus.manifest import (
    MAX_SEED,
    CloudEntry,
    ConsensusParams,
    GenesisSource,
    Manifest,
    SignedManifest,
    add_signature,
    sign_manifest,
)
from fedgate_common.digests import GENESIS_PARENT
from fedgate_common.errors import ManifestInvalid
from fedgate_common.genesis_weights import (
    GenesisWeights,
    genesis_weights_digest,
    read_genesis_weights,
    write_genesis_weights,
)
from fedgate_common.keys import public_key_text
from fedgate_common.model_spec import ModelSpec, initial_weights

from fedgate_coordinator.store import ModelRecord


def genesis_record(spec: ModelSpec, seed: int) -> ModelRecord:
    """The round-0 model for ``spec`` with weights drawn from ``default_rng(seed)``."""
    weights = initial_weights(spec, np.random.default_rng(seed))
    return ModelRecord.from_weights(
        round=0, parent_digest=GENESIS_PARENT, spec=spec, weights=weights
    )


GENESIS_WEIGHTS_NAME = "genesis-weights.msgpack"


def weights_genesis_record(genesis: GenesisWeights) -> ModelRecord:
    """The round-0 model of a pre-trained genesis-weights file."""
    return ModelRecord.from_weights(
        round=0,
        parent_digest=GENESIS_PARENT,
        spec=genesis.spec,
        weights=genesis.named_weights(),
    )


def federation_genesis(manifest: Manifest, weights: GenesisWeights | None = None) -> ModelRecord:
    """The genesis model ``manifest`` names, derived from its seed or, for a pre-trained
    genesis, taken from ``weights``; raises :class:`ManifestInvalid` when the result is not
    its ``genesis_digest`` or a pre-trained genesis has no ``weights``."""
    if not 0 <= manifest.genesis_seed < MAX_SEED:
        raise ManifestInvalid(f"genesis_seed {manifest.genesis_seed} is not in 0..2**63-1")
    if manifest.genesis_source == "seed":
        record = genesis_record(manifest.model_spec, manifest.genesis_seed)
        if record.digest != manifest.genesis_digest:
            raise ManifestInvalid(
                f"genesis_digest {manifest.genesis_digest[:16]}... is not the digest of the "
                f"model that model_spec and genesis_seed give ({record.digest[:16]}...)"
            )
        return record
    if weights is None:
        raise ManifestInvalid(
            f"the federation starts from pre-trained weights (genesis "
            f"{manifest.genesis_digest[:16]}...): give their file with --genesis-weights FILE"
        )
    problems: list[str] = []
    if weights.spec != manifest.model_spec:
        problems.append("the genesis-weights file's model spec is not the manifest's model_spec")
    if weights.pretraining.start_seed != manifest.genesis_seed:
        problems.append(
            f"the genesis-weights file was trained from seed {weights.pretraining.start_seed}, "
            f"the manifest's genesis_seed is {manifest.genesis_seed}"
        )
    digest = genesis_weights_digest(weights)
    if digest != manifest.genesis_digest:
        problems.append(
            f"the genesis-weights file has digest {digest[:16]}..., the manifest names "
            f"{manifest.genesis_digest[:16]}...: another file"
        )
    if problems:
        raise ManifestInvalid(problems[0], problems=problems)
    return weights_genesis_record(weights)


def installed_genesis_weights(state_dir: Path) -> GenesisWeights | None:
    """The genesis-weights file kept in ``state_dir``, if any (raises
    :class:`~fedgate_common.errors.GenesisWeightsInvalid` when it is unreadable)."""
    path = state_dir / GENESIS_WEIGHTS_NAME
    return read_genesis_weights(path) if path.exists() else None


def install_genesis_weights(state_dir: Path, weights: GenesisWeights) -> Path:
    """Keep ``weights`` in ``state_dir`` (atomically, replacing an earlier file)."""
    path = state_dir / GENESIS_WEIGHTS_NAME
    write_genesis_weights(path, weights, mode=0o640)
    return path


def first_manifest(
    *,
    deployment: str,
    keys: Mapping[str, nacl.signing.SigningKey],
    brokers: Mapping[str, str],
    spec: ModelSpec,
    seed: int,
    created_at: str,
    consensus: ConsensusParams | None = None,
    genesis_weights: GenesisWeights | None = None,
) -> SignedManifest:
    """Version 1 of a manifest listing ``keys``' clouds in that order (their brokers from
    ``brokers``), with the genesis model of ``spec`` and ``seed`` (or the pre-trained
    ``genesis_weights``, trained from ``seed``), signed by every one of them: what ``init``
    writes for a cloud alone, and what tests and benchmarks use when they hold every
    cloud's key."""
    source: GenesisSource = "seed" if genesis_weights is None else "weights"
    digest = (
        genesis_record(spec, seed).digest
        if genesis_weights is None
        else genesis_weights_digest(genesis_weights)
    )
    manifest = Manifest(
        deployment=deployment,
        version=1,
        previous_digest="",
        clouds=tuple(
            CloudEntry(
                cloud=cloud, public_key=public_key_text(key.verify_key), broker=brokers[cloud]
            )
            for cloud, key in keys.items()
        ),
        consensus=consensus or ConsensusParams(),
        model_spec=spec,
        genesis_seed=seed,
        genesis_digest=digest,
        created_at=created_at,
        genesis_source=source,
    )
    signed = SignedManifest(manifest=manifest)
    for cloud, key in keys.items():
        signed = add_signature(signed, sign_manifest(manifest, cloud=cloud, signing_key=key))
    return signed
