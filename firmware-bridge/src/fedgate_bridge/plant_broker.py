"""The site's plant-data broker: Mosquitto configuration and ACLs for bridges and the agent.

No IO: :func:`plan_problems` checks a :class:`PlantBrokerPlan`, and :func:`mosquitto_conf`,
:func:`agent_acl` and :func:`bridge_acl` render its three files (``plant_broker_cli``
writes them). The layout is security.md section 8.5 and operations.md section 16.4:

- one listener for the agent (loopback by default), anonymous or one user, that may read
  the bridges' prefixes and write nothing;
- one listener for the bridges (the plant network), users only, each of which may write its
  own ``<topic_prefix>/#`` and read nothing;
- ``max_queued_messages 0`` and persistence, so that what an absent agent has not taken is
  neither dropped nor lost in a broker restart.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

from fedgate_common.errors import InvalidIdentifier
from fedgate_common.identifiers import validate_identifier

from fedgate_bridge.config import bad_topic_prefix

__all__ = [
    "AGENT_ACL_NAME",
    "BRIDGE_ACL_NAME",
    "CONF_NAME",
    "PASSWD_NAME",
    "BridgeUser",
    "Listener",
    "PlantBrokerPlan",
    "agent_acl",
    "bridge_acl",
    "mosquitto_conf",
    "parse_listener",
    "plan_problems",
]

CONF_NAME = "fedgate-plant.conf"  # for /etc/mosquitto/conf.d/
AGENT_ACL_NAME = "plant-agent.acl"
BRIDGE_ACL_NAME = "plant-bridges.acl"
ETC_DIR: Final = PurePosixPath("/etc/mosquitto")
PERSISTENCE_DIR: Final = PurePosixPath("/var/lib/mosquitto")
AUTOSAVE_INTERVAL_S: Final = 60  # seconds between saves of the queues (Mosquitto: 1800)
PASSWD_NAME = "plant.passwd"  # noqa: S105 (a file name; mosquitto_passwd writes it, not fedgate)


@dataclass(frozen=True)
class Listener:
    """Where a Mosquitto listener binds: an IP address and a port."""

    address: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class BridgeUser:
    """A bridge's login at the broker and the topic prefix it publishes under."""

    username: str
    topic_prefix: str


@dataclass(frozen=True)
class PlantBrokerPlan:
    """What the generated configuration says.

    ``agent_user`` empty: the agent listener admits anonymous clients (keep it on loopback
    then). ``etc_dir`` is where the ACLs and the password file are installed (the paths
    written into the configuration), ``persistence_dir`` Mosquitto's state directory.
    """

    bridges: tuple[BridgeUser, ...]
    agent_listener: Listener
    bridge_listener: Listener
    agent_user: str = ""
    etc_dir: PurePosixPath = ETC_DIR
    persistence_dir: PurePosixPath = PERSISTENCE_DIR


def parse_listener(text: str) -> Listener:
    """``ADDRESS:PORT`` (IPv6 as ``[ADDRESS]:PORT``); :class:`ValueError` says what is wrong."""
    address, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{text!r} is not ADDRESS:PORT (e.g. 127.0.0.1:1883)")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(
            f"{address!r} in {text!r} is not an IP address; a listener binds to one"
        ) from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} in {text!r} is not 1-65535")
    return Listener(str(parsed), port)


def _is_within(prefix: str, other: str) -> bool:
    """Whether topics under ``prefix`` are also under ``other`` (level by level)."""
    levels, outer = prefix.split("/"), other.split("/")
    return levels[: len(outer)] == outer


