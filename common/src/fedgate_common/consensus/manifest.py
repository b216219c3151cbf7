"""The federation manifest: who takes part in a deployment, and with which keys (IO-free).

A manifest lists the deployment, its clouds (id, coordinator public key, broker endpoint, in
the order that fixes proposer rotation), the cross-cloud consensus parameters, the model spec
and the genesis model every coordinator derives from spec and seed. Nobody holds a master
key: version 1 is valid when every cloud it lists has signed it; version n + 1 when a quorum
of the clouds of version n has signed it with the keys listed in version n. Adding or
removing a cloud and rotating a key are new versions.

Values that mean nothing when malformed (a cloud entry, a signature) refuse to be built;
the manifest as a whole is judged by :func:`manifest_problems`, which lists every problem
at once so an operator can fix a proposal in one go. :func:`verify_manifest` adds the
signature checks and raises :class:`~fedgate_common.errors.ManifestInvalid`.

The digest covers the msgpack encoding of the :class:`Manifest` struct (field order and
all fields) behind the domain ``fedgate-manifest-v1``; a change to the fields is a new
domain. The one exception is ``genesis_source``, added later: it is left out of the
encoding while it is ``"seed"``, so every manifest written before it keeps its digest and
signatures, and a manifest with ``"weights"`` cannot be read by a release without it.
Signatures are Ed25519 over the signing domain and the 32 digest bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

import msgspec
import nacl.exceptions
import nacl.signing

from fedgate_common.consensus.quorum import faults_tolerated, quorum_size
from fedgate_common.errors import FedgateError, ManifestInvalid
from fedgate_common.identifiers import validate_identifier
from fedgate_common.keys import parse_public_key, public_key_text
from fedgate_common.model_spec import ModelSpec
from fedgate_common.topics import FEDERATION

__all__ = [
    "CROSS_CLOUD_RULES",
    "GENESIS_SOURCES",
    "MANIFEST_DOMAIN",
    "MAX_MANIFEST_BYTES",
    "MAX_SEED",
    "ROBUST_MIN_CLOUDS",
    "ROBUST_RULES",
    "CloudEntry",
    "ConsensusParams",
    "GenesisSource",
    "Manifest",
    "ManifestSignature",
    "SignatureStatus",
    "SignedManifest",
    "add_signature",
    "decode_manifest_file",
    "encode_manifest_file",
    "faults",
    "key_fingerprint",
    "manifest_digest",
    "manifest_problems",
    "quorum",
    "sign_manifest",
    "signature_status",
    "succession_problems",
    "verify_chain",
    "verify_keys",
    "verify_manifest",
]

MANIFEST_DOMAIN = b"fedgate-manifest-v1"
_SIGNATURE_DOMAIN = b"fedgate-manifest-v1/signature"
MAX_MANIFEST_BYTES = 1_000_000
MAX_SEED = 2**63

CROSS_CLOUD_RULES = ("capped_mean", "trimmed_mean", "median", "centered_clip")
ROBUST_RULES = ("trimmed_mean", "median", "centered_clip")
ROBUST_MIN_CLOUDS = 4
_MAX_TIMEOUT_S = 86_400.0

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]{2,45}\]")


def _broker_problem(broker: str) -> str | None:
    host, sep, port = broker.rpartition(":")
    if not sep or not host:
        return f"broker {broker!r}: use HOST:PORT, e.g. mqtt.cloud-1.example:8883"
    if _HOSTNAME.fullmatch(host) is None and _IPV6.fullmatch(host) is None:
        return f"broker {broker!r}: {host!r} is not a host name or address ([::1] for IPv6)"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"broker {broker!r}: port must be 1..65535"
    return None


class CloudEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One cloud of the federation: its id, its coordinator's key and its MQTT broker.

    ``broker`` is ``HOST:PORT`` of the broker where that cloud's coordinator publishes
    federation messages; ``tls`` says whether peers connect to it with TLS.
    """

    cloud: str
    public_key: str  # ed25519:<64 hex digits>
    broker: str
    tls: bool = False

    def __post_init__(self) -> None:
        validate_identifier(self.cloud, what="cloud id")
        if self.cloud == FEDERATION:
            raise ManifestInvalid(f"cloud id {FEDERATION!r} is reserved for federation topics")
        canonical = public_key_text(parse_public_key(self.public_key))
        if self.public_key != canonical:
            raise ManifestInvalid(
                f"cloud {self.cloud}: write the key as ed25519:<64 lower-case hex digits>"
            )
        problem = _broker_problem(self.broker)
        if problem is not None:
            raise ManifestInvalid(f"cloud {self.cloud}: {problem}")

    def verify_key(self) -> nacl.signing.VerifyKey:
        return parse_public_key(self.public_key)


class ConsensusParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Cross-cloud consensus (DESIGN.md §5). Timeouts are Tendermint's, in seconds; the
    timeout of consensus round k is ``timeout_<step>_s + k * timeout_delta_s``.

    ``rule`` combines the per-cloud aggregates; the robust rules (trimmed mean, coordinate-
    wise median, centered clipping) need at least four clouds. ``cloud_weight_cap`` caps the
    participant count a cloud's aggregate is weighted by; ``max_update_norm`` bounds the L2
    norm of a per-cloud mean update. ``aggregate_wait_s`` is how long a coordinator waits
    for its peers' aggregates before proposing with what it has (at least a quorum).
    """

    rule: str = "capped_mean"
    cloud_weight_cap: int = 1000
    max_update_norm: float = 1e3
    timeout_propose_s: float = 10.0
    timeout_prevote_s: float = 2.0
    timeout_precommit_s: float = 2.0
    timeout_delta_s: float = 2.0
    aggregate_wait_s: float = 30.0


GenesisSource = Literal["seed", "weights"]
GENESIS_SOURCES: tuple[GenesisSource, ...] = ("seed", "weights")


class Manifest(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """One version of a deployment's federation manifest (see the module docstring).

    ``previous_digest`` is ``""`` for version 1, else :func:`manifest_digest` of version
    n − 1. ``genesis_digest`` is the digest of the genesis model. With ``genesis_source``
    ``"seed"`` every coordinator derives it from ``model_spec`` and ``genesis_seed``; with
    ``"weights"`` it is a pre-trained model (``fedgate_common.genesis_weights``) that each
    coordinator is given as a file, whose training started from the seed's weights.
    ``created_at`` is ISO 8601 in UTC. ``server_momentum`` β adds heavy-ball momentum to
    every decided model: w_h = w_{h−1} + Δ_h + β·(w_{h−1} − w_{h−2}) (no term at height 1);
    ``None``, the default (no momentum), is left out of the encoding, so manifests without
    it keep their digests and releases without the field can still read them.
    """

    deployment: str
    version: int
    previous_digest: str
    clouds: tuple[CloudEntry, ...]
    consensus: ConsensusParams
    model_spec: ModelSpec
    genesis_seed: int
    genesis_digest: str
    created_at: str
    genesis_source: GenesisSource = "seed"
    server_momentum: float | None = None

    @property
    def momentum(self) -> float:
        """β of ``server_momentum``; 0 without it."""
        return self.server_momentum or 0.0

    def cloud_ids(self) -> tuple[str, ...]:
        return tuple(entry.cloud for entry in self.clouds)

    def entry(self, cloud: str) -> CloudEntry | None:
        return next((entry for entry in self.clouds if entry.cloud == cloud), None)


class ManifestSignature(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ed25519 signature of ``cloud``'s coordinator over a manifest digest."""

    cloud: str
    signature: bytes

    def __post_init__(self) -> None:
        validate_identifier(self.cloud, what="cloud id")
        if len(self.signature) != 64:
            raise ManifestInvalid(
                f"signature of cloud {self.cloud} has {len(self.signature)} bytes, not 64"
            )


class SignedManifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    manifest: Manifest
    signatures: tuple[ManifestSignature, ...] = ()

    def signed_by(self) -> tuple[str, ...]:
        """Clouds with a signature attached (not checked), without repeats."""
        return tuple(dict.fromkeys(sig.cloud for sig in self.signatures))


class SignatureStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Whose signatures a manifest needs and which of them it has.

    ``signers`` are the clouds whose signatures count (all clouds of version 1; the clouds
    of version n − 1 for version n), ``needed`` how many of them must sign. ``ignored`` are
    signatures by other clouds, which count for nothing.
    """

    signers: tuple[str, ...]
    needed: int
    valid: tuple[str, ...]
    invalid: tuple[str, ...]
    ignored: tuple[str, ...]

    @property
    def missing(self) -> tuple[str, ...]:
        done = set(self.valid) | set(self.invalid)
        return tuple(cloud for cloud in self.signers if cloud not in done)

    @property
    def sufficient(self) -> bool:
        return len(self.valid) >= self.needed and not self.invalid


def manifest_digest(manifest: Manifest) -> str:
    """SHA-256 (hex) over the domain-separated msgpack encoding of ``manifest``."""
    return hashlib.sha256(msgspec.msgpack.encode((MANIFEST_DOMAIN, manifest))).hexdigest()


def _signed_bytes(manifest: Manifest) -> bytes:
    return _SIGNATURE_DOMAIN + bytes.fromhex(manifest_digest(manifest))


def quorum(manifest: Manifest) -> int:
    """Signatures / votes that make a decision among this manifest's clouds."""
    return quorum_size(len(manifest.clouds))


