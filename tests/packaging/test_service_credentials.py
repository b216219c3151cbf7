"""Secrets under systemd: LoadCredential entries from a configuration, and the loaders
reading $CREDENTIALS_DIRECTORY/<name> instead of the (root-only) configured file."""

from __future__ import annotations

import os
import tomllib
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
        "broker": {
            "password_file": "/etc/fedgate/credentials/coord-broker",
            "tls_key_file": "/etc/fedgate/credentials/coord-broker.key",
        },
        "federation": {
            "peers": {
                "cloud-2": {
                    "password_file": "/etc/fedgate/peer-2.pass",
                    "tls_key_file": "/etc/fedgate/peer-2.key",
                }
            }
        },
    }
    names = coordinator_credentials(raw)
    found = {c.name: c.source for c in credentials_in(raw, names)}
    assert found == {
        "broker-password": "/etc/fedgate/credentials/coord-broker",
        "broker-tls-key": "/etc/fedgate/credentials/coord-broker.key",
        "peer-cloud-2-password": "/etc/fedgate/peer-2.pass",
        "peer-cloud-2-tls-key": "/etc/fedgate/peer-2.key",
    }
    load_credentials_into(raw, names, {"CREDENTIALS_DIRECTORY": "/run/c"}, exists=lambda _: True)
    assert raw["federation"] == {
        "peers": {
            "cloud-2": {
                "password_file": "/run/c/peer-cloud-2-password",
                "tls_key_file": "/run/c/peer-cloud-2-tls-key",
            }
        }
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


def test_agent_reads_its_secrets_from_the_credentials_directory(tmp_path: Path) -> None:
    """Every secret the agent's unit loads (broker and plant-broker logins, OPC-UA server
    passwords) is read from systemd's copy; without the credential, from the file named."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    text = (REPO / "packaging/agent.toml.example").read_text()
    text = text.replace(
        'password_file = ""               # first line = the password; "" = none',
        'password_file = "/etc/fedgate/credentials/agent-broker"',
    )
    text = text.replace(
        'mqtt_password_file = ""          # e.g. /etc/fedgate/credentials/agent-mqtt (0600)',
        'mqtt_password_file = "/etc/fedgate/credentials/agent-mqtt"',
    )
    text = text.replace(
        'password_file = ""               # e.g. /run/credentials/fedgate-agent.service/opcua',
        'password_file = "/etc/fedgate/credentials/opcua-line-3"',
    )
    text += (
        '\n[[opcua_source]]\nendpoint = "opc.tcp://10.0.3.21:4840"\n'
        'tags = { XMEAS_3 = "ns=2;s=XMEAS_3" }\n'
        'password_file = "/etc/fedgate/credentials/opcua-line-4"\n'
    )
    config = tmp_path / "agent.toml"
    config.write_text(text)
    raw = tomllib.loads(text)
    spec = agent_service_spec(program="/opt/fedgate/bin/fedgate-agent", template="", config=raw)
    assert {(c.name, c.source) for c in spec.credentials} == {
        ("broker-password", "/etc/fedgate/credentials/agent-broker"),
        ("mqtt-password", "/etc/fedgate/credentials/agent-mqtt"),
        ("opcua-1-password", "/etc/fedgate/credentials/opcua-line-3"),
        ("opcua-2-password", "/etc/fedgate/credentials/opcua-line-4"),
    }
    assert spec.environment == ()
    for credential in spec.credentials:
        (credentials / credential.name).write_text("s3cret\n")
    loaded = load_agent_config(config, env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert loaded.broker.password_file == str(credentials / "broker-password")
    assert loaded.ingest.mqtt_password_file == str(credentials / "mqtt-password")
    assert [s.password_file for s in loaded.opcua_source] == [
        str(credentials / "opcua-1-password"),
        str(credentials / "opcua-2-password"),
    ]
    outside = load_agent_config(config, env={})
    assert outside.broker.password_file == "/etc/fedgate/credentials/agent-broker"
    assert outside.opcua_source[1].password_file == "/etc/fedgate/credentials/opcua-line-4"
