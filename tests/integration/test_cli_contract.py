"""What operators rely on in both command lines: help with examples, exit codes, --json."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from fedgate_agent.cli import ExitCode as AgentExit
from fedgate_agent.cli import main as agent_main
from fedgate_bridge.cli import main as bridge_main
from fedgate_common.consensus.manifest import encode_manifest_file, manifest_digest
from fedgate_common.keys import public_key_text
from fedgate_common.model_spec import ModelSpec
from fedgate_coordinator.cli import ExitCode as CoordinatorExit
from fedgate_coordinator.cli import main as coordinator_main
from nacl.signing import SigningKey

from tests.federation_support import federation_manifest

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, (*prefix, name)))
    return paths


@pytest.mark.parametrize(
    "main", [agent_main, coordinator_main, bridge_main], ids=["agent", "coordinator", "bridge"]
)
def test_every_command_has_help_with_an_example(main: click.Group) -> None:
    runner = CliRunner()
    paths = command_paths(main)
    assert len(paths) >= 4
    for path in [(), *paths]:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        name = " ".join(path) or "main"
        assert "Example" in result.output, f"{name} --help has no example"
        assert "exit code" in result.output.lower(), f"{name} --help lists no exit codes"


def test_coordinator_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path / "c")]
    missing = runner.invoke(coordinator_main, [*state, "status"])
    assert missing.exit_code == CoordinatorExit.CONFIG
    assert "fedgate-coordinator init" in missing.output
    init = runner.invoke(coordinator_main, [*state, "init", "--cloud", "c1", "--json"])
    assert init.exit_code == 0, init.output
    assert json.loads(init.output)["coordinator_public_key"].startswith("ed25519:")
    again = runner.invoke(coordinator_main, [*state, "init", "--cloud", "c1"])
    assert again.exit_code == CoordinatorExit.CONFIG
    key = public_key_text(SigningKey.generate().verify_key)
    assert runner.invoke(coordinator_main, [*state, "enroll", "gw-1", key]).exit_code == 0
    other = public_key_text(SigningKey.generate().verify_key)
    conflict = runner.invoke(coordinator_main, [*state, "enroll", "gw-1", other])
    assert conflict.exit_code == CoordinatorExit.CONFLICT
    bad_key = runner.invoke(coordinator_main, [*state, "enroll", "gw-2", "ed25519:zz"])
    assert bad_key.exit_code == CoordinatorExit.USAGE
    bad_id = runner.invoke(coordinator_main, [*state, "enroll", "gw/+", key])
    assert bad_id.exit_code == CoordinatorExit.USAGE
    # An id that cannot be one is a bad command line; a valid one never enrolled is not found.
    bad_revoke = runner.invoke(coordinator_main, [*state, "revoke", "gw/+", "--json"])
    assert bad_revoke.exit_code == CoordinatorExit.USAGE
    assert "invalid agent id 'gw/+'" in json.loads(bad_revoke.stdout)["error"]
    unknown = runner.invoke(coordinator_main, [*state, "revoke", "gw-9", "--json"])
    assert unknown.exit_code == CoordinatorExit.NOT_FOUND
    assert json.loads(unknown.stdout) == {
        "error": "agent 'gw-9' is not enrolled (see `fedgate-coordinator agents`)",
        "exit_code": int(CoordinatorExit.NOT_FOUND),
    }
    bad_cloud = runner.invoke(
        coordinator_main, ["--state-dir", str(tmp_path / "c2"), "init", "--cloud", "c 1"]
    )
    assert bad_cloud.exit_code == CoordinatorExit.USAGE
    assert "invalid cloud id 'c 1'" in bad_cloud.stderr
    assert not (tmp_path / "c2").exists()
    agents = json.loads(runner.invoke(coordinator_main, [*state, "agents", "--json"]).output)
    assert [a["agent_id"] for a in agents] == ["gw-1"]
    assert runner.invoke(coordinator_main, [*state, "revoke", "gw-1"]).exit_code == 0
    agents = json.loads(runner.invoke(coordinator_main, [*state, "agents", "--json"]).output)
    assert agents[0]["status"] == "revoked"
    again = runner.invoke(coordinator_main, [*state, "enroll", "gw-1", key])
    assert again.exit_code == CoordinatorExit.CONFLICT
    assert "stays revoked" in again.output
    status = json.loads(runner.invoke(coordinator_main, [*state, "status", "--json"]).output)
    assert status["head_model"] is None  # the genesis model is made by the first `serve`
    assert status["consensus"]["tolerance"] == "1 cloud: quorum 1, tolerates no faulty coordinator"
    assert status["coordinator_public_key"] == json.loads(init.output)["coordinator_public_key"]
    assert status["aggregation"]["mode"] == "secagg"  # the default
    for agent in ("gw-3", "gw-4", "gw-5", "gw-6"):
        fresh = public_key_text(SigningKey.generate().verify_key)
        assert runner.invoke(coordinator_main, [*state, "enroll", agent, fresh]).exit_code == 0
    status = json.loads(runner.invoke(coordinator_main, [*state, "status", "--json"]).output)
    # 4 active agents: complete graph (3 neighbours), t = ceil(2 * 4 / 3) = 3, 1 dropout.
    assert status["aggregation"] == {
        "mode": "secagg",
        "word_bits": 16,
        "clip_norm": 10.0,
        "weight_cap": 2000,
        "degree": 3,
        "threshold": 3,
        "dropouts_tolerated_per_group": 1,
    }
    text = runner.invoke(coordinator_main, [*state, "status"]).output
    assert "threshold 3 (tolerates 1 dropout per group of holders)" in text
    models = json.loads(
        runner.invoke(coordinator_main, [*state, "models", "--verify", "--json"]).output
    )
    assert models["verified_length"] == 0  # no genesis before the first `serve`
    # With --json a failure is JSON on stdout too (the message stays on stderr).
    absent = runner.invoke(coordinator_main, [*state, "rounds", "--detail", "99", "--json"])
    assert absent.exit_code == CoordinatorExit.NOT_FOUND
    assert json.loads(absent.stdout) == {
        "error": "round 99 not found (see `fedgate-coordinator rounds`)",
        "exit_code": int(CoordinatorExit.NOT_FOUND),
    }
    assert absent.stderr.startswith("error: round 99")
    plain = runner.invoke(coordinator_main, [*state, "rounds", "--detail", "99"])
    assert (plain.exit_code, plain.stdout) == (CoordinatorExit.NOT_FOUND, "")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    manifest = runner.invoke(
        coordinator_main, [*state, "federation", "install", str(broken), "--json"]
    )
    assert manifest.exit_code == CoordinatorExit.MANIFEST
    report = json.loads(manifest.stdout)
    assert report["exit_code"] == int(CoordinatorExit.MANIFEST)
    assert report["problems"] == [report["error"]]
    assert "not a valid manifest file" in report["error"]


def test_agent_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    config = str(tmp_path / "agent.toml")
    missing = runner.invoke(agent_main, ["status", "--config", config])
    assert missing.exit_code == AgentExit.CONFIG
    init = runner.invoke(
        agent_main,
        [
            "init",
            "--config",
            config,
            "--agent-id",
            "gw-1",
            "--state-dir",
            str(tmp_path / "state"),
            "--json",
        ],
    )
    assert init.exit_code == 0, init.output
    assert json.loads(init.output)["agent_id"] == "gw-1"
    assert (tmp_path / "state" / "identity.key").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(agent_main, ["init", "--config", config])
    assert again.exit_code == AgentExit.CONFLICT
    for option in ("--agent-id", "--deployment", "--cloud"):
        bad_id = runner.invoke(
            agent_main, ["init", "--config", str(tmp_path / "b.toml"), option, "gw 2"]
        )
        assert bad_id.exit_code == AgentExit.USAGE, option
        assert "'gw 2'" in bad_id.stderr
    assert not (tmp_path / "b.toml").exists()
    # A negative value is a value, not an option; --json shows it as stored.
    negative = runner.invoke(
        agent_main, ["config", "set", "--config", config, "scoring.normal_class", "-1", "--json"]
    )
    assert negative.exit_code == 0, negative.output
    assert json.loads(negative.stdout) == {
        "config": config,
        "key": "scoring.normal_class",
        "value": -1,
    }
    before = Path(config).read_bytes()
    for typo in (["--jsn", "x"], ["broker.host", "--jsn"], ["broker.username", "--conifg=x"]):
        refused = runner.invoke(agent_main, ["config", "set", "--config", config, *typo])
        assert refused.exit_code == AgentExit.USAGE, typo
        assert "No such option" in refused.stderr
    assert Path(config).read_bytes() == before  # a mistyped option is never stored as a value
    bad = runner.invoke(agent_main, ["config", "set", "--config", config, "broker.port", "0"])
    assert bad.exit_code == AgentExit.CONFIG
    assert "broker.port" in bad.output
    coordinator = SigningKey.generate()
    key = public_key_text(coordinator.verify_key)
    assert (
        runner.invoke(
            agent_main, ["config", "set", "--config", config, "coordinator_public_key", key]
        ).exit_code
        == 0
    )
    unpinned = runner.invoke(agent_main, ["run", "--config", config])
    assert unpinned.exit_code == AgentExit.CONFIG
    assert "federation pin" in unpinned.output
    manifest = tmp_path / "federation.json"
    manifest.write_bytes(
        encode_manifest_file(
            federation_manifest(deployment="fedgate", keys={"cloud-1": coordinator}, spec=SPEC)
        )
    )
    other = tmp_path / "other.json"
    other.write_bytes(
        encode_manifest_file(
            federation_manifest(deployment="elsewhere", keys={"cloud-1": coordinator}, spec=SPEC)
        )
    )
    wrong = runner.invoke(agent_main, ["federation", "pin", "--config", config, str(other)])
    assert wrong.exit_code == AgentExit.CONFIG
    assert "deployment" in wrong.output
    pinned = runner.invoke(
        agent_main, ["federation", "pin", "--config", config, str(manifest), "--json"]
    )
    assert pinned.exit_code == 0, pinned.output
    assert json.loads(pinned.output)["clouds"] == ["cloud-1"]
    tampered = json.loads(manifest.read_text())
    tampered["manifest"]["genesis_seed"] += 1
    manifest.write_text(json.dumps(tampered))
    bad = runner.invoke(agent_main, ["federation", "pin", "--config", config, str(manifest)])
    assert bad.exit_code == AgentExit.MANIFEST
    no_data = runner.invoke(agent_main, ["run", "--config", config])
    assert no_data.exit_code == AgentExit.DATA
    assert "train.npz" in no_data.output
    shown = json.loads(
        runner.invoke(agent_main, ["config", "show", "--config", config, "--json"]).output
    )
    assert shown["coordinator_public_key"] == key
    env = runner.invoke(
        agent_main,
        ["config", "show", "--config", config, "--json"],
        env={"FEDGATE_BROKER_PORT": "8883"},
    )
    assert json.loads(env.output)["broker"]["port"] == 8883
    status = json.loads(runner.invoke(agent_main, ["status", "--config", config, "--json"]).output)
    assert status["running"] is False
    assert status["identity_present"] is True


def test_pin_replace_swaps_a_first_manifest_for_another(tmp_path: Path) -> None:
    """A cloud that ran alone (init pins its one-cloud manifest, version 1) joins a
    federation whose manifest is a version 1 too: pin refuses it, pin --replace takes it."""
    runner = CliRunner()
    config = str(tmp_path / "agent.toml")
    init = runner.invoke(
        agent_main,
        ["init", "--config", config, "--agent-id", "gw-1", "--state-dir", str(tmp_path / "s")],
    )
    assert init.exit_code == 0, init.output
    own, other = SigningKey.generate(), SigningKey.generate()
    alone = tmp_path / "alone.json"
    alone.write_bytes(
        encode_manifest_file(
            federation_manifest(deployment="fedgate", keys={"cloud-1": own}, spec=SPEC)
        )
    )
    joined_manifest = federation_manifest(
        deployment="fedgate", keys={"cloud-1": own, "cloud-2": other}, spec=SPEC
    )
    joined = tmp_path / "joined.json"
    joined.write_bytes(encode_manifest_file(joined_manifest))
    pin = ["federation", "pin", "--config", config]
    assert runner.invoke(agent_main, [*pin, str(alone)]).exit_code == 0
    refused = runner.invoke(agent_main, [*pin, str(joined)])
    assert refused.exit_code == AgentExit.MANIFEST
    assert "--replace" in refused.output
    unsigned = json.loads(joined.read_text())
    unsigned["signatures"] = unsigned["signatures"][:1]
    half = tmp_path / "half.json"
    half.write_text(json.dumps(unsigned))
    assert runner.invoke(agent_main, [*pin, "--replace", str(half)]).exit_code == (
        AgentExit.MANIFEST
    )
    replaced = runner.invoke(agent_main, [*pin, "--replace", str(joined), "--json"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.output)["clouds"] == ["cloud-1", "cloud-2"]
    shown = json.loads(
        runner.invoke(agent_main, ["federation", "show", "--config", config, "--json"]).output
    )
    assert shown["digest"] == manifest_digest(joined_manifest.manifest)


def test_config_validate_reads_the_login_files_run_reads(tmp_path: Path) -> None:
    """A password or TLS file that `run` could not load fails `config validate` (exit 3),
    every such file named, instead of passing it and failing at start-up."""
    runner = CliRunner()
    config = str(tmp_path / "agent.toml")
    assert (
        runner.invoke(
            agent_main,
            ["init", "--config", config, "--agent-id", "gw-1", "--state-dir", str(tmp_path / "s")],
        ).exit_code
        == 0
    )
    key = SigningKey.generate()
    manifest = tmp_path / "federation.json"
    manifest.write_bytes(
        encode_manifest_file(
            federation_manifest(deployment="fedgate", keys={"cloud-1": key}, spec=SPEC)
        )
    )
    pinned = runner.invoke(agent_main, ["federation", "pin", "--config", config, str(manifest)])
    assert pinned.exit_code == 0, pinned.output
    validate = ["config", "validate", "--config", config]
    assert runner.invoke(agent_main, validate).exit_code == 0
    garbage_ca = tmp_path / "ca.pem"
    garbage_ca.write_text("not a certificate\n")
    text = Path(config).read_text()
    text = text.replace('password_file = ""', f'password_file = "{tmp_path / "missing"}"', 1)
    text = text.replace('tls_ca_file = ""', f'tls_ca_file = "{garbage_ca}"', 1)
    text += (
        '\n[[opcua_source]]\nendpoint = "opc.tcp://127.0.0.1:4840"\n'
        'tags = { XMEAS_1 = "ns=2;s=XMEAS_1" }\n'
        f'password_file = "{tmp_path / "opcua-missing"}"\n'
    )
    Path(config).write_text(text)
    broken = runner.invoke(agent_main, validate)
    assert broken.exit_code == AgentExit.CONFIG, broken.output
    assert str(garbage_ca) in broken.output
    assert str(tmp_path / "opcua-missing") in broken.output
    (tmp_path / "opcua-missing").write_text("secret\n")
    still = runner.invoke(agent_main, validate)
    assert still.exit_code == AgentExit.CONFIG
    assert str(tmp_path / "opcua-missing") not in still.output


@pytest.mark.parametrize(
    ("main", "args", "message"),
    [
        (agent_main, ["nosuch", "--json"], "No such command 'nosuch'."),
        (agent_main, ["status", "--bogus", "--json"], "No such option '--bogus'."),
        (agent_main, ["config", "show", "--json", "--bogus"], "No such option '--bogus'."),
        (coordinator_main, ["rounds", "--limit", "x", "--json"], "'x' is not a valid integer"),
        (bridge_main, ["status", "--json", "--bogus"], "No such option '--bogus'."),
    ],
    ids=["agent-command", "agent-option", "agent-nested", "coordinator-value", "bridge-option"],
)
def test_a_refused_command_line_is_json_too_under_json(
    main: click.Group, args: list[str], message: str
) -> None:
    runner = CliRunner()
    refused = runner.invoke(main, args)
    assert refused.exit_code == 2
    report = json.loads(refused.stdout)
    assert message in report["error"]
    assert report["exit_code"] == 2
    assert "Usage:" in refused.stderr  # click's own text stays where it was
    without = runner.invoke(main, [arg for arg in args if arg != "--json"])
    assert (without.exit_code, without.stdout) == (2, "")
    # --json after "--" is an argument, not the option: no JSON.
    assert runner.invoke(main, ["nosuch", "--", "--json"]).stdout == ""


def test_a_coordinator_config_with_several_problems_lists_each_in_json(tmp_path: Path) -> None:
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path / "c")]
    assert runner.invoke(coordinator_main, [*state, "init", "--cloud", "c1"]).exit_code == 0
    config = tmp_path / "c" / "coordinator.toml"
    text = config.read_text()
    for key in ("min_participants", "update_timeout_s"):
        start = text.index(f"\n{key} = ") + 1
        text = text[:start] + f"{key} = -1" + text[text.index("\n", start) :]
    config.write_text(text)
    refused = runner.invoke(coordinator_main, [*state, "status", "--json"])
    assert refused.exit_code == CoordinatorExit.CONFIG
    report = json.loads(refused.stdout)
    assert report["problems"] == [
        "rounds.min_participants must be at least 1",
        "rounds.update_timeout_s must be in (0, 86400]",
    ]
    assert all(problem in report["error"] for problem in report["problems"])
    assert refused.stderr.count("error:") == 1  # the message already says both


def test_a_host_name_that_is_no_agent_id_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "line_3#a.plant.example")
    config = tmp_path / "agent.toml"
    refused = CliRunner().invoke(
        agent_main, ["init", "--config", str(config), "--state-dir", str(tmp_path / "s")]
    )
    assert refused.exit_code == AgentExit.CONFIG
    assert "invalid agent id 'line_3#a'" in refused.stderr
    assert "(the host name: pass --agent-id)" in refused.stderr
    assert not config.exists()
