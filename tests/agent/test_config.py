"""Agent configuration: TOML file → FEDGATE_* overrides → validation, and atomic writes."""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import tomllib
from pathlib import Path

import nacl.signing
import pytest
from click.testing import CliRunner
from fedgate_agent.cli import main
from fedgate_agent.config import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    AgentConfig,
    BrokerConfig,
    TrainingConfig,
    config_as_dict,
    config_keys,
    load_config,
    set_config_value,
    validate_config,
    write_config,
)
from fedgate_agent.errors import AgentError, ConfigError
from fedgate_common.keys import public_key_text
from hypothesis import given, settings
from hypothesis import strategies as st

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "agent/src/fedgate_agent/templates"

COORDINATOR_KEY = public_key_text(nacl.signing.SigningKey(bytes(range(32))).verify_key)
MANIFEST_DIGEST = "ab" * 32

MINIMAL = f"""
agent_id = "site-1"
deployment = "plant-a"
cloud = "cloud-1"
coordinator_public_key = "{COORDINATOR_KEY}"
manifest_digest = "{MANIFEST_DIGEST}"
"""


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(error: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    problems = getattr(error.value, "problems", None)
    assert isinstance(problems, list)
    assert problems, "a ConfigError must list at least one problem"
    return [str(problem) for problem in problems]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- reading


def test_public_constants() -> None:
    assert Path("/etc/fedgate/agent.toml") == DEFAULT_CONFIG_PATH
    assert ENV_PREFIX == "FEDGATE_"
    assert issubclass(ConfigError, AgentError)


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})

    assert (config.agent_id, config.deployment, config.cloud) == ("site-1", "plant-a", "cloud-1")
    assert config.state_dir == "/var/lib/fedgate-agent"
    assert config.log_level == "info"
    assert config.broker == BrokerConfig(
        host="127.0.0.1", port=1883, protocol="auto", keepalive_s=30, queue_size=64
    )
    assert config.training == TrainingConfig(data_file="", threads=1, seed=None)
    assert config.state_path == Path("/var/lib/fedgate-agent")
    assert config.data_path == Path("/var/lib/fedgate-agent/data/train.npz")


def test_data_file_relative_to_state_dir_or_absolute() -> None:
    base = AgentConfig(agent_id="a", deployment="d", cloud="c", state_dir="/srv/agent")
    relative = AgentConfig(
        agent_id="a",
        deployment="d",
        cloud="c",
        state_dir="/srv/agent",
        training=TrainingConfig(data_file="sets/line3.npz"),
    )
    absolute = AgentConfig(
        agent_id="a", deployment="d", cloud="c", training=TrainingConfig(data_file="/mnt/x.npz")
    )
    assert base.data_path == Path("/srv/agent/data/train.npz")
    assert relative.data_path == Path("/srv/agent/sets/line3.npz")
    assert absolute.data_path == Path("/mnt/x.npz")


def test_config_keys_are_dotted_and_complete() -> None:
    keys = config_keys()
    assert keys[:3] == ["agent_id", "deployment", "cloud"]
    assert "broker.port" in keys
    assert "training.seed" in keys
    flattened = {
        f"{section}.{name}" if isinstance(values, dict) else section
        for section, values in config_as_dict(
            AgentConfig(agent_id="a", deployment="d", cloud="c")
        ).items()
        for name in (values if isinstance(values, dict) else [section])
    }
    assert set(keys) == flattened


def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "absent.toml", env={})
    message = str(error.value)
    assert "absent.toml" in message
    assert "fedgate-agent init" in message
    assert "--config" in message


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'agent_id = "unterminated\n')
    with pytest.raises(ConfigError, match="not valid TOML") as error:
        load_config(path, env={})
    assert str(path) in str(error.value)


def test_unknown_top_level_key_is_named_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '\n[brokr]\nhost = "10.0.0.5"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    (problem,) = problems_of(error)
    assert "'brokr'" in problem
    assert "did you mean 'broker'" in problem


def test_unknown_key_inside_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[broker]\nprot = 1884\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    (problem,) = problems_of(error)
    assert "'broker.prot'" in problem
    assert "broker.port" in problem


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL.replace('"site-1"', '"a/b"') + '\nlog_level = "loud"\n[broker]\nport = 0\n'
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env={})
    problems = problems_of(error)
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "agent_id" in joined
    assert "log_level = 'loud'" in joined
    assert "broker.port = 0" in joined


