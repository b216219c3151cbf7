"""Command line of fedgate-coordinator.

Exit codes (also in ``fedgate-coordinator --help``):

    0  success
    1  unexpected failure (see the log)
    2  bad command line
    3  configuration or signing key missing or invalid
    4  the store cannot be opened or written
    5  conflict: the agent id is enrolled with another key
    6  the model hash chain does not verify
    7  not found: the round (``rounds --detail N``) or agent (``revoke``) does not exist
    8  the federation manifest is invalid or not signed by a quorum

``privacy`` shows the privacy ledger: what each round spent of the site-level ε budget, and
the record-level ε agents reported with their updates (each agent keeps its own ledger:
``fedgate-agent privacy``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import click
import msgspec
import nacl.signing
from alembic.util import CommandError
from fedgate_common.cli_help import show_exit_codes
from fedgate_common.click_support import JsonReportingGroup, identifier
from fedgate_common.consensus.manifest import (
    Manifest,
    SignedManifest,
    manifest_digest,
    manifest_problems,
)
from fedgate_common.consensus.quorum import faults_tolerated, quorum_size, tolerance_text
from fedgate_common.errors import FedgateError, ManifestInvalid
from fedgate_common.genesis_weights import GenesisWeights, read_genesis_weights
from fedgate_common.instance_lock import single_instance
from fedgate_common.keys import parse_public_key, public_key_text
from fedgate_common.logs import configure_logging
from fedgate_common.model_spec import DEFAULT_MODEL, ModelSpec, parameter_count
from fedgate_common.secagg.graph import effective_degree
from fedgate_common.service_notify import ServiceNotifier
from fedgate_common.tasks import cancel_persistently, leaf_error
from fedgate_common.text_table import format_table
from sqlalchemy.exc import SQLAlchemyError

from fedgate_coordinator import __version__
from fedgate_coordinator.broker_config import (
    BrokerAuthority,
    read_revoked,
    verified_request_key,
)
from fedgate_coordinator.broker_config_cli import broker_config
from fedgate_coordinator.cli_support import ExitCode, echo_json, fail, guard
from fedgate_coordinator.config import (
    CONFIG_NAME,
    DEFAULT_STATE_DIR,
    KEY_NAME,
    CoordinatorConfig,
    check_state_dir,
    load_config,
    validate,
    write_config,
)
from fedgate_coordinator.errors import ConfigError, StoreError
from fedgate_coordinator.federation import STATUS_NAME
from fedgate_coordinator.federation_cli import (
    MANIFEST_NAME,
    federation,
    installed_manifest,
    write_manifest_file,
)
from fedgate_coordinator.genesis import first_manifest, install_genesis_weights
from fedgate_coordinator.install_cli import install_service
from fedgate_coordinator.mqtt_link import MqttSettings
from fedgate_coordinator.secure_rounds import AGGREGATIONS, SecAggSettings
from fedgate_coordinator.service import (
    INTAKE_STATUS_NAME,
    CoordinatorService,
    refuse_foreign_genesis,
)
from fedgate_coordinator.signing_key import create_signing_key, load_signing_key
from fedgate_coordinator.site_privacy import (
    ACCOUNTANT,
    SAMPLING,
    UNIT,
    federation_size_warning,
    pooled_accountant,
    pooled_epsilon,
    pooled_record_sigma,
)
from fedgate_coordinator.site_privacy import epsilon as site_epsilon
from fedgate_coordinator.store import (
    POOLED_UNIT,
    RECORD_UNIT,
    SITE_UNIT,
    PrivacyLedgerEntry,
    Store,
    missing_sqlite_file,
    normalize_url,
    sqlite_file,
)

EXIT_CODES_HELP = """\b
Exit codes:
  0 success          1 unexpected failure   2 bad command line
  3 config/key error 4 store error, or another serve runs on the state directory
  5 enrollment conflict
  6 model hash chain does not verify
  7 not found (rounds --detail N of a round, revoke of an agent, that does not exist)
  8 the federation manifest is invalid or not signed by a quorum"""

__all__ = ["EXIT_CODES_HELP", "ExitCode", "main"]  # scripts and tests read exit codes here

# Round numbers and heights as the store keeps them (SQL INTEGER, 32 bits on PostgreSQL);
# row limits as SQL takes them (64 bits), and counts (serve --rounds).
STORE_NUMBER = click.IntRange(0, 2**31 - 1)
ROW_LIMIT = click.IntRange(1, 2**63 - 1)


class Context(msgspec.Struct):
    state_dir: Path

    def config(self) -> CoordinatorConfig:
        return load_config(self.state_dir)

    def store(
        self,
        config: CoordinatorConfig | None = None,
        *,
        read_only: bool = False,
        create: bool = False,
        before_migrating: Callable[[Store], None] | None = None,
    ) -> Store:
        """The store, migrated to this version's schema; ``read_only`` commands refuse an
        older schema instead of migrating it. Only ``create`` (`init`) makes a store where
        there is none: every other command refuses a missing SQLite file (without creating
        it) or a database without the schema. ``before_migrating`` checks the store as it
        is (a foreign store is refused before anything is written to it)."""
        config = config or self.config()
        missing = None if create else missing_sqlite_file(config.database_url)
        if missing is not None:
            raise StoreError(
                f"no coordinator store at {missing}: the file does not exist. Run "
                "`fedgate-coordinator init`, or check database_url in coordinator.toml (a "
                "restored store goes where database_url points)"
            )
        try:
            store = Store.open(config.database_url, migrate=False)
        except StoreError:
            raise
        except Exception as exc:  # driver errors: unreachable server, bad file path
            raise StoreError(f"cannot open store {_redact(config.database_url)}: {exc}") from exc
        try:
            if before_migrating is not None:
                before_migrating(store)
            if read_only:
                store.require_current_schema()
            else:
                if not create:
                    store.require_schema()
                store.upgrade_schema()
        except (SQLAlchemyError, CommandError) as exc:
            store.close()
            raise StoreError(f"cannot open store {_redact(config.database_url)}: {exc}") from exc
        except BaseException:
            store.close()
            raise
        return store


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def _require_unused_store(store: Store, *, url: str) -> None:
    """``init`` starts a new history: a store with models or agents is another coordinator's."""
    genesis, agents = store.history_marks()
    if genesis is not None or agents:
        held = f"a model chain from genesis {genesis[:16]}..." if genesis else f"{agents} agent(s)"
        raise ConfigError(
            f"the store {_redact(url)} already holds {held}: it belongs to a coordinator that "
            "was initialised before; give init an empty database (--db), or restore that "
            "coordinator's state directory instead"
        )


def _require_own_store(store: Store, *, manifest: Manifest) -> None:
    """``serve`` writes only to a store grown from its federation's genesis (or an empty
    one), checked before the store is migrated."""
    refuse_foreign_genesis(store.history_marks()[0], manifest)


