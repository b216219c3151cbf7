"""The agent's IO-free message handling: what it adopts, trains on, and refuses."""

from __future__ import annotations

from typing import Any

import msgspec
import nacl.signing
import numpy as np
import pytest
from fedgate_agent.errors import ModelRejected
from fedgate_agent.federation_trust import FederationTrust
from fedgate_agent.round_logic import (
    AdoptModel,
    AgentRoundLogic,
    RoundEnded,
    SecAggStep,
    TrainForRound,
)
from fedgate_common.arrays import encode_arrays
from fedgate_common.consensus.types import Vote
from fedgate_common.consensus.wire import graph_seed_material, seal_vote
from fedgate_common.digests import GENESIS_PARENT, model_digest
from fedgate_common.envelope import seal
from fedgate_common.errors import (
    BadSignature,
    EnvelopeMismatch,
    MalformedMessage,
    PlaintextRefused,
    ReplayedMessage,
    WrongRound,
)
from fedgate_common.messages import (
    Certificate,
    GlobalModel,
    KeyRoster,
    Payload,
    RoundEnd,
    RoundStart,
    SecAggParams,
    ShareDelivery,
    TrainingPlan,
)
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_common.topics import model_topic, round_topic

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
DEPLOYMENT, CLOUD, AGENT = "plant", "cloud-1", "site-1"
COORDINATOR = nacl.signing.SigningKey(b"\x01" * 32)


def sealed(
    payload: Payload, key: nacl.signing.SigningKey = COORDINATOR, cloud: str = CLOUD
) -> bytes:
    return seal(payload, signing_key=key, deployment=DEPLOYMENT, cloud=cloud, sender=cloud)


PEERS = {
    name: nacl.signing.SigningKey(bytes([i + 2]) * 32) for i, name in enumerate(["c2", "c3", "c4"])
}
SIGNERS = {CLOUD: COORDINATOR, **PEERS}  # a four-cloud federation: quorum 3


def certificate(
    round: int, digest: str, signers: tuple[str, ...] = (CLOUD, "c2", "c3")
) -> Certificate:
    votes = tuple(
        seal_vote(
            Vote(height=round, round=0, step="precommit", value=digest, voter=name),
            deployment=DEPLOYMENT,
            signing_key=SIGNERS[name],
        ).signature
        for name in signers
    )
    return Certificate(consensus_round=0, precommits=votes)


def global_model(
    round: int = 0, parent: str = GENESIS_PARENT, seed: int = 0, *, certify: bool = True
) -> GlobalModel:
    weights = encode_arrays(initial_weights(SPEC, np.random.default_rng(seed)))
    digest = model_digest(parent_digest=parent, round=round, spec=SPEC, weights=weights)
    cert = certificate(round, digest) if round > 0 and certify else None
    return GlobalModel(
        round=round,
        digest=digest,
        parent_digest=parent,
        spec=SPEC,
        weights=weights,
        certificate=cert,
    )


TRUST = FederationTrust(
    digest="0" * 64,
    deployment=DEPLOYMENT,
    version=1,
    keys={name: key.verify_key for name, key in SIGNERS.items()},
    quorum=3,
    genesis_digest=global_model().digest,
)


def start(round: int, base: str, selected: tuple[str, ...] = (AGENT, "site-2")) -> RoundStart:
    return RoundStart(
        round=round,
        base_digest=base,
        selected=selected,
        plan=TrainingPlan(learning_rate=0.01),
        update_timeout_s=60,
        min_participants=1,
    )


def agent_logic(**settings: Any) -> AgentRoundLogic:
    """The logic of agent ``AGENT`` in ``CLOUD`` under ``TRUST``; ``settings`` as given."""
    return AgentRoundLogic(
        agent_id=AGENT,
        deployment=DEPLOYMENT,
        cloud=CLOUD,
        coordinator_key=COORDINATOR.verify_key,
        trust=TRUST,
        **settings,
    )


@pytest.fixture
def logic() -> AgentRoundLogic:
    return agent_logic(allow_plaintext=True)


MODEL_TOPIC = model_topic(DEPLOYMENT, CLOUD)


def start_topic(round: int) -> str:
    return round_topic(DEPLOYMENT, CLOUD, round, "start")


def test_model_then_start_trains_on_that_model(logic: AgentRoundLogic) -> None:
    model = global_model()
    action = logic.on_message(MODEL_TOPIC, sealed(model))
    assert isinstance(action, AdoptModel)
    assert action.model == model
    assert logic.adopt(model, sealed(model)) is None
    work = logic.on_message(start_topic(1), sealed(start(1, model.digest)))
    assert isinstance(work, TrainForRound)
    assert work.model.digest == model.digest
    assert work.start.round == 1


