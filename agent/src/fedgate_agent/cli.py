"""Command line of fedgate-agent.

Exit codes (also in ``fedgate-agent --help``):

    0  success
    1  unexpected failure (see the log)
    2  bad command line
    3  configuration missing or invalid (the message says what to fix)
    4  local training data, the ingest buffer, an import file or the privacy ledger unusable
    5  conflict: an identity key exists already
    6  the federation manifest is invalid or not signed by the coordinators it needs
    7  predict: no exported model yet (the agent has not adopted a global model)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec
from click.core import ParameterSource
from fedgate_common.cli_help import show_exit_codes
from fedgate_common.click_support import JsonReportingGroup, identifier
from fedgate_common.consensus.manifest import manifest_digest
from fedgate_common.consensus.quorum import tolerance_text
from fedgate_common.errors import InvalidIdentifier
from fedgate_common.identifiers import validate_identifier
from fedgate_common.instance_lock import single_instance
from fedgate_common.keys import public_key_text
from fedgate_common.logs import configure_logging
from fedgate_common.service_notify import ServiceNotifier
from fedgate_common.tasks import cancel_persistently
from fedgate_common.text_table import format_table

from fedgate_agent import __version__
from fedgate_agent.broker_key_cli import broker_key_command
from fedgate_agent.broker_login import check_login_files
from fedgate_agent.cli_support import (
    EXIT_CODES_HELP,
    ExitCode,
    config_option,
    echo_json,
    guard,
)
from fedgate_agent.config import (
    AgentConfig,
    BrokerConfig,
    config_as_dict,
    config_keys,
    load_config,
    set_config_value,
    set_config_values,
    write_config,
)
from fedgate_agent.data_cli import import_command, windows_command
from fedgate_agent.data_settings import buffer_status
from fedgate_agent.errors import ConfigError, LocalDataError
from fedgate_agent.federation_trust import (
    MANIFEST_NAME,
    check_new_manifest,
    read_pinned,
    write_manifest,
)
from fedgate_agent.identity import create_identity, identity_path, load_identity
from fedgate_agent.ingest.buffer import IngestBuffer
from fedgate_agent.ingest.errors import IngestError
from fedgate_agent.install_cli import install_service
from fedgate_agent.predict_cli import predict_command
from fedgate_agent.pretrain_cli import pretrain_command
from fedgate_agent.privacy_ledger import (
    LedgerUnreadable,
    check_not_behind,
    read_ledger,
)
from fedgate_agent.record_privacy import (
    SAMPLING,
    SEEDED_DP_WARNING,
    UNIT,
    accountant_name,
    as_accountant,
)
from fedgate_agent.site_privacy import SAMPLING as SITE_SAMPLING
from fedgate_agent.site_privacy import UNIT as SITE_UNIT
from fedgate_agent.state import (
    MODELS_DIR,
    RUN_LOCK,
    AgentStatus,
    IngestStatus,
    ScoringStatus,
    read_status,
    write_status,
)

if TYPE_CHECKING:
    from fedgate_agent.service import AgentService

__all__ = ["ExitCode", "main"]  # scripts and tests read the exit codes from here


@click.group(
    cls=JsonReportingGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(__version__, prog_name="fedgate-agent")
def main() -> None:
    """fedgate agent for an industrial gateway: trains locally, sends signed updates.

    \b
    Example (first install):
      fedgate-agent init --agent-id site-1 --deployment plant-a --cloud cloud-1
      # enroll the printed key at the coordinator; with the manifest its operator gives:
      fedgate-agent federation pin federation.json
      fedgate-agent run

    Settings come from the TOML file, overridden by FEDGATE_<KEY> environment variables
    (e.g. FEDGATE_BROKER_PORT=8883).
    """


@main.command()
@config_option
@click.option(
    "--agent-id",
    default=None,
    callback=identifier("agent id"),
    help="Id of this gateway (default: host name).",
)
@click.option(
    "--deployment", default="fedgate", show_default=True, callback=identifier("deployment id")
)
@click.option("--cloud", default="cloud-1", show_default=True, callback=identifier("cloud id"))
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/fedgate-agent"),
    show_default=True,
)
@click.option("--broker-host", default="127.0.0.1", show_default=True)
@click.option("--broker-port", default=1883, show_default=True, type=int)
@click.option("--coordinator-key", default="", help="Coordinator public key, if known.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@guard
def init(
    config_path: Path,
    agent_id: str | None,
    deployment: str,
    cloud: str,
    state_dir: Path,
    broker_host: str,
    broker_port: int,
    coordinator_key: str,
    as_json: bool,
) -> None:
    """Create the identity key (and a config file if none exists); print what to enroll.

    With a config file already there (the one install-service writes), the options given
    are written into it, while no identity key exists yet; after that, an option that
    differs from the file is refused (exit 3): change it with `config set`.

    \b
    Example:
      fedgate-agent init --config /etc/fedgate/agent.toml --agent-id press-line-3 \\
          --deployment plant-a --cloud cloud-1 --broker-host 10.0.0.5
    """
    if config_path.exists():
        config = _init_existing(config_path)
    else:
        if agent_id is None:
            agent_id = socket.gethostname().split(".")[0]
            try:
                validate_identifier(agent_id, what="agent id")
            except InvalidIdentifier as exc:
                raise ConfigError(f"{exc} (the host name: pass --agent-id)") from None
        config = AgentConfig(
            agent_id=agent_id,
            deployment=deployment,
            cloud=cloud,
            state_dir=str(state_dir.absolute()),
            coordinator_public_key=coordinator_key,
            broker=BrokerConfig(host=broker_host, port=broker_port),
        )
        write_config(config_path, config)
    key = create_identity(config.state_path)
    public = public_key_text(key.verify_key)
    if as_json:
        echo_json(
            {
                "agent_id": config.agent_id,
                "public_key": public,
                "config": str(config_path),
                "identity": str(identity_path(config.state_path)),
            }
        )
        return
    click.echo(f"agent id:    {config.agent_id}")
    click.echo(f"public key:  {public}")
    click.echo(f"config:      {config_path}")
    click.echo("Enroll it at the coordinator of its cloud:")
    click.echo(f"  fedgate-coordinator enroll {config.agent_id} {public}")


# init's options by the configuration key each one sets.
_INIT_OPTIONS = {
    "agent_id": "agent_id",
    "deployment": "deployment",
    "cloud": "cloud",
    "state_dir": "state_dir",
    "broker.host": "broker_host",
    "broker.port": "broker_port",
    "coordinator_public_key": "coordinator_key",
}


def _init_existing(config_path: Path) -> AgentConfig:
    """``init`` on an existing config: write the options given on the command line that
    differ from it, unless the agent has an identity already (then refuse them)."""
    context = click.get_current_context()
    given = {
        key: context.params[option]
        for key, option in _INIT_OPTIONS.items()
        if context.get_parameter_source(option) is ParameterSource.COMMANDLINE
    }
    if "state_dir" in given:
        given["state_dir"] = given["state_dir"].absolute()
    config = load_config(config_path, require_complete=False)
    current = dict(config_as_dict(config))
    current["broker.host"], current["broker.port"] = config.broker.host, config.broker.port
    changes = {key: value for key, value in given.items() if str(current.get(key)) != str(value)}
    if not changes:
        return config
    listed = ", ".join(f"{key} {current.get(key)!r} -> {value!r}" for key, value in changes.items())
    if identity_path(config.state_path).exists():
        raise ConfigError(
            f"{config_path} exists and this agent has its identity key already; the options "
            f"given differ from the file ({listed}). Change them with `fedgate-agent config "
            "set KEY VALUE`, or run init without them."
        )
    config = set_config_values(config_path, {key: str(value) for key, value in changes.items()})
    click.echo(f"updated {config_path}: {listed}", err=True)
    return config


@main.group()
def config() -> None:
    """Show, change or check the configuration.

    \b
    Example:
      fedgate-agent config show --json
      fedgate-agent config set broker.port 8883
      fedgate-agent config validate
    """


@config.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@guard
def config_show(config_path: Path, as_json: bool) -> None:
    """Print the effective configuration (file plus FEDGATE_* overrides).

    \b
    Example:
      fedgate-agent config show --config ./agent.toml
    """
    cfg = load_config(config_path, require_complete=False)
    data = config_as_dict(cfg)
    if as_json:
        echo_json(data)
        return
    for key in config_keys():
        click.echo(f"{key} = {json.dumps(_value_at(data, key))}")


def _value_at(data: object, key: str) -> Any:
    """The value of dotted ``key`` in :func:`config_as_dict`'s nested dict (None if absent)."""
    value: Any = data
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class _NegativeValueCommand(click.Command):
    """``config set KEY -1``: a negative number is the value, not an unknown option -1.

    Negative numbers (and lists of them, ``-1,0.5``) are moved behind a ``--`` so that click
    takes them as arguments; everything else starting with ``-`` stays an option, so a
    mistyped option is still refused instead of being stored as the value."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" not in args:
            numbers = [arg for arg in args if _NEGATIVE_NUMBERS.fullmatch(arg)]
            if numbers:
                args = [arg for arg in args if arg not in numbers] + ["--", *numbers]
        return super().parse_args(ctx, args)


_NEGATIVE_NUMBERS = re.compile(r"-[0-9.][0-9.eE+\-]*(,\s*-?[0-9.][0-9.eE+\-]*)*")


@config.command("set", cls=_NegativeValueCommand)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the key and its new value as JSON.")
@click.argument("key")
@click.argument("value")
@guard
def config_set(config_path: Path, key: str, value: str, as_json: bool) -> None:
    """Set KEY to VALUE in the file, after validating the whole result.

    VALUE is parsed to the key's type (a number, true/false, a list as comma-separated
    values; a negative number needs no "--"); the file is unchanged when the result is
    invalid (exit 3). With --json: {"config", "key", "value"}, the value as stored.

    \b
    Example:
      fedgate-agent config set broker.host 10.0.0.5
      fedgate-agent config set coordinator_public_key ed25519:9f2c...
      fedgate-agent config set scoring.normal_class -1 --json
    """
    stored = _value_at(config_as_dict(set_config_value(config_path, key, value)), key)
    if as_json:
        echo_json({"config": str(config_path), "key": key, "value": stored})
        return
    click.echo(f"{key} = {json.dumps(stored)} set in {config_path}")


@config.command("validate")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@guard
def config_validate(config_path: Path, as_json: bool) -> None:
    """Check the configuration is complete and valid to run (exit 0) or say what to fix (3).

    Besides the file itself: the identity key, and every password and TLS file that `run`
    reads (the broker's, the MQTT ingest's, each OPC-UA source's). With --json: {"config",
    "valid": true}, or on failure {"error", "exit_code"[, "problems"]}.

    \b
    Example:
      fedgate-agent config validate && systemctl restart fedgate-agent
      fedgate-agent config validate --json | jq .problems
    """
    cfg = load_config(config_path)
    load_identity(cfg.state_path)
    check_login_files(cfg)
    if as_json:
        echo_json({"config": str(config_path), "valid": True})
        return
    click.echo(f"{config_path}: valid")


@main.group()
def federation() -> None:
    """Pin and show the federation manifest this agent trusts.

    Every global model must carry a commit certificate signed by a quorum of the
    coordinators this manifest lists (or be its genesis model); others are refused.

    \b
    Example:
      fedgate-agent federation pin /tmp/federation.json
      fedgate-agent federation show --json
    """


@federation.command("pin")
@config_option
@click.argument("manifest_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--replace",
    is_flag=True,
    help="Pin MANIFEST_FILE as a new first manifest in place of the pinned one (it must be "
    "signed by every coordinator it lists), e.g. when this cloud joins a federation.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@guard
def federation_pin(config_path: Path, manifest_file: Path, replace: bool, as_json: bool) -> None:
    """Verify MANIFEST_FILE and pin it: copy it into the state directory, set its digest.

    A first manifest must be signed by every coordinator it lists; a newer version by a
    quorum of the currently pinned one. With --replace the file is checked as a first
    manifest whatever is pinned. Restart the agent afterwards.

    \b
    Example:
      fedgate-agent federation pin --config /etc/fedgate/agent.toml federation.json
      fedgate-agent federation pin --replace federation-v1.json   # the cloud joined others
    """
    cfg = load_config(config_path, require_complete=False)
    raw = manifest_file.read_bytes()
    signed = check_new_manifest(
        raw,
        deployment=cfg.deployment,
        cloud=cfg.cloud,
        coordinator_key=cfg.coordinator_public_key,
        current=None if replace else read_pinned(cfg.state_path),
    )
    cfg.state_path.mkdir(parents=True, exist_ok=True)
    write_manifest(cfg.state_path, raw)
    digest = manifest_digest(signed.manifest)
    set_config_value(config_path, "manifest_digest", digest)
    if not cfg.coordinator_public_key:
        entry = next(c for c in signed.manifest.clouds if c.cloud == cfg.cloud)
        set_config_value(config_path, "coordinator_public_key", entry.public_key)
    clouds = [c.cloud for c in signed.manifest.clouds]
    result: dict[str, Any] = {
        "digest": digest,
        "version": signed.manifest.version,
        "deployment": signed.manifest.deployment,
        "clouds": clouds,
        "tolerance": tolerance_text(len(clouds)),
        "file": str(cfg.state_path / MANIFEST_NAME),
    }
    if as_json:
        echo_json(result)
        return
    click.echo(f"pinned manifest version {result['version']}, digest {digest}")
    click.echo(f"clouds: {', '.join(clouds)} — {result['tolerance']}")


@federation.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@guard
def federation_show(config_path: Path, as_json: bool) -> None:
    """Show the pinned federation manifest (exit 3 when none is pinned).

    \b
    Example:
      fedgate-agent federation show --json
    """
    cfg = load_config(config_path, require_complete=False)
    signed = read_pinned(cfg.state_path)
    if signed is None or not cfg.manifest_digest:
        raise ConfigError("no federation manifest is pinned: run `fedgate-agent federation pin`")
    manifest = signed.manifest
    data = {
        "digest": manifest_digest(manifest),
        "pinned_digest": cfg.manifest_digest,
        "version": manifest.version,
        "deployment": manifest.deployment,
        "clouds": [{"cloud": c.cloud, "public_key": c.public_key} for c in manifest.clouds],
        "tolerance": tolerance_text(len(manifest.clouds)),
        "genesis_digest": manifest.genesis_digest,
    }
    if as_json:
        echo_json(data)
        return
    click.echo(f"manifest version {manifest.version} of {manifest.deployment}: {data['digest']}")
    click.echo(data["tolerance"])
    for cloud in manifest.clouds:
        click.echo(f"  {cloud.cloud}  {cloud.public_key}")


@main.command()
@config_option
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of key=value.")
@guard
def run(config_path: Path, log_json: bool) -> None:
    """Run the agent in the foreground until stopped (systemd runs this).

    \b
    Example:
      fedgate-agent run --config /etc/fedgate/agent.toml
    """
    cfg = load_config(config_path)
    configure_logging(cfg.log_level, as_json=log_json)
    identity = load_identity(cfg.state_path)
    if cfg.training.source == "file" and not cfg.data_path.exists():
        raise LocalDataError(
            f"training data {cfg.data_path} not found: import data or set training.data_file",
            path=cfg.data_path,
        )
    from fedgate_agent.service import AgentService  # torch loads only for `run`

    with single_instance(cfg.state_path, RUN_LOCK):
        _run_service(AgentService(config=cfg, identity=identity))


def _run_service(service: AgentService) -> None:
    notifier = ServiceNotifier.from_environ(
        os.environ,
        pid=os.getpid(),
        open_socket=partial(socket.socket, socket.AF_UNIX, socket.SOCK_DGRAM),
    )

    async def main_task() -> None:
        task = asyncio.current_task()
        if task is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, cancel_persistently, task)
        # READY=1 once connected to the broker, then watchdog pings from this event loop.
        lifecycle = asyncio.create_task(
            notifier.follow(service.link.connected.wait, sleep=asyncio.sleep, status="connected")
        )
        try:
            await service.run()
        finally:
            lifecycle.cancel()
            await asyncio.wait([lifecycle])

    try:
        asyncio.run(main_task())
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("stopped", err=True)
    finally:
        notifier.close()


main.add_command(import_command)
main.add_command(windows_command)
main.add_command(install_service)
main.add_command(predict_command)
main.add_command(pretrain_command)
main.add_command(broker_key_command)


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@guard
def privacy(config_path: Path, as_json: bool) -> None:
    """Show privacy spent: ε per round and in total, δ, the budgets, how it is counted.

    Record level (DP-SGD in local training), and site level as this agent counts it: every
    noisy secure round it sent a masked input to. Reads privacy.json in the state directory
    (written before each update leaves).

    \b
    Example:
      fedgate-agent privacy --config /etc/fedgate/agent.toml --json
    """
    cfg = load_config(config_path, require_complete=False)
    ledger = read_ledger(cfg.state_path)
    recorded = read_status(cfg.state_path)
    # A ledger deleted or rolled back shows less than was spent: refused here as the agent
    # refuses it (exit 4), not shown as the spend.
    check_not_behind(ledger, recorded, cfg.state_path)
    settings = cfg.privacy
    chosen = as_accountant(settings.accountant)
    accountant = accountant_name(chosen)
    spent, site_spent = ledger.spent(settings.delta, chosen, cfg.secagg.assumed_colluders)
    recounted = not math.isclose(spent, ledger.epsilon_total, rel_tol=1e-6, abs_tol=1e-9)
    site_recounted = not math.isclose(
        site_spent, ledger.site_epsilon_total, rel_tol=1e-6, abs_tol=1e-9
    )
    # Pooled rounds rest on secure aggregation: what is left if the sums' other inputs
    # collude with the coordinator (None when no round was pooled).
    own_share = ledger.own_share_epsilon(settings.delta, chosen) if ledger.pooled else None
    # Rounds trained while record-level DP was off (it was switched off and on again):
    # the ledger has no entry for them, and their updates no record-level guarantee.
    trained = recorded.rounds_trained
    without_dp = trained - len(ledger.entries) if ledger.entries else 0
    fewest = min((e.num_samples for e in ledger.entries), default=0)
    warnings = []
    if cfg.reproducible_noise:
        warnings.append(SEEDED_DP_WARNING)
    if fewest and settings.delta >= 1 / fewest:
        warnings.append(
            f"δ {settings.delta:g} is not below 1/n for this site's {fewest} windows: a "
            "mechanism that publishes one random window in the clear meets it; choose δ well "
            "below 1/n"
        )
    if without_dp > 0:
        warnings.append(
            f"{without_dp} round(s) trained without record-level DP ({trained} trained, "
            f"{len(ledger.entries)} in the ledger): those updates have no record-level "
            "guarantee, whatever ε says"
        )
    data = {
        "record_level": settings.record_level,
        "record_noise": settings.record_noise,
        "reproducible_noise": cfg.reproducible_noise,
        "unit": UNIT,
        "accountant": accountant,
        "sampling": SAMPLING,
        "delta": settings.delta,
        "budget_epsilon": settings.target_epsilon,
        "spent_epsilon": spent,
        "spent_epsilon_recorded": ledger.epsilon_total,
        "spent_epsilon_own_share_only": own_share,
        "budget_left": settings.target_epsilon - spent,
        # What the agent last recorded (status.json): "on", "budget exhausted" (it refuses
        # rounds), or "off".
        "state": recorded.privacy,
        "warnings": warnings,
        "clip_norm": settings.max_grad_norm,
        "noise_multiplier": ledger.noise_multiplier,
        "planned_rounds": settings.planned_rounds,
        "sized_for": ledger.sized_for,
        "rounds_trained_without_dp": max(without_dp, 0),
        "rounds": [
            {
                "round": e.spend.round,
                "epsilon_round": e.epsilon_round,
                "epsilon_total": e.epsilon_total,
                "delta": e.delta,
                "noise_multiplier": e.spend.noise_multiplier,
                "own_share_noise_multiplier": e.spend.own_share_noise_multiplier,
                "sample_rate": e.spend.sample_rate,
                "steps": e.spend.steps,
                "clip_norm": e.max_grad_norm,
                "windows": e.num_samples,
                "accountant": e.accountant,
            }
            for e in ledger.entries
        ],
        "site_level": {
            "unit": SITE_UNIT,
            "sampling": SITE_SAMPLING,
            "budget_epsilon": settings.site_max_epsilon,
            "spent_epsilon": site_spent,
            "spent_epsilon_recorded": ledger.site_epsilon_total,
            "delta": settings.delta,
            "min_noise_multiplier": settings.site_min_noise_multiplier,
            "rounds": [msgspec.to_builtins(e) for e in ledger.site_entries],
        },
    }
    if as_json:
        echo_json(data)
        return
    noise_where = (
        "noise pooled in the secure sum"
        if settings.record_noise == "pooled"
        else "noise added on this gateway"
    )
    where = f"; {noise_where}" if settings.record_level == "on" else ""
    click.echo(f"record-level DP  {settings.record_level} ({UNIT}{where})")
    if cfg.reproducible_noise:
        click.echo(f"warning          {SEEDED_DP_WARNING}")
    click.echo(f"accountant       {accountant}, {SAMPLING} sampling")
    over = " rounds" if settings.record_noise != "pooled" else " rounds (not used: pooled)"
    click.echo(
        f"budget           ε {settings.target_epsilon} at δ {settings.delta} over "
        f"{settings.planned_rounds}{over}; spent ε {spent:.4f}"
        + (" (over budget)" if spent > settings.target_epsilon else "")
        + (
            "; the agent refuses further rounds (budget exhausted)"
            if recorded.privacy == "budget exhausted"
            else ""
        )
    )
    if own_share is not None:
        click.echo(
            f"                 if every other input of the pooled rounds' secure sums "
            f"colluded with the coordinator: ε {own_share:.4f} (this agent's own noise "
            "share alone; privacy.md 3.7)"
        )
    for warning in warnings:
        if warning != SEEDED_DP_WARNING:  # shown at the top
            click.echo(f"warning          {warning}")
    if recounted:
        click.echo(
            "                 (the rounds below were counted at another δ or by another "
            "accountant; spent is their whole history counted again at this δ, as the "
            "next round's check counts it)"
        )
    sized = ledger.sized_for
    sigma = (
        "the secure sum's, each round (below)"
        if settings.record_noise == "pooled"
        else "chosen at the first private round"
        if ledger.noise_multiplier is None
        else f"{ledger.noise_multiplier:.4f}"
        + (
            f" (sized for {sized.rounds} rounds of {sized.steps} steps at sample rate "
            f"{sized.sample_rate:.5f})"
            if sized is not None
            else ""
        )
    )
    click.echo(f"clip norm        {settings.max_grad_norm}, noise multiplier {sigma}")
    rows = [
        [
            e.spend.round,
            round(e.epsilon_round, 4),
            round(e.epsilon_total, 4),
            e.spend.noise_multiplier,
            round(e.spend.sample_rate, 5),
            e.spend.steps,
        ]
        for e in ledger.entries
    ]
    click.echo(
        format_table(["round", "ε round", "ε total", "noise mult.", "sample rate", "steps"], rows)
        if rows
        else "no private rounds yet"
    )
    click.echo("")
    click.echo(f"site-level DP    as this agent counts it ({SITE_UNIT})")
    click.echo(f"accountant       {accountant}, {SITE_SAMPLING}")
    click.echo(
        f"budget           ε {settings.site_max_epsilon} at δ {settings.delta} "
        f"(privacy.site_max_epsilon); spent ε {site_spent:.4f}"
        + (" (over budget)" if site_spent > settings.site_max_epsilon else "")
    )
    site_rows = [
        [
            e.round,
            round(e.epsilon_round, 4),
            round(e.epsilon_total, 4),
            round(e.noise_multiplier, 4),
            round(e.effective_noise_multiplier, 4),
            e.min_inputs,
            e.base_digest[:12],
        ]
        for e in ledger.site_entries
    ]
    click.echo(
        format_table(
            ["round", "ε round", "ε total", "noise mult.", "effective", "min inputs", "base"],
            site_rows,
        )
        if site_rows
        else "no noisy secure rounds yet"
    )
    if site_recounted:
        click.echo(
            "                 (spent is the rounds below counted again as the next round's "
            f"check counts them: at this δ and accountant, with "
            f"secagg.assumed_colluders = {cfg.secagg.assumed_colluders} leaving out those "
            "agents' noise shares; ε total is what was booked at the time)"
        )


def _ingest_status(cfg: AgentConfig, state: AgentStatus, running: bool) -> dict[str, Any] | None:
    """The data path as the running agent last wrote it; when the agent is stopped, the
    buffer's own counters (read-only) and no live sources."""
    if not (cfg.training.source == "buffer" or cfg.mqtt_source or cfg.opcua_source):
        return None
    if running and state.ingest is not None:
        return dict(msgspec.to_builtins(state.ingest))
    if not cfg.buffer_path.exists():
        return {"buffer": {"path": str(cfg.buffer_path), "samples": 0}, "sources": []}
    try:
        with IngestBuffer.open_read_only(cfg.buffer_path) as buffer:
            status = IngestStatus(buffer=buffer_status(buffer))
    except IngestError as exc:  # corrupted or unreadable: say so, show the rest
        return {"buffer": {"path": str(cfg.buffer_path), "error": str(exc)}, "sources": []}
    return dict(msgspec.to_builtins(status))


