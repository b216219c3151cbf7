"""``fedgate-coordinator broker-config``: write the cloud broker's locked-down configuration.

``cli`` registers this command;
exit codes, the error guard and JSON output come from ``cli_support``.
"""

from __future__ import annotations

import functools
import os
import pwd
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec

from fedgate_coordinator.broker_config import (
    ACL_NAME,
    CA_CERT_NAME,
    CLIENT_CERT_NAME,
    CLIENT_KEY_NAME,
    CONF_NAME,
    HEADROOM,
    BrokerAuthority,
    IssuedClient,
    SizePlan,
    acl_text,
    client_serial,
    coordinator_user,
    host_problem,
    mosquitto_conf,
    peer_user,
    read_revoked,
    reader_user,
    share_with_group,
    size_plan,
    write_private,
)
from fedgate_coordinator.cli_support import echo_json, guard
from fedgate_coordinator.errors import ConfigError

if TYPE_CHECKING:
    from fedgate_coordinator.cli import Context


BROKER_EXIT_CODES = """\b
Exit codes:
  0 success          1 unexpected failure   2 bad command line (an invalid
    --peer/--reader name or --host)
  3 config error (coordinator.toml missing or invalid; the broker CA in --out
    unreadable: restore it or pass --rotate; --reissue of an unknown user; a path,
    --bind or --broker-user that cannot go into mosquitto.conf; files not writable)
  4 store error (the enrolled agents cannot be read)"""

F = TypeVar("F", bound=Callable[..., Any])


def _guard(func: F) -> F:
    """The coordinator's error guard; a file that cannot be written is a config error."""

    @guard
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OSError as exc:
            raise ConfigError(f"cannot write the broker files: {exc}") from None

    return wrapper  # type: ignore[return-value]