def _restrict_sqlite_file(url: str) -> None:
    """The store holds agent keys and history: readable by the service group only."""
    path = sqlite_file(url)
    if path is not None:
        path.chmod(0o640)


@click.group(
    cls=JsonReportingGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(__version__, prog_name="fedgate-coordinator")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_STATE_DIR,
    envvar="FEDGATE_COORDINATOR_STATE_DIR",
    show_default=True,
    help="Directory with coordinator.toml and the signing key.",
)
@click.pass_context
def main(ctx: click.Context, state_dir: Path) -> None:
    """Coordinator of one fedgate cloud: runs rounds, aggregates, keeps history.

    \b
    Example:
      fedgate-coordinator --state-dir ./coord init --cloud cloud-1 --deployment plant-a
      fedgate-coordinator --state-dir ./coord enroll site-1 ed25519:3b6a...
      fedgate-coordinator --state-dir ./coord serve
    """
    ctx.obj = Context(state_dir=state_dir)


@main.command()
@click.option(
    "--cloud",
    required=True,
    callback=identifier("cloud id"),
    help="Id of this cloud (letters, digits, _ . -).",
)
@click.option(
    "--deployment",
    default="fedgate",
    show_default=True,
    callback=identifier("deployment id"),
    help="Deployment id.",
)
@click.option(
    "--db",
    "database_url",
    default=None,
    help="SQLAlchemy URL; default sqlite:///<state-dir>/coordinator.db. "
    "PostgreSQL: postgresql+psycopg://USER@HOST:5432/DB",
)
@click.option("--broker-host", default="127.0.0.1", show_default=True)
@click.option("--broker-port", default=1883, show_default=True, type=int)
@click.option("--min-participants", default=2, show_default=True, type=int)
@click.option(
    "--update-timeout",
    default=120.0,
    show_default=True,
    type=float,
    help="Seconds agents have to send their update.",
)
@click.option(
    "--model-spec",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON file with the model spec (default: TEP 1-D CNN, 52 tags x 20 samples).",
)
@click.option(
    "--aggregation",
    type=click.Choice(AGGREGATIONS),
    default="secagg",
    show_default=True,
    help="secagg: agents send masked updates (SecAgg+); plaintext: for baselines only, "
    "agents refuse it unless configured with secagg.plaintext_rounds = allow.",
)
@click.option(
    "--genesis-seed",
    type=click.IntRange(0, 2**63 - 1),
    default=None,
    help="Seed for the initial model's weights, for reproducible experiments "
    "(default: fresh randomness).",
)
@click.option(
    "--genesis-weights",
    "genesis_weights_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Start from a model pre-trained on public data: the file `fedgate-agent pretrain` "
    "wrote. Its model spec becomes this coordinator's; not with --genesis-seed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
@guard
def init(
    obj: Context,
    cloud: str,
    deployment: str,
    database_url: str | None,
    broker_host: str,
    broker_port: int,
    min_participants: int,
    update_timeout: float,
    model_spec: Path | None,
    aggregation: str,
    genesis_seed: int | None,
    genesis_weights_path: Path | None,
    as_json: bool,
) -> None:
    """Create the signing key, coordinator.toml and the store schema.

    \b
    Example:
      fedgate-coordinator --state-dir /var/lib/fedgate-coordinator init \\
          --cloud cloud-1 --deployment plant-a \\
          --db postgresql+psycopg://fedgate@127.0.0.1:5432/fedgate
      fedgate-coordinator --state-dir ./coord init --cloud cloud-1 \\
          --genesis-weights genesis.msgpack     # start from a pre-trained model
    """
    state_dir = obj.state_dir.absolute()
    check_state_dir(state_dir)
    if (state_dir / CONFIG_NAME).exists():
        raise ConfigError(f"{state_dir / CONFIG_NAME} exists: this coordinator is initialised")
    if genesis_weights_path is not None and genesis_seed is not None:
        raise click.UsageError(
            "--genesis-seed and --genesis-weights exclude each other: the weights file "
            "names the seed its training started from"
        )
    weights = read_genesis_weights(genesis_weights_path) if genesis_weights_path else None
    spec = DEFAULT_MODEL if weights is None else weights.spec
    if model_spec is not None:
        try:
            spec = msgspec.json.decode(model_spec.read_bytes(), type=ModelSpec)
        except (msgspec.DecodeError, ValueError, FedgateError) as exc:
            raise ConfigError(f"{model_spec}: not a valid model spec: {exc}") from None
        if weights is not None and weights.spec != spec:
            raise ConfigError(
                f"{genesis_weights_path} holds weights for another model spec than "
                f"{model_spec}; leave out --model-spec to use the weights file's"
            )
    config = CoordinatorConfig(
        deployment=deployment,
        cloud=cloud,
        database_url=_absolute_sqlite(database_url)
        if database_url
        else f"sqlite:///{state_dir.absolute() / 'coordinator.db'}",
        broker=MqttSettings(host=broker_host, port=broker_port),
        rounds=msgspec.structs.replace(
            CoordinatorConfig(deployment=deployment, cloud=cloud, database_url="sqlite://").rounds,
            min_participants=min_participants,
            update_timeout_s=update_timeout,
        ),
        secagg=SecAggSettings(aggregation=aggregation),
        model=spec,
    )
    problems = validate(config)
    if problems:
        raise ConfigError("; ".join(problems), problems=problems)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    # Creates the schema (the first `serve` adds the genesis), after checking it is unused.
    with obj.store(
        config,
        create=True,
        before_migrating=partial(_require_unused_store, url=config.database_url),
    ):
        pass
    _restrict_sqlite_file(config.database_url)
    key_path = state_dir / KEY_NAME
    # A key left by an init that failed later (e.g. store unreachable) is reused, not replaced.
    key = load_signing_key(key_path) if key_path.exists() else create_signing_key(key_path)
    if weights is not None:
        install_genesis_weights(state_dir, weights)
        genesis_seed = weights.pretraining.start_seed
    manifest = _one_cloud_manifest(config, key, genesis_seed, weights)
    write_manifest_file(state_dir / MANIFEST_NAME, manifest)
    genesis_digest = manifest.manifest.genesis_digest
    path = write_config(state_dir, config)
    result = {
        "cloud": cloud,
        "deployment": deployment,
        "config": str(path),
        "coordinator_public_key": public_key_text(key.verify_key),
        "database_url": _redact(config.database_url),
        "genesis_model": genesis_digest,
        "genesis_source": manifest.manifest.genesis_source,
        "manifest": str(state_dir / MANIFEST_NAME),
        "aggregation": aggregation,
    }
    if as_json:
        echo_json(result)
        return
    click.echo(f"initialised cloud {cloud!r} of deployment {deployment!r}")
    click.echo(f"  config:      {path}")
    click.echo(f"  store:       {_redact(config.database_url)}")
    origin = "pre-trained weights" if weights is not None else "random weights"
    click.echo(f"  genesis:     {genesis_digest} ({origin})")
    click.echo(f"  manifest:    {state_dir / MANIFEST_NAME} (this cloud alone)")
    click.echo(f"  public key:  {public_key_text(key.verify_key)}")
    click.echo("Agents pin the manifest: fedgate-agent federation pin federation.json")
    click.echo("Several clouds: see `fedgate-coordinator federation --help`.")


@main.command()
@click.argument("agent_id", callback=identifier("agent id"))
@click.argument("public_key")
@click.option(
    "--broker-out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The `broker-config --out` directory: also issue the agent's broker certificate "
    "(clients/AGENT_ID/) from the cloud's broker CA there.",
)
@click.option(
    "--broker-csr",
    "broker_csr",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="With --broker-out: sign this certificate request from `fedgate-agent broker-key` "
    "instead of making the agent's key here (the key then never leaves the gateway).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the enrollment as JSON.")
@click.pass_obj
@guard
def enroll(
    obj: Context,
    agent_id: str,
    public_key: str,
    broker_out: Path | None,
    broker_csr: Path | None,
    as_json: bool,
) -> None:
    """Enroll an agent: AGENT_ID and PUBLIC_KEY come from `fedgate-agent init`.

    With --broker-out, the agent's broker login (client certificate and key, with the CA)
    is issued at once into clients/AGENT_ID/ of that directory; the broker needs no reload.
    With --broker-csr as well, the certificate is for the key in that request (made on the
    gateway by `fedgate-agent broker-key`) and no key is written here; a certificate it
    replaces (another key: a rotation) is revoked in the CRL (reload the broker).

    \b
    Examples:
      fedgate-coordinator enroll site-1 ed25519:3b6a27bcceb6a42d62a3a8d02a6f0d73...
      fedgate-coordinator enroll site-1 ed25519:3b6a... --broker-out /etc/mosquitto/fedgate
      fedgate-coordinator enroll site-1 ed25519:3b6a... --broker-out /etc/mosquitto/fedgate \\
          --broker-csr site-1.csr

    \b
    Exit codes: 0 enrolled; 2 invalid agent id or key, or --broker-csr without
    --broker-out; 3 config error, no broker CA in --broker-out (run broker-config first),
    or a certificate request that is unreadable, badly signed, for another name or with a
    weak key; 4 store error; 5 the id is enrolled with another key.
    """
    key_text = public_key_text(parse_public_key(public_key))
    if broker_csr is not None and broker_out is None:
        raise click.UsageError("--broker-csr needs --broker-out (the broker CA's directory)")
    requested = None  # the key of --broker-csr, checked before anything is stored
    if broker_csr is not None:
        requested = verified_request_key(broker_csr.read_bytes(), agent_id)
    config = obj.config()
    authority = None
    if broker_out is not None:
        authority = BrokerAuthority(broker_out, deployment=config.deployment, cloud=config.cloud)
        if not authority.exists():
            raise ConfigError(
                f"no broker CA in {broker_out}: run `fedgate-coordinator broker-config --out "
                f"{broker_out}` first (it also issues certificates for every enrolled agent)"
            )
        authority.load_or_create()
    with obj.store(config) as store:
        record = store.enroll_agent(agent_id, key_text)
    issued = None
    replaced: int | None = None
    if authority is not None and broker_out is not None:
        if requested is None:
            issued = authority.issue_client(broker_out, agent_id, rotate=False)
        else:
            issued, replaced = authority.issue_client_for_key(broker_out, agent_id, requested)
            if replaced is not None:
                authority.write_revocations(broker_out, read_revoked(broker_out) | {replaced})
    if as_json:
        echo_json(
            {
                **msgspec.to_builtins(record),
                "broker_login": issued,
                "broker_key_on_gateway": requested is not None,
                "revoked_serial": replaced,
            }
        )
        return
    click.echo(f"enrolled {record.agent_id} ({record.public_key})")
    if issued is not None:
        state = "issued" if issued.issued else "kept (it existed)"
        files = "ca.pem, client.pem" + ("" if requested is not None else ", client.key")
        click.echo(f"broker login {state}: {issued.directory} ({files})")
    if replaced is not None:
        click.echo(
            f"revoked the certificate it replaces (serial {replaced:x}): "
            "reload the broker (systemctl reload mosquitto)"
        )


@main.command()
@click.argument("agent_id", callback=identifier("agent id"))
@click.option("--json", "as_json", is_flag=True, help="Print the agent record as JSON.")
@click.pass_obj
@guard
def revoke(obj: Context, agent_id: str, as_json: bool) -> None:
    """Revoke an agent: from the next round on, its messages are rejected as unknown_sender.

    The row and its key stay in the store for the audit trail. An AGENT_ID that is not a
    valid id exits 2; one that is not enrolled exits 7.

    \b
    Example:
      fedgate-coordinator revoke site-1
    """
    with obj.store() as store:
        store.revoke_agent(agent_id)
        record = store.get_agent(agent_id)
    if as_json:
        echo_json(record)
    else:
        click.echo(f"revoked {agent_id}")


@main.command()
@click.option(
    "--rounds",
    "max_rounds",
    type=ROW_LIMIT,
    default=None,
    help="Stop after this many rounds (default: run until stopped).",
)
@click.option(
    "--until-height",
    type=click.IntRange(1),
    default=None,
    help="Stop once the federation has decided this height (federated round), however "
    "many rounds this run took (a restarted coordinator catches up first).",
)
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of key=value.")
@click.pass_obj
@guard
def serve(obj: Context, max_rounds: int | None, until_height: int | None, log_json: bool) -> None:
    """Connect to the broker and run rounds (foreground; systemd runs this).

    \b
    Example:
      fedgate-coordinator --state-dir /var/lib/fedgate-coordinator serve
      fedgate-coordinator serve --rounds 20
      fedgate-coordinator serve --until-height 20
    """
    config = obj.config()
    configure_logging(config.log_level, as_json=log_json)
    key = load_signing_key(obj.state_dir / KEY_NAME)
    manifest = installed_manifest(obj.state_dir)
    if manifest is None:
        raise ConfigError(
            f"no federation manifest in {obj.state_dir}: run `fedgate-coordinator init` or "
            "install one with `fedgate-coordinator federation install FILE`"
        )
    problems = manifest_problems(manifest.manifest)  # its chain was verified at install
    if problems:
        raise ManifestInvalid("the installed manifest: " + "; ".join(problems), problems=problems)
    # Before the store is opened: a second serve would abort the first one's running round.
    with single_instance(obj.state_dir, "fedgate-coordinator-serve"):
        store = obj.store(
            config, before_migrating=partial(_require_own_store, manifest=manifest.manifest)
        )
        service = CoordinatorService(
            config=config,
            store=store,
            signing_key=key,
            manifest=manifest,
            state_dir=obj.state_dir.absolute(),
        )
        _serve(service, store, max_rounds, until_height)


def _serve(
    service: CoordinatorService, store: Store, max_rounds: int | None, until_height: int | None
) -> None:
    notifier = ServiceNotifier.from_environ(
        os.environ,
        pid=os.getpid(),
        open_socket=partial(socket.socket, socket.AF_UNIX, socket.SOCK_DGRAM),
    )

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, cancel_persistently, task)
        # READY=1 once connected to the broker, then watchdog pings from this event loop.
        lifecycle = asyncio.create_task(
            notifier.follow(service.link.connected.wait, sleep=asyncio.sleep, status="connected")
        )
        try:
            await service.run(max_rounds=max_rounds, until_height=until_height)
        finally:
            lifecycle.cancel()
            await asyncio.wait([lifecycle])

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("stopped", err=True)
    except BaseExceptionGroup as group:  # the service's task group: exit as for the cause
        failure = leaf_error(group, StoreError)
        if failure is None:
            raise
        raise failure from None
    finally:
        store.close()
        notifier.close()
    summary = service.summary
    click.echo(
        f"rounds completed={summary.rounds_completed} aborted={summary.rounds_aborted}"
        f" rejected={sum(summary.rejected.values())}",
        err=True,
    )


