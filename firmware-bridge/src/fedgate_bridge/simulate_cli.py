"""``fedgate-bridge simulate``: a Tennessee Eastman plant served live over OPC-UA and Modbus.

One process is one simulated site: the plant (tep-studio's closed-loop TEP), an OPC-UA
server and/or a Modbus TCP server carrying its 52 Braatz-layout tags plus FAULT. Run
several with different seeds, faults and ports for a non-IID federation on one machine.
Everything is checked before any socket is opened; errors say what to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from fedgate_common.atomic_files import atomic_write
from fedgate_common.click_support import fail
from fedgate_common.hosts import host_problem
from fedgate_common.logs import configure_logging, log_event

from fedgate_bridge.errors import ConfigError, SimulatorError
from fedgate_bridge.simulator.exit_codes import EXIT_CODES_HELP, SimulateExitCode
from fedgate_bridge.simulator.register_map import (
    OPCUA_NAMESPACE_URI,
    OPCUA_OBJECT_NAME,
    bridge_config_for,
    opcua_endpoint,
    register_map_document,
)
from fedgate_bridge.simulator.tep_plant import (
    CONTROL_SECONDS,
    PLANT_MODES,
    FaultSpec,
    PlantShutdown,
    TepPlant,
    parse_fault_spec,
)

__all__ = ["simulate"]

_logger = logging.getLogger("fedgate_bridge.simulate")


@dataclass(frozen=True, slots=True)
class SiteOptions:
    """The validated command line of one simulated site."""

    seed: int
    faults: tuple[FaultSpec, ...]
    mode: str
    host: str
    opcua_port: int
    modbus_port: int
    speed: float
    sample_minutes: float
    control_seconds: float
    hours: float | None
    bridge_config: Path | None
    topic_prefix: str
    bridge_state_dir: str
    broker_host: str
    broker_port: int
    as_json: bool

    @property
    def sample_period_s(self) -> float:
        """Wall seconds between two published samples."""
        return self.sample_minutes * 60.0 / self.speed


def _check_topic_prefix(prefix: str) -> None:
    levels = prefix.split("/")
    if (
        not prefix
        or any(not level for level in levels)
        or any(c in prefix for c in "+#\x00")
        or any(c.isspace() for c in prefix)
        or prefix.startswith("$")
    ):
        raise ConfigError(
            f"bad --topic-prefix {prefix!r}: use non-empty '/'-separated levels without "
            "'+', '#', spaces or a leading '$', e.g. plant/site-1"
        )


def _check_config_path(path: Path) -> None:
    """Fail before the plant starts if the bridge config cannot be written; a missing
    directory is created (as simulate-runs creates its own)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--write-bridge-config: cannot create directory {str(parent)!r}: {exc}"
        ) from None
    if path.is_dir():
        raise ConfigError(f"--write-bridge-config: {str(path)!r} is a directory, give a file")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--write-bridge-config: directory {str(parent)!r} is not writable")


def _startup_document(options: SiteOptions, namespace_index: int) -> dict[str, object]:
    opcua = None
    if options.opcua_port:
        opcua = {
            "endpoint": opcua_endpoint(options.host, options.opcua_port),
            "namespace_uri": OPCUA_NAMESPACE_URI,
            "namespace_index": namespace_index,
            "object": OPCUA_OBJECT_NAME,
        }
    modbus = None
    if options.modbus_port:
        modbus = {"host": options.host, "port": options.modbus_port, "unit": 1}
    return {
        "plant": "tep",
        "pid": os.getpid(),
        "seed": options.seed,
        "mode": options.mode,
        "faults": [
            {"idv": f.idv, "start_h": f.start_h, "magnitude": f.magnitude} for f in options.faults
        ],
        "speed": options.speed,
        "sample_minutes": options.sample_minutes,
        "sample_period_s": options.sample_period_s,
        "hours": options.hours,
        "opcua": opcua,
        "modbus": modbus,
        "register_map": register_map_document(namespace_index=namespace_index),
        "bridge_config": str(options.bridge_config) if options.bridge_config else None,
    }


