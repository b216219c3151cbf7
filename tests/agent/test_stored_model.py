"""The agent's kept models at restart: re-verified like messages from the wire, and a
damaged ``current.fgm`` no longer loses the model while sound numbered copies lie beside it."""

from __future__ import annotations

from pathlib import Path

import nacl.signing
import numpy as np
import pytest
from fedgate_agent.config import AgentConfig
from fedgate_agent.service import AgentService
from fedgate_agent.state import MODELS_DIR, AgentStatus, save_model_message, write_status
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_coordinator.federation import global_model_message
from fedgate_coordinator.genesis import genesis_record
from fedgate_coordinator.store import ModelRecord

from tests.federation_support import certificate, pinned_agent_config

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
KEY = nacl.signing.SigningKey(b"\x07" * 32)


def agent_with_models(state_dir: Path, rounds: int) -> tuple[AgentConfig, list[bytes]]:
    """An agent of a one-cloud federation that kept the certified models of rounds
    1..``rounds`` (as it does when it adopts them); their messages."""
    config = pinned_agent_config(state_dir, SPEC, coordinator=KEY)
    parent = genesis_record(SPEC, 1)
    messages = []
    for round in range(1, rounds + 1):
        weights = initial_weights(SPEC, np.random.default_rng(round))
        model = ModelRecord.from_weights(
            round=round, parent_digest=parent.digest, spec=SPEC, weights=weights
        )
        cert = certificate(deployment="plant", height=round, digest=model.digest, keys={"c1": KEY})
        raw = global_model_message(model, cert, signing_key=KEY, deployment="plant", cloud="c1")
        save_model_message(state_dir, round, model.digest, raw)
        messages.append(raw)
        parent = model
    return config, messages


@pytest.mark.parametrize("damage", ["sound", "truncated", "empty", "older"])
def test_the_newest_sound_kept_model_is_restored(tmp_path: Path, damage: str) -> None:
    config, messages = agent_with_models(tmp_path / "state", rounds=3)
    current = tmp_path / "state" / MODELS_DIR / "current.fgm"
    if damage == "truncated":
        current.write_bytes(messages[-1][: len(messages[-1]) // 2])
    elif damage == "empty":
        current.write_bytes(b"")
    elif damage == "older":  # the disk filled between the numbered copy and current.fgm
        current.write_bytes(messages[1])
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    # 000003-….fgm holds round 3 whatever became of current.fgm: the newest sound one wins
    assert service.status.model_round == 3


def test_a_status_file_that_cannot_be_written_does_not_stop_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk made every status write raise out of the agent's loops and end it."""
    config, _ = agent_with_models(tmp_path / "state", rounds=1)
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    (tmp_path / "state" / "status.json").mkdir()  # the rename onto it fails like ENOSPC would
    service._save_status()
    service._save_status()
    failures = [r for r in caplog.records if r.getMessage() == "status not written"]
    assert len(failures) == 1  # logged once while it lasts
    (tmp_path / "state" / "status.json").rmdir()
    service._save_status()
    assert (tmp_path / "state" / "status.json").is_file()


def test_with_the_newer_models_lost_an_older_kept_one_is_not_adopted(tmp_path: Path) -> None:
    config, _ = agent_with_models(tmp_path / "state", rounds=3)
    models = tmp_path / "state" / MODELS_DIR
    for path in [*models.glob("00000[23]-*.fgm"), models / "current.fgm"]:
        path.write_bytes(b"damaged")
    write_status(tmp_path / "state", AgentStatus(model_round=3))  # what it had adopted
    service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
    assert service.logic.current_model is None  # round 1 is sound but older than round 3
