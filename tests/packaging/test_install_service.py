"""`install-service` of the agent, coordinator and bridge, checked by systemd's own tools.

Each command installs into a staging root (``--root``); ``systemd-analyze verify`` must
accept every unit without a single warning, and ``systemd-sysusers --root`` must accept the
sysusers.d entries. The units shipped in packaging/ must be exactly what the commands write.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from fedgate_agent.cli import main as agent_main
from fedgate_bridge.cli import main as bridge_main
from fedgate_common.service_install import InstallExit
from fedgate_coordinator.cli import main as coordinator_main

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
SYSUSERS = "/usr/bin/systemd-sysusers"
SHIPPED_PROGRAM_DIR = "/opt/fedgate/bin"  # what packaging/systemd/*.service run

# service → (its CLI, where its commented configuration goes, the packaging/ template)
SERVICES: dict[str, tuple[click.Group, str, str]] = {
    "fedgate-agent": (agent_main, "etc/fedgate/agent.toml", "agent.toml.example"),
    "fedgate-coordinator": (
        coordinator_main,
        "etc/fedgate/coordinator.toml.example",
        "coordinator.toml.example",
    ),
    "fedgate-bridge": (bridge_main, "etc/fedgate/bridge.toml", "bridge.toml.example"),
}


def install(name: str, root: Path, *extra: str, program: str | None = None) -> tuple[int, str, str]:
    command, _, _ = SERVICES[name]
    result = CliRunner().invoke(
        command,
        ["install-service", "--root", str(root), "--exec", program or str(BIN / name), *extra],
    )
    return result.exit_code, result.stdout, result.stderr


def verify(unit: Path) -> str:
    """systemd-analyze's complaints about ``unit`` ('' = none); the test fails on any."""
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    return (
        f"rc={result.returncode} {result.stdout}{result.stderr}".strip()
        if (result.returncode or result.stdout.strip() or result.stderr.strip())
        else ""
    )