def faults(manifest: Manifest) -> int:
    """Byzantine coordinators this manifest's federation tolerates."""
    return faults_tolerated(len(manifest.clouds))


def verify_keys(manifest: Manifest) -> dict[str, nacl.signing.VerifyKey]:
    """``cloud -> coordinator verify key``, in the manifest's cloud order."""
    return {entry.cloud: entry.verify_key() for entry in manifest.clouds}


def key_fingerprint(public_key: str) -> str:
    """A short form of a key for people to compare: first 16 hex digits of its SHA-256."""
    digest = hashlib.sha256(bytes(parse_public_key(public_key))).hexdigest()
    return ":".join(digest[i : i + 4] for i in range(0, 16, 4))


def _utc_timestamp_problem(value: str) -> str | None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return f"created_at {value!r} is not ISO 8601 (e.g. 2025-01-31T12:00:00Z)"
    if parsed.utcoffset() != timedelta(0):
        return f"created_at {value!r} must be in UTC (end it with Z)"
    return None


def _consensus_problems(params: ConsensusParams, clouds: int) -> list[str]:
    problems: list[str] = []
    if params.rule not in CROSS_CLOUD_RULES:
        problems.append(
            f"consensus.rule {params.rule!r}: use one of {', '.join(CROSS_CLOUD_RULES)}"
        )
    elif params.rule in ROBUST_RULES and clouds < ROBUST_MIN_CLOUDS:
        problems.append(
            f"consensus.rule {params.rule} needs at least {ROBUST_MIN_CLOUDS} clouds "
            f"(this manifest lists {clouds}); use capped_mean"
        )
    if not 1 <= params.cloud_weight_cap <= 10**9:
        problems.append("consensus.cloud_weight_cap must be 1..1000000000")
    if not (math.isfinite(params.max_update_norm) and params.max_update_norm > 0):
        problems.append("consensus.max_update_norm must be positive and finite")
    for name in (
        "timeout_propose_s",
        "timeout_prevote_s",
        "timeout_precommit_s",
        "timeout_delta_s",
        "aggregate_wait_s",
    ):
        value = getattr(params, name)
        if not (math.isfinite(value) and 0 < value <= _MAX_TIMEOUT_S):
            problems.append(f"consensus.{name}={value} must be in (0, {_MAX_TIMEOUT_S:.0f}]")
    return problems


def manifest_problems(manifest: Manifest) -> list[str]:
    """Every structural problem of ``manifest`` (no signatures, no predecessor), each
    phrased as what to fix; empty when there is none."""
    problems: list[str] = []
    try:
        validate_identifier(manifest.deployment, what="deployment id")
    except FedgateError as exc:
        problems.append(str(exc))
    if manifest.version < 1:
        problems.append(f"version {manifest.version}: versions start at 1")
    elif manifest.version == 1 and manifest.previous_digest != "":
        problems.append("version 1 has no predecessor: previous_digest must be empty")
    elif manifest.version > 1 and _HEX_DIGEST.fullmatch(manifest.previous_digest) is None:
        problems.append(
            f"version {manifest.version}: previous_digest must be the 64-hex-digit digest "
            f"of version {manifest.version - 1}"
        )
    if not (math.isfinite(manifest.momentum) and 0 <= manifest.momentum < 1):
        problems.append(f"server_momentum {manifest.momentum}: use a number in [0, 1)")
    if not manifest.clouds:
        problems.append("the manifest lists no cloud")
    seen_ids: set[str] = set()
    seen_keys: dict[bytes, str] = {}
    for entry in manifest.clouds:
        if entry.cloud in seen_ids:
            problems.append(f"cloud {entry.cloud} is listed twice")
        seen_ids.add(entry.cloud)
        raw = bytes(entry.verify_key())
        if raw in seen_keys:
            problems.append(
                f"clouds {seen_keys[raw]} and {entry.cloud} share a key; every coordinator "
                "needs its own"
            )
        else:
            seen_keys[raw] = entry.cloud
    problems.extend(_consensus_problems(manifest.consensus, len(manifest.clouds)))
    if not 0 <= manifest.genesis_seed < MAX_SEED:
        problems.append("genesis_seed must be in 0..2**63-1")
    if _HEX_DIGEST.fullmatch(manifest.genesis_digest) is None:
        problems.append("genesis_digest must be a 64-hex-digit SHA-256 digest (lower case)")
    timestamp_problem = _utc_timestamp_problem(manifest.created_at)
    if timestamp_problem is not None:
        problems.append(timestamp_problem)
    return problems


