"""plant_broker (the site broker's files, no IO) and ``fedgate-bridge plant-broker-config``.
The files on a real Mosquitto: tests/integration/test_plant_broker_config.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fedgate_bridge.cli import main
from fedgate_bridge.plant_broker import (
    BridgeUser,
    Listener,
    PlantBrokerPlan,
    agent_acl,
    bridge_acl,
    mosquitto_conf,
    parse_listener,
    plan_problems,
)

AGENT = Listener("127.0.0.1", 1883)
BRIDGES = Listener("10.1.0.5", 1884)


def plan(*bridges: tuple[str, str], **options: object) -> PlantBrokerPlan:
    return PlantBrokerPlan(
        bridges=tuple(BridgeUser(user, prefix) for user, prefix in bridges),
        agent_listener=options.pop("agent_listener", AGENT),  # type: ignore[arg-type]
        bridge_listener=options.pop("bridge_listener", BRIDGES),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1883", Listener("127.0.0.1", 1883)),
        ("[::1]:1884", Listener("::1", 1884)),
        ("0.0.0.0:8883", Listener("0.0.0.0", 8883)),
    ],
)
def test_a_listener_is_an_ip_address_and_a_port(text: str, expected: Listener) -> None:
    assert parse_listener(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("127.0.0.1", "is not ADDRESS:PORT"),
        ("gateway.local:1883", "is not an IP address"),
        ("127.0.0.1:0", "is not 1-65535"),
        ("127.0.0.1:70000", "is not 1-65535"),
    ],
)
def test_a_listener_that_mosquitto_could_not_bind_is_refused(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_listener(text)


def test_a_sound_plan_has_no_problems_and_renders_each_bridge_its_own_prefix() -> None:
    sound = plan(("bridge-line-3", "plant/line-3"), ("bridge-line-4", "plant/line-4"))
    assert plan_problems(sound) == []
    assert "topic write plant/line-3/#" in bridge_acl(sound)
    assert bridge_acl(sound).index("user bridge-line-4") < bridge_acl(sound).index(
        "topic write plant/line-4/#"
    )
    # Anonymous read rules: before any user line, and no write rule at all.
    assert "user" not in agent_acl(sound).replace("# written by", "")
    assert "write" not in agent_acl(sound)
    assert "topic read plant/line-4/#" in agent_acl(sound)
    conf = mosquitto_conf(sound)
    assert conf.count("listener ") == 2
    assert "listener 1883 127.0.0.1\nallow_anonymous true" in conf
    assert "listener 1884 10.1.0.5\nallow_anonymous false" in conf
    assert "max_queued_messages 0" in conf


def test_with_an_agent_user_the_agent_listener_needs_a_login() -> None:
    named = plan(("bridge-line-3", "plant/line-3"), agent_user="agent-site-1")
    assert plan_problems(named) == []
    assert "listener 1883 127.0.0.1\nallow_anonymous false\npassword_file" in mosquitto_conf(named)
    assert "user agent-site-1\ntopic read plant/line-3/#" in agent_acl(named)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (plan(), "no bridge"),
        (plan(("a", "plant"), ("b", "plant/x")), "overlap"),
        (plan(("a", "plant/x"), ("b", "plant/x")), "overlap"),
        (plan(("a", "plant/x"), ("a", "plant/y")), "user 'a' is given twice"),
        (plan(("a", "plant/x"), agent_user="a"), "user 'a' is given twice"),
        (plan(("bridge 1", "plant/x")), "invalid user name 'bridge 1'"),
        (plan(("a", "plant/+/x")), "topic prefix 'plant/+/x'"),
        (plan(("a", "plant//x")), "topic prefix 'plant//x'"),
        (plan(("a", "plant/x"), bridge_listener=AGENT), "must not share"),
        (
            plan(("a", "plant/x"), bridge_listener=Listener("0.0.0.0", 1883)),
            "must not share",
        ),
        (plan(("a", "plant/x"), bridge_listener=Listener("::", 1883)), "must not share"),
        (plan(("a", "plant/x"), etc_dir=Path("etc")), "must be an absolute path"),
    ],
)
def test_unsafe_or_unstartable_plans_are_refused(bad: PlantBrokerPlan, needle: str) -> None:
    assert any(needle in problem for problem in plan_problems(bad)), plan_problems(bad)


def test_prefixes_that_only_share_leading_characters_do_not_overlap() -> None:
    assert plan_problems(plan(("a", "plant/line-3"), ("b", "plant/line-30"))) == []


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["plant-broker-config", *args])
    return result.exit_code, result.output


def test_the_command_reads_bridges_from_their_config_and_is_idempotent(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('topic_prefix = "plant/line-3"\n[broker]\nusername = "bridge-line-3"\n')
    out = tmp_path / "broker"
    args = ["--out", str(out), "--config", str(config), "--bridge-listener", "10.1.0.5:1884"]
    code, output = invoke(*args)
    assert code == 0, output
    assert "topic write plant/line-3/#" in (out / "plant-bridges.acl").read_text()
    assert "mosquitto_passwd -c /etc/mosquitto/plant.passwd bridge-line-3" in output
    code, output = invoke(*args, "--json")
    assert code == 0
    result = json.loads(output)
    assert result["written"] == []
    assert len(result["unchanged"]) == 3
    assert result["bridges"] == [{"user": "bridge-line-3", "topic_prefix": "plant/line-3"}]


def test_a_file_edited_by_hand_is_kept_unless_force(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--bridge", "b=plant/x", "--bridge-listener", "10.1.0.5:1884"]
    assert invoke(*args)[0] == 0
    acl = tmp_path / "plant-bridges.acl"
    acl.write_text("user b\ntopic write #\n")
    code, output = invoke(*args)
    assert code == 5
    assert "--force" in output
    assert acl.read_text() == "user b\ntopic write #\n"
    assert invoke(*args, "--force")[0] == 0
    assert "topic write plant/x/#" in acl.read_text()


@pytest.mark.parametrize(
    ("config_text", "args", "code", "needle"),
    [
        ('topic_prefix = "plant/x"\n', [], 3, "broker.username is empty"),
        ('[broker]\nusername = "b"\n', [], 3, "topic_prefix is missing"),
        ("not toml [", [], 3, "cannot read bridge config"),
        (None, ["--bridge", "b"], 2, "is not USER=PREFIX"),
        (None, ["--bridge", "b=plant/x", "--agent-listener", "localhost:1883"], 2, "IP address"),
        (None, ["--bridge", "a=plant", "--bridge", "b=plant/x"], 2, "overlap"),
    ],
)
def test_bad_input_writes_nothing_and_exits_with_its_code(
    tmp_path: Path, config_text: str | None, args: list[str], code: int, needle: str
) -> None:
    if config_text is not None:
        (tmp_path / "bridge.toml").write_text(config_text)
        args = [*args, "--config", str(tmp_path / "bridge.toml")]
    out = tmp_path / "broker"
    exit_code, output = invoke("--out", str(out), "--bridge-listener", "10.1.0.5:1884", *args)
    assert (exit_code, needle in output) == (code, True), output
    assert not out.exists()


def test_dry_run_prints_the_files_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    code, output = invoke(
        "--out",
        str(out),
        "--bridge",
        "b=plant/x",
        "--bridge-listener",
        "10.1.0.5:1884",
        "--dry-run",
    )
    assert code == 0
    assert "# ---- plant-bridges.acl" in output
    assert "topic write plant/x/#" in output
    assert not out.exists()
