"""``fedgate-bridge plant-broker-config``: write the site broker's Mosquitto configuration.

The files are rendered by :mod:`fedgate_bridge.plant_broker`; this module gathers the
bridges (``--bridge USER=PREFIX`` or their ``bridge.toml``), checks everything before it
writes, and writes each file atomically. A file already there with other content is kept
unless ``--force``. The password file is left to ``mosquitto_passwd``: fedgate never sees
the bridges' passwords.
"""

from __future__ import annotations

import tomllib
from enum import IntEnum
from pathlib import Path, PurePosixPath
from typing import Any

import click
from fedgate_common.atomic_files import atomic_write
from fedgate_common.click_support import echo_json, fail

from fedgate_bridge.plant_broker import (
    AGENT_ACL_NAME,
    BRIDGE_ACL_NAME,
    CONF_NAME,
    PASSWD_NAME,
    BridgeUser,
    Listener,
    PlantBrokerPlan,
    agent_acl,
    bridge_acl,
    mosquitto_conf,
    parse_listener,
    plan_problems,
)

__all__ = ["PlantBrokerExitCode", "plant_broker_config"]


class PlantBrokerExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2  # bad option or a plan that would be unsafe; nothing written
    CONFIG = 3  # a --config unreadable or without broker.username / topic_prefix; --out unusable
    EXISTS = 5  # a file in --out differs from what would be written; --force replaces it


EXIT_CODES_HELP = """\b
Exit codes:
  0 the files are written (or already were, unchanged)
  1 unexpected failure
  2 bad command line: a listener, user name or prefix, two users alike, prefixes that
    overlap, the two listeners on one port; nothing written
  3 a --config file unreadable or without broker.username / topic_prefix; --out unusable
  5 a file in --out has other content (edited by hand?); --force replaces it"""


def _bridge_option(text: str) -> BridgeUser:
    username, sep, prefix = text.partition("=")
    if not sep:
        fail(f"--bridge {text!r} is not USER=PREFIX", PlantBrokerExitCode.USAGE)
    return BridgeUser(username=username.strip(), topic_prefix=prefix.strip().rstrip("/"))


def _bridge_of_config(path: Path) -> BridgeUser:
    """The login and prefix of one ``bridge.toml`` (read as TOML only: its sources and
    password files do not matter here, and may not exist yet)."""
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        fail(f"cannot read bridge config {path}: {exc}", PlantBrokerExitCode.CONFIG)
    broker = raw.get("broker", {})
    username = broker.get("username", "") if isinstance(broker, dict) else ""
    prefix = raw.get("topic_prefix", "")
    if not isinstance(username, str) or not username:
        fail(
            f"{path}: broker.username is empty; a bridge logs in at the plant broker under "
            "a user of its own (set it, or use --bridge USER=PREFIX)",
            PlantBrokerExitCode.CONFIG,
        )
    if not isinstance(prefix, str) or not prefix:
        fail(f"{path}: topic_prefix is missing", PlantBrokerExitCode.CONFIG)
    return BridgeUser(username=username, topic_prefix=prefix)


def _listener(text: str, option: str) -> Listener:
    try:
        return parse_listener(text)
    except ValueError as exc:
        fail(f"{option}: {exc}", PlantBrokerExitCode.USAGE)


def _next_steps(plan: PlantBrokerPlan, out_dir: Path) -> list[str]:
    passwd = plan.etc_dir / PASSWD_NAME
    users = [bridge.username for bridge in plan.bridges]
    if plan.agent_user:
        users.append(plan.agent_user)
    steps = [
        f"sudo install -m 0644 {out_dir / CONF_NAME} {plan.etc_dir}/conf.d/{CONF_NAME}",
        f"sudo install -m 0640 -g mosquitto {out_dir / AGENT_ACL_NAME} "
        f"{out_dir / BRIDGE_ACL_NAME} {plan.etc_dir}/",
    ]
    for index, user in enumerate(users):
        create = "-c " if index == 0 else ""
        steps.append(f"sudo mosquitto_passwd {create}{passwd} {user}   # asks for the password")
    steps += [
        f"sudo chown root:mosquitto {passwd} && sudo chmod 0640 {passwd}",
        "sudo systemctl restart mosquitto",
        f"each bridge.toml: broker.host = {plan.bridge_listener.address} (or a name of it), "
        f"broker.port = {plan.bridge_listener.port}, broker.username, broker.password_file",
        f"agent.toml: ingest.mqtt_host = {plan.agent_listener.address}, ingest.mqtt_port = "
        f"{plan.agent_listener.port}"
        + (", ingest.mqtt_username, ingest.mqtt_password_file" if plan.agent_user else ""),
    ]
    return steps


