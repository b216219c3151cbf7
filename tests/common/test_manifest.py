"""The federation manifest: structure, signatures, succession, file form."""

from __future__ import annotations

import base64
import hashlib
import json

import msgspec
import nacl.signing
import pytest
from fedgate_common.consensus.manifest import (
    MAX_MANIFEST_BYTES,
    CloudEntry,
    ConsensusParams,
    Manifest,
    ManifestSignature,
    SignedManifest,
    add_signature,
    decode_manifest_file,
    encode_manifest_file,
    faults,
    key_fingerprint,
    manifest_digest,
    manifest_problems,
    quorum,
    sign_manifest,
    signature_status,
    verify_chain,
    verify_keys,
    verify_manifest,
)
from fedgate_common.errors import FedgateError, ManifestInvalid
from fedgate_common.keys import public_key_text
from fedgate_common.model_spec import ModelSpec

SPEC = ModelSpec(n_features=4, window=8, n_classes=2, channels=4)
GENESIS = "ab" * 32


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n]) * 32)


def entry(cloud: str, signing_key: nacl.signing.SigningKey) -> CloudEntry:
    return CloudEntry(
        cloud=cloud, public_key=public_key_text(signing_key.verify_key), broker=f"{cloud}.x:8883"
    )


def first_version(keys: dict[str, nacl.signing.SigningKey], **changes: object) -> Manifest:
    manifest = Manifest(
        deployment="plant-a",
        version=1,
        previous_digest="",
        clouds=tuple(entry(cloud, k) for cloud, k in keys.items()),
        consensus=ConsensusParams(),
        model_spec=SPEC,
        genesis_seed=42,
        genesis_digest=GENESIS,
        created_at="2025-01-31T12:00:00Z",
    )
    return msgspec.structs.replace(manifest, **changes)


def next_version(previous: Manifest, keys: dict[str, nacl.signing.SigningKey]) -> Manifest:
    return msgspec.structs.replace(
        previous,
        version=previous.version + 1,
        previous_digest=manifest_digest(previous),
        clouds=tuple(entry(cloud, k) for cloud, k in keys.items()),
    )


def signed_by(
    manifest: Manifest,
    keys: dict[str, nacl.signing.SigningKey],
    *,
    previous: Manifest | None = None,
) -> SignedManifest:
    signed = SignedManifest(manifest=manifest)
    for cloud, k in keys.items():
        signed = add_signature(
            signed, sign_manifest(manifest, cloud=cloud, signing_key=k, previous=previous)
        )
    return signed


def raw_signature(
    manifest: Manifest, cloud: str, signing_key: nacl.signing.SigningKey
) -> ManifestSignature:
    """A signature made without sign_manifest's checks (what a careless or hostile peer
    could attach): Ed25519 over the signing domain and the digest bytes."""
    message = b"fedgate-manifest-v1/signature" + bytes.fromhex(manifest_digest(manifest))
    return ManifestSignature(cloud=cloud, signature=signing_key.sign(message).signature)


FOUR = {f"cloud-{i}": key(i) for i in range(1, 5)}


def problems_of(signed: SignedManifest, previous: SignedManifest | None = None) -> list[str]:
    with pytest.raises(ManifestInvalid) as caught:
        verify_manifest(signed, previous=previous)
    assert isinstance(caught.value, FedgateError)
    return caught.value.problems


# --- digest and file form --------------------------------------------------------------------


def test_digest_known_answer() -> None:
    """Pins the encoding: a change here changes every deployed manifest's digest."""
    manifest = first_version(FOUR)
    assert manifest_digest(manifest) == (
        "84e992b6a2cce61105be0b449ceadee9f73681027c685bf24b8424ea15eb0441"
    )
    # The definition: SHA-256 over msgpack [domain, manifest as a map, fields in order].
    plain = msgspec.msgpack.encode([b"fedgate-manifest-v1", msgspec.to_builtins(manifest)])
    assert manifest_digest(manifest) == hashlib.sha256(plain).hexdigest()