@pytest.mark.parametrize("key", ["agent_id", "deployment", "cloud"])
@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "has space", "-leading", "x" * 65])
def test_identifier_that_is_unsafe_in_a_topic_is_rejected(
    tmp_path: Path, key: str, bad: str
) -> None:
    original = {"agent_id": "site-1", "deployment": "plant-a", "cloud": "cloud-1"}[key]
    text = MINIMAL.replace(f'{key} = "{original}"', f"{key} = {bad!r}")
    assert text != MINIMAL
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env={})
    (problem,) = problems_of(error)
    assert key in problem
    assert repr(bad) in problem
    assert "A-Z a-z 0-9" in problem


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace('cloud = "cloud-1"', "")
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env={})
    (problem,) = problems_of(error)
    assert "missing required key 'cloud'" in problem


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_port_out_of_range(tmp_path: Path, port: int) -> None:
    path = write(tmp_path, MINIMAL + f"\n[broker]\nport = {port}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    (problem,) = problems_of(error)
    assert f"broker.port = {port}" in problem
    assert "1..65535" in problem


@pytest.mark.parametrize(
    ("section", "line", "key"),
    [
        ("broker", 'port = "1883"', "broker.port"),
        ("training", "threads = true", "training.threads"),
        ("training", "seed = 1.5", "training.seed"),
        ("broker", "protocol = 5", "broker.protocol"),
    ],
)
def test_wrong_value_type_names_key_and_allowed_values(
    tmp_path: Path, section: str, line: str, key: str
) -> None:
    path = write(tmp_path, MINIMAL + f"\n[{section}]\n{line}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    (problem,) = problems_of(error)
    assert problem.startswith(f"{key} = ")
    assert "wrong type" in problem


def test_section_that_is_not_a_table_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker must be a table"):
        load_config(write(tmp_path, MINIMAL + '\nbroker = "localhost"\n'), env={})


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('protocol = "4"', "broker.protocol = '4'"),
        ('host = "mqtt://broker"', "broker.host = 'mqtt://broker'"),
        ('host = "broker:1883"', "broker.host = 'broker:1883'"),
        ('host = "a..b"', "broker.host = 'a..b' is not a host name"),
        (f'host = "{"b" * 64}.example"', "each label between dots needs 1 to 63 characters"),
        ("queue_size = 0", "broker.queue_size = 0"),
        ("keepalive_s = 0", "broker.keepalive_s = 0"),
    ],
)
def test_broker_values_outside_allowed_set(tmp_path: Path, line: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL + f"\n[broker]\n{line}\n"), env={})
    (problem,) = problems_of(error)
    assert fragment in problem


@pytest.mark.parametrize("host", ["::1", "127.0.0.1", "localhost", "broker.example"])
def test_ip_literals_and_host_names_are_accepted(tmp_path: Path, host: str) -> None:
    config = load_config(write(tmp_path, MINIMAL + f'\n[broker]\nhost = "{host}"\n'), env={})
    assert config.broker.host == host


def test_unencodable_broker_host_from_the_environment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"label empty or too long; .*\(set by FEDGATE_BROKER_HOST"
    ):
        load_config(write(tmp_path, MINIMAL), env={"FEDGATE_BROKER_HOST": "a..b"})


def test_relative_state_dir_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"state_dir = 'state' is not an absolute"):
        load_config(write(tmp_path, MINIMAL + 'state_dir = "state"\n'), env={})