@click.command("plant-broker-config", epilog=EXIT_CODES_HELP)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Directory for {CONF_NAME}, {AGENT_ACL_NAME} and {BRIDGE_ACL_NAME} (created).",
)
@click.option(
    "--bridge",
    "bridge_texts",
    multiple=True,
    metavar="USER=PREFIX",
    help="A bridge's broker user and its topic_prefix (repeat for each bridge).",
)
@click.option(
    "--config",
    "config_paths",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A bridge.toml to take broker.username and topic_prefix from (repeatable).",
)
@click.option(
    "--bridge-listener",
    required=True,
    metavar="ADDRESS:PORT",
    help="Where bridges connect: the gateway's address on the plant network.",
)
@click.option(
    "--agent-listener",
    default="127.0.0.1:1883",
    show_default=True,
    metavar="ADDRESS:PORT",
    help="Where the agent connects (keep it on loopback unless --agent-user).",
)
@click.option(
    "--agent-user",
    default="",
    help="The agent's user (ingest.mqtt_username); default: anonymous on the agent listener.",
)
@click.option(
    "--etc-dir",
    default="/etc/mosquitto",
    show_default=True,
    help="Where the ACLs and plant.passwd are installed (the paths in the config).",
)
@click.option(
    "--persistence-dir", default="/var/lib/mosquitto", show_default=True, help="Broker state."
)
@click.option("--force", is_flag=True, help="Replace files in --out that differ.")
@click.option("--dry-run", is_flag=True, help="Print the files; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def plant_broker_config(
    out_dir: Path,
    bridge_texts: tuple[str, ...],
    config_paths: tuple[Path, ...],
    bridge_listener: str,
    agent_listener: str,
    agent_user: str,
    etc_dir: str,
    persistence_dir: str,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Write the site's plant-data broker configuration (Mosquitto 2).

    Two listeners: bridges log in on --bridge-listener and may each write only under their
    own topic prefix; the agent reads every bridge's prefix on --agent-listener and writes
    nothing. Queues are unbounded and persistent, so readings an absent agent has not
    taken survive (operations.md section 16.4). The bridges' passwords never pass
    through fedgate: the next steps printed run mosquitto_passwd.

    \b
    Examples:
      fedgate-bridge plant-broker-config --out plant-broker \\
          --bridge bridge-line-3=plant/line-3 --bridge bridge-line-4=plant/line-4 \\
          --bridge-listener 10.1.0.5:1884
      fedgate-bridge plant-broker-config --out plant-broker --config /etc/fedgate/bridge.toml \\
          --bridge-listener 10.1.0.5:1884 --agent-user agent-site-1 --json
    """
    bridges = tuple(_bridge_option(text) for text in bridge_texts) + tuple(
        _bridge_of_config(path) for path in config_paths
    )
    plan = PlantBrokerPlan(
        bridges=bridges,
        agent_listener=_listener(agent_listener, "--agent-listener"),
        bridge_listener=_listener(bridge_listener, "--bridge-listener"),
        agent_user=agent_user,
        etc_dir=PurePosixPath(etc_dir),
        persistence_dir=PurePosixPath(persistence_dir),
    )
    problems = plan_problems(plan)
    if problems:
        fail("; ".join(problems), PlantBrokerExitCode.USAGE)
    files = {
        CONF_NAME: mosquitto_conf(plan),
        AGENT_ACL_NAME: agent_acl(plan),
        BRIDGE_ACL_NAME: bridge_acl(plan),
    }
    if dry_run:
        if as_json:
            echo_json({"files": files, "written": []})
        else:
            for name, text in files.items():
                click.echo(f"# ---- {name}\n{text}")
        return
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir} is not a directory", PlantBrokerExitCode.CONFIG)
    current = {name: _read(out_dir / name) for name in files}  # None: absent or unreadable
    unchanged = [name for name, text in files.items() if current[name] == text]
    differing = [n for n in files if (out_dir / n).exists() and n not in unchanged]
    if differing and not force:
        fail(
            f"{', '.join(str(out_dir / n) for n in differing)} differ from what would be "
            "written (edited by hand?); --force replaces them",
            PlantBrokerExitCode.EXISTS,
        )
    written = []
    try:
        for name, text in files.items():
            if name not in unchanged:
                atomic_write(out_dir / name, text.encode(), mode=0o644)
                written.append(str(out_dir / name))
    except OSError as exc:
        fail(f"cannot write {out_dir}: {exc}", PlantBrokerExitCode.CONFIG)
    steps = _next_steps(plan, out_dir)
    if as_json:
        result = {
            "out": str(out_dir),
            "written": written,
            "unchanged": [str(out_dir / n) for n in unchanged],
            "bridges": [{"user": b.username, "topic_prefix": b.topic_prefix} for b in plan.bridges],
            "agent_listener": str(plan.agent_listener),
            "bridge_listener": str(plan.bridge_listener),
            "agent_user": plan.agent_user or None,
            "next_steps": steps,
        }
        echo_json(result)
        return
    for name in files:
        click.echo(f"{'unchanged' if name in unchanged else 'wrote':9} {out_dir / name}")
    click.echo("Next:")
    for step in steps:
        click.echo(f"  {step}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
