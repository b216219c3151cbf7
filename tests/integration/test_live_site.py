"""A whole site on one machine: simulated plant → bridge → Mosquitto → `fedgate-agent run`.

Every process is the real command an operator runs. The plant serves Modbus TCP, the bridge
polls it and publishes JSON with per-topic sequence numbers, the agent ingests QoS 1 into its
buffer. The end-to-end claim checked here: once the plant stops and the pipes drain, every
reading the bridge numbered is in the agent's buffer exactly once, and the buffer gives
labelled training windows for the model of the pinned manifest.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import tomli_w
from fedgate_bridge.simulator.register_map import FEATURE_TAGS
from fedgate_common.consensus.manifest import encode_manifest_file
from fedgate_common.keys import public_key_text
from fedgate_common.model_spec import ModelSpec

from tests.federation_support import federation_manifest
from tests.net_support import free_port

BIN = Path(sys.executable).parent
SPEED = 3600.0  # one 3-minute sample every 0.05 s
PERIOD_S = 180.0 / SPEED
SPEC = ModelSpec(n_features=len(FEATURE_TAGS), window=20, n_classes=22, channels=8)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cli(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:], "--json"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# Every process the test started, with its log: a wait that fails says which one died or
# what each was doing, instead of only that the time ran out.
Watched = dict[str, tuple[subprocess.Popen[bytes], Path]]


def log_tails(watched: Watched, lines: int = 20) -> str:
    parts = []
    for name, (proc, log) in watched.items():
        code = proc.poll()
        state = "running" if code is None else f"exited {code}"
        tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
        parts.append(f"--- {name} ({state}), {log}:\n" + "\n".join(tail))
    return "\n".join(parts)


def wait_for(condition: object, timeout: float, what: str, watched: Watched) -> None:
    """Poll ``condition`` until it holds; fail at once if a watched process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        if any(proc.poll() is not None for proc, _ in watched.values()):
            pytest.fail(f"a process exited while waiting for {what}\n{log_tails(watched)}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{log_tails(watched)}")


def agent_config(tmp_path: Path, broker_port: int) -> Path:
    """`fedgate-agent init`, enrollment key, pinned manifest, then the live-data settings."""
    config = tmp_path / "agent" / "agent.toml"
    coordinator = nacl.signing.SigningKey.generate()
    cli(
        "fedgate-agent",
        "init",
        "--config",
        str(config),
        "--agent-id",
        "site-1",
        "--state-dir",
        str(config.parent),
        "--broker-port",
        str(broker_port),
        "--coordinator-key",
        public_key_text(coordinator.verify_key),
    )
    manifest = tmp_path / "federation.json"
    manifest.write_bytes(
        encode_manifest_file(
            federation_manifest(deployment="fedgate", keys={"cloud-1": coordinator}, spec=SPEC)
        )
    )
    cli("fedgate-agent", "federation", "pin", "--config", str(config), str(manifest))
    raw = tomllib.loads(config.read_text())
    raw["training"]["source"] = "buffer"
    raw["windows"] = {
        "tags": list(FEATURE_TAGS),
        "period_s": PERIOD_S,
        "max_gap_s": 3 * PERIOD_S,
        "label_tag": "FAULT",
        "test_fraction": 0.2,
    }
    raw["mqtt_source"] = [{"topic": "plant/site-1/+/+"}]
    config.write_text(tomli_w.dumps(raw))
    return config


