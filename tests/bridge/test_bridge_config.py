"""Bridge configuration: every problem listed at once, exit code 3, no network IO."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from fedgate_bridge.config import client_id_of, load_config
from fedgate_bridge.errors import ConfigError
from fedgate_bridge.run_cli import ExitCode, check, run, status

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"

BAD_CONFIG = """
state_dir = "relative/state"
topic_prefix = "plant/+/x"
log_level = "loud"
colour = "blue"

[broker]
host = "mqtt://broker:1883"
port = 70000
keepalive_s = "30"
password_file = "/nonexistent/password"
max_inflght = 5
ack_timeout_s = 0
protocol = "3"

[outbox]
max_messages = 0
policy = "keep_everything"

[[modbus]]
name = "plc/1"
transport = "serial"
unit = 300
poll_interval_s = 0.0
timeout_s = 120.0

  [[modbus.registers]]
  tag = "A"
  address = 65534
  type = "float64"
  word_order = "middle"

  [[modbus.registers]]
  tag = "A"
  address = 1
  kind = "coil"
  type = "float32"
  scale = 0.0

  [[modbus.registers]]
  address = 2
  kind = "register"

[[modbus]]
name = "rtu-1"
transport = "rtu"
parity = "X"
stopbits = 3
bytesize = 9
baudrate = 12

[[opcua]]
name = "rtu-1"
endpoint = "http://server:4840"
mode = "push"

  [[opcua.nodes]]
  tag = "N 1"
  node_id = "ns=x;i=3"

  [[opcua.nodes]]
  tag = "N2"
  node_id = "i=85"

  [[opcua.nodes]]
  tag = "N3"
  node_id = "ns=0;i=85"