def _absolute_sqlite(url: str) -> str:
    """A SQLite URL with a relative path (``sqlite:///coord/c.db``) made absolute against
    the working directory of ``init``: stored relative, every later command would look for
    the store relative to wherever it is run, and create an empty one there."""
    parsed = normalize_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return url
    if database.startswith("file:") or os.path.isabs(database):
        return url
    absolute = parsed.set(database=str(Path(database).absolute()))
    return absolute.render_as_string(hide_password=False)


def _one_cloud_manifest(
    config: CoordinatorConfig,
    key: nacl.signing.SigningKey,
    seed: int | None,
    genesis_weights: GenesisWeights | None,
) -> SignedManifest:
    """A federation of this cloud alone (quorum 1), signed by its coordinator.

    Joining other clouds replaces it before the first ``serve``
    (``fedgate-coordinator federation install --replace``).
    """
    return first_manifest(
        deployment=config.deployment,
        keys={config.cloud: key},
        brokers={config.cloud: f"{config.broker.host}:{config.broker.port}"},
        spec=config.model,
        seed=secrets.randbits(63) if seed is None else seed,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        genesis_weights=genesis_weights,
    )


def _aggregation_summary(config: CoordinatorConfig, enrolled: int) -> dict[str, Any]:
    """The secure-aggregation parameters the next round would use with every agent."""
    settings = config.secagg
    if settings.aggregation != "secagg":
        return {"mode": settings.aggregation}
    params = settings.params_for(max(enrolled, 1))
    degree = effective_degree(max(enrolled, 1), params.degree)
    return {
        "mode": "secagg",
        "word_bits": params.word_bits,
        "clip_norm": params.clip_norm,
        "weight_cap": params.weight_cap,
        "degree": degree,
        "threshold": params.threshold,
        "dropouts_tolerated_per_group": degree + 1 - params.threshold,
    }


