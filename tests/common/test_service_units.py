"""The pure parts of the systemd support: notify environment, units, credentials, plans."""

from __future__ import annotations

import pytest
from fedgate_common.service_install import InstallExit, exit_code_of, require_root
from fedgate_common.service_notify import ServiceNotifier, notify_address, watchdog_interval_s
from fedgate_common.service_units import (
    Credential,
    InstallError,
    InstallUsageError,
    ServiceSpec,
    credential_file,
    is_unedited,
    plan_install,
    render_unit,
    seal,
)


def spec(**changes: object) -> ServiceSpec:
    fields: dict[str, object] = {
        "name": "fedgate-test",
        "description": "test",
        "exec_start": ("/opt/fedgate/bin/fedgate-test", "run"),
        "config_file": "/etc/fedgate/test.toml",
        "config_template": "# test\n",
    }
    fields.update(changes)
    return ServiceSpec(**fields)  # type: ignore[arg-type]


def test_notify_addresses() -> None:
    assert notify_address(None) is None
    assert notify_address("") is None
    assert notify_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert notify_address("@abstract/name") == b"\0abstract/name"
    assert notify_address("vsock:2:1234") is None


def test_watchdog_interval_is_half_and_only_for_this_pid() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, pid=7) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "7"}, pid=7) == 0.1
    assert watchdog_interval_s({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, pid=7) is None
    assert watchdog_interval_s({}, pid=7) is None


def test_without_notify_socket_nothing_is_opened_or_sent() -> None:
    def refuse() -> object:
        raise AssertionError("no socket may be opened without NOTIFY_SOCKET")

    notifier = ServiceNotifier.from_environ(
        {"WATCHDOG_USEC": "100"},
        pid=1,
        open_socket=refuse,  # type: ignore[arg-type]
    )
    notifier.ready("x")
    notifier.watchdog()
    assert not notifier.enabled
    assert notifier.watchdog_s is None
    assert notifier.sent == 0


def test_a_failing_socket_is_counted_not_raised() -> None:
    class Broken:
        def sendto(self, data: bytes, address: bytes, /) -> int:
            raise ConnectionRefusedError("systemd went away")

        def close(self) -> None:
            pass

    notifier = ServiceNotifier(address=b"/x", sender=Broken(), watchdog_s=1.0)
    notifier.ready()
    notifier.watchdog()
    assert notifier.send_errors == 2
    assert notifier.sent == 0


def test_unit_quotes_exec_arguments_and_specifiers() -> None:
    unit = render_unit(
        spec(exec_start=("/opt/fedgate/bin/fedgate-test", "--state-dir", "/srv/a b", "50%"))
    )
    assert "ExecStart=/opt/fedgate/bin/fedgate-test --state-dir '/srv/a b' 50%%" in unit


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "Fedgate Agent"},
        {"exec_start": ("fedgate-agent", "run")},
        {"credentials": (Credential(name="a/b", source="/etc/x", setting="k"),)},
        {"credentials": (Credential(name="ok", source="relative", setting="k"),)},
        {"devices": ("ttyUSB0",)},
    ],
)
def test_bad_specs_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(InstallError):
        spec(**changes)


def test_serial_devices_replace_private_devices() -> None:
    plain = render_unit(spec()).splitlines()
    serial = render_unit(spec(devices=("/dev/ttyUSB0",), groups=("dialout",))).splitlines()
    assert "PrivateDevices=yes" in plain
    assert "DeviceAllow=/dev/ttyUSB0 rw" not in plain
    assert "PrivateDevices=no" in serial
    assert "DevicePolicy=closed" in serial
    assert "DeviceAllow=/dev/ttyUSB0 rw" in serial
    assert "SupplementaryGroups=dialout" in serial


def test_seal_tells_own_files_from_edited_ones() -> None:
    sealed = seal(render_unit(spec()))
    assert is_unedited(sealed)
    assert not is_unedited(sealed.replace("Restart=on-failure", "Restart=always"))
    assert not is_unedited(render_unit(spec()))


def test_plan_writes_only_under_the_staging_root() -> None:
    plan = plan_install(spec(), root="/stage")
    paths = [step.path for step in plan.steps if step.action != "run"]
    assert all(path.startswith("/stage/") for path in paths)
    assert all(step.real_only for step in plan.steps if step.action == "run")
    with pytest.raises(InstallUsageError):
        plan_install(spec(), root="relative")


def test_real_installs_need_root() -> None:
    with pytest.raises(InstallUsageError, match="needs root") as caught:
        require_root(root="/", euid=1000)
    assert exit_code_of(caught.value) == InstallExit.USAGE
    require_root(root="/tmp/stage", euid=1000)
    require_root(root="/", euid=0)


def test_credential_file_prefers_the_systemd_copy() -> None:
    env = {"CREDENTIALS_DIRECTORY": "/run/credentials/fedgate-bridge.service"}
    present = {"/run/credentials/fedgate-bridge.service/broker-password"}
    assert credential_file("/etc/x", "broker-password", env, exists=present.__contains__) == (
        "/run/credentials/fedgate-bridge.service/broker-password"
    )
    assert credential_file("/etc/x", "other", env, exists=present.__contains__) == "/etc/x"
    assert credential_file("", "broker-password", env, exists=present.__contains__) == ""
    assert credential_file("/etc/x", "broker-password", {}, exists=present.__contains__) == (
        "/etc/x"
    )
