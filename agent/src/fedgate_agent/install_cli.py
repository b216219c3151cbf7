"""``fedgate-agent install-service``: the systemd unit, system user, directories and a
commented configuration for the agent on a gateway."""

from __future__ import annotations

import sys
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

from fedgate_agent.config import DEFAULT_CONFIG_PATH, credential_names

__all__ = ["agent_service_spec", "install_service"]

SERVICE = "fedgate-agent"
DEFAULT_STATE_DIR = f"/var/lib/{SERVICE}"


def agent_service_spec(
    *, program: str, template: str, config: dict[str, object] | None
) -> ServiceSpec:
    """The agent's unit. ``config``: the gateway's agent.toml if it exists already (its
    secret files become ``LoadCredential=`` entries, a custom state_dir stays writable)."""
    raw = config or {}
    credentials = tuple(credentials_in(raw, credential_names(raw)))
    state_dir = str(raw.get("state_dir", DEFAULT_STATE_DIR))
    return ServiceSpec(
        name=SERVICE,
        description="fedgate agent: federated learning on this gateway",
        exec_start=(program, "run", "--config", str(DEFAULT_CONFIG_PATH)),
        config_file=str(DEFAULT_CONFIG_PATH),
        config_template=template,
        watchdog_s=120,
        credentials=credentials,
        read_write_paths=(state_dir,) if state_dir != DEFAULT_STATE_DIR else (),
        next_steps=(
            f"edit {DEFAULT_CONFIG_PATH} (agent_id, deployment, cloud, broker, sources)",
            secrets_hint(str(DEFAULT_CONFIG_PATH)),
            f"sudo -u {SERVICE} {program} init --config {DEFAULT_CONFIG_PATH}",
        ),
    )


@click.command("install-service", epilog=INSTALL_EXIT_CODES_HELP)
@with_install_options(click.option)
def install_service(**options: Any) -> None:
    """Install the agent as a systemd service: unit, system user, directories, config.

    Writes /etc/systemd/system/fedgate-agent.service, /etc/sysusers.d/fedgate-agent.conf,
    /var/lib/fedgate-agent (0750) and a commented /etc/fedgate/agent.toml unless one
    exists. It neither enables nor starts the service.

    \b
    Example:
      sudo fedgate-agent install-service --dry-run
      sudo fedgate-agent install-service
      fedgate-agent install-service --root /tmp/stage --json
    """
    code, report, error = run_install(
        service=SERVICE,
        template=files("fedgate_agent") / "templates" / "agent.toml.example",
        config_file=str(DEFAULT_CONFIG_PATH),
        build=lambda existing, program, template: agent_service_spec(
            program=program, template=template, config=existing
        ),
        **options,
    )
    if report:
        click.echo(report)
    if error:
        click.echo(error, err=True)
    sys.exit(int(code))
