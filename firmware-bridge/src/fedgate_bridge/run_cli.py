"""Commands of the polling bridge: ``run``, ``check`` and ``status``.

Exit codes (also in each command's ``--help``):

    0  success (``run``: stopped by SIGTERM / SIGINT)
    1  unexpected failure (see the log)
    2  bad command line
    3  configuration missing or invalid (the message lists every problem)
    4  the outbox in state_dir cannot be opened, is damaged, or has an unknown schema
       (a locked outbox or a full disk is waited out, not an exit)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import socket
import sys
from enum import IntEnum
from functools import partial
from pathlib import Path
from typing import Any

import click
from fedgate_common.click_support import echo_json, fail
from fedgate_common.instance_lock import AlreadyRunning, StateDirUnusable, single_instance
from fedgate_common.logs import configure_logging
from fedgate_common.service_notify import ServiceNotifier
from fedgate_common.tasks import leaf_error
from fedgate_common.text_table import format_table

from fedgate_bridge.config import (
    DEFAULT_CONFIG_PATH,
    BridgeConfig,
    client_id_of,
    load_config,
)
from fedgate_bridge.errors import ConfigError, OutboxError
from fedgate_bridge.outbox import read_outbox_summary, read_parked_topics
from fedgate_bridge.registers import plan_reads

__all__ = ["ExitCode", "check", "run", "status"]

log = logging.getLogger("fedgate.bridge")


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    OUTBOX = 4


EXIT_CODES_HELP = """\b
Exit codes:
  0 success            1 unexpected failure     2 bad command line
  3 config invalid     4 outbox unusable, or another bridge runs on state_dir"""

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG_PATH,
    envvar="FEDGATE_BRIDGE_CONFIG",
    show_default=True,
    help="Bridge configuration file (TOML).",
)


def _load(config_path: Path) -> BridgeConfig:
    """Load the config or exit 3 with every problem (also as JSON with ``--json``)."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), ExitCode.CONFIG, problems=exc.problems, ok=False, config=str(config_path))


# --------------------------------------------------------------------------- run


def _quiet_libraries(level: str) -> None:
    """pymodbus and asyncua log every failed connect; the bridge logs them rate-limited."""
    if level != "debug":
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        logging.getLogger("asyncua").setLevel(logging.ERROR)


