"""systemd units, sysusers.d entries and install plans for the fedgate services (pure).

One :class:`ServiceSpec` per service (agent, coordinator, bridge) says what the service
needs: its command, user, directories, credentials and devices. From it this module
renders the unit file and the sysusers.d line and plans an installation as a list of
:class:`InstallStep` values. Nothing here touches the file system: the ``install-service``
commands of the three distributions hand the plan to :mod:`fedgate_common.service_install`.

Paths inside a spec are the paths *on the target system* (``/etc/fedgate/agent.toml``);
``plan_install`` prefixes them with the staging root for the files it writes, never inside
the unit text.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from fedgate_common.errors import FedgateError

__all__ = [
    "CONFIG_DIR",
    "CREDENTIALS_SOURCE_DIR",
    "SYSUSERS_DIR",
    "UNIT_DIR",
    "Credential",
    "InstallConfigError",
    "InstallConflict",
    "InstallError",
    "InstallPlan",
    "InstallStep",
    "InstallUsageError",
    "ServiceSpec",
    "SettingPath",
    "credential_file",
    "credentials_in",
    "is_unedited",
    "load_credentials_into",
    "plan_install",
    "render_sysusers",
    "render_unit",
    "seal",
]

CONFIG_DIR: Final = "/etc/fedgate"
CREDENTIALS_SOURCE_DIR: Final = "/etc/fedgate/credentials"  # root-only; systemd reads them
UNIT_DIR: Final = "/etc/systemd/system"  # the administrator's units, not the distribution's
SYSUSERS_DIR: Final = "/etc/sysusers.d"
STATE_ROOT: Final = "/var/lib"

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_CREDENTIAL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Exit statuses after which restarting cannot help: bad command line, bad configuration.
NO_RESTART_EXIT_CODES: Final = (2, 3)


class InstallError(FedgateError):
    """A service cannot be installed as asked (details in the message).

    ``kind`` names the failure for exit codes: ``failure`` (a step failed), ``usage``
    (command line, or not root), ``config`` (configuration or template unreadable),
    ``conflict`` (an edited file would be replaced).
    """

    kind = "failure"


class InstallUsageError(InstallError):
    kind = "usage"


class InstallConfigError(InstallError):
    kind = "config"


class InstallConflict(InstallError):
    """A file the installer would replace was changed by the operator.

    ``paths``: the files in question; pass ``--force`` to replace them.
    """

    kind = "conflict"

    def __init__(self, message: str, *, paths: list[str]) -> None:
        super().__init__(message)
        self.paths = paths


@dataclass(frozen=True, kw_only=True)
class Credential:
    """``LoadCredential=name:source``: systemd copies ``source`` (readable by root only)
    to ``$CREDENTIALS_DIRECTORY/name``, readable by the service alone."""

    name: str
    source: str
    setting: str  # the configuration key it stands for, for the operator


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    name: str  # unit, user, group and state directory name: "fedgate-agent"
    description: str
    exec_start: tuple[str, ...]  # absolute program path first
    config_file: str  # where the commented configuration goes on the target system
    config_template: str  # its text (kept if the file exists)
    watchdog_s: int = 120
    start_timeout_s: int = 300
    stop_timeout_s: int = 60
    environment: tuple[tuple[str, str], ...] = ()
    credentials: tuple[Credential, ...] = ()
    devices: tuple[str, ...] = ()  # serial ports and the like: DeviceAllow=... rw
    groups: tuple[str, ...] = ()  # SupplementaryGroups (dialout for serial ports)
    read_write_paths: tuple[str, ...] = ()  # outside the state directory
    address_families: tuple[str, ...] = ("AF_UNIX", "AF_INET", "AF_INET6")
    next_steps: tuple[str, ...] = ()  # printed after a successful install
    documentation: str = "https://github.com/fedgate/fedgate/blob/main/docs/operations.md"

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _NAME.match(self.name):
            problems.append(f"service name {self.name!r}: lower-case letters, digits and -")
        if not self.exec_start or not self.exec_start[0].startswith("/"):
            problems.append(f"ExecStart program {self.exec_start[:1]!r} must be an absolute path")
        for credential in self.credentials:
            if not _CREDENTIAL.match(credential.name):
                problems.append(f"credential name {credential.name!r}")
            if not credential.source.startswith("/"):
                problems.append(f"{credential.setting} = {credential.source!r}: not absolute")
        problems += [f"device {d!r} is not under /dev/" for d in self.devices if d[:5] != "/dev/"]
        problems += [f"{p!r} is not absolute" for p in self.read_write_paths if p[:1] != "/"]
        if any(("\n" in arg) for arg in self.exec_start):
            problems.append("ExecStart arguments must not contain newlines")
        if problems:
            raise InstallError("cannot build the unit: " + "; ".join(problems))

    @property
    def unit_name(self) -> str:
        return f"{self.name}.service"

    @property
    def state_directory(self) -> str:
        return f"{STATE_ROOT}/{self.name}"


def _quote_exec(args: tuple[str, ...]) -> str:
    # systemd's ExecStart quoting is close to the shell's for plain words; '%' and '$'
    # are specifiers / variables there and must be doubled.
    return " ".join(shlex.quote(a).replace("%", "%%").replace("$", "$$") for a in args)


def render_unit(spec: ServiceSpec) -> str:
    """The complete unit file text."""
    lines = [
        f"# {spec.unit_name}: written by `{spec.name} install-service`.",
        f"# Local changes: `systemctl edit {spec.name}` (a drop-in survives reinstalls).",
        "[Unit]",
        f"Description={spec.description}",
        f"Documentation={spec.documentation}",
        "Wants=network-online.target",
        # With systemd-time-wait-sync enabled, not before the clock is synchronised: readings
        # stamped "in the future" by a clock still behind are refused (operations.md §11).
        "After=network-online.target time-sync.target",
        # At most 5 failed starts in 10 minutes, then systemd gives up (reset-failed).
        "StartLimitIntervalSec=600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={_quote_exec(spec.exec_start)}",
        "Restart=on-failure",
        "RestartSec=5s",
        "RestartPreventExitStatus=" + " ".join(str(c) for c in NO_RESTART_EXIT_CODES),
        f"TimeoutStartSec={spec.start_timeout_s}s",
        f"TimeoutStopSec={spec.stop_timeout_s}s",
        f"WatchdogSec={spec.watchdog_s}s",
        f"User={spec.name}",
        f"Group={spec.name}",
    ]
    if spec.groups:
        lines.append("SupplementaryGroups=" + " ".join(spec.groups))
    lines += [
        f"StateDirectory={spec.name}",
        "StateDirectoryMode=0750",
        "ConfigurationDirectory=fedgate",
        "ConfigurationDirectoryMode=0755",
        "UMask=0027",
    ]
    lines += [f"Environment={key}={value}" for key, value in spec.environment]
    lines += [f"LoadCredential={c.name}:{c.source}" for c in spec.credentials]
    if spec.read_write_paths:
        lines.append("ReadWritePaths=" + " ".join(spec.read_write_paths))
    lines += [
        "",
        "# Hardening (`systemd-analyze security " + spec.name + "` scores it).",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
    ]
    if spec.devices:
        lines += ["PrivateDevices=no", "DevicePolicy=closed"]
        lines += [f"DeviceAllow={device} rw" for device in spec.devices]
    else:
        lines.append("PrivateDevices=yes")
    lines += [
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "RestrictAddressFamilies=" + " ".join(spec.address_families),
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def render_sysusers(spec: ServiceSpec) -> str:
    """The sysusers.d entry: a locked system user and group named after the service."""
    return (
        f"# {spec.name}: the system user of {spec.unit_name} (written by install-service)\n"
        f'u {spec.name} - "fedgate {spec.name[8:] or spec.name} service" '
        f"{spec.state_directory} /usr/sbin/nologin\n"
    )


_SEAL = "# fedgate-install-sha256: "


def seal(text: str) -> str:
    """``text`` plus a last comment line holding its digest: a later install can tell its
    own unedited file (replace it) from one an operator changed (refuse without --force)."""
    return f"{text}{_SEAL}{hashlib.sha256(text.encode()).hexdigest()}\n"


def is_unedited(text: str) -> bool:
    """True when ``text`` is a sealed file exactly as the installer wrote it."""
    body, marker, digest = text.rpartition(_SEAL)
    if not marker:
        return False
    return hashlib.sha256(body.encode()).hexdigest() == digest.strip()


def credential_file(
    configured: str,
    name: str,
    environ: Mapping[str, str],
    *,
    exists: Callable[[str], bool],
) -> str:
    """The file a service reads for a secret configured as ``configured``.

    Under systemd with ``LoadCredential={name}:...`` that is
    ``$CREDENTIALS_DIRECTORY/{name}``; otherwise (a terminal, or a unit without that
    credential) the configured path itself. ``""`` (no secret) stays ``""``.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY", "")
    if configured and directory:
        candidate = f"{directory.rstrip('/')}/{name}"
        if exists(candidate):
            return candidate
    return configured


