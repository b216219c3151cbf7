"""Signed envelopes: round trips, what the signature binds, and refusal of hostile bytes."""

from __future__ import annotations

from typing import Any

import msgspec
import nacl.signing
import numpy as np
import pytest
from fedgate_common.arrays import encode_arrays
from fedgate_common.digests import GENESIS_PARENT, model_digest
from fedgate_common.envelope import (
    Envelope,
    _signed_bytes,
    decode_payload,
    open_envelope,
    seal,
    verify_envelope,
)
from fedgate_common.errors import (
    BadSignature,
    EnvelopeMismatch,
    LimitExceeded,
    MalformedMessage,
    ProtocolError,
)
from fedgate_common.limits import Limits
from fedgate_common.messages import (
    PROTOCOL_VERSION,
    STAGES,
    AdvertiseKeys,
    GlobalModel,
    KeyRoster,
    MaskedInput,
    ModelUpdate,
    Payload,
    Reveal,
    RevealedShare,
    RosterEntry,
    RoundEnd,
    RoundStart,
    SealedShare,
    SecAggParams,
    ShareBundle,
    ShareDelivery,
    SurvivorCheck,
    SurvivorConfirmation,
    TrainingPlan,
    UnmaskRequest,
)
from fedgate_common.model_spec import ModelSpec, initial_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEY = nacl.signing.SigningKey(bytes(range(32)))
OTHER_KEY = nacl.signing.SigningKey(bytes(range(1, 33)))
DEPLOYMENT, CLOUD, SENDER = "plant-1", "line-a", "agent-07"

SPEC = ModelSpec(n_features=2, window=4, n_classes=2, channels=2, kernel_size=2)
WEIGHTS = encode_arrays(initial_weights(SPEC, np.random.default_rng(7)))


def _payloads() -> list[Payload]:
    return [
        RoundStart(
            round=3,
            base_digest="ab" * 32,
            selected=("agent-07", "agent-08"),
            plan=TrainingPlan(learning_rate=0.01, local_epochs=2),
            update_timeout_s=30.0,
            min_participants=2,
        ),
        ModelUpdate(
            round=3,
            base_digest="ab" * 32,
            delta=encode_arrays({"w": np.array([[0.5, -0.25]], dtype=np.float32)}),
            num_samples=120,
            train_loss=0.42,
        ),
        GlobalModel(
            round=0,
            digest=model_digest(parent_digest=GENESIS_PARENT, round=0, spec=SPEC, weights=WEIGHTS),
            parent_digest=GENESIS_PARENT,
            spec=SPEC,
            weights=WEIGHTS,
        ),
        RoundEnd(
            round=3,
            outcome="aborted",
            reason="too few updates",
            participants=("agent-07",),
            model_digest="",
        ),
        *_secagg_payloads(),
    ]


def _secagg_payloads() -> list[Payload]:
    digest = bytes(range(32))
    share = SealedShare(owner="agent-07", holder="agent-08", sealed=b"\x01" * 60)
    words = encode_arrays({"masked": np.arange(5, dtype=np.uint16)})[0]
    revealed = RevealedShare(owner="agent-08", x=2, y=b"\x02" * 66)
    return [
        RoundStart(
            round=4,
            base_digest="cd" * 32,
            selected=("agent-07", "agent-08", "agent-09"),
            plan=TrainingPlan(learning_rate=0.01),
            update_timeout_s=30.0,
            min_participants=2,
            secagg=SecAggParams(
                word_bits=16, clip_norm=10.0, weight_cap=2000, max_inputs=3, degree=2, threshold=2
            ),
        ),
        AdvertiseKeys(
            round=4,
            base_digest="cd" * 32,
            start_digest=b"\x05" * 32,
            share_key=b"\x03" * 32,
            mask_key=b"\x04" * 32,
            seed_commitment=digest,
        ),
        ShareBundle(round=4, roster_digest=digest, shares=(share,)),
        MaskedInput(round=4, roster_digest=digest, words=words),
        SurvivorConfirmation(round=4, roster_digest=digest, survivors=("agent-07", "agent-08")),
        Reveal(round=4, roster_digest=digest, seed_shares=(revealed,), mask_key_shares=()),
        KeyRoster(
            round=4,
            entries=(
                RosterEntry(agent_id="agent-07", identity_key=b"\x05" * 32, keys_envelope=b"e"),
            ),
        ),
        ShareDelivery(round=4, roster_digest=digest, shares=(share,)),
        SurvivorCheck(round=4, roster_digest=digest, survivors=("agent-07", "agent-08")),
        UnmaskRequest(
            round=4,
            roster_digest=digest,
            survivors=("agent-07", "agent-08"),
            dropped=("agent-09",),
            confirmations=(b"c1", b"c2"),
        ),
    ]


