"""One running instance per state directory (fedgate_common.instance_lock), the three
long-running commands that take it, and `fedgate-agent forget-rounds`, which waits for none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from fedgate_agent.cli import main as agent_main
from fedgate_agent.state import MODELS_DIR, AgentStatus, read_status, write_status
from fedgate_bridge.cli import main as bridge_main
from fedgate_common.instance_lock import AlreadyRunning, StateDirUnusable, single_instance

from tests.agent.test_data_cli import agent
from tests.bridge.test_bridge_delivery_faults import plc_bridge_config


def test_a_held_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    with single_instance(tmp_path, "prog") as path:
        assert path.read_text() == f"{os.getpid()}\n"
        with (
            pytest.raises(
                AlreadyRunning, match=rf"prog is already running on .* \(pid {os.getpid()};"
            ) as info,
            single_instance(tmp_path, "prog"),
        ):
            pass
        assert info.value.pid == os.getpid()
        with single_instance(tmp_path, "other"):  # another program's lock is its own
            pass
    with single_instance(tmp_path, "prog"):  # released at the end of the block
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            "from fedgate_common.instance_lock import single_instance\n"
            f"with single_instance(Path({str(tmp_path)!r}), 'prog'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning) as info, single_instance(tmp_path, "prog"):
            pass
        assert info.value.pid == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    with single_instance(tmp_path, "prog"):  # the kernel dropped the lock with the process
        pass


def test_a_directory_that_cannot_hold_the_lock_is_a_clear_error(tmp_path: Path) -> None:
    with (
        pytest.raises(StateDirUnusable, match=r"state directory .*missing.* cannot be used"),
        single_instance(tmp_path / "missing", "prog"),
    ):
        pass


def test_agent_run_refuses_a_state_directory_in_use(tmp_path: Path) -> None:
    config = agent(tmp_path)
    with single_instance(tmp_path / "state", "fedgate-agent"):
        result = CliRunner().invoke(agent_main, ["run", "--config", str(config)])
    assert result.exit_code == 4, result.output
    assert "fedgate-agent is already running on" in result.output


def test_bridge_run_refuses_a_state_directory_in_use(tmp_path: Path) -> None:
    config = plc_bridge_config(tmp_path, broker_port=1883, modbus_port=5020)
    (tmp_path / "state").mkdir()
    with single_instance(tmp_path / "state", "fedgate-bridge"):
        result = CliRunner().invoke(bridge_main, ["run", "--config", str(config)])
    assert result.exit_code == 4, result.output
    assert "fedgate-bridge is already running on" in result.output


def test_forget_rounds_keeps_the_privacy_counts_and_refuses_a_running_agent(
    tmp_path: Path,
) -> None:
    """After a coordinator store is restored from an older backup. The documented way was
    to delete status.json, which also threw away the counts that detect a rolled-back
    privacy ledger (operations.md §13.5)."""
    config = agent(tmp_path)
    state_dir = tmp_path / "state"
    write_status(
        state_dir,
        AgentStatus(last_answered_round=7, model_round=7, model_digest="ab" * 32, privacy_rounds=3),
    )
    (state_dir / MODELS_DIR).mkdir()
    (state_dir / MODELS_DIR / "000007-abababababababab.fgm").write_bytes(b"model")
    (state_dir / MODELS_DIR / "current.fgm").write_bytes(b"model")
    forget = ["forget-rounds", "--config", str(config), "--json"]
    with single_instance(state_dir, "fedgate-agent"):
        refused = CliRunner().invoke(agent_main, forget)
    assert refused.exit_code == 4, refused.output
    assert read_status(state_dir).last_answered_round == 7  # nothing changed
    result = CliRunner().invoke(agent_main, forget)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "forgot": {"last_answered_round": 7, "model_round": 7},
        "removed_models": ["000007-abababababababab.fgm", "current.fgm"],
        "privacy_ledger": "kept",
    }
    after = read_status(state_dir)
    assert (after.last_answered_round, after.model_round, after.model_digest) == (0, None, None)
    assert after.privacy_rounds == 3
    assert list((state_dir / MODELS_DIR).iterdir()) == []