def test_genesis_source_is_encoded_only_when_the_genesis_is_pre_trained() -> None:
    """Manifests from before ``genesis_source`` keep their digests (the known answer above
    has the default); a pre-trained genesis is part of what is digested and signed."""
    seeded = first_version(FOUR)
    assert b"genesis_source" not in encode_manifest_file(SignedManifest(manifest=seeded))
    pretrained = msgspec.structs.replace(seeded, genesis_source="weights")
    data = encode_manifest_file(signed_by(pretrained, FOUR))
    assert b'"genesis_source": "weights"' in data
    again = decode_manifest_file(data)
    assert again.manifest.genesis_source == "weights"
    assert manifest_digest(again.manifest) != manifest_digest(seeded)
    verify_manifest(again)


def test_file_round_trip_keeps_digest_and_signatures() -> None:
    signed = signed_by(first_version(FOUR), FOUR)
    data = encode_manifest_file(signed)
    decoded = decode_manifest_file(data)
    assert decoded == signed
    assert manifest_digest(decoded.manifest) == manifest_digest(signed.manifest)
    verify_manifest(decoded)
    as_json = json.loads(data)  # pretty JSON, signatures in base64
    assert data.startswith(b"{\n  ")
    first = as_json["signatures"][0]
    assert first["cloud"] == "cloud-1"
    assert base64.b64decode(first["signature"]) == signed.signatures[0].signature


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"manifest": {}}',
        b"\xff\xfe",
    ],
)
def test_undecodable_files_are_manifest_invalid(data: bytes) -> None:
    with pytest.raises(ManifestInvalid, match="not a valid manifest file"):
        decode_manifest_file(data)


def test_file_with_unknown_field_or_bad_key_is_refused() -> None:
    as_json = json.loads(encode_manifest_file(signed_by(first_version(FOUR), FOUR)))
    as_json["manifest"]["master_key"] = "x"
    with pytest.raises(ManifestInvalid, match="master_key"):
        decode_manifest_file(json.dumps(as_json).encode())
    del as_json["manifest"]["master_key"]
    as_json["manifest"]["clouds"][0]["public_key"] = "ed25519:abcd"
    with pytest.raises(ManifestInvalid, match="32"):
        decode_manifest_file(json.dumps(as_json).encode())
    as_json["manifest"]["clouds"][0]["public_key"] = public_key_text(key(1).verify_key)
    as_json["signatures"][0]["signature"] = base64.b64encode(b"short").decode()
    with pytest.raises(ManifestInvalid, match="not 64"):
        decode_manifest_file(json.dumps(as_json).encode())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("genesis_seed",), 2**64),
        (("version",), 10**30),
        (("consensus", "cloud_weight_cap"), 2**64),
        (("genesis_seed",), -(2**63) - 1),
    ],
)
def test_integers_beyond_the_digest_encoding_are_manifest_invalid(
    path: tuple[str, ...], value: int
) -> None:
    """JSON integers have no bound; the msgpack encoding the digest covers holds
    -2**63..2**64-1 only, so larger ones are refused when the file is read."""
    as_json = json.loads(encode_manifest_file(signed_by(first_version(FOUR), FOUR)))
    table = as_json["manifest"]
    for name in path[:-1]:
        table = table[name]
    table[path[-1]] = value
    with pytest.raises(ManifestInvalid, match=r"integer is outside -2\*\*63\.\.2\*\*64-1"):
        decode_manifest_file(json.dumps(as_json).encode())


def test_oversized_file_is_refused_before_decoding() -> None:
    with pytest.raises(ManifestInvalid, match="larger than"):
        decode_manifest_file(b" " * (MAX_MANIFEST_BYTES + 1))


# --- version 1 -------------------------------------------------------------------------------


def test_version_1_signed_by_every_cloud_is_valid() -> None:
    signed = signed_by(first_version(FOUR), FOUR)
    verify_manifest(signed)
    status = signature_status(signed)
    assert status.valid == tuple(FOUR)
    assert status.needed == 4
    assert status.sufficient


