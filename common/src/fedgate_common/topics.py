"""MQTT topic names (DESIGN.md §3).

``fedgate/<deployment>/<cloud>/round/<r>/<stage>``          coordinator → agents
``fedgate/<deployment>/<cloud>/round/<r>/<stage>/<agent>``  agent → coordinator, and
                                                            coordinator → one agent
                                                            (stage ``deliver`` only)
``fedgate/<deployment>/<cloud>/model``                      latest global model (retained)
"""

from __future__ import annotations

import msgspec

from fedgate_common.errors import InvalidIdentifier, MalformedMessage
from fedgate_common.identifiers import validate_identifier
from fedgate_common.messages import STAGES

ROOT = "fedgate"


class RoundTopic(msgspec.Struct, frozen=True, kw_only=True):
    deployment: str
    cloud: str
    round: int
    stage: str
    agent: str | None = None


def cloud_prefix(deployment: str, cloud: str) -> str:
    validate_identifier(deployment, what="deployment")
    validate_identifier(cloud, what="cloud")
    return f"{ROOT}/{deployment}/{cloud}"


def round_topic(
    deployment: str, cloud: str, round: int, stage: str, agent: str | None = None
) -> str:
    if stage not in STAGES or isinstance(round, bool) or round < 0:
        raise InvalidIdentifier(f"no round topic for stage {stage!r} and round {round!r}")
    topic = f"{cloud_prefix(deployment, cloud)}/round/{round}/{stage}"
    if agent is not None:
        topic += "/" + validate_identifier(agent, what="agent id")
    return topic


def model_topic(deployment: str, cloud: str) -> str:
    return f"{cloud_prefix(deployment, cloud)}/model"


def agent_inbound_filter(deployment: str, cloud: str) -> str:
    """What a coordinator subscribes to: every agent's per-round messages."""
    return f"{cloud_prefix(deployment, cloud)}/round/+/+/+"


def coordinator_broadcast_filter(deployment: str, cloud: str) -> str:
    """What an agent subscribes to for round announcements."""
    return f"{cloud_prefix(deployment, cloud)}/round/+/+"


def coordinator_direct_filter(deployment: str, cloud: str, agent: str) -> str:
    """What an agent subscribes to for messages addressed to it alone (share deliveries)."""
    return f"{cloud_prefix(deployment, cloud)}/round/+/deliver/{validate_identifier(agent)}"


def parse_round_topic(topic: str) -> RoundTopic:
    """Parse a round topic; raise :class:`MalformedMessage` for anything else."""
    parts = topic.split("/")
    if len(parts) not in (6, 7) or parts[0] != ROOT or parts[3] != "round":
        raise MalformedMessage(f"not a round topic: {topic!r}")
    # isascii: str.isdigit() also accepts '²' (int() fails) and '١٢' (int() gives 12).
    if not (parts[4].isascii() and parts[4].isdigit()) or len(parts[4]) > 18:
        raise MalformedMessage(f"bad round number in topic {topic!r}")
    if parts[5] not in STAGES:
        raise MalformedMessage(f"unknown stage in topic {topic!r}")
    try:
        for part in [parts[1], parts[2], *parts[6:]]:
            validate_identifier(part)
    except ValueError as exc:
        raise MalformedMessage(str(exc)) from None
    return RoundTopic(
        deployment=parts[1],
        cloud=parts[2],
        round=int(parts[4]),
        stage=parts[5],
        agent=parts[6] if len(parts) == 7 else None,
    )
