"""A buffer damaged while the agent runs (a bad sector the start-up check could not see).

Through the machine's Mosquitto: readings flow into a real buffer file, then one page of its
``sources`` table is overwritten. The status refresh reads that table every few seconds;
its failure used to end the data path, and with it the whole agent.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import time
from pathlib import Path

import aiomqtt
import pytest
from fedgate_agent import data_path
from fedgate_agent.config import load_config
from fedgate_agent.data_path import DataPath
from fedgate_common.tasks import cancel_until_done


async def test_a_page_damaged_while_running_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_path, "STATUS_INTERVAL_S", 0.2)
    line = f"line{secrets.token_hex(4)}"
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f'agent_id = "site-1"\ndeployment = "plant-a"\ncloud = "cloud-1"\n'
        f'state_dir = "{tmp_path / "state"}"\ncoordinator_public_key = ""\n'
        f'manifest_digest = "{"ab" * 32}"\n[broker]\nhost = "127.0.0.1"\nport = 1883\n'
        f'[[mqtt_source]]\ntopic = "plant/{line}/+"\n'
    )
    path = DataPath(load_config(config_file, env={}, require_complete=False))
    running = asyncio.create_task(path.run())
    try:
        async with aiomqtt.Client("127.0.0.1", 1883) as plant:
            await asyncio.sleep(1.0)  # subscribed
            now = time.time()
            for seq in range(50):
                reading = {"ts": now - 100 + seq, "value": float(seq), "seq": seq}
                await plant.publish(f"plant/{line}/XMEAS_1", json.dumps(reading), qos=1)
            deadline = time.monotonic() + 15
            while path.refresh_status().buffer.samples < 50 and time.monotonic() < deadline:  # noqa: ASYNC110 - polling the counters
                await asyncio.sleep(0.1)
            assert path.status.buffer.samples == 50
        buffer_file = path.settings.path
        with sqlite3.connect(buffer_file) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            (root,) = db.execute(
                "SELECT rootpage FROM sqlite_master WHERE name = 'sources'"
            ).fetchone()
            (page,) = db.execute("PRAGMA page_size").fetchone()
        with buffer_file.open("r+b") as raw:
            raw.seek((root - 1) * page)
            raw.write(b"\xa5" * page)
            raw.flush()
            os.fsync(raw.fileno())
        with sqlite3.connect(buffer_file) as db:  # a commit: every connection's cache is stale
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('poke', '1')")
        await asyncio.sleep(1.0)  # five refreshes
        assert not running.done(), running.exception() if running.done() else None
        error = path.status.buffer.error
        assert error is not None
        assert "malformed" in error
        assert path.status.buffer.samples == 50  # the last counts read, kept
    finally:
        await cancel_until_done([running])
