"""Carry out an :class:`~fedgate_common.service_units.InstallPlan` on the file system.

This is the one module of fedgate-common that touches files (and runs
``systemd-sysusers`` / ``systemctl``): the three distributions share nothing else, and
the installer must behave the same for all of them
(docs/decisions/0036-service-installer-in-common.md). It opens no sockets and no
event loop.

Rules: nothing is written before every conflict is known (an edited unit is refused as a
whole, unless ``force``); an existing configuration is always kept; files are replaced
atomically; ``dry_run`` reports the same outcomes without changing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import IntEnum
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final, TypeVar

from fedgate_common.atomic_files import atomic_write
from fedgate_common.service_units import (
    CREDENTIALS_SOURCE_DIR,
    InstallConfigError,
    InstallConflict,
    InstallError,
    InstallPlan,
    InstallStep,
    InstallUsageError,
    ServiceSpec,
    is_unedited,
    plan_install,
)

__all__ = [
    "INSTALL_EXIT_CODES_HELP",
    "INSTALL_OPTIONS",
    "InstallExit",
    "StepOutcome",
    "apply_plan",
    "config_template",
    "exit_code_of",
    "find_program",
    "install_report",
    "install_service",
    "outcomes_as_json",
    "outcomes_as_text",
    "read_toml",
    "require_root",
    "secrets_hint",
    "with_install_options",
]


class InstallExit(IntEnum):
    """Exit codes of every ``install-service`` command (the same in all distributions)."""

    OK = 0
    FAILURE = 1  # a step failed
    USAGE = 2  # bad command line, or not root for a real install
    CONFIG = 3  # the configuration or the template cannot be read
    CONFLICT = 5  # an installed file was changed by hand


INSTALL_EXIT_CODES_HELP = """\b
Exit codes:
  0 installed (or, with --dry-run, would install)   1 a step failed
  2 bad command line, or not root for a real install
  3 the configuration or its template cannot be read
  5 an installed file was changed by hand (use a drop-in, or --force)"""


def exit_code_of(error: InstallError) -> InstallExit:
    return InstallExit[error.kind.upper()]


SYSTEMD_RUNNING = "/run/systemd/system"  # exists when systemd is the init system


@dataclass(frozen=True)
class StepOutcome:
    action: str
    target: str  # path or command line
    outcome: str  # create | replace | unchanged | keep | refuse | run | skip (+ done forms)
    why: str


def require_root(*, root: str, euid: int) -> None:
    """A real install (root "/") changes /etc and creates users: only root may."""
    if root == "/" and euid != 0:
        raise InstallUsageError(
            "installing into / needs root: run it with sudo, or pass --root DIR to write "
            "a staging tree, or --dry-run to see what would be done"
        )


def find_program(name: str, *, explicit: str | None, argv0: str) -> str:
    """The absolute path of the installed console script ``name`` for ``ExecStart``:
    ``explicit`` (``--exec``), else the script running now, else ``name`` on ``PATH``."""
    if explicit:
        if not os.path.isabs(explicit):
            raise InstallUsageError(f"--exec {explicit!r} must be an absolute path")
        return explicit
    if Path(argv0).name == name and os.access(argv0, os.X_OK):
        return os.path.abspath(argv0)
    found = shutil.which(name)
    if found is None:
        raise InstallUsageError(f"cannot find the {name} program: pass --exec /path/to/{name}")
    return os.path.abspath(found)


def config_template(shipped: Traversable, *, explicit: Path | None) -> str:
    """The commented example configuration: ``explicit`` (``--config-template``) or the
    one ``shipped`` in the distribution's package (``<package>/templates/``)."""
    try:
        if explicit is not None:
            return explicit.read_text(encoding="utf-8")
        return shipped.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        where = explicit or shipped
        raise InstallConfigError(
            f"cannot read the configuration template {where} ({exc}): reinstall the package, "
            f"or pass --config-template with packaging/{shipped.name} of the fedgate release"
        ) from None