@pytest.mark.parametrize("below", ["", "/state"])
def test_state_dir_that_is_or_lies_under_a_file_is_rejected(tmp_path: Path, below: str) -> None:
    regular = tmp_path / "regular-file"
    regular.write_text("not a directory\n")
    path = write(tmp_path, MINIMAL + f'state_dir = "{regular}{below}"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    (problem,) = problems_of(error)
    assert f"{regular} is not a directory" in problem
    missing = load_config(
        write(tmp_path, MINIMAL + f'state_dir = "{tmp_path}/new/state"\n'), env={}
    )
    assert missing.state_dir == f"{tmp_path}/new/state"


def test_seed_empty_means_none_and_integer_is_kept(tmp_path: Path) -> None:
    empty = load_config(write(tmp_path, MINIMAL + '\n[training]\nseed = ""\n', "a.toml"), env={})
    seeded = load_config(write(tmp_path, MINIMAL + "\n[training]\nseed = 7\n", "b.toml"), env={})
    assert empty.training.seed is None
    assert seeded.training.seed == 7


# --------------------------------------------------------------------------- require_complete


def test_empty_coordinator_key_needs_require_complete_false(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace(COORDINATOR_KEY, ""))
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    (problem,) = problems_of(error)
    assert problem.startswith("coordinator_public_key is empty")

    config = load_config(path, env={}, require_complete=False)
    assert config.coordinator_public_key == ""


def test_malformed_coordinator_key_is_rejected_even_before_enrollment(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace(COORDINATOR_KEY, "ed25519:abcd"))
    with pytest.raises(ConfigError) as error:
        load_config(path, env={}, require_complete=False)
    (problem,) = problems_of(error)
    assert "coordinator_public_key" in problem
    assert "32" in problem


def test_validate_config_lists_problems_and_honours_require_complete() -> None:
    incomplete = AgentConfig(agent_id="site-1", deployment="plant-a", cloud="cloud-1")
    assert validate_config(incomplete, require_complete=False) == []
    key_problem, manifest_problem = validate_config(incomplete)
    assert "coordinator_public_key" in key_problem
    assert "federation pin" in manifest_problem

    broken = AgentConfig(
        agent_id="+",
        deployment="plant-a",
        cloud="cloud-1",
        coordinator_public_key=COORDINATOR_KEY,
        manifest_digest=MANIFEST_DIGEST,
        training=TrainingConfig(threads=65, seed=-1),
    )
    problems = validate_config(broken)
    assert len(problems) == 3
    assert any("'+'" in p for p in problems)
    assert any("training.threads = 65" in p and "1..64" in p for p in problems)
    assert any("training.seed = -1" in p for p in problems)


# --------------------------------------------------------------------------- environment


def test_env_override_wins_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[broker]\nport = 1883\n")
    env = {
        "FEDGATE_AGENT_ID": "site-9",
        "FEDGATE_BROKER_PORT": "8883",
        "FEDGATE_TRAINING_THREADS": "4",
        "FEDGATE_TRAINING_SEED": "",
        "PATH": "/usr/bin",
    }
    config = load_config(path, env=env)
    assert config.agent_id == "site-9"
    assert config.broker.port == 8883
    assert config.training.threads == 4
    assert config.training.seed is None
    # The file itself is untouched.
    assert tomllib.loads(path.read_text())["broker"]["port"] == 1883


def test_env_can_supply_a_key_missing_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('cloud = "cloud-1"', ""))
    config = load_config(path, env={"FEDGATE_CLOUD": "cloud-7"})
    assert config.cloud == "cloud-7"


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGATE_LOG_LEVEL", "debug")
    assert load_config(write(tmp_path, MINIMAL)).log_level == "debug"


def test_non_integer_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), env={"FEDGATE_BROKER_PORT": "eighty"})
    (problem,) = problems_of(error)
    assert "FEDGATE_BROKER_PORT='eighty'" in problem
    assert "not an integer" in problem


def test_invalid_env_value_is_attributed_to_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), env={"FEDGATE_BROKER_PORT": "70000"})
    (problem,) = problems_of(error)
    assert "broker.port = 70000" in problem
    assert "(set by FEDGATE_BROKER_PORT)" in problem


def test_misspelt_env_variable_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"FEDGATE_BROKR_PORT": "1", "FEDGATE_SOMETHING_ELSE": "x"}
    with caplog.at_level(logging.WARNING, logger="fedgate_agent.config"):
        config = load_config(write(tmp_path, MINIMAL), env=env)
    assert config.broker.port == 1883
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "FEDGATE_BROKR_PORT" in warnings[0]
    assert "FEDGATE_BROKER_PORT" in warnings[0]


# --------------------------------------------------------------------------- writing