def test_plant_bridge_agent_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    broker_port, modbus_port = free_port(), free_port()
    broker_conf = tmp_path / "mosquitto.conf"
    broker_conf.write_text(
        f"listener {broker_port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    config = agent_config(tmp_path, broker_port)
    bridge_toml = tmp_path / "bridge.toml"
    with contextlib.ExitStack() as stack:
        watched: Watched = {}

        def start(name: str, command: list[str]) -> subprocess.Popen[bytes]:
            """Run ``command`` until the test ends, logging to logs/<name>; watch it."""
            proc = stack.enter_context(process(command, logs / name))
            watched[name] = (proc, logs / name)
            return proc

        start("mosquitto", ["/usr/sbin/mosquitto", "-c", str(broker_conf)])
        agent = start("agent", [str(BIN / "fedgate-agent"), "run", "--config", str(config)])

        def subscribed() -> bool:
            ingest = cli("fedgate-agent", "status", "--config", str(config)).get("ingest")
            return isinstance(ingest, dict) and any(s["connected"] for s in ingest["sources"])

        wait_for(subscribed, 60, "the agent's ingest session", watched)  # then nothing is missed
        plant = start(
            "plant",
            [
                str(BIN / "fedgate-bridge"),
                "simulate",
                "--seed",
                "3",
                "--fault",
                "IDV1:5",
                "--modbus-port",
                str(modbus_port),
                "--speed",
                str(SPEED),
                "--control-seconds",
                "9",
                "--write-bridge-config",
                str(bridge_toml),
                "--topic-prefix",
                "plant/site-1",
                "--bridge-state-dir",
                str(tmp_path / "bridge"),
                "--broker-port",
                str(broker_port),
            ],
        )
        wait_for(bridge_toml.exists, 60, "the simulator's bridge config", watched)
        bridge = start("bridge", [str(BIN / "fedgate-bridge"), "run", "--config", str(bridge_toml)])

        def buffered() -> int:
            status = cli("fedgate-agent", "status", "--config", str(config))
            ingest = status.get("ingest") or {}
            assert isinstance(ingest, dict)
            samples = ingest.get("buffer", {}).get("samples", 0)
            return int(samples)

        # IDV1 starts at 5 plant hours (sample 100), a few seconds after the bridge.
        wait_for(
            lambda: buffered() >= 53 * 160, 120, "160 plant samples in the agent's buffer", watched
        )
        status = cli("fedgate-agent", "status", "--config", str(config))
        ingest = status["ingest"]
        assert isinstance(ingest, dict)
        (source,) = ingest["sources"]
        assert source["kind"] == "mqtt"
        assert source["connected"] is True
        assert source["received"] > 0
        assert not source["rejected"]
        assert ingest["lag_s"] is not None
        assert ingest["lag_s"] < 10
        windows = cli("fedgate-agent", "windows", "--config", str(config))
        assert windows["train_windows"] > 0
        assert set(windows["train_per_class"]) | set(windows["test_per_class"]) >= {"0", "1"}

        plant.send_signal(signal.SIGTERM)  # the plant stops producing; the pipes drain
        assert plant.wait(timeout=30) == 0
        del watched["plant"]
        wait_for(
            lambda: (
                cli("fedgate-bridge", "status", "--config", str(bridge_toml))["outbox"]["depth"]
                == 0
            ),
            60,
            "the bridge's outbox to drain",
            watched,
        )
        numbered = bridge_sequence_numbers(tmp_path / "bridge" / "outbox.db")

        def all_stored() -> bool:
            return stored_per_topic(config.parent / "ingest" / "buffer.db") == numbered

        try:
            wait_for(all_stored, 60, "every numbered reading in the agent's buffer", watched)
        except BaseException:
            stored = stored_per_topic(config.parent / "ingest" / "buffer.db")
            topics = sorted(set(numbered) | set(stored))
            print({t: (numbered.get(t), stored.get(t)) for t in topics})
            ingest_now = cli("fedgate-agent", "status", "--config", str(config))["ingest"]
            print(ingest_now)
            # The agent's own count against what another process reads from the file: if
            # they differ, commits are not reaching the file others open (a detached WAL).
            assert isinstance(ingest_now, dict)
            buffer_dir = config.parent / "ingest"
            print(
                "samples: the agent counts",
                ingest_now["buffer"]["samples"],
                "| this process reads",
                sum(count for count, _ in stored.values()),
                "| files",
                {f.name: f.stat().st_size for f in sorted(buffer_dir.iterdir())},
            )
            raise
        assert agent.poll() is None
        assert bridge.poll() is None
    per_topic = stored_per_topic(config.parent / "ingest" / "buffer.db")
    assert len(per_topic) == len(FEATURE_TAGS) + 1  # 52 features and FAULT
    assert all(count > 0 for count, _ in per_topic.values())


def bridge_sequence_numbers(outbox: Path) -> dict[str, tuple[int, int]]:
    """topic → (readings numbered, highest seq + 1): 0..n-1 were all produced."""
    with contextlib.closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT topic, next_seq FROM streams").fetchall()
    return {f"mqtt:{topic}": (int(n), int(n)) for topic, n in rows}


def stored_per_topic(buffer: Path) -> dict[str, tuple[int, int]]:
    """source → (samples stored, highest seq + 1) in the agent's buffer."""
    with contextlib.closing(sqlite3.connect(f"file:{buffer}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT source, count(*), max(seq) + 1 FROM samples GROUP BY source"
        ).fetchall()
    return {source: (int(count), int(top)) for source, count, top in rows}
