"""What an agent trusts: the federation manifest it was enrolled under (DESIGN.md §2).

The agent pins the manifest's digest in its configuration and keeps the manifest itself in
its state directory. Every global model must then be either the manifest's genesis model
or carry a commit certificate signed by a quorum of the manifest's coordinators; anything
else is refused before it is stored, trained on or used to score data.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import nacl.signing
from fedgate_common.atomic_files import atomic_write
from fedgate_common.consensus.manifest import (
    SignedManifest,
    decode_manifest_file,
    manifest_digest,
    quorum,
    verify_keys,
    verify_manifest,
)
from fedgate_common.consensus.wire import verify_certificate
from fedgate_common.errors import CertificateInvalid, ManifestInvalid
from fedgate_common.messages import GlobalModel

from fedgate_agent.errors import ConfigError, ModelRejected

MANIFEST_NAME = "federation.json"


class FederationTrust(msgspec.Struct, frozen=True, kw_only=True):
    """The pinned manifest, reduced to what checking a model needs."""

    digest: str
    deployment: str
    version: int
    keys: dict[str, nacl.signing.VerifyKey]
    quorum: int
    genesis_digest: str

    @classmethod
    def of(cls, signed: SignedManifest) -> FederationTrust:
        manifest = signed.manifest
        return cls(
            digest=manifest_digest(manifest),
            deployment=manifest.deployment,
            version=manifest.version,
            keys=verify_keys(manifest),
            quorum=quorum(manifest),
            genesis_digest=manifest.genesis_digest,
        )

    def check_model(self, model: GlobalModel) -> None:
        """Raise :class:`ModelRejected` unless the federation decided ``model``.

        The model's digest over its content is checked separately
        (:func:`fedgate_agent.round_logic.verify_global_model`).
        """
        if model.round == 0:
            if model.digest != self.genesis_digest:
                raise ModelRejected(
                    f"genesis model {model.digest[:12]} is not the manifest's genesis "
                    f"{self.genesis_digest[:12]}"
                )
            return
        if model.certificate is None:
            raise ModelRejected(f"model of round {model.round} has no commit certificate")
        try:
            verify_certificate(
                height=model.round,
                value=model.digest,
                certificate=model.certificate,
                deployment=self.deployment,
                keys=self.keys,
                quorum=self.quorum,
            )
        except CertificateInvalid as exc:
            raise ModelRejected(f"model of round {model.round}: {exc}") from None


def load_trust(state_path: Path, pinned_digest: str) -> FederationTrust:
    """Read and check the pinned manifest; :class:`ConfigError` says what to fix."""
    path = state_path / MANIFEST_NAME
    if not pinned_digest:
        raise ConfigError(
            "no federation manifest is pinned: run `fedgate-agent federation pin FILE` with "
            "the manifest your coordinator's operator gives you"
        )
    try:
        signed = decode_manifest_file(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing: pin the manifest again (`fedgate-agent federation pin FILE`)"
        ) from None
    except ManifestInvalid as exc:
        raise ConfigError(f"{path}: {exc}") from None
    trust = FederationTrust.of(signed)
    if trust.digest != pinned_digest:
        raise ConfigError(
            f"{path} has digest {trust.digest[:16]}…, the configuration pins "
            f"{pinned_digest[:16]}…; pin the manifest again"
        )
    return trust


def check_new_manifest(
    raw: bytes, *, deployment: str, cloud: str, coordinator_key: str, current: SignedManifest | None
) -> SignedManifest:
    """Verify a manifest an operator wants to pin; raises ManifestInvalid or ConfigError.

    A first manifest must be signed by all its clouds; a newer one by a quorum of the
    currently pinned one (key rotation and membership changes need no central authority).
    """
    signed = decode_manifest_file(raw)
    if current is not None:
        version, pinned = signed.manifest.version, current.manifest.version
        if version <= pinned:
            raise ManifestInvalid(
                f"manifest version {version} is not newer than the pinned version {pinned} "
                "(to start over from a new first manifest, pin it with --replace)"
            )
        if version != pinned + 1:
            raise ManifestInvalid(
                f"manifest version {version} does not follow the pinned version {pinned}; "
                "pin each version in turn"
            )
    verify_manifest(signed, previous=current)
    manifest = signed.manifest
    if manifest.deployment != deployment:
        raise ConfigError(
            f"the manifest is for deployment {manifest.deployment!r}, this agent belongs to "
            f"{deployment!r}"
        )
    entry = next((c for c in manifest.clouds if c.cloud == cloud), None)
    if entry is None:
        raise ConfigError(f"the manifest does not list this agent's cloud {cloud!r}")
    if coordinator_key and coordinator_key.removeprefix(
        "ed25519:"
    ) != entry.public_key.removeprefix("ed25519:"):
        raise ConfigError(
            f"the manifest's key for cloud {cloud!r} differs from coordinator_public_key; "
            "check with your coordinator's operator which one is right"
        )
    return signed


def write_manifest(state_path: Path, raw: bytes) -> Path:
    path = state_path / MANIFEST_NAME
    atomic_write(path, raw, mode=0o644)
    return path


def read_pinned(state_path: Path) -> SignedManifest | None:
    path = state_path / MANIFEST_NAME
    try:
        return decode_manifest_file(path.read_bytes())
    except FileNotFoundError:
        return None
