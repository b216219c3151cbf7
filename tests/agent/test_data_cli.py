"""`fedgate-agent import`, `windows` and the data-path part of `status`, as operators run them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import nacl.signing
from click.testing import CliRunner
from fedgate_agent.cli import ExitCode
from fedgate_agent.cli import main as agent_main
from fedgate_agent.state import AgentStatus, ScoringStatus, write_status
from fedgate_common.consensus.manifest import encode_manifest_file
from fedgate_common.instance_lock import single_instance
from fedgate_common.model_spec import ModelSpec

from tests.agent.ingest.test_ingest_buffer import _frame_offset, _killed_after_60_commits
from tests.federation_support import federation_manifest

TAGS = ("temp", "flow")
SPEC = ModelSpec(n_features=len(TAGS), window=6, n_classes=2, channels=4)


def agent(tmp_path: Path) -> Path:
    """An initialised agent whose manifest names SPEC, set to train from its buffer."""
    runner = CliRunner()
    config = tmp_path / "agent.toml"
    init = ["init", "--config", str(config), "--agent-id", "gw-1"]
    assert runner.invoke(agent_main, [*init, "--state-dir", str(tmp_path / "state")]).exit_code == 0
    manifest = tmp_path / "federation.json"
    key = nacl.signing.SigningKey.generate()
    signed = federation_manifest(deployment="fedgate", keys={"cloud-1": key}, spec=SPEC)
    manifest.write_bytes(encode_manifest_file(signed))
    pin = runner.invoke(agent_main, ["federation", "pin", "--config", str(config), str(manifest)])
    assert pin.exit_code == 0, pin.output
    for key_name, value in (
        ("windows.tags", ",".join(TAGS)),
        ("windows.period_s", "60"),
        ("windows.label_tag", "fault"),
        ("windows.test_fraction", "0.25"),
        ("training.source", "buffer"),
    ):
        result = runner.invoke(
            agent_main, ["config", "set", "--config", str(config), key_name, value]
        )
        assert result.exit_code == 0, result.output
    return config


def historian_csv(path: Path, minutes: int) -> int:
    """A long-layout export: one row per tag and minute; the fault flag turns on halfway."""
    rows = 0
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Timestamp", "TagName", "Value"])
        for minute in range(minutes):
            stamp = f"2026-11-01T{minute // 60:02d}:{minute % 60:02d}:00Z"
            writer.writerow([stamp, "temp", 20.0 + minute / 10])
            writer.writerow([stamp, "flow", 3.0 - minute / 100])
            writer.writerow([stamp, "fault", int(minute >= minutes // 2)])
            rows += 3
        writer.writerow(["not a time", "temp", "1.0"])  # one bad row: counted, not fatal
    return rows


def test_import_twice_stores_once_and_windows_follow(tmp_path: Path) -> None:
    config = agent(tmp_path)
    export = tmp_path / "line3.csv"
    rows = historian_csv(export, minutes=120)
    runner = CliRunner()
    first = runner.invoke(agent_main, ["import", "--config", str(config), str(export), "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert (report["inserted"], report["duplicates"], report["rejected"]) == (rows, 0, 1)
    assert report["tags"] == ["fault", "flow", "temp"]
    again = json.loads(
        runner.invoke(agent_main, ["import", "--config", str(config), str(export), "--json"]).output
    )
    assert (again["inserted"], again["duplicates"]) == (0, rows)

    windows = runner.invoke(agent_main, ["windows", "--config", str(config), "--json"])
    assert windows.exit_code == 0, windows.output
    shown = json.loads(windows.output)
    assert shown["train_windows"] > 0
    assert shown["test_windows"] > 0
    assert set(shown["train_per_class"]) == {"0", "1"}  # the fault starts before the test part
    assert shown["test_per_class"] == {"1": shown["test_windows"]}

    status = json.loads(
        runner.invoke(agent_main, ["status", "--config", str(config), "--json"]).output
    )
    assert status["running"] is False
    assert status["ingest"]["buffer"]["samples"] == rows
    assert status["ingest"]["buffer"]["counters"]["inserted"] == rows
    human = runner.invoke(agent_main, ["status", "--config", str(config)])
    assert f"{rows:,} samples of 5,000,000 (reject_new)" in human.output


def test_a_damaged_buffer_is_a_data_error_for_windows_and_a_status_line(tmp_path: Path) -> None:
    """Pages that SQLite finds malformed when windows or a stopped agent's status reads
    them: windows exits 4 naming the way out, status still shows the rest; the file stays
    for `run` or `import` to move aside."""
    config = agent(tmp_path)
    export = tmp_path / "line3.csv"
    historian_csv(export, minutes=600)
    runner = CliRunner()
    assert (
        runner.invoke(agent_main, ["import", "--config", str(config), str(export)]).exit_code == 0
    )
    buffer = tmp_path / "state" / "ingest" / "buffer.db"
    data = bytearray(buffer.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    for offset in range(4 * page_size, len(data), page_size):  # keep the schema and meta
        data[offset : offset + 64] = b"\xa5" * 64
    buffer.write_bytes(bytes(data))
    windows = runner.invoke(agent_main, ["windows", "--config", str(config)])
    assert windows.exit_code == ExitCode.DATA, windows.output
    assert "malformed" in windows.output
    assert "moves it aside" in windows.output
    status = runner.invoke(agent_main, ["status", "--config", str(config)])
    assert status.exit_code == 0, status.output
    assert "buffer     unreadable:" in status.output
    assert buffer.read_bytes() == bytes(data)
    moved = runner.invoke(agent_main, ["import", "--config", str(config), str(export)])
    assert moved.exit_code == 0, moved.output
    assert list(buffer.parent.glob("buffer.db.corrupt-*"))


def test_import_errors_exit_with_the_data_code(tmp_path: Path) -> None:
    config = agent(tmp_path)
    export = tmp_path / "odd.csv"
    export.write_text("when,what\n1,2\n")
    result = CliRunner().invoke(agent_main, ["import", "--config", str(config), str(export)])
    assert result.exit_code == ExitCode.DATA
    assert "when" in result.output  # the columns it found
    bad_rename = CliRunner().invoke(
        agent_main, ["import", "--config", str(config), str(export), "--rename", "x"]
    )
    assert bad_rename.exit_code == ExitCode.USAGE


def test_import_lists_refused_lines_and_tags_without_raw_control_characters(
    tmp_path: Path,
) -> None:
    config = agent(tmp_path)
    export = tmp_path / "wide.csv"
    stamp = "2026-11-01T00:0{}:00Z"
    export.write_text(
        f'timestamp,temp,"fl\x1bow"\n{stamp.format(0)},1,2\n{stamp.format(1)},"3,4\n'
        f"{stamp.format(2)},5,6\n",
        newline="",
    )
    result = CliRunner().invoke(agent_main, ["import", "--config", str(config), str(export)])
    assert result.exit_code == 0, result.output
    assert "rows 3: 2 samples new, 0 already in the buffer, 3 rejected" in result.output
    assert "line 2 'fl\\x1bow': bad_tag ('2')" in result.output
    assert "line 3 temp: unmatched_quote" in result.output
    assert "line 4 'fl\\x1bow': bad_tag ('6')" in result.output
    assert "\x1b" not in result.output


def test_import_says_how_to_take_tags_named_by_path(tmp_path: Path) -> None:
    config = agent(tmp_path)
    export = tmp_path / "ignition.csv"
    export.write_text(
        "t_stamp,tagpath,value\n2026-11-01T00:00:00Z,Line3/temp,1.5\n"
        "2026-11-01T00:01:00Z,Line3/temp,1.6\n"
    )
    command = ["import", "--config", str(config), str(export)]
    refused = CliRunner().invoke(
        agent_main, [*command, "--timestamp-column", "t_stamp", "--tag-column", "tagpath"]
    )
    assert refused.exit_code == 0, refused.output
    assert "2 rejected" in refused.output
    assert "run again with --slash-as ." in refused.output
    taken = CliRunner().invoke(
        agent_main,
        [*command, "--timestamp-column", "t_stamp", "--tag-column", "tagpath", "--slash-as", "."],
    )
    assert taken.exit_code == 0, taken.output
    assert "2 samples new" in taken.output
    assert "Line3.temp" in taken.output
    bad = CliRunner().invoke(agent_main, [*command, "--slash-as", "/"])
    assert bad.exit_code == ExitCode.DATA  # as every other invalid column mapping
    assert "slash_as" in bad.output


def test_windows_without_data_say_what_is_missing(tmp_path: Path) -> None:
    config = agent(tmp_path)
    result = CliRunner().invoke(agent_main, ["windows", "--config", str(config)])
    assert result.exit_code == ExitCode.DATA
    assert "no buffer" in result.output
    other = tmp_path / "other.csv"
    other.write_text("timestamp,tag,value\n2026-11-01T00:00:00Z,pressure,1.5\n")
    imported = CliRunner().invoke(agent_main, ["import", "--config", str(config), str(other)])
    assert imported.exit_code == 0, imported.output
    result = CliRunner().invoke(agent_main, ["windows", "--config", str(config)])
    assert result.exit_code == ExitCode.DATA
    assert "temp" in result.output  # names the tags that have no samples
    assert "pressure" in result.output  # and what the buffer holds instead


def test_status_shows_the_scoring_model_and_alerts(tmp_path: Path) -> None:
    config = agent(tmp_path)
    scoring = ScoringStatus(
        state="scoring",
        live=True,
        model_digest="ab" * 32,
        model_round=4,
        windows_scored=1234,
        alerts_raised=2,
        alert_active=True,
        last_error="window incomplete: XMEAS_3 missing",
    )
    write_status(tmp_path / "state", AgentStatus(agent_id="site-1", scoring=scoring))
    human = CliRunner().invoke(agent_main, ["status", "--config", str(config)])
    assert human.exit_code == 0, human.output
    assert (
        "scoring    scoring, model round 4 (abababababab), 1234 windows scored, 2 alerts, "
        "alert ACTIVE" in human.output
    )
    assert "last scoring error window incomplete: XMEAS_3 missing" in human.output


def test_status_tells_a_clean_stop_from_an_agent_that_died(tmp_path: Path) -> None:
    config = agent(tmp_path)
    dead = subprocess.Popen(["true"])  # a pid whose process has exited
    dead.wait()

    def shown(status: AgentStatus) -> str:
        write_status(tmp_path / "state", status)
        result = CliRunner().invoke(agent_main, ["status", "--config", str(config)])
        assert result.exit_code == 0, result.output
        return result.output

    def as_json() -> dict[str, Any]:
        result = CliRunner().invoke(agent_main, ["status", "--config", str(config), "--json"])
        return dict(json.loads(result.output))

    def stopped_cleanly() -> object:
        return as_json()["stopped_cleanly"]

    never_ran = shown(AgentStatus(agent_id="site-1"))
    assert "agent      gw-1 (stopped)\n" in never_ran
    assert "model      none yet\n" in never_ran
    assert stopped_cleanly() is True
    died = shown(AgentStatus(agent_id="site-1", state="training", pid=dead.pid))
    assert "(not running; it ended while training, without a clean stop)" in died
    assert stopped_cleanly() is False
    assert (as_json()["state"], as_json()["last_state"]) == ("stopped", "training")
    alive = shown(
        AgentStatus(agent_id="site-1", state="idle", pid=os.getpid(), last_train_loss=0.61234567)
    )
    assert "agent      gw-1 (running, idle)\n" in alive
    assert "last loss 0.6123\n" in alive
    assert stopped_cleanly() is None  # it runs
    assert "last loss -\n" in shown(AgentStatus(agent_id="site-1"))


def test_import_beside_a_running_agent_leaves_its_log_alone(tmp_path: Path) -> None:
    """A log read while the agent restarts it can look damaged: only a start with no agent
    running checks it (the agent checked it at its own start)."""
    config = agent(tmp_path)
    buffer = tmp_path / "state" / "ingest" / "buffer.db"
    buffer.parent.mkdir(parents=True, exist_ok=True)
    _killed_after_60_commits(buffer)
    wal_path = buffer.with_name("buffer.db-wal")
    wal = bytearray(wal_path.read_bytes())
    wal[_frame_offset(bytes(wal), 3) + 24 + 200] ^= 0xFF
    wal_path.write_bytes(bytes(wal))
    export = tmp_path / "line3.csv"
    historian_csv(export, minutes=10)
    command = ["import", "--config", str(config), str(export)]
    damaged = buffer.read_bytes(), wal_path.read_bytes()
    with single_instance(tmp_path / "state", "fedgate-agent"):  # as a running agent holds it
        assert CliRunner().invoke(agent_main, command).exit_code == 0
    assert not list(buffer.parent.glob("*wal-damaged*"))
    buffer.write_bytes(damaged[0])  # the same damage again, with no agent running
    wal_path.write_bytes(damaged[1])
    assert CliRunner().invoke(agent_main, command).exit_code == 0
    assert len(list(buffer.parent.glob("*wal-damaged*[!l]"))) == 1