def test_version_1_missing_one_signature_names_the_missing_cloud() -> None:
    three = {c: k for c, k in FOUR.items() if c != "cloud-3"}
    problems = problems_of(signed_by(first_version(FOUR), three))
    assert len(problems) == 1
    assert "3 of 4 signatures" in problems[0]
    assert "every cloud" in problems[0]
    assert "missing: cloud-3" in problems[0]


def test_version_1_with_a_tampered_signature_names_its_cloud_not_a_missing_one() -> None:
    manifest = first_version(FOUR)

    def tampered(keys: dict[str, nacl.signing.SigningKey]) -> SignedManifest:
        signatures = list(signed_by(manifest, keys).signatures)
        first = signatures[0]
        signatures[0] = ManifestSignature(
            cloud=first.cloud, signature=bytes([first.signature[0] ^ 1]) + first.signature[1:]
        )
        return SignedManifest(manifest=manifest, signatures=tuple(signatures))

    assert problems_of(tampered(FOUR)) == [
        "the signature of cloud cloud-1 does not verify with its listed key",
        "3 of 4 signatures: version 1 must be signed by every cloud it lists; "
        "not verifying: cloud-1",
    ]
    three = {c: k for c, k in FOUR.items() if c != "cloud-4"}
    assert problems_of(tampered(three))[-1].endswith("; missing: cloud-4; not verifying: cloud-1")


@pytest.mark.parametrize(
    "changes",
    [
        {"deployment": "plant-b"},
        {"genesis_seed": 43},
        {"genesis_digest": "cd" * 32},
        {"genesis_source": "weights"},
        {"consensus": ConsensusParams(rule="median")},
        {"consensus": ConsensusParams(timeout_propose_s=11.0)},
        {"created_at": "2025-01-31T12:00:01Z"},
        {"model_spec": msgspec.structs.replace(SPEC, n_classes=3)},
    ],
)
def test_tampering_after_signing_invalidates(changes: dict[str, object]) -> None:
    signed = signed_by(first_version(FOUR), FOUR)
    tampered = msgspec.structs.replace(
        signed, manifest=msgspec.structs.replace(signed.manifest, **changes)
    )
    problems = problems_of(tampered)
    assert sum("does not verify" in p for p in problems) == 4


def test_tampered_broker_and_swapped_clouds_invalidate() -> None:
    signed = signed_by(first_version(FOUR), FOUR)
    clouds = list(signed.manifest.clouds)
    clouds[0] = msgspec.structs.replace(clouds[0], broker="evil.example:1883")
    moved = msgspec.structs.replace(signed.manifest, clouds=tuple(clouds))
    assert problems_of(msgspec.structs.replace(signed, manifest=moved))
    reordered = msgspec.structs.replace(signed.manifest, clouds=signed.manifest.clouds[::-1])
    assert problems_of(msgspec.structs.replace(signed, manifest=reordered))


def test_signature_by_a_wrong_key_is_an_error() -> None:
    manifest = first_version(FOUR)
    signed = signed_by(manifest, FOUR)
    forged = ManifestSignature(
        cloud="cloud-2", signature=key(99).sign(b"fedgate-manifest-v1/signature").signature
    )
    impostor = sign_manifest(
        msgspec.structs.replace(manifest, clouds=(entry("cloud-2", key(99)),)),
        cloud="cloud-2",
        signing_key=key(99),
    )
    for bad in (forged, impostor):
        problems = problems_of(add_signature(signed, bad))
        assert any("cloud-2 does not verify" in p for p in problems)


def test_sign_refuses_unlisted_cloud_or_other_key() -> None:
    manifest = first_version(FOUR)
    with pytest.raises(ManifestInvalid, match="cloud-9 is not listed"):
        sign_manifest(manifest, cloud="cloud-9", signing_key=key(9))
    with pytest.raises(ManifestInvalid, match="not this signing key"):
        sign_manifest(manifest, cloud="cloud-1", signing_key=key(2))