def test_start_before_its_model_waits_for_the_model(logic: AgentRoundLogic) -> None:
    model = global_model()
    assert logic.on_message(start_topic(1), sealed(start(1, model.digest))) is None
    action = logic.on_message(MODEL_TOPIC, sealed(model))
    assert isinstance(action, AdoptModel)
    work = logic.adopt(action.model, sealed(action.model))
    assert isinstance(work, TrainForRound)
    assert work.start.round == 1


def test_agent_not_selected_does_not_train(logic: AgentRoundLogic) -> None:
    model = global_model()
    logic.adopt(model, sealed(model))
    assert logic.on_message(start_topic(1), sealed(start(1, model.digest, ("other",)))) is None


def test_answered_round_is_never_trained_again(logic: AgentRoundLogic) -> None:
    """The retained start of the round just answered is redelivered on reconnect: ignored.
    A start for an older round can only be a replay: refused."""
    genesis = global_model()
    model = global_model(round=3, parent=genesis.digest, seed=5)
    logic.adopt(model, sealed(model))
    logic.answered(3)
    assert logic.on_message(start_topic(3), sealed(start(3, model.digest))) is None
    with pytest.raises(ReplayedMessage):
        logic.on_message(start_topic(2), sealed(start(2, model.digest)))
    assert isinstance(
        logic.on_message(start_topic(4), sealed(start(4, model.digest))), TrainForRound
    )


def test_a_round_must_be_the_next_height_of_its_base_model(logic: AgentRoundLogic) -> None:
    """Skipping round numbers would give a coordinator another neighbour graph per try."""
    model = global_model()
    logic.adopt(model, sealed(model))
    with pytest.raises(WrongRound, match="next round on it is 1"):
        logic.on_message(start_topic(5), sealed(start(5, model.digest)))
    assert isinstance(
        logic.on_message(start_topic(1), sealed(start(1, model.digest))), TrainForRound
    )


def test_model_signed_by_another_key_is_refused(logic: AgentRoundLogic) -> None:
    forged = sealed(global_model(), key=nacl.signing.SigningKey.generate())
    with pytest.raises(BadSignature):
        logic.on_message(MODEL_TOPIC, forged)
    assert logic.current_model is None


def test_model_whose_digest_does_not_match_its_weights_is_refused(
    logic: AgentRoundLogic,
) -> None:
    honest = global_model()
    swapped = msgspec.structs.replace(honest, weights=global_model(seed=1).weights)
    with pytest.raises(ModelRejected):
        logic.on_message(MODEL_TOPIC, sealed(swapped))


def test_message_of_another_cloud_is_refused(logic: AgentRoundLogic) -> None:
    other = sealed(start(1, "x" * 64), cloud="cloud-2")
    with pytest.raises(EnvelopeMismatch):
        logic.on_message(start_topic(1), other)


def test_start_on_the_topic_of_another_round_is_refused(logic: AgentRoundLogic) -> None:
    with pytest.raises(EnvelopeMismatch):
        logic.on_message(start_topic(9), sealed(start(1, "x" * 64)))


def test_model_message_on_a_round_topic_is_refused(logic: AgentRoundLogic) -> None:
    with pytest.raises(MalformedMessage):
        logic.on_message(
            MODEL_TOPIC,
            sealed(
                RoundEnd(round=1, outcome="aborted", reason="x", participants=(), model_digest="")
            ),
        )


def test_older_model_is_ignored_and_cleared_retained_message_is_nothing(
    logic: AgentRoundLogic,
) -> None:
    genesis = global_model()
    newer = global_model(round=1, parent=genesis.digest, seed=2)
    logic.adopt(newer, sealed(newer))
    assert logic.on_message(MODEL_TOPIC, sealed(genesis)) is None
    assert logic.on_message(start_topic(1), b"") is None


def test_round_end_is_reported(logic: AgentRoundLogic) -> None:
    end = RoundEnd(
        round=4, outcome="completed", reason="", participants=(AGENT,), model_digest="ab" * 32
    )
    action = logic.on_message(round_topic(DEPLOYMENT, CLOUD, 4, "end"), sealed(end))
    assert isinstance(action, RoundEnded)
    assert action.end == end


SECAGG = SecAggParams(
    word_bits=16, clip_norm=10.0, weight_cap=2000, max_inputs=2, degree=1, threshold=2
)


def test_plaintext_round_is_refused_unless_allowed() -> None:
    strict = agent_logic()
    model = global_model()
    strict.adopt(model, sealed(model))
    with pytest.raises(PlaintextRefused):
        strict.on_message(start_topic(1), sealed(start(1, model.digest)))
    secure = msgspec.structs.replace(start(1, model.digest), secagg=SECAGG)
    work = strict.on_message(start_topic(1), sealed(secure))
    assert isinstance(work, TrainForRound)
    # The graph seed takes the base model's digest (fixed by the decision).
    assert work.certificate == graph_seed_material(model) == model.digest.encode()