PAYLOADS = _payloads()
PAYLOAD_IDS = [type(p).__name__ for p in PAYLOADS]


def _seal(payload: Payload, key: nacl.signing.SigningKey = KEY) -> bytes:
    return seal(payload, signing_key=key, deployment=DEPLOYMENT, cloud=CLOUD, sender=SENDER)


def _receive(raw: bytes, limits: Limits | None = None) -> Payload:
    """What a receiver does: structural checks, signature, then the payload."""
    envelope = open_envelope(raw) if limits is None else open_envelope(raw, limits)
    verify_envelope(envelope, KEY.verify_key)
    return decode_payload(envelope)


def _sign(
    payload: bytes,
    *,
    stage: str,
    round: int,
    version: int = PROTOCOL_VERSION,
    deployment: str = DEPLOYMENT,
    cloud: str = CLOUD,
    sender: str = SENDER,
) -> bytes:
    """A correctly signed envelope around arbitrary payload bytes."""
    signature = KEY.sign(
        _signed_bytes(version, deployment, cloud, round, stage, sender, payload)
    ).signature
    envelope = Envelope(version, deployment, cloud, round, stage, sender, payload, signature)
    return msgspec.msgpack.encode(envelope)


def _tag(payload: Payload) -> str:
    tag = type(payload).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def test_payload_tags_are_the_stages() -> None:
    assert {_tag(p) for p in PAYLOADS} == STAGES


@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_seal_open_verify_decode_round_trip(payload: Payload) -> None:
    raw = _seal(payload)
    envelope = open_envelope(raw)
    assert (envelope.version, envelope.deployment, envelope.cloud, envelope.sender) == (
        PROTOCOL_VERSION,
        DEPLOYMENT,
        CLOUD,
        SENDER,
    )
    assert envelope.round == payload.round
    assert envelope.stage == _tag(payload)
    assert len(envelope.signature) == 64
    verify_envelope(envelope, KEY.verify_key)
    assert decode_payload(envelope) == payload


def test_sealing_is_deterministic() -> None:
    # Ed25519 signatures are deterministic; equal inputs give equal wire bytes.
    assert _seal(PAYLOADS[0]) == _seal(PAYLOADS[0])


def _with(raw: bytes, **changes: Any) -> bytes:
    """Re-encode the envelope in ``raw`` with header fields changed, keeping the signature."""
    envelope = msgspec.msgpack.decode(raw, type=Envelope)
    return msgspec.msgpack.encode(msgspec.structs.replace(envelope, **changes))


END = PAYLOADS[3]
OTHER_END_BODY = msgspec.msgpack.encode(msgspec.structs.replace(END, reason="other"))