def test_signatures_by_unknown_clouds_are_ignored_and_duplicates_count_once() -> None:
    manifest = first_version(FOUR)
    signed = signed_by(manifest, FOUR)
    stranger = key(50).sign(b"anything").signature
    extra = add_signature(signed, ManifestSignature(cloud="cloud-x", signature=stranger))
    verify_manifest(extra)
    assert signature_status(extra).ignored == ("cloud-x",)
    # A file may repeat a signature; it still counts once.
    three = signed_by(manifest, {c: k for c, k in FOUR.items() if c != "cloud-4"})
    repeated = msgspec.structs.replace(
        three, signatures=(*three.signatures, three.signatures[0], three.signatures[0])
    )
    status = signature_status(repeated)
    assert len(status.valid) == 3
    assert status.missing == ("cloud-4",)
    assert "3 of 4" in problems_of(repeated)[0]


def test_add_signature_is_idempotent_and_in_cloud_order() -> None:
    manifest = first_version(FOUR)
    sigs = {c: sign_manifest(manifest, cloud=c, signing_key=k) for c, k in FOUR.items()}
    signed = SignedManifest(manifest=manifest)
    for cloud in ("cloud-4", "cloud-2", "cloud-1", "cloud-2", "cloud-3", "cloud-4"):
        signed = add_signature(signed, sigs[cloud])
    assert [s.cloud for s in signed.signatures] == list(FOUR)
    assert add_signature(signed, sigs["cloud-1"]) == signed
    outsider = ManifestSignature(cloud="aaa", signature=bytes(64))
    assert add_signature(signed, outsider).signatures[-1].cloud == "aaa"


# --- succession ------------------------------------------------------------------------------


@pytest.fixture
def v1() -> SignedManifest:
    return signed_by(first_version(FOUR), FOUR)


def test_version_2_signed_by_a_quorum_of_the_previous_is_valid(v1: SignedManifest) -> None:
    rotated = {**FOUR, "cloud-2": key(22), "cloud-5": key(5)}
    v2 = next_version(v1.manifest, rotated)
    approvers = {c: FOUR[c] for c in ("cloud-1", "cloud-2", "cloud-3")}  # cloud-2: old key
    signed = signed_by(v2, approvers, previous=v1.manifest)
    verify_manifest(signed, previous=v1)
    status = signature_status(signed, previous=v1.manifest)
    assert status.needed == 3
    assert status.signers == tuple(FOUR)
    verify_chain([v1, signed])
    verify_chain([signed], trusted=v1)


def test_version_2_signed_by_two_of_four_is_invalid(v1: SignedManifest) -> None:
    v2 = next_version(v1.manifest, FOUR)
    signed = signed_by(v2, {c: FOUR[c] for c in ("cloud-1", "cloud-4")}, previous=v1.manifest)
    problems = problems_of(signed, v1)
    assert problems == [
        "2 of 3 signatures: version 2 needs a quorum of the 4 clouds of version 1; "
        "missing: cloud-2, cloud-3"
    ]


def test_quorum_of_the_new_clouds_only_is_invalid(v1: SignedManifest) -> None:
    new = {"cloud-1": FOUR["cloud-1"], **{f"new-{i}": key(10 + i) for i in range(1, 4)}}
    v2 = next_version(v1.manifest, new)
    signed = SignedManifest(manifest=v2)
    for cloud in ("cloud-1", "new-1", "new-2"):
        signed = add_signature(signed, raw_signature(v2, cloud, new[cloud]))
    # Enough for v2's own clouds (3 of 4), but only cloud-1 was a cloud of version 1.
    problems = problems_of(signed, v1)
    assert len(problems) == 1
    assert "1 of 3 signatures" in problems[0]
    assert signature_status(signed, previous=v1.manifest).ignored == ("new-1", "new-2")


def test_rotated_key_must_sign_with_the_previous_key(v1: SignedManifest) -> None:
    v2 = next_version(v1.manifest, {**FOUR, "cloud-2": key(22)})
    with pytest.raises(ManifestInvalid, match="not this signing key"):
        sign_manifest(v2, cloud="cloud-2", signing_key=key(22), previous=v1.manifest)
    with pytest.raises(ManifestInvalid, match="that manifest is needed"):
        sign_manifest(v2, cloud="cloud-1", signing_key=FOUR["cloud-1"])
    signed = signed_by(v2, FOUR, previous=v1.manifest)
    new_key_sig = raw_signature(v2, "cloud-2", key(22))
    problems = problems_of(add_signature(signed, new_key_sig), v1)
    assert problems == ["the signature of cloud cloud-2 does not verify with its listed key"]