def _print_ingest(ingest: dict[str, Any]) -> None:
    buffer = ingest["buffer"]
    if buffer.get("error"):
        click.echo(f"buffer     unreadable: {buffer['error']}")
        return
    counters = buffer.get("counters", {})
    cap = buffer.get("max_samples") or "?"
    click.echo(
        f"buffer     {buffer.get('samples', 0):,} samples of {cap:,} ({buffer.get('policy', '')}), "
        f"{buffer.get('size_bytes', 0) / 2**20:.1f} MiB, {buffer.get('path', '')}"
        if isinstance(cap, int)
        else f"buffer     {buffer.get('samples', 0):,} samples, {buffer.get('path', '')}"
    )
    lost = {k: v for k, v in counters.items() if k in ("rejected_full", "dropped_oldest") and v}
    if lost:
        click.echo("           at the cap: " + ", ".join(f"{k}={v:,}" for k, v in lost.items()))
    for path in buffer.get("quarantined", []):
        click.echo(f"           corrupted file moved aside: {path}")
    if ingest.get("lag_s") is not None:
        click.echo(f"lag        newest sample {ingest['lag_s']:.1f} s old")
    rows = [
        [
            s["name"],
            "up" if s["connected"] else "down",
            f"{s['rate_per_s']:,.1f}",
            f"{s['received']:,}",
            f"{s['stored']:,}",
            f"{s['duplicates']:,}",
            ", ".join(f"{k}={v}" for k, v in sorted(s["rejected"].items())) or "0",
            s["reconnects"],
            (s["last_error"] or "")[:60],
        ]
        for s in ingest.get("sources", [])
    ]
    if rows:
        click.echo(
            format_table(
                [
                    "source",
                    "link",
                    "msg/s",
                    "received",
                    "stored",
                    "dup",
                    "rejected",
                    "reconn.",
                    "last error",
                ],
                rows,
            )
        )