async def _serve(options: SiteOptions, plant: TepPlant) -> None:
    # Imported here: asyncua and pymodbus take a while to import, and --help should not.
    from fedgate_bridge.simulator.live_plant import LivePlant, SampleSink
    from fedgate_bridge.simulator.modbus_server import PlantModbusServer
    from fedgate_bridge.simulator.opcua_server import PlantOpcUaServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        sinks: list[SampleSink] = []
        namespace_index = 2
        if options.modbus_port:
            modbus = PlantModbusServer(
                host=options.host, port=options.modbus_port, initial=plant.current
            )
            sinks.append(await stack.enter_async_context(modbus))
        if options.opcua_port:
            opcua = PlantOpcUaServer(
                host=options.host, port=options.opcua_port, initial=plant.current
            )
            sinks.append(await stack.enter_async_context(opcua))
            namespace_index = opcua.namespace_index
        if options.bridge_config is not None:
            text = bridge_config_for(
                host=options.host,
                modbus_port=options.modbus_port,
                opcua_port=options.opcua_port,
                opcua_namespace_index=namespace_index,
                topic_prefix=options.topic_prefix,
                state_dir=options.bridge_state_dir,
                broker_host=options.broker_host,
                broker_port=options.broker_port,
                poll_interval_s=options.sample_period_s,
            )
            try:
                atomic_write(options.bridge_config, text.encode())
            except OSError as exc:
                raise ConfigError(
                    f"cannot write --write-bridge-config {str(options.bridge_config)!r}: {exc}"
                ) from exc
        if options.as_json:
            click.echo(json.dumps(_startup_document(options, namespace_index)))
            sys.stdout.flush()
        log_event(
            _logger,
            logging.INFO,
            "simulator serving",
            seed=options.seed,
            faults=" ".join(str(f) for f in options.faults) or "none",
            mode=options.mode,
            opcua=opcua_endpoint(options.host, options.opcua_port) if options.opcua_port else "off",
            modbus=f"{options.host}:{options.modbus_port}" if options.modbus_port else "off",
            speed=options.speed,
            sample_period_s=round(options.sample_period_s, 4),
        )
        live = LivePlant(plant, speed=options.speed, sinks=sinks, hours=options.hours)
        summary = await live.run(stop)
        log_event(
            _logger,
            logging.INFO,
            "simulator stopped",
            reason="signal" if stop.is_set() else "hours reached",
            samples=summary.samples,
            sim_hours=round(summary.hours, 3),
            worst_lag_s=round(summary.lag_s, 3),
        )


def _options(
    *,
    seed: int,
    faults: Sequence[str],
    mode: str,
    host: str,
    opcua_port: int,
    modbus_port: int,
    speed: float,
    sample_minutes: float,
    control_seconds: float,
    hours: float | None,
    bridge_config: Path | None,
    topic_prefix: str,
    bridge_state_dir: str,
    broker_host: str,
    broker_port: int,
    as_json: bool,
) -> SiteOptions:
    if not opcua_port and not modbus_port:
        raise click.UsageError("serve something: give --opcua-port and/or --modbus-port (not 0)")
    if opcua_port and opcua_port == modbus_port:
        raise click.UsageError("--opcua-port and --modbus-port must differ")
    _check_topic_prefix(topic_prefix)
    if bridge_config is not None:
        _check_config_path(bridge_config)
    return SiteOptions(
        seed=seed,
        faults=tuple(parse_fault_spec(text) for text in faults),
        mode=mode,
        host=host,
        opcua_port=opcua_port,
        modbus_port=modbus_port,
        speed=speed,
        sample_minutes=sample_minutes,
        control_seconds=control_seconds,
        hours=hours,
        bridge_config=bridge_config,
        topic_prefix=topic_prefix,
        # The bridge wants an absolute state_dir; a relative one means "from here".
        bridge_state_dir=os.path.abspath(bridge_state_dir),
        broker_host=broker_host,
        broker_port=broker_port,
        as_json=as_json,
    )


_PORT = click.IntRange(0, 65535)
_POSITIVE = click.FloatRange(min=0.0, min_open=True)

_HELP = f"""Serve a simulated Tennessee Eastman plant over OPC-UA and/or Modbus TCP.

\b
Tags (fixed order): XMEAS_1..41, XMV_1..11 (the Braatz TEP data layout) and FAULT
(the lowest active IDV, 0 in normal operation). Modbus: each tag a float32 in two
holding registers, high word first, at 0, 2, 4, ... (FAULT at 104); FAULT also as
uint16 input register 0. OPC-UA: Double nodes ns=<idx>;s=<TAG> under object Plant
of namespace {OPCUA_NAMESPACE_URI} (idx 2). Sample timestamps are the wall-clock
time each sample is published. The same --seed and --fault give the same values.

\b
--fault IDV[:START[:MAGNITUDE]] (repeatable): IDV 1..28 switched on at START
simulated hours (default 0) with MAGNITUDE in (0, 1] (default 1). IDV6 (A feed
loss) trips the plant about 7.4 simulated hours after its start (exit 7).

\b
--speed is simulated seconds per wall second: 180 publishes one 3-minute sample per
second; one core sustains about 1.2-1.4 simulated hours per wall second (speed ~4000).

\b
Example (one site, fault 6 after one simulated hour, a bridge config for it):
  fedgate-bridge simulate --plant tep --seed 1 --fault IDV6:1.0 \\
      --opcua-port 4840 --modbus-port 5020 --speed 180 \\
      --write-bridge-config site-1/bridge.toml --topic-prefix plant/site-1

{EXIT_CODES_HELP}
"""


