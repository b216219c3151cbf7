"""Scoring with onnxruntime: atomic model swaps under continuous scoring, alerts, live
windows cut from a real buffer exactly like the training windows."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.errors import WindowingError
from fedgate_agent.ingest.samples import Sample
from fedgate_agent.ingest.windows import LabelSpec, WindowSpec, latest_window
from fedgate_agent.scoring import (
    AlertRule,
    AlertTracker,
    LiveScorer,
    Prediction,
    ScoringModel,
    ScoringModelMissing,
    alerts_topic,
    latest_grid_point,
    predictions_topic,
    window_ending_at,
    windows_over,
)

from tests.agent.scoring_support import exported_demo_model, tep_test_set


def test_swap_under_continuous_scoring_never_mixes_models() -> None:
    """A scoring thread scores batches non-stop while the main thread swaps two models
    hundreds of times: every batch comes from exactly one model, bit for bit."""
    first = ScoringModel.from_onnx(exported_demo_model(0).onnx)
    second = ScoringModel.from_onnx(exported_demo_model(1).onnx)
    assert first.model_digest != second.model_digest
    windows = tep_test_set().x[::300][:16]
    expected = {
        m.model_digest: [p.probabilities for p in m.score(windows)] for m in (first, second)
    }
    assert expected[first.model_digest] != expected[second.model_digest]
    scorer = LiveScorer()
    scorer.swap(first)
    seen: dict[str, int] = {first.model_digest: 0, second.model_digest: 0}
    problems: list[str] = []
    stop = threading.Event()
    scored = threading.Semaphore(0)

    def score_forever() -> None:
        while not stop.is_set():
            batch = scorer.score(windows)
            digests = {p.model_digest for p in batch}
            if len(digests) != 1:
                problems.append(f"one batch from {len(digests)} models")
            digest = batch[0].model_digest
            if [p.probabilities for p in batch] != expected[digest]:
                problems.append(f"batch labelled {digest[:6]} has another model's scores")
            seen[digest] += 1
            scored.release()

    worker = threading.Thread(target=score_forever)
    worker.start()
    try:
        for swap in range(400):
            assert scored.acquire(timeout=10), "scoring stopped during a swap"
            scorer.swap(second if swap % 2 == 0 else first)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert problems == []
    assert sum(seen.values()) >= 400
    assert min(seen.values()) >= 100  # both models scored many batches


def test_scorer_without_a_model_says_so() -> None:
    with pytest.raises(ScoringModelMissing):
        LiveScorer().score(np.zeros((1, 20, 52), dtype=np.float32))


def test_prediction_fields_and_anomaly_score() -> None:
    model = ScoringModel.from_onnx(exported_demo_model(0).onnx)
    windows = tep_test_set().x[:4]
    predictions = model.score(windows, window_ends=[10.0, 11.0, 12.0, 13.0], normal_class=0)
    for p in predictions:
        assert abs(sum(p.probabilities) - 1) < 1e-4
        assert p.probability == max(p.probabilities)
        assert p.predicted_class == p.probabilities.index(p.probability)
        assert p.anomaly_score == pytest.approx(1 - p.probabilities[0], abs=1e-5)
        assert p.model_digest == "00" * 32
    assert [p.window_end for p in predictions] == [10.0, 11.0, 12.0, 13.0]
    assert all(p.anomaly_score is None for p in model.score(windows, normal_class=-1))


def prediction(cls: int, anomaly: float | None) -> Prediction:
    return Prediction(
        window_end=0.0,
        model_digest="d" * 64,
        model_round=1,
        predicted_class=cls,
        probability=0.5,
        anomaly_score=anomaly,
        probabilities=[],
    )


def test_alerts_are_published_on_changes_only() -> None:
    tracker = AlertTracker(AlertRule(threshold=0.8, classes=frozenset({5})))
    states = [
        tracker.observe(prediction(cls, score))
        for cls, score in [(0, 0.1), (3, 0.85), (3, 0.95), (5, 0.5), (0, 0.2), (0, 0.1), (5, None)]
    ]
    assert [None if a is None else (a.state, a.reasons) for a in states] == [
        ("cleared", []),  # the run's first state replaces a retained one of an earlier run
        ("raised", ["anomaly_score"]),
        None,
        None,  # still alerting, now for the class
        ("cleared", []),
        None,
        ("raised", ["class"]),
    ]
    assert tracker.raised == 2
    assert tracker.active
    assert AlertRule(threshold=0.0).reasons(prediction(1, 1.0)) == []  # 0: no threshold


def test_alerts_need_a_run_of_windows_to_raise_and_to_clear() -> None:
    tracker = AlertTracker(AlertRule(threshold=0.8), raise_after=2, clear_after=3)
    scores = [0.9, 0.1, 0.85, 0.9, 0.95, 0.2, 0.9, 0.1, 0.1, 0.85, 0.1, 0.1, 0.1, 0.99]
    changes = [
        (index, alert.state, alert.reasons)
        for index, score in enumerate(scores)
        if (alert := tracker.observe(prediction(0, score))) is not None
    ]
    assert changes == [
        (0, "cleared", []),  # first window: one alerting window is not yet an alert
        (3, "raised", ["anomaly_score"]),  # second alerting window in a row
        # 0.2 at 5, and 0.1 0.1 at 7-8, are too short a quiet run: no flapping
        (12, "cleared", []),  # third quiet window in a row (10-12); 13 alone raises nothing
    ]
    assert tracker.raised == 1
    assert not tracker.active
    with pytest.raises(ValueError, match="at least 1"):
        AlertTracker(AlertRule(threshold=0.8), clear_after=0)


def test_topics() -> None:
    assert predictions_topic("plant-a", "cloud-1", "site-1") == (
        "fedgate/plant-a/cloud-1/site/site-1/predictions"
    )
    assert alerts_topic("plant-a", "cloud-1", "site-1") == (
        "fedgate/plant-a/cloud-1/site/site-1/alerts"
    )
    assert latest_grid_point(1000.7, 0.5) == 1000.5


TAGS = ("A", "B", "C")
SPEC = WindowSpec(tags=TAGS, period_s=1.0, length=8, label=LabelSpec(tag="A"), max_gap_s=1.5)


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[IngestBuffer]:
    with IngestBuffer.open(BufferSettings(path=tmp_path / "buffer.db")) as opened:
        yield opened


def fill(buffer: IngestBuffer, times: np.ndarray, skip: dict[str, set[int]] | None = None) -> None:
    samples = [
        Sample(source=f"t:{tag}", seq=i, tag=tag, ts=float(t), value=float(i * 10 + column))
        for column, tag in enumerate(TAGS)
        for i, t in enumerate(times)
        if i not in (skip or {}).get(tag, set())
    ]
    buffer.insert(samples)


def test_live_window_matches_the_training_grid(buffer: IngestBuffer) -> None:
    times = 1000.0 + np.arange(40) + 0.3  # samples 0.3 s after each grid point
    fill(buffer, times, skip={"B": {30, 31, 32}})  # B silent for 3 s: a gap > max_gap_s
    end = 1020.0
    window = window_ending_at(buffer, SPEC, end)
    assert window is not None
    assert window.shape == (8, 3)
    np.testing.assert_array_equal(window, latest_window(buffer, SPEC, now=end + 0.5))
    # forward fill: grid point 1020 holds the sample of 1019.3 (index 19)
    assert window[-1].tolist() == [190.0, 191.0, 192.0]
    assert window_ending_at(buffer, SPEC, 1032.0) is None  # B missing at 1032
    grid = windows_over(buffer, SPEC, stride=1)
    ends, windows = grid.ends, grid.windows()
    assert len(ends) == len(windows) == len(grid)
    # cut a slice at a time (as predict does), the windows are the same
    np.testing.assert_array_equal(np.concatenate([grid.windows(0, 7), grid.windows(7)]), windows)
    assert 1020.0 in ends.tolist()
    assert 1032.0 not in ends.tolist()
    np.testing.assert_array_equal(windows[ends.tolist().index(1020.0)], window)
    for e, w in zip(ends[::5], windows[::5], strict=True):
        np.testing.assert_array_equal(w, window_ending_at(buffer, SPEC, float(e)))


def test_windows_over_needs_every_tag(buffer: IngestBuffer) -> None:
    buffer.insert([Sample(source="t:A", seq=1, tag="A", ts=1.0, value=1.0)])
    with pytest.raises(WindowingError, match="no samples"):
        windows_over(buffer, SPEC)
