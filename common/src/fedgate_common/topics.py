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


FEDERATION = "federation"  # reserved: no cloud may take this id


def cloud_prefix(deployment: str, cloud: str) -> str:
    validate_identifier(deployment, what="deployment")
    validate_identifier(cloud, what="cloud")
    if cloud == FEDERATION:
        raise InvalidIdentifier(f"cloud id {FEDERATION!r} is reserved for federation topics")
    return f"{ROOT}/{deployment}/{cloud}"


def federation_prefix(deployment: str, cloud: str) -> str:
    """``fedgate/<deployment>/federation/<cloud>``: where ``cloud``'s coordinator publishes
    to its peers (on its own broker; peers subscribe there)."""
    validate_identifier(deployment, what="deployment")
    validate_identifier(cloud, what="cloud")
    return f"{ROOT}/{deployment}/{FEDERATION}/{cloud}"


def federation_topic(deployment: str, cloud: str, stage: str, height: int | None = None) -> str:
    """``…/federation/<cloud>/<stage>`` (aggregate, proposal, vote) or ``…/model/<height>``."""
    topic = f"{federation_prefix(deployment, cloud)}/{stage}"
    return topic if height is None else f"{topic}/{height}"


def federation_filter(deployment: str, cloud: str) -> str:
    """What a coordinator subscribes to on a peer's broker."""
    return f"{federation_prefix(deployment, cloud)}/#"


def parse_federation_topic(topic: str) -> tuple[str, str, str]:
    """``(deployment, cloud, stage)`` of a federation topic; MalformedMessage otherwise."""
    parts = topic.split("/")
    if len(parts) not in (5, 6) or parts[0] != ROOT or parts[2] != FEDERATION:
        raise MalformedMessage(f"not a federation topic: {topic!r}")
    if parts[4] not in ("aggregate", "proposal", "vote", "model"):
        raise MalformedMessage(f"unknown federation stage in topic {topic!r}")
    if len(parts) == 6 and not (parts[4] == "model" and parts[5].isascii() and parts[5].isdigit()):
        raise MalformedMessage(f"bad federation topic {topic!r}")
    try:
        validate_identifier(parts[1])
        validate_identifier(parts[3])
    except ValueError as exc:
        raise MalformedMessage(str(exc)) from None
    return parts[1], parts[3], parts[4]


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