def test_removed_cloud_can_approve_its_removal(v1: SignedManifest) -> None:
    three = {c: k for c, k in FOUR.items() if c != "cloud-4"}
    v2 = next_version(v1.manifest, three)
    signed = signed_by(
        v2, {"cloud-4": FOUR["cloud-4"], "cloud-1": FOUR["cloud-1"]}, previous=v1.manifest
    )
    signed = add_signature(
        signed,
        sign_manifest(v2, cloud="cloud-2", signing_key=FOUR["cloud-2"], previous=v1.manifest),
    )
    assert [s.cloud for s in signed.signatures] == ["cloud-1", "cloud-2", "cloud-4"]
    verify_manifest(signed, previous=v1)
    assert quorum(v2) == 2
    assert faults(v2) == 0


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"previous_digest": "00" * 32}, "is not the digest of the given version 1"),
        ({"version": 3}, "version 3 does not follow version 1"),
        ({"deployment": "plant-b"}, "differs from 'plant-a'"),
        ({"genesis_seed": 7}, "a new model is a new deployment"),
        ({"genesis_source": "weights"}, "a new model is a new deployment"),
        ({"model_spec": msgspec.structs.replace(SPEC, channels=8)}, "new deployment"),
    ],
)
def test_version_2_must_follow_version_1(
    v1: SignedManifest, changes: dict[str, object], expected: str
) -> None:
    v2 = msgspec.structs.replace(next_version(v1.manifest, FOUR), **changes)
    signed = signed_by(v2, FOUR, previous=v1.manifest)
    problems = problems_of(signed, v1)
    assert any(expected in p for p in problems), problems


def test_version_2_needs_its_predecessor(v1: SignedManifest) -> None:
    v2 = signed_by(next_version(v1.manifest, FOUR), FOUR, previous=v1.manifest)
    assert "give its predecessor" in problems_of(v2)[-1]
    with pytest.raises(ManifestInvalid, match="version 2: "):
        verify_chain([v2])
    assert "no predecessor" in problems_of(v1, v1)[0]


def test_chain_of_three_versions(v1: SignedManifest) -> None:
    v2 = signed_by(next_version(v1.manifest, FOUR), FOUR, previous=v1.manifest)
    v3_manifest = next_version(v2.manifest, {c: k for c, k in FOUR.items() if c != "cloud-1"})
    v3 = signed_by(
        v3_manifest, {c: FOUR[c] for c in ("cloud-1", "cloud-2", "cloud-4")}, previous=v2.manifest
    )
    verify_chain([v1, v2, v3])
    verify_chain([v3], trusted=v2)
    with pytest.raises(ManifestInvalid, match="version 3: "):
        verify_chain([v3], trusted=v1)


# --- structure -------------------------------------------------------------------------------


def test_duplicate_cloud_ids_and_keys_are_problems() -> None:
    clouds = (entry("cloud-1", key(1)), entry("cloud-1", key(2)), entry("cloud-3", key(1)))
    problems = manifest_problems(first_version(FOUR, clouds=clouds))
    assert "cloud cloud-1 is listed twice" in problems
    assert any("clouds cloud-1 and cloud-3 share a key" in p for p in problems)
    assert manifest_problems(first_version(FOUR)) == []


