"""Federation manifests and certificates for tests (real keys, real signatures)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nacl.signing
from fedgate_agent.config import AgentConfig
from fedgate_common.consensus.manifest import (
    ConsensusParams,
    SignedManifest,
    encode_manifest_file,
    manifest_digest,
)
from fedgate_common.consensus.types import Vote
from fedgate_common.consensus.wire import seal_vote
from fedgate_common.keys import public_key_text
from fedgate_common.messages import Certificate
from fedgate_common.model_spec import ModelSpec
from fedgate_coordinator.config import CoordinatorConfig
from fedgate_coordinator.genesis import first_manifest

MANIFEST_NAME = "federation.json"


def federation_manifest(
    *,
    deployment: str,
    keys: Mapping[str, nacl.signing.SigningKey],
    spec: ModelSpec,
    brokers: Mapping[str, str] | None = None,
    seed: int = 1,
    consensus: ConsensusParams | None = None,
) -> SignedManifest:
    """A version-1 manifest of ``keys``' clouds (in that order), signed by all of them."""
    return first_manifest(
        deployment=deployment,
        keys=keys,
        brokers={cloud: (brokers or {}).get(cloud, "127.0.0.1:1883") for cloud in keys},
        spec=spec,
        seed=seed,
        created_at="2026-11-29T00:00:00Z",
        consensus=consensus,
    )


def install_manifest(state_dir: Path, signed: SignedManifest) -> str:
    """Write ``signed`` as ``federation.json`` into ``state_dir``; returns its digest."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / MANIFEST_NAME).write_bytes(encode_manifest_file(signed))
    return manifest_digest(signed.manifest)


def pinned_agent_config(
    state_dir: Path,
    spec: ModelSpec,
    *,
    coordinator: nacl.signing.SigningKey | None = None,
    **fields: Any,
) -> AgentConfig:
    """Agent ``gw-1`` of cloud ``c1`` in deployment ``plant``, its state in ``state_dir``,
    pinned to a fresh one-cloud manifest for ``spec`` whose coordinator holds
    ``coordinator`` (default: a new key); ``fields`` set other config keys."""
    coordinator = coordinator or nacl.signing.SigningKey.generate()
    digest = install_manifest(
        state_dir, federation_manifest(deployment="plant", keys={"c1": coordinator}, spec=spec)
    )
    return AgentConfig(
        agent_id="gw-1",
        deployment="plant",
        cloud="c1",
        state_dir=str(state_dir),
        coordinator_public_key=public_key_text(coordinator.verify_key),
        manifest_digest=digest,
        **fields,
    )


def certificate(
    *,
    deployment: str,
    height: int,
    digest: str,
    keys: Mapping[str, nacl.signing.SigningKey],
    signers: Sequence[str] | None = None,
    consensus_round: int = 0,
) -> Certificate:
    """Precommits for ``digest`` at ``height`` signed by ``signers`` (default: all)."""
    names = list(keys) if signers is None else list(signers)
    votes = tuple(
        seal_vote(
            Vote(height=height, round=consensus_round, step="precommit", value=digest, voter=name),
            deployment=deployment,
            signing_key=keys[name],
        ).signature
        for name in names
    )
    return Certificate(consensus_round=consensus_round, precommits=votes)


def one_cloud(
    config: CoordinatorConfig, state_dir: Path, consensus: ConsensusParams | None = None
) -> dict[str, Any]:
    """Keyword arguments for a CoordinatorService federated with nobody (quorum 1)."""
    key = nacl.signing.SigningKey.generate()
    manifest = federation_manifest(
        deployment=config.deployment,
        keys={config.cloud: key},
        spec=config.model,
        brokers={config.cloud: f"{config.broker.host}:{config.broker.port}"},
        consensus=consensus,
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    return {"signing_key": key, "manifest": manifest, "state_dir": state_dir}


def add_genesis(state_dir: Path, database_url: str) -> None:
    """Create the installed manifest's genesis model in the store, as ``serve`` does."""
    from fedgate_coordinator.config import load_config
    from fedgate_coordinator.federation_cli import installed_manifest
    from fedgate_coordinator.service import ensure_genesis
    from fedgate_coordinator.store import Store

    manifest = installed_manifest(state_dir)
    assert manifest is not None
    with Store.open(database_url) as store:
        ensure_genesis(store, load_config(state_dir), manifest.manifest, state_dir)