def _federation_status(cfg: AgentConfig) -> dict[str, Any]:
    signed = read_pinned(cfg.state_path) if cfg.manifest_digest else None
    if signed is None:
        return {"pinned": False}
    manifest = signed.manifest
    return {
        "pinned": True,
        "digest": cfg.manifest_digest,
        "version": manifest.version,
        "clouds": [c.cloud for c in manifest.clouds],
        "tolerance": tolerance_text(len(manifest.clouds)),
    }


@main.command("forget-rounds")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@guard
def forget_rounds(config_path: Path, as_json: bool) -> None:
    """Forget the rounds answered and the models kept, after the coordinator's store was
    restored from a backup older than what this agent has seen (it would refuse the round
    numbers again and ignore the older models). The privacy ledger, and what status.json
    records of it, are kept. The agent must be stopped (exit 4 while it runs).

    \b
    Example:
      sudo systemctl stop fedgate-agent
      sudo -u fedgate-agent fedgate-agent forget-rounds --config /etc/fedgate/agent.toml
      sudo systemctl start fedgate-agent
    """
    cfg = load_config(config_path, require_complete=False)
    with single_instance(cfg.state_path, RUN_LOCK):
        state = read_status(cfg.state_path)
        forgot = {
            "last_answered_round": state.last_answered_round,
            "model_round": state.model_round,
        }
        models = cfg.state_path / MODELS_DIR
        removed = sorted(p.name for p in models.iterdir() if p.is_file()) if models.is_dir() else []
        for name in removed:
            (models / name).unlink()
        state.last_answered_round = 0
        state.model_round = None
        state.model_digest = None
        write_status(cfg.state_path, state)
    if as_json:
        echo_json({"forgot": forgot, "removed_models": removed, "privacy_ledger": "kept"})
        return
    click.echo(
        f"forgot rounds up to {forgot['last_answered_round']} and the model of round "
        f"{forgot['model_round']}; removed {len(removed)} file(s) from {models}; "
        "the privacy ledger is kept. Start the agent: it takes the coordinator's model again."
    )


