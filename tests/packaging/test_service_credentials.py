"""Secrets under systemd: LoadCredential entries from a configuration, and the loaders
reading $CREDENTIALS_DIRECTORY/<name> instead of the (root-only) configured file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fedgate_agent.config import load_config as load_agent_config
from fedgate_agent.install_cli import agent_service_spec
from fedgate_bridge.config import load_config as load_bridge_config
from fedgate_bridge.errors import ConfigError
from fedgate_common.service_units import credentials_in, load_credentials_into
from fedgate_coordinator.config import credential_names as coordinator_credentials

REPO = Path(__file__).resolve().parents[2]


def test_credentials_from_a_raw_config() -> None:
    raw: dict[str, object] = {
        "broker": {"password_file": "/etc/fedgate/credentials/coord-broker"},
        "federation": {"peers": {"cloud-2": {"password_file": "/etc/fedgate/peer-2.pass"}}},
    }
    names = coordinator_credentials(raw)
    found = {c.name: c.source for c in credentials_in(raw, names)}
    assert found == {
        "broker-password": "/etc/fedgate/credentials/coord-broker",
        "peer-cloud-2-password": "/etc/fedgate/peer-2.pass",
    }
    load_credentials_into(raw, names, {"CREDENTIALS_DIRECTORY": "/run/c"}, exists=lambda _: True)
    assert raw["federation"] == {
        "peers": {"cloud-2": {"password_file": "/run/c/peer-cloud-2-password"}}
    }


def test_bridge_reads_its_broker_password_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configured source is root-only (here: absent); systemd's copy is what counts."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "broker-password").write_text("s3cret\n")
    text = (REPO / "packaging/bridge.toml.example").read_text()
    config = tmp_path / "bridge.toml"
    config.write_text(
        text.replace(
            'password_file = ""        # absolute',
            'password_file = "/etc/fedgate/credentials/not-readable-here"  # absolute',
        )
    )
    with pytest.raises(ConfigError, match="cannot be read"):
        load_bridge_config(config)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    loaded = load_bridge_config(config)
    assert loaded.broker.password_file == str(credentials / "broker-password")
    assert os.path.isfile(loaded.broker.password_file)


def test_agent_unit_overrides_point_at_its_credentials(tmp_path: Path) -> None:
    """The agent reads secrets through its FEDGATE_* overrides: each one the unit sets
    must be a key the real loader accepts, and lands in the setting it stands for."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    raw: dict[str, object] = {
        "broker": {"password_file": "/etc/fedgate/credentials/agent-broker"},
        "ingest": {"mqtt_password_file": "/etc/fedgate/credentials/agent-mqtt"},
    }
    spec = agent_service_spec(program="/opt/fedgate/bin/fedgate-agent", template="", config=raw)
    assert {(c.name, c.source) for c in spec.credentials} == {
        ("broker-password", "/etc/fedgate/credentials/agent-broker"),
        ("mqtt-password", "/etc/fedgate/credentials/agent-mqtt"),
    }
    environment = dict(spec.environment)
    assert environment == {
        "FEDGATE_BROKER_PASSWORD_FILE": "%d/broker-password",
        "FEDGATE_INGEST_MQTT_PASSWORD_FILE": "%d/mqtt-password",
    }
    # What systemd passes after expanding %d:
    expanded = {k: v.replace("%d", str(credentials)) for k, v in environment.items()}
    for value in expanded.values():
        Path(value).write_text("s3cret\n")
    config = tmp_path / "agent.toml"
    config.write_text((REPO / "packaging/agent.toml.example").read_text())
    loaded = load_agent_config(config, env=expanded)
    assert loaded.broker.password_file == str(credentials / "broker-password")
    assert loaded.ingest.mqtt_password_file == str(credentials / "mqtt-password")
