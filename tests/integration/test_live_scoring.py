"""Live scoring inside `AgentService` against a real Mosquitto on 127.0.0.1.

Plant samples arrive in the agent's buffer in real time (a window every 50 ms); the
coordinator's signed global models arrive over the broker: the genesis model, then a
certified round-1 model. The agent exports each to ONNX in a worker thread and swaps it in
while it keeps scoring. What a plant system subscribed to the site's topics sees is checked:
predictions for consecutive windows, each naming the model that scored it, the models in
order with no window scored by a mix and no pause at the swap, and the alert the round-1
model raises.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np
import pytest
from fedgate_agent.config import (
    AgentConfig,
    BrokerConfig,
    ScoringConfig,
    TrainingConfig,
    WindowsConfig,
)
from fedgate_agent.data_settings import buffer_settings
from fedgate_agent.ingest.buffer import IngestBuffer
from fedgate_agent.ingest.samples import Sample
from fedgate_agent.scoring import load_scoring_model, onnx_path
from fedgate_agent.service import AgentService
from fedgate_common.arrays import encode_arrays
from fedgate_common.digests import GENESIS_PARENT, model_digest
from fedgate_common.envelope import seal
from fedgate_common.keys import public_key_text
from fedgate_common.messages import GlobalModel
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_common.tasks import cancel_until_done
from fedgate_common.topics import model_topic

from tests.bridge.bridge_support import mosquitto, subscriber, wait_until
from tests.federation_support import certificate, federation_manifest, install_manifest

DEPLOYMENT, CLOUD, AGENT = "plant", "cloud-1", "site-1"
SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
TAGS = ("A", "B", "C")
PERIOD_S = 0.05
COORDINATOR = nacl.signing.SigningKey.generate()

pytestmark = pytest.mark.slow


def global_model(round: int, parent: str, weights: dict[str, np.ndarray]) -> GlobalModel:
    wire = encode_arrays(weights)
    digest = model_digest(parent_digest=parent, round=round, spec=SPEC, weights=wire)
    cert = (
        certificate(deployment=DEPLOYMENT, height=round, digest=digest, keys={CLOUD: COORDINATOR})
        if round
        else None
    )
    return GlobalModel(
        round=round, digest=digest, parent_digest=parent, spec=SPEC, weights=wire, certificate=cert
    )


def agent_config(state: Path, port: int) -> AgentConfig:
    manifest = federation_manifest(deployment=DEPLOYMENT, keys={CLOUD: COORDINATOR}, spec=SPEC)
    return AgentConfig(
        agent_id=AGENT,
        deployment=DEPLOYMENT,
        cloud=CLOUD,
        state_dir=str(state),
        coordinator_public_key=public_key_text(COORDINATOR.verify_key),
        manifest_digest=install_manifest(state, manifest),
        broker=BrokerConfig(port=port),
        training=TrainingConfig(source="buffer"),
        windows=WindowsConfig(tags=TAGS, period_s=PERIOD_S, max_gap_s=3 * PERIOD_S, label_tag="A"),
        scoring=ScoringConfig(alert_threshold=0.999, settle_s=0.01),
    )


async def feed(buffer: IngestBuffer, silent: set[str]) -> None:
    """Two samples per tag and period, time-stamped now, like a live source; the tags in
    ``silent`` send nothing (a sensor outage)."""
    seq = 0
    while True:
        now = time.time()
        seq += 1
        buffer.insert(
            [
                Sample(source=f"live:{t}", seq=seq, tag=t, ts=now, value=float(np.sin(seq + i)))
                for i, t in enumerate(TAGS)
                if t not in silent
            ]
        )
        await asyncio.sleep(PERIOD_S / 2)


async def test_scoring_publishes_and_swaps_models_without_a_pause(tmp_path: Path) -> None:
    genesis_weights = initial_weights(SPEC, np.random.default_rng(1))  # the manifest's seed
    genesis = global_model(0, GENESIS_PARENT, genesis_weights)
    # Round 1 says "fault" (class 1) for everything: anomaly score ≈ 1 raises the alert.
    faulty = dict(genesis_weights, **{"head.bias": np.array([-20.0, 20.0], dtype=np.float32)})
    round_1 = global_model(1, genesis.digest, faulty)
    site = f"fedgate/{DEPLOYMENT}/{CLOUD}/site/{AGENT}"
    with (
        mosquitto(tmp_path / "broker") as broker,
        subscriber(broker.port, f"{site}/#") as plant,
    ):
        config = agent_config(tmp_path / "state", broker.port)
        service = AgentService(config=config, identity=nacl.signing.SigningKey.generate())
        assert service.status.scoring.live
        writer = IngestBuffer.open(buffer_settings(config))
        silent: set[str] = set()
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(feed(writer, silent))]

        def predictions(digest: str | None = None) -> list[dict[str, Any]]:
            return [
                p
                for p in plant.by_topic().get(f"{site}/predictions", [])
                if digest is None or p["model_digest"] == digest
            ]

        def send(model: GlobalModel) -> None:
            raw = seal(
                model, signing_key=COORDINATOR, deployment=DEPLOYMENT, cloud=CLOUD, sender=CLOUD
            )
            plant.client.publish(model_topic(DEPLOYMENT, CLOUD), raw, qos=1).wait_for_publish(5)

        try:
            await wait_until(service.link.connected.is_set, 10, "the agent's connection")
            send(genesis)
            await wait_until(lambda: len(predictions(genesis.digest)) >= 5, 30, "genesis scores")
            send(round_1)
            await wait_until(lambda: len(predictions(round_1.digest)) >= 10, 30, "round 1 scores")
            await wait_until(
                lambda: len(plant.by_topic().get(f"{site}/alerts", [])) >= 2, 5, "alert"
            )
            # Sensor B goes silent for 8 periods: the windows it leaves incomplete are
            # counted, not scored, and scoring resumes by itself once B is back.
            before_outage = len(predictions())
            incomplete_before = service.status.scoring.windows_incomplete
            silent.add("B")
            await wait_until(lambda: service.status.scoring.windows_incomplete > 0, 5, "gap")
            await asyncio.sleep(8 * PERIOD_S)  # the outage's length, not a wait for an event
            silent.clear()
            await wait_until(lambda: len(predictions()) >= before_outage + 15, 10, "resumed")
        finally:
            await cancel_until_done(tasks)
            writer.close()

    seen = predictions()[:before_outage]  # the outage's gap is checked below
    digests = [p["model_digest"] for p in seen]
    swap = digests.index(round_1.digest)
    assert set(digests[:swap]) == {genesis.digest}  # first only genesis …
    assert set(digests[swap:]) == {round_1.digest}  # … then only round 1: never mixed
    assert [p["model_round"] for p in seen] == [0] * swap + [1] * (len(seen) - swap)
    ends = [float(p["window_end"]) for p in seen]
    gaps = np.diff(ends)
    assert (gaps > 0).all()  # each window scored once, in order
    assert np.allclose(np.round(np.array(ends) / PERIOD_S), np.array(ends) / PERIOD_S)
    # No pause while round 1 was exported and swapped in. A grid point without a prediction
    # is either a window the agent found incomplete (counted: this test's feed shares the
    # event loop and the disk, and on a slow machine it missed samples for up to 0.5 s while
    # the export's child process started) or one the scoring loop skipped because it was
    # stalled. Skipped ones stay a few (a loaded machine may make the loop skip one);
    # exporting in a thread of the agent instead stalled scoring for 1.15 s (23 windows).
    missing = round((ends[-1] - ends[0]) / PERIOD_S) - len(gaps)
    print(
        f"largest gap {gaps.max():.3f} s, at the swap {ends[swap] - ends[swap - 1]:.3f} s; "
        f"{missing} grid points without a prediction, {incomplete_before} windows incomplete"
    )
    # At the swap too: the windows the feed left incomplete while the export's child
    # started may fall there (9 periods with 8 incomplete, in a full suite on 2 cores).
    assert ends[swap] - ends[swap - 1] <= (5 + incomplete_before) * PERIOD_S + 1e-9
    assert missing - incomplete_before <= 9
    for p in seen:
        assert abs(sum(p["probabilities"]) - 1) < 1e-4
    assert all(p["anomaly_score"] > 0.999 for p in seen[swap:])
    alerts = plant.by_topic()[f"{site}/alerts"]
    # The run's first window publishes its state (genesis: cleared), replacing whatever an
    # earlier run left retained; round 1's fault scores then raise the alert.
    assert [(a["state"], a["model_digest"]) for a in alerts[:2]] == [
        ("cleared", genesis.digest),
        ("raised", round_1.digest),
    ]
    assert alerts[1]["reasons"] == ["anomaly_score"]

    scoring = service.status.scoring
    assert (scoring.exports, scoring.swaps, scoring.model_digest) == (2, 1, round_1.digest)
    assert scoring.windows_scored >= len(seen) + 15
    assert scoring.windows_incomplete >= 1
    assert scoring.errors == {}
    assert scoring.alerts_raised == 1
    assert scoring.parity_max_abs_diff is not None
    assert scoring.parity_max_abs_diff <= 1e-4
    stored = load_scoring_model(onnx_path(tmp_path / "state"))
    assert stored.model_digest == round_1.digest
    status = json.loads((tmp_path / "state" / "status.json").read_text())
    assert status["scoring"]["model_digest"] == round_1.digest