SettingPath = tuple[str | int, ...]  # ("broker", "password_file"), ("opcua", 0, "password_file")


def _setting(raw: object, path: SettingPath) -> str:
    node = raw
    for part in path:
        if isinstance(part, int):
            if not isinstance(node, list) or not -len(node) <= part < len(node):
                return ""
            node = node[part]
        elif isinstance(node, dict):
            node = node.get(part, "")
        else:
            return ""
    return node if isinstance(node, str) else ""


def credentials_in(raw: Mapping[str, object], names: Mapping[SettingPath, str]) -> list[Credential]:
    """``LoadCredential`` entries for the secret files a raw (TOML) configuration names:
    ``names`` maps a setting to its credential name; unset settings are left out."""
    return [
        Credential(
            name=name,
            source=_setting(raw, path),
            setting=".".join(str(p) for p in path),
        )
        for path, name in names.items()
        if _setting(raw, path)
    ]


def load_credentials_into(
    raw: dict[str, object],
    names: Mapping[SettingPath, str],
    environ: Mapping[str, str],
    *,
    exists: Callable[[str], bool],
) -> None:
    """Point every secret setting of ``raw`` at its systemd credential when the service
    runs with one (:func:`credential_file`); a configuration loader calls this before
    validating, so a root-only source file is never opened by the service user."""
    for path, name in names.items():
        configured = _setting(raw, path)
        resolved = credential_file(configured, name, environ, exists=exists)
        if resolved == configured:
            continue
        node: Any = raw
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = resolved


