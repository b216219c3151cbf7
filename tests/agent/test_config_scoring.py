"""The [scoring] table of the agent configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedgate_agent.config import AgentConfig, load_config, set_config_value
from fedgate_agent.errors import ConfigError

BASE = """
agent_id = "site-1"
deployment = "plant-a"
cloud = "cloud-1"
state_dir = "/srv/agent"
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=env or {}, require_complete=False)


def test_defaults_and_a_full_table(tmp_path: Path) -> None:
    default = load(tmp_path, BASE).scoring
    assert (default.enabled, default.topic, default.alert_threshold) == ("auto", "", 0.9)
    assert (default.normal_class, default.interval_s, default.settle_s) == (0, 0.0, 1.0)
    assert (default.alert_raise_after, default.alert_clear_after) == (1, 3)
    config = load(
        tmp_path,
        BASE
        + """
[scoring]
enabled = "on"
topic = "plant-a/line3/scores"
alert_topic = "plant-a/line3/alarms"
alert_threshold = 0.75
alert_classes = ["4", "6"]
alert_raise_after = 2
alert_clear_after = 5
normal_class = -1
interval_s = 10.0
settle_s = 0.5
""",
    ).scoring
    assert config.alert_classes == ("4", "6")
    assert (config.alert_raise_after, config.alert_clear_after) == (2, 5)
    assert config.topic == "plant-a/line3/scores"
    assert config.normal_class == -1


def test_environment_and_config_set(tmp_path: Path) -> None:
    config = load(tmp_path, BASE, env={"FEDGATE_SCORING_ALERT_CLASSES": "3,5"})
    assert config.scoring.alert_classes == ("3", "5")
    path = tmp_path / "agent.toml"
    assert set_config_value(path, "scoring.enabled", "off").scoring.enabled == "off"
    with pytest.raises(ConfigError, match=r"scoring\.enabled"):
        set_config_value(path, "scoring.enabled", "yes")


def test_every_bad_value_is_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load(
            tmp_path,
            BASE
            + """
[scoring]
enabled = "true"
topic = "plant/+/scores"
alert_topic = "$SYS/x"
alert_threshold = 1.5
alert_classes = ["four"]
alert_raise_after = 0
alert_clear_after = 10001
normal_class = -2
interval_s = -1.0
settle_s = 4000.0
""",
        )
    problems = " ".join(error.value.problems)
    for key in (
        "enabled",
        "topic",
        "alert_topic",
        "alert_threshold",
        "alert_classes",
        "alert_raise_after",
        "alert_clear_after",
        "normal_class",
        "interval_s",
        "settle_s",
    ):
        assert f"scoring.{key} =" in problems
    assert len(error.value.problems) == 10