def _privacy_summary(
    config: CoordinatorConfig, ledger: list[PrivacyLedgerEntry], completed: list[int]
) -> dict[str, Any]:
    """Site-level privacy: the configured settings and what the ledger says was spent.

    ``epsilon_spent`` is ε of every recorded round at the configured δ, as the budget check
    counts it (``epsilon_spent_recorded``, the last entry's ``epsilon_total``, was counted
    at the δ of its time); with no entry it is 0 while site-level DP is on and ``None`` (no
    guarantee at all) while it is off, and so is ``budget_left``. ``unrecorded_rounds``
    counts completed rounds without a ledger entry: they released a model with no
    site-level guarantee. ``record_warning`` says why a pooled σ cannot be planned (serve
    refuses to start then; these read-only views show it and go on), else "".
    """
    settings = config.privacy
    record_sigma: float | None = None
    record_warning = ""
    if settings.pooled:
        try:
            record_sigma = pooled_record_sigma(
                settings.record_epsilon,
                settings.delta,
                settings.record_sample_rate,
                settings.planned_rounds,
            )
        except ConfigError as exc:
            record_warning = f"{exc} (serve refuses to start with it)"
    recorded = {entry.round for entry in ledger}
    spent: float | None = None
    if ledger:
        spent = site_epsilon([e.effective_noise_multiplier for e in ledger], settings.delta)
    elif settings.enabled:
        spent = 0.0
    return {
        "settings": {
            "site_level": settings.site_level,
            "unit": UNIT,
            "accountant": ACCOUNTANT,
            "sampling": SAMPLING,
            "delta": settings.delta,
            "target_epsilon": settings.target_epsilon,
            "planned_rounds": settings.planned_rounds,
            "noise_multiplier": settings.noise_multiplier,
            "record_level": settings.record_level,
            "record_epsilon": settings.record_epsilon,
            "record_clip_norm": settings.record_clip_norm,
            "record_sample_rate": settings.record_sample_rate,
            "record_noise_multiplier": record_sigma,
        },
        "rounds_recorded": len(ledger),
        "epsilon_spent": spent,
        "epsilon_spent_recorded": ledger[-1].epsilon_total if ledger else None,
        "budget_left": None if spent is None else settings.target_epsilon - spent,
        "unrecorded_rounds": sum(1 for number in completed if number not in recorded),
        "record_warning": record_warning,
    }


def _pooled_summary(config: CoordinatorConfig, rows: list[PrivacyLedgerEntry]) -> dict[str, Any]:
    """Pooled record-level noise as this coordinator counts it: ε of one window of a site
    that took part in every round it released (at the configured sampling rate, the
    agents' PLD accountant); ``None`` (no count) while pooled noise is off and nothing was
    booked. The last row's ``epsilon_total`` is that count when it was counted with
    today's δ and sampling rate (one PLD composition per distinct σ otherwise)."""
    settings = config.privacy
    spent: float | None = None
    if (
        rows
        and rows[-1].delta == settings.delta
        and rows[-1].accountant == pooled_accountant(settings)
    ):
        spent = rows[-1].epsilon_total
    elif rows:
        spent = pooled_epsilon(settings, [e.effective_noise_multiplier for e in rows])
    elif settings.pooled:
        spent = 0.0
    return {
        "rounds_recorded": len(rows),
        "epsilon_spent": spent,
        "target_epsilon": settings.record_epsilon,
        "budget_left": None if spent is None else settings.record_epsilon - spent,
        "sample_rate": settings.record_sample_rate,
        "rows": rows,
    }