"""

EXPECTED_FRAGMENTS = [
    "state_dir = 'relative/state' is not an absolute directory path",
    "topic_prefix = 'plant/+/x' is not MQTT topic levels",
    "log_level = 'loud' is not debug | info | warning | error",
    "unknown key 'colour'",
    "broker.host = 'mqtt://broker:1883' is not a host name or IP address",
    "broker.port = 70000 is not an integer 1..65535",
    "broker.keepalive_s = string '30' has the wrong type; use an integer 5..65535",
    "broker.password_file = '/nonexistent/password': the file cannot be read",
    "unknown key 'broker.max_inflght'; did you mean 'max_inflight'?",
    "broker.ack_timeout_s = 0 is not an integer 1..3600 (seconds)",
    "broker.protocol = '3' is not '5' or '3.1.1'",
    "outbox.max_messages = 0 is not an integer 1..100000000",
    "outbox.policy = 'keep_everything' is not drop_oldest | reject_new",
    "modbus[0].name = 'plc/1' is not 1-64 characters",
    "modbus[0].transport = 'serial' (source 'plc/1') is not tcp | rtu | rtu-over-tcp",
    "modbus[0].unit = 300 (source 'plc/1') is not a Modbus device id 0..255",
    "modbus[0].poll_interval_s = 0.0 (source 'plc/1') is not a number of seconds",
    "modbus[0].timeout_s = 120.0 (source 'plc/1') is not a number of seconds in [0.01, 60]",
    "modbus[0].registers[0].address = 65534 (tag 'A') is not an integer 0..65535",
    "modbus[0].registers[0].word_order = 'middle' (tag 'A') is not big",
    "modbus[0].registers[1].tag = 'A' is used twice in this source",
    "modbus[0].registers[1].type = 'float32' (tag 'A') cannot be read from a coil",
    "modbus[0].registers[1].scale = 0.0 (tag 'A') is not a finite number other than 0",
    "missing required key 'modbus[0].registers[2].tag'",
    "modbus[1].serial_port is empty (source 'rtu-1') but transport is \"rtu\"",
    "modbus[1].parity = 'X' (source 'rtu-1') is not N | E | O",
    "modbus[1].stopbits = 3 (source 'rtu-1') is not 1 | 2",
    "modbus[1].bytesize = 9 (source 'rtu-1') is not 7 | 8",
    "modbus[1].baudrate = 12 (source 'rtu-1') is not an integer 300..4000000",
    "modbus[1] (source 'rtu-1') has no registers",
    "opcua[0].endpoint = 'http://server:4840' (source 'rtu-1') is not an OPC-UA endpoint URL",
    "opcua[0].mode = 'push' (source 'rtu-1') is not subscribe | poll",
    "opcua[0].nodes[0].tag = 'N 1' is not 1-64 characters",
    "opcua[0].nodes[0].node_id = 'ns=x;i=3' (tag 'N 1') does not parse",
    "opcua[0].nodes[2].node_id = 'ns=0;i=85' (tag 'N3') is the node of tag 'N2' already",
    "source name 'rtu-1' is used by 2 sources",
]


def test_example_in_packaging_is_valid_and_documents_the_defaults(tmp_path: Path) -> None:
    config = load_config(PACKAGING / "bridge.toml.example")
    assert config.topic_prefix == "plant/site-1"
    assert config.broker.max_inflight == 100
    assert config.outbox.policy == "drop_oldest"
    assert [s.name for s in config.modbus] == ["plc-1"]
    assert config.modbus[0].registers[0].type == "float32"
    assert config.modbus[0].registers[1].scale == pytest.approx(0.1)
    assert config.opcua[0].nodes[0].node_id == "ns=2;s=XMEAS_1"
    assert client_id_of(config) == f"fedgate-bridge-{socket.gethostname().split('.')[0]}"


def test_shape_problems_are_all_reported_first(tmp_path: Path) -> None:
    """Wrong types stop before the value checks; every shape problem is listed together."""
    path = tmp_path / "bridge.toml"
    path.write_text(BAD_CONFIG)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    shape = caught.value.problems
    assert len(shape) == 4  # colour, keepalive_s type, max_inflght, registers[2].tag
    assert any("unknown key 'colour'" in p for p in shape)
    assert any("did you mean 'max_inflight'" in p for p in shape)


def test_unknown_keys_alone_do_not_hide_the_value_problems(tmp_path: Path) -> None:
    """An unknown key is a shape problem nothing depends on: the values are checked too, and
    everything comes back in one run of `check`."""
    with_unknown_keys_only = BAD_CONFIG.replace('keepalive_s = "30"', "keepalive_s = 30").replace(
        "  address = 2\n", '  tag = "C"\n  address = 2\n'
    )
    path = tmp_path / "bridge.toml"
    path.write_text(with_unknown_keys_only)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    assert any("unknown key 'colour'" in p for p in problems)
    assert any("did you mean 'max_inflight'" in p for p in problems)
    assert any(
        "modbus[0].registers[1].scale = 0.0 (tag 'A') is not a finite" in p for p in problems
    )
    assert any("source name 'rtu-1' is used by 2 sources" in p for p in problems)


def test_every_value_problem_is_listed_with_key_and_allowed_values(tmp_path: Path) -> None:
    fixed_shape = (
        BAD_CONFIG.replace('colour = "blue"\n', "")
        .replace('keepalive_s = "30"', "keepalive_s = 30")
        .replace("max_inflght = 5\n", "")
        .replace("  address = 2\n", '  tag = "C"\n  address = 2\n')
    )
    path = tmp_path / "bridge.toml"
    path.write_text(fixed_shape)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    value_fragments = [
        f
        for f in EXPECTED_FRAGMENTS
        if "unknown key" not in f and "wrong type" not in f and "missing" not in f
    ] + ["modbus[0].registers[2].kind = 'register' (tag 'C') is not holding | input"]
    for fragment in value_fragments:
        assert any(fragment in p for p in problems), f"{fragment!r} not in {problems}"
    assert len(problems) == len(value_fragments)
    assert str(path) in str(caught.value)


def test_missing_file_missing_keys_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("topic_prefix = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    empty = tmp_path / "empty.toml"
    empty.write_text("[[modbus]]\n[[opcua]]\nname = 'x'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(empty)
    assert {p.split(";")[0] for p in caught.value.problems} == {
        "missing required key 'topic_prefix'",
        "missing required key 'modbus[0].name'",
        "missing required key 'opcua[0].endpoint'",
    }
    nothing = tmp_path / "nothing.toml"
    nothing.write_text('topic_prefix = "p"\nstate_dir = "/tmp/x"\n')
    with pytest.raises(ConfigError, match=r"no sources: add at least one \[\[modbus\]\]"):
        load_config(nothing)


def test_check_lists_every_problem_and_exits_3(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(BAD_CONFIG)
    result = CliRunner().invoke(check, ["--config", str(path)])
    assert result.exit_code == ExitCode.CONFIG
    assert int(ExitCode.CONFIG) == 3
    assert "4 problems" in result.output
    as_json = CliRunner().invoke(check, ["--config", str(path), "--json"])
    assert as_json.exit_code == 3
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert len(report["problems"]) == 4
    assert report["exit_code"] == 3
    assert "4 problems" in report["error"]
    # status reads the same config: with --json its failure is JSON too
    as_json = CliRunner().invoke(status, ["--config", str(path), "--json"])
    assert as_json.exit_code == 3
    assert json.loads(as_json.stdout)["problems"] == report["problems"]


def test_check_summarises_a_valid_config(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    shutil.copy(PACKAGING / "bridge.toml.example", path)
    result = CliRunner().invoke(check, ["--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert report["topics"] == "plant/site-1/<source>/<tag>"
    plc = report["sources"][0]
    assert (plc["name"], plc["tags"], plc["reads_per_poll"]) == ("plc-1", 3, 3)
    text = CliRunner().invoke(check, ["--config", str(path)])
    assert text.exit_code == 0
    assert "configuration OK: 2 sources, 4 tags" in text.output


def test_run_with_a_bad_config_exits_3_before_any_network_io(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    path = tmp_path / "bridge.toml"
    path.write_text(
        f'state_dir = "{tmp_path}/state"\ntopic_prefix = "p"\n[broker]\nport = {port}\n'
        f'[[modbus]]\nname = "plc"\nport = {port}\n'
        '[[modbus.registers]]\ntag = "A"\naddress = 0\ntype = "float16"\n'
    )
    try:
        result = CliRunner().invoke(run, ["--config", str(path)])
        assert result.exit_code == 3
        assert "modbus[0].registers[0].type = 'float16' (tag 'A') is not int16 | uint16" in (
            result.output
        )
        with pytest.raises(BlockingIOError):
            listener.accept()  # neither the broker nor the device port was contacted
        assert not (tmp_path / "state").exists()  # nor was the outbox created
    finally:
        listener.close()


def test_two_sources_on_one_serial_line_are_refused(tmp_path: Path) -> None:
    def rtu(name: str, unit: int) -> str:
        return (
            f'[[modbus]]\nname = "{name}"\ntransport = "rtu"\nserial_port = "/dev/ttyUSB0"\n'
            f'unit = {unit}\n[[modbus.registers]]\ntag = "T{unit}"\naddress = 0\n'
        )

    path = tmp_path / "bridge.toml"
    path.write_text(
        f'state_dir = "{tmp_path}"\ntopic_prefix = "plant/a"\n' + rtu("a", 1) + rtu("b", 2)
    )
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert any("/dev/ttyUSB0" in problem for problem in error.value.problems)


def test_hosts_the_resolver_cannot_encode_are_refused_by_check(tmp_path: Path) -> None:
    """A broker, Modbus or OPC-UA host that IDNA cannot encode (an empty label, a label of
    64 characters) is a config problem (exit 3), not a traceback once `run` connects."""
    long_label = "p" * 64
    path = tmp_path / "bridge.toml"
    path.write_text(
        f'state_dir = "{tmp_path}/state"\ntopic_prefix = "plant/a"\n'
        '[broker]\nhost = "a..b"\n'
        f'[[modbus]]\nname = "plc"\nhost = "{long_label}.example"\n'
        '[[modbus.registers]]\ntag = "A"\naddress = 0\n'
        '[[opcua]]\nname = "sim"\nendpoint = "opc.tcp://.server:4840"\n'
        '[[opcua.nodes]]\ntag = "X"\nnode_id = "ns=2;s=X"\n'
    )
    result = CliRunner().invoke(check, ["--config", str(path), "--json"])
    assert result.exit_code == ExitCode.CONFIG, result.output
    problems = json.loads(result.stdout)["problems"]
    assert len(problems) == 3, problems
    assert problems[0].startswith("broker.host = 'a..b' is not a host name or IP address")
    assert problems[1].startswith(f"modbus[0].host = '{long_label}.example' (source 'plc')")
    assert problems[2].startswith("opcua[0].endpoint = 'opc.tcp://.server:4840' (source 'sim')")
    assert all("each label between dots needs 1 to 63 characters" in p for p in problems)
    for host in ("::1", "localhost", "broker.example"):
        path.write_text(
            f'state_dir = "{tmp_path}/state"\ntopic_prefix = "plant/a"\n[broker]\n'
            f'host = "{host}"\n[[modbus]]\nname = "plc"\nhost = "{host}"\n'
            '[[modbus.registers]]\ntag = "A"\naddress = 0\n'
        )
        assert load_config(path).broker.host == host


def test_names_and_prefixes_the_broker_would_refuse_are_problems(tmp_path: Path) -> None:
    """A tag ending in a newline (the name pattern's $ let it through), a prefix with a
    control character or on the broker's own $ topics, a client id or user name with a
    control character: each passed `check` and then made Mosquitto drop the connection at
    the first PUBLISH, over and over, with the outbox growing behind the bad row."""
    path = tmp_path / "bridge.toml"
    path.write_text(
        f'state_dir = "{tmp_path}/state"\ntopic_prefix = "$plant/a\\u0001"\n'
        '[broker]\nhost = "127.0.0.1"\nclient_id = "bridge\\u0007"\nusername = "u\\u0000"\n'
        '[[modbus]]\nname = "plc"\nhost = "127.0.0.1"\n'
        '[[modbus.registers]]\ntag = "TEMP\\n"\naddress = 0\n'
    )
    result = CliRunner().invoke(check, ["--config", str(path), "--json"])
    assert result.exit_code == ExitCode.CONFIG, result.output
    problems = json.loads(result.stdout)["problems"]
    assert [p.split(" = ")[0] for p in problems] == [
        "topic_prefix",
        "broker.client_id",
        "broker.username",
        "modbus[0].registers[0].tag",
    ], problems