def _privacy_spent_now(cfg: AgentConfig, state: AgentStatus, data: dict[str, Any]) -> None:
    """ε spent from privacy.json at the configured δ and accountant, in place of the figures
    status.json kept from the agent's last round (stale after a change of δ, or when the
    agent stopped training). Those stay when the ledger cannot be used (unreadable, or
    behind what status.json recorded); ``privacy_ledger_error`` then says why, as the
    agent will when it refuses the next round that needs it."""
    data["privacy_ledger_error"] = None
    if data["privacy"] == "off" and data["site_privacy"] == "none":
        return
    try:
        ledger = read_ledger(cfg.state_path)
        check_not_behind(ledger, state, cfg.state_path)
    except LedgerUnreadable as exc:  # the agent refuses every round that needs it
        data["privacy_ledger_error"] = str(exc)
        return
    record, site = ledger.spent(
        cfg.privacy.delta, as_accountant(cfg.privacy.accountant), cfg.secagg.assumed_colluders
    )
    data["privacy_delta"] = cfg.privacy.delta
    if ledger.entries:
        data["privacy_epsilon"] = record
    if ledger.site_entries:
        data["site_privacy_epsilon"] = site


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@guard
def status(config_path: Path, as_json: bool) -> None:
    """Show the agent's state, model, rounds, traffic and rejected messages.

    \b
    Example:
      fedgate-agent status --json
    """
    cfg = load_config(config_path, require_complete=False)
    state = read_status(cfg.state_path)
    running = state.state != "stopped" and _process_alive(state.pid)
    data = msgspec.to_builtins(state)
    data.update(
        {
            "running": running,
            "agent_id": cfg.agent_id,
            "enrolled_key_configured": bool(cfg.coordinator_public_key),
            "identity_present": identity_path(cfg.state_path).exists(),
            "broker": f"{cfg.broker.host}:{cfg.broker.port}",
            "federation": _federation_status(cfg),
        }
    )
    # A process that is gone without writing "stopped" was killed or crashed.
    data["stopped_cleanly"] = None if running else state.state == "stopped" or state.pid is None
    if not running:
        data["last_state"] = state.state  # what the agent was doing when it ended
        data["state"] = "stopped"
    data["ingest"] = _ingest_status(cfg, state, running)
    _privacy_spent_now(cfg, state, data)
    if as_json:
        echo_json(data)
        return
    if running:
        condition = f"running, {state.state}"
    elif data["stopped_cleanly"]:
        condition = "stopped"
    else:
        condition = f"not running; it ended while {state.state}, without a clean stop"
    click.echo(f"agent      {cfg.agent_id} ({condition})")
    click.echo(f"broker     {data['broker']}")
    if state.model_round is None:
        click.echo("model      none yet")
    else:
        click.echo(f"model      round {state.model_round} {state.model_digest or '-'}")
    federation_info = data["federation"]
    click.echo(
        "federation "
        + (
            f"manifest v{federation_info['version']} {federation_info['digest'][:16]}… "
            f"({federation_info['tolerance']})"
            if federation_info["pinned"]
            else "no manifest pinned: run `fedgate-agent federation pin FILE`"
        )
    )
    click.echo(
        f"rounds     answered up to {state.last_answered_round}, trained "
        f"{state.rounds_trained}, last loss "
        + ("-" if state.last_train_loss is None else f"{state.last_train_loss:.4f}")
    )
    click.echo(f"traffic    up {state.bytes_up} B, down {state.bytes_down} B")
    if state.privacy != "off":
        # The budget the agent runs with (status.json); agent.toml's applies at the next start.
        changed = []
        if state.privacy_budget is not None and cfg.privacy.target_epsilon != state.privacy_budget:
            changed.append(str(cfg.privacy.target_epsilon))
        if state.privacy_delta is not None and cfg.privacy.delta != state.privacy_delta:
            # ε above is counted at agent.toml's δ already; the running agent checks its own
            changed.append(f"δ {cfg.privacy.delta:g} (it runs with {state.privacy_delta:g})")
        pending = f"; agent.toml says {', '.join(changed)}: restart to apply" if changed else ""
        click.echo(
            f"privacy    record-level DP {state.privacy}: ε {data['privacy_epsilon'] or 0:.4f} "
            f"of {state.privacy_budget} spent (δ {data['privacy_delta']}{pending})"
            + ("; noise pooled in the secure sum" if cfg.privacy.record_noise == "pooled" else "")
        )
    if state.site_privacy != "none":
        click.echo(
            f"privacy    site-level noise {state.site_privacy}: ε "
            f"{data['site_privacy_epsilon'] or 0:.4f} of {state.site_privacy_budget} spent "
            f"(δ {cfg.privacy.delta}, this agent's count)"
        )
    if data["privacy_ledger_error"]:
        problem = data["privacy_ledger_error"]
        click.echo(f"privacy    ledger unusable, training stays off: {problem}")
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(state.rejected.items())) or "none"
    click.echo(f"rejected   {rejected}")
    if data["ingest"] is not None:
        _print_ingest(data["ingest"])
    _print_scoring(state.scoring)
    if state.last_error:
        click.echo(f"last error {state.last_error}")


def _print_scoring(scoring: ScoringStatus) -> None:
    model = (
        f"model round {scoring.model_round} ({(scoring.model_digest or '')[:12]})"
        if scoring.model_digest
        else "no model"
    )
    alert = ", alert ACTIVE" if scoring.alert_active else ""
    click.echo(
        f"scoring    {scoring.state}, {model}, {scoring.windows_scored} windows scored, "
        f"{scoring.alerts_raised} alerts{alert}"
    )
    if scoring.last_error:
        click.echo(f"           last scoring error {scoring.last_error}")


show_exit_codes(main, EXIT_CODES_HELP)
