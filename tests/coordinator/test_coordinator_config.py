"""coordinator.toml and --state-dir: values that would fail only once `serve` connects (or
writes) are refused when the configuration is read, with exit code 3."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import msgspec
import pytest
import tomli_w
from click.testing import CliRunner
from fedgate_coordinator.cli import ExitCode, main
from fedgate_coordinator.config import CoordinatorConfig, validate, write_config
from fedgate_coordinator.mqtt_link import MqttSettings
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.secure_rounds import SecAggSettings
from fedgate_coordinator.site_privacy import SitePrivacySettings

BASE = CoordinatorConfig(deployment="plant-a", cloud="cloud-1", database_url="sqlite:///c.db")


@pytest.mark.parametrize(
    ("broker", "fragment"),
    [
        (MqttSettings(host="a..b"), "broker.host='a..b' is not a host name or IP address"),
        (MqttSettings(host="b" * 64 + ".example"), "each label between dots needs 1 to 63"),
        (MqttSettings(host="mqtt://broker"), "it has a scheme"),
        (MqttSettings(keepalive_s=0), "broker.keepalive_s=0: use 1..65535"),
        (MqttSettings(keepalive_s=70_000), "broker.keepalive_s=70000: use 1..65535"),
        (MqttSettings(client_id="c" * 70_000), "broker.client_id='cccc"),
        (MqttSettings(client_id="coordinator one"), "at most 256 characters without spaces"),
    ],
)
def test_broker_settings_that_fail_at_connect_are_problems(
    broker: MqttSettings, fragment: str
) -> None:
    problems = validate(msgspec.structs.replace(BASE, broker=broker))
    assert len(problems) == 1, problems
    assert fragment in problems[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "broker.example"])
def test_ip_literals_and_host_names_are_fine(host: str) -> None:
    broker = MqttSettings(host=host, keepalive_s=65_535, client_id="c" * 256)
    assert validate(msgspec.structs.replace(BASE, broker=broker)) == []


@pytest.mark.parametrize("pause", [1e300, math.inf, math.nan, -1.0, 86_400.5])
def test_pause_between_rounds_is_bounded(pause: float) -> None:
    rounds = RoundSettings(pause_between_rounds_s=pause)
    assert validate(msgspec.structs.replace(BASE, rounds=rounds)) == [
        "rounds.pause_between_rounds_s must be in [0, 86400]"
    ]
    for fine in (0.0, 86_400.0):
        rounds = RoundSettings(pause_between_rounds_s=fine)
        assert validate(msgspec.structs.replace(BASE, rounds=rounds)) == []


def test_serve_with_an_out_of_range_keepalive_exits_config(tmp_path: Path) -> None:
    write_config(tmp_path, msgspec.structs.replace(BASE, broker=MqttSettings(keepalive_s=70_000)))
    result = CliRunner().invoke(main, ["--state-dir", str(tmp_path), "serve"])
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "broker.keepalive_s=70000: use 1..65535" in result.output


@pytest.mark.parametrize("command", [["init", "--cloud", "c1"], ["status"], ["serve"]])
@pytest.mark.parametrize("below", ["", "state"])
def test_a_state_dir_that_is_or_lies_under_a_file_exits_config(
    tmp_path: Path, command: list[str], below: str
) -> None:
    regular = tmp_path / "coord"
    regular.write_text("not a directory\n")
    state_dir = regular / below if below else regular
    result = CliRunner().invoke(main, ["--state-dir", str(state_dir), *command])
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert f"{regular} is not a directory" in result.output


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        # An agent's key copied over: named, with the coordinator's own.
        (
            "record_noise",
            "pooled",
            "unknown key 'privacy.record_noise'; this is an agent's key, the coordinator's "
            'is privacy.record_level = "pooled"',
        ),
        ("record_levle", "pooled", "did you mean 'privacy.record_level'?"),
        ("target_epsilon", "8", "privacy.target_epsilon = '8': use a number (write it without"),
        ("planned_rounds", 2.5, "privacy.planned_rounds = 2.5: use a whole number"),
        ("delta", 0.5, "privacy.delta=0.5: use (0, 0.01]"),
        ("record_sample_rate", math.nan, "privacy.record_sample_rate=nan: use (0, 1]"),
    ],
)
def test_privacy_mistakes_in_coordinator_toml_name_the_key_and_the_fix(
    tmp_path: Path, key: str, value: object, fragment: str
) -> None:
    """What an operator sees for a [privacy] key typed by hand: the key, its value and what
    to write (exit 3), not msgspec's JSON path."""
    write_config(tmp_path, BASE)
    path = tmp_path / "coordinator.toml"
    raw = tomllib.loads(path.read_text())
    raw["privacy"][key] = value
    path.write_text(tomli_w.dumps(raw))
    result = CliRunner().invoke(main, ["--state-dir", str(tmp_path), "privacy"])
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert fragment in result.output
    assert "$." not in result.output


def test_a_misspelt_table_gets_the_closest_known_one(tmp_path: Path) -> None:
    write_config(tmp_path, BASE)
    path = tmp_path / "coordinator.toml"
    raw = tomllib.loads(path.read_text())
    raw["secgg"] = raw.pop("secagg")
    path.write_text(tomli_w.dumps(raw))
    result = CliRunner().invoke(main, ["--state-dir", str(tmp_path), "status"])
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "unknown key 'secgg'; did you mean 'secagg'? (keys in the top level:" in result.output


def test_pooled_noise_takes_at_most_ten_thousand_windows_a_step() -> None:
    """The 1 % slack for the float32 sum of clipped gradients holds to about 12,000 windows
    a step: a pooled plan asking for more is a configuration problem (the agents refuse it
    too, privacy.md 3.7)."""
    pooled = msgspec.structs.replace(
        BASE,
        privacy=SitePrivacySettings(record_level="pooled"),
        secagg=SecAggSettings(word_bits=32),
        rounds=RoundSettings(local_epochs=1, batch_size=10_000),
    )
    assert validate(pooled) == []
    larger = msgspec.structs.replace(
        pooled, rounds=RoundSettings(local_epochs=1, batch_size=10_001)
    )
    assert validate(larger) == [
        "rounds.batch_size=10001: privacy.record_level=pooled takes at most 10000 windows a "
        "step (the agents refuse more: the float32 sum of the clipped gradients could round "
        "by more than the noise allows for)"
    ]