@pytest.mark.parametrize(
    "changes",
    [
        {"deployment": "plant-2"},
        {"cloud": "line-b"},
        {"round": 4},
        {"round": 0},
        {"stage": "start"},  # another known stage: only the signature can tell
        {"stage": "update"},
        {"sender": "agent-08"},
        {"payload": OTHER_END_BODY},
        {"payload": b""},
        {"signature": b"\x00" * 64},
    ],
    ids=str,
)
def test_signature_binds_header_field(changes: dict[str, Any]) -> None:
    raw = _seal(END)
    tampered = _with(raw, **changes)
    envelope = open_envelope(tampered)  # structurally fine
    with pytest.raises(BadSignature) as info:
        verify_envelope(envelope, KEY.verify_key)
    assert info.value.sender == envelope.sender
    assert info.value.kind == "bad_signature"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"version": 2}, "version"),
        ({"version": 0}, "version"),
        ({"stage": "bogus"}, "stage"),
        ({"stage": "END"}, "stage"),
    ],
    ids=str,
)
def test_version_and_unknown_stage_are_refused_before_the_signature(
    changes: dict[str, Any], match: str
) -> None:
    tampered = _with(_seal(END), **changes)
    with pytest.raises(MalformedMessage, match=match):
        open_envelope(tampered)
    # The signature covers these fields too: a receiver skipping open_envelope still fails.
    envelope = msgspec.msgpack.decode(tampered, type=Envelope)
    with pytest.raises(BadSignature):
        verify_envelope(envelope, KEY.verify_key)


def test_wrong_key_is_a_bad_signature() -> None:
    envelope = open_envelope(_seal(END, key=OTHER_KEY))
    with pytest.raises(BadSignature, match="agent-07"):
        verify_envelope(envelope, KEY.verify_key)
    verify_envelope(envelope, OTHER_KEY.verify_key)


@pytest.mark.parametrize("signature", [b"", b"\x01" * 63, b"\x01" * 65, b"\xff" * 64])
def test_malformed_signature_is_a_bad_signature(signature: bytes) -> None:
    envelope = open_envelope(_with(_seal(END), signature=signature))
    with pytest.raises(BadSignature):
        verify_envelope(envelope, KEY.verify_key)


@pytest.mark.parametrize(
    "changes",
    [
        {"sender": "a/b"},
        {"sender": "+"},
        {"sender": ""},
        {"deployment": "#"},
        {"deployment": "plant 1"},
        {"cloud": "ä"},
        {"cloud": "c" * 65},
        {"round": -1},
    ],
    ids=str,
)
def test_open_refuses_bad_header_values(changes: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage):
        open_envelope(_with(_seal(END), **changes))


@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_every_truncation_is_malformed(payload: Payload) -> None:
    raw = _seal(payload)
    for length in range(len(raw)):
        with pytest.raises(MalformedMessage):
            open_envelope(raw[:length])


RAW_END = _seal(END)


@pytest.mark.parametrize("extra", [b"\x00", b"\xc0", RAW_END], ids=["zero", "nil", "twice"])
def test_trailing_bytes_are_malformed(extra: bytes) -> None:
    with pytest.raises(MalformedMessage):
        open_envelope(RAW_END + extra)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc0",  # nil
        msgspec.msgpack.encode([]),
        msgspec.msgpack.encode({"version": 1}),
        msgspec.msgpack.encode([1, "d", "c", 0, "end", "s", b"", b"", "extra"]),
        msgspec.msgpack.encode([1, "d", "c", 0, "end", "s", "payload as str", b""]),
        msgspec.msgpack.encode([1.0, "d", "c", 0, "end", "s", b"", b""]),
        msgspec.msgpack.encode([True, "d", "c", 0, "end", "s", b"", b""]),
        b"\x98\x01\xa1d\xa1c\x00\xa3end\xa2\xff\xfe\xc4\x00\xc4\x00",  # sender not UTF-8
    ],
)
def test_undecodable_envelopes_are_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        open_envelope(raw)


def test_message_above_the_size_limit() -> None:
    raw = _seal(PAYLOADS[2])
    assert _receive(raw, Limits(max_message_bytes=len(raw))) == PAYLOADS[2]
    with pytest.raises(LimitExceeded, match=str(len(raw))):
        open_envelope(raw, Limits(max_message_bytes=len(raw) - 1))
    # The size check comes first: even garbage of that size is a LimitExceeded.
    with pytest.raises(LimitExceeded):
        open_envelope(b"\xff" * 101, Limits(max_message_bytes=100))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_errors(raw: bytes) -> None:
    try:
        _receive(raw)
    except ProtocolError:
        return
    pytest.fail(f"accepted arbitrary bytes {raw!r}")