def _signers_of(manifest: Manifest, previous: Manifest | None) -> tuple[Manifest, int]:
    """The manifest whose clouds approve ``manifest``, and how many of them must."""
    if manifest.version <= 1:
        return manifest, len(manifest.clouds)
    if previous is None:
        raise ManifestInvalid(
            f"version {manifest.version} is approved by the clouds of version "
            f"{manifest.version - 1}: that manifest is needed to check its signatures"
        )
    return previous, quorum_size(len(previous.clouds)) if previous.clouds else 1


def sign_manifest(
    manifest: Manifest,
    *,
    cloud: str,
    signing_key: nacl.signing.SigningKey,
    previous: Manifest | None = None,
) -> ManifestSignature:
    """Sign ``manifest`` as ``cloud``.

    ``cloud`` must be listed with this key among the clouds whose signatures count: those
    of ``manifest`` itself for version 1, those of ``previous`` (version n − 1, required)
    for version n > 1. A signature that could not count is refused rather than produced.
    """
    approvers, _ = _signers_of(manifest, previous)
    entry = approvers.entry(cloud)
    if entry is None:
        raise ManifestInvalid(
            f"cloud {cloud} is not listed in version {approvers.version}, whose clouds "
            f"approve version {manifest.version}; its signature would not count"
        )
    if bytes(entry.verify_key()) != bytes(signing_key.verify_key):
        raise ManifestInvalid(
            f"version {approvers.version} lists key {entry.public_key} for cloud {cloud}, "
            f"not this signing key ({public_key_text(signing_key.verify_key)})"
        )
    signature = signing_key.sign(_signed_bytes(manifest)).signature
    return ManifestSignature(cloud=cloud, signature=signature)


def add_signature(signed: SignedManifest, signature: ManifestSignature) -> SignedManifest:
    """``signed`` with ``signature`` attached, replacing an earlier one by the same cloud.

    Signatures are kept in the manifest's cloud order, then clouds it does not list (e.g.
    a cloud that approves its own removal) by id; adding the same signature twice changes
    nothing.
    """
    order = {cloud: index for index, cloud in enumerate(signed.manifest.cloud_ids())}
    others = [sig for sig in signed.signatures if sig.cloud != signature.cloud]
    merged = sorted(
        [*others, signature],
        key=lambda sig: (order.get(sig.cloud, len(order)), sig.cloud),
    )
    return msgspec.structs.replace(signed, signatures=tuple(merged))


def signature_status(
    signed: SignedManifest, *, previous: Manifest | None = None
) -> SignatureStatus:
    """Check every attached signature against the keys of the clouds that approve
    ``signed.manifest`` (see :func:`sign_manifest`); ``previous`` is required for
    version n > 1 and is not itself checked here."""
    approvers, needed = _signers_of(signed.manifest, previous)
    keys = verify_keys(approvers)
    message = _signed_bytes(signed.manifest)
    valid: set[str] = set()
    invalid: set[str] = set()
    ignored: list[str] = []
    for sig in signed.signatures:
        key = keys.get(sig.cloud)
        if key is None:
            ignored.append(sig.cloud)
            continue
        try:
            key.verify(message, sig.signature)
        except nacl.exceptions.BadSignatureError:
            invalid.add(sig.cloud)
        else:
            valid.add(sig.cloud)
    valid -= invalid
    return SignatureStatus(
        signers=tuple(keys),
        needed=needed,
        valid=tuple(cloud for cloud in keys if cloud in valid),
        invalid=tuple(cloud for cloud in keys if cloud in invalid),
        ignored=tuple(dict.fromkeys(ignored)),
    )