SITE_LEVEL_OFF = (
    "site-level DP is off: no site-level guarantee; "
    "record-level ε is kept by each agent: fedgate-agent privacy"
)


def _privacy_line(summary: dict[str, Any]) -> str:
    """One line for ``status``: site-level on/off and ε spent of the target."""
    settings = summary["settings"]
    spent = summary["epsilon_spent"]
    if spent is None:
        return "site-level off: no site-level guarantee (record-level ε: fedgate-agent privacy)"
    state = "on" if settings["site_level"] == "on" else "off now"
    return (
        f"site-level {state}, ε {spent:.4f} spent of {settings['target_epsilon']:g}"
        f" at δ {settings['delta']:g} ({summary['rounds_recorded']} rounds recorded)"
    )


def _status_data(obj: Context) -> dict[str, Any]:
    config = obj.config()
    with obj.store(config, read_only=True) as store:
        rounds = store.list_rounds()
        head = store.head_model()
        last = rounds[0] if rounds else None
        agents = store.list_agents()
        ledger = store.privacy_ledger(SITE_UNIT)
        return {
            "deployment": config.deployment,
            "cloud": config.cloud,
            "coordinator_public_key": public_key_text(
                load_signing_key(obj.state_dir / KEY_NAME).verify_key
            ),
            "database_url": _redact(config.database_url),
            "schema_revision": store.schema_revision(),
            "head_model": None if head is None else {"digest": head.digest, "round": head.round},
            "rounds": {
                status: sum(1 for r in rounds if r.status == status)
                for status in ("completed", "aborted", "running")
            },
            "last_round": None if last is None else msgspec.to_builtins(last),
            "agents_enrolled": sum(1 for a in agents if a.status == "active"),
            "aggregation": _aggregation_summary(config, sum(a.status == "active" for a in agents)),
            "privacy": {
                **_privacy_summary(
                    config, ledger, [r.round for r in rounds if r.status == "completed"]
                ),
                # as `privacy --json` has it: the small-federation warning, "" if none
                "warning": _federation_size_warning(
                    config, sum(a.status == "active" for a in agents)
                ),
            },
            "record_level_privacy": _record_level_agents(store.privacy_ledger(RECORD_UNIT)),
            "pooled_privacy": {
                k: v
                for k, v in _pooled_summary(config, store.privacy_ledger(POOLED_UNIT)).items()
                if k != "rows"
            },
            "rejected_messages": {
                k: v
                for k, v in store.event_counts().items()
                if k not in ("round_recovered", "rate_limited")
            },
            "events": store.event_counts(),
            "rate_limited": _rate_limited(obj.state_dir),
            "consensus": _consensus_summary(obj.state_dir, config, store),
        }


