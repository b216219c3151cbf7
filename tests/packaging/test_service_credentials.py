"""Secrets under systemd: LoadCredential entries from a configuration, and the loaders
reading $CREDENTIALS_DIRECTORY/<name> instead of the (root-only) configured file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from fedgate_agent.config import load_config as load_agent_config
from fedgate_agent.errors import ConfigError as AgentConfigError
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


def example_with_its_sources() -> str:
    """The shipped agent.toml with its commented-out example sources switched on."""
    lines = (REPO / "packaging/agent.toml.example").read_text().splitlines()
    start = lines.index("# [[mqtt_source]]")
    end = next(i for i, line in enumerate(lines) if line == "[scoring]")
    for i in range(start, end):
        if lines[i].startswith("# ") and ("=" in lines[i] or lines[i].startswith("# [[")):
            lines[i] = lines[i].removeprefix("# ")
    return "\n".join(lines) + "\n"


def test_agent_reads_its_secrets_from_the_credentials_directory(tmp_path: Path) -> None:
    """Every secret the agent's unit loads (broker and plant-broker logins, OPC-UA server
    passwords) is read from systemd's copy; without the credential, from the file named."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    text = example_with_its_sources()
    text = text.replace(
        'password_file = ""               # first line = the password; "" = none',
        'password_file = "/etc/fedgate/credentials/agent-broker"',
    )
    text = text.replace(
        'mqtt_password_file = ""          # e.g. /etc/fedgate/credentials/agent-mqtt (0600)',
        'mqtt_password_file = "/etc/fedgate/credentials/agent-mqtt"',
    )
    text = text.replace(
        'password_file = ""             # e.g. /run/credentials/fedgate-agent.service/opcua',
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
    loaded = load_agent_config(
        config, env={"CREDENTIALS_DIRECTORY": str(credentials)}, require_complete=False
    )
    assert loaded.broker.password_file == str(credentials / "broker-password")
    assert loaded.ingest.mqtt_password_file == str(credentials / "mqtt-password")
    assert [s.password_file for s in loaded.opcua_source] == [
        str(credentials / "opcua-1-password"),
        str(credentials / "opcua-2-password"),
    ]
    outside = load_agent_config(config, env={}, require_complete=False)
    assert outside.broker.password_file == "/etc/fedgate/credentials/agent-broker"
    assert outside.opcua_source[1].password_file == "/etc/fedgate/credentials/opcua-line-4"


def _opcua_sources(*names: str) -> str:
    text = ""
    for number, name in enumerate(names, start=1):
        named = f'name = "{name}"\n' if name else ""
        text += (
            f'\n[[opcua_source]]\n{named}endpoint = "opc.tcp://10.0.3.{number}:4840"\n'
            f'tags = {{ XMEAS_1 = "ns=2;s=XMEAS_1" }}\n'
            f'password_file = "/etc/fedgate/credentials/opcua-{name or number}"\n'
        )
    return text


def test_a_named_opcua_source_keeps_its_credential_when_the_sources_are_reordered(
    tmp_path: Path,
) -> None:
    """By position, inserting a source in front would hand the first server's password to
    the new one; by name, each server's credential follows it."""
    base = (REPO / "packaging/agent.toml.example").read_text().split("[[opcua_source]]")[0]
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in ("line-3", "line-4"):
        (credentials / f"opcua-{name}-password").write_text(f"password of {name}\n")
    for order in (("line-3", "line-4"), ("line-4", "line-3")):
        text = base + _opcua_sources(*order)
        spec = agent_service_spec(
            program="/opt/fedgate/bin/fedgate-agent", template="", config=tomllib.loads(text)
        )
        assert {(c.name, c.source) for c in spec.credentials} >= {
            ("opcua-line-3-password", "/etc/fedgate/credentials/opcua-line-3"),
            ("opcua-line-4-password", "/etc/fedgate/credentials/opcua-line-4"),
        }
        config = tmp_path / "agent.toml"
        config.write_text(text)
        loaded = load_agent_config(
            config, env={"CREDENTIALS_DIRECTORY": str(credentials)}, require_complete=False
        )
        by_name = {s.name: Path(s.password_file).read_text() for s in loaded.opcua_source}
        assert by_name == {"line-3": "password of line-3\n", "line-4": "password of line-4\n"}


@pytest.mark.parametrize(
    ("names", "needle"),
    [
        (("line-3", "line-3"), "'opcua-line-3-password' is also that of [[opcua_source]] 'line-3'"),
        (("", "1"), "'opcua-1-password' is also that of [[opcua_source]] number 1"),
        (("line/3",), "invalid name 'line/3'"),
    ],
)
def test_opcua_source_names_that_clash_or_are_not_identifiers_are_refused(
    tmp_path: Path, names: tuple[str, ...], needle: str
) -> None:
    base = (REPO / "packaging/agent.toml.example").read_text().split("[[opcua_source]]")[0]
    config = tmp_path / "agent.toml"
    config.write_text(base + _opcua_sources(*names))
    with pytest.raises(AgentConfigError) as error:
        load_agent_config(config, env={}, require_complete=False)
    assert needle in "\n".join(error.value.problems)