def unit_keys(unit: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def test_install_service_root_tree_is_accepted_by_systemd(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in SERVICES:
        code, out, err = install(name, root)
        assert code == 0, err
        assert f"{name}: installed into {root}" in out

    units = root / "etc/systemd/system"
    for name, (_, config, template) in SERVICES.items():
        unit = units / f"{name}.service"
        assert verify(unit) == "", f"{unit.name}: {verify(unit)}"
        keys = unit_keys(unit)
        assert keys["Type"] == ["notify"]
        assert keys["ExecStart"][0].startswith(str(BIN / name) + " ")
        assert keys["User"] == [name]
        assert keys["StateDirectory"] == [name]
        assert keys["Restart"] == ["on-failure"]
        assert int(keys["WatchdogSec"][0].rstrip("s")) >= 30
        for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
            assert keys[hardening] == ["yes"], hardening
        assert keys["ProtectSystem"] == ["strict"]
        assert keys["SystemCallFilter"][0] == "@system-service"
        assert (root / config).read_text() == (REPO / "packaging" / template).read_text()
        assert (root / config).stat().st_mode & 0o777 == 0o640
        assert (root / f"var/lib/{name}").stat().st_mode & 0o777 == 0o750
    assert (root / "etc/fedgate/credentials").stat().st_mode & 0o777 == 0o700

    # systemd-sysusers reads the entries and would create the three users in that root.
    (root / "etc/passwd").touch()
    (root / "etc/group").touch()
    users = subprocess.run(
        [SYSUSERS, f"--root={root}", "--dry-run"], capture_output=True, text=True, check=False
    )
    assert users.returncode == 0, users.stderr
    for name in SERVICES:
        assert f"Creating user '{name}'" in users.stderr + users.stdout


def test_the_verify_harness_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo and a missing program are both reported."""
    unit = tmp_path / "fedgate-broken.service"
    unit.write_text(
        "[Unit]\nDescription=x\n[Service]\nType=notify\nExecStart=/nonexistent/fedgate\n"
        "WatchdogSecs=30\n"
    )
    problems = verify(unit)
    assert "WatchdogSecs" in problems
    assert "/nonexistent/fedgate" in problems


def test_shipped_units_are_what_install_service_writes(tmp_path: Path) -> None:
    for name in SERVICES:
        code, _, err = install(name, tmp_path, program=f"{SHIPPED_PROGRAM_DIR}/{name}")
        assert code == 0, err
        for written, shipped in (
            (f"etc/systemd/system/{name}.service", f"systemd/{name}.service"),
            (f"etc/sysusers.d/{name}.conf", f"sysusers.d/{name}.conf"),
        ):
            assert filecmp.cmp(tmp_path / written, REPO / "packaging" / shipped, shallow=False), (
                f"packaging/{shipped} is stale: install-service --root DIR --exec "
                f"{SHIPPED_PROGRAM_DIR}/{name} writes {written} differently"
            )


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    code, out, err = install("fedgate-agent", tmp_path / "root", "--dry-run", "--json")
    assert code == 0, err
    assert '"dry_run": true' in out
    assert '"outcome": "create"' in out
    assert not (tmp_path / "root").exists()


def test_reinstall_keeps_config_and_refuses_an_edited_unit(tmp_path: Path) -> None:
    assert install("fedgate-agent", tmp_path)[0] == 0
    config = tmp_path / "etc/fedgate/agent.toml"
    unit = tmp_path / "etc/systemd/system/fedgate-agent.service"
    config.write_text(config.read_text().replace('"press-line-3"', '"line-9"'))

    code, out, _ = install("fedgate-agent", tmp_path)
    assert code == 0
    assert "unchanged  write" in out
    assert "keep       write" in out
    assert '"line-9"' in config.read_text()

    edited = unit.read_text().replace("RestartSec=5s", "RestartSec=1s")
    unit.write_text(edited)
    code, _, err = install("fedgate-agent", tmp_path)
    assert code == InstallExit.CONFLICT
    assert "fedgate-agent.service" in err
    assert "--force" in err
    assert unit.read_text() == edited
    code, out, _ = install("fedgate-agent", tmp_path, "--json")
    assert code == InstallExit.CONFLICT
    failure = json.loads(out)  # a script reading --json gets JSON on failure too
    assert failure["exit_code"] == int(InstallExit.CONFLICT)
    assert "--force" in failure["error"]

    code, out, err = install("fedgate-agent", tmp_path, "--dry-run")
    assert code == InstallExit.CONFLICT
    assert f"refuse     write  {unit}" in out  # the whole list, with what it would refuse
    assert "unchanged  write" in out
    assert "--force" in err
    assert unit.read_text() == edited

    code, out, _ = install("fedgate-agent", tmp_path, "--force")
    assert code == 0
    assert "replaced" in out
    assert "RestartSec=5s" in unit.read_text()


@pytest.mark.parametrize(
    ("name", "config", "edit", "expected"),
    [
        (
            "fedgate-agent",
            "etc/fedgate/agent.toml",
            lambda text: text.replace(
                'mqtt_password_file = ""',
                'mqtt_password_file = "/etc/fedgate/credentials/agent-mqtt"',
            ),
            [
                "LoadCredential=mqtt-password:/etc/fedgate/credentials/agent-mqtt",
            ],
        ),
        (
            "fedgate-bridge",
            "etc/fedgate/bridge.toml",
            lambda text: (
                text.replace(
                    'password_file = ""        # absolute',
                    'password_file = "/etc/fedgate/credentials/bridge-broker"  # absolute',
                )
                .replace('transport = "tcp"', 'transport = "rtu"', 1)
                .replace('serial_port = ""', 'serial_port = "/dev/ttyS0"', 1)
            ),
            [
                "LoadCredential=broker-password:/etc/fedgate/credentials/bridge-broker",
                "DeviceAllow=/dev/ttyS0 rw",
                "DeviceAllow=/dev/ttyUSB1 rw",
                "DevicePolicy=closed",
                "SupplementaryGroups=dialout",
            ],
        ),
    ],
)
def test_secrets_and_serial_ports_of_an_existing_config(
    tmp_path: Path, name: str, config: str, edit: Callable[[str], str], expected: list[str]
) -> None:
    assert install(name, tmp_path)[0] == 0
    path = tmp_path / config
    path.write_text(edit(path.read_text()))
    code, _, err = (
        install(name, tmp_path, "--serial-device", "/dev/ttyUSB1")
        if (name == "fedgate-bridge")
        else install(name, tmp_path)
    )
    assert code == 0, err
    unit = tmp_path / f"etc/systemd/system/{name}.service"
    text = unit.read_text()
    for line in expected:
        assert line in text.splitlines(), line
    assert verify(unit) == ""


def test_a_serial_device_outside_dev_is_a_bad_command_line(tmp_path: Path) -> None:
    code, _, err = install("fedgate-bridge", tmp_path, "--serial-device", "ttyUSB0")
    assert code == 2
    assert "'ttyUSB0' is not a device path under /dev/" in err
    assert not (tmp_path / "etc").exists()


def test_missing_template_is_a_config_error(tmp_path: Path) -> None:
    code, _, err = install(
        "fedgate-bridge", tmp_path, "--config-template", str(tmp_path / "nope.toml")
    )
    assert code == InstallExit.CONFIG
    assert "nope.toml" in err
    assert not (tmp_path / "etc").exists()