def _rate_limited(state_dir: Path) -> dict[str, int]:
    """Messages dropped unexamined per sender by the last ``serve`` (intake-status.json)."""
    try:
        data = json.loads((state_dir / INTAKE_STATUS_NAME).read_text())
        return {str(k): int(v) for k, v in data.get("rate_limited", {}).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _consensus_summary(state_dir: Path, config: CoordinatorConfig, store: Store) -> dict[str, Any]:
    """Height, last decision and its signers, peers' liveness, faults tolerated, evidence."""
    manifest = installed_manifest(state_dir)
    clouds = [] if manifest is None else [c.cloud for c in manifest.manifest.clouds]
    last = store.last_decision()
    live: dict[str, Any] = {}
    status_file = state_dir / STATUS_NAME
    if status_file.exists():
        try:
            live = json.loads(status_file.read_text())
        except (OSError, ValueError):
            live = {}
    now = time.time()
    peers = [
        {
            "cloud": peer["cloud"],
            "broker": peer["broker"],
            "last_seen_s_ago": (
                None if peer.get("last_seen") is None else round(now - peer["last_seen"], 1)
            ),
        }
        for peer in live.get("peers", [])
    ]
    evidence = store.evidence()
    height = live.get("height")
    decided = 0 if last is None else last.height
    return {
        "journal_ahead_of_store": isinstance(height, int) and height > decided + 1,
        "manifest_digest": None if manifest is None else manifest_digest(manifest.manifest),
        "clouds": clouds,
        "quorum": quorum_size(len(clouds)) if clouds else None,
        "faults_tolerated": faults_tolerated(len(clouds)) if clouds else None,
        "tolerance": tolerance_text(len(clouds)) if clouds else "no manifest installed",
        "height": live.get("height"),
        "consensus_round": live.get("round"),
        "step": live.get("step"),
        "status_age_s": round(now - live["updated"], 1) if "updated" in live else None,
        "last_decision": None
        if last is None
        else {
            "height": last.height,
            "round": last.round,
            "model": last.value,
            "signers": list(last.signers),
        },
        "peers": peers,
        "evidence": [
            {
                "voter": e.voter,
                "height": e.height,
                "round": e.round,
                "step": e.step,
                "values": [e.first_value, e.second_value],
            }
            for e in evidence
        ],
    }


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@guard
def status(obj: Context, as_json: bool) -> None:
    """Show the head model, round counts, the last round and rejected messages.

    \b
    Example:
      fedgate-coordinator --state-dir /var/lib/fedgate-coordinator status --json
    """
    data = _status_data(obj)
    if as_json:
        echo_json(data)
        return
    click.echo(f"deployment {data['deployment']}  cloud {data['cloud']}")
    click.echo(f"public key {data['coordinator_public_key']}")
    click.echo(f"store      {data['database_url']} (schema {data['schema_revision']})")
    head = data["head_model"]
    click.echo(
        f"head model {head['digest'] if head else '-'} (round {head['round'] if head else '-'})"
    )
    counts = data["rounds"]
    click.echo(
        f"rounds     {counts['completed']} completed, {counts['aborted']} aborted,"
        f" {counts['running']} running"
    )
    last = data["last_round"]
    if last:
        click.echo(
            f"last round {last['round']}: {last['status']}, participants "
            # None until the round closes (running): how many took part is not known yet.
            f"{'-' if last['participants'] is None else last['participants']}/{last['selected']}"
            + (f", reason: {last['abort_reason']}" if last["abort_reason"] else "")
        )
    click.echo(f"agents     {data['agents_enrolled']} enrolled")
    agg = data["aggregation"]
    if agg["mode"] == "secagg":
        tolerated = agg["dropouts_tolerated_per_group"]
        click.echo(
            f"secagg     {agg['word_bits']}-bit words, {agg['degree']} neighbours, threshold "
            f"{agg['threshold']} (tolerates {tolerated} dropout{'' if tolerated == 1 else 's'} "
            "per group of holders)"
        )
    else:
        click.echo("secagg     off: updates travel in plaintext")
    click.echo(f"privacy    {_privacy_line(data['privacy'])}")
    if data["privacy"]["warning"]:
        click.echo(f"           warning: {data['privacy']['warning']}")
    reporting = data["record_level_privacy"]
    if reporting:
        top = max(reporting, key=lambda a: a["epsilon_total"])
        click.echo(
            f"           record-level: ε reported by {len(reporting)} agent(s); largest "
            f"{top['epsilon_total']:.4f} of {top['target_epsilon']:g} ({top['agent']})"
        )
    if data["privacy"]["record_warning"]:
        click.echo(f"           warning: {data['privacy']['record_warning']}")
    pooled = data["pooled_privacy"]
    if pooled["epsilon_spent"] is not None:
        click.echo(
            f"           record-level, noise pooled: ε {pooled['epsilon_spent']:.4f} of "
            f"{pooled['target_epsilon']:g} by this coordinator's count "
            f"({pooled['rounds_recorded']} rounds booked)"
        )
    consensus = data["consensus"]
    click.echo(f"federation {consensus['tolerance']}")
    if consensus["height"] is not None:
        click.echo(
            f"consensus  height {consensus['height']}, round {consensus['consensus_round']}, "
            f"step {consensus['step']} (as of {consensus['status_age_s']} s ago)"
        )
    decision = consensus["last_decision"]
    if decision:
        click.echo(
            f"decided    height {decision['height']} → {decision['model'][:16]} "
            f"(round {decision['round']}, signed by {', '.join(decision['signers'])})"
        )
    elif consensus["height"] is not None:
        click.echo("decided    no height yet")
    if consensus["journal_ahead_of_store"]:
        click.echo(
            f"warning    the consensus journal is at height {consensus['height']}, past the "
            "store's last decided height + 1: the store is older than consensus-state.msgpack "
            "(restored from an older copy?); a cloud alone waits for peers' certified models "
            "(operations.md section 9)"
        )
    for peer in consensus["peers"]:
        seen = peer["last_seen_s_ago"]
        click.echo(
            f"peer       {peer['cloud']} at {peer['broker']}: "
            + ("never heard from" if seen is None else f"last message {seen} s ago")
        )
    evidence = consensus["evidence"]
    click.echo(
        "evidence   "
        + (
            "; ".join(
                f"{e['voter']} signed two {e['step']}s at height {e['height']} round {e['round']}"
                for e in evidence
            )
            or "none"
        )
    )
    rejected = data["rejected_messages"]
    click.echo(
        "rejected   " + (", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "none")
    )
    limited = data["rate_limited"]
    click.echo(
        "rate limit " + (", ".join(f"{k}={v}" for k, v in sorted(limited.items())) or "no drops")
    )


ROUND_COLUMNS = [
    "round",
    "status",
    "aggregation",
    "participants",
    "selected",
    "train_loss",
    "model",
    "reason",
]
STAGE_COLUMNS = ["stage", "expected", "received", "dropped", "bytes_in", "bytes_out", "seconds"]


@main.command()
@click.option(
    "--limit", type=ROW_LIMIT, default=50, show_default=True, help="List at most N rounds."
)
@click.option(
    "--detail",
    "detail_round",
    type=STORE_NUMBER,
    default=None,
    metavar="N",
    help="Show round N: its parameters (threshold, degree, word bits) and one line per stage.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@guard
def rounds(obj: Context, limit: int, detail_round: int | None, as_json: bool) -> None:
    """List rounds, newest first, or show one round and its stages with --detail N.

    The stage table says, per protocol stage (keys, shares, masked, confirm, reveal for
    secure aggregation; update for plaintext), how many agents were expected, how many
    answered and dropped, the bytes received from agents and published by the coordinator,
    and the seconds the stage took.

    \b
    Example:
      fedgate-coordinator rounds --limit 5
      fedgate-coordinator rounds --detail 12
      fedgate-coordinator rounds --detail 12 --json

    \b
    Exit codes: 0 shown, 2 --limit or --detail out of range, 3 config missing, 4 store
    error, 7 round N does not exist.
    """
    if detail_round is not None:
        _show_round_detail(obj, detail_round, as_json=as_json)
        return
    with obj.store(read_only=True) as store:
        records = store.list_rounds(limit)
    if as_json:
        echo_json(records)
        return
    click.echo(
        format_table(
            ROUND_COLUMNS,
            [
                [
                    r.round,
                    r.status,
                    r.aggregation,
                    r.participants,
                    r.selected,
                    r.mean_train_loss,
                    (r.model_digest or "")[:12],
                    r.abort_reason or "",
                ]
                for r in records
            ],
        )
    )


def _show_round_detail(obj: Context, number: int, *, as_json: bool) -> None:
    """Print round ``number`` and its stages; exit NOT_FOUND if there is no such round."""
    with obj.store(read_only=True) as store:
        record = store.get_round(number)
        stages = store.stages(number)
    if record is None:
        fail(f"round {number} not found (see `fedgate-coordinator rounds`)", ExitCode.NOT_FOUND)
    if as_json:
        echo_json({**msgspec.to_builtins(record), "stages": stages})
        return
    fields: list[tuple[str, object]] = [
        ("status", record.status),
        ("aggregation", record.aggregation),
        ("threshold", record.threshold),
        ("degree", record.graph_degree),
        ("word bits", record.word_bits),
        ("selected", record.selected),
        ("min participants", record.min_participants),
        ("participants", record.participants),
        ("base model", record.base_digest),
        ("model", record.model_digest),
        ("started", record.started_at),
        ("ended", record.ended_at),
        ("train loss", record.mean_train_loss),
        ("bytes down/agent", record.bytes_down_per_agent),
        ("clip norm", record.clip_norm),
        ("within clip", record.within_clip),
        ("reason", record.abort_reason),
    ]
    click.echo(f"round {record.round}")
    for label, value in fields:
        click.echo(f"  {label:<17} {'-' if value is None else value}")
    click.echo("")
    if not stages:
        click.echo("no stages recorded")
        return
    click.echo(
        format_table(
            STAGE_COLUMNS,
            [
                [s.stage, s.expected, s.received, s.dropped, s.bytes_in, s.bytes_out, s.seconds]
                for s in stages
            ],
        )
    )


PRIVACY_COLUMNS = [
    "round",
    "inputs",
    "noise multiplier",
    "effective multiplier",
    "clip norm",
    "ε this round",
    "ε total",
]


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@guard
def privacy(obj: Context, as_json: bool) -> None:
    """Show the privacy ledger: site-level budget and spend, and the agents' record-level ε.

    Site level: the unit of privacy is one site's whole contribution to a round; the
    settings come from [privacy] in coordinator.toml, the rounds from the store's privacy
    ledger. Per round: inputs summed, the configured and effective noise multipliers, the
    clip norm, ε of the round alone and of every round so far (at δ).

    Record level: what each agent training with DP-SGD reported with its last update (ε
    of its whole run at its δ, its target, σ and clip). The coordinator cannot check these
    numbers; each agent's own ledger is `fedgate-agent privacy`.

    Record level with the noise pooled in the secure sums ([privacy] record_level =
    "pooled"): the σ per window each booked round carried (released, or aborted after
    masked inputs arrived) and ε of a window of a site
    that took part in every one, as this coordinator counts it; serve stops scheduling
    when the next round would pass record_epsilon.

    \b
    Example:
      fedgate-coordinator --state-dir /var/lib/fedgate-coordinator privacy
      fedgate-coordinator privacy --json

    \b
    Exit codes: 0 shown, 3 config missing or invalid, 4 store error.
    """
    config = obj.config()
    with obj.store(config, read_only=True) as store:
        ledger = store.privacy_ledger(SITE_UNIT)
        reports = store.privacy_ledger(RECORD_UNIT)
        pooled = _pooled_summary(config, store.privacy_ledger(POOLED_UNIT))
        completed = [r.round for r in store.list_rounds() if r.status == "completed"]
        active = sum(1 for a in store.list_agents() if a.status == "active")
    summary = _privacy_summary(config, ledger, completed)
    warning = _federation_size_warning(config, active)
    agents = _record_level_agents(reports)
    if as_json:
        echo_json(
            {
                **summary,
                "warning": warning,
                "rows": ledger,
                "record_level": {"agents": agents, "rows": reports, "pooled": pooled},
            }
        )
        return
    _echo_site_level(config, summary, ledger, warning)
    sigma = summary["settings"]["record_noise_multiplier"]
    if sigma is not None or pooled["rows"] or summary["record_warning"]:
        _echo_pooled(config, sigma, pooled)
    if summary["record_warning"]:
        click.echo(f"warning: {summary['record_warning']}")
    if agents:
        click.echo("")
        _echo_record_level(agents)


POOLED_COLUMNS = [
    "round",
    "inputs",
    "noise multiplier",
    "σ per window",
    "ε this round",
    "ε total",
]


def _echo_pooled(config: CoordinatorConfig, sigma: float | None, pooled: dict[str, Any]) -> None:
    settings = config.privacy
    click.echo("")
    if sigma is not None:
        click.echo(
            f"record level      pooled in each secure sum (privacy.md 3.7): σ {sigma:.4f} per "
            f"window, sized for ε {settings.record_epsilon:g} at δ {settings.delta:g} over "
            f"{settings.planned_rounds} rounds at sampling rate {settings.record_sample_rate:g}, "
            f"clip {settings.record_clip_norm:g}; each agent counts its own ε as well "
            "(fedgate-agent privacy)"
        )
    spent, left = pooled["epsilon_spent"], pooled["budget_left"]
    if spent is not None:
        click.echo(
            f"ε spent           {spent:.4f} of {pooled['target_epsilon']:g} by this "
            f"coordinator's count ({pooled['rounds_recorded']} rounds booked; a site in "
            f"every one), budget left {left:.4f}" + (" (over budget)" if left < 0 else "")
        )
    rows: list[PrivacyLedgerEntry] = pooled["rows"]
    if rows:
        click.echo(
            format_table(
                POOLED_COLUMNS,
                [
                    [
                        e.round,
                        e.inputs,
                        e.noise_multiplier,
                        e.effective_noise_multiplier,
                        e.epsilon_round,
                        e.epsilon_total,
                    ]
                    for e in rows
                ],
            )
        )


RECORD_LEVEL_COLUMNS = [
    "agent",
    "rounds",
    "last round",
    "ε total",
    "target ε",
    "δ",
    "noise multiplier",
    "clip norm",
]


def _record_level_agents(reports: list[PrivacyLedgerEntry]) -> list[dict[str, Any]]:
    """Per agent (by id), its last record-level report and how many rounds reported.

    ``epsilon_total`` is the largest ε of its run it ever reported: a later, lower report
    (``epsilon_total_last``; its privacy state restored from an older copy) spends nothing
    back."""
    last: dict[str, PrivacyLedgerEntry] = {}
    highest: dict[str, PrivacyLedgerEntry] = {}
    counts: dict[str, int] = {}
    for entry in reports:  # by round: the last one per agent wins
        last[entry.agent] = entry
        top = highest.get(entry.agent)
        if top is None or entry.epsilon_total >= top.epsilon_total:
            highest[entry.agent] = entry
        counts[entry.agent] = counts.get(entry.agent, 0) + 1
    return [
        {
            "agent": agent,
            "rounds_reported": counts[agent],
            "last_round": entry.round,
            "epsilon_total": highest[agent].epsilon_total,
            "epsilon_total_last": entry.epsilon_total,
            "highest_round": highest[agent].round,
            "target_epsilon": entry.target_epsilon,
            "budget_left": entry.target_epsilon - highest[agent].epsilon_total,
            "delta": entry.delta,
            "noise_multiplier": entry.noise_multiplier,
            "clip_norm": entry.clip_norm,
            "accountant": entry.accountant,
        }
        for agent, entry in sorted(last.items())
    ]


def _echo_record_level(agents: list[dict[str, Any]]) -> None:
    click.echo("record level, as the agents report it (unit: one training window)")
    click.echo(
        format_table(
            RECORD_LEVEL_COLUMNS,
            [
                [
                    a["agent"],
                    a["rounds_reported"],
                    a["last_round"],
                    a["epsilon_total"],
                    f"{a['target_epsilon']:g}",
                    f"{a['delta']:g}",
                    a["noise_multiplier"],
                    a["clip_norm"],
                ]
                for a in agents
            ],
        )
    )
    for a in agents:
        if a["epsilon_total_last"] < a["epsilon_total"]:
            click.echo(
                f"note: {a['agent']} last reported ε {a['epsilon_total_last']:.4f} (round "
                f"{a['last_round']}), below the {a['epsilon_total']:.4f} of round "
                f"{a['highest_round']} shown: its privacy state was restored from an older "
                "copy or its settings changed (fedgate-coordinator events)"
            )


def _echo_site_level(
    config: CoordinatorConfig,
    summary: dict[str, Any],
    ledger: list[PrivacyLedgerEntry],
    warning: str,
) -> None:
    settings = config.privacy
    if not settings.enabled and not ledger:
        click.echo(
            "site-level DP is off: no site-level guarantee; record-level ε with the noise "
            "pooled is counted below, and by each agent: fedgate-agent privacy"
            if settings.pooled
            else SITE_LEVEL_OFF
        )
        return
    spent = summary["epsilon_spent"]
    left = summary["budget_left"]
    fields: list[tuple[str, object]] = [
        ("unit of privacy", UNIT),
        ("site-level DP", settings.site_level),
        ("accountant", ACCOUNTANT),
        ("sampling", SAMPLING),
        ("δ", f"{settings.delta:g}"),
        ("target ε", f"{settings.target_epsilon:g} over {settings.planned_rounds} planned rounds"),
        ("rounds recorded", len(ledger)),
        ("ε spent", f"{spent:.4f}"),
        ("budget left", f"{left:.4f}" + (" (over budget)" if left < 0 else "")),
    ]
    for label, value in fields:
        click.echo(f"{label:<17} {value}")
    for note in _privacy_notes(config, ledger, summary["unrecorded_rounds"]):
        click.echo(f"note: {note}")
    if warning:
        click.echo(f"warning: {warning}")
    click.echo("")
    if not ledger:
        click.echo("no rounds recorded yet")
        return
    click.echo(
        format_table(
            PRIVACY_COLUMNS,
            [
                [
                    e.round,
                    e.inputs,
                    e.noise_multiplier,
                    e.effective_noise_multiplier,
                    e.clip_norm,
                    e.epsilon_round,
                    e.epsilon_total,
                ]
                for e in ledger
            ],
        )
    )


def _federation_size_warning(config: CoordinatorConfig, agents: int) -> str:
    """The small-federation warning ``serve`` logs, for the enrolled agents; "" if none."""
    try:
        return federation_size_warning(
            config.secagg,
            config.privacy,
            agents=agents,
            min_participants=config.rounds.min_participants,
            dimension=parameter_count(config.model),
        )
    except ConfigError as exc:
        return str(exc)


def _privacy_notes(
    config: CoordinatorConfig, ledger: list[PrivacyLedgerEntry], unrecorded: int
) -> list[str]:
    """What a reader of ``privacy`` should know beyond the numbers."""
    settings = config.privacy
    notes: list[str] = []
    if not settings.enabled:
        notes.append("site-level DP is off now: rounds from here on add no site-level guarantee")
    if ledger:
        last = ledger[-1]
        if (last.delta, last.target_epsilon) != (settings.delta, settings.target_epsilon):
            notes.append(
                f"the ledger states ε at δ {last.delta:g} against target "
                f"{last.target_epsilon:g}; coordinator.toml now says δ {settings.delta:g}, "
                f"target {settings.target_epsilon:g}: ε spent is every recorded round "
                f"counted again at δ {settings.delta:g}, as the budget check counts it"
            )
    if unrecorded:
        notes.append(
            f"{unrecorded} completed rounds have no ledger entry (run without site-level DP): "
            "they have no site-level guarantee, and ε spent covers only the recorded rounds"
        )
    return notes


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@guard
def agents(obj: Context, as_json: bool) -> None:
    """List enrolled agents.

    \b
    Example:
      fedgate-coordinator agents --json
    """
    with obj.store(read_only=True) as store:
        records = store.list_agents()
    if as_json:
        echo_json(records)
        return
    click.echo(
        format_table(
            ["agent", "status", "enrolled", "last_seen", "public_key"],
            [
                [a.agent_id, a.status, a.enrolled_at, a.last_seen_at, a.public_key[:24] + "..."]
                for a in records
            ],
        )
    )


@main.command()
@click.option("--verify", is_flag=True, help="Recompute every digest along the chain.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@guard
def models(obj: Context, verify: bool, as_json: bool) -> None:
    """List the global-model hash chain (genesis = round 0).

    \b
    Example:
      fedgate-coordinator models --verify
    """
    with obj.store(read_only=True) as store:
        chain_length = store.verify_chain() if verify else None
        records = store.list_models()
    if as_json:
        echo_json({"verified_length": chain_length, "models": records})
        return
    click.echo(
        format_table(
            ["round", "digest", "parent", "parameters", "created"],
            [
                [
                    m.round,
                    m.digest[:16],
                    m.parent_digest[:16] or "(genesis)",
                    m.num_parameters,
                    m.created_at,
                ]
                for m in records
            ],
        )
    )
    if chain_length is not None:
        click.echo(f"chain verified: {chain_length} models")


@main.command()
@click.option("--limit", type=ROW_LIMIT, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@guard
def events(obj: Context, limit: int, as_json: bool) -> None:
    """List recent events (rejected messages, recovered rounds), newest first.

    \b
    Example:
      fedgate-coordinator events --limit 20
    """
    with obj.store(read_only=True) as store:
        records = store.list_events(limit)
    if as_json:
        echo_json(records)
        return
    click.echo(
        format_table(
            ["at", "kind", "round", "agent", "detail"],
            [[e.at, e.kind, e.round, e.agent_id, e.detail[:80]] for e in records],
        )
    )


@main.command()
@click.option(
    "--limit", type=ROW_LIMIT, default=50, show_default=True, help="Show the last N heights."
)
@click.option(
    "--votes",
    "votes_height",
    type=STORE_NUMBER,
    default=None,
    metavar="H",
    help="List every proposal and vote seen at height H instead.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_obj
@guard
def decisions(obj: Context, limit: int, votes_height: int | None, as_json: bool) -> None:
    """List the federation's decisions (one global model per height) and their signers.

    With --votes H: the proposals, prevotes and precommits of height H, ours and our
    peers' (the full signed messages are in the votes table).

    \b
    Example:
      fedgate-coordinator decisions --limit 10
      fedgate-coordinator decisions --votes 12 --json
    """
    with obj.store(read_only=True) as store:
        if votes_height is not None:
            votes = store.votes(height=votes_height)
            if as_json:
                echo_json(
                    [
                        {
                            "height": v.height,
                            "round": v.round,
                            "step": v.step,
                            "voter": v.voter,
                            "value": v.value,
                            "own": v.own,
                            "received_at": v.received_at,
                        }
                        for v in votes
                    ]
                )
                return
            click.echo(
                format_table(
                    ["round", "step", "voter", "value", "own", "at"],
                    [
                        [v.round, v.step, v.voter, v.value[:16] or "nil", v.own, v.received_at]
                        for v in votes
                    ],
                )
            )
            return
        records = store.decisions(limit)
    if as_json:
        echo_json(
            [
                {
                    "height": d.height,
                    "round": d.round,
                    "model": d.value,
                    "signers": list(d.signers),
                    "decided_at": d.decided_at,
                }
                for d in records
            ]
        )
        return
    click.echo(
        format_table(
            ["height", "round", "model", "signers", "decided at"],
            [[d.height, d.round, d.value[:16], ",".join(d.signers), d.decided_at] for d in records],
        )
    )


main.add_command(federation)
main.add_command(install_service)
main.add_command(broker_config)


show_exit_codes(main, EXIT_CODES_HELP)
