"""The example configurations in packaging/ load with the real loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedgate_agent.config import BrokerConfig, ScoringConfig
from fedgate_agent.config import load_config as load_agent_config
from fedgate_coordinator.config import load_config as load_coordinator_config
from fedgate_coordinator.rate_limit import RateLimitSettings
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.secure_rounds import SecAggSettings
from fedgate_coordinator.site_privacy import SitePrivacySettings

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"


def test_agent_example_is_a_complete_valid_config() -> None:
    config = load_agent_config(PACKAGING / "agent.toml.example", env={})
    assert config.agent_id == "press-line-3"
    assert config.broker.protocol == "auto"
    # The example documents the real defaults of the login and scoring keys.
    assert config.broker == BrokerConfig()
    assert config.scoring == ScoringConfig()


def test_coordinator_example_is_valid_and_shows_the_defaults(tmp_path: Path) -> None:
    shutil.copy(PACKAGING / "coordinator.toml.example", tmp_path / "coordinator.toml")
    config = load_coordinator_config(tmp_path)
    # The example documents the real defaults.
    assert config.rounds == RoundSettings()
    assert config.secagg == SecAggSettings()
    assert config.privacy == SitePrivacySettings()
    assert config.rate_limit == RateLimitSettings()
    assert config.model.n_features == 52
