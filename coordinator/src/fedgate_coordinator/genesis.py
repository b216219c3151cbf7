"""The federation's genesis model: the same bytes in every cloud, from spec and seed alone.

Every coordinator of a federation derives round 0 from the manifest's ``model_spec`` and
``genesis_seed`` and checks the result against its ``genesis_digest``, so all clouds start
their hash chains from one model without shipping weights around.
"""

from __future__ import annotations

from collections.abc import Mapping

import nacl.signing
import numpy as np
from fedgate_common.consensus.manifest import (
    MAX_SEED,
    CloudEntry,
    ConsensusParams,
    Manifest,
    SignedManifest,
    add_signature,
    sign_manifest,
)
from fedgate_common.digests import GENESIS_PARENT
from fedgate_common.errors import ManifestInvalid
from fedgate_common.keys import public_key_text
from fedgate_common.model_spec import ModelSpec, initial_weights

from fedgate_coordinator.store import ModelRecord


def genesis_record(spec: ModelSpec, seed: int) -> ModelRecord:
    """The round-0 model for ``spec`` with weights drawn from ``default_rng(seed)``."""
    weights = initial_weights(spec, np.random.default_rng(seed))
    return ModelRecord.from_weights(
        round=0, parent_digest=GENESIS_PARENT, spec=spec, weights=weights
    )


def federation_genesis(manifest: Manifest) -> ModelRecord:
    """The genesis model ``manifest`` names; raises :class:`ManifestInvalid` when spec and
    seed do not give its ``genesis_digest``."""
    if not 0 <= manifest.genesis_seed < MAX_SEED:
        raise ManifestInvalid(f"genesis_seed {manifest.genesis_seed} is not in 0..2**63-1")
    record = genesis_record(manifest.model_spec, manifest.genesis_seed)
    if record.digest != manifest.genesis_digest:
        raise ManifestInvalid(
            f"genesis_digest {manifest.genesis_digest[:16]}... is not the digest of the model "
            f"that model_spec and genesis_seed give ({record.digest[:16]}...)"
        )
    return record


def first_manifest(
    *,
    deployment: str,
    keys: Mapping[str, nacl.signing.SigningKey],
    brokers: Mapping[str, str],
    spec: ModelSpec,
    seed: int,
    created_at: str,
    consensus: ConsensusParams | None = None,
) -> SignedManifest:
    """Version 1 of a manifest listing ``keys``' clouds in that order (their brokers from
    ``brokers``), with the genesis model of ``spec`` and ``seed``, signed by every one of
    them: what ``init`` writes for a cloud alone, and what tests and benchmarks use when
    they hold every cloud's key."""
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
        genesis_digest=genesis_record(spec, seed).digest,
        created_at=created_at,
    )
    signed = SignedManifest(manifest=manifest)
    for cloud, key in keys.items():
        signed = add_signature(signed, sign_manifest(manifest, cloud=cloud, signing_key=key))
    return signed
