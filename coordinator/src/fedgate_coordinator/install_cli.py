"""``fedgate-coordinator install-service``: the systemd unit, system user and directories
of a cloud's coordinator, and the commented example configuration."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import click
from fedgate_common.service_install import (
    INSTALL_EXIT_CODES_HELP,
    secrets_hint,
    with_install_options,
)
from fedgate_common.service_install import install_service as run_install
from fedgate_common.service_units import (
    CONFIG_DIR,
    ServiceSpec,
    credentials_in,
)

from fedgate_coordinator.config import CONFIG_NAME, DEFAULT_STATE_DIR, credential_names

__all__ = ["coordinator_service_spec", "install_service"]

SERVICE = "fedgate-coordinator"
SQLITE_PREFIX = "sqlite:////"


def _writable_paths(state_dir: str, config: dict[str, Any]) -> tuple[str, ...]:
    """Directories the coordinator writes outside its StateDirectory (ProtectSystem=strict
    makes everything else read-only): a custom state dir, a SQLite file elsewhere."""
    paths = [] if state_dir == str(DEFAULT_STATE_DIR) else [state_dir]
    url = str(config.get("database_url", ""))
    if url.startswith(SQLITE_PREFIX):
        folder = str(Path("/" + url[len(SQLITE_PREFIX) :]).parent)
        if folder != state_dir and not folder.startswith(state_dir + "/"):
            paths.append(folder)
    return tuple(paths)


def coordinator_service_spec(
    *, program: str, template: str, state_dir: str, config: dict[str, Any] | None
) -> ServiceSpec:
    """The coordinator's unit. ``config``: its coordinator.toml if ``init`` ran already
    (password files become ``LoadCredential=`` entries)."""
    raw = config or {}
    return ServiceSpec(
        name=SERVICE,
        description="fedgate coordinator: rounds, secure aggregation and consensus of a cloud",
        exec_start=(program, "--state-dir", state_dir, "serve"),
        # The live coordinator.toml is written by `init` into the state directory; the
        # commented example sits next to the other configurations for reference.
        config_file=f"{CONFIG_DIR}/coordinator.toml.example",
        config_template=template,
        watchdog_s=120,
        credentials=tuple(credentials_in(raw, credential_names(raw))),
        read_write_paths=_writable_paths(state_dir, raw),
        next_steps=(
            f"sudo -u {SERVICE} {program} --state-dir {state_dir} init --cloud CLOUD "
            "--deployment DEPLOYMENT (see operations.md section 3)",
            secrets_hint(f"{state_dir}/{CONFIG_NAME}"),
        ),
    )


@click.command("install-service", epilog=INSTALL_EXIT_CODES_HELP)
@with_install_options(click.option)
@click.pass_context
def install_service(ctx: click.Context, /, **options: Any) -> None:
    """Install the coordinator as a systemd service: unit, system user, directories.

    Writes /etc/systemd/system/fedgate-coordinator.service (ExecStart uses --state-dir),
    /etc/sysusers.d/fedgate-coordinator.conf, the state directory (0750) and
    /etc/fedgate/coordinator.toml.example. It neither enables nor starts the service.

    \b
    Example:
      sudo fedgate-coordinator install-service --dry-run
      sudo fedgate-coordinator --state-dir /var/lib/fedgate-coordinator install-service
      fedgate-coordinator install-service --root /tmp/stage --json
    """
    state_dir = str(Path(ctx.obj.state_dir).absolute())
    code, report, error = run_install(
        service=SERVICE,
        template=files("fedgate_coordinator") / "templates" / "coordinator.toml.example",
        config_file=f"{CONFIG_DIR}/coordinator.toml.example",
        existing_config=f"{state_dir}/{CONFIG_NAME}",
        build=lambda existing, program, template: coordinator_service_spec(
            program=program, template=template, state_dir=state_dir, config=existing
        ),
        **options,
    )
    if report:
        click.echo(report)
    if error:
        click.echo(error, err=True)
    sys.exit(int(code))
