"""``fedgate-bridge install-service``: the systemd unit, system user, directories and a
commented configuration for the bridge; serial Modbus ports become ``DeviceAllow=``."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib.resources import files
from typing import Any

import click
from fedgate_common.service_install import (
    INSTALL_EXIT_CODES_HELP,
    secrets_hint,
    with_install_options,
)
from fedgate_common.service_install import install_service as run_install
from fedgate_common.service_units import (
    ServiceSpec,
    credentials_in,
)

from fedgate_bridge.config import DEFAULT_CONFIG_PATH, credential_names

__all__ = ["bridge_service_spec", "install_service", "serial_ports"]

SERVICE = "fedgate-bridge"
DEFAULT_STATE_DIR = f"/var/lib/{SERVICE}"


def serial_ports(config: Mapping[str, Any] | None) -> list[str]:
    """The serial ports of the ``transport = "rtu"`` Modbus sources of a raw config."""
    sources = (config or {}).get("modbus", [])
    ports = [
        source.get("serial_port", "")
        for source in (sources if isinstance(sources, list) else [])
        if isinstance(source, dict) and source.get("transport") == "rtu"
    ]
    return [port for port in ports if isinstance(port, str) and port]


def bridge_service_spec(
    *,
    program: str,
    template: str,
    config: dict[str, Any] | None,
    serial_devices: tuple[str, ...] = (),
) -> ServiceSpec:
    """The bridge's unit. ``config``: an existing bridge.toml (its password files become
    ``LoadCredential=`` entries, its RTU serial ports ``DeviceAllow=``)."""
    raw = config or {}
    devices = tuple(dict.fromkeys([*serial_devices, *serial_ports(raw)]))
    state_dir = str(raw.get("state_dir", DEFAULT_STATE_DIR))
    return ServiceSpec(
        name=SERVICE,
        description="fedgate bridge: PLC registers and OPC-UA nodes to MQTT",
        exec_start=(program, "run", "--config", str(DEFAULT_CONFIG_PATH)),
        config_file=str(DEFAULT_CONFIG_PATH),
        config_template=template,
        watchdog_s=60,
        stop_timeout_s=30,
        credentials=tuple(credentials_in(raw, credential_names(raw))),
        devices=devices,
        groups=("dialout",) if devices else (),
        read_write_paths=(state_dir,) if state_dir != DEFAULT_STATE_DIR else (),
        next_steps=(
            f"edit {DEFAULT_CONFIG_PATH} (topic_prefix, broker, sources); check it with "
            f"{program} check --config {DEFAULT_CONFIG_PATH}",
            secrets_hint(str(DEFAULT_CONFIG_PATH)),
            "serial Modbus ports: --serial-device PORT or [[modbus]] serial_port, then "
            "install-service again (DeviceAllow=)",
        ),
    )


def _device_paths(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    for value in values:
        if not value.startswith("/dev/"):
            raise click.BadParameter(
                f"{value!r} is not a device path under /dev/ (such as /dev/ttyUSB0)"
            )
    return values


@click.command("install-service", epilog=INSTALL_EXIT_CODES_HELP)
@with_install_options(click.option)
@click.option(
    "--serial-device",
    "serial_devices",
    multiple=True,
    callback=_device_paths,
    help="Serial port for Modbus RTU (repeatable); those in the config are added anyway.",
)
def install_service(serial_devices: tuple[str, ...], **options: Any) -> None:
    """Install the bridge as a systemd service: unit, system user, directories, config.

    Writes /etc/systemd/system/fedgate-bridge.service, /etc/sysusers.d/fedgate-bridge.conf,
    /var/lib/fedgate-bridge (0750) and a commented /etc/fedgate/bridge.toml unless one
    exists. It neither enables nor starts the service.

    \b
    Example:
      sudo fedgate-bridge install-service --serial-device /dev/ttyUSB0 --dry-run
      sudo fedgate-bridge install-service --serial-device /dev/ttyUSB0
      fedgate-bridge install-service --root /tmp/stage --json
    """
    code, report, error = run_install(
        service=SERVICE,
        template=files("fedgate_bridge") / "templates" / "bridge.toml.example",
        config_file=str(DEFAULT_CONFIG_PATH),
        build=lambda existing, program, template: bridge_service_spec(
            program=program, template=template, config=existing, serial_devices=serial_devices
        ),
        **options,
    )
    if report:
        click.echo(report)
    if error:
        click.echo(error, err=True)
    sys.exit(int(code))