def succession_problems(manifest: Manifest, previous: Manifest) -> list[str]:
    """What keeps ``manifest`` from being the successor of ``previous`` (signatures aside)."""
    problems: list[str] = []
    if manifest.deployment != previous.deployment:
        problems.append(
            f"deployment {manifest.deployment!r} differs from {previous.deployment!r} of "
            f"version {previous.version}"
        )
    if manifest.version != previous.version + 1:
        problems.append(f"version {manifest.version} does not follow version {previous.version}")
    if manifest.previous_digest != manifest_digest(previous):
        problems.append(
            f"previous_digest {manifest.previous_digest[:16]}... is not the digest of the "
            f"given version {previous.version} ({manifest_digest(previous)[:16]}...)"
        )
    if (
        manifest.genesis_seed != previous.genesis_seed
        or manifest.genesis_digest != previous.genesis_digest
        or manifest.genesis_source != previous.genesis_source
        or manifest.model_spec != previous.model_spec
    ):
        problems.append(
            "model_spec, genesis_seed and genesis_digest must stay those of version "
            f"{previous.version}: a new model is a new deployment"
        )
    return problems


def verify_manifest(signed: SignedManifest, *, previous: SignedManifest | None = None) -> None:
    """Raise :class:`ManifestInvalid` listing every problem unless ``signed`` is valid.

    Version 1 must be signed by every cloud it lists. Version n > 1 must name ``previous``
    (taken as trusted: the installed manifest, or one verified before) by its digest, keep
    its deployment, model spec and genesis, and be signed by at least a quorum of the
    previous version's clouds with the keys listed there. Signatures by other clouds are
    ignored; a signature that does not verify is an error; a cloud counts once.
    """
    manifest = signed.manifest
    problems = manifest_problems(manifest)
    if manifest.version > 1 and previous is None:
        problems.append(
            f"version {manifest.version} can only be checked against version "
            f"{manifest.version - 1}: give its predecessor"
        )
        raise ManifestInvalid(problems[0], problems=problems)
    if manifest.version == 1 and previous is not None:
        problems.append("version 1 has no predecessor, but one was given")
    if manifest.version > 1 and previous is not None:
        problems.extend(succession_problems(manifest, previous.manifest))
    status = signature_status(signed, previous=previous.manifest if previous else None)
    problems.extend(
        f"the signature of cloud {cloud} does not verify with its listed key"
        for cloud in status.invalid
    )
    if len(status.valid) < status.needed:
        who = (
            "version 1 must be signed by every cloud it lists"
            if manifest.version <= 1
            else f"version {manifest.version} needs a quorum of the "
            f"{len(status.signers)} clouds of version {manifest.version - 1}"
        )
        gaps = [f"missing: {', '.join(status.missing)}"] if status.missing else []
        if status.invalid:
            gaps.append(f"not verifying: {', '.join(status.invalid)}")
        problems.append(
            f"{len(status.valid)} of {status.needed} signatures: {who}; " + "; ".join(gaps)
        )
    if problems:
        raise ManifestInvalid(
            f"federation manifest version {manifest.version} is invalid: " + "; ".join(problems),
            problems=problems,
        )


def verify_chain(chain: Sequence[SignedManifest], *, trusted: SignedManifest | None = None) -> None:
    """Verify consecutive versions, oldest first.

    Without ``trusted`` the chain must start at version 1; with it (a manifest verified
    earlier, e.g. the installed one), ``chain[0]`` must be its successor.
    """
    if not chain:
        raise ManifestInvalid("no manifest to verify")
    previous = trusted
    for signed in chain:
        try:
            verify_manifest(signed, previous=previous)
        except ManifestInvalid as exc:
            version = signed.manifest.version
            problems = [f"version {version}: {problem}" for problem in exc.problems]
            raise ManifestInvalid("; ".join(problems), problems=problems) from None
        previous = signed


def encode_manifest_file(signed: SignedManifest) -> bytes:
    """Pretty JSON (signatures in base64), the form operators pass between clouds."""
    return msgspec.json.format(msgspec.json.encode(signed), indent=2) + b"\n"


_file_decoder = msgspec.json.Decoder(SignedManifest)


def decode_manifest_file(data: bytes) -> SignedManifest:
    """Decode an untrusted manifest file (no signature checked yet)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(
            f"manifest file of {len(data)} bytes is larger than {MAX_MANIFEST_BYTES}"
        )
    try:
        signed = _file_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, FedgateError) as exc:
        raise ManifestInvalid(f"not a valid manifest file: {exc}") from None
    try:  # JSON integers are unbounded; the msgpack encoding the digest covers is not
        manifest_digest(signed.manifest)
    except OverflowError:
        raise ManifestInvalid(
            "not a valid manifest file: an integer is outside -2**63..2**64-1, the range "
            "its digest can encode (no manifest field takes such a value)"
        ) from None
    return signed