@dataclass(frozen=True, kw_only=True)
class InstallStep:
    """One thing the installer does. ``path`` is inside the staging root (if any)."""

    action: Literal["mkdir", "write", "run"]
    path: str = ""
    mode: int = 0o644
    owner: str = ""  # "user:group", applied on real installs only (the user may not exist)
    content: str = ""
    # write, when the file exists with other content: keep it, or refuse to replace it
    # unless it is the installer's own unedited file (or --force)
    existing: Literal["keep", "refuse"] = "refuse"
    argv: tuple[str, ...] = ()
    real_only: bool = False  # run: only on the real system, not into a staging root
    needs_running_systemd: bool = False  # run: only when systemd is PID 1 (not in a chroot)
    why: str = ""


@dataclass(frozen=True, kw_only=True)
class InstallPlan:
    service: str
    root: str  # "/" for a real install
    unit_path: str
    steps: tuple[InstallStep, ...]
    next_steps: tuple[str, ...] = field(default=())


def _under(root: str, path: str) -> str:
    return path if root == "/" else root.rstrip("/") + path


def plan_install(spec: ServiceSpec, *, root: str = "/") -> InstallPlan:
    """Every step of installing ``spec`` under ``root`` ("/" = this system), in order."""
    if not root.startswith("/"):
        raise InstallUsageError(f"--root {root!r} must be an absolute path")
    owner = f"{spec.name}:{spec.name}"
    sysusers = f"{SYSUSERS_DIR}/{spec.name}.conf"
    unit = f"{UNIT_DIR}/{spec.unit_name}"
    steps = [
        InstallStep(action="mkdir", path=_under(root, CONFIG_DIR), mode=0o755, why="configs"),
        InstallStep(
            action="mkdir",
            path=_under(root, CREDENTIALS_SOURCE_DIR),
            mode=0o700,
            why="secrets read by systemd (LoadCredential), not by the service user",
        ),
        InstallStep(action="mkdir", path=_under(root, SYSUSERS_DIR), mode=0o755),
        InstallStep(
            action="write",
            path=_under(root, sysusers),
            content=seal(render_sysusers(spec)),
            why="the system user " + spec.name,
        ),
        InstallStep(
            action="run",
            argv=("systemd-sysusers", sysusers),
            real_only=True,
            why="create the user now",
        ),
        InstallStep(
            action="mkdir",
            path=_under(root, spec.state_directory),
            mode=0o750,
            owner=owner,
            why="state (StateDirectory=); exists before the first start for `init`",
        ),
        InstallStep(
            action="write",
            path=_under(root, spec.config_file),
            mode=0o640,
            owner=f"root:{spec.name}",
            content=spec.config_template,
            existing="keep",
            why="commented configuration; an existing one is kept",
        ),
        InstallStep(action="mkdir", path=_under(root, UNIT_DIR), mode=0o755),
        InstallStep(
            action="write",
            path=_under(root, unit),
            content=seal(render_unit(spec)),
            why="the unit; an edited one is replaced only with --force",
        ),
        InstallStep(
            action="run",
            argv=("systemctl", "daemon-reload"),
            real_only=True,
            needs_running_systemd=True,
            why="make systemd read the unit",
        ),
    ]
    return InstallPlan(
        service=spec.name,
        root=root,
        unit_path=_under(root, unit),
        steps=tuple(steps),
        next_steps=(
            *spec.next_steps,
            f"systemctl enable --now {spec.name}; journalctl -u {spec.name} -f",
        ),
    )