def read_toml(path: Path) -> dict[str, Any] | None:
    """An existing configuration as raw TOML (``None`` if there is none yet)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InstallConfigError(f"cannot read the configuration {path}: {exc}") from None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"cannot read {path}: {exc}") from None


def _evaluate(step: InstallStep, *, real: bool, force: bool) -> str:
    if step.action == "mkdir":
        return "unchanged" if Path(step.path).is_dir() else "create"
    if step.action == "run":
        if not real or (step.needs_running_systemd and not Path(SYSTEMD_RUNNING).is_dir()):
            return "skip"
        return "run" if shutil.which(step.argv[0]) else "skip"
    current = _read(step.path)
    if current is None:
        return "create"
    if current == step.content:
        return "unchanged"
    if step.existing == "keep":
        return "keep"
    return "replace" if force or is_unedited(current) else "refuse"


def _chown(path: Path, owner: str) -> None:
    user, _, group = owner.partition(":")
    try:
        shutil.chown(path, user=user, group=group or user)
    except (LookupError, OSError) as exc:
        raise InstallError(f"cannot give {path} to {owner}: {exc}") from None


def _carry_out(step: InstallStep, outcome: str, *, real: bool) -> str:
    path = Path(step.path)
    if step.action == "mkdir":
        if outcome == "create":
            path.mkdir(parents=True, mode=step.mode)
            os.chmod(path, step.mode)  # mkdir's mode is masked by the umask
        if real and step.owner:
            _chown(path, step.owner)
        return "created" if outcome == "create" else outcome
    if step.action == "write":
        if outcome in ("create", "replace"):
            atomic_write(path, step.content.encode(), mode=step.mode)  # makes the parents
            if real and step.owner:
                _chown(path, step.owner)
            return "created" if outcome == "create" else "replaced"
        return outcome
    if outcome == "run":
        result = subprocess.run(step.argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise InstallError(
                f"`{' '.join(step.argv)}` failed ({result.returncode}): {result.stderr.strip()}"
            )
        return "ran"
    return outcome


def install_conflict(paths: list[str]) -> InstallConflict:
    """The error for installed files that were changed by hand (exit 5)."""
    return InstallConflict(
        "these files were changed since install-service wrote them: "
        + ", ".join(paths)
        + "; keep local changes in a drop-in (`systemctl edit`) and pass --force to "
        "replace them",
        paths=paths,
    )


def apply_plan(plan: InstallPlan, *, dry_run: bool, force: bool) -> list[StepOutcome]:
    """Install (or, with ``dry_run``, only evaluate) ``plan``.

    Raises :class:`InstallConflict` before changing anything when an existing file would
    be replaced without ``force``. A dry run returns its outcomes with ``refuse`` for such
    files instead, so that the whole list can be shown.
    """
    real = plan.root == "/"
    evaluated = [(step, _evaluate(step, real=real, force=force)) for step in plan.steps]
    refused = [step.path for step, outcome in evaluated if outcome == "refuse"]
    if refused and not dry_run:
        raise install_conflict(refused)
    outcomes: list[StepOutcome] = []
    for step, outcome in evaluated:
        done = outcome if dry_run else _carry_out(step, outcome, real=real)
        target = " ".join(step.argv) if step.action == "run" else step.path
        outcomes.append(StepOutcome(action=step.action, target=target, outcome=done, why=step.why))
    return outcomes


# The options every ``install-service`` command takes, as click.option(*decls, **settings)
# arguments (fedgate-common does not depend on click; the commands apply them).
INSTALL_OPTIONS: Final[tuple[tuple[tuple[str, ...], dict[str, Any]], ...]] = (
    (
        ("--root",),
        {
            "default": "/",
            "metavar": "DIR",
            "show_default": True,
            "help": "Install into this staging tree instead of the running system.",
        },
    ),
    (("--dry-run",), {"is_flag": True, "help": "Print what would be done; change nothing."}),
    (("--force",), {"is_flag": True, "help": "Replace a unit or sysusers file edited by hand."}),
    (
        ("--exec", "program"),
        {
            "default": None,
            "metavar": "PATH",
            "help": "Absolute path of the program for ExecStart (default: this one).",
        },
    ),
    (
        ("--config-template", "template_path"),
        {
            "default": None,
            "metavar": "FILE",
            "help": "Commented configuration to install (default: the one shipped in the package).",
        },
    ),
    (("--json", "as_json"), {"is_flag": True, "help": "Print the steps as JSON."}),
)

_Command = TypeVar("_Command", bound=Callable[..., None])


def with_install_options(
    option: Callable[..., Callable[[_Command], _Command]],
) -> Callable[[_Command], _Command]:
    """A decorator adding :data:`INSTALL_OPTIONS` to a command: ``@with_install_options(
    click.option)``."""

    def decorate(command: _Command) -> _Command:
        for decls, settings in reversed(INSTALL_OPTIONS):
            command = option(*decls, **settings)(command)
        return command

    return decorate


def secrets_hint(config_file: str) -> str:
    return (
        f"secrets: root-only files in {CREDENTIALS_SOURCE_DIR}/, named in {config_file}; "
        "then run install-service again (LoadCredential=)"
    )


SpecBuilder = Callable[[dict[str, Any] | None, str, str], ServiceSpec]


def install_service(
    *,
    service: str,
    template: Traversable,
    config_file: str,
    build: SpecBuilder,
    root: str,
    dry_run: bool,
    force: bool,
    program: str | None,
    template_path: str | None,
    as_json: bool,
    existing_config: str = "",
) -> tuple[InstallExit, str, str]:
    """What every ``install-service`` command does: check the privileges, read the
    service's existing configuration under ``root`` (``existing_config``, default
    ``config_file``; if any), let ``build(existing, program, template)`` make the spec,
    plan and apply. Returns the exit code, the report for stdout ("" when nothing was
    planned; with ``as_json``, a failure's ``{error, exit_code}``) and the error for
    stderr ("" when none; a dry run that would refuse a file has both)."""
    try:
        root_text = str(Path(root).absolute())
        require_root(root=root_text, euid=0 if dry_run else os.geteuid())
        existing = read_toml(Path(root_text.rstrip("/") + (existing_config or config_file)))
        spec = build(
            existing,
            find_program(service, explicit=program, argv0=sys.argv[0]),
            config_template(template, explicit=Path(template_path) if template_path else None),
        )
        plan = plan_install(spec, root=root_text)
        outcomes = apply_plan(plan, dry_run=dry_run, force=force)
    except InstallError as exc:
        code = exit_code_of(exc)
        # with --json a script gets JSON on failure too, as from every other command
        failure = json.dumps({"error": str(exc), "exit_code": int(code)}, indent=2)
        return code, failure if as_json else "", f"error: {exc}"
    report = install_report(plan, outcomes, dry_run=dry_run, as_json=as_json)
    refused = [o.target for o in outcomes if o.outcome == "refuse"]  # a dry run's only
    if refused:
        return InstallExit.CONFLICT, report, f"error: {install_conflict(refused)}"
    return InstallExit.OK, report, ""


def install_report(
    plan: InstallPlan, outcomes: list[StepOutcome], *, dry_run: bool, as_json: bool
) -> str:
    if as_json:
        return json.dumps(outcomes_as_json(plan, outcomes, dry_run=dry_run), indent=2)
    return outcomes_as_text(plan, outcomes, dry_run=dry_run)


def outcomes_as_json(
    plan: InstallPlan, outcomes: list[StepOutcome], *, dry_run: bool
) -> dict[str, Any]:
    return {
        "service": plan.service,
        "root": plan.root,
        "dry_run": dry_run,
        "unit": plan.unit_path,
        "steps": [asdict(outcome) for outcome in outcomes],
        "next_steps": list(plan.next_steps),
    }


def outcomes_as_text(plan: InstallPlan, outcomes: list[StepOutcome], *, dry_run: bool) -> str:
    head = f"{plan.service}: {'would install' if dry_run else 'installed'} into {plan.root}"
    width = max(len(o.outcome) for o in outcomes)
    lines = [head]
    for outcome in outcomes:
        why = f"  ({outcome.why})" if outcome.why else ""
        lines.append(f"  {outcome.outcome:<{width}}  {outcome.action:<5}  {outcome.target}{why}")
    if plan.next_steps:
        lines.append("next:")
        lines += [f"  {step}" for step in plan.next_steps]
    return "\n".join(lines)