def plan_problems(plan: PlantBrokerPlan) -> list[str]:
    """Every reason the plan would give a broker that is unsafe or does not start."""
    problems: list[str] = []
    if not plan.bridges:
        problems.append("no bridge: give at least one (--bridge USER=PREFIX or --config)")
    users = [bridge.username for bridge in plan.bridges]
    if plan.agent_user:
        users.append(plan.agent_user)
    for user in users:
        try:
            validate_identifier(user, what="user name")
        except InvalidIdentifier as exc:
            problems.append(str(exc))
    for user in sorted({u for u in users if users.count(u) > 1}):
        problems.append(f"user {user!r} is given twice; every bridge and the agent log in alone")
    for bridge in plan.bridges:
        if bad_topic_prefix(bridge.topic_prefix):
            problems.append(
                f"topic prefix {bridge.topic_prefix!r} of {bridge.username!r}: use MQTT topic "
                'levels without + # spaces or empty levels (e.g. "plant/site-1")'
            )
    for index, bridge in enumerate(plan.bridges):
        for other in plan.bridges[index + 1 :]:
            if _is_within(bridge.topic_prefix, other.topic_prefix) or _is_within(
                other.topic_prefix, bridge.topic_prefix
            ):
                problems.append(
                    f"prefixes {bridge.topic_prefix!r} ({bridge.username}) and "
                    f"{other.topic_prefix!r} ({other.username}) overlap: one bridge could "
                    "write the other's readings; give each its own prefix"
                )
    listeners = (plan.agent_listener, plan.bridge_listener)
    if plan.agent_listener == plan.bridge_listener or (
        plan.agent_listener.port == plan.bridge_listener.port
        # 0.0.0.0 or :: binds the port on every address (:: on IPv4 too, by default)
        and any(ipaddress.ip_address(listener.address).is_unspecified for listener in listeners)
    ):
        problems.append(
            f"the agent listener {plan.agent_listener} and the bridge listener "
            f"{plan.bridge_listener} must not share an address and port"
        )
    for name, path in (("etc dir", plan.etc_dir), ("persistence dir", plan.persistence_dir)):
        text = str(path)
        if not path.is_absolute() or any(c.isspace() for c in text) or '"' in text:
            problems.append(f"{name} {text!r} must be an absolute path without spaces")
    return problems


def mosquitto_conf(plan: PlantBrokerPlan) -> str:
    """``fedgate-plant.conf``: two listeners with their own security settings."""
    agent_auth = (
        f"allow_anonymous false\npassword_file {plan.etc_dir / PASSWD_NAME}\n"
        if plan.agent_user
        else "allow_anonymous true\n"
    )
    who = f"user {plan.agent_user}" if plan.agent_user else "anonymous"
    return (
        "# fedgate plant-data broker, written by `fedgate-bridge plant-broker-config`.\n"
        "# Edit the command line and run it again rather than this file.\n"
        "per_listener_settings true\n"
        "# Never drop what an absent or slow agent has not taken yet (operations.md 16.4).\n"
        "max_queued_messages 0\n"
        "persistence true\n"
        f"persistence_location {plan.persistence_dir}/\n"
        f"autosave_interval {AUTOSAVE_INTERVAL_S}\n"
        "\n"
        f"# The agent ({who}): reads the bridges' prefixes, writes nothing.\n"
        f"listener {plan.agent_listener.port} {plan.agent_listener.address}\n"
        f"{agent_auth}"
        f"acl_file {plan.etc_dir / AGENT_ACL_NAME}\n"
        "\n"
        "# The bridges (users only): each writes its own prefix, reads nothing.\n"
        f"listener {plan.bridge_listener.port} {plan.bridge_listener.address}\n"
        "allow_anonymous false\n"
        f"password_file {plan.etc_dir / PASSWD_NAME}\n"
        f"acl_file {plan.etc_dir / BRIDGE_ACL_NAME}\n"
    )


def agent_acl(plan: PlantBrokerPlan) -> str:
    """The agent listener's ACL: read every bridge's prefix (anonymous rules come first,
    before any ``user`` line)."""
    lines = ["# written by `fedgate-bridge plant-broker-config`"]
    if plan.agent_user:
        lines.append(f"user {plan.agent_user}")
    lines += [f"topic read {bridge.topic_prefix}/#" for bridge in plan.bridges]
    return "\n".join(lines) + "\n"


def bridge_acl(plan: PlantBrokerPlan) -> str:
    """The bridge listener's ACL: each bridge user writes its own prefix only."""
    lines = ["# written by `fedgate-bridge plant-broker-config`"]
    for bridge in plan.bridges:
        lines += ["", f"user {bridge.username}", f"topic write {bridge.topic_prefix}/#"]
    return "\n".join(lines) + "\n"
