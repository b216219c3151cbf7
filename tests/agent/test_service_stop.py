"""How `fedgate-agent run` leaves status.json: a clean stop says so, a crash keeps its state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nacl.signing
import pytest
from fedgate_agent.config import BrokerConfig
from fedgate_agent.service import AgentService
from fedgate_agent.state import read_status
from fedgate_common.model_spec import ModelSpec

from tests.federation_support import pinned_agent_config

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)


def _agent(tmp_path: Path) -> AgentService:
    """An agent whose broker port has nothing listening: it stays `connecting`."""
    config = pinned_agent_config(
        tmp_path / "state", SPEC, broker=BrokerConfig(host="127.0.0.1", port=9)
    )
    return AgentService(config=config, identity=nacl.signing.SigningKey.generate())


async def test_a_stop_is_recorded_as_stopped(tmp_path: Path) -> None:
    service = _agent(tmp_path)
    running = asyncio.create_task(service.run())
    await asyncio.sleep(0.3)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert read_status(service.config.state_path).state == "stopped"


async def test_a_crash_keeps_its_state_and_names_the_reason(tmp_path: Path) -> None:
    service = _agent(tmp_path)

    async def broken() -> None:
        raise RuntimeError("decoder fault")

    service.link.run = broken  # type: ignore[method-assign]
    with pytest.raises(BaseExceptionGroup):
        await service.run()
    status = read_status(service.config.state_path)
    assert status.state == "connecting"  # not "stopped": status reports an unclean end
    assert status.last_error is not None
    assert "decoder fault" in status.last_error