@pytest.mark.parametrize("rule", ["trimmed_mean", "median", "centered_clip"])
def test_robust_rules_need_four_clouds(rule: str) -> None:
    three = {c: k for c, k in FOUR.items() if c != "cloud-4"}
    problems = manifest_problems(first_version(three, consensus=ConsensusParams(rule=rule)))
    assert problems == [
        f"consensus.rule {rule} needs at least 4 clouds (this manifest lists 3); use capped_mean"
    ]
    assert manifest_problems(first_version(FOUR, consensus=ConsensusParams(rule=rule))) == []
    assert manifest_problems(first_version(three)) == []  # capped_mean works with any number


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"consensus": ConsensusParams(rule="mean")}, "consensus.rule 'mean'"),
        ({"consensus": ConsensusParams(timeout_prevote_s=0.0)}, "timeout_prevote_s=0.0"),
        ({"consensus": ConsensusParams(timeout_delta_s=-1.0)}, "timeout_delta_s"),
        ({"consensus": ConsensusParams(aggregate_wait_s=float("nan"))}, "aggregate_wait_s"),
        ({"consensus": ConsensusParams(cloud_weight_cap=0)}, "cloud_weight_cap"),
        ({"consensus": ConsensusParams(max_update_norm=float("inf"))}, "max_update_norm"),
        ({"deployment": "plant/a"}, "invalid deployment id"),
        ({"version": 0}, "versions start at 1"),
        ({"previous_digest": "ab" * 32}, "version 1 has no predecessor"),
        ({"version": 2}, "previous_digest must be the 64-hex-digit digest of version 1"),
        ({"clouds": ()}, "lists no cloud"),
        ({"genesis_seed": -1}, "genesis_seed"),
        ({"genesis_seed": 2**63}, "genesis_seed"),
        ({"genesis_digest": "AB" * 32}, "genesis_digest"),
        ({"created_at": "yesterday"}, "not ISO 8601"),
        ({"created_at": "2025-01-31T12:00:00+01:00"}, "must be in UTC"),
        ({"created_at": "2025-01-31T12:00:00"}, "must be in UTC"),
    ],
)
def test_structural_problems(changes: dict[str, object], expected: str) -> None:
    problems = manifest_problems(first_version(FOUR, **changes))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"cloud": "a/b"}, "invalid cloud id"),
        ({"cloud": "+"}, "invalid cloud id"),
        ({"public_key": "ed25519:zz"}, "not hex"),
        ({"public_key": bytes(key(1).verify_key).hex()}, "ed25519:<64 lower-case hex"),
        ({"public_key": public_key_text(key(1).verify_key).upper()}, "not hex|lower-case"),
        ({"broker": "no-port"}, "HOST:PORT"),
        ({"broker": "host:0"}, "port must be"),
        ({"broker": "host:70000"}, "port must be"),
        ({"broker": "ho st:1883"}, "not a host name"),
        ({"broker": "a/b:1883"}, "not a host name"),
        ({"broker": ":1883"}, "HOST:PORT"),
    ],
)
def test_cloud_entry_validates_itself(fields: dict[str, str], expected: str) -> None:
    values = {"cloud": "cloud-1", "public_key": public_key_text(key(1).verify_key)}
    values["broker"] = "mqtt.example:8883"
    values.update(fields)
    with pytest.raises(FedgateError, match=expected):
        CloudEntry(cloud=values["cloud"], public_key=values["public_key"], broker=values["broker"])


@pytest.mark.parametrize("broker", ["10.0.0.7:1883", "[::1]:8883", "mqtt-1.cloud.example:8883"])
def test_cloud_entry_accepts_host_forms(broker: str) -> None:
    assert CloudEntry(cloud="c", public_key=public_key_text(key(1).verify_key), broker=broker)


@pytest.mark.parametrize(
    ("clouds", "expected_quorum", "expected_faults"),
    [(1, 1, 0), (3, 2, 0), (4, 3, 1), (7, 5, 2), (10, 7, 3)],
)
def test_quorum_and_faults(clouds: int, expected_quorum: int, expected_faults: int) -> None:
    keys = {f"c{i}": key(i + 1) for i in range(clouds)}
    manifest = first_version(keys)
    assert quorum(manifest) == expected_quorum
    assert faults(manifest) == expected_faults
    assert list(verify_keys(manifest)) == list(keys)
    assert verify_keys(manifest)["c0"] == key(1).verify_key


def test_key_fingerprint_is_short_and_stable() -> None:
    text = public_key_text(key(1).verify_key)
    fingerprint = key_fingerprint(text)
    assert len(fingerprint) == 19
    assert fingerprint == key_fingerprint(text)
    assert fingerprint != key_fingerprint(public_key_text(key(2).verify_key))