def test_secure_aggregation_messages_are_routed_only_to_their_agent(
    logic: AgentRoundLogic,
) -> None:
    roster = KeyRoster(round=5, entries=())
    step = logic.on_message(round_topic(DEPLOYMENT, CLOUD, 5, "roster"), sealed(roster))
    assert isinstance(step, SecAggStep)
    assert step.message == roster
    delivery = ShareDelivery(round=5, roster_digest=b"d" * 32, shares=())
    mine = round_topic(DEPLOYMENT, CLOUD, 5, "deliver", AGENT)
    assert isinstance(logic.on_message(mine, sealed(delivery)), SecAggStep)
    with pytest.raises(EnvelopeMismatch):
        logic.on_message(round_topic(DEPLOYMENT, CLOUD, 5, "deliver", "site-2"), sealed(delivery))
    with pytest.raises(MalformedMessage):  # a delivery must be addressed to one agent
        logic.on_message(round_topic(DEPLOYMENT, CLOUD, 5, "deliver"), sealed(delivery))


# -- commit certificates (the federation's decision) -----------------------------------------


def test_certified_model_is_adopted(logic: AgentRoundLogic) -> None:
    genesis = global_model()
    model = global_model(round=1, parent=genesis.digest, seed=3)
    assert isinstance(logic.on_message(MODEL_TOPIC, sealed(model)), AdoptModel)


def test_model_without_certificate_is_refused(logic: AgentRoundLogic) -> None:
    genesis = global_model()
    model = global_model(round=1, parent=genesis.digest, seed=3, certify=False)
    with pytest.raises(ModelRejected, match="no commit certificate"):
        logic.on_message(MODEL_TOPIC, sealed(model))


def test_certificate_below_quorum_is_refused(logic: AgentRoundLogic) -> None:
    genesis = global_model()
    model = global_model(round=1, parent=genesis.digest, seed=3)
    short = msgspec.structs.replace(model, certificate=certificate(1, model.digest, (CLOUD, "c2")))
    with pytest.raises(ModelRejected, match="quorum is 3"):
        logic.on_message(MODEL_TOPIC, sealed(short))


def test_certificate_of_another_model_or_height_is_refused(logic: AgentRoundLogic) -> None:
    genesis = global_model()
    model = global_model(round=2, parent=genesis.digest, seed=3)
    other = global_model(round=2, parent=genesis.digest, seed=4)
    stolen = msgspec.structs.replace(model, certificate=other.certificate)
    with pytest.raises(ModelRejected, match="precommits for"):
        logic.on_message(MODEL_TOPIC, sealed(stolen))
    replayed = msgspec.structs.replace(model, certificate=certificate(1, model.digest))
    with pytest.raises(ModelRejected, match="height 2"):
        logic.on_message(MODEL_TOPIC, sealed(replayed))


def test_certificate_signed_by_unknown_or_duplicate_coordinators_is_refused(
    logic: AgentRoundLogic,
) -> None:
    genesis = global_model()
    model = global_model(round=1, parent=genesis.digest, seed=3)
    SIGNERS["intruder"] = nacl.signing.SigningKey.generate()
    try:
        forged = certificate(1, model.digest, (CLOUD, "c2", "intruder"))
    finally:
        del SIGNERS["intruder"]
    with pytest.raises(ModelRejected, match="not a coordinator"):
        logic.on_message(MODEL_TOPIC, sealed(msgspec.structs.replace(model, certificate=forged)))
    doubled = certificate(1, model.digest, (CLOUD, "c2", "c2"))
    with pytest.raises(ModelRejected, match="two precommits"):
        logic.on_message(MODEL_TOPIC, sealed(msgspec.structs.replace(model, certificate=doubled)))


def test_genesis_other_than_the_manifests_is_refused(logic: AgentRoundLogic) -> None:
    with pytest.raises(ModelRejected, match="manifest's genesis"):
        logic.on_message(MODEL_TOPIC, sealed(global_model(seed=9)))


def test_a_model_older_than_the_newest_adopted_is_refused_after_a_restart() -> None:
    """With its kept models lost, an agent used to take any certified older model offered on
    the model topic; status.json's newest round is its floor now."""
    restarted = agent_logic(min_model_round=2)
    genesis = global_model()
    first = global_model(round=1, parent=genesis.digest, seed=1)
    with pytest.raises(ReplayedMessage, match="older than round 2"):
        restarted.on_message(MODEL_TOPIC, sealed(first))
    second = global_model(round=2, parent=first.digest, seed=2)
    assert isinstance(restarted.on_message(MODEL_TOPIC, sealed(second)), AdoptModel)