async def _run_until_signal(config: BridgeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with contextlib.suppress(OSError):  # one it cannot make: the lock says why
        config.state_path.mkdir(mode=0o750, parents=True, exist_ok=True)
    with single_instance(config.state_path, "fedgate-bridge"):
        await _bridge_until(config, stop)


async def _bridge_until(config: BridgeConfig, stop: asyncio.Event) -> None:
    from fedgate_bridge.bridge import Bridge  # asyncua / pymodbus: only when bridging

    bridge = Bridge(config)
    notifier = ServiceNotifier.from_environ(
        os.environ,
        pid=os.getpid(),
        open_socket=partial(socket.socket, socket.AF_UNIX, socket.SOCK_DGRAM),
    )
    # READY=1 once the outbox is open and the sources run; watchdog pings from this loop.
    lifecycle = asyncio.create_task(
        notifier.follow(bridge.running.wait, sleep=asyncio.sleep, status="running")
    )
    try:
        await bridge.run(stop)
    finally:
        lifecycle.cancel()
        await asyncio.wait([lifecycle])
        notifier.close()


@click.command(epilog=EXIT_CODES_HELP)
@config_option
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of key=value.")
def run(config_path: Path, log_json: bool) -> None:
    """Poll the configured Modbus and OPC-UA sources and publish readings to MQTT.

    Readings are stored in the outbox (state_dir/outbox.db) before they are published,
    and deleted only when the broker acknowledged them: a broker outage or a restart
    loses nothing. SIGTERM / SIGINT stop polling, flush for a few seconds, exit 0.

    \b
    Example:
      fedgate-bridge check --config /etc/fedgate/bridge.toml
      fedgate-bridge run --config /etc/fedgate/bridge.toml --log-json
    """
    config = _load(config_path)
    configure_logging(config.log_level, as_json=log_json)
    _quiet_libraries(config.log_level)
    try:
        asyncio.run(_run_until_signal(config))
    except (ConfigError, StateDirUnusable) as exc:
        fail(str(exc), ExitCode.CONFIG)
    except AlreadyRunning as exc:
        fail(str(exc), ExitCode.OUTBOX)
    except Exception as exc:
        outbox_error = leaf_error(exc, OutboxError)
        if outbox_error is not None:
            fail(str(outbox_error), ExitCode.OUTBOX)
        log.exception("bridge failed", extra={"fields": {"config": str(config_path)}})
        sys.exit(int(ExitCode.FAILURE))


# --------------------------------------------------------------------------- check


def _source_rows(config: BridgeConfig) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for modbus in config.modbus:
        where = modbus.serial_port if modbus.transport == "rtu" else f"{modbus.host}:{modbus.port}"
        rows.append(
            {
                "name": modbus.name,
                "kind": "modbus",
                "transport": modbus.transport,
                "address": where,
                "tags": len(modbus.registers),
                "reads_per_poll": len(plan_reads(modbus.registers)),
                "poll_interval_s": modbus.poll_interval_s,
            }
        )
    for opcua in config.opcua:
        rows.append(
            {
                "name": opcua.name,
                "kind": "opcua",
                "transport": opcua.mode,
                "address": opcua.endpoint,
                "tags": len(opcua.nodes),
                "reads_per_poll": 1,
                "poll_interval_s": opcua.poll_interval_s,
            }
        )
    return rows


@click.command(epilog=EXIT_CODES_HELP)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def check(config_path: Path, as_json: bool) -> None:
    """Validate the configuration and show what would be polled; no network IO.

    Every problem is listed at once, with the key and the allowed values (exit code 3).

    \b
    Example:
      fedgate-bridge check --config /etc/fedgate/bridge.toml --json
    """
    config = _load(config_path)
    rows = _source_rows(config)
    summary = {
        "ok": True,
        "config": str(config_path),
        "broker": f"{config.broker.host}:{config.broker.port}",
        "client_id": client_id_of(config),
        "topics": f"{config.topic_prefix}/<source>/<tag>",
        "state_dir": config.state_dir,
        "sources": rows,
    }
    if as_json:
        echo_json(summary)
        return
    tags = sum(row["tags"] for row in rows)
    click.echo(f"configuration OK: {len(rows)} sources, {tags} tags")
    click.echo(f"broker:  {summary['broker']} (client id {summary['client_id']})")
    click.echo(f"topics:  {summary['topics']}")
    click.echo(
        format_table(
            ["source", "kind", "transport", "address", "tags", "reads/poll", "interval s"],
            [list(row.values())[:7] for row in rows],
        )
    )


# --------------------------------------------------------------------------- status


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@click.command(epilog=EXIT_CODES_HELP)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def status(config_path: Path, as_json: bool) -> None:
    """Show outbox depth, parked readings, per-source reads / errors and publish counters.

    Reads state_dir/status.json (rewritten by a running bridge every 2 s) and the
    outbox itself, so the depth is current even when the bridge is stopped. Readings the
    broker refused (MQTT 5 "not authorized", ...) are listed per topic: fix the broker's
    ACL, then restart the bridge to send them again.

    \b
    Example:
      fedgate-bridge status --config /etc/fedgate/bridge.toml --json
    """
    from fedgate_bridge.bridge import read_status

    config = _load(config_path)
    try:
        outbox = read_outbox_summary(config.outbox_path)
        parked = read_parked_topics(config.outbox_path)
    except OutboxError as exc:
        fail(str(exc), ExitCode.OUTBOX)
    last = read_status(config.status_path)
    running = last is not None and last.state == "running" and _process_alive(last.pid)
    if as_json:
        echo_json(
            {
                "config": str(config_path),
                "running": running,
                "outbox": outbox,
                "parked": parked,
                "status": last,
            }
        )
        return
    state = "running" if running else "not running"
    if last is not None:
        state += f" (pid {last.pid}, status written at {_clock(last.updated_at)})"
    click.echo(f"bridge:   {state}")
    if outbox is None:
        click.echo(f"outbox:   {config.outbox_path} does not exist yet")
    else:
        click.echo(
            f"outbox:   {outbox.depth} waiting, {outbox.dropped_oldest} dropped (oldest), "
            f"{outbox.rejected_new} rejected (new), {outbox.parked} parked"
            + (f" ({outbox.dropped_parked} dropped for room)" if outbox.dropped_parked else "")
        )
    if parked:
        click.echo(
            "parked:   readings the broker refused; they are sent again when the bridge "
            "restarts (fix the broker's ACL first)"
        )
        click.echo(
            format_table(
                ["topic", "parked", "reason", "last parked"],
                [[t.topic, t.count, t.reason, _clock(t.last_parked_at)] for t in parked],
            )
        )
    if last is None:
        click.echo(f"no status file at {config.status_path}: the bridge has not run yet")
        return
    pub = last.publisher
    click.echo(
        f"broker:   {'connected' if pub.connected else 'disconnected'}, {pub.acked} acknowledged, "
        f"{pub.sent} sent ({pub.resent} resent), {pub.inflight} in flight, "
        f"{pub.disconnects} disconnects"
        + (f", last error: {pub.last_error}" if pub.last_error else "")
    )
    if pub.refused:
        click.echo(
            f"refused:  {pub.refused} by the broker ({pub.parked} parked), last: "
            f"{pub.last_refusal} at {_clock(pub.last_refusal_at)}"
        )
    health = last.outbox_health
    if health.failures:
        state = "FAILING, sources and publisher wait" if health.failing else "writable again"
        click.echo(
            f"outbox:   {state}; {health.failures} failed writes, last: {health.last_error} "
            f"at {_clock(health.last_error_at)}"
        )
    click.echo(
        format_table(
            [
                "source",
                "kind",
                "up",
                "reads",
                "readings",
                "errors",
                "skipped",
                "last read",
                "last error",
            ],
            [
                [
                    s.name,
                    s.kind,
                    "yes" if s.connected else "no",
                    s.reads,
                    s.readings,
                    s.errors,
                    # not published: NaN/inf, not a number, reads the device refused
                    s.non_finite + s.non_numeric + s.blocks_refused,
                    _clock(s.last_read_at),
                    s.last_error[:120] if s.last_error else None,
                ]
                for s in last.sources
            ],
        )
    )


def _clock(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