@click.command("broker-config", epilog=BROKER_EXIT_CODES)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for mosquitto.conf, the ACL, the CA, certificates and the CRL.",
)
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--bind",
    # Gateways connect from other hosts; the listener admits only certificate holders.
    default="0.0.0.0",  # noqa: S104
    show_default=True,
    help="Address the TLS listener binds to.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Name or IP address clients use for the broker (repeat); always adds "
    "coordinator.toml's broker.host, 127.0.0.1 and localhost.",
)
@click.option(
    "--persistence-dir",
    default=Path("/var/lib/mosquitto"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--broker-user",
    default="mosquitto",
    show_default=True,
    help="User Mosquitto runs as; run as root, this also gives its group read access "
    "to --out and server.key.",
)
@click.option(
    "--max-agents",
    type=click.IntRange(1, 100_000),
    default=None,
    help="Agents the limits are sized for (default: twice the enrolled, at least 100).",
)
@click.option(
    "--peer",
    "peers",
    multiple=True,
    help="Peer cloud whose coordinator may read this cloud's federation topics "
    "(default: the other clouds of the installed manifest).",
)
@click.option(
    "--reader",
    "readers",
    multiple=True,
    help="Name of a read-only client of the agents' site/ topics (dashboards).",
)
@click.option(
    "--reissue",
    "reissue",
    multiple=True,
    help="Replace this user's certificate and revoke the old one (agent id, "
    "coordinator:<cloud>, peer:<cloud> or reader:<name>).",
)
@click.option(
    "--rotate", is_flag=True, help="New CA, server and client certificates: all old ones die."
)
@click.option("--dry-run", is_flag=True, help="Compute and print; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
@_guard
def broker_config(
    obj: Context,
    out_dir: Path,
    port: int,
    bind: str,
    hosts: tuple[str, ...],
    persistence_dir: Path,
    broker_user: str,
    max_agents: int | None,
    peers: tuple[str, ...],
    readers: tuple[str, ...],
    reissue: tuple[str, ...],
    rotate: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Write a locked-down Mosquitto configuration for this cloud's broker.

    TLS listener only, no anonymous clients, one client certificate per agent (common
    name = agent id), coordinator, peer coordinator and reader; an ACL that lets each agent
    publish only under its own id; size limits from the model; a CRL of revoked agents.
    Existing CA and certificates are kept unless --rotate or --reissue. Run it again after
    every enroll or revoke, then reload the broker (systemctl reload mosquitto).

    \b
    Example:
      fedgate-coordinator --state-dir /var/lib/fedgate-coordinator broker-config \\
          --out /etc/mosquitto/fedgate --host broker.cloud-1.example --port 8883
      mosquitto -c /etc/mosquitto/fedgate/mosquitto.conf
    """
    from fedgate_coordinator.federation_cli import installed_manifest

    config = obj.config()
    out_dir = out_dir.absolute()
    manifest = installed_manifest(obj.state_dir)
    clouds = 1 if manifest is None else len(manifest.manifest.clouds)
    if not peers and manifest is not None:
        peers = tuple(c.cloud for c in manifest.manifest.clouds if c.cloud != config.cloud)
    with obj.store(config, read_only=True) as store:
        agents = store.list_agents()
    active = sorted(a.agent_id for a in agents if a.status == "active")
    revoked_agents = sorted(a.agent_id for a in agents if a.status != "active")
    planned = max_agents or max(100, 2 * len(active))
    plan = size_plan(
        config.model, word_bits=config.secagg.word_bits, max_agents=planned, clouds=clouds
    )
    users = [coordinator_user(config.cloud)]
    users += [peer_user(p) for p in sorted(set(peers))]
    users += [reader_user(r) for r in sorted(set(readers))]
    users += active
    for user in reissue:
        if user not in users:
            raise ConfigError(f"--reissue {user!r}: not one of this broker's users")
    for host in hosts:
        problem = host_problem(host)
        if problem:
            raise click.BadParameter(problem, param_hint="--host")
    server_hosts = [*hosts, config.broker.host, "127.0.0.1", "localhost"]
    conf = mosquitto_conf(
        out_dir=out_dir,
        bind=bind,
        port=port,
        persistence_dir=persistence_dir.absolute(),
        plan=plan,
        deployment=config.deployment,
        cloud=config.cloud,
        run_as=broker_user,
    )
    acl = acl_text(config.deployment, config.cloud, peers=peers, readers=readers)
    result: dict[str, Any] = {
        "out": str(out_dir),
        "config": str(out_dir / CONF_NAME),
        "acl": str(out_dir / ACL_NAME),
        "listener": f"{bind}:{port} (TLS, client certificates)",
        "server_names": list(dict.fromkeys(server_hosts)),
        "sizes": {
            "computation": (
                f"largest legitimate message = {plan.largest_message} "
                f"({plan.largest_message_bytes} B); limit = {HEADROOM} x that, rounded up to "
                "64 KiB, at least 1 MiB, at most max_message_bytes"
            ),
            **_plan_dict(plan),
        },
        "users": users,
        "revoked_agents": revoked_agents,
        "dry_run": dry_run,
        "warnings": [],
    }
    if not _user_exists(broker_user):
        warning = (
            f"--broker-user {broker_user!r} does not exist on this machine: mosquitto started "
            "as root here cannot switch to it (create the user, or name the one mosquitto "
            "runs as)"
        )
        result["warnings"].append(warning)
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        _report(result, conf, as_json=as_json)
        return
    authority = BrokerAuthority(out_dir, deployment=config.deployment, cloud=config.cloud)
    created = authority.load_or_create(rotate=rotate)
    revoked = set() if created else read_revoked(out_dir)
    for user in reissue:
        old = client_serial(out_dir, user)
        if old is not None:
            revoked.add(old)
    server_issued = authority.issue_server(out_dir, server_hosts, rotate=created)
    issued: list[IssuedClient] = [
        authority.issue_client(out_dir, user, rotate=created or user in reissue) for user in users
    ]
    for agent in revoked_agents:
        serial = client_serial(out_dir, agent)
        if serial is not None:
            revoked.add(serial)
    authority.write_revocations(out_dir, revoked)
    write_private(out_dir / ACL_NAME, acl.encode(), mode=0o644)
    write_private(out_dir / CONF_NAME, conf.encode(), mode=0o644)
    persistence_dir.mkdir(parents=True, exist_ok=True)
    group = None
    if os.geteuid() == 0:
        group = share_with_group(out_dir, broker_user, persistence_dir.absolute())
    result.update(
        ca_created=created,
        server_certificate_issued=server_issued,
        clients=[
            {
                "user": c.user,
                "directory": c.directory,
                "issued": c.issued,
                "files": [CA_CERT_NAME, CLIENT_CERT_NAME, CLIENT_KEY_NAME],
            }
            for c in issued
        ],
        revoked_certificates=len(revoked),
        broker_group=group,
        coordinator_settings=_coordinator_settings(out_dir, config.cloud, port),
    )
    _report(result, conf, as_json=as_json)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _plan_dict(plan: SizePlan) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(plan)
    return data


def _coordinator_settings(out_dir: Path, cloud: str, port: int) -> dict[str, Any]:
    """What to put into coordinator.toml [broker] to log in to this broker."""
    directory = out_dir / "clients" / coordinator_user(cloud).replace(":", "-")
    return {
        "host": "127.0.0.1",
        "port": port,
        "tls_ca_file": str(directory / CA_CERT_NAME),
        "tls_cert_file": str(directory / CLIENT_CERT_NAME),
        "tls_key_file": str(directory / CLIENT_KEY_NAME),
    }


def _report(result: dict[str, Any], conf: str, *, as_json: bool) -> None:
    if as_json:
        echo_json(result)
        return
    if result["dry_run"]:
        click.echo(conf, nl=False)
        click.echo(f"# dry run: nothing written to {result['out']}", err=True)
        return
    sizes = result["sizes"]
    click.echo(f"wrote {result['config']} and {result['acl']}")
    click.echo(f"  listener   {result['listener']}; no plaintext listener")
    click.echo(
        f"  sizes      message_size_limit {sizes['message_size_limit']} B, max_packet_size "
        f"{sizes['max_packet_size']} B ({sizes['computation']})"
    )
    click.echo(f"  CA         {'created' if result['ca_created'] else 'kept'}")
    new = [c["user"] for c in result["clients"] if c["issued"]]
    click.echo(
        f"  clients    {len(result['clients'])} ({len(new)} new"
        + (f": {', '.join(new)}" if new else "")
        + ")"
    )
    click.echo(f"  revoked    {result['revoked_certificates']} certificate(s) in the CRL")
    click.echo("Give each agent its clients/<agent id>/ directory (private key: mode 0600).")
    if result["broker_group"] is None:
        click.echo(
            "Then: chgrp mosquitto OUT OUT/server.key; chown mosquitto: PERSISTENCE_DIR; "
            "systemctl reload mosquitto"
        )
    else:
        click.echo("Then: systemctl reload mosquitto (restart after --rotate)")
    sys.stdout.flush()