def _listen_host(ctx: click.Context, param: click.Parameter, value: str) -> str:
    problem = host_problem(value)
    if problem is not None:
        raise click.BadParameter(f"{value!r}: {problem}")
    return value


@click.command("simulate", help=_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--plant", type=click.Choice(["tep"]), default="tep", show_default=True)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Noise and random-disturbance seed.",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="IDV[:START[:MAGNITUDE]]",
    help="Disturbance to switch on (repeatable).",
)
@click.option("--opcua-port", type=_PORT, default=0, show_default=True, help="0 = no OPC-UA.")
@click.option("--modbus-port", type=_PORT, default=0, show_default=True, help="0 = no Modbus.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    callback=_listen_host,
    help="Address to listen on.",
)
@click.option(
    "--speed",
    type=_POSITIVE,
    default=180.0,
    show_default=True,
    help="Simulated seconds per wall second.",
)
@click.option(
    "--sample-minutes",
    type=_POSITIVE,
    default=3.0,
    show_default=True,
    help="Simulated minutes between published samples.",
)
@click.option(
    "--control-seconds",
    type=_POSITIVE,
    default=CONTROL_SECONDS,
    show_default=True,
    help="Controller/integration step; larger runs faster, less faithfully.",
)
@click.option(
    "--hours",
    type=_POSITIVE,
    default=None,
    help="Stop after this many simulated hours (default: run until stopped).",
)
@click.option(
    "--mode",
    type=click.Choice(PLANT_MODES),
    default="mode1",
    show_default=True,
    help="tep-studio operating mode (mode1 = base case).",
)
@click.option(
    "--write-bridge-config",
    "bridge_config",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a fedgate-bridge TOML config for this site.",
)
@click.option(
    "--topic-prefix", default="plant/site-1", show_default=True, help="Bridge config: topic_prefix."
)
@click.option(
    "--bridge-state-dir",
    default="/var/lib/fedgate-bridge",
    show_default=True,
    help="Bridge config: state_dir.",
)
@click.option(
    "--broker-host", default="127.0.0.1", show_default=True, help="Bridge config: broker host."
)
@click.option(
    "--broker-port",
    type=click.IntRange(1, 65535),
    default=1883,
    show_default=True,
    help="Bridge config: broker port.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print endpoints and register map as one JSON line on start.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def simulate(
    plant: str,
    seed: int,
    faults: tuple[str, ...],
    opcua_port: int,
    modbus_port: int,
    host: str,
    speed: float,
    sample_minutes: float,
    control_seconds: float,
    hours: float | None,
    mode: str,
    bridge_config: Path | None,
    topic_prefix: str,
    bridge_state_dir: str,
    broker_host: str,
    broker_port: int,
    as_json: bool,
    log_level: str,
) -> None:
    configure_logging(log_level)
    if log_level != "debug":
        # Their start-up chatter (security-policy notices, session timeouts) is noise here.
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        logging.getLogger("pymodbus").setLevel(logging.WARNING)
    try:
        options = _options(
            seed=seed,
            faults=faults,
            mode=mode,
            host=host,
            opcua_port=opcua_port,
            modbus_port=modbus_port,
            speed=speed,
            sample_minutes=sample_minutes,
            control_seconds=control_seconds,
            hours=hours,
            bridge_config=bridge_config,
            topic_prefix=topic_prefix,
            bridge_state_dir=bridge_state_dir,
            broker_host=broker_host,
            broker_port=broker_port,
            as_json=as_json,
        )
        site = TepPlant(
            seed=options.seed,
            faults=options.faults,
            mode=options.mode,
            sample_minutes=options.sample_minutes,
            control_seconds=options.control_seconds,
        )
        asyncio.run(_serve(options, site))
    except ConfigError as exc:
        fail(str(exc), SimulateExitCode.CONFIG)
    except PlantShutdown as exc:
        log_event(
            _logger,
            logging.ERROR,
            "plant shut down",
            sim_hours=round(exc.time_h, 3),
            reason=exc.reason,
        )
        fail(str(exc), SimulateExitCode.SIMULATOR_FAILED)
    except SimulatorError as exc:
        fail(str(exc), SimulateExitCode.SIMULATOR_FAILED)


if __name__ == "__main__":  # `python -m fedgate_bridge.simulate_cli`, usable without cli.py
    simulate()
