"""Tag names and the coordinator key in agent.toml: refused by `config validate` (exit 3),
each problem naming its key, before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import nacl.signing
import pytest
from click.testing import CliRunner
from fedgate_agent.cli import ExitCode
from fedgate_agent.cli import main as agent_main
from fedgate_agent.config import load_config
from fedgate_agent.errors import ConfigError
from fedgate_common.keys import public_key_text

COORDINATOR_KEY = public_key_text(nacl.signing.SigningKey(bytes(range(32))).verify_key)


def complete(state: Path, *, key: str = COORDINATOR_KEY, data_path: str = "") -> str:
    return f"""
agent_id = "site-1"
deployment = "plant-a"
cloud = "cloud-1"
state_dir = "{state}"
coordinator_public_key = "{key}"
manifest_digest = "{"ab" * 32}"
{data_path}
"""


BAD_TAGS = r"""
[windows]
tags = ["XMEAS_1", "XMEAS\u0000_2", "Reactor/Temp"]
label_tag = "FAULT\n"

[[mqtt_source]]
topic = "plant/+/+"
tag = "line/3"

[[mqtt_source]]
topic = "spBv1.0/plant/#"
format = "sparkplug"
tag = "line3/"

[[opcua_source]]
endpoint = "opc.tcp://127.0.0.1:4840"
tags = { "\u001b[2JXMEAS_1" = "ns=2;s=XMEAS_1", XMEAS_2 = "ns=2;s=XMEAS_2" }
"""


def test_tag_names_with_control_characters_or_a_misplaced_slash_are_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(complete(tmp_path, data_path=BAD_TAGS), encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={}, require_complete=False)
    assert error.value.problems == [
        "windows.tags: tag 'XMEAS\\x00_2' contains the control character U+0000; a tag name "
        "is text without control, format or separator characters",
        "windows.label_tag = 'FAULT\\n' contains the control character U+000A; a tag name is "
        "text without control, format or separator characters",
        "[[mqtt_source]] number 1: tag 'line/3' contains '/'; only Sparkplug metric names have "
        "'/' in a tag name",
        "[[opcua_source]] number 1: tag '\\x1b[2JXMEAS_1' contains the control character "
        "U+001B; a tag name is text without control, format or separator characters",
    ]
    # Not refused: "Reactor/Temp" in windows.tags and the Sparkplug prefix "line3/" (Sparkplug
    # metric names put '/' between folders). An environment override is checked alike.
    ok = tmp_path / "ok.toml"
    ok.write_text(complete(tmp_path), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"windows.tags: tag 'B\\x07' contains the control"):
        load_config(ok, env={"FEDGATE_WINDOWS_TAGS": "A,B\x07"})


def test_config_validate_exits_3_naming_the_tag_and_the_key(tmp_path: Path) -> None:
    runner = CliRunner()
    config = tmp_path / "agent.toml"
    state = tmp_path / "state"
    init = ["init", "--config", str(config), "--agent-id", "site-1", "--state-dir", str(state)]
    assert runner.invoke(agent_main, init).exit_code == 0
    validate = ["config", "validate", "--config", str(config)]
    config.write_text(complete(state), encoding="utf-8")
    assert runner.invoke(agent_main, validate).exit_code == 0
    valid = runner.invoke(agent_main, [*validate, "--json"])
    assert json.loads(valid.stdout) == {"config": str(config), "valid": True}

    config.write_text(complete(state, data_path=BAD_TAGS), encoding="utf-8")
    result = runner.invoke(agent_main, validate)
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "windows.tags: tag 'XMEAS\\x00_2'" in result.output
    report = json.loads(runner.invoke(agent_main, [*validate, "--json"]).stdout)
    assert report["exit_code"] == ExitCode.CONFIG
    assert any(problem.startswith("windows.tags:") for problem in report["problems"])
    assert "[[opcua_source]] number 1: tag '\\x1b[2JXMEAS_1'" in result.output
    assert "\x1b" not in result.output  # shown escaped, never sent to the terminal

    config.write_text(complete(state, key="ed25519:" + "00" * 32), encoding="utf-8")
    result = runner.invoke(agent_main, validate)
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "coordinator_public_key" in result.output
    assert "small-order point" in result.output