@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
@given(data=st.data())
def test_any_single_byte_tamper_is_refused(payload: Payload, data: st.DataObject) -> None:
    raw = _seal(payload)
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[index]), label="byte")
    tampered = raw[:index] + bytes([new]) + raw[index + 1 :]
    with pytest.raises(ProtocolError):
        _receive(tampered)


@given(st.binary(max_size=200), st.sampled_from(sorted(STAGES)))
def test_arbitrary_payload_bytes_raise_only_protocol_errors(body: bytes, stage: str) -> None:
    envelope = open_envelope(_sign(body, stage=stage, round=1))
    try:
        decode_payload(envelope)
    except ProtocolError:
        return


def test_payload_type_must_match_the_envelope_stage() -> None:
    update = PAYLOADS[1]
    raw = _sign(msgspec.msgpack.encode(update), stage="start", round=update.round)
    envelope = open_envelope(raw)
    verify_envelope(envelope, KEY.verify_key)  # correctly signed
    with pytest.raises(EnvelopeMismatch, match="update") as info:
        decode_payload(envelope)
    assert info.value.sender == SENDER


def test_payload_round_must_match_the_envelope_round() -> None:
    raw = _sign(msgspec.msgpack.encode(END), stage="end", round=END.round + 1)
    envelope = open_envelope(raw)
    verify_envelope(envelope, KEY.verify_key)
    with pytest.raises(EnvelopeMismatch, match="round"):
        decode_payload(envelope)


def _signed_dict(body: dict[str, Any]) -> Envelope:
    envelope = open_envelope(
        _sign(msgspec.msgpack.encode(body), stage=body["type"], round=body["round"])
    )
    verify_envelope(envelope, KEY.verify_key)
    return envelope


def _as_dict(payload: Payload) -> dict[str, Any]:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(payload))  # type: ignore[no-any-return]


def test_payload_encoding_carries_the_tag_under_type() -> None:
    body = _as_dict(END)
    assert body["type"] == "end"
    assert decode_payload(_signed_dict(body)) == END


@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_unknown_payload_fields_are_refused(payload: Payload) -> None:
    body = _as_dict(payload) | {"surprise": 1}
    with pytest.raises(MalformedMessage, match="surprise"):
        decode_payload(_signed_dict(body))


def test_unknown_nested_fields_are_refused() -> None:
    body = _as_dict(PAYLOADS[0])
    body["plan"]["surprise"] = True
    with pytest.raises(MalformedMessage, match="surprise"):
        decode_payload(_signed_dict(body))


@pytest.mark.parametrize(
    "edit",
    [
        {"type": "bogus"},
        {"round": "3"},
        {"participants": "agent-07"},
        {"outcome": "exploded"},
        {"reason": None},
    ],
    ids=str,
)
def test_wrongly_typed_payload_fields_are_malformed(edit: dict[str, Any]) -> None:
    body = _as_dict(END) | edit
    raw = _sign(msgspec.msgpack.encode(body), stage="end", round=3)
    with pytest.raises(MalformedMessage):
        decode_payload(open_envelope(raw))


def test_missing_payload_field_is_malformed() -> None:
    body = _as_dict(END)
    del body["model_digest"]
    with pytest.raises(MalformedMessage, match="model_digest"):
        decode_payload(_signed_dict(body))


def test_global_model_with_invalid_spec_is_malformed() -> None:
    body = _as_dict(PAYLOADS[2])
    body["spec"]["window"] = 1  # too short for two convolutions of kernel 2
    raw = _sign(msgspec.msgpack.encode(body), stage="model", round=0)
    with pytest.raises(MalformedMessage, match="window"):
        decode_payload(open_envelope(raw))
