"""The example configurations in packaging/ load with the real loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner
from fedgate_agent.cli import main as agent_main
from fedgate_agent.config import BrokerConfig, ScoringConfig
from fedgate_agent.config import load_config as load_agent_config
from fedgate_common.consensus.manifest import encode_manifest_file
from fedgate_common.keys import public_key_text
from fedgate_common.model_spec import DEFAULT_MODEL
from fedgate_coordinator.config import load_config as load_coordinator_config
from fedgate_coordinator.rate_limit import RateLimitSettings
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.secure_rounds import SecAggSettings
from fedgate_coordinator.site_privacy import SitePrivacySettings
from nacl.signing import SigningKey

from tests.federation_support import federation_manifest

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"


def test_the_installed_agent_config_takes_init_and_pin_as_documented(tmp_path: Path) -> None:
    """operations.md §2.1 and §4: edit the identity and broker, `init`, `federation pin`."""
    config = tmp_path / "agent.toml"
    shutil.copy(PACKAGING / "agent.toml.example", config)
    runner = CliRunner()
    state = str(tmp_path / "state")
    edit = runner.invoke(agent_main, ["config", "set", "--config", str(config), "state_dir", state])
    assert edit.exit_code == 0, edit.output
    assert runner.invoke(agent_main, ["init", "--config", str(config)]).exit_code == 0
    coordinator = SigningKey.generate()
    manifest = tmp_path / "federation.json"
    manifest.write_bytes(
        encode_manifest_file(
            federation_manifest(
                deployment="plant-a", keys={"cloud-1": coordinator}, spec=DEFAULT_MODEL
            )
        )
    )
    pinned = runner.invoke(
        agent_main, ["federation", "pin", "--config", str(config), str(manifest)]
    )
    assert pinned.exit_code == 0, pinned.output
    loaded = load_agent_config(config, env={})
    assert loaded.coordinator_public_key == public_key_text(coordinator.verify_key)
    assert len(loaded.manifest_digest) == 64


def test_agent_example_is_a_valid_config_waiting_for_its_manifest() -> None:
    config = load_agent_config(PACKAGING / "agent.toml.example", env={}, require_complete=False)
    assert config.agent_id == "press-line-3"
    # `federation pin` fills both; a made-up value would make pin report a key conflict.
    assert config.coordinator_public_key == ""
    assert config.manifest_digest == ""
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