def full_config(**changes: object) -> AgentConfig:
    values: dict[str, object] = {
        "agent_id": "site-3",
        "deployment": "plant-b",
        "cloud": "cloud-2",
        "state_dir": "/srv/fedgate",
        "coordinator_public_key": COORDINATOR_KEY,
        "manifest_digest": MANIFEST_DIGEST,
        "log_level": "warning",
        "broker": BrokerConfig(
            host="mqtt.local", port=8883, protocol="3.1.1", keepalive_s=15, queue_size=8
        ),
        "training": TrainingConfig(data_file="d.npz", threads=2, seed=11),
    }
    values.update(changes)
    return AgentConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [11, None])
def test_toml_round_trip(tmp_path: Path, seed: int | None) -> None:
    config = full_config(training=TrainingConfig(data_file="d.npz", threads=2, seed=seed))
    path = tmp_path / "etc" / "fedgate" / "agent.toml"  # parent dirs are created
    write_config(path, config)
    assert load_config(path, env={}) == config
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert leftovers(path.parent) == []


def test_write_refuses_an_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    with pytest.raises(ConfigError, match=r"broker\.port = 0"):
        write_config(path, full_config(broker=BrokerConfig(port=0)))
    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_write_allows_config_before_enrollment(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    write_config(path, full_config(coordinator_public_key=""))
    assert load_config(path, env={}, require_complete=False).coordinator_public_key == ""


def test_write_keeps_the_existing_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    write_config(path, full_config())
    path.chmod(0o600)
    write_config(path, full_config(log_level="debug"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config(path, env={}).log_level == "debug"


def test_failed_write_keeps_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.toml"
    write_config(path, full_config())
    before = path.read_bytes()

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(ConfigError, match=f"cannot write {path}: No space left"):
        write_config(path, full_config(log_level="debug"))
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


@settings(max_examples=40, deadline=None)
@given(
    port=st.integers(1, 65535),
    threads=st.integers(1, 64),
    seed=st.none() | st.integers(0, 2**63 - 1),
    host=st.from_regex(r"[a-z][a-z0-9-]{0,14}(\.[a-z0-9-]{1,14}){0,2}", fullmatch=True),
    agent_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
)
def test_any_valid_config_round_trips(
    port: int, threads: int, seed: int | None, host: str, agent_id: str
) -> None:
    config = full_config(
        agent_id=agent_id,
        broker=BrokerConfig(host=host, port=port),
        training=TrainingConfig(threads=threads, seed=seed),
    )
    assert validate_config(config) == []
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "agent.toml"
        write_config(path, config)
        assert load_config(path, env={}) == config


# --------------------------------------------------------------------------- set_config_value


def test_set_value_parses_type_validates_and_persists(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    updated = set_config_value(path, "broker.port", "8883")
    assert updated.broker.port == 8883
    assert load_config(path, env={}).broker.port == 8883
    assert tomllib.loads(path.read_text())["broker"]["port"] == 8883

    assert set_config_value(path, "training.seed", "5").training.seed == 5
    assert set_config_value(path, "training.seed", "").training.seed is None
    assert set_config_value(path, "agent_id", "site-2").agent_id == "site-2"
    assert leftovers(tmp_path) == []


def test_set_value_keeps_file_mode(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    path.chmod(0o600)
    set_config_value(path, "log_level", "debug")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("broker.port", "0", "broker.port = 0"),
        ("broker.port", "abc", "not an integer"),
        ("agent_id", "a/b", "'a/b'"),
        ("log_level", "verbose", "log_level = 'verbose'"),
        ("coordinator_public_key", "ed25519:zz", "not hex"),
        ("privacy.report_epsilon", "yes", "privacy.report_epsilon = 'yes' is not"),
        ("privacy.record_level", "1", "privacy.record_level = '1' is not"),
        ("privacy.accountant", "prv", "privacy.accountant = 'prv' is not"),
        # record_level is off in MINIMAL: pooled noise would be a setting that does nothing
        ("privacy.record_noise", "pooled", 'set privacy.record_level = "on" first'),
    ],
)
def test_set_invalid_value_leaves_file_unchanged(
    tmp_path: Path, key: str, value: str, fragment: str
) -> None:
    path = write(tmp_path, MINIMAL)
    before = path.read_bytes()
    with pytest.raises(ConfigError) as error:
        set_config_value(path, key, value)
    assert any(fragment in problem for problem in problems_of(error))
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_set_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    before = path.read_bytes()
    with pytest.raises(ConfigError) as error:
        set_config_value(path, "brokr.port", "1884")
    message = str(error.value)
    assert "'brokr.port'" in message
    assert "did you mean 'broker.port'" in message
    for key in config_keys():
        assert key in message
    assert path.read_bytes() == before


def test_set_value_allows_incomplete_config_and_ignores_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, MINIMAL.replace(COORDINATOR_KEY, ""))
    monkeypatch.setenv("FEDGATE_LOG_LEVEL", "debug")
    config = set_config_value(path, "broker.host", "10.0.0.5")
    assert config.broker.host == "10.0.0.5"
    assert config.log_level == "info"  # the environment is not written into the file
    assert "debug" not in path.read_text()

    complete = set_config_value(path, "coordinator_public_key", COORDINATOR_KEY)
    assert validate_config(complete) == []


def test_set_value_on_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedgate-agent init"):
        set_config_value(tmp_path / "absent.toml", "broker.port", "1884")
    assert not (tmp_path / "absent.toml").exists()


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_state_dir_through_a_broken_link_is_rejected(tmp_path: Path, kind: str) -> None:
    """A link to nothing, or a link loop, can neither be used nor created as a directory:
    refused when the configuration is read instead of a FileExistsError or ELOOP later."""
    link = tmp_path / "state"
    if kind == "dangling":
        link.symlink_to(tmp_path / "nothing")
    else:
        other = tmp_path / "other"
        link.symlink_to(other)
        other.symlink_to(link)
    path = write(tmp_path, MINIMAL + f'state_dir = "{link}/sub"\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    (problem,) = problems_of(error)
    assert f"{link} is not a directory (a file, or a link to nothing)" in problem


def test_init_writes_its_options_into_the_config_install_service_wrote(tmp_path: Path) -> None:
    """install-service writes agent.toml first; `init --agent-id …` then used to ignore its
    options without a word, leaving the template's id and state directory in force."""
    config = tmp_path / "agent.toml"
    config.write_text((TEMPLATE_DIR / "agent.toml.example").read_text())
    state = tmp_path / "state"
    init = ["init", "--config", str(config), "--agent-id", "gw-77", "--deployment", "plant-b"]
    result = CliRunner().invoke(main, [*init, "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    loaded = load_config(config, env={}, require_complete=False)
    assert (loaded.agent_id, loaded.deployment, loaded.state_dir) == (
        "gw-77",
        "plant-b",
        str(state),
    )
    assert loaded.cloud == "cloud-1"  # not given: the file's value stays
    assert (state / "identity.key").exists()
    before = config.read_text()
    again = CliRunner().invoke(main, [*init[:3], "--agent-id", "gw-78"])
    assert again.exit_code == 3, again.output
    assert "identity key already" in again.output
    assert "agent_id 'gw-77' -> 'gw-78'" in again.output
    assert config.read_text() == before


def test_init_with_a_config_path_under_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    config = tmp_path / "afile" / "agent.toml"
    init = ["init", "--config", str(config), "--state-dir", str(tmp_path / "state"), "--json"]
    result = CliRunner().invoke(main, [*init, "--agent-id", "gw-1"])
    assert result.exit_code == 3, result.output
    assert json.loads(result.stdout) == {
        "error": f"cannot write {config}: Not a directory",
        "exit_code": 3,
    }
    assert not (tmp_path / "state" / "identity.key").exists()


def test_init_writes_all_its_options_or_none(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text((TEMPLATE_DIR / "agent.toml.example").read_text())
    before = config.read_text()
    init = ["init", "--config", str(config), "--agent-id", "gw-2", "--deployment", "d2"]
    result = CliRunner().invoke(main, [*init, "--coordinator-key", "ed25519:nothex"])
    assert result.exit_code == 3, result.output
    assert config.read_text() == before  # not half-changed
    assert not list(tmp_path.rglob("identity.key"))


def test_json_failure_lists_every_config_problem(tmp_path: Path) -> None:
    bad = MINIMAL.replace('"site-1"', '"bad id!"') + 'log_level = "loud"\n'
    path = write(tmp_path, bad + f'state_dir = "{tmp_path / "state"}"\n')
    result = CliRunner().invoke(main, ["status", "--config", str(path), "--json"])
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["exit_code"] == 3
    assert len(report["problems"]) == 2
    assert any("log_level" in problem for problem in report["problems"])
    assert any("agent_id" in problem for problem in report["problems"])
