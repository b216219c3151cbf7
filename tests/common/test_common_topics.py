"""MQTT topics: builders, parsing, and refusal of anything that could widen a subscription."""

from __future__ import annotations

import pytest
from fedgate_common.errors import InvalidIdentifier, MalformedMessage
from fedgate_common.messages import STAGES
from fedgate_common.topics import (
    RoundTopic,
    agent_inbound_filter,
    cloud_prefix,
    coordinator_broadcast_filter,
    model_topic,
    parse_round_topic,
    round_topic,
)
from hypothesis import given
from hypothesis import strategies as st

IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
ROUNDS = st.integers(min_value=0, max_value=10**18 - 1)


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching for ``+`` and a trailing ``#`` (MQTT 3.1.1 §4.7)."""
    want, have = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(want):
        if level == "#":
            return True
        if index >= len(have) or level not in ("+", have[index]):
            return False
    return len(want) == len(have)


def test_builders() -> None:
    assert cloud_prefix("plant-1", "line-a") == "fedgate/plant-1/line-a"
    assert round_topic("plant-1", "line-a", 3, "start") == "fedgate/plant-1/line-a/round/3/start"
    assert (
        round_topic("plant-1", "line-a", 12, "update", "agent-07")
        == "fedgate/plant-1/line-a/round/12/update/agent-07"
    )
    assert model_topic("plant-1", "line-a") == "fedgate/plant-1/line-a/model"
    assert agent_inbound_filter("plant-1", "line-a") == "fedgate/plant-1/line-a/round/+/+/+"
    assert coordinator_broadcast_filter("plant-1", "line-a") == "fedgate/plant-1/line-a/round/+/+"


def test_parse_examples() -> None:
    assert parse_round_topic("fedgate/plant-1/line-a/round/0/end") == RoundTopic(
        deployment="plant-1", cloud="line-a", round=0, stage="end"
    )
    assert parse_round_topic("fedgate/d/c/round/999999999999999999/update/a.b_c-1") == RoundTopic(
        deployment="d", cloud="c", round=10**18 - 1, stage="update", agent="a.b_c-1"
    )


@given(IDS, IDS, ROUNDS, st.sampled_from(sorted(STAGES)), st.none() | IDS)
def test_build_parse_round_trip(
    deployment: str, cloud: str, number: int, stage: str, agent: str | None
) -> None:
    topic = round_topic(deployment, cloud, number, stage, agent)
    assert parse_round_topic(topic) == RoundTopic(
        deployment=deployment, cloud=cloud, round=number, stage=stage, agent=agent
    )
    # The coordinator hears agents' messages, agents hear the coordinator's, never crossed.
    assert _matches(agent_inbound_filter(deployment, cloud), topic) == (agent is not None)
    assert _matches(coordinator_broadcast_filter(deployment, cloud), topic) == (agent is None)
    assert not _matches(agent_inbound_filter(deployment, cloud), model_topic(deployment, cloud))


def test_filters_do_not_reach_another_cloud() -> None:
    other = round_topic("plant-1", "line-b", 1, "update", "agent-07")
    assert not _matches(agent_inbound_filter("plant-1", "line-a"), other)
    assert not _matches(coordinator_broadcast_filter("plant-1", "line-a"), other)


BAD_IDS = ["", "+", "#", "a/b", "a+b", "a#", " a", "a b", "ä", "-a", "a" * 65, "a\n"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_builders_refuse_unsafe_ids(bad: str) -> None:
    with pytest.raises(InvalidIdentifier, match="deployment"):
        round_topic(bad, "c", 1, "start")
    with pytest.raises(InvalidIdentifier, match="cloud"):
        round_topic("d", bad, 1, "start")
    with pytest.raises(InvalidIdentifier, match="agent id"):
        round_topic("d", "c", 1, "update", bad)
    for build in (model_topic, agent_inbound_filter, coordinator_broadcast_filter, cloud_prefix):
        with pytest.raises(InvalidIdentifier):
            build(bad, "c")
        with pytest.raises(InvalidIdentifier):
            build("d", bad)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "fedgate",
        "fedgate/d/c/model",
        "fedgate/d/c/round/1",  # too few levels
        "fedgate/d/c/round/1/update/a/extra",  # too many levels
        "fedgate/d/c/round/1/update/a/",
        "/fedgate/d/c/round/1/start",
        "fedgate2/d/c/round/1/start",
        "Fedgate/d/c/round/1/start",
        "fedgate/d/c/rounds/1/start",
        "fedgate/d/c/Round/1/start",
        "fedgate/d/c/round//start",
        "fedgate/d/c/round/x/start",
        "fedgate/d/c/round/-1/start",
        "fedgate/d/c/round/+1/start",
        "fedgate/d/c/round/1.0/start",
        "fedgate/d/c/round/1e3/start",
        "fedgate/d/c/round/ 1/start",
        "fedgate/d/c/round/0x10/start",
        "fedgate/d/c/round/1_000/start",
        "fedgate/d/c/round/+/start",
        "fedgate/d/c/round/²/start",  # str.isdigit() is True, int() fails
        "fedgate/d/c/round/١٢/start",  # Arabic-Indic digits: int() would give 12
        "fedgate/d/c/round/1234567890123456789/start",  # 19 digits
        "fedgate/d/c/round/1/begin",
        "fedgate/d/c/round/1/START",
        "fedgate/d/c/round/1/+",
        "fedgate/d/c/round/1/#",
        "fedgate/d/c/round/1/",
        "fedgate/+/c/round/1/start",
        "fedgate/d/#/round/1/start",
        "fedgate//c/round/1/start",
        "fedgate/d/c/round/1/update/+",
        "fedgate/d/c/round/1/update/#",
        "fedgate/d/c/round/1/update/ä",
        "fedgate/d/c/round/1/update/ a",
        "fedgate/d/c/round/1/update/" + "a" * 65,
    ],
)
def test_malformed_topics(topic: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_round_topic(topic)
    assert info.value.kind == "malformed"


@given(st.text(max_size=80))
def test_arbitrary_text_is_parsed_or_malformed(topic: str) -> None:
    try:
        parsed = parse_round_topic(topic)
    except MalformedMessage:
        return
    rebuilt = round_topic(parsed.deployment, parsed.cloud, parsed.round, parsed.stage, parsed.agent)
    assert parse_round_topic(rebuilt) == parsed


DIGIT_LIKE = st.characters(categories=("Nd", "No"))  # '7', '²', '١', '٣', ...


@given(
    st.text(max_size=20) | st.text(DIGIT_LIKE, max_size=4),
    st.sampled_from(sorted(STAGES)) | st.text(max_size=10),
)
def test_arbitrary_round_and_stage_levels_are_parsed_or_malformed(number: str, stage: str) -> None:
    topic = f"fedgate/d/c/round/{number}/{stage}"
    try:
        parsed = parse_round_topic(topic)
    except MalformedMessage:
        return
    assert number.isascii()
    assert number.isdigit()
    assert parsed.round == int(number)
    assert parsed.stage == stage
    assert stage in STAGES
