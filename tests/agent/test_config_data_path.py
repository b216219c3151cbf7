"""Agent configuration of the data path: [ingest], [windows], [[mqtt_source]], [[opcua_source]]."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedgate_agent.config import load_config, set_config_value, write_config
from fedgate_agent.errors import ConfigError
from fedgate_agent.ingest.errors import SourceError
from fedgate_agent.ingest.opcua_source import OpcUaIngestSettings, OpcUaNode

BASE = """
agent_id = "site-1"
deployment = "plant-a"
cloud = "cloud-1"
state_dir = "/srv/agent"
"""

LIVE = (
    BASE
    + """
[training]
source = "buffer"

[windows]
tags = ["XMEAS_1", "XMEAS_2"]
period_s = 3.0
label_tag = "FAULT"

[[mqtt_source]]
topic = "plant/site-1/+/+"

[[mqtt_source]]
topic = "spBv1.0/plant/DDATA/+/+"
format = "sparkplug"

[[opcua_source]]
endpoint = "opc.tcp://127.0.0.1:4840"
tags = { XMEAS_1 = "ns=2;s=XMEAS_1" }
"""
)


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=env or {}, require_complete=False)


def test_sources_and_windows_load_and_survive_a_rewrite(tmp_path: Path) -> None:
    config = load(tmp_path, LIVE)
    assert config.training.source == "buffer"
    assert config.windows.tags == ("XMEAS_1", "XMEAS_2")
    assert [s.format for s in config.mqtt_source] == ["json", "sparkplug"]
    assert config.opcua_source[0].tags == {"XMEAS_1": "ns=2;s=XMEAS_1"}
    assert config.buffer_path == Path("/srv/agent/ingest/buffer.db")
    write_config(tmp_path / "agent.toml", config)
    assert load_config(tmp_path / "agent.toml", env={}, require_complete=False) == config


def test_list_keys_take_comma_separated_environment_values(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        BASE,
        env={"FEDGATE_WINDOWS_TAGS": "A, B,C", "FEDGATE_WINDOWS_LABEL_BINS": "0.5,1.5"},
    )
    assert config.windows.tags == ("A", "B", "C")
    assert config.windows.label_bins == (0.5, 1.5)
    with pytest.raises(ConfigError, match="FEDGATE_WINDOWS_LABEL_BINS"):
        load(tmp_path, BASE, env={"FEDGATE_WINDOWS_LABEL_BINS": "1,x"})


def test_config_set_writes_a_list_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE, encoding="utf-8")
    config = set_config_value(path, "windows.tags", "T1,T2")
    assert config.windows.tags == ("T1", "T2")
    assert '"T2"' in path.read_text(encoding="utf-8")


def test_every_data_path_problem_is_listed_at_once(tmp_path: Path) -> None:
    bad = (
        BASE
        + """
[training]
source = "stream"

[ingest]
cap_policy = "drop_newest"
max_samples = 5

[windows]
label_mode = "next_value"
label_bins = [2.0, 1.0]
test_fraction = 0.95

[[mqtt_source]]
topic = "plant/#/x"
format = "xml"

[[opcua_source]]
endpoint = "http://h"
tags = {}
"""
    )
    with pytest.raises(ConfigError) as error:
        load(tmp_path, bad)
    text = "\n".join(error.value.problems)
    for needle in (
        "training.source",
        "ingest.cap_policy",
        "ingest.max_samples",
        "windows.label_bins",
        "windows.test_fraction",
        "is not a filter",
        "is not json | sparkplug",
        "is not opc.tcp://",
        "tags is empty",
    ):
        assert needle in text, needle


@pytest.mark.parametrize(
    ("first", "second"),
    [("ns=2;i=5", "ns=2;i=05"), ("i=85", "ns=0;i=85"), ("ns=2;s=A", "ns=02;s=A")],
)
def test_one_node_spelled_two_ways_is_refused(tmp_path: Path, first: str, second: str) -> None:
    """Both spellings used to pass, then every OPC-UA session failed after subscribing
    and the source reconnected for ever, the other nodes with it."""
    text = LIVE.replace(
        'tags = { XMEAS_1 = "ns=2;s=XMEAS_1" }',
        f'tags = {{ XMEAS_1 = "{first}", XMEAS_2 = "{second}", XMEAS_3 = "ns=2;i=6" }}',
    )
    with pytest.raises(ConfigError, match="tags 'XMEAS_1' and 'XMEAS_2' name the same node"):
        load(tmp_path, text)
    assert load(tmp_path, text.replace(second, "ns=3;i=5")).opcua_source[0].tags  # distinct


def test_opcua_settings_refuse_one_node_spelled_two_ways() -> None:
    nodes = (OpcUaNode("ns=2;i=5", "a"), OpcUaNode("ns=2;i=05", "b"))
    with pytest.raises(SourceError, match="a node is listed twice"):
        OpcUaIngestSettings(endpoint="opc.tcp://127.0.0.1:4840", nodes=nodes)


def test_a_source_entry_with_an_unknown_key_names_the_entry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[\[mqtt_source\]\] number 1"):
        load(tmp_path, BASE + '\n[[mqtt_source]]\ntopic = "a/b"\nqos = 2\n')
    with pytest.raises(ConfigError, match="array of tables"):
        load(tmp_path, BASE + '\nmqtt_source = "a/b"\n')


def test_plant_data_from_a_locked_down_cloud_broker_is_refused(tmp_path: Path) -> None:
    locked = '\n[broker]\ntls_ca_file = "/etc/fedgate/ca.crt"\ntls_cert_file = "/c.crt"\n'
    locked += 'tls_key_file = "/c.key"\n'
    with pytest.raises(ConfigError, match=r"set ingest\.mqtt_host to the site.s plant-data broker"):
        load(tmp_path, LIVE.replace("[training]", locked + "\n[training]"))
    site = LIVE.replace("[training]", locked + '\n[ingest]\nmqtt_host = "10.0.0.5"\n\n[training]')
    assert load(tmp_path, site).ingest.mqtt_host == "10.0.0.5"


def test_plant_data_hosts_the_resolver_cannot_encode_are_refused(tmp_path: Path) -> None:
    """The plant-data broker and an OPC-UA server's host are checked as broker.host is: a
    name IDNA cannot encode would otherwise fail only when the agent connects."""
    bad = LIVE.replace("opc.tcp://127.0.0.1:4840", "opc.tcp://a..b:4840").replace(
        "[training]", '[ingest]\nmqtt_host = "plant..broker"\n\n[training]'
    )
    with pytest.raises(ConfigError) as error:
        load(tmp_path, bad)
    problems = error.value.problems
    assert len(problems) == 2, problems
    assert "ingest.mqtt_host = 'plant..broker' is not a host name" in problems[0]
    assert "endpoint 'opc.tcp://a..b:4840' has a bad host" in problems[1]
    assert all("label empty or too long" in problem for problem in problems)
    ipv6 = LIVE.replace("opc.tcp://127.0.0.1:4840", "opc.tcp://[::1]:4840")
    assert load(tmp_path, ipv6).opcua_source[0].endpoint == "opc.tcp://[::1]:4840"
